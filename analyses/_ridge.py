"""Ridge probe for continuous targets, and the streamed ridge statistics other analyses solve from."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin

from probekit.errors import DataError

from ._common import (
    Source,
    check_fitted,
    check_number,
    check_rows,
    check_y_given,
    estimator_source,
    reject_sparse,
    safe_scale,
)

__all__ = ["RidgeProbe"]

_DEFAULT_ALPHAS = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)


def ridge_stats(src: Source, Y: np.ndarray, fold: np.ndarray | None = None, n_folds: int = 1) -> dict[str, np.ndarray]:
    """One streamed pass: per fold, row count and (shifted) sums, Gram matrix and cross-products.

    ``Y`` (n, t) is in memory. Shifting X by its first chunk's mean keeps the sums well conditioned;
    the shift cancels in every centred quantity.
    """
    d, t = src.n_features, Y.shape[1]
    st = {
        "n": np.zeros(n_folds), "sx": np.zeros((n_folds, d)), "sxx": np.zeros((n_folds, d, d)),
        "sy": np.zeros((n_folds, t)), "sxy": np.zeros((n_folds, d, t)),
    }
    shift = None
    for start, a in src.chunks():
        if shift is None:
            shift = a.mean(axis=0)
        a = a - shift
        Yc = Y[start:start + a.shape[0]]
        fc = np.zeros(a.shape[0], dtype=int) if fold is None else fold[start:start + a.shape[0]]
        for k in np.unique(fc):
            m = fc == k
            ak, yk = (a, Yc) if m.all() else (a[m], Yc[m])
            st["n"][k] += ak.shape[0]
            st["sx"][k] += ak.sum(axis=0)
            st["sxx"][k] += ak.T @ ak
            st["sy"][k] += yk.sum(axis=0)
            st["sxy"][k] += ak.T @ yk
    st["shift"] = shift if shift is not None else np.zeros(d)
    return st


def centred_fold_stats(st: dict[str, np.ndarray], keep: np.ndarray) -> tuple[Any, ...]:
    """``(n, mx, my, Sxx, Sxy, sxx)`` of the folds in ``keep`` of :func:`ridge_stats`: row count, the
    means (shifted coordinates), the centred cross-products and the raw second moments."""
    n = st["n"][keep].sum()
    sx = st["sx"][keep].sum(axis=0)
    sxx = st["sxx"][keep].sum(axis=0)
    sy = st["sy"][keep].sum(axis=0)
    sxy = st["sxy"][keep].sum(axis=0)
    mx, my = sx / n, sy / n
    return n, mx, my, sxx - n * np.outer(mx, mx), sxy - n * np.outer(mx, my), sxx


def ridge_solve(st: dict[str, np.ndarray], keep: np.ndarray, alpha: float,
                standardize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Ridge weights (raw feature space) from the stats of the folds in ``keep``.

    Minimises ``||y - z w - c||^2 + alpha ||w||^2`` with ``z`` standardised by the same rows,
    like ``make_pipeline(StandardScaler(), Ridge(alpha))``. Returns ``coef (d, t)`` and
    ``intercept (t,)``.
    """
    n, mx, my, Sxx, Sxy, sxx = centred_fold_stats(st, keep)
    if standardize:
        s = safe_scale(np.diag(Sxx) / n, mx + st["shift"], np.diag(sxx) / n)
    else:
        s = np.ones_like(mx)
    A = Sxx / np.outer(s, s)
    A[np.diag_indices_from(A)] += alpha
    try:
        Ws = np.linalg.solve(A, Sxy / s[:, None])
    except np.linalg.LinAlgError:  # singular Gram (alpha=0, collinear features): minimum-norm solution
        Ws = np.linalg.lstsq(A, Sxy / s[:, None], rcond=None)[0]
    coef = Ws / s[:, None]
    intercept = my - (mx + st["shift"]) @ coef
    return coef, intercept


