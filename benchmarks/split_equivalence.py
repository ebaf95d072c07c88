"""Same numbers before and after a refactor: LinearProbe, RidgeProbe, probe_id_ood,
background_decodability and series() on fixed inputs, compared bit for bit.

    python benchmarks/split_equivalence.py --src /tmp/before --out before.pkl --stores /tmp/stores
    python benchmarks/split_equivalence.py --out after.pkl --stores /tmp/stores
    python benchmarks/split_equivalence.py --compare before.pkl after.pkl

``--src`` imports probekit from another checkout (``git archive <commit> | tar -x -C DIR``). The
recorded-run stores for series() are written once into ``--stores`` (by whichever run comes first)
and read by both, so series() sees identical inputs. Each case records every fitted attribute and
result field; ``--compare`` reports the largest absolute difference per case (0 means identical).
"""

from __future__ import annotations

import argparse
import pickle
import sys
import warnings
from pathlib import Path

import numpy as np


def _probe_cases():
    from sklearn.datasets import load_digits, make_classification, make_regression

    from probekit.analyses import LinearProbe, RidgeProbe, probe_id_ood
    from probekit.testing import ArrayActivations

    X, y = load_digits(return_X_y=True)
    Xb, yb = make_classification(n_samples=600, n_features=20, n_informative=6, random_state=1)
    Xr, yr = make_regression(n_samples=300, n_features=12, n_targets=2, noise=5.0, random_state=2)
    fits = {
        "sklearn_C1": (dict(C=1.0, backend="sklearn"), X, y),
        "torch_C1": (dict(C=1.0, backend="torch"), X, y),
        "torch_C0.05_tol1e-6": (dict(C=0.05, backend="torch", tol=1e-6, max_iter=2000), X, y),
        "torch_binary": (dict(C=1.0, backend="torch"), Xb, yb),
        "sklearn_binary": (dict(C=1.0, backend="sklearn"), Xb, yb),
        "torch_stream": (dict(C=1.0, backend="torch", max_memory=20000, chunk_rows=300),
                         ArrayActivations(X, 100), y),
        "torch_stream_tol1e-6": (dict(C=1.0, backend="torch", tol=1e-6, max_iter=2000, max_memory=20000),
                                 ArrayActivations(X, 100), y),
        "minibatch_memory": (dict(C=1.0, backend="torch", solver="minibatch", max_iter=20, random_state=0), X, y),
        "minibatch_stream": (dict(C=1.0, backend="torch", solver="minibatch", max_iter=20, random_state=0,
                                  max_memory=20000, chunk_rows=300), ArrayActivations(X, 100), y),
        "cv_torch": (dict(C="cv", Cs=[0.1, 1.0], cv=3, backend="torch", random_state=0), X[:900], y[:900]),
        "cv_sklearn": (dict(C="cv", cv=3, backend="sklearn", random_state=0), X[:900], y[:900]),
        "unconverged": (dict(C=1.0, backend="torch", max_iter=3), X, y),
        "auto_small": (dict(C=1.0), Xb, yb),
        "no_standardize": (dict(C=0.1, backend="torch", standardize=False), Xb, yb),
    }
    out = {}
    for name, (kw, Xf, yf) in fits.items():
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            p = LinearProbe(**kw).fit(Xf, yf)
        out[f"LinearProbe/{name}"] = {
            "coef": p.coef_, "intercept": p.intercept_, "C": p.C_, "n_iter": p.n_iter_, "backend": p.backend_,
            "cv_results": p.cv_results_, "mean": p.scaler_mean_, "scale": p.scaler_scale_,
            "proba": p.predict_proba(X[:50] if Xf is not Xb else Xb[:50]),
            "warnings": sorted(f"{x.category.__name__}: {x.message}" for x in w),
        }
    for name, kw in {"fixed": dict(alpha=3.0), "cv": dict(alpha="cv", random_state=0),
                     "raw": dict(alpha=0.5, standardize=False)}.items():
        r = RidgeProbe(**kw).fit(Xr, yr)
        r1 = RidgeProbe(**kw).fit(ArrayActivations(Xr, 50), yr[:, 0])
        out[f"RidgeProbe/{name}"] = {"coef": r.coef_, "intercept": r.intercept_, "alpha": r.alpha_,
                                     "cv": r.cv_results_, "coef1": r1.coef_, "icpt1": r1.intercept_,
                                     "pred": r.predict(Xr[:20])}
    res = probe_id_ood(X[:800], y[:800], X[800:1300], y[800:1300], X[1300:1797:1], y[1300:1797],
                       probe=LinearProbe(C=1.0, backend="sklearn"), n_boot=200)
    out["probe_id_ood"] = res.to_dict()
    return out


def _decodability_cases():
    from probekit.analyses import background_decodability

    g = np.random.default_rng(0)
    n = 240
    gid = np.repeat(np.arange(60), 4)
    F = np.column_stack([g.uniform(0, 1, n), g.uniform(0, 360, n), g.integers(0, 3, n),
                         np.repeat(g.normal(size=60), 4)])
    W = g.normal(size=(4, 24))
    X = np.column_stack([F[:, 0], np.sin(np.radians(F[:, 1])), F[:, 2], F[:, 3]]) @ W + g.normal(size=(n, 24))
    names = ["lin", "hue", "cat", "obj"]
    cases = {
        "cv_groups": dict(groups=gid, periods={"hue": 360.0}, n_boot=50),
        "cv_rows": dict(periods={"hue": 360.0}, n_boot=50, cv=4),
        "fixed_alpha": dict(alpha=10.0, groups=gid, n_boot=30, categorical=["cat"]),
        "alphas": dict(alphas=[1.0, 100.0, 1e4], n_boot=30, use=["lin", "obj"]),
        "transfer": dict(X_test=X[:100] + 0.1, factors_test=F[:100], groups_test=gid[:100], n_boot=40,
                         periods=[np.nan, 360.0, 0, 0]),
        "transfer_fixed": dict(X_test=X[:100], factors_test=F[:100], alpha=1.0, n_boot=20, use=["lin", "cat"]),
    }
    return {f"background_decodability/{k}": background_decodability(X, F, factor_names=names, **kw).to_dict()
            for k, kw in cases.items()}


