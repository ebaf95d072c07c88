"""The verdict, end to end through the CLI, on models known to rely on the background and not to.

A small CNN trained on generated shapes whose background colour equals the class classifies by
colour (100 % in distribution); the same CNN trained on random background colours classifies by
shape. Both are extracted from their saved weights with ``probekit extract`` and audited with
``probekit analyze`` on the same crossed split: the first must be flagged, the second must not.
"""

import json

import numpy as np
import pytest
import torch

from probekit.cli import main
from probekit.experiments.shortcut import train_shapes_cnn

pytestmark = pytest.mark.slow
MODEL = "probekit.experiments.shortcut:ShapesCNN"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    d = tmp_path_factory.mktemp("verdict")
    out = d / "s.h5"
    for i, (name, bg) in enumerate((("shortcut", "class"), ("robust", "random"))):
        torch.save(train_shapes_cnn(bg, seed=0).state_dict(), d / f"{name}.pt")
        argv = ["extract", MODEL, "--weights", str(d / f"{name}.pt"), "--data", "shapes",
                "--layers", "features.6,@output", "-o", str(out), "--name", name, "--no-progress"]
        assert main(argv + (["--resume"] if i else [])) == 0
    return out


def _analyze(store, *extra):
    return main(["analyze", str(store), "--train", "train", "--test-id", "test", "--test-ood", "test",
                 "--n-boot", "200", "--n-perm", "100", "--no-progress", *extra])


def test_shortcut_is_flagged_and_robust_is_not(store, tmp_path, capsys):
    out = tmp_path / "a.json"
    assert _analyze(store, "-o", str(out), "--fail-on-flag") == 1  # the shortcut model fails the gate
    doc = json.loads(out.read_text())
    assert doc["schema_version"] == 3
    short, robust = doc["models"]["shortcut"], doc["models"]["robust"]
    assert short["flagged"] is True and short["flag_basis"] == "behaviour" and "shortcut" in short["findings"]
    # a complete shortcut reads (close to) 1 on the reliance scale, whatever the number of classes
    assert short["behaviour"]["reliance"]["value"] >= 0.9
    assert short["behaviour"]["flip_rate"]["value"] >= 0.9
    # where the background came from another class, the shortcut model answers that class
    assert short["behaviour"]["follows_background"]["value"] >= 0.9
    assert short["behaviour"]["predictions"].startswith("the model's own output")
    assert robust["flagged"] is False and robust["findings"] == []
    rel = robust["behaviour"]["reliance"]
    assert rel["ci"][0] < rel["margin"] and rel["detectable"] is not None
    printed = capsys.readouterr().out
    assert "[FLAGGED: shortcut] shortcut takes the background's class" in printed
    assert "[not flagged] No shortcut detected for robust" in printed


def test_gate_passes_for_the_robust_model_alone(store):
    assert _analyze(store, "--models", "robust", "--fail-on-flag") == 0
    assert _analyze(store, "--fail-above", "flip_rate:robust=0.5") == 0
    assert _analyze(store, "--fail-above", "flip_rate:shortcut=0.5") == 1


def test_variant_accuracies_tell_the_two_apart(store, tmp_path):
    """``--data shapes`` renders its test images on random colours: the shape alone tells the class."""
    out = tmp_path / "a.json"
    _analyze(store, "-o", str(out))
    doc = json.loads(out.read_text())
    s, r = (doc["models"][m]["behaviour"] for m in ("shortcut", "robust"))
    for v in ("original", "only_fg", "mixed_same", "mixed_rand", "mixed_next"):
        assert r["accuracy"][v]["value"] >= 0.95, v  # the robust model reads the shape, on any background
    assert abs(r["bg_gap"]["value"]) < 0.05
    assert s["accuracy"]["original"]["value"] < 0.6  # the shortcut model, 100 % on class colours, is lost
    # with the shape removed both are near chance (1/3 for three balanced classes)
    assert np.isclose(r["chance"], 1 / 3, atol=0.01)
    for b in (s, r):
        assert abs(b["accuracy"]["only_bg"]["value"] - b["chance"]) < 0.15
