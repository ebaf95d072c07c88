"""DirectionClusters: the count's stability over the tolerance, on planted directions and isotropic weights."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from probekit.analyses import DirectionClusters, direction_series
from probekit.errors import DataError

TOLS = [5.0, 10.0, 15.0, 20.0, 30.0]


def _planted(k, n_units, fan_in=20, noise_deg=2.0, seed=0):
    """k orthonormal directions, each unit within noise_deg of its own (uniform angle), random norms."""
    rng = np.random.default_rng(seed)
    D = np.linalg.qr(rng.normal(size=(fan_in, k)))[0].T
    lab = rng.integers(0, k, n_units)
    noise = rng.normal(size=(n_units, fan_in))
    noise -= (noise * D[lab]).sum(axis=1, keepdims=True) * D[lab]
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    ang = np.radians(noise_deg) * rng.uniform(0, 1, (n_units, 1))
    return (np.cos(ang) * D[lab] + np.sin(ang) * noise) * rng.uniform(0.5, 2.0, (n_units, 1))


@pytest.mark.parametrize("k, noise_deg", [(2, 1.0), (4, 2.0), (6, 2.0)])
def test_planted_count_is_k_at_every_tolerance(k, noise_deg):
    W = _planted(k, 600, noise_deg=noise_deg, seed=k)
    dc = DirectionClusters(tol=10.0, mass=0.99).fit(W)
    assert dc.n_directions_ == k
    assert dc.stability_ == {t: k for t in TOLS}
    assert dc.stable_ and dc.result_.note is None
    r = dc.to_dict()
    assert r["stability_tol_degrees"] == TOLS and r["stability_n_directions"] == [k] * 5 and r["stable"] is True
    json.dumps(r)


def test_isotropic_weights_show_the_swing():
    # 512 isotropic unit directions on the 2-sphere: no clusters, so the count is set by tol; the
    # number of caps of angular radius t covering the sphere grows like 2 / (1 - cos t).
    W = np.random.default_rng(0).normal(size=(512, 3))
    dc = DirectionClusters().fit(W)
    counts = [dc.stability_[t] for t in TOLS]
    assert np.all(np.diff(counts) <= 0)
    assert counts[0] > 5 * counts[-1]
    assert not dc.stable_ and not dc.result_.stable
    assert f"{counts[-1]}..{counts[0]}" in dc.result_.note
    assert dc.n_directions_ == dc.stability_[10.0]
    # the swing follows the cap count within a factor of 3 at the larger tolerances
    caps = {t: 2 / (1 - math.cos(math.radians(t))) for t in (20.0, 30.0)}
    for t in caps:
        assert caps[t] / 3 < dc.stability_[t] < 3 * caps[t] + 1


def test_stability_can_be_switched_off_and_adds_tol():
    W = _planted(3, 200)
    off = DirectionClusters(tol=12.0, stability_tols=()).fit(W)
    assert off.stability_ == {12.0: 3} and off.stable_
    on = DirectionClusters(tol=12.0).fit(W)
    assert list(on.stability_) == sorted([*TOLS, 12.0])
    np.testing.assert_array_equal(on.labels_, off.labels_)


def _leader_reference(U, mass, tol):
    """The greedy pass written sequentially: each unit, heaviest first, joins the first centre with the
    highest cosine if it is within tol, else starts a centre."""
    cos_tol = math.cos(math.radians(tol))
    lab = np.empty(len(U), dtype=int)
    C = []
    for j in np.argsort(-mass, kind="stable"):
        if C:
            c = np.array(C) @ U[j]
            k = int(np.argmax(c))
            if c[k] >= cos_tol:
                lab[j] = k
                continue
        C.append(U[j])
        lab[j] = len(C) - 1
    return lab


def test_blocked_leader_pass_matches_the_sequential_one():
    rng = np.random.default_rng(1)
    W = rng.normal(size=(900, 3)) * rng.uniform(0.2, 3.0, (900, 1))  # > 3 blocks of 256, many centres
    dc = DirectionClusters(tol=8.0, max_iter=0, stability_tols=()).fit(W)
    m = (W * W).sum(axis=1)
    ref = _leader_reference(W / np.sqrt(m)[:, None], m, 8.0)
    # same partition: labels map one to one
    pairs = set(zip(ref.tolist(), dc.labels_.tolist(), strict=True))
    assert len(pairs) == len(set(ref.tolist())) == len(set(dc.labels_.tolist()))


def test_series_passes_stability_tols():
    res = direction_series({0: _planted(2, 100), 5: _planted(3, 100)}, stability_tols=(10, 30))
    assert res.series("stability_n_directions") == [[2, 2], [3, 3]]
    assert res.series("stable") == [True, True]


@pytest.mark.parametrize("bad", [(0.0,), (10, 200), "ten", 5])
def test_bad_stability_tols(bad):
    with pytest.raises(DataError, match="stability_tols"):
        DirectionClusters(stability_tols=bad).fit(_planted(2, 50))
