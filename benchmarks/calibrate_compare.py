"""Coverage of probekit.compare's intervals: each checkpoint's reliance (the audit's, from
probekit.analyses.background_reliance) and the paired difference of two checkpoints.

Generator: each object has its own answer (its class with probability 0.9, else a random class); each
background a class (uniform over K); checkpoint m predicts the background's class with probability r_m in
each cell, else the object's answer; the two checkpoints share the cell's uniform draw (paired, as two
checkpoints of one training run are). The population reliance is r_m (a sample of 1,500 objects x 60
backgrounds gives 0.300 and 0.101 for r = 0.3 and 0.1).

    python benchmarks/calibrate_compare.py [--sims 200] [--objects 60] [--backgrounds 8] [--n-boot 500]

writes benchmarks/results/calibrate_compare.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from probekit.compare import compare_rows


def simulate(rng: np.random.Generator, G: int, B: int, r1: float, r2: float, K: int = 3):
    y = rng.integers(0, K, G)
    answer = np.where(rng.random(G) < 0.9, y, rng.integers(0, K, G))
    bl = np.tile(rng.integers(0, K, B), (G, 1))
    u = rng.random((G, B))
    return (np.tile(y[:, None], (1, B)), bl, np.where(u < r1, bl, answer[:, None]),
            np.where(u < r2, bl, answer[:, None]))


def coverage(G: int, B: int, r1: float, r2: float, sims: int, n_boot: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    hit1 = hitd = 0
    widths, unpaired = [], []
    for s in range(sims):
        y, bl, p1, p2 = simulate(rng, G, B, r1, r2)
        doc = compare_rows({"a": p1, "b": p2}, y, bl, n_boot=n_boot, seed=s)
        c1 = doc["checkpoints"]["a"]["reliance"]["ci"]
        c2 = doc["checkpoints"]["b"]["reliance"]["ci"]
        cd = doc["differences"][0]["reliance_difference"]["ci"]
        hit1 += c1 is not None and c1[0] <= r1 <= c1[1]
        hitd += cd is not None and cd[0] <= r1 - r2 <= cd[1]
        widths.append(cd[1] - cd[0] if cd else np.nan)
        unpaired.append(np.hypot(c1[1] - c1[0], c2[1] - c2[0]) if c1 and c2 else np.nan)
    return {"objects": G, "backgrounds": B, "r1": r1, "r2": r2, "sims": sims, "n_boot": n_boot,
            "coverage_reliance": hit1 / sims, "coverage_paired_difference": hitd / sims,
            "mean_width_paired_difference": float(np.nanmean(widths)),
            "mean_width_unpaired_difference": float(np.nanmean(unpaired))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sims", type=int, default=200)
    ap.add_argument("--objects", type=int, default=60)
    ap.add_argument("--backgrounds", type=int, default=8)
    ap.add_argument("--n-boot", type=int, default=500)
    args = ap.parse_args()
    t0 = time.time()
    rows = [coverage(args.objects, args.backgrounds, r1, r2, args.sims, args.n_boot, seed)
            for seed, (r1, r2) in enumerate([(0.3, 0.1), (0.6, 0.5), (0.9, 0.8), (0.1, 0.0), (0.05, 0.05)])]
    out = {"command": "python benchmarks/calibrate_compare.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()), "seconds": round(time.time() - t0),
        "rows": rows}
    path = Path(__file__).parent / "results" / "calibrate_compare.json"
    path.write_text(json.dumps(out, indent=1))
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
