"""Calibration of the representation finding (issue 20): ``compare_background``'s flag and interval.

    nice -n 10 python benchmarks/calibrate_layers.py                  # full run (~8 min on one core)
    python benchmarks/calibrate_layers.py --quick                     # a few simulations (the test's scale)
    python benchmarks/calibrate_layers.py --parts cnn                 # the demo's CNNs only (trains 2, ~1 min)
    python benchmarks/calibrate_layers.py --out benchmarks/results/calibrate_layers.json

A generator of its own, not the one of ``calibrate_verdict.py``. Each data set draws G objects with
latent features z_g ~ N(0, I_8), B backgrounds w_b ~ N(0, I_8) from their population (a fresh draw
per data set: the backgrounds are a sample) and a nuisance e_gb ~ N(0, I_8) per image (pose, noise:
what makes one object on one background unlike the rest). A layer of D = 16 units is

    x_gb = act(A z_g + C w_b + E e_gb + mu)        act = identity ("linear") or ReLU ("relu")

with its own weights (A, C, E, mu). Population truths are exact: per unit, the pre-activation parts
are independent Gaussians with variances s_a^2 = sum_j A_uj^2 etc., so the random-effects components
(foreground Var_z E[x | z], background Var_w E[x | w], interaction = the rest) are closed form for
the identity and one Gauss-Hermite integral of the ReLU's Gaussian moments for ReLU (checked against
a 400 x 400 simulation in tests/analyses/test_representation_compare.py).

Against a teacher (``kind="absolute"``; the student fitted to the teacher, so in its units): a
teacher with a = 2 (a learned foreground), a background response reading k = 2 of the 8 background
factors, E at 0.7; a fresh teacher per data set. Students (plus a fitting noise of sd 0.3 per unit
and image, after the activation): ``same`` (the teacher's weights), ``other_factor`` (the same
background weights moved onto 2 other factors: a student that reads another background factor at
equal strength, population ratio exactly 1), ``boundary_other`` / ``boundary_same`` (background
weights scaled so that the population ratio is exactly the margin 1.25, on other / the same
factors), ``weak_fg_0.5`` / ``weak_fg_0.7`` (A times 0.5 / 0.7, nothing else changed) and
``bg_2x`` / ``bg_3x`` (the background weights scaled so that the population ratio is exactly 2 / 3).

Against initialisations (``kind`` in ``within_odds`` = bg / int, ``within_share`` = bg / (bg + int),
``odds`` = bg / (fg + int)): 3 references per data set, each a fresh draw of every weight
(A, C, E ~ N(0, 1/8) entries, mu ~ N(0, 0.1^2): inits vary as real inits do). The reference truth is
the mean of the figure over inits (5,000 weight draws, exact per draw). The model: a trained-like
draw (A times 3: it learned the foreground) whose background weights are scaled so that its
population figure is exactly 1 x (``at_1``) or 1.25 x (``at_margin``) the inits' mean, per kind;
``weak_fg_0.5`` / ``weak_fg_0.7`` (the ``at_1`` model with A times 0.5 / 0.7: for ``odds`` this moves
the truth, which the table shows); ``bg_2x`` / ``bg_3x`` (the ``at_1`` model with its background
component made 2 x / 3 x; the truth ratio of each kind is shown, ``within_share`` is capped at
1 / the inits' share).

Part ``inits5``: the same with 5 inits per data set, at 300 objects x 8 backgrounds.

Level: ``ci_level = 1 - 0.05 / 4`` (Bonferroni over 4 layers, as the audit does for 4 comparisons)
for the flag, and 0.95 for coverage. A data set counts as covered when the population ratio is in
the 0.95 interval or there is no interval (``ratio_ci`` None: the audit claims nothing).

Part ``decomposition``: coverage of ``crossed_decomposition``'s 0.95 intervals of the population
components (the teacher-like layer above, each setting's data sets).

Part ``cnn``: the demo's CNNs (``ShapesCNN`` trained on shapes with random background colours,
"robust", and class-coloured ones, "shortcut", seed 0, 20 epochs as the demo) against 3 seeded
inits (``torch.manual_seed(10_000 + k)``, as ``probekit.experiments.shortcut``) at its 3 conv layers
(average-pooled), on the 150 x 9 crossed split: every kind's ratio, interval and flag.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

from scipy import optimize, stats  # noqa: E402

from probekit.analyses import compare_background  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
P = Q = R_NUIS = 8
D = 16
MARGIN = 1.25
N_LAYERS = 4
LEVEL_FLAG, LEVEL_COVER = 1 - 0.05 / N_LAYERS, 0.95
INIT_KINDS = ("within_odds", "within_share", "odds")
_GH_X, _GH_W = np.polynomial.hermite_e.hermegauss(64)
_GH_W = _GH_W / _GH_W.sum()


# -- weights and exact population components --------------------------------------------------------
def weights(rng: np.random.Generator, a: float = 1.0, c: float = 1.0, s: float = 1.0,
            factors: tuple[int, ...] = tuple(range(Q)), mu_sd: float = 0.1) -> dict[str, np.ndarray]:
    """One layer's weights: A (D, P), C (D, Q) reading only ``factors``, E (D, R), bias mu (D,)."""
    C = np.zeros((D, Q))
    C[:, list(factors)] = rng.normal(size=(D, len(factors))) * c / math.sqrt(len(factors))
    return {"A": rng.normal(size=(D, P)) * a / math.sqrt(P), "C": C,
            "E": rng.normal(size=(D, R_NUIS)) * s / math.sqrt(R_NUIS), "mu": rng.normal(size=D) * mu_sd}


