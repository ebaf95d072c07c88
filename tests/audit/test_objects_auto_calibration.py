"""The error rates of ``probekit audit --objects auto`` (issue 22), on planted predictions.

A small seeded version of benchmarks/calibrate_objects_auto.py (the generator of
benchmarks/calibrate_reliance.py: objects and backgrounds drawn from their populations, a share of the
objects following the background's class). Planted truths: a model without reliance is not flagged
and uses the whole cap (its interval rarely lies below the margin early); a strong shortcut is
flagged from the first look, on half of the objects (no look before 50); at the cap the sequential verdict is the
fixed-N rule's.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("calibrate_objects_auto",
                                                  ROOT / "benchmarks" / "calibrate_objects_auto.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ca = _load()


def _runs(rho, sims, seed, G=100):
    p = {**ca.cr.DEFAULTS, "G": G, "rho": rho}
    rng = np.random.default_rng(seed)
    return [ca.sequential(*ca.cr.simulate(rng, p), G, seed=i, n_boot=200) for i in range(sims)]


def test_no_reliance_is_not_flagged_and_stopping_early_is_rare():
    runs = _runs(0.0, 40, seed=7)
    assert sum(bool(r["auto"]) for r in runs) <= 1  # measured 0 of 200 at this design
    assert np.mean([r["objects"] for r in runs]) >= 90
    for r in runs:  # at the cap, auto's verdict is the fixed rule's
        if r["objects"] == 100:
            assert r["auto"] == r["fixed"]


def test_a_strong_shortcut_is_flagged_at_the_first_look():
    runs = _runs(0.3, 20, seed=8)
    assert all(r["auto"] for r in runs) and all(r["fixed"] for r in runs)
    assert np.mean([r["look"] == 0 for r in runs]) >= 0.8
    assert np.mean([r["objects"] for r in runs]) <= 55  # the first look, at 50 of 100 objects
