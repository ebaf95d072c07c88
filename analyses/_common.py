"""Shared helpers of the analyses: input sources (arrays or lazy store datasets), validation, results.

Every analysis accepts a numpy array or a lazy :class:`probekit.store.Activations` (anything with
``n_rows``/``shape`` and ``iter_chunks(rows)``). :class:`Source` hides the difference: it yields
2-D float chunks, checks every chunk for NaN/inf, and loads the whole input only when it fits the
memory budget.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from numbers import Integral, Real
from typing import Any

import numpy as np
from sklearn.exceptions import NotFittedError as _SklearnNotFitted

from probekit.errors import DataError, NotFittedError
from probekit.vocab import jsonable as jsonable


class FitFirstError(NotFittedError, _SklearnNotFitted):
    """probekit's NotFittedError that scikit-learn's own checks also recognise."""

DEFAULT_MAX_MEMORY = 1 << 30  # bytes an analysis may use to hold an input whole (1 GiB)
DEFAULT_CHUNK_BYTES = 64 << 20  # bytes per streamed chunk unless chunk_rows says otherwise


# -- parameter validation (a small stand-in for sklearn's private _param_validation) ------------
def check_number(owner: str, name: str, value: Any, *, low: float | None = None,
                 high: float | None = None, low_open: bool = False, integer: bool = False,
                 allow: Sequence[Any] = ()) -> None:
    """Raise :class:`DataError` unless ``value`` is a number in range (or one of ``allow``)."""
    if any(value is a or (isinstance(a, str) and value == a) for a in allow):
        return
    kind = Integral if integer else Real
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if ok and not integer:
        ok = math.isfinite(float(value))
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        rng = []
        if low is not None:
            rng.append(f"{'>' if low_open else '>='} {low}")
        if high is not None:
            rng.append(f"<= {high}")
        what = "an int" if integer else "a finite number"
        extra = f" or one of {list(allow)}" if allow else ""
        raise DataError(
            f"The {name!r} parameter of {owner} must be {what} {' and '.join(rng)}{extra}. "
            f"Got {value!r} instead."
        )


def check_option(owner: str, name: str, value: Any, options: Sequence[Any]) -> None:
    if value not in options:
        raise DataError(
            f"The {name!r} parameter of {owner} must be one of {list(options)}. Got {value!r} instead."
        )


# -- sources -------------------------------------------------------------------------------------
def from_torch(X: Any) -> Any:
    """A torch tensor as a numpy array on the CPU (detached; bfloat16 as float32); anything else as it is.

    Every analysis input passes through here (sources, vectors, factors, dtypes), so each accepts a
    torch tensor wherever it accepts an array, without importing torch for those that are not.
    """
    if type(X).__module__.split(".")[0] != "torch" or not hasattr(X, "detach"):
        return X
    import torch

    t = X.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16
        t = t.float()
    return t.numpy()


def _is_lazy(X: Any) -> bool:
    return hasattr(X, "iter_chunks") and hasattr(X, "shape") and not isinstance(X, np.ndarray)


class Source:
    """Rows of a 2-D (flattened) float matrix, from an array or a lazy store dataset.

    Parameters
    ----------
    X : ndarray of shape (n_samples, ...) or Activations
        Trailing dimensions are flattened into features.
    name : str
        How error messages call this input (``"X"``, ``"X_ood"``).
    chunk_rows : int, optional
        Rows per streamed chunk; by default about 64 MiB of rows.
    dtype : numpy dtype
        Chunks are converted to this dtype.
    """

    def __init__(self, X: Any, name: str = "X", *, chunk_rows: int | None = None,
                 dtype: Any = np.float64) -> None:
        X = from_torch(X)
        self.name = name
        self.dtype = np.dtype(dtype)
        self.lazy = _is_lazy(X)
        if self.lazy:
            self._X = X
            shape = tuple(int(s) for s in X.shape)
        else:
            try:
                arr = np.asarray(X)
            except Exception as e:  # ragged lists etc.
                raise DataError(f"{name} could not be read as an array ({e}). Pass a numeric array.") from e
            if np.iscomplexobj(arr):
                raise DataError(f"Complex data not supported: {name} is complex; pass real-valued activations.")
            if arr.dtype == object:
                try:
                    arr = arr.astype(np.float64)
                except (TypeError, ValueError) as e:
                    raise DataError(
                        f"{name} has dtype object with non-numeric entries ({e}); a numeric array of "
                        "shape (n_samples, n_features) is expected."
                    ) from e
            if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
                raise DataError(
                    f"{name} has dtype {arr.dtype}; a numeric array of shape (n_samples, n_features) "
                    "is expected."
                )
            if arr.ndim == 1:
                raise DataError(
                    f"{name} is 1-D (shape {arr.shape}); a 2-D array of shape (n_samples, n_features) "
                    "is expected. Reshape your data either using X.reshape(-1, 1) if it has a single "
                    "feature or X.reshape(1, -1) if it contains a single sample."
                )
            if arr.ndim == 0:
                raise DataError(f"{name} is a scalar; a 2-D array (n_samples, n_features) is expected.")
            self._X = arr
            shape = arr.shape
        if len(shape) < 2:
            raise DataError(f"{name} has shape {shape}; rows of features (n_samples, n_features) are expected.")
        self.n_rows = int(shape[0])
        self.feature_shape = shape[1:]
        self.n_features = int(np.prod(shape[1:], dtype=np.int64))
        if self.n_features == 0:
            raise DataError(
                f"{name} has 0 feature(s) (shape={shape}) while a minimum of 1 is required. Pass at "
                "least one feature column."
            )
        if chunk_rows is None:
            chunk_rows = max(1, DEFAULT_CHUNK_BYTES // max(1, self.n_features * self.dtype.itemsize))
        check_number("Source", "chunk_rows", chunk_rows, low=1, integer=True)
        self.chunk_rows = int(chunk_rows)

    @property
    def nbytes(self) -> int:
        return self.n_rows * self.n_features * self.dtype.itemsize

    def fits(self, max_memory: int | None) -> bool:
        return max_memory is None or self.nbytes <= max_memory

    def _prep(self, a: np.ndarray, start: int, check_finite: bool = True) -> np.ndarray:
        a = np.asarray(a).reshape(a.shape[0], -1).astype(self.dtype, copy=False)
        if check_finite:
            self.check_finite(a, start)
        return a

    def check_finite(self, a: np.ndarray, start: int) -> None:
        """Raise a DataError naming the first row of chunk ``a`` (rows from ``start``) with a NaN or inf."""
        if not np.isfinite(a).all():
            bad = start + int(np.flatnonzero(~np.isfinite(a).all(axis=1))[0])
            raise DataError(
                f"{self.name} contains NaN or inf (first at row {bad}). Remove or impute those rows "
                "before the analysis; nothing is dropped silently."
            )

    def chunks(self, rows: int | None = None, *, check_finite: bool = True) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, chunk)`` with ``chunk`` of shape (rows, n_features), checked finite.

        ``check_finite=False`` leaves the check to a caller that sees non-finite values anyway in
        sums it computes (a NaN or inf in a chunk makes its column sum of squares non-finite) and
        then calls :meth:`check_finite` on that chunk: the check is a pass over every value.
        """
        step = int(rows or self.chunk_rows)
        if self.lazy:
            for start, a in self._X.iter_chunks(step):
                yield start, self._prep(a, start, check_finite)
        else:
            for start in range(0, self.n_rows, step):
                yield start, self._prep(self._X[start:start + step], start, check_finite)

    def load(self) -> np.ndarray:
        """The whole input as one (n_rows, n_features) array."""
        if not self.lazy:
            return self._prep(self._X, 0)
        return self._prep(np.asarray(self._X[: self.n_rows]), 0)

    def load_within(self, max_memory: int | None, what: str) -> np.ndarray:
        if not self.fits(max_memory):
            raise DataError(
                f"{self.name} ({self.n_rows} x {self.n_features}, {self.nbytes / 2**20:.0f} MiB as "
                f"{self.dtype}) does not fit max_memory={max_memory} bytes, and {what} needs it in "
                "memory. Raise max_memory, or pass fewer rows."
            )
        return self.load()

    def take(self, idx: np.ndarray) -> np.ndarray:
        if self.lazy:
            return self._prep(np.asarray(self._X[np.asarray(idx)]), 0)
        return self._prep(self._X[np.asarray(idx)], 0)


