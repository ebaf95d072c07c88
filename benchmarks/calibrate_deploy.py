"""Coverage of the intervals of issue 25 by simulation: ``predicted_accuracy`` and ``composite_gap``.

``predicted_accuracy``: correctness ~ Bernoulli(expit(mu + a_object + b_scene + e)), normal effects; the
site's accuracy (the estimand) is E expit(...) over all three, by Monte Carlo (4 million draws).
Beside it, the pigeonhole bootstrap (objects and scenes resampled independently, percentile) that the
function does not use, to show why. ``composite_gap``: originals right with probability p, composites
lose a share ``loss`` of those (planted gap p * loss), one pair per object.

    nice -n 10 python benchmarks/calibrate_deploy.py --out benchmarks/results/calibrate_deploy.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy.special import expit

from probekit.analyses import composite_gap, predicted_accuracy

SETTINGS = [  # G objects, B scenes, mu, sd objects, sd scenes, sd residual
    (100, 16, 1.5, 1.0, 0.3, 0.3), (100, 16, 1.5, 0.3, 1.0, 0.3), (100, 16, 1.5, 0.2, 0.2, 0.2),
    (50, 8, 2.5, 1.0, 1.0, 0.5), (150, 24, 0.5, 1.5, 0.5, 0.5), (100, 16, 3.0, 0.5, 0.5, 0.5),
    (40, 16, 1.0, 2.0, 0.2, 0.2), (150, 32, 2.5, 1.0, 1.0, 0.5), (150, 32, 1.0, 1.0, 0.7, 0.5),
    (300, 48, 3.0, 1.0, 0.5, 0.5), (150, 16, 2.0, 0.5, 1.5, 0.5), (150, 16, -0.5, 0.8, 0.8, 0.5),
]
GAPS = [(200, 0.9, 0.1), (100, 0.8, 0.1), (300, 0.95, 0.05), (150, 0.9, 0.05), (200, 0.97, 0.02)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=500)
    ap.add_argument("--boot", type=int, default=300)
    ap.add_argument("--out", default="benchmarks/results/calibrate_deploy.json")
    args = ap.parse_args()
    t0 = time.time()
    rng = np.random.default_rng(0)
    out: dict = {"command": f"python benchmarks/calibrate_deploy.py --reps {args.reps} --boot {args.boot}",
                 "predicted_accuracy": [], "composite_gap": []}
    for G, B, mu, sa, sb, se in SETTINGS:
        truth = float(expit(mu + np.sqrt(sa ** 2 + sb ** 2 + se ** 2) * rng.standard_normal(4_000_000)).mean())
        hit = hit_boot = 0
        width = []
        g, b = np.divmod(np.arange(G * B), B)
        y = np.zeros(G * B, dtype=int)
        for _ in range(args.reps):
            p = expit(mu + rng.normal(0, sa, (G, 1)) + rng.normal(0, sb, (1, B)) + rng.normal(0, se, (G, B)))
            Y = (rng.random((G, B)) < p).astype(float)
            r = predicted_accuracy(np.where(Y.reshape(-1) > 0, 0, 1), y, g, b)
            hit += r.ci[0] <= truth <= r.ci[1]
            width.append(r.ci[1] - r.ci[0])
            wg = rng.multinomial(G, np.full(G, 1 / G), size=args.boot).astype(float)
            wb = rng.multinomial(B, np.full(B, 1 / B), size=args.boot).astype(float)
            boot = np.einsum("rg,gb,rb->r", wg, Y, wb) / (G * B)
            lo, hi = np.percentile(boot, [2.5, 97.5])
            hit_boot += lo <= truth <= hi
        row = {"G": G, "B": B, "mu": mu, "sd_objects": sa, "sd_scenes": sb, "sd_residual": se, "truth": truth,
               "coverage": hit / args.reps, "coverage_pigeonhole_bootstrap": hit_boot / args.reps,
               "mean_width": float(np.mean(width))}
        out["predicted_accuracy"].append(row)
        print(row, flush=True)
    for G, p0, loss in GAPS:
        planted = p0 * loss
        hit = 0
        for _ in range(args.reps):
            lab = rng.integers(0, 3, G)
            o = rng.random(G) < p0
            c = o & (rng.random(G) >= loss)
            r = composite_gap(np.where(o, lab, lab + 1), np.where(c, lab, lab + 1), lab, np.arange(G))
            hit += r.ci[0] <= planted <= r.ci[1]
        row = {"G": G, "p_original": p0, "loss": loss, "planted_gap": planted, "coverage": hit / args.reps}
        out["composite_gap"].append(row)
        print(row, flush=True)
    out["seconds"] = round(time.time() - t0, 1)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
