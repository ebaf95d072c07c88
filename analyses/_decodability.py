"""Background decodability: how well a linear probe predicts each background factor from a layer."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from probekit.errors import DataError

from ._common import (
    DEFAULT_MAX_MEMORY,
    ResultMixin,
    as_factors,
    as_source,
    as_vector,
    check_number,
    percentile_ci,
    safe_scale,
)
from ._probes import LinearProbe
from ._ridge import centred_fold_stats, ridge_stats

__all__ = ["DecodabilityResult", "background_decodability"]

#: Default ridge grid, in units of the average eigenvalue of the standardised Gram matrix
#: (trace(Z^T Z) / d = n for standardised columns): ``alphas = n * 10**linspace(-3, 4, 15)``.
DEFAULT_ALPHA_GRID = tuple(float(v) for v in 10.0 ** np.linspace(-3.0, 4.0, 15))


@dataclasses.dataclass(repr=False)
class DecodabilityResult(ResultMixin):
    """Per-factor probe score minus its shuffled-target control (see :func:`background_decodability`).

    ``metric[f]`` is ``"r2"`` (continuous, linear or circular) or ``"balanced_accuracy"``
    (categorical); ``period[f]`` is the period of a circular factor, else None. ``alpha[f]`` lists
    the ridge penalty used for factor ``f``'s real target in each outer fold (one entry in transfer
    mode; continuous factors only). The summaries never mix units: ``mean_excess_r2`` averages the
    excess over continuous factors, ``mean_excess_balanced_accuracy`` over categorical ones (None
    when there are none). ``n_groups`` counts the scored split's groups (None without groups);
    ``cv`` is the number of outer folds (CV mode) or of penalty-selection folds (transfer mode with
    ``alpha="cv"``), None in transfer mode with a fixed penalty.
    """

    mode: str
    factor_names: list[str]
    metric: dict[str, str]
    period: dict[str, float | None]
    score: dict[str, float]
    score_ci: dict[str, tuple[float, float]]
    control_mean: dict[str, float]
    control_sd: dict[str, float]
    excess: dict[str, float]
    excess_ci: dict[str, tuple[float, float]]
    alpha: dict[str, list[float]]
    mean_excess_r2: float | None
    mean_excess_balanced_accuracy: float | None
    n_fit: int
    n_score: int
    n_groups: int | None
    cv: int | None
    n_shuffles: int
    ci_level: float


# -- helpers ---------------------------------------------------------------------------------------
def _is_categorical(col: np.ndarray) -> bool:
    u = np.unique(col)
    return bool(np.all(u == np.round(u)) and u.size <= 20)


def _group_index(groups: Any, n: int, name: str) -> np.ndarray:
    """Integer group id (0..G-1) of each row; any hashable labels (ints, strings)."""
    g = as_vector(groups, name, n, numeric=True)
    try:
        return np.unique(g, return_inverse=True)[1].ravel()
    except TypeError as e:
        raise DataError(f"{name} mixes label types ({e}); pass one label type, e.g. ints or strings.") from e


def _folds(n: int, cv: int, gid: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """Fold of each row. Without groups: a seeded permutation of ``arange(n) % cv``. With groups:
    whole groups, in a seeded random order, largest first, each to the fold with the fewest rows so
    far (scikit-learn's GroupKFold balancing), so no group is on both sides of a split."""
    if gid is None:
        return rng.permutation(np.arange(n) % cv)
    sizes = np.bincount(gid)
    order = rng.permutation(sizes.size)
    order = order[np.argsort(-sizes[order], kind="stable")]
    load = np.zeros(cv)
    gfold = np.empty(sizes.size, dtype=np.int64)
    for g in order:
        f = int(np.argmin(load))
        gfold[g] = f
        load[f] += sizes[g]
    return gfold[gid]


def _shuffle(n: int, gid: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """Row permutation for the shuffled control. Without groups: uniform. With groups: whole groups'
    blocks of rows (each block in random order) are concatenated in one random group order and cut
    into the groups' sizes in another, so a factor constant within a group stays constant within
    (almost all of) a group: an exact permutation of groups when they have equal sizes."""
    if gid is None:
        return rng.permutation(n)
    order = np.argsort(gid, kind="stable")
    members = np.split(order, np.cumsum(np.bincount(gid))[:-1])
    src = np.concatenate([rng.permutation(members[g]) for g in rng.permutation(len(members))])
    dst = np.concatenate([members[g] for g in rng.permutation(len(members))])
    perm = np.empty(n, dtype=np.int64)
    perm[dst] = src
    return perm


def _resolve_periods(periods: Any, all_names: list[str], names: list[str]) -> dict[str, float | None]:
    """``{factor: period or None}`` for the selected factors; NaN, 0 or None mean linear."""
    if periods is None:
        return {nm: None for nm in names}
    if isinstance(periods, Mapping):
        unknown = [k for k in periods if str(k) not in all_names]
        if unknown:
            raise DataError(f"periods names {unknown} are not factors; the factors are {all_names}.")
        per = {str(k): v for k, v in periods.items()}
    else:
        try:
            seq = list(periods)
        except TypeError as e:
            raise DataError(
                f"periods must be a dict {{factor: period}} or a sequence with one entry per factor; got {periods!r}."
            ) from e
        if len(seq) != len(all_names):
            raise DataError(
                f"periods has {len(seq)} entries for {len(all_names)} factor columns; give one per column "
                "(NaN or 0 for a linear factor) or a dict {factor: period}."
            )
        per = dict(zip(all_names, seq, strict=True))
    out: dict[str, float | None] = {}
    for nm in names:
        v = per.get(nm)
        if v is None:
            out[nm] = None
            continue
        try:
            v = float(v)
        except (TypeError, ValueError) as e:
            raise DataError(f"The period of factor {nm!r} must be a number; got {per[nm]!r}.") from e
        if math.isnan(v) or v == 0:
            out[nm] = None
        elif not math.isfinite(v) or v < 0:
            raise DataError(f"The period of factor {nm!r} must be a positive finite number (or 0/NaN for linear); got {v}.")
        else:
            out[nm] = v
    return out


def _encode(f: np.ndarray, period: float | None) -> np.ndarray:
    """Target columns of a factor: ``f`` itself, or (sin, cos) of 2 pi f / period when circular."""
    if period is None:
        return f[:, None]
    a = 2.0 * np.pi * f / period
    return np.column_stack([np.sin(a), np.cos(a)])


# -- ridge by eigen-decomposition of a fold set's standardised Gram matrix --------------------------
def _ridge_path(st: dict[str, np.ndarray], keep: np.ndarray, alphas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r"""Standardised ridge on the folds in ``keep`` for every penalty in ``alphas``.

    With the training rows' centred, scaled Gram matrix :math:`A = S^{-1}(X_c^\top X_c)S^{-1} = V\Lambda V^\top`
    and :math:`b = S^{-1}X_c^\top Y_c`, the weights are :math:`w(\alpha) = S^{-1}V(\Lambda+\alpha I)^{-1}V^\top b`
    (one decomposition serves the whole grid; :math:`1/(\lambda+\alpha)` is set to 0 where
    :math:`\lambda+\alpha` is rounding noise, the minimum-norm solution at :math:`\alpha = 0`). Same
    minimiser as ``make_pipeline(StandardScaler(), Ridge(alpha))``. Returns ``coef (A, d, t)`` and the
    intercepts ``(A, t)`` in the *shifted* coordinates of ``st`` (prediction ``(x - shift) @ coef + c``).
    """
    n, mx, my, Sxx, Sxy, sxx = centred_fold_stats(st, keep)
    s = safe_scale(np.diag(Sxx) / n, mx + st["shift"], np.diag(sxx) / n)
    lam, V = np.linalg.eigh(Sxx / np.outer(s, s))
    lam = np.maximum(lam, 0.0)
    r = V.T @ (Sxy / s[:, None])
    tiny = 1e-12 * max(float(lam.max()), 1e-300)
    den = lam[None, :] + np.asarray(alphas, dtype=np.float64)[:, None]  # (A, d)
    inv = np.where(den > tiny, 1.0 / np.where(den > tiny, den, 1.0), 0.0)
    coef = np.matmul(V, inv[:, :, None] * r[None]) / s[None, :, None]  # (A, d, t)
    c = my[None, :] - np.einsum("d,adt->at", mx, coef)
    return coef, c


def _heldout_sse(st: dict[str, np.ndarray], j: int, coef: np.ndarray, c: np.ndarray, syy: np.ndarray) -> np.ndarray:
    r"""Per-(penalty, column) squared error on fold ``j`` from its sums, without its rows:
    :math:`\sum_i (y_i - a_i w - c)^2 = \sum y^2 - 2(w^\top\!\sum a y + c\sum y) + w^\top(\sum a a^\top) w
    + 2c\,w^\top\!\sum a + n_j c^2` with :math:`a = x - \text{shift}`. Returns ``(A, t)``."""
    n = st["n"][j]
    cross = np.einsum("dt,adt->at", st["sxy"][j], coef) + st["sy"][j][None, :] * c
    quad = (np.einsum("adt,adt->at", coef, np.matmul(st["sxx"][j], coef))
            + 2.0 * c * np.einsum("d,adt->at", st["sx"][j], coef) + n * c * c)
    return syy[None, :] - 2.0 * cross + quad


def _ridge_predict(src: Any, tsrc: Any, Y: np.ndarray, col_target: np.ndarray, fold: np.ndarray, cv: int,
                   alphas: np.ndarray, select: bool) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold (or transfer) ridge predictions of every column of ``Y``, penalty chosen per target.

    Targets group columns (a circular factor's sin and cos share one penalty). Returns
    ``pred (n_score, t)`` and the chosen penalties ``(n_outer, n_targets)``.
    """
    t = Y.shape[1]
    n_targets = int(col_target.max()) + 1
    onehot = np.zeros((t, n_targets))
    onehot[np.arange(t), col_target] = 1.0
    ymu = Y.mean(axis=0)
    Yc = Y - ymu  # R^2 and the ridge minimiser do not depend on the targets' offset
    st = ridge_stats(src, Yc, fold, cv)
    allf = np.arange(cv)
    outer: list[int | None] = [None] if tsrc is not None else list(range(cv))
    if select:
        syy = np.stack([(Yc[fold == j] ** 2).sum(axis=0) for j in range(cv)])
        inner_sse = _inner_cv_sse(st, syy, cv, alphas, transfer=tsrc is not None)
    models, chosen = [], []
    for o, k in enumerate(outer):
        keep_outer = allf != k if k is not None else np.ones(cv, dtype=bool)
        if select:  # inner CV: each remaining fold held out in turn, errors pooled over them
            best = np.argmin(inner_sse[o] @ onehot, axis=0)
        else:
            best = np.zeros(n_targets, dtype=np.int64)
        uniq, which = np.unique(best, return_inverse=True)
        coef, c = _ridge_path(st, keep_outer, alphas[uniq])
        sel = which.ravel()[col_target]
        W = coef[sel, :, np.arange(t)].T  # (d, t): each column with its target's penalty
        icpt = c[sel, np.arange(t)] - st["shift"] @ W + ymu
        models.append((W, icpt))
        chosen.append(alphas[best])
    if tsrc is not None:
        W, icpt = models[0]
        pred = np.empty((tsrc.n_rows, t))
        for start, a in tsrc.chunks():
            pred[start:start + a.shape[0]] = a @ W + icpt
    else:
        pred = np.empty((src.n_rows, t))
        for start, a in src.chunks():
            fc = fold[start:start + a.shape[0]]
            for f in np.unique(fc):
                m = fc == f
                pred[start + np.flatnonzero(m)] = a[m] @ models[f][0] + models[f][1]
    return pred, np.array(chosen)


def _inner_cv_sse(st: dict[str, np.ndarray], syy: np.ndarray, cv: int, alphas: np.ndarray, *,
                  transfer: bool) -> np.ndarray:
    """Held-out squared errors ``(n_outer, n_alphas, t)`` of every penalty, pooled over the inner folds
    of each outer training set (CV mode: ``cv`` outer folds; transfer: one, all folds inner)."""
    allf = np.arange(cv)
    t = syy.shape[1]
    inner_sse = np.zeros((1 if transfer else cv, alphas.size, t))
    if not transfer:
        # a fit without folds {k, j} is the inner fit of outer fold k scored on j, and of outer
        # fold j scored on k: cv (cv - 1) / 2 decompositions serve all cv (cv - 1) inner fits
        for k in range(cv):
            for j in range(k + 1, cv):
                coef, c = _ridge_path(st, (allf != k) & (allf != j), alphas)
                inner_sse[k] += _heldout_sse(st, j, coef, c, syy[j])
                inner_sse[j] += _heldout_sse(st, k, coef, c, syy[k])
    else:
        for j in range(cv):
            coef, c = _ridge_path(st, allf != j, alphas)
            inner_sse[0] += _heldout_sse(st, j, coef, c, syy[j])
    return inner_sse


# -- scores and their bootstrap --------------------------------------------------------------------
def _boot_weights(gid: np.ndarray, n_boot: int, rng: np.random.Generator) -> Any:
    """Yield blocks of bootstrap row weights ``(b, n)``: each replicate draws as many groups as there
    are, with replacement, and a row weighs the number of times its group was drawn."""
    n_groups = int(gid.max()) + 1
    block = max(1, (1 << 22) // max(gid.size, 1))
    for b0 in range(0, n_boot, block):
        b = min(block, n_boot - b0)
        counts = np.stack([np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups) for _ in range(b)])
        yield counts[:, gid].astype(np.float64)


def _r2_weighted(w: np.ndarray, target: np.ndarray, pred: np.ndarray, onehot: np.ndarray) -> np.ndarray:
    r"""Per target :math:`R^2 = 1 - \sum_c\sum_i w_i(y_{ic}-\hat y_{ic})^2 / \sum_c\sum_i w_i(y_{ic}-\bar y^w_c)^2`
    for weight rows ``w (b, n)``; columns ``c`` of one target (``onehot (t, T)``) are pooled."""
    yc = target - target.mean(axis=0)
    sw = w.sum(axis=1, keepdims=True)
    sse = w @ (target - pred) ** 2
    sst = w @ (yc * yc) - (w @ yc) ** 2 / sw
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1.0 - (sse @ onehot) / (sst @ onehot)


def _bacc_weighted(w: np.ndarray, y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Balanced accuracy (mean over the levels present of the weighted recall) per weight row."""
    levels = np.unique(y)
    oh = (y[:, None] == levels[None, :]).astype(np.float64)
    hit = oh * (p == y)[:, None]
    den = w @ oh
    num = w @ hit
    with np.errstate(divide="ignore", invalid="ignore"):
        rec = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return np.nanmean(rec, axis=1)


def background_decodability(
    X: Any, factors: Any, *, factor_names: Sequence[str] | None = None, use: Sequence[str] | None = None,
    categorical: str | Sequence[str] = "auto", periods: Any = None, groups: Any = None, X_test: Any = None,
    factors_test: Any = None, groups_test: Any = None, cv: int = 5, n_shuffles: int = 5,
    alpha: float | str = "cv", alphas: Sequence[float] | None = None, C: float = 1.0, n_boot: int = 200,
    ci_level: float = 0.95, max_memory: int | None = DEFAULT_MAX_MEMORY, chunk_rows: int | None = None,
    random_state: int | None = 0,
) -> DecodabilityResult:
    r"""Cross-validated (or transfer) decodability of each background factor, minus a shuffled control.

    **Continuous factor** :math:`f`: a ridge probe on standardised features,
    :math:`\min_{w,c}\sum_i (y_i - z_i^\top w - c)^2 + \alpha\lVert w\rVert^2`, predicts its target
    :math:`y`; the score is the pooled out-of-fold

    .. math:: R^2 = 1 - \frac{\sum_c\sum_i (y_{ic}-\hat y_{ic})^2}{\sum_c\sum_i (y_{ic}-\bar y_c)^2}.

    A linear factor's target is :math:`y = f` (one column). A **circular** factor (``periods``) is
    encoded as :math:`y = (\sin 2\pi f/P, \cos 2\pi f/P)` and both columns are predicted with one
    penalty; its :math:`R^2` pools both columns (sums over :math:`c` above), so 1 means the angle is
    recovered and a linear read-out of a wrapping code is not penalised at the seam.

    **Penalty** (``alpha="cv"``, default): nested cross-validation. For each outer fold :math:`k` the
    penalty is chosen from the grid ``alphas`` by an inner CV over the other ``cv - 1`` folds
    (each held out in turn, squared errors pooled), fitted on all folds but :math:`k`, and scored
    on fold :math:`k` only, so the score never sees the rows that chose its penalty. The default grid
    is :math:`\alpha = n\cdot 10^{[-3, 4]}` (15 log-spaced values; :math:`n` = rows of ``X``, the
    average eigenvalue of the standardised Gram matrix :math:`Z^\top Z`, whose trace is :math:`n d`).
    One eigen-decomposition of each training set's Gram matrix serves the whole grid, and the fit
    without folds :math:`\{k, j\}` serves both outer fold :math:`k` (scored on :math:`j`) and outer
    fold :math:`j` (scored on :math:`k`): :math:`cv(cv+1)/2` decompositions of a
    :math:`d \times d` matrix in all (15 for ``cv=5``; about 0.2 s each at :math:`d = 512`, 12 s at
    :math:`d = 2048` on one loaded core). A number
    fixes the penalty (the former default ``alpha=1`` nearly interpolates at :math:`n \approx d`:
    at :math:`n = 600, d = 512` a factor independent of the layer scored about -9 and its excess
    ranged -3.3 to 0.9 over 8 seeds; nested CV gives -0.006 to 0.005).

    The score estimates the out-of-sample :math:`R^2` of a ridge probe fitted on
    :math:`(cv-1)/cv` of the rows, on average no higher than the population :math:`R^2` of the best
    linear read-out: close to it when the rows outnumber the layer's effective dimension (0.27-0.34
    for a planted 0.3 in 512 units driven by 20 latents, n = 600), far below it when a weak signal
    hides among as many isotropic dimensions as rows (about 0.05 for a planted 0.3 on 4 of 512
    isotropic units, n = 600).

    **Categorical factor**: a logistic probe (``C``), score = balanced accuracy
    :math:`\frac1L\sum_l \Pr(\hat f = l \mid f = l)` of the out-of-fold predictions.

    **Control**: everything above (penalty selection included) repeated with the factor's rows
    shuffled, ``n_shuffles`` times; ``excess = score - control_mean``. The summaries keep one unit
    each: ``mean_excess_r2`` over continuous factors, ``mean_excess_balanced_accuracy`` over
    categorical ones.

    **Groups** (``groups``, e.g. the foreground object of each row when every object is shown on
    several backgrounds): folds take whole groups (none on both sides of a split, like
    scikit-learn's ``GroupKFold``; groups in seeded random order, largest first, each to the fold
    with the fewest rows), the bootstrap draws whole groups, and the shuffles move whole groups'
    blocks of factor values between groups (exactly a permutation of groups when they have equal
    sizes), so the control keeps the target's within-group structure and sees the same effective
    sample size (the number of groups) as the score. Without groups, rows that share
    an object leak it across folds: a layer that memorises the object then "decodes" any factor
    that is constant within the object.

    **Intervals**: the out-of-fold predictions are held fixed and the scored rows are resampled
    (whole groups when grouped; ``n_boot`` replicates, percentile ``ci_level`` intervals).
    ``score_ci`` is the interval of the score; ``excess_ci`` that of the paired replicate
    :math:`\text{score}^{(b)} - \operatorname{mean}_s \text{control}_s^{(b)}` (score and controls on
    the same resample).

    Modes: without ``X_test``, ``cv``-fold cross-validation within ``X`` (e.g. *within* the OOD or
    crossed split: the pilot shows decodability within a wide-background split is what separates a
    contaminated student from its teacher, docs/METRICS.md). With ``X_test``/``factors_test``: the
    penalty is chosen by ``cv``-fold CV on ``X``, the probe fitted on all of ``X`` and scored on
    ``X_test`` (the controls fit shuffled training factors and are scored on the real test factors).

    The ridge path streams ``X`` in one pass (per-fold Gram matrices, O(cv n_features^2) memory)
    plus one pass for predictions; categorical factors need ``X`` in memory (``max_memory``).

    Parameters
    ----------
    X : array of shape (n_samples, ...) or Activations
    factors : array of shape (n_samples, n_factors)
    factor_names : sequence of str, optional
        Names of the factor columns (default ``factor0, factor1, ...``).
    use : sequence of str, optional
        Subset of factors to analyse.
    categorical : "auto" or sequence of str, default="auto"
        ``"auto"``: integer-valued factors with at most 20 distinct values are categorical (a
        factor with a period never is).
    periods : dict or sequence, optional
        Circular factors: ``{name: period}`` (e.g. ``{"hue": 1.0, "orient": 180.0}``) or one entry
        per column of ``factors`` where NaN or 0 means linear.
    groups : array of shape (n_samples,), optional
        Group (e.g. foreground object) of each row of ``X``: group-aware folds and bootstrap.
    X_test, factors_test : optional
        The split to score on (transfer mode).
    groups_test : array of shape (n_test,), optional
        Groups of ``X_test`` rows, for the bootstrap in transfer mode.
    cv : int, default=5
        Outer folds (CV mode; at least 3 with ``alpha="cv"``) or penalty-selection folds (transfer).
    n_shuffles : int, default=5
    alpha : "cv" or float, default="cv"
    alphas : sequence of float, optional
        Penalty grid for ``alpha="cv"`` in absolute units; default ``n * DEFAULT_ALPHA_GRID``.
    C : float, default=1.0
        Inverse L2 strength of the logistic probe (categorical factors).
    n_boot : int, default=200
    ci_level : float, default=0.95
    max_memory, chunk_rows, random_state
        Memory budget for holding ``X`` whole, rows per streamed chunk, seed (folds, shuffles,
        bootstrap).

    Returns
    -------
    DecodabilityResult
    """
    inp = _check_inputs(
        X, factors, factor_names=factor_names, use=use, categorical=categorical, periods=periods,
        groups=groups, X_test=X_test, factors_test=factors_test, groups_test=groups_test, cv=cv,
        n_shuffles=n_shuffles, alpha=alpha, alphas=alphas, C=C, n_boot=n_boot, ci_level=ci_level,
        chunk_rows=chunk_rows,
    )
    rng = np.random.default_rng(random_state)
    fold = _folds(inp.n, cv, inp.gid, rng) if (not inp.transfer or inp.select) else None
    shuffles = [_shuffle(inp.n, inp.gid, rng) for _ in range(n_shuffles)]
    cont = [j for j in range(inp.F.shape[1]) if not inp.is_cat[j]]
    cat = [j for j in range(inp.F.shape[1]) if inp.is_cat[j]]
    ridge = _continuous_predictions(inp, cont, fold, shuffles, cv) if cont else None
    cat_pairs = _categorical_predictions(inp, cat, fold, shuffles, cv, C, max_memory, random_state) if cat else {}
    return _summarise(inp, cont, cat, ridge, cat_pairs, n_boot, ci_level, rng, cv, n_shuffles)


@dataclasses.dataclass
class _Inputs:
    """The checked inputs of :func:`background_decodability`: sources, factors, groups, the penalty grid."""

    src: Any
    tsrc: Any
    n: int
    F: np.ndarray
    Ft: np.ndarray | None
    names: list[str]
    per: dict[str, float | None]
    is_cat: list[bool]
    gid: np.ndarray | None
    tgid: np.ndarray | None
    grid: np.ndarray
    select: bool

    @property
    def transfer(self) -> bool:
        return self.tsrc is not None

    @property
    def n_score(self) -> int:
        return self.tsrc.n_rows if self.tsrc is not None else self.n

    @property
    def score_gid(self) -> np.ndarray | None:
        """Groups of the scored rows (the bootstrap's units), None when rows are the units."""
        return self.tgid if self.transfer else self.gid


def _check_inputs(X: Any, factors: Any, *, factor_names: Sequence[str] | None, use: Sequence[str] | None,
                  categorical: str | Sequence[str], periods: Any, groups: Any, X_test: Any, factors_test: Any,
                  groups_test: Any, cv: int, n_shuffles: int, alpha: float | str, alphas: Sequence[float] | None,
                  C: float, n_boot: int, ci_level: float, chunk_rows: int | None) -> _Inputs:
    """Validate every argument of :func:`background_decodability` before any fit."""
    own = "background_decodability"
    check_number(own, "cv", cv, low=2, integer=True)
    check_number(own, "n_shuffles", n_shuffles, low=1, integer=True)
    check_number(own, "alpha", alpha, low=0, allow=("cv",))
    check_number(own, "C", C, low=0, low_open=True)
    check_number(own, "n_boot", n_boot, low=1, integer=True)
    check_number(own, "ci_level", ci_level, low=0, high=1, low_open=True)
    select = isinstance(alpha, str)
    src = as_source(X, "X", chunk_rows=chunk_rows, min_rows=3)
    n = src.n_rows
    if select:
        grid = (np.asarray(DEFAULT_ALPHA_GRID) * n if alphas is None
                else np.asarray(alphas, dtype=np.float64).ravel())
        if grid.size == 0 or not np.isfinite(grid).all() or (grid < 0).any():
            raise DataError(f"alphas must be a non-empty sequence of finite penalties >= 0; got {alphas!r}.")
    else:
        grid = np.array([float(alpha)])
    F, names = as_factors(factors, n, factor_names, use)
    raw = np.asarray(factors)
    n_cols = 1 if raw.ndim == 1 else int(raw.shape[1])
    all_names = [f"factor{i}" for i in range(n_cols)] if factor_names is None else [str(s) for s in factor_names]
    per = _resolve_periods(periods, all_names, names)
    transfer = X_test is not None
    if transfer != (factors_test is not None):
        raise DataError("Pass X_test and factors_test together (the split to score on), or neither.")
    if groups_test is not None and not transfer:
        raise DataError("groups_test describes X_test rows; pass it with X_test and factors_test, or use groups=.")
    gid = _group_index(groups, n, "groups") if groups is not None else None
    n_units = n if gid is None else int(gid.max()) + 1
    unit = "rows" if gid is None else "groups"
    tsrc, Ft = None, None
    if transfer:
        tsrc = as_source(X_test, "X_test", chunk_rows=chunk_rows, min_rows=2)
        if tsrc.n_features != src.n_features:
            raise DataError(
                f"X_test has {tsrc.n_features} features but X has {src.n_features}; pass the same layer."
            )
        Ft = np.asarray(factors_test, dtype=np.float64)
        Ft = Ft[:, None] if Ft.ndim == 1 else Ft
        if Ft.shape[0] != tsrc.n_rows:
            raise DataError(f"factors_test has {Ft.shape[0]} rows but X_test has {tsrc.n_rows}.")
        Ft, _ = as_factors(Ft, tsrc.n_rows, factor_names if factor_names is not None else None, use,
                           name="factors_test")
    if (not transfer or select) and (n < 2 * cv or n_units < cv):
        need = f"at least {2 * cv} rows" if n < 2 * cv else f"at least {cv} groups"
        raise DataError(
            f"{cv}-fold cross-validation needs {need}; X has {n} rows in {n_units} {unit}. Lower cv or pass more."
        )
    if select and not transfer and cv < 3:
        raise DataError(
            "alpha='cv' chooses the penalty by an inner CV over the other cv - 1 folds, so it needs cv >= 3; "
            "raise cv or pass a fixed alpha."
        )
    tgid = None
    if transfer and groups_test is not None:
        tgid = _group_index(groups_test, tsrc.n_rows, "groups_test")  # type: ignore[union-attr]
    if categorical == "auto":
        is_cat = [per[nm] is None and _is_categorical(F[:, j]) for j, nm in enumerate(names)]
    else:
        cats = [categorical] if isinstance(categorical, str) else list(categorical)
        unknown = [c for c in cats if c not in names]
        if unknown:
            raise DataError(f"categorical names {unknown} are not factors; the factors are {names}.")
        both = [c for c in cats if per[c] is not None]
        if both:
            raise DataError(f"Factor(s) {both} are declared both categorical and circular (periods); pick one.")
        is_cat = [nm in cats for nm in names]
    return _Inputs(src=src, tsrc=tsrc, n=n, F=F, Ft=Ft, names=names, per=per, is_cat=is_cat, gid=gid, tgid=tgid,
                   grid=grid, select=select)


@dataclasses.dataclass
class _RidgeScores:
    """Every continuous target (real factors, then each shuffled copy) in one ridge problem."""

    target: np.ndarray  # (n_score, t): what the predictions are scored against
    pred: np.ndarray  # (n_score, t)
    onehot: np.ndarray  # (t, S1 * K): column -> target (a circular factor's two columns pool)
    r2: np.ndarray  # (S1 * K,): the unweighted score of each target
    chosen: np.ndarray  # (n_outer, S1 * K): the penalty of each target in each outer fold
    K: int  # continuous factors


def _continuous_predictions(inp: _Inputs, cont: list[int], fold: np.ndarray | None, shuffles: list[np.ndarray],
                            cv: int) -> _RidgeScores:
    """Ridge predictions and R² of the continuous factors ``cont`` and of their shuffled copies."""
    K = len(cont)
    S1 = 1 + len(shuffles)
    blocks = [_encode(inp.F[:, j], inp.per[inp.names[j]]) for j in cont]
    col_factor = np.concatenate([np.full(b.shape[1], i) for i, b in enumerate(blocks)])
    Yb = np.column_stack(blocks)
    Y = np.column_stack([Yb] + [Yb[p] for p in shuffles])
    col_target = np.concatenate([col_factor + s * K for s in range(S1)])
    onehot = np.zeros((col_target.size, S1 * K))
    onehot[np.arange(col_target.size), col_target] = 1.0
    fold_fit = fold if fold is not None else np.zeros(inp.n, dtype=np.int64)
    pred, chosen = _ridge_predict(inp.src, inp.tsrc, Y, col_target, fold_fit, cv if fold is not None else 1,
                                  inp.grid, inp.select)
    if inp.transfer:
        target = np.tile(np.column_stack([_encode(inp.Ft[:, j], inp.per[inp.names[j]])  # type: ignore[index]
                                          for j in cont]), (1, S1))
    else:
        target = Y
    r2 = _r2_weighted(np.ones((1, inp.n_score)), target, pred, onehot)[0]
    return _RidgeScores(target=target, pred=pred, onehot=onehot, r2=r2, chosen=chosen, K=K)


def _categorical_predictions(inp: _Inputs, cat: list[int], fold: np.ndarray | None, shuffles: list[np.ndarray],
                             cv: int, C: float, max_memory: int | None, random_state: int | None
                             ) -> dict[int, list[tuple[np.ndarray, np.ndarray]]]:
    """Per categorical factor ``j``: ``(labels, predictions)`` of the logistic probe for the factor,
    then for each shuffled copy, out of fold (CV mode) or on the test split (transfer mode)."""
    Xa = inp.src.load_within(max_memory, "a categorical factor's logistic probe")
    Xt = inp.tsrc.load_within(max_memory, "a categorical factor's logistic probe") if inp.transfer else None
    pairs: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for j in cat:
        name = inp.names[j]
        y = inp.F[:, j].astype(np.int64)
        _, counts = np.unique(y, return_counts=True)
        if not inp.transfer and counts.min() < cv:
            raise DataError(
                f"Factor {name!r} (categorical) has a level with {counts.min()} row(s), fewer than "
                f"cv={cv}. Lower cv, merge rare levels, or declare it continuous (categorical=[...])."
            )

        def run(target: np.ndarray, j: int = j, name: str = name) -> tuple[np.ndarray, np.ndarray]:
            probe = LinearProbe(C=C, max_memory=max_memory, random_state=random_state)
            if inp.transfer:
                probe.fit(Xa, target)
                return inp.Ft[:, j].astype(np.int64), probe.predict(Xt)  # type: ignore[index]
            p = np.empty(inp.n, dtype=np.int64)
            for f in range(cv):
                tr = fold != f
                if np.unique(target[tr]).size < 2:
                    raise DataError(
                        f"Factor {name!r}: a training fold holds a single level; lower cv or pass more groups."
                    )
                p[~tr] = probe.fit(Xa[tr], target[tr]).predict(Xa[~tr])
            return target, p

        pairs[j] = [run(y)] + [run(y[s]) for s in shuffles]
    return pairs


def _summarise(inp: _Inputs, cont: list[int], cat: list[int], ridge: _RidgeScores | None,
               cat_pairs: dict[int, list[tuple[np.ndarray, np.ndarray]]], n_boot: int, ci_level: float,
               rng: np.random.Generator, cv: int, n_shuffles: int) -> DecodabilityResult:
    """Scores, controls, excess and their bootstrap intervals (one set of replicates for every factor)."""
    names = inp.names
    score_gid = inp.score_gid
    bgid = np.arange(inp.n_score) if score_gid is None else score_gid
    S1 = 1 + n_shuffles
    out: dict[str, dict[str, Any]] = {k: {} for k in ("metric", "score", "ci", "cm", "cs", "ex", "exci", "alpha")}
    boot_r2, boot_ba = [], {j: [] for j in cat}  # type: ignore[var-annotated]
    for w in _boot_weights(bgid, n_boot, rng):
        if ridge is not None:
            boot_r2.append(_r2_weighted(w, ridge.target, ridge.pred, ridge.onehot))
        for j in cat:
            boot_ba[j].append(np.column_stack([_bacc_weighted(w, yt, p) for yt, p in cat_pairs[j]]))

    def record(name: str, metric: str, score: float, controls: np.ndarray, sb: np.ndarray, cb: np.ndarray) -> None:
        cm = float(np.mean(controls))
        out["metric"][name] = metric
        out["score"][name] = float(score)
        out["ci"][name] = percentile_ci(sb, ci_level)
        out["cm"][name] = cm
        out["cs"][name] = float(np.std(controls, ddof=1)) if controls.size > 1 else 0.0
        out["ex"][name] = float(score) - cm
        out["exci"][name] = percentile_ci(sb - cb.mean(axis=1), ci_level)

    if ridge is not None:
        R = np.concatenate(boot_r2)  # (n_boot, S1 * K)
        K = ridge.K
        for i, j in enumerate(cont):
            idx = [s * K + i for s in range(S1)]
            record(names[j], "r2", ridge.r2[i], ridge.r2[idx[1:]], R[:, i], R[:, idx[1:]])
            out["alpha"][names[j]] = [float(a) for a in ridge.chosen[:, i]]
    for j in cat:
        Bm = np.concatenate(boot_ba[j])  # (n_boot, S1)
        sc = np.array([_bacc_weighted(np.ones((1, yt.size)), yt, p)[0] for yt, p in cat_pairs[j]])
        record(names[j], "balanced_accuracy", sc[0], sc[1:], Bm[:, 0], Bm[:, 1:])

    def mean_of(js: list[int]) -> float | None:
        return float(np.mean([out["ex"][names[j]] for j in js])) if js else None

    return DecodabilityResult(
        mode="transfer" if inp.transfer else "cv", factor_names=names, metric=out["metric"],
        period={nm: inp.per[nm] for nm in names}, score=out["score"], score_ci=out["ci"], control_mean=out["cm"],
        control_sd=out["cs"], excess=out["ex"], excess_ci=out["exci"], alpha=out["alpha"],
        mean_excess_r2=mean_of(cont), mean_excess_balanced_accuracy=mean_of(cat),
        n_fit=inp.n, n_score=inp.n_score, n_groups=None if score_gid is None else int(score_gid.max()) + 1,
        cv=None if inp.transfer and not inp.select else cv, n_shuffles=n_shuffles, ci_level=float(ci_level),
    )
