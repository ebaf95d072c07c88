"""What the init reference on a subsample of objects costs the representation finding (issue 22, item 2).

    nice -n 10 python benchmarks/calibrate_init_subsample.py          # full run (writes the JSON below)
    python benchmarks/calibrate_init_subsample.py --quick             # a few simulations

``probekit audit`` extracts 3 seeded initialisations of the model on the crossed split as the
reference of ``compare_background(kind="within_odds")``. With ``init_objects=k`` they see only a
seeded subsample of k of the split's G objects (all its backgrounds), and ``compare_background``
adds the reference's own sampling variance over its k objects to the interval
(``reference_group`` / ``reference_background``). This script measures, on the generator of
``benchmarks/calibrate_layers.py`` (its ``init_scenarios``: models at population ratio exactly 1 and
1.25, 0.5x / 0.7x foreground, 3x background, linear and ReLU layers, 3 freshly drawn inits per data
set), for every k and the full split on the *same* data sets (the first k objects: objects are
drawn independently, so the first k are a random subsample):

- coverage of the 0.95 interval of the population ratio;
- its width (median of log(high / low): the ratio's interval is hi / lo = exp(width) wide);
- the false-flag rate at the audit's level ``1 - 0.05 / 4`` (Bonferroni over 4 layers) for the
  "same response" model (ratio 1), the boundary (1.25) and the weaker foregrounds;
- the power at a 3x background;
- the forward passes the inits cost: 3 k B against 3 G B.

Part ``correlated``: inits that vary *with* the model across objects (each init = the model's rows +
independent noise; exact truth (int + D sd^2) / int), where the reference on a subsample leans on the
objects both hold (``compare_background``'s control-variate weight near 0): coverage and width.

Results: ``benchmarks/results/calibrate_init_subsample.json``; tables in docs/METRICS.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

from probekit.analyses import compare_background  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KIND = "within_odds"
N_INITS = 3


def _layers_module():
    spec = importlib.util.spec_from_file_location("calibrate_layers", ROOT / "benchmarks" / "calibrate_layers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


cl = _layers_module()


def one(X: np.ndarray, inits: list[np.ndarray], g: np.ndarray, b: np.ndarray, k: int | None, t: float) -> dict:
    """Flag (audit level), 0.95 coverage and log width with the inits on the first k objects (None: all)."""
    if k is None:
        refs, kw = inits, {}
    else:
        sel = g < k
        refs, kw = [z[sel] for z in inits], {"reference_group": g[sel], "reference_background": b[sel]}
    r = compare_background(X, refs, g, b, kind=KIND, ci_level=cl.LEVEL_FLAG, **kw)
    r95 = compare_background(X, refs, g, b, kind=KIND, ci_level=cl.LEVEL_COVER, **kw)
    ci = r95.ratio_ci
    width = None
    if ci is not None and ci[0] > 0:
        width = math.log(ci[1] / ci[0])
    return {"flag": bool(r.flagged), "has_ci": ci is not None, "covered": True if ci is None else bool(ci[0] <= t <= ci[1]),
            "width": width, "ratio": r.ratio}


def run(G: int, B: int, act: str, seed: int, ref: dict[str, float], sizes: list[int | None]) -> dict[str, dict]:
    """One data set (the generator of calibrate_layers.run_inits), every scenario, every subsample size."""
    rng = np.random.default_rng([seed, G, B, act == "relu", 2])
    z, wb, e = rng.normal(size=(G, cl.P)), rng.normal(size=(B, cl.Q)), rng.normal(size=(G, B, cl.R_NUIS))
    g, b = np.repeat(np.arange(G), B), np.tile(np.arange(B), G)
    inits = [cl.rows(cl.weights(rng), act, z, wb, e) for _ in range(N_INITS)]
    out: dict[str, dict] = {}
    scen = cl._pooled("inits", act, seed, lambda r: cl.init_scenarios(r, act, ref))
    for name, (kind, M, t) in scen.items():
        if kind != KIND:
            continue
        X = cl.rows(M, act, z, wb, e)
        for k in sizes:
            if k is not None and k >= G:
                continue
            out.setdefault(name.split(":", 1)[1], {})["all" if k is None else str(k)] = {**one(X, inits, g, b, k, t),
                                                                                     "truth": t}
    return out


def run_correlated(G: int, B: int, k: int, seed: int, sd: float = 0.7) -> dict[str, dict]:
    """A layer whose inits vary with the model across objects (a first conv layer and its inits see the same
    pixels): each init is the model's rows plus independent noise of sd ``sd`` per unit and image. The noise
    adds D sd^2 to the interaction only, so the population ratio of ``within_odds`` is exactly
    (int + D sd^2) / int (linear layer, the ``at_1``-style trained model of ``init_scenarios``)."""
    rng = np.random.default_rng([seed, G, B, 9])
    M = cl.weights(np.random.default_rng([seed % cl._POOL, 3]), a=3.0)
    z, wb, e = rng.normal(size=(G, cl.P)), rng.normal(size=(B, cl.Q)), rng.normal(size=(G, B, cl.R_NUIS))
    g, b = np.repeat(np.arange(G), B), np.tile(np.arange(B), G)
    X = cl.rows(M, "linear", z, wb, e)
    inits = [X + sd * rng.normal(size=X.shape) for _ in range(N_INITS)]
    comp = cl.truth(M, "linear")
    t = (comp[2] + cl.D * sd ** 2) / comp[2]
    return {"all" if kk is None else str(kk): {**one(X, inits, g, b, kk, t), "truth": t} for kk in (None, k)}


def summarise(recs: list[dict]) -> dict:
    widths = [r["width"] for r in recs if r["width"] is not None]
    return {"n": len(recs), "flag_rate": float(np.mean([r["flag"] for r in recs])),
            "coverage": float(np.mean([r["covered"] for r in recs])),
            "no_interval": float(np.mean([not r["has_ci"] for r in recs])),
            "median_log_width": float(np.median(widths)) if widths else None,
            "truth": float(np.mean([r["truth"] for r in recs]))}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sims", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "calibrate_init_subsample.json"))
    args = ap.parse_args(argv)
    grid = {(30, 8): 5, (100, 8): 5} if args.quick else {(30, 8): 100, (100, 8): 100, (300, 8): 100, (1000, 8): 40}
    if args.sims:
        grid = {key: args.sims for key in grid}
    sizes: list[int | None] = [None, 10, 15, 20, 30, 50, 100]
    acts = ("linear", "relu")
    t0 = time.perf_counter()
    refs = {act: cl.init_reference(act, n=2_000 if args.quick else 5_000) for act in acts}
    res: dict = {"config": {"grid": {f"G{G}/B{B}": n for (G, B), n in grid.items()}, "sizes": sizes,
                            "level_flag": cl.LEVEL_FLAG, "level_cover": cl.LEVEL_COVER, "margin": cl.MARGIN,
                            "n_inits": N_INITS, "kind": KIND, "init_reference": refs}, "cells": {}}
    for act in acts:
        for (G, B), sims in grid.items():
            recs: dict[str, dict[str, list]] = {}
            for s in range(sims):
                for scen, by_k in run(G, B, act, s, refs[act], sizes).items():
                    for k, v in by_k.items():
                        recs.setdefault(scen, {}).setdefault(k, []).append(v)
            res["cells"][f"{act}/G{G}/B{B}"] = {sc: {k: summarise(v) for k, v in ks.items()} for sc, ks in recs.items()}
            print(f"{act} G={G} B={B} {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    res["correlated"] = {}
    for (G, k), sims in ({(100, 15): 5, (100, 30): 5} if args.quick else {(100, 15): 100, (100, 30): 100,
                                                                           (300, 30): 100}).items():
        recs2: dict[str, list] = {}
        for s in range(sims):
            for kk, v in run_correlated(G, 8, k, s).items():
                recs2.setdefault(kk, []).append(v)
        res["correlated"][f"G{G}/B8/k{k}"] = {kk: summarise(v) for kk, v in recs2.items()}
    res["config"]["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print("\n".join(tables(res)))
    return res


def tables(res: dict) -> list[str]:
    """Per activation and design: one row per scenario, one column per subsample size."""
    lines = []
    for cell, scen in res["cells"].items():
        ks = list(next(iter(scen.values())).keys())
        order = ["all", *sorted((k for k in ks if k != "all"), key=int)]
        lines += ["", f"### {cell}: flag rate at {res['config']['level_flag']:.4g} (0.95 coverage; median log width)",
                  "", "| scenario | truth | " + " | ".join(f"k={k}" for k in order) + " |", "|---|---|" + "---|" * len(order)]
        for sc, byk in scen.items():
            t = next(iter(byk.values()))["truth"]
            lines.append(f"| {sc} | {t:.2f} | " + " | ".join(
                f"{100 * byk[k]['flag_rate']:.0f} % ({100 * byk[k]['coverage']:.0f}; "
                + ("–" if byk[k]["median_log_width"] is None else f"{byk[k]['median_log_width']:.2f}") + ")"
                for k in order) + " |")
    if res.get("correlated"):
        lines += ["", "### correlated inits (model + noise), linear: coverage; median log width (all -> subsample)", ""]
        for cell, byk in res["correlated"].items():
            lines.append(f"{cell}: " + "; ".join(f"k={k} {100 * v['coverage']:.0f} % {v['median_log_width']:.3f}"
                                                 for k, v in byk.items()))
    return lines


if __name__ == "__main__":
    main()