def compute_dtype(X: Any) -> np.dtype:
    """The float type a streamed pass computes in: float32 for float32/float16 data, else float64.

    Store activations are float32 or float16; products of their chunks in float64 cost 2-3x the
    time of float32 (BLAS) for no information the data has (per-chunk float32 sums have relative
    error ~1e-6, far below the sampling noise of any statistic here), while running totals across
    chunks stay float64. float64 input (e.g. a user's array) keeps float64 throughout.
    """
    X = from_torch(X)
    dt = getattr(X, "dtype", None)
    if dt is None:
        dt = np.asarray(X).dtype if not _is_lazy(X) else np.dtype(np.float32)
    return np.dtype(np.float32) if np.dtype(dt) in (np.float32, np.float16) else np.dtype(np.float64)


def as_source(X: Any, name: str = "X", *, chunk_rows: int | None = None, dtype: Any = np.float64,
              min_rows: int = 1) -> Source:
    src = X if isinstance(X, Source) else Source(X, name, chunk_rows=chunk_rows, dtype=dtype)
    if src.n_rows < min_rows:
        raise DataError(
            f"{name} has {src.n_rows} sample(s) (n_samples = {src.n_rows}); at least {min_rows} are "
            "needed. Pass more rows."
        )
    return src


def check_rows(n: int, other: Any, name: str, other_name: str = "X") -> None:
    m = len(other) if not hasattr(other, "shape") else int(other.shape[0])
    if m != n:
        raise DataError(
            f"{name} has {m} rows but {other_name} has {n}; they must describe the same samples in the "
            "same order. Pass matching rows (e.g. store.sample_field(split, ...) of the same split)."
        )


