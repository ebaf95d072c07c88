"""Torch L-BFGS probe vs scikit-learn LogisticRegression on the same data and C.

    python benchmarks/bench_probes.py [--n 16000 --d 512 --k 10 --repeats 3 --device cpu]
    python benchmarks/bench_probes.py --stream --n 64000 --budget-mib 32 --repeats 3
    python benchmarks/bench_probes.py --cv --repeats 3

Synthetic Gaussian classes (shared covariance, random means), standardised like the probe does;
both fit the identical objective C * sum(loss) + 0.5 ||W||^2 (same C, max_iter, tol). The fits
alternate (torch, sklearn, then sklearn, torch, ...). Prints the median wall time of `repeats` fits
of each (the fit alone, with its standardisation; held-out rows scored after the timer), held-out
accuracy, the speed ratio, and the time of one objective evaluation of the torch fit.

Each timed fit starts after a pause (``--pause``, 0.5 s): OpenBLAS's worker threads busy-wait after
a call (scikit-learn's fit, the scoring in between), and on 2 cores they took a core from the next
fit (``python benchmarks/ab_blas_spin.py``: one 4,000 x 512 numpy product right before a torch fit
made it 194 ms instead of 148 ms after a pause, medians of 6). ``--pause 0`` measures the fits back
to back.

``--stream``: the training rows go into a probekit store larger than ``--budget-mib``, and the torch
probe is fitted (a) on the whole layer loaded into memory and (b) streamed from the store with
``max_memory`` = the budget (every L-BFGS evaluation re-reads the chunks). Each fit runs in a fresh
subprocess, alternating, and its peak RSS growth is measured from the RSS before the fit (VmHWM reset through
/proc/self/clear_refs after a 500-row warm-up fit, so torch's start-up is not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np


def make_data(n: int, d: int, k: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(k, d)) * 0.12
    y = rng.integers(0, k, 2 * n)
    X = (means[y] + rng.normal(size=(2 * n, d))).astype(np.float32)
    return X[:n], y[:n], X[n:], y[n:]


def _status_mib(field: str) -> float:
    """A memory line of /proc/self/status in MiB (VmRSS: now; VmHWM: peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> None:
    """Set VmHWM to the current RSS (Linux: writing 5 to clear_refs), so a later peak is the fit's own."""
    Path("/proc/self/clear_refs").write_text("5\n")


def _stream_child(args: argparse.Namespace) -> None:
    """One fit in this fresh process; prints a JSON line with time, accuracy and memory growth."""
    import probekit
    from probekit.analyses import LinearProbe

    _, _, Xte, yte = make_data(args.n, args.d, args.k)
    budget = args.budget_mib << 20
    with probekit.open_store(args.child_store) as st:
        acts = st.acts("m", "train", "x")
        y = st.sample_field("train", "label")
        # warm-up on 500 rows: torch's import and thread pools are not the fit's memory
        LinearProbe(C=args.C, backend="torch", max_memory=None, max_iter=5).fit(np.asarray(acts[:500]), y[:500])
        before = _status_mib("VmRSS")
        _reset_peak_rss()
        t = time.perf_counter()
        if args.child == "memory":
            p = LinearProbe(C=args.C, backend="torch", max_memory=None).fit(np.asarray(acts), y)
        else:
            p = LinearProbe(C=args.C, backend="torch", max_memory=budget).fit(acts, y)
        dt = time.perf_counter() - t
        grew = _status_mib("VmHWM") - before
    print(json.dumps({"time": dt, "acc": float(p.score(Xte, yte)), "iters": int(p.n_iter_), "rss_growth_mib": grew}))


def _stream(args: argparse.Namespace) -> None:
    from probekit.store import StoreWriter

    Xtr, ytr, _, _ = make_data(args.n, args.d, args.k)
    tmp = Path(tempfile.mkdtemp(prefix="pk-probe-"))
    store = tmp / "probe.h5"
    with StoreWriter(store, mode="create") as w:
        w.add_split("train", n_rows=args.n, has_label=True)
        w.add_model("m", role="model")
        w.add_layer("m", "train", "x", feature_shape=(args.d,), dtype="float32")
        for s in range(0, args.n, 8192):
            e = min(args.n, s + 8192)
            w.write_rows("train", s, samples={"index": np.arange(s, e), "label": ytr[s:e]},
                         acts={"m": {"x": Xtr[s:e]}})
    mib = Xtr.nbytes / 2**20
    print(f"store layer {args.n} x {args.d} float32 = {mib:.0f} MiB, budget {args.budget_mib} MiB, "
          f"{args.k} classes, C={args.C}, load {os.getloadavg()[0]:.1f}")
    runs: dict[str, list[dict]] = {"memory": [], "stream": []}
    for _ in range(args.repeats):
        for mode in runs:
            cmd = [sys.executable, __file__, "--child", mode, "--child-store", str(store), "--n", str(args.n),
                   "--d", str(args.d), "--k", str(args.k), "--C", str(args.C), "--budget-mib", str(args.budget_mib)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[mode].append(json.loads(out.strip().splitlines()[-1]))
    store.unlink()
    tmp.rmdir()
    print(f"{'fit':<26} {'median s':>9} {'accuracy':>9} {'iters':>6} {'peak RSS growth MiB':>20}")
    summary = {}
    for mode, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        summary[mode] = med
        label = "in memory (whole layer)" if mode == "memory" else f"streamed, budget {args.budget_mib} MiB"
        print(f"{label:<26} {med['time']:>9.2f} {100 * med['acc']:>8.2f}% {med['iters']:>6.0f} "
              f"{med['rss_growth_mib']:>20.0f}")
    print(f"streamed / in-memory time {summary['stream']['time'] / summary['memory']['time']:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "runs": runs, "median": summary,
                                              "layer_mib": mib, "loadavg": os.getloadavg()}, indent=1))


