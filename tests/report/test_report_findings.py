"""The report of a schema-3 audit, read as a person before a release would: one badge per reached verdict and
a grey "not judged" one otherwise, the graded findings beside it, honest axes and captions, layers in depth
order, and no cut or overlapping label at 1,200 px in headless Chromium."""

from __future__ import annotations

import json
import re

import matplotlib.pyplot as plt
import pytest

from probekit.report import _plots as P
from probekit.report import render_html, write_report


def est(v, w=0.03):
    return {"value": v, "ci": [max(0.0, v - w), min(1.0, v + w)]}


def behaviour(rel, own, other, eff, detectable=0.12):
    return {"predictions": "the model's own output", "from_output": True, "split": "crossed", "n_groups": 60,
            "n_backgrounds": 8, "flip_rate": est(0.4), "pull": est(rel * 0.6), "pull_threshold": 0.05,
            "reliance": {**est(rel), "p_value": 0.001, "margin": 0.05, "detectable": detectable,
                         "basis": "background_label", "reason": None},
            "accuracy_own_background": est(own), "accuracy_other_background": est(other),
            "bg_gap_crossed": est(own - other), "background_effect": {**est(eff), "p_value": 0.2, "margin": 0.05},
            "chance": 0.34}


def layers(flags, init=None):
    out = {}
    for la, f in flags:  # in execution order, which is not name order
        out[la] = {"n_units": 8, "crossed": {"foreground": est(0.5), "background": est(0.2), "interaction": est(0.1),
                                             "background_share": est(0.98, 0.005)},
                   "background_flag": f,
                   "background_vs_reference": {"reference": "initialisation", "kind": "odds", "value": 0.3,
                                               "reference_value": 0.1, "ratio": est(3.0), "ci_level": 0.99,
                                               "margin": 1.25},
                   "sensitivity": {"split": "crossed", "value": est(0.98, 0.005),
                                   "init": est(init) if init is not None else {"value": None, "ci": None}}}
    return out


def doc3(bad="shortcut", ok="robust", none="recorded", init=None):
    order = [("features.6", True), ("features.0", True), ("features.3", True)]
    return {
        "schema": "probekit.audit", "schema_version": 3, "probekit_version": "0",
        "created": "2026-01-01T00:00:00+00:00", "store": "/tmp/x/acts.h5", "config": {},
        "splits": {"crossed": {}, "variants": {}},
        "models": {
            bad: {"role": "model", "findings": ["shortcut", "representation"],
                  "judged": {"shortcut": True, "background_sensitive": True, "representation": True},
                  "flagged": True, "verdict": f"{bad} relies on the background: reliance 62 % [59, 65].",
                  "verdict_reason": None, "behaviour": behaviour(0.62, 0.99, 0.35, 0.02),
                  "layers": layers(order, init)},
            ok: {"role": "model", "findings": ["representation"],
                 "judged": {"shortcut": True, "background_sensitive": True, "representation": True},
                 "flagged": False, "verdict": f"{ok} is not flagged: reliance 1 % [0, 4].",
                 "verdict_reason": None, "behaviour": behaviour(0.01, 0.95, 0.94, 0.01),
                 "layers": layers([("features.6", False), ("features.0", True)], init)},
            none: {"role": "model", "findings": [],
                   "judged": {"shortcut": False, "background_sensitive": False, "representation": False},
                   "flagged": None, "verdict": f"{none}: no verdict.",
                   "verdict_reason": "the store has no crossed split with labels", "behaviour": {}, "layers": {}},
        },
        "pairs": [{"teacher": ok, "student": bad, "teacher_layer": "student.block1.attention.output",
                   "student_layer": "student.block1.attention.output",
                   "cka": {"test_id": est(0.9), "test_ood": est(0.6)},
                   "rel_mse": {"test_id": est(0.05), "test_ood": est(0.36)}}] * 4,
        "headline": {"rows": []}, "verdict": [], "skipped": [],
    }


@pytest.fixture(scope="module")
def html():
    return render_html(doc3())


def _badges(html):
    return re.findall(r'<span class="badge (\w+)">([^<]+)</span>', html)


def test_badges_say_what_was_decided_and_nothing_more(html):
    assert _badges(html) == [("bad", "FLAGGED"), ("ok", "not flagged"), ("none", "not judged")]
    assert "Not judged: the store has no crossed split with labels" in html
    # a non-detection is reported as one, with the smallest reliance the audit could detect
    assert "Not detected: reliance 1.0 % [0.0, 4.0]; this audit detects a reliance of 12 % or more" in html
    # the clean model's layer FLAG is explained beside its verdict
    assert "Its layer FLAG (features.0) is the representation finding" in html


def test_schema2_document_without_a_verdict_gets_no_clean_badge():
    doc = doc3()
    for info in doc["models"].values():
        for k in ("findings", "judged", "verdict_reason"):
            info.pop(k)
    doc["models"]["recorded"].update({"flagged": False, "flag_basis": None})
    doc["models"]["shortcut"]["flag_basis"] = "behaviour"
    doc["models"]["robust"]["flag_basis"] = "behaviour"
    html = render_html(doc)
    assert _badges(html) == [("bad", "FLAGGED"), ("ok", "not flagged"), ("none", "not judged")]


def test_findings_table_has_the_graded_figures_in_points(html):
    assert "the findings&#39; figures" in html
    assert "+64.0 pts [+61.0, +67.0]" in html  # 0.99 - 0.35 in points, with its interval
    assert "62.0 % [59.0, 65.0]" in html