def as_vector(y: Any, name: str, n: int, *, numeric: bool = True) -> np.ndarray:
    y = np.asarray(from_torch(y))
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{name} must be 1-D with one value per row; got shape {y.shape}.")
    check_rows(n, y, name)
    if numeric and np.issubdtype(y.dtype, np.floating) and not np.isfinite(y).all():
        raise DataError(
            f"{name} contains NaN or inf (first at row {int(np.flatnonzero(~np.isfinite(y))[0])}). "
            "Remove or impute those rows first."
        )
    return y


def as_factors(factors: Any, n: int, factor_names: Sequence[str] | None = None,
               use: Sequence[str] | None = None, name: str = "factors") -> tuple[np.ndarray, list[str]]:
    """Validate a (n, F) factor matrix; select the factors named in ``use``."""
    F = np.asarray(from_torch(factors), dtype=np.float64)
    if F.ndim == 1:
        F = F[:, None]
    if F.ndim != 2:
        raise DataError(f"{name} must have shape (n_samples, n_factors); got {F.shape}.")
    check_rows(n, F, name)
    names = [f"factor{i}" for i in range(F.shape[1])] if factor_names is None else [str(s) for s in factor_names]
    if len(names) != F.shape[1]:
        raise DataError(f"{len(names)} factor_names given for {F.shape[1]} factor columns; give one name per column.")
    if not np.isfinite(F).all():
        r, c = np.argwhere(~np.isfinite(F))[0]
        raise DataError(f"{name} column {names[c]!r} has NaN or inf at row {r}. Remove or impute those rows first.")
    if use is not None:
        if isinstance(use, str):
            use = [use]
        missing = [u for u in use if u not in names]
        if missing:
            raise DataError(f"Unknown factor name(s) {missing}; the factors are {names}.")
        cols = [names.index(u) for u in use]
        F, names = F[:, cols], list(use)
    const = [names[j] for j in range(F.shape[1]) if np.ptp(F[:, j]) == 0]
    if const:
        raise DataError(
            f"Factor(s) {const} are constant over the {n} rows, so nothing can correlate with or "
            "predict them. Drop them (factors=[...]) or use a split where they vary."
        )
    return F, names


# -- results -------------------------------------------------------------------------------------
def _short(v: Any) -> str:
    if isinstance(v, np.ndarray):
        if v.size <= 6:
            return np.array2string(v, precision=4, separator=", ")
        return f"array(shape={v.shape}, mean={np.nanmean(v) if v.size else float('nan'):.4g})"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, tuple) and all(isinstance(x, float) for x in v):
        return "(" + ", ".join(f"{x:.4g}" for x in v) + ")"
    if isinstance(v, list) and len(v) > 8:
        return f"[{len(v)} items]"
    if isinstance(v, dict) and len(v) > 8:
        return f"{{{len(v)} keys}}"
    return repr(v)


