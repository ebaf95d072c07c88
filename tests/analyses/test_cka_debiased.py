"""Debiased linear CKA against an n x n numpy oracle and planted population values; torch inputs.

Planted truths: independent representations have population CKA 0; for X with identity covariance
and Y = X + E (E independent, variance s^2 per feature) the population linear CKA is
||Cov(X, Y)||_F^2 / (||Cov(X)||_F ||Cov(Y)||_F) = d / (d (1 + s^2)) = 1 / (1 + s^2).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probekit.analyses import linear_cka, relative_mse
from probekit.errors import DataError
from probekit.testing import ArrayActivations


def _hsic_u_oracle(K: np.ndarray, L: np.ndarray) -> float:
    """Song et al. (2012), eq. 5, with the n x n kernels written out."""
    n = K.shape[0]
    K, L = K - np.diag(np.diag(K)), L - np.diag(np.diag(L))
    one = np.ones(n)
    return float((np.trace(K @ L) + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2))
                  - 2.0 / (n - 2) * (one @ K @ L @ one)) / (n * (n - 3)))


def _cka_u_oracle(X: np.ndarray, Y: np.ndarray) -> float:
    X, Y = X.astype(np.float64), Y.astype(np.float64)
    K, L = X @ X.T, Y @ Y.T
    return _hsic_u_oracle(K, L) / np.sqrt(_hsic_u_oracle(K, K) * _hsic_u_oracle(L, L))


def _cka_oracle(X: np.ndarray, Y: np.ndarray) -> float:
    n = X.shape[0]
    H = np.eye(n) - 1.0 / n
    K, L = H @ X @ X.T @ H, H @ Y @ Y.T @ H
    return float(np.sum(K * L) / np.sqrt(np.sum(K * K) * np.sum(L * L)))


@pytest.fixture(scope="module")
def independent():
    rng = np.random.default_rng(0)
    return rng.normal(size=(600, 512)), rng.normal(size=(600, 512))


def test_independent_features_debiased_near_zero_biased_not(independent):
    X, Y = independent
    biased = linear_cka(X, Y)
    debiased = linear_cka(X, Y, debiased=True)
    assert biased > 0.3  # 0.46: the plain estimator's bias at d ~ n
    assert abs(debiased) < 0.05
    assert biased == pytest.approx(_cka_oracle(X, Y), abs=1e-10)
    assert debiased == pytest.approx(_cka_u_oracle(X, Y), abs=1e-10)


def test_planted_population_value_is_recovered():
    rng = np.random.default_rng(1)
    n, d, s2 = 600, 512, 1.0
    X = rng.normal(size=(n, d))
    Y = X + np.sqrt(s2) * rng.normal(size=(n, d))
    truth = 1.0 / (1.0 + s2)
    assert linear_cka(X, Y, debiased=True) == pytest.approx(truth, abs=0.02)
    assert linear_cka(X, Y) > truth + 0.15  # biased: 0.73


@pytest.mark.parametrize("chunk", [None, 1, 97])
def test_debiased_matches_oracle_streamed_with_offsets(chunk):
    rng = np.random.default_rng(2)
    X = rng.normal(size=(150, 40)) * rng.uniform(0.1, 5, 40) + 50.0
    Y = np.tanh(X[:, :25] @ rng.normal(size=(25, 30)) / 20) + 0.3 * rng.normal(size=(150, 30)) - 7.0
    got = linear_cka(ArrayActivations(X, default_rows=13), ArrayActivations(Y, default_rows=13),
                     debiased=True, chunk_rows=chunk)
    assert got == pytest.approx(_cka_u_oracle(X, Y), abs=1e-9)


def test_float32_input_agrees_with_float64_oracle(independent):
    X, Y = independent
    X32, Y32 = (X + 10).astype(np.float32), (Y[:, :100] @ X[:100, :64] + X[:, :64]).astype(np.float32)
    assert linear_cka(X32, Y32, debiased=True) == pytest.approx(_cka_u_oracle(X32, Y32), abs=1e-5)


def test_identical_or_rotated_scaled_copies_give_one(independent):
    X, _ = independent
    assert linear_cka(X, X, debiased=True) == pytest.approx(1.0, abs=1e-12)
    X = X[:, :64]
    Q = np.linalg.qr(np.random.default_rng(3).normal(size=(64, 64)))[0]
    assert linear_cka(X, 3.0 * X @ Q + 1.0, debiased=True) == pytest.approx(1.0, abs=1e-9)


def test_too_few_rows_for_debiased():
    X = np.random.default_rng(0).normal(size=(3, 2))
    with pytest.raises(DataError, match="at least 4 rows"):
        linear_cka(X, X, debiased=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_torch_tensors_are_accepted(dtype):
    rng = np.random.default_rng(4)
    X = rng.normal(size=(120, 16))
    Y = X @ rng.normal(size=(16, 8)) + rng.normal(size=(120, 8))
    tX = torch.tensor(X, dtype=dtype, requires_grad=dtype != torch.bfloat16)
    tY = torch.tensor(Y, dtype=dtype)
    # the oracle sees the values the tensor holds
    Xv, Yv = tX.detach().double().numpy(), tY.double().numpy()
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for deb, oracle in ((False, _cka_oracle), (True, _cka_u_oracle)):
        assert linear_cka(tX, tY, debiased=deb) == pytest.approx(oracle(Xv, Yv), abs=tol)
        assert linear_cka(tX, Yv, debiased=deb) == pytest.approx(oracle(Xv, Yv), abs=tol)
    res = relative_mse(tX[:, :8], tY)
    ref = ((Xv[:, :8] - Yv) ** 2).sum() / ((Yv - Yv.mean(0)) ** 2).sum()
    assert res.raw == pytest.approx(ref, rel=1e-5)
