"""Every finding of the verdict flips both ways, end to end through ``probekit analyze``, on planted predictions.

Stores are written with the StoreWriter: a crossed split (every object on the same backgrounds, each
background from an image of a known class) and the model's output logits planted row by row, so the
truth is known exactly: a robust model (the object's class, a few idiosyncratic errors), a partial
shortcut (a share of objects answer the background's class), noise backgrounds (some backgrounds make
errors spread over every class, with imbalanced classes), backgrounds all from one class (nothing to
judge), a one-logit binary head, and a 10-way head audited on 3 folder classes (label-free).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from probekit.cli import main
from probekit.store import StoreWriter

G, B = 240, 8


def _design(k: int, rng: np.random.Generator, *, bg_classes=None, label_p=None):
    label = rng.choice(k, size=G, p=label_p)
    bl = np.asarray(bg_classes if bg_classes is not None else np.arange(B) % k)
    g, b = np.repeat(np.arange(G), B), np.tile(np.arange(B), G)
    return label, bl, g, b


def _write(path, preds: dict[str, np.ndarray], label, bl, g, b, width: int, originals=None) -> None:
    n = g.size
    with StoreWriter(path, mode="overwrite") as w:
        w.add_split("crossed", n_rows=n, has_label=True, fields=["label", "group", "background", "background_label"])
        if originals is not None:
            w.add_split("test", n_rows=len(originals["group"]), has_label=True, fields=["label", "group"])
        for name in preds:
            w.add_model(name, role="model", source="planted")
            w.add_layer(name, "crossed", "@output", feature_shape=(width,), dtype="float32", attrs={"pool": "none"})
            if originals is not None:
                w.add_layer(name, "test", "@output", feature_shape=(width,), dtype="float32", attrs={"pool": "none"})
        acts = {m: {"@output": _logits(p, width)} for m, p in preds.items()}
        w.write_rows("crossed", 0, samples={"index": np.arange(n), "label": label[g], "group": g + 1000,
                                           "background": b, "background_label": bl[b]}, acts=acts)
        if originals is not None:
            acts = {m: {"@output": _logits(originals["pred"][m], width)} for m in preds}
            w.write_rows("test", 0, samples={"index": np.arange(len(originals["group"])), "label": originals["label"],
                                             "group": originals["group"]}, acts=acts)


def _logits(pred: np.ndarray, width: int) -> np.ndarray:
    if width == 1:  # one logit: class 1 above 0
        return np.where(pred == 1, 2.0, -2.0).astype(np.float32)[:, None]
    out = np.zeros((pred.size, width), np.float32)
    out[np.arange(pred.size), pred] = 3.0
    return out


def _analyze(path, tmp_path, *extra):
    out = tmp_path / "a.json"
    rc = main(["analyze", str(path), "-o", str(out), "--n-boot", "300", "--n-perm", "20", "--no-progress",
               "--train", "", "--test-id", "", "--test-ood", "", *extra])
    return rc, json.loads(out.read_text())


def test_partial_shortcut_flagged_robust_not(tmp_path):
    rng = np.random.default_rng(0)
    k = 10
    label, bl, g, b = _design(k, rng)
    y = label[g]
    robust = np.where(rng.random(g.size) < 0.05, rng.integers(0, k, g.size), y)
    followers = rng.random(G) < 0.2  # a fifth of the objects answer the background's class
    partial = np.where(followers[g], bl[b], robust)
    _write(tmp_path / "s.h5", {"robust": robust, "partial": partial}, label, bl, g, b, k)
    rc, doc = _analyze(tmp_path / "s.h5", tmp_path, "--fail-on-flag")
    assert rc == 1
    p, r = doc["models"]["partial"], doc["models"]["robust"]
    assert p["findings"] == ["shortcut"] and p["flagged"] is True
    lo, hi = p["behaviour"]["reliance"]["ci"]
    assert lo <= 0.2 * (1 - 0.1) <= hi or lo <= 0.2 <= hi  # the planted share, on the reliance scale
    assert r["flagged"] is False and r["findings"] == []
    assert r["verdict"].startswith("No shortcut detected for robust") and "with 80 % power" in r["verdict"]
    # own-class backgrounds help the partial shortcut: BG-gap on the crossed split, in accuracy
    assert p["behaviour"]["bg_gap_crossed"]["value"] > 0.1 > abs(r["behaviour"]["bg_gap_crossed"]["value"])
    rc, _ = _analyze(tmp_path / "s.h5", tmp_path, "--models", "robust", "--fail-on-flag")
    assert rc == 0


def test_noise_backgrounds_are_background_sensitive_not_a_shortcut(tmp_path):
    rng = np.random.default_rng(1)
    k = 4
    label, bl, g, b = _design(k, rng, label_p=[0.55, 0.15, 0.15, 0.15])  # imbalanced classes
    y = label[g]
    noisy = np.isin(b, [0, 3, 5, 6])  # half of the backgrounds, from every class
    wrong = rng.random(g.size) < np.where(noisy, 0.55, 0.05)
    pred = np.where(wrong, rng.integers(0, k, g.size), y)  # errors spread over every class
    _write(tmp_path / "s.h5", {"noisy": pred}, label, bl, g, b, k)
    rc, doc = _analyze(tmp_path / "s.h5", tmp_path, "--fail-on", "background_sensitive")
    m = doc["models"]["noisy"]
    assert "shortcut" not in m["findings"] and m["flagged"] is False
    assert m["findings"] == ["background_sensitive"] and rc == 1
    assert "not a shortcut" in m["verdict"]
    rc, _ = _analyze(tmp_path / "s.h5", tmp_path, "--fail-on-flag")
    assert rc == 0  # noise does not fail a shortcut gate


def test_backgrounds_of_one_class_cannot_be_judged(tmp_path):
    rng = np.random.default_rng(2)
    label, bl, g, b = _design(3, rng, bg_classes=np.zeros(B, dtype=int))
    pred = np.zeros(g.size, dtype=int)  # answers the backgrounds' class everywhere
    _write(tmp_path / "s.h5", {"m": pred}, label, bl, g, b, 3)
    rc, doc = _analyze(tmp_path / "s.h5", tmp_path, "--fail-on-flag")
    m = doc["models"]["m"]
    assert m["flagged"] is None and rc == 3
    assert "not judged" in m["verdict"] and m["verdict_reason"]


def test_one_logit_binary_head(tmp_path):
    rng = np.random.default_rng(3)
    label, bl, g, b = _design(2, rng)
    _write(tmp_path / "s.h5", {"shortcut": bl[b], "robust": label[g]}, label, bl, g, b, 1)
    rc, doc = _analyze(tmp_path / "s.h5", tmp_path, "--fail-on-flag")
    assert rc == 1
    assert doc["models"]["shortcut"]["flagged"] is True and doc["models"]["robust"]["flagged"] is False
    assert "one logit" in doc["models"]["shortcut"]["behaviour"]["predictions"]


def test_wide_head_on_a_subset_of_classes_is_read_label_free(tmp_path):
    """A 10-way head audited on a folder of 3 of its classes: no probe, no swap of predictions; reliance is
    read against the model's own predictions on the original images."""
    rng = np.random.default_rng(4)
    k_out, k = 10, 3
    label, bl, g, b = _design(k, rng)
    out_class = np.array([2, 5, 7])  # the model's output index for each folder class
    n_img = G + B
    orig_group = np.concatenate([np.arange(B), 1000 + np.arange(G)])  # backgrounds' source images, then objects
    orig_label = np.concatenate([bl, label])
    preds = {"robust": out_class[label[g]], "shortcut": out_class[bl[b]]}
    originals = {"group": orig_group, "label": orig_label,
                 "pred": {m: out_class[orig_label] for m in preds}}
    assert len(orig_group) == n_img
    _write(tmp_path / "s.h5", preds, label, bl, g, b, k_out, originals=originals)
    rc, doc = _analyze(tmp_path / "s.h5", tmp_path, "--fail-on-flag")
    s, r = doc["models"]["shortcut"], doc["models"]["robust"]
    assert s["behaviour"]["space"] == "output" and s["behaviour"]["reliance"]["basis"] == "model_prediction"
    assert s["flagged"] is True and r["flagged"] is False and rc == 1


