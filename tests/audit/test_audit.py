"""probekit.audit on stores with a planted answer; the CLI's analyze / report on them.

Stores are built from a generative model where the truth is known: each row is a foreground (the
group, carrying the label) plus a background (the factors); a layer's units read the foreground, and a
planted weight ``p`` mixes the background into them.
"""

from __future__ import annotations

import json
from importlib import resources

import h5py
import jsonschema
import numpy as np
import pytest

import probekit as pk
from probekit.cli import main

N_FG, K_BG, D, F = 60, 6, 16, 3


def _rows(rng, n_rows_per_fg, bg_scale, fg_ids=None):
    fg = np.arange(N_FG) if fg_ids is None else fg_ids
    g = np.repeat(fg, n_rows_per_fg)
    factors = rng.uniform(-1, 1, size=(len(g), F)) * bg_scale
    return g, factors


def _acts(g, factors, p, seed_w=7):
    w = np.random.default_rng(seed_w)
    fg_code = w.normal(size=(N_FG, D))  # a fixed foreground embedding
    mix = w.normal(size=(F, D))
    return (fg_code[g] + p * factors @ mix).astype(np.float32)


def _write_store(path, levels, *, with_init=False):
    """One model per planted level (name -> p); roles from the names (teacher/student/model)."""
    rng = np.random.default_rng(0)
    splits = {
        "train": _rows(rng, 3, 1.0),
        "test_id": _rows(rng, 1, 1.0),
        "test_ood": _rows(rng, 1, 3.0),  # backgrounds beyond the training range
        "crossed": _rows(rng, K_BG, 3.0),
    }
    with pk.StoreWriter(path, mode="overwrite") as w:
        for split, (g, _) in splits.items():
            w.add_split(split, n_rows=len(g), has_label=True, factor_names=["hue", "bright", "freq"],
                        has_group=split == "crossed")
        for name, p in levels.items():
            role = name if name in ("teacher", "student") else "model"
            w.add_model(name, role=role, source="planted")
            for split, (g, fac) in splits.items():
                steps = [None, 0] if with_init else [None]
                for step in steps:
                    w.add_layer(name, split, "layer", feature_shape=(D,), step=step)
                    samples = {"index": np.arange(len(g)), "label": g % 5, "factors": fac}
                    if split == "crossed":
                        samples["group"] = g
                    # at initialisation every model reads the background at level 0.2
                    w.write_rows(split, 0, samples, {name: {"layer": _acts(g, fac, 0.2 if step == 0 else p)}},
                                 step=step)
    return path


def _schema():
    return json.loads(resources.files("probekit.report").joinpath("audit.schema.json").read_text())


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    levels = {"model_p0": 0.0, "model_p1": 0.1, "model_p3": 0.3, "model_p10": 1.0}
    path = _write_store(tmp_path_factory.mktemp("a") / "planted.h5", levels, with_init=True)
    return levels, pk.audit(path, n_boot=100, n_perm=50, progress=False).data


def test_headline_rises_with_planted_background_and_is_null_without(planted):
    levels, doc = planted
    head = {r["model"]: r for r in doc["headline"]["rows"]}
    assert doc["headline"]["metric"] == "sensitivity"
    values = [head[m]["estimate"]["value"] for m in levels]  # ordered by planted level
    assert values == sorted(values) and values[-1] > values[0]
    assert values[0] < 1e-9  # no background in the layer: no background sensitivity at all
    # and a closed form at a planted level: within-group variance / total variance
    w = np.random.default_rng(7)
    fg_code, mix = w.normal(size=(N_FG, D)), w.normal(size=(F, D))
    bg_var = (3.0**2 / 3) * np.sum(mix**2)  # factors ~ U(-3, 3): variance 3 each
    fg_var = np.sum(fg_code.var(axis=0))
    # within-group sums of squares around K-row group means keep (K-1)/K of the background variance
    expected = (K_BG - 1) / K_BG * bg_var / (bg_var + fg_var)  # p = 1
    assert head["model_p10"]["estimate"]["value"] == pytest.approx(expected, rel=0.08)


