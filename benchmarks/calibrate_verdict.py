"""Calibration evidence for the audit's verdict (issue 14, item 6): false flags, power, coverage.

    python benchmarks/calibrate_verdict.py                      # full run (200 simulations per setting)
    python benchmarks/calibrate_verdict.py --quick              # a few simulations (what the test runs)
    python benchmarks/calibrate_verdict.py --sims 400 --jobs 2 --out benchmarks/results/calibrate_verdict.json
    python benchmarks/calibrate_verdict.py --analyses HEAD      # NMS / probe from the committed analyses/
    python benchmarks/calibrate_verdict.py --parts behaviour --G 600 --sims 50 --out part.json   # one part
    python benchmarks/calibrate_verdict.py --merge part1.json part2.json --out all.json          # combine

Simulates datasets whose population truth is known and runs the audit's functions on them with the
audit's defaults, writing JSON and printing markdown tables:

1. Behaviour flag, ``background_behaviour`` (n_boot 500, n_perm 200, threshold 0.05; flagged = pull
   CI low end > threshold and permutation p < 0.05) on a crossed split of G foregrounds x B = 8
   backgrounds, K classes. Foreground g has a true class y_g (uniform) and a base prediction f_g
   (right with probability ``acc`` = 0.8, else a uniformly random other class). Background b came
   from an image of class c_b = b mod K (``background_label``; fixed: the split's backgrounds).

   - null: pred_gb = f_g (ignores the background);
   - ambiguous: a share ``amb`` of foregrounds (Bernoulli per foreground) are unsure: on each
     background, with probability ``q`` = 0.5, their prediction is a random other class than f_g;
   - shortcut s: with probability s per row the prediction is c_b instead of the base prediction.

   Population truths (infinitely many foregrounds, the split's backgrounds fixed), analytic:
   pull = s (1 - sum_c p_c^2) with p the distribution of c_b over the backgrounds (h_b - pooled =
   s (delta_{c_b} - p) whatever the base predictions' distribution); flip rate = 1 - E_g sum_v
   prod_b P(pred_gb = v | g); follows background = P(pred = c_b | c_b != y) (exact sums).
   ``test_calibration.py`` checks them against a 20,000-foreground simulation.

2. Layer flag, ``compare_background`` (n_boot 500, ci_level 0.95: a single comparison, no
   Bonferroni) and the coverage of ``crossed_decomposition``'s component intervals (n_boot 200).
   Layers of d = 16 units: x_gb = a fg_g + c bg_b + noise, fg_g ~ N(0, I), bg_b ~ N(0, I) drawn once
   per dataset and then *fixed*, noise ~ N(0, I). The decomposition resamples foregrounds only, so
   its intervals are for the truth conditional on the split's backgrounds: foreground component
   a^2 d (random foregrounds: population variance), background component c^2 sum_u sum_b (bg_bu -
   mean_b bg_bu)^2 / (B - 1) (the fixed effects' variance, B - 1 divisor, which the ANOVA estimates
   without bias), interaction d (the noise).
   ``absolute``: teacher a = 1, c = 0.3; students with ratio truth 1 (``weaker_fg`` a = 0.5; ``same``
   = the teacher's effects with independent noise) and planted students whose background
   *component* is k x the teacher's (background response scaled by sqrt(k); the flag's margin 1.25
   is on the component), k in (1, 1.1, 1.25, 1.5, 2, 3). ``odds``: 3 references (initialisations:
   foreground and background maps rotated by independent random orthogonal matrices, overall scales
   0.5, 1, 2), so the odds bg / (fg + int) of each reference equals the teacher-like model's at k = 1;
   planted k multiplies the model's odds by k.

3. ``normalized_mean_shift`` interval coverage (n = 400 rows a family, 20 units, n_boot 200) at true
   NMS 0.0025 and 0.05, paired (x_a = f + e_a, x_b = f + delta + e_b, var f = 0.8, var e = 0.2) and
   unpaired; and ``probe_id_ood``'s gap interval with paired rows (a fixed "probe" that reads its
   prediction from column 0, so the simulated correctness is exact; truth = P(correct ID) - P(correct OOD)).

4. Alternatives to the pull's interval, computed from the same simulated data with the same
   permutation and bootstrap scheme (replicates vectorised here, not the function's RNG stream):
   ``current`` (what the function does: percentiles of the bootstrap TV re-centred on TV - null mean),
   ``boot_bc`` (bootstrap bias correction: centre 2 TV - mean TV*, the same spread), ``basic`` (the
   reflected interval [2 TV - q_hi, 2 TV - q_lo] of the bootstrap TV*), ``raw_percentile``
   (percentiles of TV*, no correction) and ``cellwise``
   (each cell's |h_bc - pooled_c| corrected by the folded-normal bias E|mu + sigma Z| - |mu| at
   mu^2 = max(D^2 - sigma^2, 0), sigma from the within-foreground permutations; the same spread),
   ``cellwise_boot`` (the same with sigma from the foreground bootstrap), ``union`` (the hull of
   ``current`` and ``boot_bc``) and ``crossfit`` (sum_b share_b 1/2 sum_c sign(D^A_bc) D^B_bc over
   random halves A, B of the foregrounds, both orders, 20 splits; unbiased at no pull, its bias
   vanishing as the signal grows; interval: its own bootstrap, one split a replicate, re-centred)
   and ``pretest`` (``current`` while the permutation p-value is >= 0.05, ``boot_bc`` once below).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from io import BytesIO
from pathlib import Path

import numpy as np

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

from scipy.special import erf  # noqa: E402
from sklearn.base import BaseEstimator, ClassifierMixin  # noqa: E402

from probekit.analyses import background_behaviour, compare_background, crossed_decomposition  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
B_DEFAULT = 8
S_GRID = (0.02, 0.05, 0.1, 0.2, 0.4, 1.0)
K_GRID = (1.0, 1.1, 1.25, 1.5, 2.0, 3.0)
ACC, AMB_Q = 0.8, 0.5
BEH_BOOT, BEH_PERM = 500, 200  # the audit's defaults
LAYER_BOOT, DECOMP_BOOT = 500, 200  # compare_background: min(500, n_boot); crossed_decomposition: 200


# =================================================================================================
# analyses source (working tree, or a committed revision for the intervals other agents are fixing)
# =================================================================================================
_ANALYSES: dict[str, object] = {}


def analyses_module(rev: str = "worktree"):
    """``probekit.analyses`` (rev "worktree") or the ``analyses/`` package of a git revision."""
    if rev == "worktree":
        import probekit.analyses as mod

        return mod
    if rev in _ANALYSES:
        return _ANALYSES[rev]
    data = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "analyses"], check=True,
                          capture_output=True).stdout
    tmp = Path(tempfile.mkdtemp(prefix="calib_analyses_"))
    with tarfile.open(fileobj=BytesIO(data)) as tf:
        tf.extractall(tmp, filter="data")
    name = "_calib_analyses_" + hashlib.sha1(rev.encode()).hexdigest()[:8]
    spec = importlib.util.spec_from_file_location(name, tmp / "analyses" / "__init__.py",
                                                  submodule_search_locations=[str(tmp / "analyses")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    _ANALYSES[rev] = mod
    return mod


def provenance(rev: str) -> dict:
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(ROOT), *a], check=True, capture_output=True,
                                  text=True).stdout.strip()
        except Exception:  # pragma: no cover - not a checkout
            return ""

    return {"head": git("rev-parse", "HEAD"), "analyses_source": rev,
            "analyses_dirty": git("status", "--porcelain", "analyses"), "python": sys.version.split()[0],
            "numpy": np.__version__}


# =================================================================================================
# 1. behaviour
# =================================================================================================
def bg_labels(B: int, K: int) -> np.ndarray:
    return np.arange(B) % K


def simulate_behaviour(rng: np.random.Generator, G: int, B: int, K: int, *, s: float = 0.0,
                       amb: float = 0.0, q: float = AMB_Q, acc: float = ACC) -> dict:
    """One crossed split: rows g-major (row g*B + b). Returns pred, group, background, label, bl, P (G, B)."""
    y = rng.integers(0, K, G)
    f = np.where(rng.random(G) < acc, y, (y + rng.integers(1, K, G)) % K)
    base = np.repeat(f[:, None], B, axis=1)
    if amb > 0:
        unsure = (rng.random(G) < amb)[:, None] & (rng.random((G, B)) < q)
        base = np.where(unsure, (base + rng.integers(1, K, (G, B))) % K, base)
    c = bg_labels(B, K)
    P = np.where(rng.random((G, B)) < s, c[None, :], base) if s > 0 else base
    gi = np.repeat(np.arange(G), B)
    bi = np.tile(np.arange(B), G)
    return {"pred": P.reshape(-1), "group": gi, "background": bi, "label": y[gi], "bl": c[bi], "P": P}


def truth_behaviour(B: int, K: int, *, s: float = 0.0, amb: float = 0.0, q: float = AMB_Q,
                    acc: float = ACC) -> dict:
    """Population pull, flip rate and follows-background share for the split's fixed backgrounds."""
    c = bg_labels(B, K)
    p = np.bincount(c, minlength=K) / B
    pull = s * (1.0 - float(p @ p))
    eye = np.eye(K)
    # P(base_b = v | f, unsure): rows f, columns v
    base = {0: eye, 1: (1 - q) * eye + q / (K - 1) * (1 - eye)} if K > 1 else {0: eye, 1: eye}
    # P(f | y)
    pfy = acc * eye + (1 - acc) / (K - 1) * (1 - eye)
    pf = np.full(K, 1.0 / K)  # f is uniform: y uniform, errors symmetric
    const = 0.0
    for a_state, w in ((0, 1 - amb), (1, amb)):
        if w == 0:
            continue
        for fv in range(K):
            pv = (1 - s) * base[a_state][fv][None, :] + s * eye[c]  # (B, K): P(pred_b = v)
            const += w * pf[fv] * float(np.prod(pv, axis=0).sum())
    flip = 1.0 - const
    # follows: sum_b sum_{y != c_b} P(y) P(pred = c_b | y) / sum_b P(y != c_b)
    pb_given_f = (1 - amb) * base[0] + amb * base[1]  # P(base = v | f)
    pby = pfy @ pb_given_f  # P(base = v | y)
    num = den = 0.0
    for cb in c:
        for yv in range(K):
            if yv == cb:
                continue
            num += (s + (1 - s) * pby[yv, cb]) / K
            den += 1.0 / K
    return {"pull": pull, "flip_rate": flip, "follows_background": num / den}


