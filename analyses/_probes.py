"""Linear probes: multinomial logistic regression and ridge, with sklearn and torch backends."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin

from probekit.errors import DataError

from ._common import (
    DEFAULT_MAX_MEMORY,
    FitFirstError,
    ResultMixin,
    Source,
    as_source,
    check_number,
    check_option,
    check_rows,
    percentile_ci,
)

__all__ = ["LinearProbe", "ProbeIdOodResult", "RidgeProbe", "probe_id_ood"]

_DEFAULT_CS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
_DEFAULT_ALPHAS = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
# n_samples * n_features * n_classes from which backend="auto" picks torch. Both backends on one thread,
# in memory, C=1: below 1e6 neither was consistently faster (ratios 0.56-1.6x, every fit under 0.1 s);
# from 1e6 to 5e7 torch was 1.4-4.0x faster in every case tried, with the same iteration counts
_AUTO_TORCH_WORK = 1e6


def _check_fitted(est: Any, attr: str = "coef_") -> None:
    if not hasattr(est, attr):
        raise FitFirstError(
            f"This {type(est).__name__} instance is not fitted yet. Call 'fit' with appropriate "
            "arguments before using this estimator."
        )


def _check_y_given(est: Any, y: Any) -> None:
    if y is None:
        raise DataError(
            f"{type(est).__name__} requires y to be passed, but the target y is None. Pass the "
            "labels (classification) or targets (regression) of the rows of X."
        )


def _source_for(est: Any, X: Any, dtype: Any, *, reset: bool, min_rows: int = 1) -> Source:
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
    if hasattr(X, "iter_chunks") or isinstance(X, np.ndarray) or isinstance(X, (list, tuple)):
        return True
    if hasattr(X, "__array__"):
        return True
    if type(X).__module__.startswith("scipy.sparse") or hasattr(X, "tocsr"):
        return False
    return False


def _reject_sparse(est: Any, X: Any) -> None:
    if hasattr(X, "tocsr") or type(X).__module__.startswith("scipy.sparse"):
        raise DataError(
            f"{type(est).__name__} does not accept sparse input; pass a dense array (X.toarray())."
        )


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
        from sklearn.utils.multiclass import type_of_target

        _check_y_given(self, y)
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1:
            from sklearn.exceptions import DataConversionWarning

            warnings.warn(
                "A column-vector y was passed when a 1d array was expected; it is raveled. Pass "
                "y.ravel() to silence this.", DataConversionWarning, stacklevel=3,
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
        _reject_sparse(self, X)
        src0 = _source_for(self, X, np.float64, reset=True)
        y = self._labels(y, src0.n_rows)
        classes, y_idx = np.unique(y, return_inverse=True)
        if classes.size < 2:
            raise DataError(
                f"y has only 1 class ({classes[0]!r}) in {src0.n_rows} rows; a probe needs at least 2. "
                "Check the split or the label field."
            )
        self.classes_ = classes
        K = classes.size
        work = src0.n_rows * src0.n_features * K
        use_torch = self.backend == "torch" or (
            self.backend == "auto"
            and (self.device != "cpu" or not src0.fits(self.max_memory) or work >= _AUTO_TORCH_WORK)
        )
        self.backend_ = "torch" if use_torch else "sklearn"
        src = as_source(X, "X", chunk_rows=self.chunk_rows, dtype=np.float32 if use_torch else np.float64)
        in_memory = src.fits(self.max_memory)
        if not in_memory and self.chunk_rows is None:
            # a streamed fit holds one chunk plus its float copies and per-row logits/gradients:
            # chunks of a quarter of the budget keep the whole fit within it
            src.chunk_rows = max(1, int(self.max_memory) // (4 * src.n_features * src.dtype.itemsize))
        self.cv_results_ = None
        self._unconverged: list[str] = []
        with self._threads(use_torch):
            if self.C == "cv":
                Xa = src.load_within(self.max_memory, "C='cv'")
                self.C_ = self._select_C(Xa, y_idx, K)
                src = as_source(Xa, "X", chunk_rows=self.chunk_rows, dtype=src.dtype)
            else:
                self.C_ = float(self.C)
            W, b, self.scaler_mean_, self.scaler_scale_, self.n_iter_ = self._fit_core(
                src, y_idx, K, self.C_, use_torch, in_memory
            )
        notes = self.__dict__.pop("_unconverged")
        if notes:
            from sklearn.exceptions import ConvergenceWarning

            more = f" in {len(notes)} fits (the C='cv' folds included)" if len(notes) > 1 else ""
            warnings.warn(f"{type(self).__name__} did not converge{more}: {notes[-1]}", ConvergenceWarning,
                          stacklevel=2)
        # map back to raw features
        coef = W / self.scaler_scale_[None, :]
        self.coef_ = coef
        self.intercept_ = b - coef @ self.scaler_mean_
        return self

    @contextlib.contextmanager
    def _threads(self, use_torch: bool) -> Iterator[None]:
        """``n_threads`` torch threads (torch fits) for the block; the previous number restored after."""
        if self.n_threads is None or not use_torch:
            yield
            return
        import torch

        old = torch.get_num_threads()
        torch.set_num_threads(int(self.n_threads))
        try:
            yield
        finally:
            torch.set_num_threads(old)

    def _note_unconverged(self, what: str) -> None:
        """Record a non-converged fit; ``fit`` warns once, pointing at its caller."""
        if hasattr(self, "_unconverged"):
            self._unconverged.append(f"{what} Raise max_iter, lower C, or standardise the features "
                                     "(standardize=True).")

    def _fit_core(self, src: Source, y_idx: np.ndarray, K: int, C: float, use_torch: bool,
                  in_memory: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
        if in_memory:
            Xa = src.load()
            # column statistics over row blocks (float64 totals), then one standardised copy in the
            # fit's dtype: whole-array float64 temporaries (Xa.var, Xa - mean) took the in-memory torch
            # fit to 5x the layer's size in peak RSS (635 MiB for 125 MiB, bench_probes.py --stream)
            mean, scale, _ = scaler_stats(src, self.standardize, check_finite=False)  # load() checked
            Z = np.subtract(Xa, mean.astype(src.dtype), dtype=src.dtype)
            Z /= scale.astype(src.dtype)
            if use_torch:
                W, b, it = self._fit_torch_memory(Z, y_idx, K, C)
            else:
                W, b, it = self._fit_sklearn(Z, y_idx, C)
        else:
            mean, scale, _ = scaler_stats(src, self.standardize)
            W, b, it = self._fit_torch_stream(src, y_idx, K, C, mean, scale)
        return W, b, mean, scale, it

    def _fit_sklearn(self, Z: np.ndarray, y_idx: np.ndarray, C: float) -> tuple[np.ndarray, np.ndarray, int]:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
        from threadpoolctl import threadpool_limits

        lr = LogisticRegression(C=C, max_iter=self.max_iter, tol=self.tol)
        # One BLAS/OpenMP thread by default (n_threads=1): on a busy 2-core machine their
        # spin-waiting made a 1197 x 512 x 10 fit 50x slower (40.0 s vs 0.79 s, measured side by side).
        limits = threadpool_limits(limits=self.n_threads) if self.n_threads is not None else contextlib.nullcontext()
        with warnings.catch_warnings(record=True) as caught, limits:
            warnings.simplefilter("always", ConvergenceWarning)
            lr.fit(Z, y_idx)
        n_iter = int(np.max(lr.n_iter_))
        for w in caught:  # scikit-learn's own warning points inside probekit: one of ours replaces it
            if issubclass(w.category, ConvergenceWarning):
                self._note_unconverged(
                    f"scikit-learn's L-BFGS stopped after {n_iter} iterations (max_iter={self.max_iter}) "
                    f"before max|gradient| <= tol={self.tol:g}."
                )
                break
        for w in caught:
            if not issubclass(w.category, ConvergenceWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
        return lr.coef_.astype(np.float64), lr.intercept_.astype(np.float64), n_iter

    # torch --------------------------------------------------------------------------------------
    # Gradients are written by hand (no autograd graph): on CPU the thin matmuls are memory bound,
    # and autograd's transposed products made each evaluation ~2.5x slower.
    def _torch_params(self, d: int, K: int) -> tuple[Any, Any, Any, Any]:
        import torch

        dev = torch.device(self.device)
        out = 1 if K == 2 else K
        W = torch.zeros(out, d, dtype=torch.float32, device=dev)
        b = torch.zeros(out, dtype=torch.float32, device=dev)
        return torch, dev, W, b

    @staticmethod
    def _loss_P(torch: Any, logits: Any, yt: Any, K: int, n: int) -> tuple[float, Any]:
        """Data term sum_i loss_i / n from the logits, and P, its gradient with respect to them."""
        if K == 2:
            z = logits[:, 0]
            yf = yt.to(z.dtype)
            loss = (torch.nn.functional.softplus(z) - yf * z).sum(dtype=torch.float64) / n
            return float(loss), (torch.sigmoid(z) - yf).unsqueeze(1) / n
        # one-hot algebra instead of gather/index_put: cheaper on CPU for thin (n, K) blocks; the
        # log-sum-exp by hand: torch.log_softmax took 0.9 ms at 16,000 x 10, this 0.3 ms. Each row's
        # loss is formed before the sum, and the sum is float64: summing log-sum-exp and the label's
        # logit over all rows in float32 and subtracting the totals lost 2-3 digits and stalled line
        # searches
        Y = torch.nn.functional.one_hot(yt, K).to(logits.dtype) if yt.ndim == 1 else yt
        m = logits.amax(dim=1, keepdim=True)
        E = (logits - m).exp_()
        s = E.sum(dim=1, keepdim=True)
        loss = s.log().add_(m).squeeze_(1).sub_((logits * Y).sum(dim=1)).sum(dtype=torch.float64) / n
        return float(loss), E.div_(s).sub_(Y).div_(n)

    @staticmethod
    def _loss_grad(torch: Any, Z: Any, yt: Any, W: Any, b: Any, K: int, n: int) -> tuple[float, Any, Any]:
        """Data term sum_i loss_i / n of the rows in Z and its gradients (no penalty)."""
        loss, P = LinearProbe._loss_P(torch, torch.addmm(b, Z, W.t()), yt, K, n)
        return loss, P.t() @ Z, P.sum(dim=0)

    def _lbfgs(self, torch: Any, W: Any, b: Any, loss_grad: Any, lam: float, *, max_iter: int | None = None,
               tol: float | None = None, tolerance_change: float = 1e-12) -> tuple[int, float | None]:
        """Full-batch L-BFGS with strong-Wolfe line search on data term + lam/2 ||W||^2.

        Returns the iterations and max |gradient| at the final point when the last evaluation was
        there (the line search accepted its last trial; None otherwise).
        """
        max_iter = self.max_iter if max_iter is None else max_iter
        opt = torch.optim.LBFGS(
            [W, b], lr=1.0, max_iter=max_iter, max_eval=int(max_iter * 1.25) + 1,
            tolerance_grad=self.tol if tol is None else tol, tolerance_change=tolerance_change,
            history_size=10, line_search_fn="strong_wolfe",
        )
        last: dict[str, Any] = {}

        def closure() -> Any:
            loss, gW, gb = loss_grad()
            W.grad = gW + lam * W
            b.grad = gb
            last["W"], last["b"] = W.clone(), b.clone()
            # float64: a float32 tensor rounded the objective to 3e-8 and stalled the line search
            return torch.tensor(loss + 0.5 * lam * float((W * W).sum()), dtype=torch.float64)

        with torch.no_grad():
            opt.step(closure)
        n_iter = int(opt.state[opt._params[0]].get("n_iter", 0))
        at_last = bool(last) and torch.equal(last["W"], W) and torch.equal(last["b"], b)
        return n_iter, (max(float(W.grad.abs().max()), float(b.grad.abs().max())) if at_last else None)

    def _finish(self, torch: Any, W: Any, b: Any, lam: float, it: int, loss_grad_at: Any) -> tuple[Any, Any, int]:
        """L-BFGS in float32 from (W, b) to tol, then in float64 if float32 stopped above it.

        ``loss_grad_at(W, b)`` returns the evaluation closure for those tensors (float32 or float64).
        float32 losses can stop resolving a line search's progress before a small tol is reached;
        the float64 stage (W, b and each row block of Z cast to float64) goes on from there.
        """
        def final_gmax(W: Any, b: Any, gmax: float | None) -> float:
            if gmax is None:  # the line search ended on an earlier trial: one more evaluation
                _, gW, gb = loss_grad_at(W, b)()
                gmax = max(float((gW + lam * W).abs().max()), float(gb.abs().max()))
            return gmax

        def unconverged(gmax: float) -> None:
            self._note_unconverged(
                f"torch L-BFGS stopped after {it} iterations (max_iter={self.max_iter}) at max|gradient| = "
                f"{gmax:.2g} > tol={self.tol:g}."
            )

        if it >= self.max_iter:  # an earlier (bfloat16) stage used every iteration
            gmax = final_gmax(W, b, None)
            if gmax > self.tol:
                unconverged(gmax)
            return W, b, it
        n32, gmax = self._lbfgs(torch, W, b, loss_grad_at(W, b), lam, max_iter=self.max_iter - it)
        it += n32
        if n32 == 0:  # the first evaluation met tol
            return W, b, it
        gmax = final_gmax(W, b, gmax)
        if gmax <= self.tol:
            return W, b, it
        if it >= self.max_iter:
            unconverged(gmax)
            return W, b, it
        if W.device.type == "mps":
            self._note_unconverged(
                f"torch L-BFGS stopped at max|gradient| = {gmax:.2g} > tol={self.tol:g}: float32 cannot "
                "resolve the loss further and MPS has no float64. Raise tol, or fit on the CPU."
            )
            return W, b, it
        W, b = W.double(), b.double()
        n64, g64 = self._lbfgs(torch, W, b, loss_grad_at(W, b), lam, max_iter=self.max_iter - it)
        it += n64
        if n64 > 0:
            g64 = final_gmax(W, b, g64)
            if g64 > self.tol:
                unconverged(g64)
        return W, b, it

    def _adam(self, torch: Any, W: Any, b: Any, lam: float, n: int, K: int, batches: Any) -> int:
        opt = torch.optim.Adam([W, b], lr=self.learning_rate)
        rng = np.random.default_rng(self.random_state)
        prev = np.inf
        epoch = 0
        for epoch in range(1, self.max_iter + 1):  # noqa: B007
            total = 0.0
            for Zb, yb in batches(rng):
                m = Zb.shape[0]
                loss, gW, gb = self._loss_grad(torch, Zb, yb, W, b, K, m)
                W.grad = gW + lam * W
                b.grad = gb
                opt.step()
                total += (loss + 0.5 * lam * float((W * W).sum())) * m / n
            if abs(prev - total) <= self.tol * max(1.0, abs(total)):
                break
            prev = total
        else:
            self._note_unconverged(
                f"minibatch Adam ran max_iter={self.max_iter} epochs without the epoch loss changing by "
                f"less than tol={self.tol:g} (relative)."
            )
        return epoch

    @staticmethod
    def _out(W: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
        return W.detach().cpu().double().numpy().copy(), b.detach().cpu().double().numpy().copy()

    def _fit_torch_memory(self, Z: np.ndarray, y_idx: np.ndarray, K: int, C: float) -> tuple[np.ndarray, np.ndarray, int]:
        torch, dev, W, b = self._torch_params(Z.shape[1], K)
        n = Z.shape[0]
        Zt = torch.from_numpy(np.ascontiguousarray(Z, dtype=np.float32)).to(dev)
        yt = torch.from_numpy(y_idx.astype(np.int64)).to(dev)
        lam = 1.0 / (C * n)
        with torch.no_grad():
            if self.solver == "minibatch":
                it = self._adam(torch, W, b, lam, n, K,
                                lambda rng: _batches_memory(Zt, yt, self.batch_size, rng, torch))
            else:
                Yt = yt if K == 2 else torch.nn.functional.one_hot(yt, K).to(Zt.dtype)
                it = 0
                if (self.precision == "bf16" and n * Z.shape[1] * K >= _MIXED_MIN_WORK
                        and _bf16_matmul_fast(torch, dev)):
                    # bfloat16 iterations first, then float32 ones from where they stopped: the
                    # float32 stage applies the stopping test to exact evaluations (usually one)
                    it, _ = self._lbfgs(torch, W, b, _Bf16Evaluator(torch, Zt, Yt, W, b, K, n), lam,
                                        tol=max(self.tol, _BF16_MIN_TOL), tolerance_change=1e-9)
                W, b, it = self._finish(torch, W, b, lam, it,
                                        lambda W, b: lambda: _loss_grad_as_W(torch, Zt, Yt, W, b, K, n))
        return (*self._out(W, b), it)

    def _fit_torch_stream(self, src: Source, y_idx: np.ndarray, K: int, C: float, mean: np.ndarray,
                          scale: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        torch, dev, W, b = self._torch_params(src.n_features, K)
        n = src.n_rows
        lam = 1.0 / (C * n)
        mt = torch.from_numpy(mean.astype(np.float32)).to(dev)
        st = torch.from_numpy(scale.astype(np.float32)).to(dev)
        yall = torch.from_numpy(y_idx.astype(np.int64))

        buf = None  # one standardised chunk, reused: fresh chunk-sized temporaries at every
        # evaluation left glibc's heap holding 3-6x the budget (measured peak RSS growth 114-252 MiB
        # for 32 MiB, vs 47 MiB with a fixed mmap threshold)

        def chunks(rng: np.random.Generator | None = None) -> Any:
            nonlocal buf
            for start, a in src.chunks():
                rows = a.shape[0]
                if buf is None or buf.shape[0] < rows:
                    buf = torch.empty((rows, src.n_features), dtype=torch.float32, device=dev)
                Zc = buf[:rows]
                Zc.copy_(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))).sub_(mt).div_(st)
                yc = yall[start:start + rows].to(dev)
                if rng is None:
                    yield Zc, yc
                else:
                    yield from _batches_memory(Zc, yc, self.batch_size, rng, torch)

        def loss_grad_at(W: Any, b: Any) -> Any:
            block = max(1, int(self.max_memory) // 8)  # float64 row blocks of an eighth of the budget

            def loss_grad() -> tuple[float, Any, Any]:
                total, gW, gb = 0.0, torch.zeros_like(W), torch.zeros_like(b)
                for Zc, yc in chunks():
                    lo, gw, gbb = _loss_grad_as_W(torch, Zc, yc, W, b, K, n, block_bytes=block)
                    total += lo
                    gW += gw
                    gb += gbb
                return total, gW, gb

            return loss_grad

        with torch.no_grad():
            if self.solver == "minibatch":
                it = self._adam(torch, W, b, lam, n, K, chunks)
            else:
                W, b, it = self._finish(torch, W, b, lam, 0, loss_grad_at)
        return (*self._out(W, b), it)

    def _select_C(self, Xa: np.ndarray, y_idx: np.ndarray, K: int) -> float:
        from sklearn.model_selection import StratifiedKFold
        from threadpoolctl import threadpool_limits

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
                W, b, mean, scale, _ = self._fit_core(sub, y_idx[tr], K, C, self.backend_ == "torch", True)
                # one BLAS thread: OpenBLAS workers busy-wait after a call and took a core from the
                # next torch fit (16,000 x 512 x 10, C="cv": 4.9 s before, 2.9 s; bench_probes.py --cv)
                with threadpool_limits(limits=1, user_api="blas"):
                    dec = ((Xa[te] - mean) / scale) @ W.T + b
                pred = (dec[:, 0] > 0).astype(int) if K == 2 else dec.argmax(axis=1)
                scores[j] += np.mean(pred == y_idx[te]) / self.cv
        self.cv_results_ = {"C": Cs, "mean_accuracy": scores.tolist()}
        return Cs[int(np.argmax(scores))]

    # -- predict -----------------------------------------------------------------------------
    def decision_function(self, X: Any) -> np.ndarray:
        """Class scores ``X @ coef_.T + intercept_`` (shape (n,) for two classes)."""
        _check_fitted(self)
        _reject_sparse(self, X)
        src = _source_for(self, X, np.float64, reset=False)
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


_MIXED_MIN_WORK = 2e7  # n * d * K from which precision="bf16" starts the in-memory L-BFGS in bfloat16
_BF16_MIN_TOL = 1e-4  # the bfloat16 stage stops at max(tol, this): its gradients are exact to ~1e-5
_BF16_REFRESH = 8  # exact float32 logits every this many bfloat16 evaluations


def _bf16_matmul_fast(torch: Any, dev: Any) -> bool:
    """Whether bfloat16 GEMMs run on dedicated instructions here (CPU with AVX512-BF16 or AMX).

    Only the CPU was measured (bench_probes.py: an evaluation of the 16,000 x 512 x 10 objective
    1.6-2.7 ms in bfloat16, 5.6-6.4 ms in float32, on AVX512-BF16); elsewhere the probe stays in float32.
    """
    if dev.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, f, None) for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        return any(bool(f()) for f in checks if f is not None)
    except RuntimeError:
        return False


def _loss_grad_as_W(torch: Any, Z: Any, Y: Any, W: Any, b: Any, K: int, n: int, *,
                    block_bytes: int = 16 << 20) -> tuple[float, Any, Any]:
    """``LinearProbe._loss_grad`` in the dtype of W: directly when Z has it, else (float64 W and b
    over float32 Z) over row blocks of ``block_bytes`` cast to W's dtype, so no whole copy is made."""
    if Z.dtype == W.dtype:
        return LinearProbe._loss_grad(torch, Z, Y, W, b, K, n)
    rows = max(1, block_bytes // (W.element_size() * Z.shape[1]))
    total, gW, gb = 0.0, torch.zeros_like(W), torch.zeros_like(b)
    for i in range(0, Z.shape[0], rows):
        Zc = Z[i:i + rows].to(W.dtype)
        loss, P = LinearProbe._loss_P(torch, torch.addmm(b, Zc, W.t()), Y[i:i + rows], K, n)
        total += loss
        gW += P.t() @ Zc
        gb += P.sum(dim=0)
    return total, gW, gb


class _Bf16Evaluator:
    r"""Loss and gradients of the logistic data term from a bfloat16 copy of the features.

    Written by hand because no library evaluates a GLM this way: each call adds the logits of the
    step since the last call, :math:`Z_{bf16}\,\mathrm{bf16}(W - W_\ell)^\top`, to float32 logits
    instead of recomputing :math:`Z W^\top`, so bfloat16's 8-bit mantissa rounds the step and the
    step's logits (the product comes out in bfloat16), not the weights or the logits themselves,
    and the loss stays smooth enough for the line search. :math:`W_\ell` advances by
    the rounded step (what was added), so rounding errors do not accumulate; every
    ``_BF16_REFRESH`` calls the logits are recomputed exactly in float32, which bounds the drift from
    rounding :math:`Z` itself. The gradient :math:`P^\top Z` runs in bfloat16 with float32
    accumulation (error ~1e-5 of the mean-scaled gradient at n = 16,000, below the default tol).
    On AVX512-BF16 an evaluation took 1.6-2.7 ms instead of 5.6-6.4 ms in float32 (16,000 x 512 x 10,
    ``python benchmarks/bench_probes.py``).
    """

    def __init__(self, torch: Any, Z: Any, Y: Any, W: Any, b: Any, K: int, n: int) -> None:
        self.torch, self.Z, self.Y, self.W, self.b, self.K, self.n = torch, Z, Y, W, b, K, n
        self.Zb = Z.to(torch.bfloat16)
        self.logits: Any = None
        self.W_at = W.clone()  # the weights the logits stand for
        self.b_at = b.clone()
        self.calls = 0

    def __call__(self) -> tuple[float, Any, Any]:
        torch, W, b = self.torch, self.W, self.b
        if self.calls % _BF16_REFRESH == 0:
            self.logits = torch.addmm(b, self.Z, W.t())
            self.W_at.copy_(W)
        else:
            step = (W - self.W_at).to(torch.bfloat16)
            self.logits += (self.Zb @ step.t()).float()
            self.logits += b - self.b_at
            self.W_at += step.float()
        self.b_at.copy_(b)
        self.calls += 1
        loss, P = LinearProbe._loss_P(torch, self.logits, self.Y, self.K, self.n)
        gW = (P.to(torch.bfloat16).t() @ self.Zb).float()
        return loss, gW, P.sum(dim=0)


def _batches_memory(Z: Any, y: Any, batch_size: int, rng: np.random.Generator, torch: Any) -> Any:
    perm = torch.from_numpy(rng.permutation(Z.shape[0])).to(Z.device)
    for i in range(0, Z.shape[0], batch_size):
        idx = perm[i:i + batch_size]
        yield Z[idx], y[idx]


# =================================================================================================
# Ridge probe
# =================================================================================================
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
        _reject_sparse(self, X)
        _check_y_given(self, y)
        src = _source_for(self, X, np.float64, reset=True)
        y = np.asarray(y)
        if y.dtype == object or not np.issubdtype(y.dtype, np.number):
            try:
                y = y.astype(np.float64)
            except (TypeError, ValueError) as e:
                raise DataError(f"y must be numeric for {own}; got dtype {y.dtype}.") from e
        y = y.astype(np.float64)
        if y.ndim not in (1, 2):
            raise DataError(f"y must be 1-D or 2-D; got shape {y.shape}.")
        check_rows(src.n_rows, y, "y")
        if not np.isfinite(y).all():
            raise DataError("y contains NaN or inf; remove or impute those rows first.")
        Y = y[:, None] if y.ndim == 1 else y
        self.cv_results_ = None
        if self.alpha == "cv":
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
            coef, icpt = ridge_solve(full, np.array([True]), self.alpha_, self.standardize)
        else:
            self.alpha_ = float(self.alpha)
            st = ridge_stats(src, Y)
            coef, icpt = ridge_solve(st, np.array([True]), self.alpha_, self.standardize)
        self.coef_ = coef[:, 0] if y.ndim == 1 else coef.T
        self.intercept_ = float(icpt[0]) if y.ndim == 1 else icpt
        return self

    def predict(self, X: Any) -> np.ndarray:
        _check_fitted(self)
        _reject_sparse(self, X)
        src = _source_for(self, X, np.float64, reset=False)
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
    from sklearn.base import clone

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
