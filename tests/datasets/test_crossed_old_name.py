"""The datasets' crossed split is ``crossed``; ``stress`` (its name in earlier releases) and ``n_stress``
still give the same items, each old spelling with exactly one FutureWarning.

Oracle: the split under its new name, built with the same options.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from probekit.datasets import BackgroundDigits, Counterfactuals, Shapes, get_dataset
from probekit.datasets._synthetic import StructuredDataset
from probekit.errors import DataError


def _future(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, FutureWarning)]


def _old(make):
    """``make()`` and the FutureWarnings it gave."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = make()
    return out, _future(rec)


@pytest.fixture
def cf(tmp_path):
    rng = np.random.default_rng(0)
    for c in range(3):
        for k in range(4):
            for d in ("images", "masks"):
                (tmp_path / d / f"c{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (12, 12, 3)).astype(np.uint8)).save(
                tmp_path / "images" / f"c{c}" / f"{k}.png")
            m = np.zeros((12, 12), np.uint8)
            m[3:9, 3:9] = 255
            Image.fromarray(m).save(tmp_path / "masks" / f"c{c}" / f"{k}.png")
    return Counterfactuals(tmp_path / "images", masks=tmp_path / "masks", n_backgrounds=3, fill="mean")


def test_counterfactuals_read_the_old_split_and_attribute(cf):
    new = cf.split("crossed")
    assert new.split == "crossed" and len(new) == 3 * len(cf.crossed_indices)
    old, msgs = _old(lambda: cf.split("stress"))
    assert len(msgs) == 1 and "'crossed'" in msgs[0]
    assert old.split == "crossed" and len(old) == len(new)
    for k in range(0, len(new), 5):
        a, b = new[k], old[k]
        assert {key: v for key, v in a.items() if key != "x"} == {key: v for key, v in b.items() if key != "x"}
        assert torch.equal(a["x"], b["x"])
    idx, msgs = _old(lambda: cf.stress_indices)
    assert len(msgs) == 1 and "crossed_indices" in msgs[0]
    assert np.array_equal(idx, cf.crossed_indices)
    with pytest.raises(DataError, match="'crossed'"):  # the new name is the one the error lists
        cf.split("val")


def test_builtin_datasets_read_the_old_split_name():
    new = BackgroundDigits("crossed", seed=2, n_backgrounds=3).arrays(range(7))
    ds, msgs = _old(lambda: BackgroundDigits("stress", seed=2, n_backgrounds=3))
    assert len(msgs) == 1 and ds.split == "crossed"
    old = ds.arrays(range(7))
    assert set(old) == set(new) and all(np.array_equal(old[k], new[k]) for k in new)
    ds, msgs = _old(lambda: BackgroundDigits("crossed", seed=2, n_stress=3))
    assert len(msgs) == 1 and "n_backgrounds" in msgs[0] and ds.n_backgrounds == 3 and len(ds) == 600 * 3
    ds, msgs = _old(lambda: get_dataset("bgdigits", "stress", seed=2, n_backgrounds=3))
    assert len(msgs) == 1 and ds.split == "crossed"
    assert np.array_equal(ds.arrays(range(7))["x"], new["x"])

    s_new = Shapes("crossed", n_test=6)
    s_old, msgs = _old(lambda: Shapes("stress", n_test=6))
    assert len(msgs) == 1 and len(s_old) == len(s_new) == 6 * 9
    for k in (0, 10, 53):
        a, b = s_new.item(k), s_old.item(k)
        assert a.keys() == b.keys() and all(np.array_equal(a[key], b[key]) for key in a)

    t_new = StructuredDataset("crossed", n=20, n_backgrounds=3)
    t_old, msgs = _old(lambda: StructuredDataset("stress", n=20, n_stress=3))
    assert len(msgs) == 2  # one per old spelling: the split and n_stress
    assert np.array_equal(t_old.X, t_new.X) and np.array_equal(t_old.group, t_new.group)