class ResultMixin:
    """``to_dict()`` (JSON-safe) and a short repr for result dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        return jsonable(self)  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        parts = [f"{f.name}={_short(getattr(self, f.name))}" for f in dataclasses.fields(self)]  # type: ignore[arg-type]
        return f"{type(self).__name__}(" + ", ".join(parts) + ")"


def percentile_ci(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    s = np.asarray(samples, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return (float("nan"), float("nan"))
    lo, hi = np.percentile(s, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return (float(lo), float(hi))


def null_abs_r(n: int) -> float:
    """Expected |Pearson r| between independent variables for n samples: sqrt(2 / (pi n))."""
    return float(math.sqrt(2.0 / (math.pi * max(n, 1))))


# -- estimator inputs (the probes' validation, apart from their fits) ----------------------------
def check_fitted(est: Any, attr: str = "coef_") -> None:
    """Raise :class:`FitFirstError` unless ``est`` has the fitted attribute ``attr``."""
    if not hasattr(est, attr):
        raise FitFirstError(
            f"This {type(est).__name__} instance is not fitted yet. Call 'fit' with appropriate "
            "arguments before using this estimator."
        )


def check_y_given(est: Any, y: Any) -> None:
    """Raise :class:`DataError` when a supervised estimator is fitted without ``y``."""
    if y is None:
        raise DataError(
            f"{type(est).__name__} requires y to be passed, but the target y is None. Pass the "
            "labels (classification) or targets (regression) of the rows of X."
        )


def estimator_source(est: Any, X: Any, dtype: Any, *, reset: bool, min_rows: int = 1) -> Source:
    """``X`` as a :class:`Source` in ``est``'s ``chunk_rows``; ``reset`` records ``n_features_in_``,
    otherwise the width must equal it."""
    if not _is_arraylike(X):
        raise DataError(
            f"{type(est).__name__} expects X as an array of shape (n_samples, n_features) or a store "
            f"Activations dataset; got {type(X).__name__}."
        )
    src = as_source(X, "X", chunk_rows=getattr(est, "chunk_rows", None), dtype=dtype, min_rows=min_rows)
    if reset:
        est.n_features_in_ = src.n_features
    elif src.n_features != est.n_features_in_:
        raise DataError(
            f"X has {src.n_features} features, but {type(est).__name__} is expecting "
            f"{est.n_features_in_} features as input. Pass the same layer the probe was fitted on."
        )
    return src


def _is_arraylike(X: Any) -> bool:
    return hasattr(X, "iter_chunks") or isinstance(X, (np.ndarray, list, tuple)) or hasattr(X, "__array__")


def reject_sparse(est: Any, X: Any) -> None:
    """Raise :class:`DataError` for scipy sparse input (the probes need dense rows)."""
    if hasattr(X, "tocsr") or type(X).__module__.startswith("scipy.sparse"):
        raise DataError(
            f"{type(est).__name__} does not accept sparse input; pass a dense array (X.toarray())."
        )


# -- column statistics for standardising ---------------------------------------------------------
_STATS_BLOCK = 4096  # rows per float32 partial sum in scaler_stats (float64 totals across blocks)


def scaler_stats(src: Source, standardize: bool = True, *,
                 check_finite: bool = True) -> tuple[np.ndarray, np.ndarray, int]:
    """Streamed column mean and population std (1 where a column is constant).

    float32 chunks are summed in float32 blocks of 4,096 rows, shifted by the first block's mean,
    with float64 running totals (the rule of ``compute_dtype``): converting each chunk to float64
    first made these statistics 2/3 of the non-iterative time of a 16,000 x 512 torch fit.
    Values whose float32 squares overflow are summed again in float64. ``check_finite=False`` for
    rows already checked (the in-memory fit loads them with the check).
    """
    d = src.n_features

    def sums(dtype: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
        s1, s2, shift, n = np.zeros(d), np.zeros(d), None, 0
        for _, a in src.chunks(check_finite=check_finite):
            a = a.astype(dtype, copy=False)
            if shift is None:  # in the data's dtype: the mean is rebuilt from the shift applied
                shift = a[:_STATS_BLOCK].mean(axis=0, dtype=np.float64).astype(a.dtype)
            for i in range(0, a.shape[0], _STATS_BLOCK):
                c = a[i:i + _STATS_BLOCK] - shift
                s1 += c.sum(axis=0)
                s2 += np.einsum("ij,ij->j", c, c)
                n += c.shape[0]
        return s1, s2, shift, n

    with np.errstate(over="ignore"):
        s1, s2, shift, n = sums(src.dtype)
    if not np.isfinite(s2).all():
        s1, s2, shift, n = sums(np.float64)
    m = s1 / n
    var = np.maximum(s2 / n - m * m, 0.0)
    mean = m + (shift.astype(np.float64) if shift is not None else 0.0)
    if not standardize:
        return np.zeros(d), np.ones(d), n
    return mean, safe_scale(var, mean, s2 / n), n


def safe_scale(var: np.ndarray, mean: np.ndarray, second_moment: np.ndarray) -> np.ndarray:
    """sqrt(var), with 1 for columns whose variance is rounding noise (constant columns)."""
    scale = np.sqrt(np.maximum(var, 0.0))
    tiny = var <= 1e-10 * (mean * mean + np.abs(second_moment)) + 1e-300
    scale[tiny] = 1.0
    return scale
