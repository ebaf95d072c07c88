"""CKA, relative MSE and differences against direct numpy implementations."""

from __future__ import annotations

import numpy as np
import pytest

from probekit.analyses import linear_cka, relative_mse
from probekit.errors import DataError
from probekit.testing import ArrayActivations as _FakeActs


def _cka_numpy(X, Y):
    """Kernel form: HSIC(K, L) = tr(K H L H), K = X X^T."""
    n = X.shape[0]
    H = np.eye(n) - 1.0 / n
    K, L = X @ X.T, Y @ Y.T
    hsic = lambda A, B: np.trace(A @ H @ B @ H)  # noqa: E731
    return hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))


def _cka_unbiased_numpy(X, Y):
    n = X.shape[0]

    def hsic_u(K, L):
        K, L = K.copy(), L.copy()
        np.fill_diagonal(K, 0)
        np.fill_diagonal(L, 0)
        one = np.ones(n)
        return (np.trace(K @ L) + one @ K @ one * (one @ L @ one) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * one @ K @ L @ one) / (n * (n - 3))

    K, L = X @ X.T, Y @ Y.T
    return hsic_u(K, L) / np.sqrt(hsic_u(K, K) * hsic_u(L, L))


@pytest.fixture(scope="module")
def xy():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 10)) + 3
    Y = X[:, :6] @ rng.normal(size=(6, 7)) + 0.5 * rng.normal(size=(80, 7))
    return X, Y


@pytest.mark.parametrize("chunk", [1, 7, 80])
def test_cka_equals_numpy_streamed(xy, chunk):
    X, Y = xy
    assert linear_cka(_FakeActs(X), _FakeActs(Y), chunk_rows=chunk) == pytest.approx(_cka_numpy(X, Y), abs=1e-10)
    assert linear_cka(_FakeActs(X), Y, debiased=True, chunk_rows=chunk) == pytest.approx(
        _cka_unbiased_numpy(X, Y), abs=1e-9)


def test_cka_invariances(xy):
    X, Y = xy
    Q = np.linalg.qr(np.random.default_rng(1).normal(size=(10, 10)))[0]
    assert linear_cka(X, X) == pytest.approx(1.0)
    assert linear_cka(X, X, debiased=True) == pytest.approx(1.0)
    base = linear_cka(X, Y)
    assert linear_cka(X @ Q, Y) == pytest.approx(base, abs=1e-12)
    assert linear_cka(7.5 * X, 0.1 * Y) == pytest.approx(base, abs=1e-12)
    assert linear_cka(X, Y, debiased=True) < base  # the debiased estimator removes upward bias
    with pytest.raises(DataError, match="rows"):
        linear_cka(X, Y[:-1])


def test_relative_mse_raw_and_mapped():
    rng = np.random.default_rng(0)
    T = rng.normal(size=(300, 5))
    S = T + 0.1 * rng.normal(size=(300, 5))
    res = relative_mse(_FakeActs(S), _FakeActs(T), chunk_rows=17)
    assert res.raw == pytest.approx(((S - T) ** 2).sum() / ((T - T.mean(0)) ** 2).sum())
    # a rotated, shifted student: raw is bad, an affine map fitted on other rows fixes it
    R = np.linalg.qr(rng.normal(size=(5, 5)))[0]
    S2 = S @ R + 4.0
    res2 = relative_mse(S2[200:], T[200:], student_fit=S2[:200], teacher_fit=T[:200])
    A = np.column_stack([S2[:200], np.ones(200)])
    coef = np.linalg.lstsq(A, T[:200], rcond=None)[0]
    pred = np.column_stack([S2[200:], np.ones(100)]) @ coef
    ref = ((pred - T[200:]) ** 2).sum() / ((T[200:] - T[200:].mean(0)) ** 2).sum()
    assert res2.mapped == pytest.approx(ref, rel=1e-8)
    assert res2.raw > 1.0 and res2.mapped < 0.05
