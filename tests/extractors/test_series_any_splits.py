"""series() on a recorded run whatever its probe splits are called: one split (the Recorder's default
``probe``) gives cross-validated probe accuracy; two arbitrary names give fit-on-the-first, score-on-
the-other; CKA to the last step, the background factors' share and background sensitivity per step;
each checked against an independent numpy / scikit-learn computation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler
from torch import nn

import probekit as pk
from probekit.series import plot_series, series


def _items(n: int, seed: int, grouped: bool = False) -> list[dict]:
    """3 classes in 6-d; 2 background factors added along fixed directions; optional groups
    (each foreground on 4 backgrounds)."""
    g = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(0, 2.0, (3, 6))
    bg_dirs = np.random.default_rng(98).normal(0, 1.0, (2, 6))
    if grouped:
        fg = np.repeat(np.arange(n // 4), 4)
        y = fg % 3
        base = centres[y] + np.repeat(g.normal(0, 0.5, (n // 4, 6)), 4, axis=0)
    else:
        fg, y = np.arange(n), np.arange(n) % 3
        base = centres[y] + g.normal(0, 0.5, (n, 6))
    F = g.uniform(-1, 1, (n, 2))
    X = base + F @ bg_dirs
    out = []
    for i in range(n):
        it = {"x": torch.tensor(X[i], dtype=torch.float32), "label": int(y[i]),
              "factors": torch.tensor(F[i], dtype=torch.float32)}
        if grouped:
            it["group"] = int(fg[i])
        out.append(it)
    return out


def _run(out, probe, steps: int = 30, every: int = 10, **kw) -> list[int]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train = _items(240, 1)
    X = torch.stack([t["x"] for t in train])
    y = torch.tensor([t["label"] for t in train])
    rec = pk.Recorder(model, ["1", "3"], probe, out, every=every, weights_layers=["0", "2", "4"], **kw)
    for step in range(steps + 1):
        rec.step(step)
        loss = nn.functional.cross_entropy(model(X), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return rec.recorded


def _oracle_probe(Xtr, ytr, Xte=None, yte=None, C=1.0):
    sc = StandardScaler().fit(Xtr)
    keep = sc.scale_ > 1e-12
    lr = LogisticRegression(C=C, max_iter=10000, tol=1e-10).fit(sc.transform(Xtr)[:, keep], ytr)
    return lr.score(sc.transform(Xte)[:, keep], yte)


def _oracle_cv(X, y, k, seed):
    correct = 0
    for tr, te in StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(X, y):
        correct += _oracle_probe(X[tr], y[tr], X[te], y[te]) * len(te)
    return correct / len(y)


def _oracle_cka_debiased(X, Y):
    """Song et al.'s unbiased HSIC on n x n Gram matrices (diagonals zeroed)."""
    X = np.asarray(X, np.float64)
    Y = np.asarray(Y, np.float64)
    n = len(X)

    def hsic(K, L):
        K, L = K.copy(), L.copy()
        np.fill_diagonal(K, 0)
        np.fill_diagonal(L, 0)
        one = np.ones(n)
        return (np.trace(K @ L) + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * one @ K @ L @ one) / (n * (n - 3))

    K, L = X @ X.T, Y @ Y.T
    return hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))


def _oracle_factor_r2(X, F):
    A = np.column_stack([np.ones(len(F)), F])
    r2 = []
    for u in range(X.shape[1]):
        x = X[:, u].astype(np.float64)
        if x.std() < 1e-9:
            continue
        coef, *_ = np.linalg.lstsq(A, x, rcond=None)
        r2.append(1 - ((x - A @ coef) ** 2).sum() / ((x - x.mean()) ** 2).sum())
    return float(np.mean(r2))


