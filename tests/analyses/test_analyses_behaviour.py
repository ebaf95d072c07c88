"""Behaviour under background swaps, against planted predictions whose truth is known."""

import numpy as np
import pytest

from probekit.analyses import background_behaviour, variant_behaviour
from probekit.errors import DataError

G, B, K = 300, 8, 10


def _design(seed=0):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(G), B)
    b = np.tile(np.arange(B), G)
    y = rng.integers(0, K, G)[g]
    cb = rng.integers(0, K, B)  # the class each background came from
    return rng, g, b, y, cb


def test_a_model_that_ignores_the_background_never_flips():
    _, g, b, y, cb = _design()
    r = background_behaviour(y, g, b, label=y, background_label=cb[b], n_boot=50, n_perm=50)
    assert r.flip_rate == 0 and r.flip_rate_ci == (0.0, 0.0)
    assert r.pull == 0 and not r.flagged and r.accuracy == 1.0
    assert r.follows_background == 0.0


def test_a_shortcut_follows_every_background():
    _, g, b, y, cb = _design()
    pred = cb[b]
    r = background_behaviour(pred, g, b, label=y, background_label=cb[b], n_boot=50, n_perm=50)
    assert r.flagged and r.flip_rate == 1.0 and r.follows_background == 1.0
    # hand-computed: each background's histogram is one class; pooled = the backgrounds' class shares
    share = np.bincount(cb, minlength=K) / B
    truth = np.mean([1 - share[c] for c in cb])
    assert r.pull_raw == pytest.approx(truth)
    assert r.pull == pytest.approx(truth - r.pull_null)


def test_idiosyncratic_flips_are_not_background_reliance():
    """A robust model unsure of 20 % of the foregrounds flips on them, each its own way: not flagged."""
    rng, g, b, y, cb = _design(1)
    pred = y.copy()
    unsure = (rng.random(G) < 0.2)[g] & (rng.random(G * B) < 0.5)
    pred[unsure] = rng.integers(0, K, unsure.sum())
    r = background_behaviour(pred, g, b, label=y, background_label=cb[b], n_boot=200, n_perm=100)
    assert 0.1 < r.flip_rate < 0.25
    assert not r.flagged and r.pull_ci[0] < 0.01 and r.pull_p_value > 0.01


def test_a_planted_pull_is_found_at_its_strength():
    rng, g, b, y, cb = _design(2)
    pred = y.copy()
    follow = rng.random(G * B) < 0.3
    pred[follow] = cb[b][follow]
    r = background_behaviour(pred, g, b, label=y, background_label=cb[b], n_boot=200, n_perm=100)
    assert r.flagged
    # population pull: 0.3 x (1 - pooled share of the background's class) averaged over backgrounds
    share = np.bincount(cb, minlength=K) / B
    truth = 0.3 * np.mean([1 - share[c] for c in cb])  # the label histogram cancels (same on every b)
    assert abs(r.pull - truth) < 0.05
    assert r.follows_background == pytest.approx(np.mean(pred[cb[b] != y] == cb[b][cb[b] != y]))


def test_needs_a_crossed_design():
    with pytest.raises(DataError, match="at least 2 foregrounds and 2 backgrounds"):
        background_behaviour([0, 1, 0], [0, 0, 0], [0, 1, 2])


def test_variant_accuracy_and_gap_by_hand():
    # two foregrounds, four variants each; hand-made predictions
    label = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    variant = np.array(["original", "only_bg", "mixed_same", "mixed_rand"] * 2)
    group = np.repeat([0, 1], 4)
    pred = np.array([0, 1, 0, 1, 1, 1, 1, 0])
    r = variant_behaviour(pred, label, variant, group, n_boot=100)
    assert r.accuracy["original"]["value"] == 1.0
    assert r.accuracy["only_bg"]["value"] == 0.5
    assert r.accuracy["mixed_rand"]["value"] == 0.0
    assert r.bg_gap["value"] == 1.0
    assert r.only_bg_accuracy["value"] == 0.5 and r.chance == 0.5
    lo, hi = r.accuracy["original"]["ci"]
    assert lo == hi == 1.0
