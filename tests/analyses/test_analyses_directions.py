"""Direction clustering on planted directions, weight projections and patch bases against closed forms."""

from __future__ import annotations

import json

import numpy as np
import pytest

from probekit.analyses import (
    DirectionClusters,
    direction_series,
    patch_bases,
    projection_series,
    weight_projections,
)
from probekit.errors import DataError


def _planted(k, n_units, fan_in=20, noise_deg=2.0, seed=0, antipodal=False):
    rng = np.random.default_rng(seed)
    D = np.linalg.qr(rng.normal(size=(fan_in, k)))[0].T  # k orthonormal directions
    if antipodal:
        D = np.vstack([D[: k // 2], -D[: k // 2]])
    lab = rng.integers(0, D.shape[0], n_units)
    noise = rng.normal(size=(n_units, fan_in))
    noise -= (noise * D[lab]).sum(axis=1, keepdims=True) * D[lab]
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    ang = np.radians(noise_deg) * rng.uniform(0, 1, (n_units, 1))
    W = (np.cos(ang) * D[lab] + np.sin(ang) * noise) * rng.uniform(0.5, 2.0, (n_units, 1))
    return W, D, lab


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("n_units", [64, 4096])
def test_recovers_planted_directions_independent_of_width(k, n_units):
    W, D, _ = _planted(k, n_units, seed=k)
    dc = DirectionClusters(tol=10.0, mass=0.99).fit(W)
    assert dc.n_directions_ == k
    cos = dc.alignment(D)  # (clusters, references)
    assert np.all(cos[:k].max(axis=1) > 0.99)
    assert sorted(np.argmax(cos[:k], axis=1)) == list(range(k))
    assert np.all(dc.spread_[:k] < 2.0)
    json.dumps(dc.to_dict())


def test_antipodal_directions_are_distinct_and_small_units_dont_count():
    W, D, _ = _planted(4, 500, antipodal=True, seed=3)
    rng = np.random.default_rng(0)
    tiny = rng.normal(size=(200, W.shape[1])) * 1e-3  # many small random units: negligible mass
    dc = DirectionClusters(tol=10.0, mass=0.9).fit(np.vstack([W, tiny]))
    assert dc.n_directions_ == 4
    assert dc.n_clusters_ > 4  # the random units form their own (tiny) clusters
    cos = dc.alignment(D)
    assert np.all(cos[:4].max(axis=1) > 0.99)


def test_mass_share_counts_squared_norm():
    # two directions, one carrying 95% of the squared norm
    W = np.array([[1.0, 0.0]] * 19 + [[0.0, 1.0]])
    dc = DirectionClusters(mass=0.9).fit(W)
    assert dc.n_directions_ == 1 and dc.shares_[0] == pytest.approx(0.95)
    assert DirectionClusters(mass=0.99).fit(W).n_directions_ == 2


def test_series_one_result_per_step():
    W0 = np.random.default_rng(0).normal(size=(64, 20))
    W1, _, _ = _planted(2, 64)
    res = direction_series({0: W0, 100: W1}, tol=10.0)
    assert res.steps == [0, 100] and res.series("n_directions")[1] == 2
    assert res.series("n_directions")[0] > 10  # random init: no shared directions


def test_weight_projections_closed_form():
    V = np.linalg.qr(np.random.default_rng(1).normal(size=(6, 6)))[0].T
    C, B = V[:2], V[2:4]
    coords = np.array([[3.0, 4.0, 0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]])
    W = coords @ V  # P = W V^T = coords
    res = weight_projections(W, C, B, W_init=0.5 * W)
    assert res.core == pytest.approx((5.0 + 0.0) / 2)
    assert res.background == pytest.approx((0.0 + 1.0) / 2)
    assert res.core_change == pytest.approx(2.5 - 1.25) and res.background_ratio == pytest.approx(2.0)
    with pytest.raises(DataError, match="orthonormal"):
        weight_projections(W, 2 * C, B)
    ser = projection_series({0: 0.5 * W, 10: W}, C, B)
    assert ser.series("core_ratio") == pytest.approx([1.0, 2.0])


def test_patch_bases_finds_planted_subspaces():
    rng = np.random.default_rng(0)
    n, H = 20, 12
    # background: constant colour (DC in R and G channels); foreground: blue square with texture
    img = np.zeros((n, 3, H, H))
    img[:, 0] = rng.uniform(0.2, 1, (n, 1, 1))
    img[:, 1] = rng.uniform(0.2, 1, (n, 1, 1))
    mask = np.zeros((n, H, H))
    mask[:, 3:9, 3:9] = 1
    img[:, :, 3:9, 3:9] = 0
    img[:, 2, 3:9, 3:9] = rng.uniform(0.5, 1.0, (n, 6, 6))
    res = patch_bases(img, mask, patch=3, n_components=2)
    # background basis spans the R-DC and G-DC directions of a 3x3 filter
    dc = np.zeros((2, 27))
    dc[0, :9] = 1 / 3
    dc[1, 9:18] = 1 / 3
    proj = res.background @ dc.T
    assert np.linalg.svd(proj, compute_uv=False).min() > 0.99
    # the core basis lives in the blue channel only
    assert np.abs(res.core[:, :18]).max() < 1e-8
    assert res.principal_cosines.max() < 1e-6  # disjoint subspaces
    np.testing.assert_allclose(res.background @ res.background.T, np.eye(2), atol=1e-10)
