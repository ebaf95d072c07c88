"""Linear probes: the multinomial logistic-regression probe and the ID / OOD protocol.

:class:`LinearProbe` is the estimator (parameters, input validation, the choice of backend, the
``C="cv"`` search, predictions); its solvers live in :mod:`._logistic`. The ridge probe for
continuous targets is in :mod:`._ridge`.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.exceptions import ConvergenceWarning, DataConversionWarning
from sklearn.model_selection import StratifiedKFold
from sklearn.utils.multiclass import type_of_target
from threadpoolctl import threadpool_limits

from probekit.errors import DataError

from ._common import (
    DEFAULT_MAX_MEMORY,
    ResultMixin,
    Source,
    as_source,
    check_fitted,
    check_number,
    check_option,
    check_rows,
    check_y_given,
    estimator_source,
    percentile_ci,
    reject_sparse,
    scaler_stats,
)
from ._logistic import SolverSettings, fit_sklearn, fit_torch_memory, fit_torch_stream, torch_threads

__all__ = ["LinearProbe", "ProbeIdOodResult", "probe_id_ood"]

_DEFAULT_CS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
# n_samples * n_features * n_classes from which backend="auto" picks torch. Both backends on one thread,
# in memory, C=1: below 1e6 neither was consistently faster (ratios 0.56-1.6x, every fit under 0.1 s);
# from 1e6 to 5e7 torch was 1.4-4.0x faster in every case tried, with the same iteration counts
_AUTO_TORCH_WORK = 1e6


# =================================================================================================
# Logistic probe
# =================================================================================================
class LinearProbe(ClassifierMixin, BaseEstimator):
    r"""Multinomial logistic-regression probe with a scikit-learn or torch (L-BFGS) backend.

    The probe standardises the features with the training rows' mean and standard deviation, then
    minimises scikit-learn's L2-regularised objective (identical for both backends)

    .. math:: \min_{W, b}\; C \sum_{i=1}^n \ell\big(y_i, W z_i + b\big) + \tfrac12 \lVert W \rVert_F^2,
              \qquad z_i = (x_i - \mu) / \sigma,

    with :math:`\ell` the softmax cross-entropy (for two classes: one logistic output, as
    scikit-learn does). The intercept is not penalised. ``coef_``/``intercept_`` are mapped back to
    the raw feature space, so ``decision_function(X) = X @ coef_.T + intercept_``.

    Parameters
    ----------
    C : float or "cv", default=1.0
        Inverse regularisation strength (scikit-learn's semantics). ``"cv"`` picks it from ``Cs``
        by stratified ``cv``-fold cross-validated accuracy on the training rows only.
    Cs : sequence of float, optional
        Grid for ``C="cv"``; default ``(1e-3, 1e-2, 0.1, 1, 10, 100)``.
    cv : int, default=5
        Folds for ``C="cv"``.
    backend : {"auto", "sklearn", "torch"}, default="auto"
        ``"auto"`` uses torch when the input is streamed, a non-CPU device is asked for, or
        ``n_samples * n_features * n_classes`` is at least 1e6 (where one-thread torch fits were
        faster); scikit-learn otherwise.
    device : str, default="cpu"
        Torch device (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
    solver : {"lbfgs", "minibatch"}, default="lbfgs"
        Torch backend only. ``"lbfgs"``: full-batch L-BFGS (strong-Wolfe line search). When the
        input does not fit ``max_memory`` each objective evaluation streams the chunks and sums
        their gradients, so it still minimises the exact objective. A float32 stage (in memory or
        streamed) that ends above ``tol`` goes on in float64 (W, b and row blocks of the
        features), so the fit meets ``tol`` as scikit-learn's does; the stopping test is always
        applied to a float32 or float64 evaluation. ``"minibatch"``: Adam on minibatches of
        ``batch_size`` rows for ``max_iter`` epochs (approximate; for inputs much larger than
        memory).
    precision : {"float32", "bf16"}, default="float32"
        Torch L-BFGS in memory only. ``"bf16"`` runs the first iterations on a bfloat16 copy of the
        standardised features (3x cheaper evaluations, 1.5x the features' memory) until
        max|gradient| <= max(tol, 1e-4), then goes on in float32, where the CPU has bfloat16
        instructions (AVX512-BF16, AMX) and ``n_samples * n_features * n_classes`` >= 2e7;
        elsewhere it is ignored. Off by default: the bfloat16 rounding depends on the CPU's
        instructions, so predictions near a class boundary can differ between machines (21 of
        4,000 differed from the float32 fit on one CPU).
    n_threads : int or None, default=1
        Torch intra-op threads (``torch.set_num_threads``) and BLAS/OpenMP threads of the
        scikit-learn backend for the duration of ``fit``; the previous settings are restored
        afterwards. ``None`` leaves them as they are. One thread is the default: on a busy 2-core
        machine two torch threads made fits 10-20x slower than one, waiting for each other.
        ``torch.set_num_threads`` is process-wide: fits running concurrently in threads of one
        process share it.
    max_iter : int, default=1000
        L-BFGS iterations (both backends), or epochs for ``solver="minibatch"``. A fit that
        stops at ``max_iter`` above ``tol`` warns with
        :class:`sklearn.exceptions.ConvergenceWarning`.
    tol : float, default=1e-4
        Stop when the largest absolute gradient entry of the mean-scaled objective falls below it
        (scikit-learn's ``gtol``); for minibatch, the relative epoch-loss change.
    standardize : bool, default=True
        Fit a standard scaler on the training rows.
    batch_size : int, default=4096
        Minibatch size for ``solver="minibatch"``.
    learning_rate : float, default=0.01
        Adam step size for ``solver="minibatch"``.
    max_memory : int or None, default=1 GiB
        Inputs larger than this many bytes (as float32/float64) are streamed, never loaded whole.
    chunk_rows : int, optional
        Rows per streamed chunk.
    random_state : int, optional
        Seeds the CV split and the minibatch order.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    coef_ : ndarray of shape (1 or n_classes, n_features)
        Weights in the raw feature space.
    intercept_ : ndarray of shape (1 or n_classes,)
    scaler_mean_, scaler_scale_ : ndarray of shape (n_features,)
    C_ : float
        The regularisation actually used.
    cv_results_ : dict or None
        ``{"C": [...], "mean_accuracy": [...]}`` when ``C="cv"``.
    backend_ : str
    n_iter_ : int
    n_features_in_ : int

    Warns
    -----
    sklearn.exceptions.ConvergenceWarning
        When a fit (any of the ``C="cv"`` fits included) ends above ``tol``, on either backend:
        raise ``max_iter``, lower ``C`` or keep ``standardize=True``.

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> X, y = load_digits(return_X_y=True)
    >>> probe = LinearProbe(C=1.0, backend="torch").fit(X[:1200], y[:1200])
    >>> round(probe.score(X[1200:], y[1200:]), 2) > 0.9
    True
    """

    def __init__(self, *, C: float | str = 1.0, Cs: Any = None, cv: int = 5, backend: str = "auto",
                 device: str = "cpu", solver: str = "lbfgs", max_iter: int = 1000, tol: float = 1e-4,
                 standardize: bool = True, batch_size: int = 4096, learning_rate: float = 0.01,
                 max_memory: int | None = DEFAULT_MAX_MEMORY, chunk_rows: int | None = None,
                 random_state: int | None = None, precision: str = "float32",
                 n_threads: int | None = 1) -> None:
        self.C = C
        self.Cs = Cs
        self.cv = cv
        self.backend = backend
        self.device = device
        self.solver = solver
        self.max_iter = max_iter
        self.tol = tol
        self.standardize = standardize
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.max_memory = max_memory
        self.chunk_rows = chunk_rows
        self.random_state = random_state
        self.precision = precision
        self.n_threads = n_threads

    # -- validation --------------------------------------------------------------------------
    def _validate_params(self) -> None:
        own = type(self).__name__
        check_number(own, "C", self.C, low=0, low_open=True, allow=("cv",))
        check_number(own, "cv", self.cv, low=2, integer=True)
        check_option(own, "backend", self.backend, ("auto", "sklearn", "torch"))
        check_option(own, "solver", self.solver, ("lbfgs", "minibatch"))
        check_number(own, "max_iter", self.max_iter, low=1, integer=True)
        check_number(own, "tol", self.tol, low=0)
        check_number(own, "batch_size", self.batch_size, low=1, integer=True)
        check_number(own, "learning_rate", self.learning_rate, low=0, low_open=True)
        check_number(own, "max_memory", self.max_memory, low=1, integer=True, allow=(None,))
        check_option(own, "precision", self.precision, ("float32", "bf16"))
        check_number(own, "n_threads", self.n_threads, low=1, integer=True, allow=(None,))
        if not isinstance(self.device, str):
            raise DataError(f"The 'device' parameter of {own} must be a str such as 'cpu' or 'cuda'. Got {self.device!r}.")
        if self.Cs is not None:
            for c in np.atleast_1d(self.Cs):
                check_number(own, "Cs", float(c), low=0, low_open=True)

    def _labels(self, y: Any, n: int) -> np.ndarray:
        check_y_given(self, y)
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1:
            warnings.warn(
                "A column-vector y was passed when a 1d array was expected; it is raveled. Pass "
                "y.ravel() to silence this.", DataConversionWarning, stacklevel=4,  # the caller of fit
            )
            y = y[:, 0]
        if y.ndim != 1:
            raise DataError(f"y must be 1-D (one label per row); got shape {y.shape}.")
        check_rows(n, y, "y")
        kind = type_of_target(y)
        if kind not in ("binary", "multiclass"):
            raise DataError(
                f"Unknown label type: {kind!r}. LinearProbe needs class labels (ints or strings); use "
                "RidgeProbe for continuous targets."
            )
        return y

    # -- fit ---------------------------------------------------------------------------------
    def fit(self, X: Any, y: Any = None) -> LinearProbe:
        """Fit the probe on training rows ``X`` (array or Activations) and labels ``y``."""
        self._validate_params()
        y_idx, src = self._check_X_y(X, y)
        K = self.classes_.size
        use_torch = self._use_torch(src, K)
        self.backend_ = "torch" if use_torch else "sklearn"
        src = as_source(X, "X", chunk_rows=self.chunk_rows, dtype=np.float32 if use_torch else np.float64)
        in_memory = src.fits(self.max_memory)
        if not in_memory and self.chunk_rows is None:
            # a streamed fit holds one chunk plus its float copies and per-row logits/gradients:
            # chunks of a quarter of the budget keep the whole fit within it
            src.chunk_rows = max(1, int(self.max_memory) // (4 * src.n_features * src.dtype.itemsize))
        self.cv_results_ = None
        settings = self._solver_settings()
        with torch_threads(self.n_threads if use_torch else None):
            if self.C == "cv":
                Xa = src.load_within(self.max_memory, "C='cv'")
                self.C_ = self._select_C(Xa, y_idx, K, settings)
                src = as_source(Xa, "X", chunk_rows=self.chunk_rows, dtype=src.dtype)
            else:
                self.C_ = float(self.C)
            W, b, self.scaler_mean_, self.scaler_scale_, self.n_iter_ = self._fit_standardised(
                src, y_idx, K, self.C_, use_torch, in_memory, settings
            )
        if settings.notes:
            n = len(settings.notes)
            more = f" in {n} fits (the C='cv' folds included)" if n > 1 else ""
            warnings.warn(f"{type(self).__name__} did not converge{more}: {settings.notes[-1]}",
                          ConvergenceWarning, stacklevel=2)
        # map back to raw features
        coef = W / self.scaler_scale_[None, :]
        self.coef_ = coef
        self.intercept_ = b - coef @ self.scaler_mean_
        return self

    def _check_X_y(self, X: Any, y: Any) -> tuple[np.ndarray, Source]:
        """Validate the training input: sets ``n_features_in_`` and ``classes_``; returns each row's
        class index and ``X`` as a float64 source."""
        reject_sparse(self, X)
        src = estimator_source(self, X, np.float64, reset=True)
        y = self._labels(y, src.n_rows)
        classes, y_idx = np.unique(y, return_inverse=True)
        if classes.size < 2:
            raise DataError(
                f"y has only 1 class ({classes[0]!r}) in {src.n_rows} rows; a probe needs at least 2. "
                "Check the split or the label field."
            )
        self.classes_ = classes
        return y_idx, src

    def _use_torch(self, src: Source, K: int) -> bool:
        """The backend: torch when asked, or (``"auto"``) for a streamed input, a device other than
        the CPU or at least ``_AUTO_TORCH_WORK`` of n_samples x n_features x n_classes."""
        work = src.n_rows * src.n_features * K
        return self.backend == "torch" or (
            self.backend == "auto"
            and (self.device != "cpu" or not src.fits(self.max_memory) or work >= _AUTO_TORCH_WORK)
        )

    def _solver_settings(self) -> SolverSettings:
        return SolverSettings(
            max_iter=self.max_iter, tol=self.tol, solver=self.solver, device=self.device,
            precision=self.precision, batch_size=self.batch_size, learning_rate=self.learning_rate,
            max_memory=self.max_memory, n_threads=self.n_threads, random_state=self.random_state,
        )

    def _fit_standardised(self, src: Source, y_idx: np.ndarray, K: int, C: float, use_torch: bool,
                          in_memory: bool, settings: SolverSettings
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
        """Standardise with the rows' own statistics, then run the solver: ``(W, b, mean, scale, n_iter)``."""
        if in_memory:
            Xa = src.load()
            # column statistics over row blocks (float64 totals), then one standardised copy in the
            # fit's dtype: whole-array float64 temporaries (Xa.var, Xa - mean) took the in-memory torch
            # fit to 5x the layer's size in peak RSS (635 MiB for 125 MiB, bench_probes.py --stream)
            mean, scale, _ = scaler_stats(src, self.standardize, check_finite=False)  # load() checked
            Z = np.subtract(Xa, mean.astype(src.dtype), dtype=src.dtype)
            Z /= scale.astype(src.dtype)
            if use_torch:
                W, b, it = fit_torch_memory(Z, y_idx, K, C, settings)
            else:
                W, b, it = fit_sklearn(Z, y_idx, C, settings)
        else:
            mean, scale, _ = scaler_stats(src, self.standardize)
            W, b, it = fit_torch_stream(src, y_idx, K, C, mean, scale, settings)
        return W, b, mean, scale, it

    def _select_C(self, Xa: np.ndarray, y_idx: np.ndarray, K: int, settings: SolverSettings) -> float:
        """``C="cv"``: the grid's C of best stratified-``cv``-fold accuracy (sets ``cv_results_``)."""
        counts = np.bincount(y_idx)
        if counts.min() < self.cv:
            raise DataError(
                f"C='cv' with cv={self.cv} folds needs at least {self.cv} rows of every class; the "
                f"smallest class has {counts.min()}. Lower cv, pass a fixed C, or add rows."
            )
        Cs = [float(c) for c in (self.Cs if self.Cs is not None else _DEFAULT_CS)]
        skf = StratifiedKFold(n_splits=self.cv, shuffle=True, random_state=self.random_state)
        scores = np.zeros(len(Cs))
        for tr, te in skf.split(Xa, y_idx):
            sub = as_source(Xa[tr], "X", dtype=Xa.dtype)
            for j, C in enumerate(Cs):
                W, b, mean, scale, _ = self._fit_standardised(sub, y_idx[tr], K, C, self.backend_ == "torch",
                                                              True, settings)
                scores[j] += _fold_accuracy(Xa[te], y_idx[te], W, b, mean, scale) / self.cv
        self.cv_results_ = {"C": Cs, "mean_accuracy": scores.tolist()}
        return Cs[int(np.argmax(scores))]

    # -- predict -----------------------------------------------------------------------------
    def decision_function(self, X: Any) -> np.ndarray:
        """Class scores ``X @ coef_.T + intercept_`` (shape (n,) for two classes)."""
        check_fitted(self)
        reject_sparse(self, X)
        src = estimator_source(self, X, np.float64, reset=False)
        out = np.empty((src.n_rows, self.coef_.shape[0]))
        for start, a in src.chunks():
            out[start:start + a.shape[0]] = a @ self.coef_.T + self.intercept_
        return out[:, 0] if out.shape[1] == 1 else out

    def predict_proba(self, X: Any) -> np.ndarray:
        dec = self.decision_function(X)
        if dec.ndim == 1:
            p = 1.0 / (1.0 + np.exp(-dec))
            return np.column_stack([1.0 - p, p])
        dec = dec - dec.max(axis=1, keepdims=True)
        e = np.exp(dec)
        return e / e.sum(axis=1, keepdims=True)

    def predict_log_proba(self, X: Any) -> np.ndarray:
        return np.log(np.clip(self.predict_proba(X), 1e-300, None))

    def predict(self, X: Any) -> np.ndarray:
        dec = self.decision_function(X)
        idx = (dec > 0).astype(int) if dec.ndim == 1 else dec.argmax(axis=1)
        return self.classes_[idx]

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = False
        return tags


def _fold_accuracy(X: np.ndarray, y_idx: np.ndarray, W: np.ndarray, b: np.ndarray, mean: np.ndarray,
                   scale: np.ndarray) -> float:
    """Accuracy on held-out rows of a fit in standardised space (``W``, ``b``, the training rows'
    ``mean``/``scale``)."""
    # one BLAS thread: OpenBLAS workers busy-wait after a call and took a core from the
    # next torch fit (16,000 x 512 x 10, C="cv": 4.9 s before, 2.9 s; bench_probes.py --cv)
    with threadpool_limits(limits=1, user_api="blas"):
        dec = ((X - mean) / scale) @ W.T + b
    pred = (dec[:, 0] > 0).astype(int) if W.shape[0] == 1 else dec.argmax(axis=1)
    return float(np.mean(pred == y_idx))


# =================================================================================================
# ID / OOD protocol
# =================================================================================================
@dataclasses.dataclass(repr=False)
class ProbeIdOodResult(ResultMixin):
    """Probe accuracy in and out of distribution, with bootstrap 95% intervals.

    ``gap = id_accuracy - ood_accuracy``. With ``paired`` (row ``i`` of the ID and of the OOD test
    rows show the same foreground on two background families) every bootstrap replicate resamples
    row indices once and uses them for both splits, so the gap's interval reflects the variance of
    the per-row difference; otherwise the two splits are resampled independently (replicate ``b`` of
    the gap differences replicate ``b`` of each).
    """

    id_accuracy: float
    id_ci: tuple[float, float]
    ood_accuracy: float
    ood_ci: tuple[float, float]
    gap: float
    gap_ci: tuple[float, float]
    train_accuracy: float
    C: float
    n_train: int
    n_id: int
    n_ood: int
    n_boot: int
    ci_level: float
    paired: bool


def _bootstrap_accuracies(correct_id: np.ndarray, correct_ood: np.ndarray, n_boot: int,
                          rng: np.random.Generator, paired: bool) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap replicates of the ID and OOD accuracies from per-row correctness (0/1) vectors.

    ``paired``: replicate ``b`` draws one set of row indices and averages both vectors over it (the
    vectors must have equal length), so ``bid - bood`` is the bootstrap of the mean per-row
    difference. Otherwise each split is resampled on its own.
    """
    n_id, n_ood = correct_id.size, correct_ood.size
    bid, bood = np.empty(n_boot), np.empty(n_boot)
    if paired:
        for b in range(n_boot):
            idx = rng.integers(0, n_id, n_id)
            bid[b] = correct_id[idx].mean()
            bood[b] = correct_ood[idx].mean()
        return bid, bood
    for b in range(n_boot):
        bid[b] = correct_id[rng.integers(0, n_id, n_id)].mean()
    for b in range(n_boot):
        bood[b] = correct_ood[rng.integers(0, n_ood, n_ood)].mean()
    return bid, bood


def probe_id_ood(X_train: Any, y_train: Any, X_id: Any, y_id: Any, X_ood: Any, y_ood: Any, *,
                 probe: LinearProbe | None = None, n_boot: int = 1000, ci_level: float = 0.95,
                 random_state: int | None = 0, paired: bool | str = "auto") -> ProbeIdOodResult:
    r"""Fit a probe on ``train``; score it on ``test_id`` and ``test_ood`` with bootstrap intervals.

    ``gap = acc_ID - acc_OOD``. Each interval is the percentile interval of ``n_boot`` bootstrap
    resamples of the test rows.

    Parameters
    ----------
    X_train, y_train, X_id, y_id, X_ood, y_ood : arrays or Activations, labels
    probe : LinearProbe, optional
        An unfitted probe to use (cloned); default ``LinearProbe(C="cv")``.
    n_boot : int, default=1000
    ci_level : float, default=0.95
    random_state : int, optional
    paired : bool or "auto", default="auto"
        Whether row ``i`` of ``X_id`` and of ``X_ood`` are one pair (the same foreground on an ID and
        an OOD background, as in the built-in datasets). Paired: each bootstrap replicate resamples
        the row indices once and uses them for both splits, so the gap's interval is that of the
        mean per-row difference (narrower when the two correctness vectors correlate; exactly
        ``[0, 0]`` when the OOD rows equal the ID rows). Unpaired: the splits are resampled
        independently. ``"auto"``: paired when both splits have the same number of rows (for
        independent test sets of equal size the paired interval is valid too: pairs of independent
        rows are i.i.d. pairs). ``True`` with different row counts raises :class:`DataError`.

    Returns
    -------
    ProbeIdOodResult
        ``paired`` records which bootstrap was used.
    """
    check_number("probe_id_ood", "n_boot", n_boot, low=1, integer=True)
    check_number("probe_id_ood", "ci_level", ci_level, low=0, high=1, low_open=True)
    if isinstance(paired, (bool, np.bool_)):
        paired = bool(paired)
    elif not (isinstance(paired, str) and paired == "auto"):
        raise DataError(f"The 'paired' parameter of probe_id_ood must be True, False or 'auto'. Got {paired!r} instead.")
    n_id_rows, n_ood_rows = as_source(X_id, "X_id").n_rows, as_source(X_ood, "X_ood").n_rows
    if paired is True and n_id_rows != n_ood_rows:
        raise DataError(
            f"paired=True needs as many OOD rows as ID rows (row i of each the same foreground); got "
            f"{n_id_rows} ID and {n_ood_rows} OOD rows. Pass paired=False for independent test sets."
        )
    is_paired = bool(n_id_rows == n_ood_rows) if paired == "auto" else bool(paired)
    est = clone(probe) if probe is not None else LinearProbe(C="cv", random_state=random_state)
    est.fit(X_train, y_train)
    y_train = np.asarray(y_train)
    correct = {}
    for name, X, y in (("X_id", X_id, y_id), ("X_ood", X_ood, y_ood)):
        y = np.asarray(y)
        src = as_source(X, name)
        check_rows(src.n_rows, y, "y_" + name[2:], name)
        unknown = np.setdiff1d(np.unique(y), est.classes_)
        if unknown.size:
            raise DataError(
                f"y_{name[2:]} has labels {unknown.tolist()[:5]} that never occur in y_train; the probe "
                "cannot predict them. Use the same label set in every split."
            )
        correct[name] = (est.predict(X) == y).astype(np.float64)
    rng = np.random.default_rng(random_state)
    cid, cood = correct["X_id"], correct["X_ood"]
    bid, bood = _bootstrap_accuracies(cid, cood, n_boot, rng, is_paired)
    train_acc = float(np.mean(est.predict(X_train) == y_train))
    return ProbeIdOodResult(
        id_accuracy=float(cid.mean()), id_ci=percentile_ci(bid, ci_level),
        ood_accuracy=float(cood.mean()), ood_ci=percentile_ci(bood, ci_level),
        gap=float(cid.mean() - cood.mean()), gap_ci=percentile_ci(bid - bood, ci_level),
        train_accuracy=train_acc, C=float(est.C_), n_train=int(y_train.size), n_id=int(cid.size),
        n_ood=int(cood.size), n_boot=int(n_boot), ci_level=float(ci_level), paired=is_paired,
    )
