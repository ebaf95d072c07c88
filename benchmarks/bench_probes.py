"""Torch L-BFGS probe vs scikit-learn LogisticRegression on the same data and C.

    python benchmarks/bench_probes.py [--n 16000 --d 512 --k 10 --repeats 3 --device cpu]

Synthetic Gaussian classes (shared covariance, random means), standardised like the probe does;
both fit the identical objective C * sum(loss) + 0.5 ||W||^2 (same C, max_iter, tol). Prints
median wall time of `repeats` fits, held-out accuracy, and the speed ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np


def make_data(n: int, d: int, k: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(k, d)) * 0.12
    y = rng.integers(0, k, 2 * n)
    X = (means[y] + rng.normal(size=(2 * n, d))).astype(np.float32)
    return X[:n], y[:n], X[n:], y[n:]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--C", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-sklearn", action="store_true")
    args = ap.parse_args()

    import torch
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from probekit.analyses import LinearProbe

    Xtr, ytr, Xte, yte = make_data(args.n, args.d, args.k)
    print(f"data {args.n} x {args.d}, {args.k} classes, C={args.C}; torch threads {torch.get_num_threads()}, "
          f"device {args.device}")

    def run(fit) -> tuple[float, float]:
        times, acc = [], None
        for _ in range(args.repeats):
            t = time.perf_counter()
            acc = fit()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return statistics.median(times), acc

    def fit_torch() -> float:
        p = LinearProbe(C=args.C, backend="torch", device=args.device).fit(Xtr, ytr)
        return float(p.score(Xte, yte)), p.n_iter_

    def fit_sklearn() -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            sc = StandardScaler().fit(Xtr)
            lr = LogisticRegression(C=args.C, max_iter=1000, tol=1e-4).fit(sc.transform(Xtr), ytr)
        return float(lr.score(sc.transform(Xte), yte)), int(lr.n_iter_.max())

    fit_torch()  # warm-up (torch init)
    t_torch, (acc_torch, it_t) = run(fit_torch)
    print(f"torch   : median {t_torch:.2f} s, accuracy {100 * acc_torch:.2f} %, L-BFGS iterations {it_t}")
    if not args.skip_sklearn:
        t_sk, (acc_sk, it_s) = run(fit_sklearn)
        print(f"sklearn : median {t_sk:.2f} s, accuracy {100 * acc_sk:.2f} %, L-BFGS iterations {it_s}")
        print(f"speed-up {t_sk / t_torch:.1f}x, accuracy difference {100 * (acc_torch - acc_sk):+.2f} pt")


if __name__ == "__main__":
    main()