def _m1(m: np.ndarray, s: np.ndarray) -> np.ndarray:
    """E ReLU(N(m, s^2))."""
    s = np.maximum(s, 1e-12)
    return m * stats.norm.cdf(m / s) + s * stats.norm.pdf(m / s)


def _m2(m: np.ndarray, s: np.ndarray) -> np.ndarray:
    """E ReLU(N(m, s^2))^2."""
    s = np.maximum(s, 1e-12)
    return (m * m + s * s) * stats.norm.cdf(m / s) + m * s * stats.norm.pdf(m / s)


def truth(w: dict[str, np.ndarray], act: str, post_sd: float = 0.0) -> np.ndarray:
    """Population (foreground, background, interaction) components, summed over units."""
    sa, sb, sg = ((w[k] ** 2).sum(axis=1) for k in ("A", "C", "E"))
    if act == "linear":
        return np.array([sa.sum(), sb.sum(), sg.sum() + D * post_sd ** 2])
    mu = w["mu"]
    total = _m2(mu, np.sqrt(sa + sb + sg)) - _m1(mu, np.sqrt(sa + sb + sg)) ** 2

    def main_effect(s_own: np.ndarray, s_rest: np.ndarray) -> np.ndarray:
        vals = _m1(mu[:, None] + np.sqrt(s_own)[:, None] * _GH_X[None], np.sqrt(s_rest)[:, None])
        mean = vals @ _GH_W
        return (vals ** 2) @ _GH_W - mean ** 2

    fg, bg = main_effect(sa, sb + sg), main_effect(sb, sa + sg)
    return np.array([fg.sum(), bg.sum(), (total - fg - bg).sum() + D * post_sd ** 2])


FIGURE = {
    "absolute": lambda c: c[1],
    "within_odds": lambda c: c[1] / c[2],
    "within_share": lambda c: c[1] / (c[1] + c[2]),
    "odds": lambda c: c[1] / (c[0] + c[2]),
}


def scaled(w: dict[str, np.ndarray], key: str, f: float) -> dict[str, np.ndarray]:
    return {**w, key: w[key] * f}


def solve_c(w: dict[str, np.ndarray], act: str, target: float, fig: str, post_sd: float = 0.0) -> float | None:
    """The factor on the background weights C that puts the population figure at ``target``."""
    def g(lc: float) -> float:
        return FIGURE[fig](truth(scaled(w, "C", math.exp(lc)), act, post_sd)) - target

    lo, hi = -8.0, 8.0
    if g(lo) * g(hi) > 0:
        return None
    return math.exp(optimize.brentq(g, lo, hi, xtol=1e-10))


