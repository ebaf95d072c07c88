"""Coverage of probekit.compare's intervals: reliance of one checkpoint, and the paired difference of two.

Generator (three classes, uniform): each object has its own answer (its class with probability 0.9, else a
random class); each background a random class; checkpoint m predicts the background's class with
probability r_m in each cell, else the object's answer; the two checkpoints share the cell's uniform draw
(so they are paired, as two checkpoints of one training run are). The true reliance of the population is
(2r/3) / (1 - r/3 - (1 - r) q), q = 1/30 (checked against G=1500, B=120 samples: within 0.006).

    python benchmarks/calibrate_compare.py [--sims 200] [--objects 60] [--backgrounds 8]

writes benchmarks/results/calibrate_compare.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from probekit.compare import _ci, _designs, _variance, reliance_replicates

K, Q = 3, 1 / 30


def truth(r: float) -> float:
    return (2 * r / 3) / (1 - r / 3 - (1 - r) * Q)


def simulate(rng: np.random.Generator, G: int, B: int, r1: float, r2: float):
    y = rng.integers(0, K, G)
    answer = np.where(rng.random(G) < 0.9, y, rng.integers(0, K, G))
    bl = np.tile(rng.integers(0, K, B), (G, 1))
    u = rng.random((G, B))
    p1 = np.where(u < r1, bl, answer[:, None])
    p2 = np.where(u < r2, bl, answer[:, None])
    return np.tile(y[:, None], (1, B)), bl, p1, p2


def coverage(G: int, B: int, r1: float, r2: float, sims: int, n_boot: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    hit1 = hitd = 0
    widths = []
    for _ in range(sims):
        y, bl, p1, p2 = simulate(rng, G, B, r1, r2)
        designs = _designs(rng, G, B, n_boot)
        one = np.ones((1, G, B))
        e1, e2 = reliance_replicates(p1, y, bl, one)[0], reliance_replicates(p2, y, bl, one)[0]
        b1 = {k: reliance_replicates(p1, y, bl, W, V) for k, (W, V) in designs.items()}
        b2 = {k: reliance_replicates(p2, y, bl, W, V) for k, (W, V) in designs.items()}
        c1 = _ci(e1, _variance(b1))
        cd = _ci(e1 - e2, _variance({k: b1[k] - b2[k] for k in designs}))
        hit1 += c1 is not None and c1[0] <= truth(r1) <= c1[1]
        hitd += cd is not None and cd[0] <= truth(r1) - truth(r2) <= cd[1]
        widths.append(cd[1] - cd[0] if cd else np.nan)
    return {"objects": G, "backgrounds": B, "r1": r1, "r2": r2, "sims": sims, "n_boot": n_boot,
            "coverage_reliance": hit1 / sims, "coverage_paired_difference": hitd / sims,
            "mean_width_paired_difference": float(np.nanmean(widths))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sims", type=int, default=200)
    ap.add_argument("--objects", type=int, default=60)
    ap.add_argument("--backgrounds", type=int, default=8)
    ap.add_argument("--n-boot", type=int, default=200)
    args = ap.parse_args()
    t0 = time.time()
    rows = [coverage(args.objects, args.backgrounds, r1, r2, args.sims, args.n_boot, seed)
            for seed, (r1, r2) in enumerate([(0.3, 0.1), (0.6, 0.5), (0.9, 0.8), (0.2, 0.2)])]
    out = {"command": "python benchmarks/calibrate_compare.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()), "seconds": round(time.time() - t0),
        "rows": rows}
    path = Path(__file__).parent / "results" / "calibrate_compare.json"
    path.write_text(json.dumps(out, indent=1))
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