def test_wide_head_without_originals_is_not_judged(tmp_path):
    rng = np.random.default_rng(5)
    label, bl, g, b = _design(3, rng)
    _write(tmp_path / "s.h5", {"m": np.array([2, 5, 7])[label[g]]}, label, bl, g, b, 10)
    rc, doc = _analyze(tmp_path / "s.h5", tmp_path, "--fail-on-flag")
    assert doc["models"]["m"]["flagged"] is None and rc == 3
    assert "class map" in doc["models"]["m"]["verdict_reason"]


@pytest.mark.parametrize("bad", ["shortcuts", ""])
def test_fail_on_refuses_unknown_findings_before_the_work(tmp_path, bad, capsys):
    rng = np.random.default_rng(6)
    label, bl, g, b = _design(3, rng)
    _write(tmp_path / "s.h5", {"m": label[g]}, label, bl, g, b, 3)
    rc = main(["analyze", str(tmp_path / "s.h5"), "--fail-on", bad or ",", "--no-progress"])
    assert rc == 2 and "--fail-on takes findings" in capsys.readouterr().err


@pytest.mark.parametrize("per_class, judged", [(20, True), (3, False)])
def test_a_student_without_a_head_is_read_through_a_probe(tmp_path, per_class, judged):
    """A student's output is its representation: a linear probe on its last hidden layer reads it, fit on
    ``train``; with fewer than 5 training images of a class no probe is fit and the shortcut is not judged."""
    rng = np.random.default_rng(7)
    k, d = 3, 12
    label, bl, g, b = _design(k, rng)
    means = rng.normal(size=(k, d)) * 3
    ytr = np.repeat(np.arange(k), per_class)
    n, ntr = g.size, ytr.size
    with StoreWriter(tmp_path / "s.h5", mode="overwrite") as w:
        w.add_split("crossed", n_rows=n, has_label=True, fields=["label", "group", "background", "background_label"])
        w.add_split("train", n_rows=ntr, has_label=True, fields=["label"])
        w.add_model("student", role="student", source="planted")
        for split in ("crossed", "train"):
            for layer in ("rep", "@output"):
                w.add_layer("student", split, layer, feature_shape=(d,), dtype="float32", attrs={"pool": "none"})
        rep = (means[label[g]] + rng.normal(size=(n, d))).astype(np.float32)
        w.write_rows("crossed", 0, samples={"index": np.arange(n), "label": label[g], "group": g, "background": b,
                                           "background_label": bl[b]}, acts={"student": {"rep": rep, "@output": rep}})
        rtr = (means[ytr] + rng.normal(size=(ntr, d))).astype(np.float32)
        w.write_rows("train", 0, samples={"index": np.arange(ntr), "label": ytr},
                     acts={"student": {"rep": rtr, "@output": rtr}})
    rc, doc = _analyze(tmp_path / "s.h5", tmp_path, "--train", "train", "--fail-on-flag")
    m = doc["models"]["student"]
    if judged:
        assert m["flagged"] is False and rc == 0
        assert m["behaviour"]["predictions"].startswith("a linear probe on rep")
    else:
        assert m["flagged"] is None and rc == 3
        assert "at least 5 training images" in m["verdict_reason"]  # the true reason, not a generic one
