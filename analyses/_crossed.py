"""Two-way decomposition of a layer on a crossed split: foreground, background and interaction.

On a crossed split every foreground ``group`` g is shown on the same backgrounds b. A layer's rows
x_gb then split, unit by unit, into a foreground effect (what all backgrounds of g share), a
background effect (what all foregrounds on b share) and an interaction. A weaker foreground shrinks
the first and leaves the second alone, so "learned less foreground" no longer reads as "learned more
background" (a variance *share* cannot tell them apart).

Foregrounds and backgrounds are both samples from populations, so every interval here is a two-way
delete-one jackknife (foregrounds, then backgrounds) with Satterthwaite's degrees of freedom; the
leave-one-out components come in closed form from per-foreground and per-background totals, in one
pass over the table. Calibration: benchmarks/calibrate_layers.py, docs/METRICS.md.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from probekit.errors import DataError
from probekit.vocab import RATIO_MARGIN

from ._common import ResultMixin, as_source, as_vector, check_number, check_option

__all__ = [
    "BackgroundComparisonResult",
    "CrossedDecompositionResult",
    "compare_background",
    "crossed_decomposition",
]

#: background components are compared with their reference at this factor (the flag's margin)
FLAG_RATIO = RATIO_MARGIN  # the representation finding's margin, defined once in probekit.vocab
#: above this many units, layers are count-sketched to this many (unbiased for every sum of squares)
MAX_DIMS = 4096


class _Table:
    """A layer's rows arranged as a complete (G, B, d) table of foregrounds x backgrounds."""

    def __init__(self, X: Any, gi: np.ndarray, bi: np.ndarray, rows: np.ndarray, G: int, B: int,
                 sketch: tuple[np.ndarray, np.ndarray, int] | None, name: str) -> None:
        src = as_source(X, name, min_rows=2)
        if src.n_rows != gi.size:
            raise DataError(
                f"{name} has {src.n_rows} rows but group/background have {gi.size}; pass the same split's rows."
            )
        d = src.n_features
        k = d if sketch is None else sketch[2]
        Y = np.zeros((G, B, k))
        keep = np.full(gi.size, -1, dtype=np.int64)
        keep[rows] = np.arange(rows.size)
        for start, a in src.chunks():
            sel = keep[start:start + a.shape[0]] >= 0
            if not sel.any():
                continue
            a = np.asarray(a[sel], dtype=np.float64)
            idx = np.arange(start, start + sel.size)[sel]
            if sketch is not None:  # count sketch: unit u adds sign_u * x_u to bucket h_u
                bucket, sign, _ = sketch
                out = np.zeros((a.shape[0], k))
                np.add.at(out.T, bucket, (a * sign).T)
                a = out
            Y[gi[idx], bi[idx]] = a
        Y -= Y.mean(axis=(0, 1))  # in place: the table is this layer's crossed rows in float64, held once
        self.Y = Y
        self.n_units = d


def _layout(group: Any, background: Any, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int, int]:
    g = as_vector(group, "group", n, numeric=False)
    b = as_vector(background, "background", n, numeric=False)
    gids, gi = np.unique(g, return_inverse=True)
    bids, bi = np.unique(b, return_inverse=True)
    gi, bi = gi.reshape(-1), bi.reshape(-1)
    G, B = gids.size, bids.size
    cells = np.bincount(gi * B + bi, minlength=G * B).reshape(G, B)
    complete = (cells == 1).all(axis=1)
    if B < 2 or complete.sum() < 3:
        raise DataError(
            f"The crossed decomposition needs at least 3 foregrounds shown once on each of at least 2 "
            f"shared backgrounds; this split has {int(complete.sum())} complete foregrounds of {G} over "
            f"{B} backgrounds. Build the split as every foreground x the same backgrounds."
        )
    new = -np.ones(G, dtype=np.int64)
    new[complete] = np.arange(complete.sum())
    rows = np.flatnonzero(complete[gi])
    return new[gi], bi, rows, int(complete.sum()), B, int(G - complete.sum())


