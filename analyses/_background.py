"""Unit-background correlation, counterfactual background sensitivity and normalised mean shift."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator

from probekit.errors import DataError

from ._common import (
    DEFAULT_MAX_MEMORY,
    FitFirstError,
    ResultMixin,
    as_factors,
    as_source,
    as_vector,
    check_number,
    check_option,
    compute_dtype,
    null_abs_r,
    percentile_ci,
)

__all__ = [
    "BackgroundCorrelation",
    "BackgroundCorrelationResult",
    "BackgroundSensitivityResult",
    "NormalizedMeanShiftResult",
    "background_sensitivity",
    "normalized_mean_shift",
]


def _bh(p: np.ndarray, alpha: float) -> np.ndarray:
    """Benjamini-Hochberg step-up: boolean mask of rejected hypotheses (NaN never rejected)."""
    flat = p.ravel()
    ok = np.isfinite(flat)
    out = np.zeros(flat.shape, dtype=bool)
    q = flat[ok]
    m = q.size
    if m == 0:
        return out.reshape(p.shape)
    order = np.argsort(q, kind="stable")
    below = q[order] <= alpha * np.arange(1, m + 1) / m
    if below.any():
        kmax = int(np.max(np.flatnonzero(below)))
        rej = np.zeros(m, dtype=bool)
        rej[order[: kmax + 1]] = True
        out[np.flatnonzero(ok)] = rej
    return out.reshape(p.shape)


@dataclasses.dataclass(repr=False)
class BackgroundCorrelationResult(ResultMixin):
    """Per-layer summary of :class:`BackgroundCorrelation` (per-unit arrays included).

    With permutations, ``p_values`` come from each unit's own permutation null; ``threshold[f]`` is
    the mean over live units of their own (1 - ``alpha``) null quantile of |r| and
    ``share_above_threshold[f]`` the share of live units above their own; ``fwer_threshold[f]`` is
    one family-wise value, the same for every factor (the (1 - ``alpha``) quantile of the maximum
    null |r| over all live units and factors); ``share_significant`` is Benjamini-Hochberg at
    ``alpha`` over units x factors. See :class:`BackgroundCorrelation`.
    """

    n_samples: int
    n_units: int
    n_dead_units: int
    factor_names: list[str]
    mean_abs_pearson: dict[str, float]
    mean_abs_spearman: dict[str, float] | None
    noise_floor: float
    null_mean_abs_r: dict[str, float]
    threshold: dict[str, float]
    share_above_threshold: dict[str, float]
    fwer_threshold: dict[str, float]
    share_above_fwer_threshold: dict[str, float]
    share_significant: dict[str, float]
    share_any_factor_significant: float
    mean_factor_r2: float
    layer_factor_r2: float
    null_factor_r2: float
    mean_label_eta2: float | None
    layer_label_eta2: float | None
    null_label_eta2: float | None
    alpha: float
    n_permutations: int
    spearman_exact: bool | None
    pearson: np.ndarray
    spearman: np.ndarray | None
    label_corr: np.ndarray | None
    factor_r2: np.ndarray
    label_eta2: np.ndarray | None
    p_values: np.ndarray


class BackgroundCorrelation(BaseEstimator):
    r"""Per-unit correlation of a layer with background factors and the label, against a permutation null.

    One streamed pass over the rows (running sums; the result does not depend on the chunk size
    beyond float rounding) gives, for unit :math:`u` and factor :math:`f`,

    .. math:: r_{uf} = \frac{\sum_i (x_{iu}-\bar x_u)(f_i-\bar f)}
                            {\sqrt{\sum_i (x_{iu}-\bar x_u)^2 \sum_i (f_i-\bar f)^2}}

    and the same with each one-vs-rest class indicator of the label (point-biserial ``label_corr``).
    Variance shares per unit: ``factor_r2`` = :math:`R^2` of the least-squares regression of the
    unit on all factors, :math:`c_u^\top C_{ff}^{-1} c_u / \mathrm{var}(x_u)`; ``label_eta2`` =
    between-class share :math:`\sum_k n_k(\bar x_{u,k}-\bar x_u)^2 / \sum_i (x_{iu}-\bar x_u)^2`.
    Layer values weight units by their variance. Null levels: :math:`E|r| \approx \sqrt{2/(\pi N)}`
    (``noise_floor``), :math:`E R^2 \approx F/(N-1)`, :math:`E\eta^2 \approx (K-1)/(N-1)`.

    **Permutation null.** The factor rows are shuffled ``n_permutations`` times (the same shuffles for
    every unit, computed in the same pass as one matrix product). Each unit is tested against its own
    permutation null (the permutation variance of r is 1/(N-1) for every unit, but its tails are not:
    a heavy-tailed unit against a heavy-tailed factor has heavier ones, so a null pooled over units
    rejected heavy-tailed units too often at small levels and light-tailed ones too rarely):
    :math:`p_{uf} = (1 + \#\{\pi: |r^\pi_{uf}| \ge |r_{uf}|\})/(1 + P)`, valid for every unit
    whatever its distribution. From it:

    - ``share_significant``: Benjamini-Hochberg at ``alpha`` across all units x factors on these
      p-values (FDR). A p-value is at least :math:`1/(1+P)`, so BH over :math:`m` tests can reject
      only once about :math:`m/(\alpha (1+P))` tests reach that floor: with many units and few
      permutations it finds nothing unless many units are affected. Raise ``n_permutations`` (to
      ``m / alpha`` for single discoveries) or use ``n_permutations=0``.
    - ``threshold[f]``: the mean over live units of each unit's own (1-alpha) null quantile of |r|
      (a typical per-unit critical value); ``share_above_threshold[f]``: the share of live units
      above their own quantile (uncorrected; about ``alpha`` under the null).
    - ``fwer_threshold``: the (1-alpha) quantile over permutations of the maximum |r| over **all**
      live units and **all** factors (family-wise control over the whole family; the same value for
      every factor); ``share_above_fwer_threshold[f]``: share of live units above it. Under the
      null, any unit of any factor exceeds it in about ``alpha`` of data sets.
    - ``null_mean_abs_r[f]``: mean null |r| over live units and permutations.

    **Parametric null** (``n_permutations=0``). The permutation products cost rows x units x
    ``n_permutations`` x factors multiply-adds, far more than the rest of the pass (on a 2-core CPU,
    100 permutations of 6 factors run at a few percent of the store's read speed). With
    ``n_permutations=0`` none are formed: p-values come from Student's t on r with N-2 degrees of
    freedom (exact when the unit or the factor is Gaussian, the large-N limit otherwise),
    ``threshold`` is the |r| with two-sided p = alpha, ``fwer_threshold`` the Sidak-corrected one
    over the live units x factors (conservative where units correlate, where the permutation
    max-statistic is not), and ``null_abs_r_`` is empty. Its small p-values are too small when
    both the unit and the factor are heavy-tailed, where the permutation family-wise threshold holds
    its level (docs/METRICS.md, "Unit–background correlation").

    **Spearman** is the Pearson correlation of ranks (average ranks for ties). Ranks need the whole
    column: it is exact when the layer fits ``max_memory``; otherwise it is computed on a seeded
    uniform subsample of rows that fits (``spearman_exact=False`` in the result).

    Units with zero variance (dead units) get NaN correlations, are counted in ``n_dead_units`` and
    are left out of shares and means (which are over live units).

    Parameters
    ----------
    n_permutations : int, default=200
        0 uses the parametric null (see above).
    alpha : float, default=0.05
    spearman : bool, default=True
    max_memory : int or None, default=1 GiB
    chunk_rows : int, optional
    random_state : int, optional

    Attributes
    ----------
    pearson_ : ndarray of shape (n_units, n_factors)
    spearman_ : ndarray of shape (n_units, n_factors) or None
    label_corr_ : ndarray of shape (n_units, n_classes) or None
    label_eta2_ : ndarray of shape (n_units,) or None
    factor_r2_ : ndarray of shape (n_units,)
    p_values_ : ndarray of shape (n_units, n_factors)
    significant_ : ndarray of bool, shape (n_units, n_factors)
        Benjamini-Hochberg rejections at ``alpha``.
    null_abs_r_ : ndarray of shape (n_units, n_permutations, n_factors)
    factor_names_ : list of str
    result_ : BackgroundCorrelationResult
    """

    def __init__(self, *, n_permutations: int = 200, alpha: float = 0.05, spearman: bool = True,
                 max_memory: int | None = DEFAULT_MAX_MEMORY, chunk_rows: int | None = None,
                 random_state: int | None = None) -> None:
        self.n_permutations = n_permutations
        self.alpha = alpha
        self.spearman = spearman
        self.max_memory = max_memory
        self.chunk_rows = chunk_rows
        self.random_state = random_state

    def fit(self, X: Any, factors: Any, label: Any = None, *, factor_names: Sequence[str] | None = None,
            use: Sequence[str] | None = None) -> BackgroundCorrelation:
        """Compute everything in one pass over ``X`` (array or Activations).

        Parameters
        ----------
        X : array of shape (n_samples, ...) or Activations
        factors : array of shape (n_samples, n_factors)
        label : array of shape (n_samples,), optional
        factor_names : list of str, optional
        use : list of str, optional
            Only these factors (names must exist).
        """
        own = type(self).__name__
        check_number(own, "n_permutations", self.n_permutations, low=0, integer=True)
        check_number(own, "alpha", self.alpha, low=0, high=1, low_open=True)
        cdt = compute_dtype(X)
        src = as_source(X, "X", chunk_rows=self.chunk_rows, dtype=cdt, min_rows=3)
        n, d = src.n_rows, src.n_features
        F, names = as_factors(factors, n, factor_names, use)
        nf = F.shape[1]
        Fc = F - F.mean(axis=0)
        Zc = Fc
        K = 0
        if label is not None:
            y = as_vector(label, "label", n, numeric=False)
            classes, yi = np.unique(y, return_inverse=True)
            if classes.size < 2:
                raise DataError(
                    f"label has a single class ({classes[0]!r}) over {n} rows; a label correlation needs "
                    "at least 2. Pass label=None or a split with several classes."
                )
            K = classes.size
            onehot = np.eye(K)[yi]
            counts = onehot.sum(axis=0)
            Zc = np.column_stack([Fc, onehot - counts / n])
        P = int(self.n_permutations)
        rng = np.random.default_rng(self.random_state)
        # row i of chunk rows takes factor row perms_t[i, p] in permutation p; stored row-major so
        # a chunk's gather Fc[perms_t[start:stop]] is (rows, P, nf) and flattens without a copy
        idt = np.int64 if n > 2**31 - 1 else np.int32
        # (n, P) row indices: 4 bytes per row and permutation, e.g. 80 MB for 100k rows x 200
        perms_t = np.empty((n, P), dtype=idt)
        for p in range(P):
            perms_t[:, p] = rng.permutation(n)
        # [1, Zc]^T, row-major: one product per chunk gives the column sums and the covariances
        # with factors and classes (one pass over the chunk instead of two)
        W = np.ascontiguousarray(np.column_stack([np.ones(n), Zc]).T.astype(cdt))
        Fc_c = Fc.astype(cdt) if P else None  # the factors the permutations gather from

        shift = None
        s2 = np.zeros(d)
        SW = np.zeros((W.shape[0], d))
        Sxg = np.zeros((P * nf, d))
        buf = None  # the shifted chunk, reused: a new chunk-sized array per chunk cost its page faults
        # the finite check rides on the sums of squares (a NaN or inf makes its column's sum
        # non-finite) instead of a separate pass over every value; with the reused buffer the pass
        # without permutations went from 0.094 to 0.081 s on 195 MiB in the page cache
        # (benchmarks/bench_streaming.py --perms 0, before/after, docs/BENCHMARKS.md)
        for start, raw in src.chunks(check_finite=False):
            rows = raw.shape[0]
            stop = start + rows
            with np.errstate(invalid="ignore", over="ignore"):  # a NaN / inf is caught just below
                if shift is None:
                    shift = raw.mean(axis=0, dtype=np.float64).astype(cdt)
                if buf is None or buf.shape[0] < rows:
                    buf = np.empty((rows, d), dtype=cdt)  # the source casts every chunk to cdt
                a = np.subtract(raw, shift, out=buf[:rows])
                s2c = np.einsum("ij,ij->j", a, a)
            if not np.isfinite(s2c).all():
                src.check_finite(raw, start)  # names the row; finite values whose squares overflow go on
            s2 += s2c
            SW += W[:, start:stop] @ a
            if P:
                # the permutation null is the pass's main cost (rows x d x P*nf multiply-adds):
                # one BLAS product per chunk in the compute dtype, totals kept in float64
                G = np.take(Fc_c, perms_t[start:stop], axis=0).reshape(a.shape[0], P * nf)
                Sxg += G.T @ a
        s1, Sxz = SW[0], SW[1:].T
        Sxg = Sxg.T
        m = s1 / n
        var = s2 / n - m * m
        dead = var <= 1e-12 * (np.abs(m + shift) ** 2 + s2 / n) + 1e-300
        var = np.where(dead, np.nan, var)
        sd = np.sqrt(var)
        sdz = np.sqrt((Zc * Zc).mean(axis=0))
        r_all = (Sxz / n) / (sd[:, None] * sdz[None, :])
        pearson = r_all[:, :nf]
        rperm = (Sxg / n).reshape(d, P, nf) / (sd[:, None, None] * sdz[None, None, :nf])
        live = ~dead
        self.n_dead_ = int(dead.sum())
        if not live.any():
            raise DataError(
                f"All {d} units of X have zero variance over the {n} rows (dead or constant layer); "
                "no correlation can be computed. Check the layer and the split."
            )

        # variance shares
        Cff = Fc.T @ Fc / n
        cov = Sxz[:, :nf] / n
        factor_r2 = np.einsum("uf,fg,ug->u", cov, np.linalg.pinv(Cff), cov) / var
        layer_factor_r2 = float(np.nansum(factor_r2 * var) / np.nansum(var))
        label_corr = label_eta2 = None
        mean_eta = layer_eta = null_eta = None
        if K:
            label_corr = r_all[:, nf:]
            between = (Sxz[:, nf:] ** 2 / counts[None, :]).sum(axis=1)
            label_eta2 = between / (n * var)
            mean_eta = float(np.nanmean(label_eta2))
            layer_eta = float(np.nansum(between[live]) / np.nansum(n * var))
            null_eta = (K - 1) / (n - 1)

        absr = np.abs(pearson)
        pvals = np.full((d, nf), np.nan)
        thr, fwer, share_thr, share_fwer, null_mean = {}, {}, {}, {}, {}
        if P:  # per-unit permutation null; the family-wise one from the max over units and factors
            null = np.abs(rperm[live])  # (live, P, nf)
            obs = absr[live]  # (live, nf)
            ge = np.count_nonzero(null >= obs[:, None, :], axis=1)
            pvals[live] = (1.0 + ge) / (1.0 + P)
            q_unit = np.quantile(null, 1 - self.alpha, axis=1)  # each unit's own critical |r|
            family = float(np.quantile(null.max(axis=(0, 2)), 1 - self.alpha))
            for j, name in enumerate(names):
                thr[name] = float(q_unit[:, j].mean())
                share_thr[name] = float(np.mean(obs[:, j] > q_unit[:, j]))
                fwer[name] = family
                null_mean[name] = float(null[:, :, j].mean())
        else:  # parametric null: Student t on r with n - 2 degrees of freedom, Sidak over units x factors
            from scipy.stats import t as student_t

            df = n - 2
            r_live = np.clip(absr[live], 0.0, 1.0)
            with np.errstate(divide="ignore"):
                tstat = r_live * np.sqrt(df / np.maximum(1.0 - r_live**2, 0.0))
            pvals[live] = 2.0 * student_t.sf(tstat, df)
            n_live = int(live.sum())

            def r_crit(level: float) -> float:  # |r| whose two-sided p-value is `level`
                tc = student_t.isf(level / 2.0, df)
                return float(tc / np.sqrt(df + tc * tc))

            sidak = -np.expm1(np.log1p(-self.alpha) / (n_live * nf))  # 1 - (1 - alpha)^(1/m), m tests
            for j, name in enumerate(names):
                thr[name], fwer[name] = r_crit(self.alpha), r_crit(sidak)
                share_thr[name] = float(np.mean(absr[live, j] > thr[name]))
                null_mean[name] = null_abs_r(n)
        for j, name in enumerate(names):
            share_fwer[name] = float(np.mean(absr[live, j] > fwer[name]))
        sig = _bh(pvals, self.alpha)

        # Spearman
        spear = None
        spear_exact = None
        if self.spearman:
            from scipy.stats import rankdata

            if src.fits(self.max_memory):
                Xs, Fs, spear_exact = src.load(), F, True
            else:
                rows = max(3, int(self.max_memory // (8 * d)))
                idx = np.sort(rng.choice(n, size=min(rows, n), replace=False))
                Xs, Fs, spear_exact = src.take(idx), F[idx], False
            spear = _pearson_cols(rankdata(Xs, axis=0), rankdata(Fs, axis=0))
            spear[dead] = np.nan

        self.pearson_ = pearson
        self.spearman_ = spear
        self.label_corr_ = label_corr
        self.label_eta2_ = label_eta2
        self.factor_r2_ = factor_r2
        self.p_values_ = pvals
        self.significant_ = sig
        self.null_abs_r_ = np.abs(rperm)
        self.factor_names_ = names
        self.threshold_ = thr
        self.fwer_threshold_ = fwer
        self.result_ = BackgroundCorrelationResult(
            n_samples=n, n_units=d, n_dead_units=self.n_dead_, factor_names=names,
            mean_abs_pearson={nm: float(np.nanmean(absr[:, j])) for j, nm in enumerate(names)},
            mean_abs_spearman=None if spear is None else
            {nm: float(np.nanmean(np.abs(spear[:, j]))) for j, nm in enumerate(names)},
            noise_floor=null_abs_r(n), null_mean_abs_r=null_mean, threshold=thr,
            share_above_threshold=share_thr, fwer_threshold=fwer, share_above_fwer_threshold=share_fwer,
            share_significant={nm: float(np.mean(sig[live, j])) for j, nm in enumerate(names)},
            share_any_factor_significant=float(np.mean(sig[live].any(axis=1))),
            mean_factor_r2=float(np.nanmean(factor_r2)), layer_factor_r2=layer_factor_r2,
            null_factor_r2=nf / (n - 1), mean_label_eta2=mean_eta, layer_label_eta2=layer_eta,
            null_label_eta2=null_eta, alpha=float(self.alpha), n_permutations=P,
            spearman_exact=spear_exact, pearson=pearson, spearman=spear, label_corr=label_corr,
            factor_r2=factor_r2, label_eta2=label_eta2, p_values=pvals,
        )
        return self

    def to_dict(self) -> dict[str, Any]:
        if not hasattr(self, "result_"):
            raise FitFirstError("This BackgroundCorrelation instance is not fitted yet. Call 'fit' first.")
        return self.result_.to_dict()


def _pearson_cols(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    A = A - A.mean(axis=0)
    B = B - B.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (A.T @ B) / np.outer(np.sqrt((A * A).sum(axis=0)), np.sqrt((B * B).sum(axis=0)))


# =================================================================================================
# Counterfactual background sensitivity
# =================================================================================================
@dataclasses.dataclass(repr=False)
class BackgroundSensitivityResult(ResultMixin):
    """Share of variance that comes from the background with the foreground (group) fixed."""

    layer: float
    layer_ci: tuple[float, float]
    mean_unit: float
    n_rows: int
    n_groups: int
    min_group_size: int
    n_dead_units: int
    ci_level: float
    per_unit: np.ndarray


#: bootstrap replicates computed together (their counts and sums held at once: 256 x units floats)
_BOOT_BLOCK = 256


def background_sensitivity(X: Any, group: Any, *, n_boot: int = 200, ci_level: float = 0.95,
                           chunk_rows: int | None = None, random_state: int | None = 0) -> BackgroundSensitivityResult:
    r"""Counterfactual background sensitivity of a layer.

    Rows sharing a ``group`` show the same foreground on different backgrounds. With group means
    :math:`\bar x_{g}` and the grand mean :math:`\bar x`,

    .. math:: s_u = \frac{\sum_i (x_{iu} - \bar x_{g(i)u})^2}{\sum_i (x_{iu} - \bar x_u)^2},\qquad
              s_{\text{layer}} = \frac{\sum_u \sum_i (x_{iu} - \bar x_{g(i)u})^2}{\sum_u \sum_i (x_{iu} - \bar x_u)^2}

    i.e. within-group (background) variance over total variance, per unit and for the layer. 0: the
    representation ignores the background; :math:`(N-G)/(N-1) \approx 1`: it ignores the foreground.
    One streamed pass of per-group sums. The layer interval resamples whole groups (bootstrap).
    Measure it on a split whose backgrounds reach beyond training (``crossed``) and next to the same
    architecture at initialisation (docs/METRICS.md).

    Parameters
    ----------
    X : array of shape (n_samples, ...) or Activations
    group : array of shape (n_samples,)
        Foreground id of each row; every group needs at least 2 rows.
    n_boot : int, default=200
    """
    check_number("background_sensitivity", "n_boot", n_boot, low=1, integer=True)
    src = as_source(X, "X", chunk_rows=chunk_rows, min_rows=2)
    g = as_vector(group, "group", src.n_rows, numeric=False)
    ids, gi = np.unique(g, return_inverse=True)
    G = ids.size
    ng = np.bincount(gi, minlength=G).astype(np.float64)
    if ng.min() < 2:
        bad = ids[int(np.argmin(ng))]
        raise DataError(
            f"group {bad!r} has only {int(ng.min())} row; background sensitivity needs every foreground "
            "group rendered on at least 2 backgrounds. Drop singleton groups or render more backgrounds."
        )
    if G < 2:
        raise DataError("group has a single value; at least 2 foreground groups are needed to compare.")
    d = src.n_features
    S = np.zeros((G, d))
    Q = np.zeros((G, d))
    shift = None
    for start, a in src.chunks():
        if shift is None:
            shift = a.mean(axis=0)
        a = a - shift  # a new array: the chunk may be the caller's memory
        gc = gi[start:start + a.shape[0]]
        np.add.at(S, gc, a)
        np.add.at(Q, gc, np.multiply(a, a, out=a))  # squared in place: one chunk-sized temporary fewer
    n = float(ng.sum())
    # the sums below hold no (G, d) array beyond S and Q: with a 1,000-wide output on 2,500 objects each such
    # array is 20 MB, and the within-group table, its temporaries and a copy of S's live columns made five
    q_all = Q.sum(axis=0)
    within = q_all - np.einsum("gd,gd,g->d", S, S, 1.0 / ng)  # sum over groups of Q - S^2 / n_g
    total = q_all - S.sum(axis=0) ** 2 / n
    dead = total <= 1e-12 * (q_all + 1e-300)
    if dead.all():
        raise DataError(
            f"background_sensitivity: every one of the {dead.size} units is constant over the {n} rows, so "
            "there is no variance to split into foreground and background. Check the layer (dead ReLUs?) "
            "or the data."
        )
    with np.errstate(invalid="ignore", divide="ignore"):
        per_unit = np.where(dead, np.nan, within / total)
    layer = float(within[~dead].sum() / total[~dead].sum()) if (~dead).any() else float("nan")
    rng = np.random.default_rng(random_state)
    boots = np.empty(n_boot)
    live = ~dead
    lf = live.astype(np.float64)
    q = Q @ lf  # per group, over the live units
    wg = q - np.einsum("gd,gd,d->g", S, S, lf) / ng
    # replicates in blocks, each a matrix product over groups: one replicate at a time copied the (G, d)
    # sums twice per replicate (10 of 18 s of audit() at 1,000 images with a 1,000-wide output layer)
    for lo in range(0, n_boot, _BOOT_BLOCK):
        counts = np.stack([np.bincount(rng.integers(0, G, G), minlength=G)
                           for _ in range(min(_BOOT_BLOCK, n_boot - lo))]).astype(np.float64)
        tot = counts @ q - (((counts @ S) ** 2) @ lf) / (counts @ ng)
        boots[lo:lo + len(counts)] = (counts @ wg) / tot
    return BackgroundSensitivityResult(
        layer=layer, layer_ci=percentile_ci(boots, ci_level), mean_unit=float(np.nanmean(per_unit)),
        n_rows=int(n), n_groups=int(G), min_group_size=int(ng.min()), n_dead_units=int(dead.sum()),
        ci_level=float(ci_level), per_unit=per_unit,
    )


# =================================================================================================
# Normalised mean shift
# =================================================================================================
@dataclasses.dataclass(repr=False)
class NormalizedMeanShiftResult(ResultMixin):
    """Normalised mean shift of a layer from background family a to family b.

    ``nms`` is the plug-in value, ``nms_debiased`` = ``nms`` - ``null_level`` its bias-corrected
    estimate, and ``ci`` an interval for the true NMS (see :func:`normalized_mean_shift`).
    """

    nms: float
    nms_debiased: float
    ci: tuple[float, float]
    null_level: float
    sum_var_a: float
    n_a: int
    n_b: int
    paired: bool
    ci_level: float
    per_unit_shift2: np.ndarray


class _NmsSums:
    """Shifted running sums of one family (or of paired differences) for NMS.

    Per chunk: column sums ``s1``, the total of squares ``q`` (summed over units as well: only
    sums over units of variances are needed), and the same weighted by the bootstrap's Poisson
    weights (``ws1`` of shape (n_boot, d), ``wq`` and ``w`` of shape (n_boot,)).
    """

    def __init__(self) -> None:
        self.n = 0
        self.shift: np.ndarray | None = None
        self.s1: Any = 0.0
        self.q = 0.0
        self.w: Any = 0.0
        self.ws1: Any = 0.0
        self.wq: Any = 0.0

    def add(self, a: np.ndarray, W: np.ndarray) -> None:
        if self.shift is None:
            self.shift = a.mean(axis=0)
        a = a - self.shift
        q = np.einsum("ij,ij->i", a, a)
        self.n += a.shape[0]
        self.s1 = self.s1 + a.sum(axis=0)
        self.q += float(q.sum())
        self.w = self.w + W.sum(axis=1)
        self.ws1 = self.ws1 + W @ a
        self.wq = self.wq + W @ q


def _nms_stats(acc: _NmsSums) -> dict[str, Any]:
    """Means, sums over units of the population variance, the same per bootstrap replicate."""
    n = acc.n
    m = acc.s1 / n  # shifted mean (d,)
    w = np.asarray(acc.w, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):  # a replicate with weight 0 is NaN and dropped
        bm = acc.ws1 / w[:, None]
        bv = acc.wq / w - np.einsum("bj,bj->b", bm, bm)
    return {"n": n, "m": m, "mean": m + acc.shift, "v": acc.q / n - float(m @ m), "w": w, "bm": bm, "bv": bv}


def _nms_interval(T: float, d2: float, S: float, lin: np.ndarray, quad: np.ndarray, noise: np.ndarray,
                  S_boot: np.ndarray, level: float) -> tuple[float, float]:
    """Interval for the true NMS by inverting bootstrap tests of theta0 >= 0 (see normalized_mean_shift).

    ``T`` is the debiased estimate, ``d2`` = |dbar|^2, ``S`` = sum_u var_a; per replicate ``lin`` =
    dbar . e_b, ``quad`` = |e_b|^2, ``noise`` its noise estimate and ``S_boot`` its sum_u var_a.
    """
    lo_p, hi_p = 100 * (1 - level) / 2, 100 * (1 + level) / 2

    def accepted(theta0: np.ndarray) -> np.ndarray:
        # replicates of T - theta0 in a bootstrap world whose mean difference is dbar rescaled to
        # NMS theta0: the linear term's spread follows theta0, not the noise-inflated |dbar|^2
        t0 = np.asarray(theta0, dtype=np.float64)[:, None]
        scale = np.sqrt(t0 * S / d2) if d2 > 0 else 0.0
        reps = (t0 * S + 2.0 * scale * lin + quad - noise) / S_boot - t0
        q_lo, q_hi = np.percentile(reps, [lo_p, hi_p], axis=1)
        dev = T - t0[:, 0]
        return (q_lo <= dev) & (dev <= q_hi), dev < q_lo

    # a grid over [0, top], top doubled until theta0 is rejected from above (T - theta0 < q_lo)
    top = max(T, d2 / S, 1e-12) * 2.0
    for _ in range(200):
        if accepted(np.array([top]))[1][0]:
            break
        top *= 2.0
    grid = np.linspace(0.0, top, 257)
    ok = accepted(grid)[0]
    if not ok.any():  # no theta0 >= 0 fits: the data are quieter than any shift, zero included
        return (0.0, 0.0)

    def refine(good: float, bad: float) -> float:  # the accepted end of [good, bad], on finer grids
        for _ in range(3):
            g = np.linspace(good, bad, 65)
            acc = accepted(g)[0]
            k = int(np.argmin(acc)) if not acc.all() else g.size - 1  # first rejected one
            good, bad = float(g[max(k - 1, 0)]), float(g[k])
        return good

    i, j = int(np.flatnonzero(ok)[0]), int(np.flatnonzero(ok)[-1])
    lo = 0.0 if i == 0 else refine(float(grid[i]), float(grid[i - 1]))
    hi = refine(float(grid[j]), float(grid[j + 1])) if j + 1 < grid.size else float(grid[j])
    return (lo, hi)


def normalized_mean_shift(X_a: Any, X_b: Any, *, paired: bool | str = "auto", n_boot: int = 200,
                          ci_level: float = 0.95, chunk_rows: int | None = None,
                          random_state: int | None = 0) -> NormalizedMeanShiftResult:
    r"""Normalised mean shift (NMS) of a layer between two background families.

    .. math:: \mathrm{NMS} = \frac{\sum_u \big(\bar x^{(b)}_u - \bar x^{(a)}_u\big)^2}{\sum_u \mathrm{var}_a(x_u)}

    (population variances under family ``a``). On the same foregrounds rendered under both
    families (``paired``: row i of ``X_a`` and of ``X_b`` share a foreground), it measures how far
    the background family moves the layer, in units of its spread. Report it beside the same
    architecture at initialisation: the change from initialisation separates learned sensitivity
    from features never removed (docs/METRICS.md).

    **Bias.** The plug-in value ``nms`` is biased upward by the sampling noise of the mean
    difference, :math:`\sum_u \mathrm{Var}(\bar x^{(b)}_u - \bar x^{(a)}_u) / \sum_u \mathrm{var}_a`;
    ``null_level`` estimates that term from the data: :math:`\sum_u s^2(x^{(b)}_u - x^{(a)}_u) / n`
    for paired rows (the variance of the row differences, so well-matched pairs have a low floor),
    :math:`\sum_u s^2_a/n_a + \sum_u s^2_b/n_b` for independent ones (about
    :math:`1/n_a + 1/n_b` when both families have the same spread), over
    :math:`\sum_u \mathrm{var}_a` (:math:`s^2` with ``n - 1``). It is the expected plug-in value
    under no shift. ``nms_debiased`` = ``nms`` - ``null_level`` is unbiased in the numerator; it is
    not truncated, so it is slightly negative about half the time when there is no shift.

    **Interval.** ``ci`` is an interval for the true NMS :math:`\theta`, not a percentile interval
    of the plug-in (whose bias made those miss small true values). The same streamed pass (paired:
    A and B chunks read in lockstep) accumulates ``n_boot`` Poisson bootstrap replicates (each row
    gets a Poisson(1) weight per replicate; paired rows share it). With :math:`\bar d` the mean
    difference, replicate b's deviation :math:`e_b` of it, its own noise estimate
    :math:`\hat\nu_b` and its :math:`S_b = \sum_u \mathrm{var}_a`, a candidate
    :math:`\theta_0 \ge 0` is accepted when ``nms_debiased`` - :math:`\theta_0` lies within the
    central ``ci_level`` range of the replicates

    .. math:: \frac{\theta_0 S + 2 c\, \bar d\cdot e_b + \lVert e_b\rVert^2 - \hat\nu_b}{S_b} - \theta_0,
              \qquad c = \sqrt{\theta_0 S / \lVert \bar d\rVert^2},

    i.e. in a bootstrap world whose mean difference is :math:`\bar d` rescaled to NMS
    :math:`\theta_0`. (The noise in :math:`\bar d` inflates the spread of :math:`\bar d\cdot e_b`;
    rescaling to each candidate removes it, and the quadratic term keeps the skew of small
    values.) ``ci`` is the range of accepted :math:`\theta_0` (a grid over :math:`[0, \infty)`,
    refined at both ends), so it never goes below 0: a lower end of 0 means no shift is detected
    at ``ci_level``. When no :math:`\theta_0 \ge 0` is accepted (the means agree more closely than
    the noise allows, in about (1 - ``ci_level``)/2 of data sets without a shift) it is (0, 0).
    Its coverage in simulation: docs/METRICS.md ("Normalised mean shift"), tests/analyses/test_nms_coverage.py.
    It needs ``n_boot`` >= 2; with ``n_boot=1`` ``ci`` is (nan, nan).

    Parameters
    ----------
    X_a, X_b : arrays of shape (n, ...) or Activations (same features)
        Each needs at least 2 rows (the noise term needs a variance).
    paired : bool or "auto", default="auto"
        ``"auto"``: paired when both have the same number of rows.
    n_boot : int, default=200
    ci_level : float, default=0.95
    chunk_rows : int, optional
    random_state : int, optional

    Returns
    -------
    NormalizedMeanShiftResult
        ``nms`` (plug-in), ``nms_debiased``, ``ci`` (for the true NMS), ``null_level`` (the
        estimated noise term, paired or not), ``sum_var_a``, ``per_unit_shift2`` (plug-in
        :math:`(\bar x^{(b)}_u - \bar x^{(a)}_u)^2`).
    """
    check_number("normalized_mean_shift", "n_boot", n_boot, low=1, integer=True)
    check_number("normalized_mean_shift", "ci_level", ci_level, low=0, high=1, low_open=True)
    check_option("normalized_mean_shift", "paired", paired, (True, False, "auto"))
    A = as_source(X_a, "X_a", chunk_rows=chunk_rows, min_rows=2)
    B = as_source(X_b, "X_b", chunk_rows=chunk_rows or A.chunk_rows, min_rows=2)
    if A.n_features != B.n_features:
        raise DataError(
            f"X_a has {A.n_features} features but X_b has {B.n_features}; pass the same layer of the same "
            "model under both background families."
        )
    is_paired = (A.n_rows == B.n_rows) if paired == "auto" else bool(paired)
    if is_paired and A.n_rows != B.n_rows:
        raise DataError(
            f"paired=True needs as many rows in X_b ({B.n_rows}) as in X_a ({A.n_rows}); row i of each "
            "must show the same foreground. Pass paired=False for independent samples."
        )
    B.chunk_rows = A.chunk_rows
    seed = int(np.random.default_rng(random_state).integers(2**62))

    def weights(start: int, rows: int, which: int) -> np.ndarray:
        key = [seed, start, which]
        return np.random.default_rng(key).poisson(1.0, size=(n_boot, rows)).astype(np.float64)

    acc_a = _NmsSums()
    if is_paired:  # one pass, A and B chunks in lockstep: sums of a and of the differences b - a
        acc_d = _NmsSums()
        for (start, a), (start_b, b) in zip(A.chunks(), B.chunks(), strict=True):
            if start_b != start or b.shape != a.shape:  # both read A's chunk_rows: cannot happen
                raise DataError(f"X_a and X_b chunks disagree at row {start}; pass arrays of the same shape.")
            W = weights(start, a.shape[0], 0)
            acc_a.add(a, W)
            acc_d.add(b - a, W)
        sa, sd = _nms_stats(acc_a), _nms_stats(acc_d)
        mean_b = sa["mean"] + sd["mean"]
        dbar = sd["mean"]
        noise = sd["v"] / (sd["n"] - 1)  # sum_u s^2(b - a) / n
        with np.errstate(divide="ignore", invalid="ignore"):
            e = sd["bm"] - sd["m"]
            bnoise = sd["bv"] / (sd["w"] - 1)
    else:
        acc_b = _NmsSums()
        for start, a in A.chunks():
            acc_a.add(a, weights(start, a.shape[0], 0))
        for start, b in B.chunks():
            acc_b.add(b, weights(start, b.shape[0], 1))
        sa, sb = _nms_stats(acc_a), _nms_stats(acc_b)
        mean_b = sb["mean"]
        dbar = mean_b - sa["mean"]
        noise = sa["v"] / (sa["n"] - 1) + sb["v"] / (sb["n"] - 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            e = (sb["bm"] - sb["m"]) - (sa["bm"] - sa["m"])
            bnoise = sa["bv"] / (sa["w"] - 1) + sb["bv"] / (sb["w"] - 1)
    sum_var = float(sa["v"])
    if not sum_var > 0:
        raise DataError("X_a has zero variance in every unit; NMS is undefined. Check the layer and split.")
    shift2 = (mean_b - sa["mean"]) ** 2
    d2 = float(dbar @ dbar)
    nms = d2 / sum_var
    null_level = float(noise) / sum_var
    debiased = nms - null_level

    ok = np.isfinite(bnoise) & (sa["w"] > 1) & (sa["bv"] > 0)
    if not is_paired:
        ok &= sb["w"] > 1
    ci = (float("nan"), float("nan"))
    if ok.sum() >= 2:
        E = e[ok]
        ci = _nms_interval(debiased, d2, sum_var, E @ dbar, np.einsum("bj,bj->b", E, E), bnoise[ok],
                           sa["bv"][ok], ci_level)
    return NormalizedMeanShiftResult(
        nms=nms, nms_debiased=debiased, ci=ci, null_level=null_level, sum_var_a=sum_var, n_a=A.n_rows,
        n_b=B.n_rows, paired=is_paired, ci_level=float(ci_level), per_unit_shift2=shift2,
    )
