"""LinearProbe never stops above tol silently, and its torch fits run on n_threads threads.

Oracle for "not converged": the gradient of scikit-learn's objective written out in float64 numpy,
and scikit-learn's own ConvergenceWarning on the same fit.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from probekit.analyses import LinearProbe, _logistic
from probekit.errors import DataError
from probekit.testing import ArrayActivations, probe_objective_gradient


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X[:1200], y[:1200]


CASES = {
    "sklearn": dict(backend="sklearn"),
    "torch": dict(backend="torch"),
    "torch-streamed": dict(backend="torch", max_memory=1000, chunk_rows=400),
}


@pytest.mark.parametrize("case", list(CASES))
def test_max_iter_reached_warns_at_the_caller(digits, case):
    X, y = digits
    Xin = ArrayActivations(X, default_rows=50) if "streamed" in case else X
    with pytest.warns(ConvergenceWarning) as rec:
        probe = LinearProbe(C=1.0, max_iter=3, **CASES[case]).fit(Xin, y)
    assert len(rec) == 1
    w = rec[0]
    assert w.filename == __file__  # stacklevel: the line that called fit
    msg = str(w.message)
    for word in ("max_iter=3", "tol=0.0001", "Raise max_iter", "lower C", "standardi"):
        assert word in msg
    assert "\n" not in msg
    # the oracle agrees the fit is far from tol
    assert np.abs(probe_objective_gradient(probe, X, y)).max() > 1e-4


def test_sklearn_itself_warns_on_the_same_fit(digits):
    """The sklearn backend's warning stands for scikit-learn's own on the identical fit."""
    X, y = digits
    Z = (X - X.mean(0)) / np.where(X.std(0) > 0, X.std(0), 1.0)
    with pytest.warns(ConvergenceWarning):
        LogisticRegression(C=1.0, max_iter=3).fit(Z, y)


@pytest.mark.parametrize("case", list(CASES))
def test_converged_fit_does_not_warn(digits, case):
    X, y = digits
    Xin = ArrayActivations(X, default_rows=50) if "streamed" in case else X
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        probe = LinearProbe(C=1.0, max_iter=2000, **CASES[case]).fit(Xin, y)
    assert np.abs(probe_objective_gradient(probe, X, y)).max() <= 1e-4 * 1.01


def test_minibatch_warns_when_epochs_run_out(digits):
    X, y = digits
    with pytest.warns(ConvergenceWarning, match="max_iter=2 epochs") as rec:
        LinearProbe(C=1.0, backend="torch", solver="minibatch", max_iter=2, tol=1e-12,
                    random_state=0).fit(X, y)
    assert rec[0].filename == __file__


def test_C_cv_warns_once_for_its_fits(digits):
    X, y = digits
    with pytest.warns(ConvergenceWarning, match=r"in \d+ fits \(the C='cv' folds included\)") as rec:
        LinearProbe(C="cv", Cs=[1.0, 10.0], cv=2, max_iter=3, backend="torch", random_state=0).fit(X, y)
    assert len([w for w in rec if issubclass(w.category, ConvergenceWarning)]) == 1


def test_torch_fit_runs_on_n_threads_and_restores(digits, monkeypatch):
    X, y = digits
    seen = []
    real = _logistic.loss_grad

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(_logistic, "loss_grad", spy)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        LinearProbe(C=1.0, backend="torch").fit(X, y)
        assert seen and set(seen) == {1}  # the default: one thread
        assert torch.get_num_threads() == 2  # restored
        seen.clear()
        LinearProbe(C=1.0, backend="torch", n_threads=None).fit(X, y)
        assert set(seen) == {2}  # None: left as it was
        seen.clear()
        LinearProbe(C=1.0, backend="torch", n_threads=3).fit(X, y)
        assert set(seen) == {3}
        assert torch.get_num_threads() == 2

        def boom(*args, **kwargs):
            raise RuntimeError("planted failure")

        monkeypatch.setattr(_logistic, "loss_grad", boom)
        with pytest.raises(RuntimeError, match="planted"):
            LinearProbe(C=1.0, backend="torch").fit(X, y)
        assert torch.get_num_threads() == 2  # restored on error too
    finally:
        torch.set_num_threads(before)


def test_n_threads_is_validated(digits):
    X, y = digits
    with pytest.raises(DataError, match="'n_threads' parameter"):
        LinearProbe(n_threads=0).fit(X, y)
    with pytest.raises(DataError, match="'precision' parameter"):
        LinearProbe(precision="float16").fit(X, y)
