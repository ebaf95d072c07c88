"""Coverage of normalized_mean_shift's interval for a known true NMS, by simulation.

Gaussian rows (n = 400 per family, 20 correlated units) with a planted mean shift delta: the true
NMS is |delta|^2 / tr(C) for the unit covariance C. The plug-in value is biased upward by
tr(Cov(mean_b - mean_a)) / tr(C) (about 2/n unpaired, less for well-matched pairs), which is
0.005 here: twice the smallest truth tested. Percentile intervals of the plug-in covered a true
0.0025 in 0/40 simulations; the interval must now cover it in at least 90% of them (nominal 95%).
"""

from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from probekit.analyses import normalized_mean_shift

N, D, SIMS = 400, 20, 200
RHO = 0.7  # paired rows: b = RHO a + sqrt(1 - RHO^2) z + delta (same unit covariance)


def _cov(rng):
    L = rng.normal(size=(D, D)) / np.sqrt(D) + 0.5 * np.eye(D)
    return L @ L.T  # correlated units of unequal variance


def _simulate(theta, paired, seed):
    rng = np.random.default_rng(seed)
    C = _cov(rng)
    L = np.linalg.cholesky(C)
    u = rng.normal(size=D)
    delta = u / np.linalg.norm(u) * np.sqrt(theta * np.trace(C))  # |delta|^2 / tr(C) = theta
    covered, contains0, debiased, plugin = [], [], [], []
    with threadpool_limits(1):  # tiny products: BLAS threads only contend on a shared machine
        for s in range(SIMS):
            A = rng.normal(size=(N, D)) @ L.T
            Z = rng.normal(size=(N, D)) @ L.T
            B = (RHO * A + np.sqrt(1 - RHO**2) * Z if paired else Z) + delta
            r = normalized_mean_shift(A, B, paired=paired, n_boot=200, random_state=s)
            covered.append(r.ci[0] <= theta <= r.ci[1])
            contains0.append(r.ci[0] <= 0.0 <= r.ci[1])
            debiased.append(r.nms_debiased)
            plugin.append(r.nms)
    # the noise term the plug-in carries: tr(Cov(mean_b - mean_a)) / tr(C)
    noise = 2 * (1 - RHO) / N if paired else 2 / N
    return np.mean(covered), np.mean(contains0), np.array(debiased), np.array(plugin), noise


@pytest.mark.slow
@pytest.mark.parametrize("paired", [False, True])
@pytest.mark.parametrize("theta", [0.0, 0.0025, 0.05])
def test_interval_covers_the_true_nms(theta, paired):
    cover, contains0, debiased, plugin, noise = _simulate(theta, paired, seed=7)
    # binomial sd of a coverage of 0.95 over 200 simulations: 0.015; 0.90 is 3.3 sd below
    assert cover >= 0.90, f"coverage {cover:.3f} at true NMS {theta} (paired={paired})"
    assert cover <= 0.995  # not covering by being uninformatively wide
    # the estimates the interval is built on: the plug-in is biased by the noise term, the debiased
    # one is not (sd of the mean of 200 estimates is below 0.15 * noise in every case here)
    assert np.mean(plugin) - theta == pytest.approx(noise, rel=0.25)
    assert np.mean(debiased) == pytest.approx(theta, abs=0.25 * noise)
    if theta == 0.0:
        assert contains0 >= 0.90
    if theta == 0.05:  # far above the noise term: no shift is excluded in (almost) every data set
        assert contains0 <= 0.02
