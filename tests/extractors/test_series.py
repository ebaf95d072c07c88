"""series(): per-step analyses of a recorded run, checked against sklearn / numpy oracles and the
XOR simplicity-bias result (direction count settles at the same value across widths)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.utils.data import Subset

import probekit as pk
from probekit.datasets import get_dataset
from probekit.series import plot_series, series


def _xor_run(out, width: int, steps: int = 800, every: int = 50) -> None:
    """The simplicity experiment's setup (bias-free 2-layer ReLU, float64, init x 2^-7, full-batch GD)."""
    train = get_dataset("xor", "train")
    X = torch.from_numpy(np.asarray(train.X, dtype=np.float64))
    y = torch.from_numpy(np.asarray(train.labels, dtype=np.float64))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, width, bias=False), nn.ReLU(), nn.Linear(width, 1, bias=False)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0**-7)
    opt = torch.optim.SGD(model.parameters(), lr=2.0**-4)
    rec = pk.Recorder(model, ["1"], {"train": train, "test": get_dataset("xor", "test")}, out, every=every,
                      weights_layers=["0"])
    for step in range(steps + 1):
        rec.step(step)
        loss = nn.functional.binary_cross_entropy_with_logits(model(X).squeeze(-1), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_xor_direction_count_settles_and_is_equal_across_widths(tmp_path):
    counts = {}
    for width in (64, 256):
        _xor_run(tmp_path / f"w{width}.h5", width)
        r = series(tmp_path / f"w{width}.h5", train="train", test="test")
        counts[width] = r["directions"]["0"]["n_directions"]
        assert r["steps"] == list(range(0, 801, 50))
        json.dumps(r)
        # the trained ReLU layer separates XOR: the probe on its output is near perfect at the end
        assert r["probe"]["1"]["accuracy"][-1] > 0.95
    # settled early: from some step <= 300 (of 800) on, the count stays at its final value, which is the
    # four XOR axes +-e1, +-e2 at both widths
    for width, c in counts.items():
        settle = next(i for i in range(len(c)) if len(set(c[i:])) == 1)
        assert settle * 50 <= 300, (width, c)
    assert counts[64][-1] == counts[256][-1] == 4
    # at initialisation the random rows point in many directions (more at the larger width)
    assert counts[256][0] > 4


def test_series_probe_and_directions_match_independent_oracles(tmp_path):
    out = tmp_path / "w.h5"
    _xor_run(out, 16, steps=100, every=50)
    r = series(out, train="train", test="test", probe_C=0.5, direction_tol=5.0, direction_mass=0.8)
    with pk.open_store(out) as s:
        ytr, yte = s.sample_field("train", "label"), s.sample_field("test", "label")
        for i, st in enumerate(r["steps"]):
            Xtr, Xte = s.acts("model", "train", "1", st)[:], s.acts("model", "test", "1", st)[:]
            sc = StandardScaler().fit(Xtr)
            keep = sc.scale_ > 0
            lr = LogisticRegression(C=0.5, max_iter=5000, tol=1e-8).fit(sc.transform(Xtr)[:, keep], ytr)
            want = lr.score(sc.transform(Xte)[:, keep], yte)
            assert abs(r["probe"]["1"]["accuracy"][i] - want) <= 2 / len(yte)
            W = s.weights("model", "0", st)
            assert r["by_step"][str(st)]["n_directions"]["0"] == r["directions"]["0"]["n_directions"][i]
            assert len(r["directions"]["0"]["shares"][i]) == r["directions"]["0"]["n_directions"][i]
            # shares are squared-norm masses of clusters: they sum to <= 1 and the first is the largest
            sh = r["directions"]["0"]["shares"][i]
            assert sum(sh) <= 1 + 1e-9 and sh == sorted(sh, reverse=True)
            assert W.shape == (16, 2)


def test_projections_over_steps_equal_numpy(tmp_path):
    out = tmp_path / "w.h5"
    _xor_run(out, 8, steps=50, every=25)
    core, bg = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])
    r = series(out, train="train", test="test", bases={"0": (core, bg)})
    with pk.open_store(out) as s:
        W0 = s.weights("model", "0", 0).astype(np.float64)
        for i, st in enumerate(r["steps"]):
            W = s.weights("model", "0", st).astype(np.float64)
            np.testing.assert_allclose(r["projections"]["0"]["core"][i], np.abs(W[:, 0]).mean(), rtol=1e-6)
            np.testing.assert_allclose(r["projections"]["0"]["background"][i], np.abs(W[:, 1]).mean(), rtol=1e-6)
            np.testing.assert_allclose(r["projections"]["0"]["background_ratio"][i],
                                       np.abs(W[:, 1]).mean() / np.abs(W0[:, 1]).mean(), rtol=1e-6)


def test_bgdigits_run_reports_best_step_and_bg_sensitivity(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4), nn.Conv2d(8, 16, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train = get_dataset("bgdigits", "train")
    loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True)
    probe = {"train": Subset(train, range(120)), "test_ood": Subset(get_dataset("bgdigits", "test_ood"), range(120)),
             "crossed": Subset(get_dataset("bgdigits", "crossed"), range(80))}
    rec = pk.Recorder(model, ["3", "7"], probe, tmp_path / "run.h5", every=6)
    for step, batch in enumerate(loader):
        rec.step(step)
        loss = nn.functional.cross_entropy(model(batch["x"]), batch["label"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    r = series(tmp_path / "run.h5", layers=["3", "7"], score_layer="3")
    acc = r["probe"]["3"]["accuracy"]
    assert r["steps"] == list(range(0, 19, 6))
    assert r["best_step"] == r["steps"][int(np.argmax(acc))] and r["best_accuracy"] == max(acc)
    assert r["by_step"][str(r["best_step"])]["probe_ood"]["3"] == max(acc)
    assert r["background_sensitivity"]["3"]["split"] == "crossed"
    with pk.open_store(tmp_path / "run.h5") as s:
        g = s.sample_field("crossed", "group")
        assert len(np.unique(g)) == 10  # 80 rows = 10 digits x 8 backgrounds
        for i, st in enumerate(r["steps"]):
            X = s.acts("model", "crossed", "3", st)[:].astype(np.float64)
            means = np.stack([X[g == k].mean(0) for k in np.unique(g)])
            within = sum(((X[g == k] - means[j]) ** 2).sum() for j, k in enumerate(np.unique(g)))
            total = ((X - X.mean(0)) ** 2).sum()
            np.testing.assert_allclose(r["background_sensitivity"]["3"]["values"][i], within / total, rtol=1e-5)
    png = plot_series(r, tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_series_errors(tmp_path):
    from probekit.errors import DataError

    out = tmp_path / "w.h5"
    _xor_run(out, 4, steps=10, every=10)
    with pytest.raises(DataError, match="no model"):
        series(out, "nope")
    with pytest.raises(DataError, match=r"Steps \[5\]"):
        series(out, steps=[5])
    r = series(out, train="train", test="missing")  # no such split: the probe entry is empty, no best step
    assert r["probe"] == {} and r["best_step"] is None
