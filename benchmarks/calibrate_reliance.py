"""Calibration of ``background_reliance`` (issue 20): false flags, power, coverage, ``detectable``.

    nice -n 10 python benchmarks/calibrate_reliance.py                 # full run (~8 min on one core)
    python benchmarks/calibrate_reliance.py --quick                    # a few simulations per setting
    python benchmarks/calibrate_reliance.py --out benchmarks/results/calibrate_reliance.json \
        --figure docs/img/reliance_power.png

A second, independent family of generators (not ``calibrate_verdict.py``'s): model predictions on
G objects x B backgrounds, where *both* are drawn afresh for every data set from populations, so the
truths below are statements about the model and the background population, not about a split.

Generator (one data set). Classes 0..K-1 with probabilities pi (balanced; ``half``: class 0 has 50 %,
the rest share the other 50 %; ``9010``: two classes, 90 / 10).

- objects g: class y_g ~ pi; base accuracy a_g = ``abar`` (or ~ Beta(abar k, (1 - abar) k): unsure
  objects); follower z_g ~ Bernoulli(rho) with strength s_g = ``s`` (1 -/+ ``s_spread``), probability 1/2
  each: object-specific pull);
- backgrounds b: class c_b ~ pi (the class of the image it came from); noise eta_b ~ Bernoulli(q);
  pull multiplier t_b = 1 -/+ ``tau`` (probability 1/2 each: backgrounds that pull more or less);
- cells: object-specific background effect u_gb = 1 - ``gamma`` with probability ``lam``, else 1;
- prediction: with probability s_g t_b a follower predicts c_b; otherwise the row is right with
  probability a_g (1 - delta eta_b) u_gb, else wrong, the wrong class drawn uniformly from the other
  classes (``err="uniform"``: errors spread over every class) or from pi restricted to them
  (``err="prior"``: errors go to the majority class).

Population truths (analytic; independence of z, s, a, u, eta, t and the classes):

- reliance = rho E[s] E[t] = rho s (numerator E[F - E] = rho s sum_{c != y} pi_c (1 - pi_c) per
  row, the complete-shortcut scale sum_{c != y} pi_c (1 - pi_c));
- bg_gap = accuracy on own-class minus other-class backgrounds = rho s (the accuracies of
  non-following rows do not depend on the background's class);
- background effect sigma_B = SD over the background population of
  alpha(b) = rho s t_b pi_{c_b} + (1 - rho s t_b) abar (1 - lam gamma) (1 - delta eta_b),
  enumerated exactly over (c_b, eta_b, t_b).

Each setting runs ``background_reliance`` with its defaults (n_boot 1000, ci_level 0.95, margin 0.03,
effect_margin 0.05) and reports the share flagged ``shortcut`` / ``sensitive``, coverage of the
reliance, bg_gap and effect intervals, and the mean ``detectable``. Data sets the function cannot
judge (every background from one class: common with 90/10 and 8 backgrounds) are counted apart.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

from probekit.analyses import background_reliance
from probekit.analyses._behaviour import EFFECT_MARGIN, RELIANCE_MARGIN

DEFAULTS = dict(G=300, B=8, K=10, pi="balanced", rho=0.0, s=1.0, s_spread=0.0, abar=0.94, a_conc=None,
                q=0.0, delta=0.0, tau=0.0, lam=0.0, gamma=0.0, err="uniform")


def class_probs(K: int, pi: str) -> np.ndarray:
    if pi == "balanced":
        return np.full(K, 1.0 / K)
    if pi == "half":
        return np.r_[0.5, np.full(K - 1, 0.5 / (K - 1))]
    if pi == "9010":
        if K != 2:
            raise ValueError("pi='9010' needs K=2")
        return np.array([0.9, 0.1])
    raise ValueError(pi)


def simulate(rng: np.random.Generator, p: dict) -> tuple[np.ndarray, ...]:
    """One data set: rows (pred, group, background, label, background_label) of a G x B crossed split."""
    G, B, K = p["G"], p["B"], p["K"]
    pi = class_probs(K, p["pi"])
    y = rng.choice(K, G, p=pi)
    c = rng.choice(K, B, p=pi)
    if p["a_conc"] is None:
        a = np.full(G, p["abar"])
    else:
        a = rng.beta(p["abar"] * p["a_conc"], (1 - p["abar"]) * p["a_conc"], G)
    z = rng.random(G) < p["rho"]
    s = p["s"] * np.where(rng.random(G) < 0.5, 1 - p["s_spread"], 1 + p["s_spread"])
    eta = rng.random(B) < p["q"]
    t = np.where(rng.random(B) < 0.5, 1 - p["tau"], 1 + p["tau"])
    u = np.where(rng.random((G, B)) < p["lam"], 1 - p["gamma"], 1.0)
    alpha = a[:, None] * (1 - p["delta"] * eta[None, :]) * u
    correct = rng.random((G, B)) < alpha
    if p["err"] == "uniform":
        w = rng.integers(0, K - 1, (G, B))
        w = w + (w >= y[:, None])
    else:  # from pi restricted to the other classes: inverse-CDF per row
        probs = np.tile(pi, (G, 1))
        probs[np.arange(G), y] = 0.0
        cdf = np.cumsum(probs / probs.sum(axis=1, keepdims=True), axis=1)
        w = (rng.random((G, B))[:, :, None] > cdf[:, None, :]).sum(axis=2)
        w = np.minimum(w, K - 1)
    pred = np.where(correct, y[:, None], w)
    follow = z[:, None] & (rng.random((G, B)) < np.clip(s[:, None] * t[None, :], 0, 1))
    pred = np.where(follow, c[None, :], pred)
    g, b = np.meshgrid(np.arange(G), np.arange(B), indexing="ij")
    return pred.ravel(), g.ravel(), b.ravel(), y[g].ravel(), c[b].ravel()


def truths(p: dict) -> dict:
    """Population reliance, bg_gap and background effect (SD of per-background accuracy), analytic."""
    pi = class_probs(p["K"], p["pi"])
    rs = p["rho"] * p["s"]
    ubar = 1 - p["lam"] * p["gamma"]
    vals, wts = [], []
    for k, pk in enumerate(pi):
        for eta, pe in ((1, p["q"]), (0, 1 - p["q"])):
            for t in (1 - p["tau"], 1 + p["tau"]):
                vals.append(rs * t * pi[k] + (1 - rs * t) * p["abar"] * ubar * (1 - p["delta"] * eta))
                wts.append(pk * pe * 0.5)
    vals, wts = np.array(vals), np.array(wts)
    m = float(wts @ vals)
    var = max(0.0, float(wts @ (vals - m) ** 2))
    return {"reliance": rs, "bg_gap": rs, "effect": float(np.sqrt(var))}


def run_setting(name: str, params: dict, sims: int, seed: int) -> dict:
    p = {**DEFAULTS, **params}
    tr = truths(p)
    rng = np.random.default_rng(seed)
    rows = []
    t0 = time.perf_counter()
    for i in range(sims):
        pred, g, b, y, c = simulate(rng, p)
        r = background_reliance(pred, g, b, label=y, background_label=c, random_state=i)
        rows.append(r)
    wall = time.perf_counter() - t0
    judged = [r for r in rows if r.shortcut is not None]

    def cover(vals: list) -> float | None:
        return float(np.mean(vals)) if vals else None

    out = {
        "name": name, "params": {k: v for k, v in params.items()}, "truth": tr, "sims": sims,
        "judged": len(judged),
        "flag_rate": cover([r.shortcut for r in judged]),
        "sensitive_rate": cover([r.sensitive for r in rows if r.sensitive is not None]),
        "reliance_mean": cover([r.reliance for r in judged]),
        "reliance_sd": float(np.std([r.reliance for r in judged])) if judged else None,
        "coverage_reliance": cover([r.reliance_ci[0] <= tr["reliance"] <= r.reliance_ci[1] for r in judged]),
        "coverage_bg_gap": cover([r.bg_gap_ci[0] <= tr["bg_gap"] <= r.bg_gap_ci[1]
                                  for r in rows if r.bg_gap_ci is not None]),
        "coverage_effect": cover([r.effect_ci[0] <= tr["effect"] <= r.effect_ci[1]
                                  for r in rows if r.effect_ci is not None]),
        "effect_mean": cover([r.effect for r in rows if r.effect is not None]),
        "detectable_mean": cover([r.detectable for r in judged if r.detectable is not None]),
        "detectable_median": (float(np.median([r.detectable for r in judged if r.detectable is not None]))
                              if any(r.detectable is not None for r in judged) else None),
        "seconds": round(wall, 1),
    }
    print(f"{name:48s} R={tr['reliance']:.3f} E={tr['effect']:.3f} judged {out['judged']:3d}/{sims} "
          f"flag {out['flag_rate']} sens {out['sensitive_rate']} covR {out['coverage_reliance']} "
          f"covG {out['coverage_bg_gap']} covE {out['coverage_effect']} det {out['detectable_median']} "
          f"({wall:.0f}s)", flush=True)
    return out


NOISE = dict(q=0.5, delta=1 - 0.43 / 0.94)  # 4 of 8 backgrounds take accuracy 0.94 -> 0.43
HARD = dict(a_conc=4.0, abar=0.8, lam=0.3, gamma=0.5, s=0.6, s_spread=0.3, tau=0.25)  # heterogeneous everything

# (name, params): each run at reliance 0 and at the materiality boundary (reliance = margin)
NULL_DESIGNS = [
    ("balanced K10 G300 B8", dict()),
    ("noise bg, K10 half one class, G300 B8", dict(pi="half", **NOISE)),
    ("noise bg, 2 classes 90/10, G300 B8", dict(K=2, pi="9010", **NOISE)),
    ("noise bg, K10 half, errors to majority", dict(pi="half", err="prior", **NOISE)),
    ("noise bg, K2 90/10, errors to majority", dict(K=2, pi="9010", err="prior", **NOISE)),
    ("K100 G300 B8", dict(K=100)),
    ("K2 balanced G100 B8", dict(K=2, G=100)),
    ("K10 G30 B3", dict(G=30, B=3)),
    ("K10 G1000 B16 heterogeneous", dict(G=1000, B=16, **HARD)),
    ("unsure robust K10 G300 B8 (abar .6, Beta(1.2,.8))", dict(abar=0.6, a_conc=2.0, lam=0.3, gamma=0.6)),
]

POWER_DESIGNS = [
    ("G300 B8 K10", dict()),
    ("G100 B8 K10", dict(G=100)),
    ("G300 B8 K100", dict(K=100)),
    ("G300 B8 K2 90/10 noise", dict(K=2, pi="9010", **NOISE)),
    ("G1000 B16 K10 heterogeneous", dict(G=1000, B=16, **HARD)),
]
POWER_GRID = [0.03, 0.05, 0.075, 0.1, 0.15, 0.2]
EFFECT_GRID = [0.0, 0.025, 0.05, 0.075, 0.1, 0.15]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few simulations per setting")
    ap.add_argument("--sims-null", type=int, default=100)
    ap.add_argument("--sims-power", type=int, default=40)
    ap.add_argument("--seed", type=int, default=2020)
    ap.add_argument("--out", default="benchmarks/results/calibrate_reliance.json")
    ap.add_argument("--figure", default="docs/img/reliance_power.png")
    a = ap.parse_args()
    sn, sp = (6, 4) if a.quick else (a.sims_null, a.sims_power)
    t0, c0 = time.perf_counter(), time.process_time()
    res: dict = {"command": " ".join(["python", *sys.argv]), "margin": RELIANCE_MARGIN,
                 "effect_margin": EFFECT_MARGIN, "null": [], "power": {}, "effect_power": [],
                 "detectable": []}
    seed = a.seed
    print("# false flags at reliance 0 and at the boundary (reliance = margin)")
    for name, prm in NULL_DESIGNS:
        for rel in (0.0, RELIANCE_MARGIN):
            seed += 1
            res["null"].append(run_setting(f"{name} @ {rel}", {**prm, "rho": rel / prm.get("s", 1.0)},
                                           sn, seed))
    print("# power curves (a share rho of objects follows the background's class)")
    for name, prm in POWER_DESIGNS:
        res["power"][name] = []
        for rel in POWER_GRID:
            seed += 1
            res["power"][name].append(run_setting(f"{name} @ {rel}", {**prm, "rho": rel / prm.get("s", 1.0)},
                                                  sp, seed))
    print("# background effect: noise backgrounds (q = 0.5), no shortcut")
    for e in EFFECT_GRID:
        seed += 1
        res["effect_power"].append(run_setting(f"effect G300 B8 K10 @ {e}",
                                               dict(q=0.5, delta=e / (0.94 * 0.5)), sp, seed))
    print("# detectable: simulate at the median detectable of the null runs")
    for name, prm in POWER_DESIGNS[:3]:
        seed += 1
        base = run_setting(f"{name} null (for detectable)", {**prm, "rho": 0.0}, sp, seed)
        d = base["detectable_median"]
        seed += 1
        at = run_setting(f"{name} @ detectable {d:.3f}", {**prm, "rho": d}, sn, seed)
        res["detectable"].append({"design": name, "detectable_median": d, "power_at_detectable": at["flag_rate"],
                                  "sims": sn, "null": base, "at": at})
    res["seconds"] = round(time.perf_counter() - t0, 1)
    res["cpu_seconds"] = round(time.process_time() - c0, 1)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1, default=float) + "\n")
    print(f"wrote {a.out} in {res['seconds']} s ({res['cpu_seconds']} s of CPU)")
    if a.figure:
        figure(res, a.figure)


def figure(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, pts in res["power"].items():
        ax1.plot([0.0] + [p["truth"]["reliance"] for p in pts],
                 [np.nan] + [p["flag_rate"] for p in pts], "o-", label=name)
    ax1.axvline(res["margin"], color="k", ls=":", lw=1)
    ax1.axhline(0.8, color="grey", ls="--", lw=1)
    ax1.axhline(0.05, color="grey", ls="--", lw=1)
    ax1.set_xlabel("true reliance (share of objects following the background's class)")
    ax1.set_ylabel("share flagged `shortcut`")
    ax1.set_title(f"reliance (margin {res['margin']})")
    ax1.legend(fontsize=7)
    pts = res["effect_power"]
    ax2.plot([p["truth"]["effect"] for p in pts], [p["sensitive_rate"] for p in pts], "o-")
    ax2.axvline(res["effect_margin"], color="k", ls=":", lw=1)
    ax2.axhline(0.8, color="grey", ls="--", lw=1)
    ax2.axhline(0.05, color="grey", ls="--", lw=1)
    ax2.set_xlabel("true background effect (SD of accuracy over backgrounds)")
    ax2.set_ylabel("share flagged `sensitive`")
    ax2.set_title(f"background effect, G300 B8 (margin {res['effect_margin']})")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