def test_init_reference_and_flags(planted):
    levels, doc = planted
    head = {r["model"]: r for r in doc["headline"]["rows"]}
    # every model read the background at p = 0.2 at init: trained to p = 0.3 or 1 they are flagged
    # (sensitivity 1.7x and 3.3x the init value by the closed form), to p = 0 or 0.1 they are not
    assert all(head[m]["reference"] == "at initialisation" for m in levels)
    assert head["model_p10"]["flag"] and head["model_p3"]["flag"]
    assert not head["model_p0"]["flag"] and not head["model_p1"]["flag"]
    assert head["model_p0"]["ratio"] < 0.01


def test_correlation_and_decodability_follow_the_planted_level(planted):
    levels, doc = planted
    shares = [doc["models"][m]["layers"]["layer"]["correlation"]["share_significant"] for m in levels]
    assert shares[0] <= 0.2 and shares[-1] == 1.0
    excess = [doc["models"][m]["layers"]["layer"]["decodability"]["crossed"]["mean_excess_r2"]["value"]
              for m in levels]
    assert excess[-1] > 0.5 and abs(excess[0]) < 0.1


def test_audit_json_follows_the_schema(planted):
    _, doc = planted
    jsonschema.validate(doc, _schema())
    json.dumps(doc, allow_nan=False)  # strict JSON: no NaN or inf anywhere


def test_student_is_flagged_against_its_teacher(tmp_path):
    path = _write_store(tmp_path / "ts.h5", {"teacher": 0.1, "student": 1.0})
    doc = pk.audit(path, n_boot=50, n_perm=20, progress=False).data
    head = {r["model"]: r for r in doc["headline"]["rows"]}
    assert head["student"]["reference"] == "teacher" and head["student"]["flag"]
    assert head["teacher"]["reference"] is None and not head["teacher"]["flag"]
    pair = doc["pairs"][0]
    assert pair["rel_mse"]["test_ood"]["value"] > pair["rel_mse"]["test_id"]["value"]
    assert pair["differences"]["sensitivity"] > 0
    # the headline is evidence: without a crossed split there is no verdict, and the audit says why
    assert doc["models"]["student"]["flag_basis"] is None and doc["models"]["student"]["flagged"] is None
    assert "needs a crossed split" in doc["models"]["student"]["verdict"]
    assert doc["verdict"][:2] == [doc["models"][m]["verdict"] for m in doc["models"]]


def test_hand_written_store_goes_through_analyze_and_report(tmp_path, capsys):
    """A store written with plain h5py (not probekit's writer), following docs/FORMAT.md."""
    rng = np.random.default_rng(1)
    path = tmp_path / "hand.h5"
    class_code = rng.normal(size=(3, 8))
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "probekit.activations"
        f.attrs["format_version"] = 1
        for split, n in (("train", 90), ("test_id", 60), ("test_ood", 60)):
            g = f.create_group(f"samples/{split}")
            g.attrs["rows_committed"] = n
            g["index"] = np.arange(n)
            g["label"] = np.arange(n) % 3
            g["factors"] = rng.normal(size=(n, 2)).astype(np.float32)
            g["factors"].attrs["names"] = ["hue", "bright"]
            a = f.create_group(f"models/net/acts/{split}")
            a.attrs["rows_committed"] = n
            a["fc"] = (np.eye(3)[np.arange(n) % 3] @ class_code + 0.3 * rng.normal(size=(n, 8)))
        f["models/net"].attrs["role"] = "model"
        f["models/net/weights/fc"] = rng.normal(size=(8, 4)).astype(np.float32)
    out = tmp_path / "hand.json"
    assert main(["analyze", str(path), "--json", str(out), "--n-boot", "50", "--n-perm", "20", "--no-progress"]) == 0
    doc = json.loads(out.read_text())
    jsonschema.validate(doc, _schema())
    assert doc["models"]["net"]["layers"]["fc"]["probe"]["id"]["value"] > 0.9
    assert "fc" in doc["models"]["net"]["directions"]
    skipped = {s["analysis"] for s in doc["skipped"]}
    assert {"sensitivity", "teacher-student"} <= skipped  # no grouped split, no teacher/student
    assert main(["report", str(path), "-o", str(tmp_path / "hand.html"), "--audit", str(out)]) == 0
    html = (tmp_path / "hand.html").read_text()
    assert 'id="probes"' in html and 'id="skipped"' in html