def _make_stores(d: Path) -> None:
    """Recorded runs for series(): one split; two named splits (one grouped); train/test/test_ood."""
    import torch
    from torch import nn

    import probekit as pk

    def items(n, seed, grouped=False):
        g = np.random.default_rng(seed)
        centres = np.random.default_rng(99).normal(0, 2.0, (3, 6))
        bg = np.random.default_rng(98).normal(0, 1.0, (2, 6))
        fg = np.repeat(np.arange(n // 4), 4) if grouped else np.arange(n)
        y = fg % 3
        base = centres[y] + (np.repeat(g.normal(0, 0.5, (n // 4, 6)), 4, axis=0) if grouped
                             else g.normal(0, 0.5, (n, 6)))
        F = g.uniform(-1, 1, (n, 2))
        X = base + F @ bg
        out = []
        for i in range(n):
            it = {"x": torch.tensor(X[i], dtype=torch.float32), "label": int(y[i]),
                  "factors": torch.tensor(F[i], dtype=torch.float32)}
            if grouped:
                it["group"] = int(fg[i])
            out.append(it)
        return out

    def run(path, probe):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        train = items(240, 1)
        X = torch.stack([t["x"] for t in train])
        y = torch.tensor([t["label"] for t in train])
        rec = pk.Recorder(model, ["1", "3"], probe, path, every=10, weights_layers=["0", "2", "4"])
        for step in range(31):
            rec.step(step)
            loss = nn.functional.cross_entropy(model(X), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

    d.mkdir(parents=True, exist_ok=True)
    run(d / "one.h5", items(90, 2))
    run(d / "two.h5", {"alpha": items(90, 3), "beta": items(80, 4, grouped=True)})
    run(d / "three.h5", {"train": items(90, 5), "test_id": items(60, 6), "test_ood": items(60, 7, grouped=True)})


def _series_cases(d: Path):
    from probekit.series import series

    if not (d / "three.h5").exists():
        _make_stores(d)
    rng = np.random.default_rng(3)
    core = np.linalg.qr(rng.normal(size=(6, 2)))[0].T
    bgb = np.linalg.qr(rng.normal(size=(6, 2)))[0].T
    calls = {
        "one": (d / "one.h5", {}),
        "one_steps": (d / "one.h5", dict(steps=[0, 30], layers=["1"], cv_folds=3)),
        "two": (d / "two.h5", {}),
        "two_named": (d / "two.h5", dict(train="beta", test="alpha", grouped="beta", factored="alpha")),
        "two_absent": (d / "two.h5", dict(test="gamma", grouped="delta")),
        "three": (d / "three.h5", dict(bases={"0": (core, bgb)}, weight_layers=["0"], probe_C=0.5)),
        "three_score": (d / "three.h5", dict(score_layer="1", test="test_id")),
    }
    return {f"series/{k}": series(p, **kw) for k, (p, kw) in calls.items()}


def _diff(a, b) -> float:
    """Largest absolute difference (inf for a structural mismatch)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return float("inf")
        return max([_diff(a[k], b[k]) for k in a], default=0.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return float("inf")
        return max([_diff(x, y) for x, y in zip(a, b, strict=True)], default=0.0)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            return float("inf")
        if a.dtype.kind in "fciub" and b.dtype.kind in "fciub":
            same_nan = np.isnan(a.astype(float)) & np.isnan(b.astype(float))
            d = np.where(same_nan, 0.0, np.abs(a.astype(float) - b.astype(float)))
            return float(np.max(d, initial=0.0))
        return 0.0 if np.array_equal(a, b) else float("inf")
    if isinstance(a, float) and isinstance(b, float):
        return 0.0 if (a == b or (a != a and b != b)) else abs(a - b)
    return 0.0 if a == b else float("inf")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", help="import probekit from this checkout")
    ap.add_argument("--out")
    ap.add_argument("--stores", default="/tmp/split_equivalence_stores")
    ap.add_argument("--compare", nargs=2)
    args = ap.parse_args()
    if args.compare:
        a, b = (pickle.loads(Path(p).read_bytes()) for p in args.compare)
        worst = 0.0
        for k in sorted(set(a) | set(b)):
            d = _diff(a.get(k), b.get(k)) if k in a and k in b else float("inf")
            worst = max(worst, d)
            print(f"{k:45s} max |difference| {d:.3g}")
        print(f"largest: {worst:.3g}")
        return 0 if worst == 0 else 1
    if args.src:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _checkout import use_checkout

        use_checkout(args.src)
    import torch

    torch.set_num_threads(1)
    res = {}
    res.update(_probe_cases())
    res.update(_decodability_cases())
    res.update(_series_cases(Path(args.stores)))
    import probekit

    print("probekit from", Path(probekit.__file__).parent)
    Path(args.out).write_bytes(pickle.dumps(res))
    print(f"{len(res)} cases written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