def init_reference(act: str, n: int = 20_000, seed: int = 11) -> dict[str, float]:
    """The inits' mean figure per kind (exact components per weight draw, averaged over draws)."""
    rng = np.random.default_rng([seed, act == "relu"])
    comps = np.array([truth(weights(rng), act) for _ in range(n)])
    return {k: float(np.mean([FIGURE[k](c) for c in comps])) for k in INIT_KINDS}


# -- data ---------------------------------------------------------------------------------------------
def rows(w: dict[str, np.ndarray], act: str, z: np.ndarray, wb: np.ndarray, e: np.ndarray,
         rng: np.random.Generator | None = None, post_sd: float = 0.0) -> np.ndarray:
    """The layer's rows on the crossed split, (G * B, D), foreground-major."""
    x = (z @ w["A"].T)[:, None] + (wb @ w["C"].T)[None] + e @ w["E"].T + w["mu"]
    if act == "relu":
        x = np.maximum(x, 0.0)
    if post_sd:
        x = x + post_sd * rng.normal(size=x.shape)
    return x.reshape(-1, D)


def _record(r, truth_ratio: float | None, cover) -> dict:
    return {"flag": bool(r.flagged), "has_ci": r.ratio_ci is not None, "ratio": r.ratio, "truth": truth_ratio,
            "covered": cover}


def _covered(r95, t: float | None) -> bool | None:
    if t is None:
        return None
    return True if r95.ratio_ci is None else bool(r95.ratio_ci[0] <= t <= r95.ratio_ci[1])


def _compare(X, refs, g, b, kind: str, t: float) -> dict:
    """The flag at the Bonferroni level and coverage at 0.95 (on the log scale the 0.95 interval
    follows from the same standard error and df; Fieller's is computed again)."""
    r = compare_background(X, refs, g, b, kind=kind, ci_level=LEVEL_FLAG)
    if r.scale == "log":
        q_f, q_c = (stats.t.ppf(0.5 + lv / 2, r.df) for lv in (LEVEL_FLAG, LEVEL_COVER))
        half = math.log(r.ratio_ci[1] / r.ratio_ci[0]) / 2 * q_c / q_f
        covered = bool(abs(math.log(t / r.ratio)) <= half) if r.ratio > 0 else False
    else:
        covered = _covered(compare_background(X, refs, g, b, kind=kind, ci_level=LEVEL_COVER), t)
    return _record(r, t, covered)


def teacher_scenarios(rng: np.random.Generator, act: str) -> dict[str, tuple[dict, float]]:
    """Students against a fresh teacher: weights and the exact population ratio of ``absolute``."""
    T = weights(rng, a=2.0, s=0.7, factors=(0, 1))
    t_bg = truth(T, act)[1]
    other = {**T, "C": np.roll(T["C"], 2, axis=1)}  # the same background weights on factors 2, 3
    out = {"same": (T, 1.0), "other_factor": (other, 1.0)}
    for name, base in (("boundary_other", other), ("boundary_same", T)):
        f = solve_c(base, act, MARGIN * t_bg, "absolute", 0.3)
        out[name] = (scaled(base, "C", f), MARGIN)
    for f in (0.5, 0.7):
        S = scaled(T, "A", f)
        out[f"weak_fg_{f}"] = (S, truth(S, act, 0.3)[1] / t_bg)
    for k in (2.0, 3.0):
        out[f"bg_{k:g}x"] = (scaled(T, "C", solve_c(T, act, k * t_bg, "absolute", 0.3)), k)
    return {"teacher": (T, 1.0), **out}


_POOL = 10  # weight sets (and their solved scenarios) per activation, reused across data sets
_CACHE: dict = {}


def _pooled(what: str, act: str, seed: int, make) -> dict:
    key = (what, act, seed % _POOL)
    if key not in _CACHE:
        _CACHE[key] = make(np.random.default_rng([seed % _POOL, act == "relu", what == "teacher"]))
    return _CACHE[key]