class RidgeProbe(RegressorMixin, BaseEstimator):
    r"""Ridge-regression probe for continuous targets, fitted in one streamed pass.

    With :math:`z_i = (x_i - \mu)/\sigma` standardised on the training rows, it minimises

    .. math:: \sum_i \lVert y_i - W z_i - c \rVert^2 + \alpha \lVert W \rVert_F^2

    (scikit-learn's ``make_pipeline(StandardScaler(), Ridge(alpha))``), solved from the
    accumulated Gram matrix :math:`Z^\top Z` and :math:`Z^\top Y`, so the input may be a store
    dataset larger than memory (memory is O(n_features^2)). ``score`` is the R² (uniform average
    over targets).

    Parameters
    ----------
    alpha : float or "cv", default=1.0
        L2 strength; ``"cv"`` picks it from ``alphas`` by ``cv``-fold R² on the training rows
        (from the same single pass: per-fold Gram matrices).
    alphas : sequence of float, optional
        Grid for ``alpha="cv"``; default ``(0.01, 0.1, 1, 10, 100, 1000)``.
    cv : int, default=5
    standardize : bool, default=True
    chunk_rows : int, optional
    random_state : int, optional
        Seeds the fold assignment for ``alpha="cv"``.

    Attributes
    ----------
    coef_ : ndarray of shape (n_features,) or (n_targets, n_features)
        Raw-space weights.
    intercept_ : float or ndarray of shape (n_targets,)
    alpha_ : float
    cv_results_ : dict or None
    n_features_in_ : int
    """

    def __init__(self, *, alpha: float | str = 1.0, alphas: Any = None, cv: int = 5, standardize: bool = True,
                 chunk_rows: int | None = None, random_state: int | None = None) -> None:
        self.alpha = alpha
        self.alphas = alphas
        self.cv = cv
        self.standardize = standardize
        self.chunk_rows = chunk_rows
        self.random_state = random_state

    def fit(self, X: Any, y: Any = None) -> RidgeProbe:
        own = type(self).__name__
        check_number(own, "alpha", self.alpha, low=0, allow=("cv",))
        check_number(own, "cv", self.cv, low=2, integer=True)
        reject_sparse(self, X)
        check_y_given(self, y)
        src = estimator_source(self, X, np.float64, reset=True)
        y = self._targets(y, src.n_rows)
        Y = y[:, None] if y.ndim == 1 else y
        self.cv_results_ = None
        if self.alpha == "cv":
            coef, icpt = self._fit_cv(src, Y)
        else:
            self.alpha_ = float(self.alpha)
            st = ridge_stats(src, Y)
            coef, icpt = ridge_solve(st, np.array([True]), self.alpha_, self.standardize)
        self.coef_ = coef[:, 0] if y.ndim == 1 else coef.T
        self.intercept_ = float(icpt[0]) if y.ndim == 1 else icpt
        return self

    def _targets(self, y: Any, n: int) -> np.ndarray:
        """``y`` as finite float64 of shape (n,) or (n, n_targets)."""
        y = np.asarray(y)
        if y.dtype == object or not np.issubdtype(y.dtype, np.number):
            try:
                y = y.astype(np.float64)
            except (TypeError, ValueError) as e:
                raise DataError(f"y must be numeric for {type(self).__name__}; got dtype {y.dtype}.") from e
        y = y.astype(np.float64)
        if y.ndim not in (1, 2):
            raise DataError(f"y must be 1-D or 2-D; got shape {y.shape}.")
        check_rows(n, y, "y")
        if not np.isfinite(y).all():
            raise DataError("y contains NaN or inf; remove or impute those rows first.")
        return y

    def _fit_cv(self, src: Source, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``alpha="cv"``: per-fold statistics from one pass; the penalty of least pooled held-out
        squared error (``alpha_``, ``cv_results_``), then the fit on every fold."""
        if src.n_rows < 2 * self.cv:
            raise DataError(
                f"alpha='cv' with cv={self.cv} needs at least {2 * self.cv} rows; got {src.n_rows}. "
                "Lower cv or pass a fixed alpha."
            )
        rng = np.random.default_rng(self.random_state)
        fold = rng.permutation(np.arange(src.n_rows) % self.cv)
        st = ridge_stats(src, Y, fold, self.cv)
        alphas = [float(a) for a in (self.alphas if self.alphas is not None else _DEFAULT_ALPHAS)]
        sse = np.zeros(len(alphas))
        sst = 0.0
        for k in range(self.cv):
            keep = np.arange(self.cv) != k
            for j, a in enumerate(alphas):
                coef, icpt = ridge_solve(st, keep, a, self.standardize)
                sse[j] += _fold_sse(st, k, coef, icpt, Y, fold)
            yk = Y[fold == k]
            sst += float(((yk - Y[fold != k].mean(axis=0)) ** 2).sum())
        self.alpha_ = alphas[int(np.argmin(sse))]
        self.cv_results_ = {"alpha": alphas, "r2": (1.0 - sse / sst).tolist()}
        full = {k2: (v.sum(axis=0, keepdims=True) if k2 != "shift" else v) for k2, v in st.items()}
        return ridge_solve(full, np.array([True]), self.alpha_, self.standardize)

    def predict(self, X: Any) -> np.ndarray:
        check_fitted(self)
        reject_sparse(self, X)
        src = estimator_source(self, X, np.float64, reset=False)
        coef = np.atleast_2d(self.coef_)
        out = np.empty((src.n_rows, coef.shape[0]))
        for start, a in src.chunks():
            out[start:start + a.shape[0]] = a @ coef.T + self.intercept_
        return out[:, 0] if np.ndim(self.coef_) == 1 else out

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = False
        tags.target_tags.multi_output = True
        return tags


def _fold_sse(st: dict[str, np.ndarray], k: int, coef: np.ndarray, icpt: np.ndarray, Y: np.ndarray,
              fold: np.ndarray) -> float:
    """Held-out SSE of fold k from its sums: sum (y - a w - c')^2 with a = x - shift."""
    n = st["n"][k]
    c2 = icpt + st["shift"] @ coef  # intercept in shifted coordinates
    yk = Y[fold == k]
    # sum ||y||^2 - 2 sum y.(a w + c2) + sum ||a w + c2||^2
    syy = float((yk * yk).sum())
    sxy = st["sxy"][k]
    sx = st["sx"][k]
    sy = st["sy"][k]
    cross = float(np.sum(sxy * coef)) + float(sy @ c2)
    quad = float(np.sum(coef * (st["sxx"][k] @ coef))) + 2 * float(sx @ coef @ c2) + n * float(c2 @ c2)
    return syy - 2 * cross + quad