# -- vectorised TV, null and bootstrap for the interval alternatives ------------------------------
def _hist(P: np.ndarray, K: int, W: np.ndarray | None = None) -> np.ndarray:
    """Class histograms per background: (B, K) counts, or (R, B, K) with foreground weights W (R, G)."""
    G, B = P.shape
    onehot = np.zeros((G, B * K))
    onehot[np.arange(G)[:, None], np.arange(B)[None, :] * K + P] = 1.0
    if W is None:
        return onehot.sum(axis=0).reshape(B, K)
    return (W @ onehot).reshape(W.shape[0], B, K)


def _dev(C: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """h_b - pooled per cell (..., B, K) and the background shares (..., B)."""
    nb = C.sum(axis=-1)
    pooled = C.sum(axis=-2) / nb.sum(axis=-1)[..., None]
    return C / nb[..., None] - pooled[..., None, :], nb / nb.sum(axis=-1)[..., None]


def _tv(C: np.ndarray) -> np.ndarray:
    D, share = _dev(C)
    return (share * 0.5 * np.abs(D).sum(axis=-1)).sum(axis=-1)


def _folded_bias(mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """E|mu + sigma Z| - |mu| for Z ~ N(0, 1)."""
    sig = np.maximum(sigma, 1e-12)
    m = np.abs(mu)
    e = sig * math.sqrt(2 / math.pi) * np.exp(-m ** 2 / (2 * sig ** 2)) + m * erf(m / (sig * math.sqrt(2)))
    return np.where(sigma > 0, e - m, 0.0)


def pull_alternatives(P: np.ndarray, K: int, rng: np.random.Generator, n_boot: int = BEH_BOOT,
                      n_perm: int = BEH_PERM, level: float = 0.95) -> dict:
    """Estimates and intervals of the pull by the function's scheme and two alternatives."""
    G, B = P.shape
    C = _hist(P, K)
    tv = float(_tv(C))
    # within-foreground shuffles of the backgrounds
    perm = np.argsort(rng.random((n_perm, G, B)), axis=2)
    Pp = np.take_along_axis(np.broadcast_to(P, (n_perm, G, B)), perm, axis=2)
    Cp = np.zeros((n_perm, B * K))
    np.add.at(Cp, (np.repeat(np.arange(n_perm), G * B), (np.tile(np.arange(B), n_perm * G) * K
                                                            + Pp.reshape(-1))), 1.0)
    Cp = Cp.reshape(n_perm, B, K)
    null = _tv(Cp)
    Dp, _ = _dev(Cp)
    sigma = np.sqrt((Dp ** 2).mean(axis=0))  # (B, K): the cell's noise sd under no pull
    W = np.stack([np.bincount(rng.integers(0, G, G), minlength=G) for _ in range(n_boot)]).astype(float)
    tvb = _tv(_hist(P, K, W))
    a = (1 - level) / 2
    spread = np.quantile(tvb - tvb.mean(), [a, 1 - a])
    D, share = _dev(C)
    Cb = _hist(P, K, W)
    Db, _ = _dev(Cb)
    sigma_b = Db.std(axis=0)  # (B, K): the cell's sampling sd, from the foreground bootstrap

    def cellwise(sig: np.ndarray) -> float:
        mu = np.sqrt(np.maximum(D ** 2 - sig ** 2, 0.0))
        return float((share * 0.5 * (np.abs(D) - _folded_bias(mu, sig)).sum(axis=1)).sum())

    out = {}
    for name, centre in (("current", tv - float(null.mean())), ("boot_bc", 2 * tv - float(tvb.mean())),
                         ("cellwise", cellwise(sigma)), ("cellwise_boot", cellwise(sigma_b))):
        out[name] = (centre, (centre + spread[0], centre + spread[1]))
    q = np.quantile(tvb, [a, 1 - a])  # basic (reflected) interval about TV, the bootstrap world's truth
    out["basic"] = (2 * tv - float(tvb.mean()), (2 * tv - q[1], 2 * tv - q[0]))
    # cross-fitted TV: sum_b share_b 1/2 sum_c sign(D^A_bc) D^B_bc over random halves A, B of the
    # foregrounds (both orders); the sign comes from noise independent of the value, so the estimate
    # is unbiased when there is no pull and its bias vanishes as the signal grows
    def crossfit(Wt: np.ndarray, masks: np.ndarray) -> np.ndarray:
        Ca, Cb2 = _hist(P, K, Wt * masks), _hist(P, K, Wt * (1 - masks))
        Da, sa = _dev(Ca)
        Db2, sb = _dev(Cb2)
        sh = 0.5 * (sa + sb)
        return (sh * 0.25 * (np.sign(Da) * Db2 + np.sign(Db2) * Da).sum(axis=-1)).sum(axis=-1)

    def halves(R: int) -> np.ndarray:
        return (np.argsort(rng.random((R, G)), axis=1) < G // 2).astype(float)

    cf = float(crossfit(np.ones((20, G)), halves(20)).mean())
    cfb = crossfit(W, halves(n_boot))
    sp = np.quantile(cfb - cfb.mean(), [a, 1 - a])
    out["crossfit"] = (cf, (cf + sp[0], cf + sp[1]))
    # pre-test: the function's interval while the permutation test sees no pull, boot_bc once it does
    p_value = (1 + np.sum(null >= tv)) / (1 + n_perm)
    out["pretest"] = out["boot_bc"] if p_value < 1 - level else out["current"]
    cur, bc = out["current"], out["boot_bc"]
    out["union"] = (0.5 * (cur[0] + bc[0]), (min(cur[1][0], bc[1][0]), max(cur[1][1], bc[1][1])))
    # the function's spread, studentised-free "percentile of TV*" (no re-centring) for reference
    out["raw_percentile"] = (tv, tuple(np.quantile(tvb, [a, 1 - a])))
    return out


def run_behaviour_sim(args: tuple) -> dict:
    _kind, G, B, K, s, amb, sim, alternatives = args
    rng = np.random.default_rng([14, 6, G, B, K, int(1000 * s), int(1000 * amb), sim])
    d = simulate_behaviour(rng, G, B, K, s=s, amb=amb)
    r = background_behaviour(d["pred"], d["group"], d["background"], label=d["label"],
                             background_label=d["bl"], n_boot=BEH_BOOT, n_perm=BEH_PERM, threshold=0.05,
                             random_state=sim)
    out = {"flagged": r.flagged, "pull": r.pull, "pull_ci": r.pull_ci, "pull_p": r.pull_p_value,
           "flip": r.flip_rate, "flip_ci": r.flip_rate_ci, "fb": r.follows_background,
           "fb_ci": r.follows_background_ci}
    if alternatives:
        out["alt"] = pull_alternatives(d["P"], K, rng)
    return out


def run_alternatives_sim(args: tuple) -> dict:
    """The pull interval alternatives alone (no call of background_behaviour): cheap, for the null too."""
    G, B, K, s, amb, sim = args
    rng = np.random.default_rng([14, 65, G, B, K, int(1000 * s), int(1000 * amb), sim])
    d = simulate_behaviour(rng, G, B, K, s=s, amb=amb)
    return {"alt": pull_alternatives(d["P"], K, rng)}


def summarise_alternatives(st: dict, res: list[dict], B: int) -> dict:
    t = truth_behaviour(B, st["K"], s=st["s"], amb=st["amb"])
    alt = {}
    for name in res[0]["alt"]:
        est = np.array([r["alt"][name][0] for r in res])
        cis = [r["alt"][name][1] for r in res]
        ci = np.array(cis)
        alt[name] = {"bias": float(est.mean() - t["pull"]),
                     "bias_se": float(est.std(ddof=1) / math.sqrt(len(est))) if len(est) > 1 else None,
                     "coverage": _rate(_cover(cis, t["pull"])),
                     "low_end_above_truth": float(np.mean(ci[:, 0] > t["pull"] + 1e-12)),
                     "high_end_below_truth": float(np.mean(ci[:, 1] < t["pull"] - 1e-12)),
                     "low_end_above_0.05": _rate(ci[:, 0] > 0.05), "width": float(np.mean(ci[:, 1] - ci[:, 0]))}
    return dict(st, B=B, sims=len(res), truth_pull=t["pull"], alternatives=alt)


def _rate(x: np.ndarray) -> dict:
    n = int(x.size)
    p = float(np.mean(x)) if n else float("nan")
    return {"rate": p, "se": math.sqrt(max(p * (1 - p), 0.25 / max(n, 1) ** 2) / max(n, 1)) if n else None,
            "n": n}


def _cover(ci: list, truth: float) -> np.ndarray:
    return np.array([lo - 1e-12 <= truth <= hi + 1e-12 for lo, hi in ci])


def behaviour_settings(quick: bool, Gs: tuple[int, ...] | None = None,
                       Ks: tuple[int, ...] | None = None) -> list[dict]:
    Gs = Gs or ((100,) if quick else (100, 300, 600))
    Ks = Ks or ((10,) if quick else (3, 10))
    out = []
    for G in Gs:
        for K in Ks:
            out.append({"kind": "null", "G": G, "K": K, "s": 0.0, "amb": 0.0})
            for amb in (0.1, 0.3):
                out.append({"kind": "ambiguous", "G": G, "K": K, "s": 0.0, "amb": amb})
            for s in S_GRID:
                out.append({"kind": "shortcut", "G": G, "K": K, "s": s, "amb": 0.0})
    return out


def summarise_behaviour(st: dict, res: list[dict], B: int) -> dict:
    t = truth_behaviour(B, st["K"], s=st["s"], amb=st["amb"])
    flagged = np.array([r["flagged"] for r in res])
    pull = np.array([r["pull"] for r in res])
    row = dict(st, B=B, sims=len(res), truth=t, flag=_rate(flagged),
               pull_mean=float(pull.mean()), pull_bias=float(pull.mean() - t["pull"]),
               pull_bias_se=float(pull.std(ddof=1) / math.sqrt(len(pull))) if len(pull) > 1 else None,
               pull_sd=float(pull.std(ddof=1)) if len(pull) > 1 else None,
               pull_ci_width=float(np.mean([hi - lo for lo, hi in (r["pull_ci"] for r in res)])),
               coverage={"pull": _rate(_cover([r["pull_ci"] for r in res], t["pull"])),
                         "flip_rate": _rate(_cover([r["flip_ci"] for r in res], t["flip_rate"]))})
    fb = [r["fb_ci"] for r in res if r["fb_ci"] is not None]
    if fb:
        row["coverage"]["follows_background"] = _rate(_cover(fb, t["follows_background"]))
    # coverage misses by side for the pull: truth below the interval (too high) / above (too low)
    ci = np.array([r["pull_ci"] for r in res])
    row["pull_miss_low_end_above_truth"] = float(np.mean(ci[:, 0] > t["pull"] + 1e-12))
    row["pull_miss_high_end_below_truth"] = float(np.mean(ci[:, 1] < t["pull"] - 1e-12))
    with_alt = [r for r in res if "alt" in r]
    if with_alt:
        alt = {}
        row["pull_alternatives_sims"] = len(with_alt)
        for name in with_alt[0]["alt"]:
            est = np.array([r["alt"][name][0] for r in with_alt])
            cis = [r["alt"][name][1] for r in with_alt]
            alt[name] = {"bias": float(est.mean() - t["pull"]), "coverage": _rate(_cover(cis, t["pull"])),
                         "flag": _rate(np.array([lo > 0.05 for lo, _ in cis]))}
        row["pull_alternatives"] = alt
    return row


# =================================================================================================
# 2. layers: compare_background and crossed_decomposition
# =================================================================================================
def _orth(rng: np.random.Generator, d: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def simulate_layers(rng: np.random.Generator, G: int, B: int, d: int, *, a_student: float = 1.0,
                    k: float = 1.0, c: float = 0.3, n_refs: int = 3) -> dict:
    """Teacher, student, an odds model and its references on one crossed split (rows g-major)."""
    fg = rng.standard_normal((G, 1, d))
    bg = rng.standard_normal((1, B, d))  # the split's backgrounds: fixed once drawn

    def noise() -> np.ndarray:
        return rng.standard_normal((G, B, d))

    teacher = fg + c * bg + noise()
    student = a_student * fg + math.sqrt(k) * c * bg + noise()
    refs = []
    for scale in (0.5, 1.0, 2.0)[:n_refs]:
        M, Mb = _orth(rng, d), _orth(rng, d)
        refs.append(scale * (fg @ M + c * (bg @ Mb) + noise()))
    odds_model = fg + math.sqrt(k) * c * bg + noise()
    gi = np.repeat(np.arange(G), B)
    bi = np.tile(np.arange(B), G)
    bgc = bg[0] - bg[0].mean(axis=0)
    truth_bg = float(c ** 2 * (bgc ** 2).sum() / (B - 1))
    flat = lambda x: x.reshape(G * B, d)  # noqa: E731
    return {"teacher": flat(teacher), "student": flat(student), "refs": [flat(r) for r in refs],
            "tables": {"teacher": teacher, "student": student},
            "odds_model": flat(odds_model), "group": gi, "background": bi,
            "truth_teacher": {"foreground": float(d), "background": truth_bg, "interaction": float(d)}}


def run_layer_sim(args: tuple, kinds: tuple[str, ...] = ("absolute", "odds"), n_boot: int = LAYER_BOOT) -> dict:
    """One simulated split: ``args`` = (case, G, B, d, k, a_student, sim, decomposition too)."""
    _case, G, B, d, k, a_student, sim, decomp = args
    rng = np.random.default_rng([14, 62, G, B, d, int(1000 * k), int(100 * a_student), sim])
    x = simulate_layers(rng, G, B, d, a_student=a_student, k=k)
    out = {}
    if "absolute" in kinds:
        r = compare_background(x["student"], [x["teacher"]], x["group"], x["background"], kind="absolute",
                               n_boot=n_boot, random_state=sim)
        out["absolute"] = {"flagged": r.flagged, "ratio": r.ratio, "ci": r.ratio_ci}
    if "odds" in kinds:
        r = compare_background(x["odds_model"], x["refs"], x["group"], x["background"], kind="odds",
                               n_boot=n_boot, random_state=sim)
        out["odds"] = {"flagged": r.flagged, "ratio": r.ratio, "ci": r.ratio_ci}
    if decomp:
        out["alt"] = layer_alternatives(x["tables"]["student"], x["tables"]["teacher"], rng)
        r = crossed_decomposition(x["teacher"], x["group"], x["background"], n_boot=DECOMP_BOOT,
                                  random_state=sim)
        t = x["truth_teacher"]
        out["decomp"] = {name: {"est": getattr(r, name), "ci": getattr(r, name + "_ci"), "truth": t[name]}
                         for name in ("foreground", "background", "interaction")}
    return out


def run_decomposition_sim(args: tuple) -> dict:
    """crossed_decomposition on the teacher-like layer and the re-centred alternative (no compare_background)."""
    return run_layer_sim(args, kinds=())


def layer_alternatives(student: np.ndarray, teacher: np.ndarray, rng: np.random.Generator,
                       n_boot: int = DECOMP_BOOT, level: float = 0.95) -> dict:
    """The components' percentile intervals as the functions compute them, and re-centred on the estimate.

    Replicates re-use ``analyses._crossed._components`` with foreground-count weights (the
    functions' scheme, another RNG stream). ``recentred``: replicates minus their mean plus the
    estimate (the bootstrap world's truth is the plug-in, which for the background component is the
    estimate + MS_int / G, so plain percentiles sit about MS_int / G too high).
    """
    from probekit.analyses._crossed import _components

    G = teacher.shape[0]
    Ys = [t - t.mean(axis=(0, 1)) for t in (student, teacher)]
    est = np.array([_components(Y) for Y in Ys])  # (2, 3)
    W = [np.bincount(rng.integers(0, G, G), minlength=G).astype(float) for _ in range(n_boot)]
    boots = np.array([[_components(Y, w) for Y in Ys] for w in W])  # (n_boot, 2, 3)
    a = (1 - level) / 2
    rc = boots - boots.mean(axis=0) + est
    out = {"teacher_pct": np.quantile(boots[:, 1], [a, 1 - a], axis=0).T.tolist(),
           "teacher_recentred": np.quantile(rc[:, 1], [a, 1 - a], axis=0).T.tolist()}
    ratio = boots[:, 0, 1] / boots[:, 1, 1]
    ratio_rc = rc[:, 0, 1] / rc[:, 1, 1]
    out["ratio_pct"] = np.quantile(ratio, [a, 1 - a]).tolist()
    out["ratio_recentred"] = np.quantile(ratio_rc, [a, 1 - a]).tolist()
    return out


def layer_settings(quick: bool, Gs: tuple[int, ...] | None = None) -> list[dict]:
    Gs = Gs or ((100,) if quick else (100, 300))
    out = []
    for G in Gs:
        out.append({"case": "weaker_fg", "G": G, "k": 1.0, "a_student": 0.5})
        for k in K_GRID:
            out.append({"case": "same" if k == 1.0 else "planted", "G": G, "k": k, "a_student": 1.0})
    return out


def summarise_layers(st: dict, res: list[dict], B: int, d: int) -> dict:
    row = dict(st, B=B, d=d, sims=len(res))
    for kind in ("absolute", "odds"):
        if not res or kind not in res[0]:
            continue
        if kind == "odds" and st["case"] == "weaker_fg":
            continue  # the odds model does not depend on a_student (same as "same")
        ratios = np.array([r[kind]["ratio"] for r in res])
        row[kind] = {"flag": _rate(np.array([r[kind]["flagged"] for r in res])), "truth_ratio": st["k"],
                     "ratio_median": float(np.median(ratios)),
                     "ratio_ci_coverage": _rate(_cover([r[kind]["ci"] for r in res], st["k"]))}
    if res and "decomp" in res[0]:
        dec = {}
        for name in ("foreground", "background", "interaction"):
            est = np.array([r["decomp"][name]["est"] for r in res])
            tr = np.array([r["decomp"][name]["truth"] for r in res])
            cov = np.array([lo - 1e-12 <= t <= hi + 1e-12 for (lo, hi), t in
                            zip((r["decomp"][name]["ci"] for r in res), tr, strict=True)])
            dec[name] = {"coverage": _rate(cov), "rel_bias": float(np.mean(est / tr - 1)),
                         "rel_bias_se": float(np.std(est / tr, ddof=1) / math.sqrt(len(est))) if len(est) > 1 else None}
        row["decomposition"] = dec
    if res and "alt" in res[0]:
        alt = {}
        for which in ("teacher_pct", "teacher_recentred"):
            for j, name in enumerate(("foreground", "background", "interaction")):
                cov = [r["alt"][which][j][0] - 1e-12 <= r["decomp"][name]["truth"] <= r["alt"][which][j][1] + 1e-12
                       for r in res]
                alt[f"{name}_{which.split('_')[1]}"] = _rate(np.array(cov))
        for which in ("ratio_pct", "ratio_recentred"):
            cis = [r["alt"][which] for r in res]
            alt[f"absolute_{which}"] = {"coverage": _rate(_cover(cis, st["k"])),
                                        "flag": _rate(np.array([lo > 1.25 for lo, _ in cis]))}
        row["alternatives"] = alt
    return row


# =================================================================================================
# 3. NMS and probe ID/OOD gap
# =================================================================================================
def run_nms_sim(args: tuple) -> dict:
    nms_true, paired, n, d, sim, rev = args
    mod = analyses_module(rev)
    rng = np.random.default_rng([14, 63, int(1e5 * nms_true), int(paired), n, d, sim])
    delta = math.sqrt(nms_true)  # per unit: sum_u delta^2 / sum_u var_a = nms_true (var_a = 1)
    if paired:
        f = math.sqrt(0.8) * rng.standard_normal((n, d))
        xa = f + math.sqrt(0.2) * rng.standard_normal((n, d))
        xb = f + delta + math.sqrt(0.2) * rng.standard_normal((n, d))
    else:
        xa = rng.standard_normal((n, d))
        xb = delta + rng.standard_normal((n, d))
    r = mod.normalized_mean_shift(xa, xb, paired=paired, random_state=sim)
    est = getattr(r, "nms_debiased", r.nms)
    return {"ci": tuple(r.ci), "est": float(est), "plug_in": float(r.nms)}


class ReadPrediction(ClassifierMixin, BaseEstimator):
    """A fixed "probe" whose prediction is column 0 of X (the simulated correctness stays exact)."""

    def fit(self, X, y):
        self.classes_ = np.unique(np.asarray(y))
        self.C_ = 1.0
        return self

    def predict(self, X):
        return np.asarray(X)[:, 0].astype(int)


def run_probe_sim(args: tuple) -> dict:
    p_id, p_ood, rho, n, sim, rev = args
    mod = analyses_module(rev)
    rng = np.random.default_rng([14, 64, int(1000 * p_id), int(1000 * p_ood), int(100 * rho), n, sim])
    K = 3
    u = rng.random(n)
    u2 = np.where(rng.random(n) < rho, u, rng.random(n))  # correlated correctness of the pair
    y = rng.integers(0, K, n)
    pid = np.where(u < p_id, y, (y + 1) % K)
    pood = np.where(u2 < p_ood, y, (y + 1) % K)
    ytr = np.arange(K).repeat(4)
    r = mod.probe_id_ood(ytr[:, None].astype(float), ytr, pid[:, None].astype(float), y,
                         pood[:, None].astype(float), y, probe=ReadPrediction(), paired=True,
                         random_state=sim)
    return {"gap": r.gap, "ci": tuple(r.gap_ci)}


# =================================================================================================
# driver
# =================================================================================================
def _map(fn, jobs: list, n_jobs: int) -> list:
    if n_jobs <= 1:
        return [fn(j) for j in jobs]
    with ProcessPoolExecutor(n_jobs) as ex:
        return list(ex.map(fn, jobs, chunksize=max(1, len(jobs) // (8 * n_jobs))))


def _checkpoint(out: dict, path: str | None) -> None:
    if path:
        Path(path).write_text(json.dumps(out, indent=1, default=float) + "\n")


def run(sims: int = 200, quick: bool = False, n_jobs: int = 1, rev: str = "worktree",
        parts: tuple[str, ...] = ("behaviour", "layers", "nms", "probe"), alt_sims: int | None = None,
        B: int = B_DEFAULT, d: int = 16, checkpoint: str | None = None,
        Gs: tuple[int, ...] | None = None, Ks: tuple[int, ...] | None = None,
        shortcut_sims: int | None = None) -> dict:
    """Every part's simulations; ``checkpoint``: a path the partial results are written to after each setting."""
    t0 = time.perf_counter()
    alt_sims = (shortcut_sims or sims) if alt_sims is None else alt_sims
    out: dict = {"config": {"sims": sims, "shortcut_sims": shortcut_sims or sims, "alt_sims": alt_sims,
                            "quick": quick, "B": B, "layer_units": d,
                            "behaviour": {"n_boot": BEH_BOOT, "n_perm": BEH_PERM, "threshold": 0.05,
                                          "acc": ACC, "ambiguous_q": AMB_Q},
                            "layers": {"n_boot": LAYER_BOOT, "decomposition_n_boot": DECOMP_BOOT,
                                       "ci_level": 0.95, "margin": 1.25},
                            **provenance(rev)}}
    if "behaviour" in parts:
        rows = []
        for st in behaviour_settings(quick, Gs, Ks):
            n = shortcut_sims if st["kind"] == "shortcut" and shortcut_sims else sims
            jobs = [(st["kind"], st["G"], B, st["K"], st["s"], st["amb"], i,
                     st["kind"] == "shortcut" and i < alt_sims) for i in range(n)]
            rows.append(summarise_behaviour(st, _map(run_behaviour_sim, jobs, n_jobs), B))
            out["behaviour"] = rows
            _checkpoint(out, checkpoint)
    if "alternatives" in parts:
        rows = []
        for G in (Gs or ((100,) if quick else (100, 300))):
            for K in (Ks or ((10,) if quick else (3, 10))):
                for amb in (0.0, 0.3):
                    for s_ in (0.0, *S_GRID):
                        if s_ == 0 and amb == 0:
                            continue
                        st = {"kind": "alternatives", "G": G, "K": K, "s": s_, "amb": amb}
                        n = alt_sims
                        res = _map(run_alternatives_sim, [(G, B, K, s_, amb, i) for i in range(n)], n_jobs)
                        rows.append(summarise_alternatives(st, res, B))
                        out["alternatives"] = rows
                        _checkpoint(out, checkpoint)
    if "decomposition" in parts:  # crossed_decomposition's coverage alone, more simulations
        rows = []
        for G in (Gs or ((100,) if quick else (100, 300))):
            st = {"case": "decomposition", "G": G, "k": 1.0, "a_student": 1.0}
            jobs = [("decomposition", G, B, d, 1.0, 1.0, i, True) for i in range(sims)]
            res = _map(run_decomposition_sim, jobs, n_jobs)
            row = summarise_layers(st, res, B, d)
            rows.append(row)
            out["decomposition"] = rows
            _checkpoint(out, checkpoint)
    if "layers" in parts:
        rows = []
        for st in layer_settings(quick, Gs):
            jobs = [(st["case"], st["G"], B, d, st["k"], st["a_student"], i, st["case"] in ("same",))
                    for i in range(sims)]
            rows.append(summarise_layers(st, _map(run_layer_sim, jobs, n_jobs), B, d))
            out["layers"] = rows
            _checkpoint(out, checkpoint)
    if "nms" in parts:
        rows = []
        for paired in (True, False):
            for nms_true in (0.0025, 0.05):
                res = _map(run_nms_sim, [(nms_true, paired, 400, 20, i, rev) for i in range(sims)], n_jobs)
                ci = [r["ci"] for r in res]
                est = np.array([r["est"] for r in res])
                ci_arr = np.array(ci)
                rows.append({"paired": paired, "nms": nms_true, "n": 400, "units": 20, "sims": len(res),
                             "coverage": _rate(_cover(ci, nms_true)), "bias": float(est.mean() - nms_true),
                             "miss_low_end_above_truth": float(np.mean(ci_arr[:, 0] > nms_true)),
                             "miss_high_end_below_truth": float(np.mean(ci_arr[:, 1] < nms_true))})
        out["nms"] = rows
    if "probe" in parts:
        rows = []
        for p_id, p_ood, rho in ((0.9, 0.8, 0.7), (0.85, 0.85, 0.7), (0.9, 0.6, 0.0)):
            res = _map(run_probe_sim, [(p_id, p_ood, rho, 300, i, rev) for i in range(sims)], n_jobs)
            rows.append({"p_id": p_id, "p_ood": p_ood, "rho": rho, "n": 300, "sims": len(res),
                         "gap": p_id - p_ood, "coverage": _rate(_cover([r["ci"] for r in res], p_id - p_ood))})
        out["probe_id_ood"] = rows
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _f(e: dict) -> str:
    """A rate in %, ± its Monte-Carlo SE; at 0 or 1, the count and the exact one-sided 95 % bound."""
    n, p = e["n"], e["rate"]
    if n and p == 0:
        return f"0/{n} (≤ {100 * (1 - 0.05 ** (1 / n)):.1f})"
    if n and p == 1:
        return f"{n}/{n} (≥ {100 * 0.05 ** (1 / n):.1f})"
    return f"{100 * p:.1f} ± {100 * e['se']:.1f}"


def markdown(res: dict) -> str:
    lines = []
    if "behaviour" in res:
        lines += ["### Behaviour flag (background_behaviour; % ± Monte-Carlo SE)", "",
                  "| model | G | K | s / amb | sims | flagged | true pull | pull bias | pull CI cover | "
                  "low end > truth | flip CI cover | follows CI cover |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["behaviour"]:
            par = f"s={r['s']}" if r["kind"] == "shortcut" else f"amb={r['amb']}"
            c = r["coverage"]
            lines.append(
                f"| {r['kind']} | {r['G']} | {r['K']} | {par} | {r['sims']} | {_f(r['flag'])} | "
                f"{r['truth']['pull']:.4f} | {r['pull_bias']:+.4f} | {_f(c['pull'])} | "
                f"{100 * r['pull_miss_low_end_above_truth']:.1f} | {_f(c['flip_rate'])} | "
                f"{_f(c['follows_background']) if 'follows_background' in c else '–'} |")
        alts = [r for r in res["behaviour"] if "pull_alternatives" in r]
        if alts:
            names = list(alts[0]["pull_alternatives"])
            lines += ["", "### Pull interval alternatives (coverage % ± SE; bias)", "",
                      "| G | K | s | sims | " + " | ".join(names) + " |",
                      "|---|---|---|---|" + "---|" * len(names)]
            for r in alts:
                a = r["pull_alternatives"]
                lines.append(f"| {r['G']} | {r['K']} | {r['s']} | {r['pull_alternatives_sims']} | " + " | ".join(
                    f"{_f(a[n]['coverage'])} ({a[n]['bias']:+.4f})" for n in names) + " |")
    if "alternatives" in res:
        names = list(res["alternatives"][0]["alternatives"])
        lines += ["", "### Pull interval alternatives, incl. null / unsure models (coverage % ± SE, bias; "
                  "CI low > 0.05 %)", "",
                  "| G | K | s | amb | sims | true pull | " + " | ".join(names) + " |",
                  "|---|---|---|---|---|---|" + "---|" * len(names)]
        for r in res["alternatives"]:
            a = r["alternatives"]
            lines.append(f"| {r['G']} | {r['K']} | {r['s']} | {r['amb']} | {r['sims']} | {r['truth_pull']:.4f} | "
                         + " | ".join(f"{_f(a[n]['coverage'])} ({a[n]['bias']:+.4f}; "
                                      f"{100 * a[n]['low_end_above_0.05']['rate']:.0f})" for n in names) + " |")
    if "layers" in res:
        lines += ["", "### Layer flag (compare_background, ci_level 0.95, margin 1.25; k = true component ratio)", "",
                  "| case | G | k | sims | absolute flagged | abs ratio CI cover | odds flagged | odds ratio CI cover |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in res["layers"]:
            o = r.get("odds")
            lines.append(f"| {r['case']} | {r['G']} | {r['k']} | {r['sims']} | {_f(r['absolute']['flag'])} | "
                         f"{_f(r['absolute']['ratio_ci_coverage'])} | {_f(o['flag']) if o else '–'} | "
                         f"{_f(o['ratio_ci_coverage']) if o else '–'} |")
    if "layers" in res or "decomposition" in res:
        dec = [r for r in res.get("layers", []) + res.get("decomposition", []) if "decomposition" in r]
        if dec:
            lines += ["", "### crossed_decomposition coverage (teacher layer; truth conditional on the backgrounds)", "",
                      "| G | sims | foreground | background | interaction | re-centred: fg | bg | int | "
                      "abs. ratio at k = 1, re-centred |", "|---|---|---|---|---|---|---|---|---|"]
            for r in dec:
                dd, alt = r["decomposition"], r.get("alternatives", {})
                rc = [_f(alt[f"{n}_recentred"]) if f"{n}_recentred" in alt else "–"
                      for n in ("foreground", "background", "interaction")]
                ratio = alt.get("absolute_ratio_recentred")
                lines.append(f"| {r['G']} | {r['sims']} | " + " | ".join(
                    f"{_f(dd[n]['coverage'])} (rel. bias {dd[n]['rel_bias']:+.3f})"
                    for n in ("foreground", "background", "interaction")) + " | " + " | ".join(rc)
                    + f" | {_f(ratio['coverage']) if ratio else '–'} |")
    if "nms" in res:
        lines += ["", "### normalized_mean_shift interval", "",
                  "| paired | true NMS | sims | coverage | bias | low end > truth | high end < truth |",
                  "|---|---|---|---|---|---|---|"]
        for r in res["nms"]:
            lines.append(f"| {r['paired']} | {r['nms']} | {r['sims']} | {_f(r['coverage'])} | {r['bias']:+.5f} | "
                         f"{100 * r['miss_low_end_above_truth']:.1f} | {100 * r['miss_high_end_below_truth']:.1f} |")
    if "probe_id_ood" in res:
        lines += ["", "### probe_id_ood gap interval (paired rows)", "",
                  "| acc ID | acc OOD | pair corr. | n | sims | coverage |", "|---|---|---|---|---|---|"]
        for r in res["probe_id_ood"]:
            lines.append(f"| {r['p_id']} | {r['p_ood']} | {r['rho']} | {r['n']} | {r['sims']} | {_f(r['coverage'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="few settings and simulations (the test's scale)")
    ap.add_argument("--sims", type=int, default=None, help="simulations per setting (default 200; quick 20)")
    ap.add_argument("--alt-sims", type=int, default=None, help="simulations per shortcut setting that also "
                    "compute the pull interval alternatives (default: all)")
    ap.add_argument("--shortcut-sims", type=int, default=None,
                    help="simulations per planted-shortcut behaviour setting (default: --sims)")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--parts", default="behaviour,layers,nms,probe")
    ap.add_argument("--analyses", default="worktree", help="'worktree' or a git revision for NMS / probe")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "calibrate_verdict.json"))
    ap.add_argument("--G", default=None, help="foreground counts, comma-separated (behaviour and layers)")
    ap.add_argument("--K", default=None, help="class counts, comma-separated (behaviour)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="combine part files of earlier runs into --out and print their tables (no simulation)")
    a = ap.parse_args(argv)
    if a.merge:
        res: dict = {"config": {}, "parts": {}}
        for path in a.merge:
            doc = json.loads(Path(path).read_text())
            for key, val in doc.items():
                if key in ("config", "seconds"):
                    res["parts"].setdefault(Path(path).name, {})[key] = val
                else:
                    res.setdefault(key, []).extend(val)
        Path(a.out).write_text(json.dumps(res, indent=1, default=float) + "\n")
        print(markdown(res))
        return res
    sims = a.sims if a.sims is not None else (20 if a.quick else 200)
    ints = lambda v: tuple(int(x) for x in v.split(",")) if v else None  # noqa: E731
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    res = run(sims=sims, quick=a.quick, n_jobs=a.jobs, rev=a.analyses, parts=tuple(a.parts.split(",")),
              alt_sims=a.alt_sims, checkpoint=a.out, Gs=ints(a.G), Ks=ints(a.K), shortcut_sims=a.shortcut_sims)
    Path(a.out).write_text(json.dumps(res, indent=1, default=float) + "\n")
    print(markdown(res))
    print(f"\n{res['seconds']} s; wrote {a.out}")
    return res


if __name__ == "__main__":
    main()