def run_teacher(G: int, B: int, act: str, seed: int) -> dict[str, dict]:
    rng = np.random.default_rng([seed, G, B, act == "relu", 1])
    sc = _pooled("teacher", act, seed, lambda r: teacher_scenarios(r, act))
    z, wb, e = rng.normal(size=(G, P)), rng.normal(size=(B, Q)), rng.normal(size=(G, B, R_NUIS))
    g, b = np.repeat(np.arange(G), B), np.tile(np.arange(B), G)
    Xt = rows(sc["teacher"][0], act, z, wb, e)
    out = {}
    for name, (S, t) in sc.items():
        if name == "teacher":
            continue
        out[name] = _compare(rows(S, act, z, wb, e, rng, post_sd=0.3), [Xt], g, b, "absolute", t)
    return out


def run_inits(G: int, B: int, act: str, seed: int, ref: dict[str, float], n_inits: int = 3) -> dict[str, dict]:
    rng = np.random.default_rng([seed, G, B, act == "relu", 2])
    z, wb, e = rng.normal(size=(G, P)), rng.normal(size=(B, Q)), rng.normal(size=(G, B, R_NUIS))
    g, b = np.repeat(np.arange(G), B), np.tile(np.arange(B), G)
    inits = [rows(weights(rng), act, z, wb, e) for _ in range(n_inits)]
    out: dict[str, dict] = {}
    for name, (kind, M, t) in _pooled("inits", act, seed, lambda r: init_scenarios(r, act, ref)).items():
        out[name] = _compare(rows(M, act, z, wb, e), inits, g, b, kind, t)
    return out


def init_scenarios(rng: np.random.Generator, act: str, ref: dict[str, float]) -> dict[str, tuple]:
    """Models against inits, per kind: (kind, weights, exact population ratio)."""
    base = weights(rng, a=3.0)
    out = {}
    for kind in INIT_KINDS:
        f1 = solve_c(base, act, ref[kind], kind)
        models = {}
        if f1 is None:
            continue
        m1 = scaled(base, "C", f1)
        models["at_1"] = m1
        fm = solve_c(base, act, MARGIN * ref[kind], kind)
        if fm is not None:
            models["at_margin"] = scaled(base, "C", fm)
        for f in (0.5, 0.7):
            models[f"weak_fg_{f}"] = scaled(m1, "A", f)
        bg1 = truth(m1, act)[1]
        for k in (2.0, 3.0):
            fk = solve_c(m1, act, k * bg1, "absolute")
            models[f"bg_{k:g}x"] = scaled(m1, "C", fk)
        for name, M in models.items():
            out[f"{kind}:{name}"] = (kind, M, FIGURE[kind](truth(M, act)) / ref[kind])
    return out


def summarise(recs: list[dict]) -> dict:
    cov = [r["covered"] for r in recs if r["covered"] is not None]
    ratios = [r["ratio"] for r in recs if r["ratio"] is not None]
    return {"n": len(recs), "flag_rate": float(np.mean([r["flag"] for r in recs])),
            "coverage": float(np.mean(cov)) if cov else None,
            "no_interval": float(np.mean([not r["has_ci"] for r in recs])),
            "truth": float(np.mean([r["truth"] for r in recs])),
            "median_ratio": float(np.median(ratios)) if ratios else None}


def run_decomposition(G: int, B: int, act: str, sims: int) -> dict:
    """Coverage of crossed_decomposition's 0.95 intervals of the population components (a teacher-like
    layer, a fresh draw of objects and backgrounds per data set, 10 weight sets)."""
    from probekit.analyses import crossed_decomposition

    hits = np.zeros(4)
    for s in range(sims):
        rng = np.random.default_rng([5, s, G, B, act == "relu"])
        w = weights(np.random.default_rng([6, s % _POOL]), a=2.0, s=0.7, factors=(0, 1))
        t = truth(w, act)
        z, wb, e = rng.normal(size=(G, P)), rng.normal(size=(B, Q)), rng.normal(size=(G, B, R_NUIS))
        r = crossed_decomposition(rows(w, act, z, wb, e), np.repeat(np.arange(G), B), np.tile(np.arange(B), G))
        cis = (r.foreground_ci, r.background_ci, r.interaction_ci, r.background_share_ci)
        hits += [lo <= v <= hi for v, (lo, hi) in zip((*t, t[1] / t.sum()), cis, strict=True)]
    return dict(zip(("foreground", "background", "interaction", "background_share"), (hits / sims).tolist(), strict=True))