def test_one_default_split_is_cross_validated_and_matches_oracles(tmp_path):
    out = tmp_path / "run.h5"
    steps = _run(out, _items(90, 2))  # one probe set, the default split name
    assert steps == [0, 10, 20, 30]
    r = series(out)
    json.dumps(r)
    assert r["splits"] == ["probe"] and r["steps"] == steps and r["score_layer"] == "3"
    with pk.open_store(out) as s:
        y = s.sample_field("probe", "label")
        F = s.sample_field("probe", "factors")
        for layer in ("1", "3"):
            p = r["probe"][layer]
            assert p["method"] == "cv" and p["train"] == p["test"] == "probe" and p["folds"] == 5
            last = s.acts("model", "probe", layer, 30)[:]
            for i, st in enumerate(steps):
                X = s.acts("model", "probe", layer, st)[:]
                assert abs(p["accuracy"][i] - _oracle_cv(X, y, 5, 0)) <= 3 / len(y), (layer, st)
                assert r["cka_to_last"][layer]["values"][i] == pytest.approx(_oracle_cka_debiased(X, last), abs=1e-6)
                assert r["background_share"][layer]["values"][i] == pytest.approx(_oracle_factor_r2(X, F), abs=1e-6)
    assert r["cka_to_last"]["3"]["values"][-1] == pytest.approx(1.0)
    # training separates the classes: the last layer's probe ends near perfect
    assert r["probe"]["3"]["accuracy"][-1] > 0.9
    assert r["best_step"] == steps[int(np.argmax(r["probe"]["3"]["accuracy"]))]
    assert set(r["directions"]) == {"0", "2", "4"} and r["background_sensitivity"] == {}
    assert r["skipped"] == []  # factors give the background figure even without groups
    png = plot_series(r, tmp_path / "s.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_two_arbitrary_split_names_fit_on_the_first_and_score_the_other(tmp_path):
    out = tmp_path / "run.h5"
    steps = _run(out, {"alpha": _items(90, 3), "beta": _items(80, 4, grouped=True)})
    r = series(out)
    assert r["splits"] == ["alpha", "beta"]
    with pk.open_store(out) as s:
        ya, yb = s.sample_field("alpha", "label"), s.sample_field("beta", "label")
        g = s.sample_field("beta", "group")
        for i, st in enumerate(steps):
            Xa, Xb = s.acts("model", "alpha", "3", st)[:], s.acts("model", "beta", "3", st)[:]
            p = r["probe"]["3"]
            assert p["method"] == "holdout" and p["train"] == "alpha" and p["test"] == "beta"
            assert p["scores"]["beta"][i] == p["accuracy"][i]
            assert abs(p["accuracy"][i] - _oracle_probe(Xa, ya, Xb, yb)) <= 2 / len(yb)
            X = Xb.astype(np.float64)
            means = {k: X[g == k].mean(0) for k in np.unique(g)}
            within = sum(((X[g == k] - m) ** 2).sum() for k, m in means.items())
            assert r["background_sensitivity"]["3"]["values"][i] == pytest.approx(
                within / ((X - X.mean(0)) ** 2).sum(), rel=1e-5)
    assert r["background_sensitivity"]["3"]["split"] == "beta"
    assert r["background_share"]["3"]["split"] == "alpha"  # the first split with factors
    assert r["skipped"] == []
    # the audit takes the same defaults and says what it did in the verdict
    doc = pk.audit(out, n_boot=10, n_perm=10, progress=False).data
    line = next(v for v in doc["verdict"] if "recorded steps" in v)
    assert "on split 'beta' (fit on 'alpha')" in line and f"peaks at step {r['best_step']}" in line


def test_a_run_with_only_step_zero_gets_no_promise_of_figures(tmp_path):
    out = tmp_path / "run.h5"
    _run(out, _items(60, 5), steps=0, every=10)
    doc = pk.audit(out, n_boot=10, n_perm=10, progress=False).data
    assert doc["series"] == {}
    reasons = {k["analysis"]: k["reason"] for k in doc["skipped"] if k["model"] == "model"}
    assert "figures over training" in reasons["per-layer analyses"]
    assert "see the figures" not in reasons["per-layer analyses"]
    assert reasons["directions"] == "weight rows are stored only at recorded steps"