def _cv(args: argparse.Namespace) -> None:
    """Median time of LinearProbe(C='cv', backend='torch') fits: 31 fits with held-out scoring between."""
    from probekit.analyses import LinearProbe

    Xtr, ytr, _, _ = make_data(args.n, args.d, args.k)
    LinearProbe(C=1.0, backend="torch").fit(Xtr, ytr)  # warm-up
    times = []
    for _ in range(args.repeats):
        time.sleep(args.pause)
        t = time.perf_counter()
        p = LinearProbe(C="cv", backend="torch", random_state=0).fit(Xtr, ytr)
        times.append(time.perf_counter() - t)
    print(f"C='cv' {args.n} x {args.d}, {args.k} classes: median {statistics.median(times):.2f} s "
          f"({', '.join(f'{x:.2f}' for x in times)}), chose C={p.C_}, load {os.getloadavg()[0]:.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "times": times, "C": p.C_,
                                              "cv_results": p.cv_results_, "loadavg": os.getloadavg()}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--C", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-sklearn", action="store_true")
    ap.add_argument("--pause", type=float, default=0.5,
                    help="seconds to wait before each timed fit (default 0.5; see the module docstring)")
    ap.add_argument("--cv", action="store_true", help="time LinearProbe(C='cv') fits (5 folds x 6 C) instead")
    ap.add_argument("--stream", action="store_true", help="streamed fit from a store larger than --budget-mib")
    ap.add_argument("--budget-mib", type=int, default=32)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--child", choices=["memory", "stream"], help=argparse.SUPPRESS)
    ap.add_argument("--child-store", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _stream_child(args)
    if args.stream:
        return _stream(args)
    if args.cv:
        return _cv(args)

    import torch
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from probekit.analyses import LinearProbe

    Xtr, ytr, Xte, yte = make_data(args.n, args.d, args.k)
    print(f"data {args.n} x {args.d}, {args.k} classes, C={args.C}; torch threads {torch.get_num_threads()}, "
          f"device {args.device}")

    def timed(fit) -> tuple[float, object]:
        """Time the fit alone (its standardisation included); score the held-out rows after the timer."""
        t = time.perf_counter()
        fitted = fit()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        return dt, fitted

    def fit_torch() -> LinearProbe:
        return LinearProbe(C=args.C, backend="torch", device=args.device).fit(Xtr, ytr)

    def fit_sklearn() -> tuple[StandardScaler, LogisticRegression]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            sc = StandardScaler().fit(Xtr)
            return sc, LogisticRegression(C=args.C, max_iter=1000, tol=1e-4).fit(sc.transform(Xtr), ytr)

    def scored(k: str, fitted) -> tuple[float, int]:
        if k == "torch":
            return float(fitted.score(Xte, yte)), int(fitted.n_iter_)
        sc, lr = fitted
        return float(lr.score(sc.transform(Xte), yte)), int(lr.n_iter_.max())

    fits = {"torch": fit_torch} if args.skip_sklearn else {"torch": fit_torch, "sklearn": fit_sklearn}
    for f in fits.values():
        f()  # warm-up (torch init, sklearn imports)
    times: dict[str, list[float]] = {k: [] for k in fits}
    got: dict[str, tuple] = {}
    for r in range(args.repeats):  # alternating, the first of each pair rotating
        for k in (list(fits) if r % 2 == 0 else list(fits)[::-1]):
            time.sleep(args.pause)
            dt, fitted = timed(fits[k])
            times[k].append(dt)
            got[k] = scored(k, fitted)
    t_torch, (acc_torch, it_t) = statistics.median(times["torch"]), got["torch"]

    # one objective evaluation of the torch fit (logits, softmax, gradient), timed alone: the fit's
    # time is about (evaluations) x this. float32: two thin GEMMs; the bfloat16 stage's evaluation
    # (on CPUs with bfloat16 instructions): the step's logits and the gradient in bfloat16, exact
    # float32 logits every 8th call (the median is of the other calls)
    from probekit.analyses import _logistic

    Z = torch.from_numpy(StandardScaler().fit_transform(Xtr).astype(np.float32)).to(args.device)
    Y = torch.nn.functional.one_hot(torch.from_numpy(ytr.astype(np.int64)), args.k).float().to(args.device)
    W = torch.zeros(args.k, args.d, device=args.device)
    b = torch.zeros(args.k, device=args.device)

    def eval_ms(f) -> float:
        ev = []
        for _ in range(24):
            W.add_(1e-3)  # a step, as between L-BFGS evaluations
            t = time.perf_counter()
            f()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            ev.append(time.perf_counter() - t)
        return 1000 * statistics.median(ev)

    ev32 = eval_ms(lambda: _logistic.loss_grad(torch, Z, Y, W, b, args.k, args.n))
    bf16 = _logistic.bf16_matmul_fast(torch, torch.device(args.device))
    ev16 = eval_ms(_logistic.Bf16Evaluator(torch, Z, Y, W, b, args.k, args.n)) if bf16 else float("nan")
    print(f"torch   : median {t_torch:.3f} s, accuracy {100 * acc_torch:.2f} %, L-BFGS iterations {it_t}, "
          f"one evaluation {ev32:.1f} ms float32 / {ev16:.1f} ms bfloat16 stage "
          f"({'used' if bf16 else 'not used: no bfloat16 instructions'})")
    if not args.skip_sklearn:
        t_sk, (acc_sk, it_s) = statistics.median(times["sklearn"]), got["sklearn"]
        print(f"sklearn : median {t_sk:.3f} s, accuracy {100 * acc_sk:.2f} %, L-BFGS iterations {it_s}")
        print(f"speed-up {t_sk / t_torch:.1f}x, accuracy difference {100 * (acc_torch - acc_sk):+.2f} pt")
    print(f"load {os.getloadavg()[0]:.1f}")
    if args.out:
        res = {"args": vars(args), "torch": {"median_s": t_torch, "acc": acc_torch, "iters": it_t,
                                             "eval_ms_float32": ev32, "eval_ms_bf16": ev16, "bf16_stage": bf16},
               "times": times, "loadavg": os.getloadavg()}
        if not args.skip_sklearn:
            res["sklearn"] = {"median_s": t_sk, "acc": acc_sk, "iters": it_s}
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