# -- the demo's CNNs ------------------------------------------------------------------------------------
def run_cnn(epochs: int = 20, seed: int = 0) -> dict:
    import torch

    from probekit.datasets._shapes import Shapes
    from probekit.experiments.shortcut import ShapesCNN, train_shapes_cnn

    torch.set_num_threads(1)
    nets = {"robust": train_shapes_cnn("random", seed=seed, epochs=epochs),
            "shortcut": train_shapes_cnn("class", seed=seed, epochs=epochs)}
    for k in range(3):
        torch.manual_seed(10_000 + k)
        nets[f"init{k}"] = ShapesCNN().eval()
    data = Shapes("crossed", seed=seed, n_backgrounds=9)
    items = [data.item(i) for i in range(len(data))]
    x = torch.from_numpy(np.stack([it["x"] for it in items]))
    g, b = np.array([it["group"] for it in items]), np.array([it["background"] for it in items])
    acts: dict[str, dict[int, np.ndarray]] = {}
    for name, net in nets.items():
        got: dict[int, np.ndarray] = {}
        h = x
        with torch.no_grad():
            for i, module in enumerate(net.features):
                h = module(h)
                if i in (0, 3, 6):  # the conv layers, average-pooled as the audit extracts them
                    got[i] = h.mean(dim=(2, 3)).double().numpy()
        acts[name] = got
    out: dict = {"n_objects": int(g.max() + 1), "n_backgrounds": int(b.max() + 1), "epochs": epochs, "layers": {}}
    for layer in (0, 3, 6):
        refs = [acts[f"init{k}"][layer] for k in range(3)]
        for m in ("robust", "shortcut"):
            for kind in INIT_KINDS:
                r = compare_background(acts[m][layer], refs, g, b, kind=kind, ci_level=1 - 0.05 / 3)
                out["layers"].setdefault(f"features.{layer}", {}).setdefault(m, {})[kind] = {
                    "ratio": r.ratio, "ci": r.ratio_ci, "flagged": r.flagged, "value": r.value,
                    "reference": r.reference, "reason": r.reason}
    return out


