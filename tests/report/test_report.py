"""The HTML report: sections from an audit document, escaping of hostile names, browser rendering."""

from __future__ import annotations

import base64
import re

import matplotlib.image as mpimg
import numpy as np

from probekit.report import render_html, write_report

HOSTILE = '<script>alert("x")</script>$\\frac{a}{b}$&"\''


def _est(v, w=0.02):
    return {"value": v, "ci": [v - w, v + w]}


def _doc(model_t="teacher", model_s="student", layer="fc", factor="hue"):
    layers = {}
    for m, sens in ((model_t, 0.08), (model_s, 0.13)):
        layers[m] = {
            layer: {
                "n_units": 8,
                "probe": {"id": _est(0.95), "ood": _est(0.94 if m == model_t else 0.70), "gap": _est(0.1)},
                "decodability": {"stress": {"factors": {factor: {"score": 0.3, "control": 0.0,
                                                                 "excess": _est(0.3)}},
                                            "mean_excess_r2": _est(0.3), "mean_excess_balanced_accuracy": {"value": None, "ci": None}}},
                "correlation": {"split": "stress", "mean_abs_r": 0.05, "noise_floor": 0.02, "threshold": 0.08,
                                "share_significant": 0.2, "variance_share_background": 0.1,
                                "variance_share_label": 0.5,
                                "hist": {"edges": [0, 0.1, 0.2, 0.3], "counts": [5, 2, 1]}},
                "sensitivity": {"split": "stress", "value": _est(sens), "init": _est(0.3)},
                "nms": {"from": "test_id", "to": "test_ood", "value": _est(sens * 5), "init": _est(0.5)},
            }
        }
    return {
        "schema": "probekit.audit", "schema_version": 1, "probekit_version": "0", "created": "now",
        "store": f"/tmp/{HOSTILE}.h5", "config": {},
        "splits": {"train": {}, "test_id": {}, "test_ood": {}, "stress": {}},
        "models": {
            model_t: {"role": "teacher", "source": "x", "layers": layers[model_t],
                      "directions": {layer: {"n_units": 8, "n_directions": 2, "shares": [0.6, 0.35, 0.05],
                                             "spreads": [3, 4, 9]}}},
            model_s: {"role": "student", "source": "x", "layers": layers[model_s], "directions": {}},
        },
        "pairs": [{"teacher": model_t, "student": model_s, "teacher_layer": layer, "student_layer": layer,
                   "cka": {"test_id": _est(0.9), "test_ood": _est(0.6)},
                   "rel_mse": {"test_id": _est(0.05), "test_ood": _est(0.36)},
                   "differences": {"sensitivity": 0.05}}],
        "headline": {"name": "background sensitivity", "definition": "share of variance",
                     "rows": [{"model": model_s, "layer": layer, "estimate": _est(0.13), "reference": model_t,
                               "reference_value": 0.08, "ratio": 1.6, "flag": True}]},
        "verdict": [f"{model_s}: {layer} is background-sensitive"],
        "skipped": [{"analysis": "attribution", "model": None, "layer": None, "reason": f"no masks {HOSTILE}"}],
        "attribution": {},
    }


SECTIONS = ["summary", "probes", "decodability", "sensitivity", "correlation", "directions",
            "teacher-student", "skipped"]


def test_all_sections_and_embedded_images():
    html = render_html(_doc())
    for sid in SECTIONS:
        assert f'id="{sid}"' in html
    imgs = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(imgs) >= 7
    for b64 in imgs:
        assert base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "http://" not in html and "https://" not in html  # self-contained: nothing fetched


def test_user_strings_are_escaped_everywhere():
    html = render_html(_doc(model_t=HOSTILE, layer=HOSTILE, factor=HOSTILE))
    assert "<script>" not in html
    assert "&lt;script&gt;" in html
    # matplotlib would choke on the mathtext in the name unless it is escaped: the images exist
    assert len(re.findall(r'src="data:image/png', html)) >= 7


def test_sections_without_data_are_left_out():
    doc = _doc()
    for info in doc["models"].values():
        for res in info["layers"].values():
            res.pop("correlation")
    doc["pairs"] = []
    html = render_html(doc)
    assert 'id="correlation"' not in html and 'id="teacher-student"' not in html
    assert 'id="probes"' in html


def test_report_renders_in_chromium(tmp_path, browser):
    out = write_report(_doc(model_t=HOSTILE), tmp_path / "report.html")
    png, dom, errors = browser(out)
    assert errors == []
    for sid in SECTIONS:
        assert f'id="{sid}"' in dom
    assert dom.count("<script") == 0  # the hostile name never became an element
    img = mpimg.imread(png)
    assert img.shape[0] > 500 and img.shape[1] > 500
    assert float(np.std(img[..., :3])) > 0.05  # not a blank page