def test_layers_in_the_documents_order_not_by_name(html):
    rows = re.findall(r"<td class=\"l\">shortcut</td><td class=\"l\">(features\.\d)</td>", html)
    assert rows[:3] == ["features.6", "features.0", "features.3"]


def test_dotted_line_named_only_where_drawn(html):
    assert "dotted: at initialisation" not in html
    assert ">at init<" not in html  # and the empty "at init" column goes with it
    doc = doc3(init=0.3)
    doc["pairs"] = []
    drawn = render_html(doc)
    assert "dotted: at initialisation" in drawn and ">at init<" in drawn


@pytest.fixture
def figures(monkeypatch):
    """Every matplotlib figure the report draws, kept open for inspection."""
    figs = []
    real = P.to_data_uri

    def keep(fig):
        figs.append(fig)
        fig.canvas.draw()
        return real(fig)

    monkeypatch.setattr(P, "to_data_uri", keep)
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda *a, **k: None)
    yield figs
    for f in figs:
        close(f)


def test_axes_do_not_exaggerate_and_tick_labels_do_not_collide(figures):
    render_html(doc3())
    assert figures
    for fig in figures:
        for ax in fig.axes:
            if not ax.get_visible() or not ax.get_ylabel():
                continue
            lo, hi = ax.get_ylim()
            label = ax.get_ylabel()
            if any(k in label for k in ("share", "accuracy", "CKA", "background / total")):
                top = 100 if "%" in label else 1
                assert lo <= 0 and hi >= top, (label, lo, hi)  # a flat 0.98 is drawn on the whole range
            assert not P.tick_overlap(fig, ax), ax.get_title()
    cka = next(ax for f in figures for ax in f.axes if ax.get_title() == "linear CKA")
    texts = [t.get_text() for t in cka.get_xticklabels()]
    assert "shortcut.student.block1.attention.output" in texts[0].replace("\n", "")  # wrapped, not cut


def test_reliance_whisker_is_the_interval_and_tick_the_threshold(figures):
    render_html(doc3())
    ax = next(a for f in figures for a in f.axes if a.get_title() == "reliance on the background")
    whiskers = [seg for coll in ax.collections for seg in coll.get_segments() if len(seg) == 2
                and seg[0][0] == seg[1][0]]
    spans = sorted((round(min(s[0][1], s[1][1]), 3), round(max(s[0][1], s[1][1]), 3)) for s in whiskers)
    assert (0.59, 0.65) in spans and (0.0, 0.04) in spans
    ticks = [seg for coll in ax.collections for seg in coll.get_segments() if len(seg) == 2
             and seg[0][1] == seg[1][1] and abs(seg[0][1] - 0.05) < 1e-9]
    assert len(ticks) == 2  # the threshold, drawn at each judged model
    detect = [seg for coll in ax.collections for seg in coll.get_segments() if len(seg) == 2
              and seg[0][1] == seg[1][1] and abs(seg[0][1] - 0.12) < 1e-9]
    assert len(detect) == 1 and detect[0][0][0] > 0.5  # only beside the model that was not flagged (robust, x=1)


LAYOUT_JS = """<script>
window.addEventListener('load', () => {
  const W = document.documentElement.clientWidth;
  const out = {page: document.documentElement.scrollWidth - W, cut: [], wide: [], overlaps: 0, thumbs: 0};
  for (const el of document.querySelectorAll('td, th, figcaption, .gal-head, h1, h2, h3, p, li')) {
    if (el.scrollWidth > el.clientWidth + 1) out.cut.push(el.tagName + ': ' + el.textContent.slice(0, 40));
  }
  for (const el of document.querySelectorAll('img, .tablewrap')) {
    const r = el.getBoundingClientRect();
    if (r.right > W + 1 || el.scrollWidth > el.clientWidth + 1) out.wide.push(el.tagName + ' ' + (el.alt || ''));
  }
  const t = [...document.querySelectorAll('figure.thumb, figure')].map(e => e.getBoundingClientRect());
  out.thumbs = t.length;
  for (let i = 0; i < t.length; i++) for (let j = i + 1; j < t.length; j++) {
    const a = t[i], b = t[j];
    if (a.left < b.right - 1 && b.left < a.right - 1 && a.top < b.bottom - 1 && b.top < a.bottom - 1) out.overlaps++;
  }
  const pre = document.createElement('pre'); pre.id = 'layout'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def layout(browser, path, html):
    """Chromium's measurement of the page at 1,200 px: overflow, cut text, overlapping figures."""
    path.write_text(html.replace("</body>", LAYOUT_JS + "</body>"), encoding="utf-8")
    png, dom, errors = browser(path, width=1200, height=3000)
    m = re.search(r'<pre id="layout">(.*?)</pre>', dom, flags=re.S)
    assert m, "the layout script did not run"
    return json.loads(m.group(1).replace("&quot;", '"')), png, errors


def test_no_label_overflow_at_1200px_in_chromium(tmp_path, browser):
    hostile = "a-very-long-model-name-without-any-break-" * 2
    out, _png, errors = layout(browser, tmp_path / "report.html", render_html(doc3(bad=hostile)))
    assert errors == []
    assert out["page"] <= 0, "the page scrolls sideways at 1,200 px"
    assert out["cut"] == [] and out["wide"] == []
    assert out["overlaps"] == 0
    write_report(doc3(), tmp_path / "plain.html")  # kept beside it for a person to look at