def test_fail_above_gates_exit_code(planted, tmp_path, capsys):
    path = _write_store(tmp_path / "g.h5", {"model_p10": 1.0})
    args = ["analyze", str(path), "--n-boot", "20", "--n-perm", "10", "--no-progress"]
    assert main([*args, "--fail-above", "sensitivity=0.99"]) == 0
    assert main([*args, "--fail-above", "sensitivity:model_p10:layer=0.01"]) == 1
    err = capsys.readouterr().err
    assert "FAIL sensitivity of model_p10.layer is" in err and "above 0.01" in err
    assert main([*args, "--fail-above", "sensitivity"]) == 2
    assert "METRIC[:MODEL[:LAYER]]=VALUE" in capsys.readouterr().err
    assert main([*args, "--fail-above", "sensitivity:nobody=0.1"]) == 2
    assert "no such figure" in capsys.readouterr().err


def test_unknown_factor_and_model_are_clear_errors(tmp_path, capsys):
    path = _write_store(tmp_path / "e.h5", {"model_p0": 0.0})
    assert main(["analyze", str(path), "--factors", "colour", "--no-progress"]) == 2
    assert "Unknown factor names ['colour']" in capsys.readouterr().err
    assert main(["analyze", str(path), "--models", "ghost", "--no-progress"]) == 2
    assert "no model 'ghost'" in capsys.readouterr().err


def test_recorded_steps_give_curves_over_training(tmp_path):
    """A Recorder run: the audit adds per-step figures and the report an 'Over training' section."""
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    from probekit.report import render_html

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(120) % 2
    x = torch.randn(120, 4, generator=g) + 2.0 * y[:, None].float()
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    probe = {"train": TensorDataset(x[:80], y[:80]), "test_ood": TensorDataset(x[80:] + 0.5, y[80:])}
    rec = pk.Recorder(model, ["0"], probe, out=tmp_path / "run.h5", every=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(21):
        rec.step(step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:80]), y[:80]).backward()
        opt.step()
    doc = pk.audit(tmp_path / "run.h5", n_boot=20, n_perm=10, progress=False).data
    r = doc["series"]["model"]
    assert r["steps"] == [0, 5, 10, 15, 20]
    assert r["best_step"] in r["steps"]
    assert any("peaks at step" in line for line in doc["verdict"])
    assert any(s["analysis"] == "per-layer analyses" for s in doc["skipped"])
    jsonschema.validate(doc, _schema())
    assert 'id="training"' in render_html(doc)


def test_parametric_null_audit_follows_the_planted_level(planted, tmp_path):
    # --n-perm 0: the Student-t null instead of permutations; the audit keeps its schema and the
    # correlation shares track the planted level as with the permutation null
    levels, with_perm = planted
    path = _write_store(tmp_path / "planted.h5", levels)
    doc = pk.audit(path, n_boot=50, n_perm=0, progress=False).data
    jsonschema.validate(doc, _schema())
    json.dumps(doc, allow_nan=False)
    assert doc["config"]["n_perm"] == 0 and with_perm["config"]["n_perm"] == 50
    for m in levels:
        t = doc["models"][m]["layers"]["layer"]["correlation"]
        p = with_perm["models"][m]["layers"]["layer"]["correlation"]
        assert abs(t["share_significant"] - p["share_significant"]) <= 0.15
    # the report says which null drew the threshold line
    from probekit.report import render_html

    assert "Student-t null threshold" in render_html(doc)
    assert "permutation-null threshold" in render_html(with_perm)