def _keys(group: Any, background: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The complete foregrounds' and the backgrounds' ids, in the order of :func:`_layout`'s tables."""
    g = as_vector(group, "group", n, numeric=False)
    b = as_vector(background, "background", n, numeric=False)
    gids, gi = np.unique(g, return_inverse=True)
    bids, bi = np.unique(b, return_inverse=True)
    cells = np.bincount(gi.reshape(-1) * bids.size + bi.reshape(-1), minlength=gids.size * bids.size)
    return gids[(cells.reshape(gids.size, bids.size) == 1).all(axis=1)], bids


def _ss_components(ss_tot: Any, ss_fg: Any, ss_bg: Any, G: int, B: int) -> np.ndarray:
    """Unbiased variance components (foreground, background, interaction) from the sums of squares.

    Random-effects two-way ANOVA with one row per cell: MS_fg = SS_fg/(G-1), MS_bg = SS_bg/(B-1),
    MS_int = SS_int/((G-1)(B-1)); sigma2_fg = (MS_fg - MS_int)/B, sigma2_bg = (MS_bg - MS_int)/G,
    sigma2_int = MS_int.
    """
    ss_int = ss_tot - ss_fg - ss_bg
    ms_fg, ms_bg = ss_fg / (G - 1), ss_bg / (B - 1)
    ms_int = ss_int / ((G - 1) * (B - 1))
    return np.stack(np.broadcast_arrays((ms_fg - ms_int) / B, (ms_bg - ms_int) / G, ms_int), axis=-1)


def _jackknife(Y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The components of the whole table (3,), with each foreground left out (G, 3) and with each
    background left out (B, 3; None with 2 backgrounds), in one pass over the table.

    Leaving out foreground i moves the grand mean to m' = (G m - mean_i) / (G - 1) and every
    background's mean to (G mb - Y_i) / (G - 1); the sums of squares follow from per-foreground totals
    (sum ||Y_i||^2, ||mean_i||^2, <mean_i, m>, sum_b <mb, Y_ib>), and symmetrically for backgrounds.
    """
    G, B, _ = Y.shape
    m, mg, mb = Y.mean(axis=(0, 1)), Y.mean(axis=1), Y.mean(axis=0)
    Q, P = (Y ** 2).sum(axis=(1, 2)), (Y ** 2).sum(axis=(0, 2))
    s_mg, s_mb, m2 = (mg ** 2).sum(), (mb ** 2).sum(), float(m @ m)
    mg2, mb2 = (mg ** 2).sum(axis=1), (mb ** 2).sum(axis=1)
    full = _ss_components(Q.sum() - G * B * m2, B * (s_mg - G * m2), G * (s_mb - B * m2), G, B)
    g1 = G - 1
    m2g = (G * G * m2 - 2 * G * (mg @ m) + mg2) / g1 ** 2
    s_mbg = (G * G * s_mb - 2 * G * np.einsum("gbk,bk->g", Y, mb) + Q) / g1 ** 2
    by_g = _ss_components(Q.sum() - Q - g1 * B * m2g, B * (s_mg - mg2 - g1 * m2g), g1 * (s_mbg - B * m2g), g1, B)
    if B < 3:
        return full, by_g, None
    b1 = B - 1
    m2b = (B * B * m2 - 2 * B * (mb @ m) + mb2) / b1 ** 2
    s_mgb = (B * B * s_mg - 2 * B * np.einsum("gbk,gk->b", Y, mg) + P) / b1 ** 2
    by_b = _ss_components(P.sum() - P - G * b1 * m2b, b1 * (s_mgb - G * m2b), G * (s_mb - mb2 - b1 * m2b), G, b1)
    return full, by_g, by_b


def _jack_cov(a: np.ndarray, b: np.ndarray) -> float:
    """Delete-one jackknife covariance of two statistics from their leave-one-out values."""
    n = a.shape[0]
    return float((n - 1) / n * np.sum((a - a.mean()) * (b - b.mean())))


def _satterthwaite(parts: Sequence[tuple[float, int]]) -> float:
    """Degrees of freedom of a sum of variance estimates, each with its own (Welch-Satterthwaite)."""
    v = sum(p for p, _ in parts)
    den = sum(p * p / df for p, df in parts if p > 0)
    return float(v * v / den) if den > 0 else float("inf")


def _t_quantile(level: float, df: float) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.5 + level / 2, df))


def _interval(est: float, by_g: np.ndarray, by_b: np.ndarray | None, level: float) -> tuple[float, float]:
    """A component's two-way jackknife interval: on the log scale where the estimate and every
    leave-one-out value are > 0, else on its own scale; t quantile with Satterthwaite's df."""
    if by_b is None:
        return (float("nan"), float("nan"))
    log = est > 0 and by_g.min() > 0 and by_b.min() > 0
    f = np.log if log else (lambda v: v)
    parts = [(_jack_cov(f(by_g), f(by_g)), by_g.size - 1), (_jack_cov(f(by_b), f(by_b)), by_b.size - 1)]
    half = _t_quantile(level, _satterthwaite(parts)) * np.sqrt(sum(p for p, _ in parts))
    if log:
        return (float(est * np.exp(-half)), float(est * np.exp(half)))
    return (float(est - half), float(est + half))


def _sketch(d: int, max_dims: int, seed: int) -> tuple[np.ndarray, np.ndarray, int] | None:
    if d <= max_dims:
        return None
    rng = np.random.default_rng([seed, 7])
    return rng.integers(0, max_dims, d), rng.choice([-1.0, 1.0], d), max_dims


@dataclasses.dataclass(repr=False)
class CrossedDecompositionResult(ResultMixin):
    """Foreground / background / interaction components of a layer (see :func:`crossed_decomposition`)."""

    foreground: float
    background: float
    interaction: float
    foreground_ci: tuple[float, float]
    background_ci: tuple[float, float]
    interaction_ci: tuple[float, float]
    background_share: float
    background_share_ci: tuple[float, float]
    n_groups: int
    n_backgrounds: int
    n_dropped_groups: int
    n_units: int
    sketched: bool
    ci_level: float


def crossed_decomposition(X: Any, group: Any, background: Any, *, n_boot: int = 200,
                          ci_level: float = 0.95, max_dims: int = MAX_DIMS,
                          random_state: int | None = 0) -> CrossedDecompositionResult:
    r"""Two-way decomposition of a layer on a crossed split (foreground x background).

    With one row per (foreground g, background b), centred, and per unit u,

    .. math:: x_{gbu} = \alpha_{gu} + \beta_{bu} + \gamma_{gbu}

    the random-effects ANOVA estimates, summed over units, the foreground component
    :math:`\sigma^2_{fg} = (MS_{fg} - MS_{int})/B`, the background component
    :math:`\sigma^2_{bg} = (MS_{bg} - MS_{int})/G` and the interaction
    :math:`\sigma^2_{int} = MS_{int}` (unbiased; a component can come out slightly negative when it
    is 0). Units: the layer's own squared units, per row. ``background_share`` = bg / (fg + bg + int).
    Foregrounds not shown exactly once on every background are left out (``n_dropped_groups``).
    Layers wider than ``max_dims`` units are count-sketched to ``max_dims`` (each unit added with a
    random sign into one of ``max_dims`` buckets): every sum of squares keeps its expectation.

    Intervals are about the model, with foregrounds *and* backgrounds drawn from their populations:
    a two-way delete-one jackknife (each foreground left out, then each background; the two variances
    add), a t quantile with Welch-Satterthwaite degrees of freedom (G - 1 and B - 1 for the two parts),
    on the log scale where the estimate and every leave-one-out value are positive (components are
    skewed), else on the component's own scale. With 2 backgrounds there is no interval (NaN).
    ``n_boot`` is not used (the jackknife needs no replicates); it is accepted for compatibility.
    """
    check_number("crossed_decomposition", "n_boot", n_boot, low=1, integer=True)
    check_number("crossed_decomposition", "ci_level", ci_level, low=0, high=1, low_open=True)
    src = as_source(X, "X", min_rows=2)
    gi, bi, rows, G, B, dropped = _layout(group, background, src.n_rows)
    sketch = _sketch(src.n_features, max_dims, 0 if random_state is None else int(random_state))
    t = _Table(X, gi, bi, rows, G, B, sketch, "X")
    est, by_g, by_b = _jackknife(t.Y)
    share = lambda c: c[..., 1] / np.maximum(c.sum(axis=-1), 1e-300)  # noqa: E731
    cis = [_interval(float(est[j]), by_g[:, j], None if by_b is None else by_b[:, j], ci_level) for j in range(3)]
    return CrossedDecompositionResult(
        foreground=float(est[0]), background=float(est[1]), interaction=float(est[2]),
        foreground_ci=cis[0], background_ci=cis[1], interaction_ci=cis[2],
        background_share=float(share(est)),
        background_share_ci=_interval(float(share(est)), share(by_g), None if by_b is None else share(by_b),
                                      ci_level),
        n_groups=G, n_backgrounds=B, n_dropped_groups=dropped, n_units=t.n_units, sketched=sketch is not None,
        ci_level=float(ci_level),
    )


@dataclasses.dataclass(repr=False)
class BackgroundComparisonResult(ResultMixin):
    """A layer's background component against its reference (see :func:`compare_background`)."""

    kind: str
    value: float
    reference: float
    ratio: float | None
    ratio_ci: tuple[float, float] | None
    p_value: float | None
    df: float | None
    scale: str | None
    ci_level: float
    margin: float
    flagged: bool
    n_references: int
    model: list[float]
    references: list[list[float]]
    reason: str | None
    n_groups: int = 0
    n_reference_groups: int = 0
    n_shared_groups: int = 0
    subsample_weight: float | None = None


#: the figure each kind compares, from components (..., 3) = (foreground, background, interaction)
_FIGURES = {
    "absolute": lambda c: c[..., 1],
    "within_odds": lambda c: c[..., 1] / c[..., 2],
    "within_share": lambda c: c[..., 1] / (c[..., 1] + c[..., 2]),
    "odds": lambda c: c[..., 1] / (c[..., 0] + c[..., 2]),
}


def _influence(loo: np.ndarray) -> np.ndarray:
    """Jackknife influences (n - 1) (mean - loo_i) of a statistic from its n leave-one-out values."""
    return (loo.size - 1) * (loo.mean() - loo)


def _unpaired_parts(log: bool, S: float, T: float, S_g: np.ndarray, T_g: np.ndarray, S_b: np.ndarray,
                    T_b: np.ndarray, shared: tuple[np.ndarray, np.ndarray]) -> list[tuple[float, int]]:
    """Variance parts (with their df) of f(S / T) when the reference was measured on other foregrounds
    than the model (a subsample of them, or partly other ones) over the same backgrounds.

    Linearised jackknife: with u_i the influence of foreground i on f(S) (over the model's G
    foregrounds) and v_j on f(T) (over the reference's G_T), f(S / T) - f(S / T)_true is about
    sum_i u_i / G - sum_j v_j / G_T, a sum over the foregrounds of independent terms; a foreground both
    tables hold contributes u_i / G - v_i / G_T (the two influences pair, as the two-way jackknife pairs
    them), one only the model holds u_i / G, one only the reference holds -v_j / G_T. Each group of terms
    is summed with its own n / (n - 1) factor, so that with the same foregrounds in both tables this is
    the paired jackknife exactly (on the log scale). On the ratio's own scale, f(S / T) moves by
    (dS - rho dT) / T (delta method). The backgrounds, shared, pair as before.
    """
    G, GT, B = S_g.size, T_g.size, S_b.size
    if log:
        uS, uT, bS, bT = (_influence(np.log(v)) for v in (S_g, T_g, S_b, T_b))
    else:
        rho = S / T
        uS, uT = _influence(S_g) / T, rho * _influence(T_g) / T
        bS, bT = _influence(S_b) / T, rho * _influence(T_b) / T
    parts: list[tuple[float, int]] = []
    iS, iT = shared
    n_sh = iS.size
    only_S, only_T = np.ones(G, bool), np.ones(GT, bool)
    if n_sh >= 2:  # fewer than 2 shared foregrounds: their covariance is unknown, left out (conservative)
        d = uS[iS] / G - uT[iT] / GT
        parts.append((n_sh / (n_sh - 1) * float(d @ d), n_sh - 1))
        only_S[iS], only_T[iT] = False, False
    for u, n, keep in ((uS, G, only_S), (uT, GT, only_T)):
        if keep.any():
            w = u[keep] / n
            parts.append((n / (n - 1) * float(w @ w), max(1, int(keep.sum()) - 1)))
    db = (bS - bT) / B
    parts.append((B / (B - 1) * float(db @ db), B - 1))
    return parts


def _subsample_estimate(log: bool, S: float, T: float, S_sub: float, S_g: np.ndarray, T_g: np.ndarray,
                        Ssub_g: np.ndarray, S_b: np.ndarray, T_b: np.ndarray, Ssub_b: np.ndarray,
                        shared: np.ndarray) -> tuple[float, float, list[tuple[float, int]]]:
    """The ratio when the reference holds a subsample of the model's foregrounds: f(ratio) estimated as
    A + c D, with A = f(S_sub) - f(T) (both on the subsample: fully paired) and D = f(S) - f(S_sub)
    (the model's other foregrounds, mean 0 to first order), c in [0, 1] the weight that minimises the
    linearised jackknife variance (a control variate). c = 1 is f(S / T), every foreground of the model
    used unpaired (best when the model and its reference vary independently across foregrounds); c = 0
    is the paired ratio on the subsample (best when they vary together, as a first conv layer and its
    init do). Returns (f(ratio), c, variance parts with their df)."""
    G, GT, B = S_g.size, T_g.size, S_b.size
    if log:
        uS, uSub, uT = _influence(np.log(S_g)), _influence(np.log(Ssub_g)), _influence(np.log(T_g))
        bS, bSub, bT = _influence(np.log(S_b)), _influence(np.log(Ssub_b)), _influence(np.log(T_b))
        A, D = math.log(S_sub) - math.log(T), math.log(S) - math.log(S_sub)
    else:
        r_sub = S_sub / T
        uS, uSub, uT = _influence(S_g) / T, _influence(Ssub_g) / T, r_sub * _influence(T_g) / T
        bS, bSub, bT = _influence(S_b) / T, _influence(Ssub_b) / T, r_sub * _influence(T_b) / T
        A, D = r_sub, (S - S_sub) / T
    d = (uSub - uT) / GT  # A's foreground terms (the subsample, in the reference's order)
    e = uS / G  # D's: every foreground of the model, less the subsample's own term on the shared ones
    e_sh = e[shared] - uSub / GT
    others = np.ones(G, bool)
    others[shared] = False
    hA, hD = (bSub - bT) / B, (bS - bSub) / B
    fs, fo, fb = GT / (GT - 1), G / (G - 1), B / (B - 1)
    Q = fs * float(d @ e_sh) + fb * float(hA @ hD)
    R = fs * float(e_sh @ e_sh) + fo * float(e[others] @ e[others]) + fb * float(hD @ hD)
    c = 1.0 if R <= 0 else float(np.clip(-Q / R, 0.0, 1.0))
    w_sh, h = d + c * e_sh, hA + c * hD
    parts = [(fs * float(w_sh @ w_sh), GT - 1)]
    if others.any():
        parts.append((fo * c * c * float(e[others] @ e[others]), max(1, int(others.sum()) - 1)))
    parts.append((fb * float(h @ h), B - 1))
    return A + c * D, c, parts


def compare_background(X: Any, references: Sequence[Any], group: Any, background: Any, *,
                       kind: str = "absolute", n_boot: int = 500, ci_level: float = 0.95,
                       margin: float = FLAG_RATIO, max_dims: int = MAX_DIMS,
                       random_state: int | None = 0, reference_group: Any = None,
                       reference_background: Any = None) -> BackgroundComparisonResult:
    r"""Compare a layer's background component with the same layer of one or more reference models.

    By default every reference holds the rows of X (same foregrounds, same backgrounds, same order).
    With ``reference_group`` / ``reference_background`` (one entry per row of the references, every
    reference the same rows), the references were measured on other foregrounds than X, over the same
    backgrounds: typically a seeded subsample of X's foregrounds (the audit's ``init_objects``), which
    costs forward passes of the references only.

    Figures (``kind``), from the components of :func:`crossed_decomposition`:

    - ``"absolute"``: :math:`\sigma^2_{bg}` itself, for a student against its teacher, whose
      representation the student was fitted to (the same units). A student that encodes the
      foreground more weakly with the same background response keeps ratio 1.
    - ``"within_odds"``: :math:`\sigma^2_{bg} / \sigma^2_{int}`, background relative to the
      within-object variation it does not explain. Scale-free and without the foreground, so a weaker
      foreground barely moves it; for references in other units (the same architecture at
      initialisation: seeded inits or a recorded step 0).
    - ``"within_share"``: :math:`\sigma^2_{bg} / (\sigma^2_{bg} + \sigma^2_{int})`, at most 1: the
      ratio cannot exceed 1 / the reference's figure.
    - ``"odds"``: :math:`\sigma^2_{bg} / (\sigma^2_{fg} + \sigma^2_{int})`. Its denominator holds the
      foreground, so a model that learned less foreground reads as more background: kept for
      comparison only (benchmarks/calibrate_layers.py measures the false flags it gives).

    ``ratio`` = the model's figure / the mean of the references' figures, an estimate of the ratio
    in the population of foregrounds and backgrounds (and of initialisations, with several
    references). Interval: a two-way delete-one jackknife (each foreground left out of every table
    at once, then each background; the two variances add), plus, with 2 or more references, the
    spread of the references' figures divided by their number (initialisations vary, so the
    reference mean is uncertain too), with a t quantile at Welch-Satterthwaite's degrees of freedom
    (``df``; G - 1, B - 1 and references - 1 for the three parts). When the references hold a
    subsample of X's foregrounds, f(ratio) = f(S_sub / T) + c (f(S) - f(S_sub)) with S_sub X's figure on
    the subsample and c in [0, 1] the weight of X's other foregrounds that minimises the linearised
    jackknife variance (:func:`_subsample_estimate`, a control variate; ``subsample_weight``): near 1
    where X and its references vary independently across foregrounds, near 0 where they vary together
    (a first conv layer and its inits); the reference's own sampling variance over its G_T foregrounds
    is in the interval. When they hold partly other foregrounds, the foreground part is the linearised
    jackknife of :func:`_unpaired_parts` (paired over the foregrounds both hold).
    benchmarks/calibrate_init_subsample.py measures coverage, width and power.
    ``scale="log"``: on the log ratio,
    used where the model's background is clearly there (its mean square over backgrounds at least
    twice the interaction's, i.e. G sigma2_bg >= sigma2_int, and its figure > 0 with any one
    foreground or background left out); ``"linear"`` (the ratio itself, whose interval can reach 0)
    otherwise. ``p_value``: one-sided, for "population
    ratio <= margin". ``flagged`` when the interval's low end exceeds ``margin`` (default 1.25),
    i.e. p_value < (1 - ci_level) / 2. For
    multiplicity control over m layers x models, pass ``ci_level = 1 - 0.05 / m`` (Bonferroni; the
    audit does).

    No ratio (``ratio``, ``ratio_ci``, ``p_value`` None, never flagged, ``reason`` says why) when the
    reference's figure is <= 0 or not distinguishable from 0 (it comes out <= 0 with one foreground
    or background left out); with 2 backgrounds the ratio is given without interval (none over
    backgrounds can be had).
    ``n_boot`` is not used (the jackknife needs no replicates); it is accepted for compatibility.
    """
    check_option("compare_background", "kind", kind, tuple(_FIGURES))
    check_number("compare_background", "n_boot", n_boot, low=1, integer=True)
    check_number("compare_background", "ci_level", ci_level, low=0, high=1, low_open=True)
    check_number("compare_background", "margin", margin, low=0, low_open=True)
    refs = list(references)
    if not refs:
        raise DataError("compare_background needs at least one reference (the teacher, or inits).")
    if (reference_group is None) != (reference_background is None):
        raise DataError("compare_background: pass reference_group and reference_background together (the "
                        "references' own rows), or neither (the references hold X's rows).")
    src = as_source(X, "X", min_rows=2)
    gi, bi, rows, G, B, _ = _layout(group, background, src.n_rows)
    layout, n_ref_rows, GT = (gi, bi, rows, G, B), src.n_rows, G
    paired, shared = True, (np.arange(G), np.arange(G))
    if reference_group is not None:
        n_ref_rows = as_source(refs[0], "references[0]", min_rows=2).n_rows
        rgi, rbi, rrows, GT, BT, _ = _layout(reference_group, reference_background, n_ref_rows)
        gk, bk = _keys(group, background, src.n_rows)
        rgk, rbk = _keys(reference_group, reference_background, n_ref_rows)
        if not np.array_equal(bk, rbk):
            raise DataError(f"The references were measured on {BT} backgrounds and X on {B}, not the same ones; "
                            "compare_background needs every table on the same backgrounds.")
        layout = (rgi, rbi, rrows, GT, BT)
        paired = bool(np.array_equal(gk, rgk))
        _, iS, iT = np.intersect1d(gk, rgk, return_indices=True)
        shared = (iS, iT)
    seed = 0 if random_state is None else int(random_state)
    jacks = []
    for i, Z in enumerate([X, *refs]):
        name = "X" if i == 0 else f"references[{i - 1}]"
        zsrc = as_source(Z, name, min_rows=2)
        want = src.n_rows if i == 0 else n_ref_rows
        if zsrc.n_rows != want:
            what = "X has" if reference_group is None else "reference_group has"
            raise DataError(f"{name} has {zsrc.n_rows} rows, {what} {want}; compare the same split's rows "
                            "(or label the references' own rows with reference_group / reference_background).")
        lay = (gi, bi, rows, G, B) if i == 0 else layout
        jacks.append(_jackknife(_Table(Z, *lay, _sketch(zsrc.n_features, max_dims, seed), name).Y))
    figure = _FIGURES[kind]
    sub = None  # X on the references' foregrounds, when they are a subsample of X's (the audit's init_objects)
    if not paired and shared[1].size == GT and GT >= 3:
        to_sub = np.full(G, -1, dtype=np.int64)
        to_sub[shared[0]] = shared[1]
        gi_sub = np.where(gi >= 0, to_sub[np.maximum(gi, 0)], -1)
        with np.errstate(divide="ignore", invalid="ignore"):
            sub = [figure(v) for v in _jackknife(_Table(X, gi_sub, bi, rows[gi_sub[rows] >= 0], GT, B, _sketch(
                src.n_features, max_dims, seed), "X").Y)]
    with np.errstate(divide="ignore", invalid="ignore"):
        per_ref = np.array([figure(j[0]) for j in jacks[1:]])
        S, T = float(figure(jacks[0][0])), float(per_ref.mean())
        S_g, T_g = figure(jacks[0][1]), np.mean([figure(j[1]) for j in jacks[1:]], axis=0)
        S_b = None if jacks[0][2] is None else figure(jacks[0][2])
        T_b = None if jacks[0][2] is None else np.mean([figure(j[2]) for j in jacks[1:]], axis=0)
    R = len(refs)
    base = dict(kind=kind, value=S, reference=T, ci_level=float(ci_level), margin=float(margin), n_references=R,
                model=[float(x) for x in jacks[0][0]], references=[[float(x) for x in j[0]] for j in jacks[1:]],
                n_groups=G, n_reference_groups=GT, n_shared_groups=int(shared[0].size), subsample_weight=None)
    what = {"absolute": "background component", "within_odds": "background-to-interaction odds",
            "within_share": "background share of the within-object variation", "odds": "background odds"}[kind]

    def none(reason: str, ratio: float | None = None) -> BackgroundComparisonResult:
        return BackgroundComparisonResult(ratio=ratio, ratio_ci=None, p_value=None, df=None, scale=None,
                                          flagged=False, reason=reason, **base)

    if not np.isfinite([S, T]).all():
        return none(f"the {what} is undefined for {'X' if not np.isfinite(S) else 'the reference'} (a layer "
                    "constant within every object): no ratio.")
    if T <= 0:
        return none(f"the reference's {what} is {T:.3g} (<= 0: it has none that this split can show), so a "
                    "ratio to it is undefined: compare the model's own background component instead.")
    if S_b is None or T_b is None:
        return none("2 backgrounds: an interval over backgrounds needs at least 3; the ratio is the point "
                    "estimate only.", ratio=S / T)
    if not (np.isfinite(T_g).all() and np.isfinite(T_b).all() and T_g.min() > 0 and T_b.min() > 0):
        return none(f"the reference's {what} ({T:.3g}) is not distinguishable from 0: it comes out <= 0 when one "
                    f"of the {GT} foregrounds or {B} backgrounds is left out, so a ratio to it is not determined.")
    if not (np.isfinite(S_g).all() and np.isfinite(S_b).all()):
        return none(f"the {what} of X is undefined when one foreground or background is left out: no interval.",
                    ratio=S / T)
    rho = S / T

    def spread(f: Any) -> tuple[float, list[tuple[float, int]], float]:
        """f(ratio), the variance parts (foregrounds, backgrounds, inits) and their df."""
        nonlocal rho
        est = float(f(rho))
        if paired:
            th_g, th_b = f(S_g / T_g), f(S_b / T_b)
            parts = [(_jack_cov(th_g, th_g), G - 1), (_jack_cov(th_b, th_b), B - 1)]
        elif sub is not None:
            est, base["subsample_weight"], parts = _subsample_estimate(f is np.log, S, T, float(sub[0]), S_g, T_g,
                                                                       sub[1], S_b, T_b, sub[2], shared[0])
            rho = float(np.exp(est)) if f is np.log else est
        else:
            parts = _unpaired_parts(f is np.log, S, T, S_g, T_g, S_b, T_b, shared)
        if R > 1:  # initialisations vary: the variance of the references' mean, on the same scale
            d = 1.0 if f is np.log else rho ** 2
            parts.append((float(np.var(per_ref, ddof=1) / R) / T ** 2 * d, R - 1))
        return est, parts, _satterthwaite(parts)

    # the log ratio, whose sampling distribution is far less skewed, where the model's background is
    # clearly there: its mean square over backgrounds at least twice the interaction's
    # (G sigma2_bg >= sigma2_int; about 1 when the model has none). Else the ratio's own scale, whose
    # interval can reach 0 (a component that is 0 comes out <= 0 half the time).
    fg_bg_int = jacks[0][0]
    log = bool(S > 0 and S_g.min() > 0 and S_b.min() > 0 and G * fg_bg_int[1] >= fg_bg_int[2])
    if sub is not None and not (np.isfinite(sub[1]).all() and np.isfinite(sub[2]).all()):
        sub = None  # X's figure on the subsample is undefined with one foreground or background left out
    if log and sub is not None and not (sub[0] > 0 and sub[1].min() > 0 and sub[2].min() > 0):
        sub = None
    f: Any = np.log if log else (lambda v: v)
    est, parts, df = spread(f)
    se = float(np.sqrt(sum(v for v, _ in parts)))
    q, at = _t_quantile(ci_level, df), float(f(margin))
    lo, hi = est - q * se, est + q * se
    ci = (float(np.exp(lo)), float(np.exp(hi))) if log else (float(lo), float(hi))
    p = _t_sf((est - at) / se if se > 0 else math.copysign(math.inf, est - at), df)
    return BackgroundComparisonResult(ratio=float(rho), ratio_ci=ci, p_value=p, df=df,
                                      scale="log" if log else "linear", flagged=bool(ci[0] > margin), reason=None,
                                      **base)


def _t_sf(t: float, df: float) -> float:
    from scipy import stats

    return float(stats.t.sf(t, df))
