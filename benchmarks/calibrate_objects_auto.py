"""Error rates of ``probekit audit --objects auto`` (issue 22, item 2): the sequential rule against the fixed N.

    nice -n 10 python benchmarks/calibrate_objects_auto.py            # full run (writes the JSON below)
    python benchmarks/calibrate_objects_auto.py --quick               # a few simulations

``--objects auto`` grows the crossed split in up to ``AUTO_LOOKS`` = 3 looks (``auto_rounds(cap)``:
a quarter, half and all of the cap of objects) and stops at the first look whose predictions decide
(``reliance_decided``: background reliance's interval at level 1 - 0.05 / 3 lies wholly above or below
its margin); the verdict is then the audit's ordinary shortcut rule (``background_reliance`` at 0.95:
the interval's low end above the margin 0.03) on the objects it has. No forward pass is needed to
measure it: predictions are planted with the generator of ``benchmarks/calibrate_reliance.py``
(objects *and* backgrounds drawn from their populations; a share rho of objects follows the
background's class), on ``cap`` objects x B backgrounds, and the looks read the first n objects (the
audit's seeded order: a random subsample). Per setting, on the same data sets:

- ``auto``: the share flagged, the mean objects used, the share stopped at each look;
- ``fixed``: the share flagged by the ordinary rule on all ``cap`` objects (``--objects N`` at the cap).

False flags at reliance 0 and at the materiality boundary (reliance = margin = 0.03); power at
0.05 - 0.2. The union bound over the looks is 2 x 0.83 % + 2.5 % = 4.2 % at the boundary.

Results: ``benchmarks/results/calibrate_objects_auto.json``; tables in docs/METRICS.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import numpy as np  # noqa: E402

from probekit.analyses import background_reliance  # noqa: E402
from probekit.model_audit import AUTO_LOOKS, AUTO_MIN_OBJECTS, auto_rounds, reliance_decided  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N_BOOT = 500  # the audit's default --n-boot


def _reliance_module():
    spec = importlib.util.spec_from_file_location("calibrate_reliance", ROOT / "benchmarks" / "calibrate_reliance.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


cr = _reliance_module()


def sequential(pred: np.ndarray, g: np.ndarray, b: np.ndarray, y: np.ndarray, c: np.ndarray, cap: int,
               seed: int, n_boot: int = N_BOOT) -> dict:
    """The audit's ``objects="auto"`` on planted predictions (objects 0..cap-1, in order) and the fixed
    rule on all of them: {"auto": flagged or None, "objects": used, "look": index, "fixed": flagged or None}."""
    looks = auto_rounds(cap)
    used, look = looks[-1], len(looks) - 1
    for r, n in enumerate(looks[:-1]):
        sel = g < n
        if reliance_decided(pred[sel], g[sel], b[sel], y[sel], c[sel], ci_level=1 - 0.05 / AUTO_LOOKS,
                            n_boot=n_boot, seed=seed):
            used, look = n, r
            break

    def verdict(n: int) -> bool | None:
        sel = g < n
        return background_reliance(pred[sel], g[sel], b[sel], label=y[sel], background_label=c[sel], n_boot=n_boot,
                                   random_state=seed).shortcut

    fixed = verdict(cap)
    return {"auto": fixed if used == cap else verdict(used), "objects": used, "look": look, "fixed": fixed}


def run_setting(params: dict, sims: int, seed: int) -> dict:
    p = {**cr.DEFAULTS, **params}
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(sims):
        pred, g, b, y, c = cr.simulate(rng, p)
        recs.append(sequential(pred, g, b, y, c, p["G"], seed=i))

    def rate(key: str) -> float | None:
        vals = [r[key] for r in recs if r[key] is not None]
        return float(np.mean(vals)) if vals else None

    looks = auto_rounds(p["G"])
    return {"params": params, "truth": p["rho"] * p["s"], "sims": sims, "looks": looks,
            "auto_flag_rate": rate("auto"), "fixed_flag_rate": rate("fixed"),
            "judged_auto": sum(r["auto"] is not None for r in recs), "judged_fixed": sum(r["fixed"] is not None for r in recs),
            "mean_objects": float(np.mean([r["objects"] for r in recs])),
            "stopped_at": [float(np.mean([r["look"] == k for r in recs])) for k in range(len(looks))],
            "disagree": float(np.mean([r["auto"] != r["fixed"] for r in recs]))}


DESIGNS = [
    ("balanced K10 B8, cap 300", dict(G=300)),
    ("balanced K10 B8, cap 100", dict(G=100)),
    ("K100 B8, cap 300", dict(G=300, K=100)),
    ("noise bg, K10 half one class, cap 300", dict(G=300, pi="half", **cr.NOISE)),
    ("unsure, heterogeneous K10 B8, cap 300", dict(G=300, **cr.HARD)),
]
NULLS = [0.0, 0.03]
POWER = [0.05, 0.075, 0.1, 0.15, 0.2]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sims-null", type=int, default=200)
    ap.add_argument("--sims-power", type=int, default=60)
    ap.add_argument("--only", default="", help="run only the designs whose name contains this text")
    ap.add_argument("--nulls-only", action="store_true", help="only the no-reliance and boundary rows")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "calibrate_objects_auto.json"))
    args = ap.parse_args(argv)
    n_null, n_pow = (10, 5) if args.quick else (args.sims_null, args.sims_power)
    t0 = time.perf_counter()
    res: dict = {"config": {"looks": AUTO_LOOKS, "min_objects": AUTO_MIN_OBJECTS, "decide_level": 1 - 0.05 / AUTO_LOOKS, "n_boot": N_BOOT,
                            "sims_null": n_null, "sims_power": n_pow}, "settings": []}
    for d, (name, params) in enumerate(DESIGNS):
        if args.only not in name:
            continue
        grid = NULLS + ([] if args.nulls_only else POWER if d < 2 or name.startswith("unsure") else [])
        for k, rel in enumerate(grid):
            # a share rel of the objects follows the background's class always (s = 1), or with the design's s
            s = params.get("s", 1.0)
            out = run_setting({**params, "rho": rel / s}, n_null if rel in NULLS else n_pow, seed=1000 * d + k)
            out["name"] = name
            res["settings"].append(out)
            print(f"{name:42s} R={rel:.3f} auto {out['auto_flag_rate']} fixed {out['fixed_flag_rate']} "
                  f"objects {out['mean_objects']:.0f} stop {out['stopped_at']} {time.perf_counter() - t0:.0f}s",
                  file=sys.stderr, flush=True)
    res["config"]["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print("\n".join(table(res)))
    return res


def table(res: dict) -> list[str]:
    lines = ["| design | true reliance | flagged, auto | flagged, fixed N = cap | mean objects (auto) | stopped at looks 1 / 2 / 3 | sims |",
             "|---|---|---|---|---|---|---|"]
    for s in res["settings"]:
        f = lambda v: "–" if v is None else f"{100 * v:.1f} %"  # noqa: E731
        lines.append(f"| {s['name']} | {s['truth']:.3f} | {f(s['auto_flag_rate'])} | {f(s['fixed_flag_rate'])} | "
                     f"{s['mean_objects']:.0f} of {s['looks'][-1]} | "
                     + " / ".join(f"{100 * v:.0f} %" for v in s["stopped_at"]) + f" | {s['sims']} |")
    return lines


if __name__ == "__main__":
    main()