# -- main -------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="few settings and simulations (the test's scale)")
    ap.add_argument("--sims", type=int, default=None,
                    help="data sets per setting (default 100, 40 for the two largest; quick 5)")
    ap.add_argument("--parts", default="teacher,inits,inits5,decomposition,cnn")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "calibrate_layers.json"))
    args = ap.parse_args(argv)
    if args.quick:
        grid = {(30, 8): 5, (300, 3): 5, (300, 8): 5}
    else:
        grid = {(30, 8): 100, (100, 8): 100, (300, 3): 100, (300, 8): 100, (300, 16): 40, (1000, 8): 40}
    if args.sims:
        grid = {k: args.sims for k in grid}
    acts = ("linear", "relu")
    parts = args.parts.split(",")
    t0 = time.perf_counter()
    res: dict = {"config": {"sims": {f"G{G}/B{B}": n for (G, B), n in grid.items()}, "level_flag": LEVEL_FLAG,
                            "level_cover": LEVEL_COVER,
                            "margin": MARGIN, "units": D, "quick": args.quick}, "teacher": {}, "inits": {}}
    if "teacher" in parts:
        for act in acts:
            for (G, B), sims in grid.items():
                recs: dict[str, list] = {}
                for s in range(sims):
                    for k, v in run_teacher(G, B, act, s).items():
                        recs.setdefault(k, []).append(v)
                res["teacher"][f"{act}/G{G}/B{B}"] = {k: summarise(v) for k, v in recs.items()}
                print(f"teacher {act} G={G} B={B} {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    if "inits" in parts:
        refs = {act: init_reference(act, n=2_000 if args.quick else 5_000) for act in acts}
        res["config"]["init_reference"] = refs
        for act in acts:
            for (G, B), sims in grid.items():
                recs = {}
                for s in range(sims):
                    for k, v in run_inits(G, B, act, s, refs[act]).items():
                        recs.setdefault(k, []).append(v)
                res["inits"][f"{act}/G{G}/B{B}"] = {k: summarise(v) for k, v in recs.items()}
                print(f"inits {act} G={G} B={B} {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    if "inits5" in parts:  # the same with 5 inits, at 300 objects x 8 backgrounds
        refs = res["config"].get("init_reference") or {act: init_reference(act, n=2_000 if args.quick else 5_000)
                                                       for act in acts}
        res["inits5"] = {}
        for act in acts:
            n = grid.get((300, 8), 5)
            recs = {}
            for s in range(n):
                for k, v in run_inits(300, 8, act, s, refs[act], n_inits=5).items():
                    recs.setdefault(k, []).append(v)
            res["inits5"][f"{act}/G300/B8"] = {k: summarise(v) for k, v in recs.items()}
    if "decomposition" in parts:
        res["decomposition"] = {f"{act}/G{G}/B{B}": run_decomposition(G, B, act, n) for act in acts
                                for (G, B), n in grid.items()}
    if "cnn" in parts:
        res["cnn"] = run_cnn(epochs=3 if args.quick else 20)
    res["config"]["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print("\n".join(tables(res)))
    return res


def tables(res: dict) -> list[str]:
    """Markdown tables: flag rate (coverage of the 0.95 interval; share without interval) per setting."""
    lines = []
    for part in ("teacher", "inits", "inits5"):
        for act in ("linear", "relu"):
            cells = {k: v for k, v in res.get(part, {}).items() if k.startswith(act)}
            if not cells:
                continue
            keys = sorted({k for cell in cells.values() for k in cell})
            lines += ["", f"### {part}, {act}: flag rate at level {res['config']['level_flag']:.4g} "
                          "(coverage of the 0.95 interval; share without interval)", "",
                      "| scenario | truth | " + " | ".join(c.split("/", 1)[1] for c in cells) + " |",
                      "|---|---|" + "---|" * len(cells)]
            for k in keys:
                row = [cells[c].get(k) for c in cells]
                t = next(c["truth"] for c in row if c)
                lines.append(f"| {k} | {t:.2f} | " + " | ".join(
                    "–" if c is None else f"{100 * c['flag_rate']:.0f} % ({100 * (c['coverage'] or 0):.0f}; "
                    f"{100 * c['no_interval']:.0f})" for c in row) + " |")
    if res.get("decomposition"):
        lines += ["", "### crossed_decomposition: coverage of the 0.95 intervals (population components)", "",
                  "| setting | foreground | background | interaction | background share |", "|---|---|---|---|---|"]
        lines += [f"| {k} | " + " | ".join(f"{100 * v:.0f} %" for v in c.values()) + " |"
                  for k, c in res["decomposition"].items()]
    if res.get("cnn"):
        lines += ["", "### the demo's CNNs against 3 seeded inits (ratio [interval], flagged)", "",
                  "| layer | model | " + " | ".join(INIT_KINDS) + " |", "|---|---|" + "---|" * len(INIT_KINDS)]
        for layer, ms in res["cnn"]["layers"].items():
            for m, ks in ms.items():
                lines.append(f"| {layer} | {m} | " + " | ".join(
                    "–" if v["ratio"] is None else f"{v['ratio']:.2f} " + (
                        f"[{v['ci'][0]:.2f}, {v['ci'][1]:.2f}]" if v["ci"] else "[–]") + (" **flag**" if v["flagged"]
                                                                                       else "")
                    for v in ks.values()) + " |")
    return lines


if __name__ == "__main__":
    main()
