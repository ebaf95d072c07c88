"""Format version 2: the crossed-design sample fields and circular factor periods round-trip."""

import h5py
import numpy as np
import pytest
import torch

import probekit as pk
from probekit.errors import DataError
from probekit.store import open_store
from probekit.vocab import VARIANTS


class Crossed(torch.utils.data.Dataset):
    factor_names = ("hue", "bright")
    factor_periods = (1.0, 0.0)

    def __len__(self):
        return 12

    def __getitem__(self, i):
        g, b = divmod(i, 4)
        return {"x": torch.full((3,), float(i)), "label": g % 2, "group": g, "background": b,
                "background_label": (b + 1) % 2, "variant": "mixed_rand" if b else "original",
                "factors": [b / 4, 0.5]}


def test_crossed_fields_round_trip(tmp_path):
    out = tmp_path / "s.h5"
    pk.extract(torch.nn.Sequential(torch.nn.Identity()), Crossed(), layers=["0"], out=out, split="crossed", progress=False)
    with open_store(out) as s:
        assert s.attrs["format_version"] == 2
        i = np.arange(12)
        np.testing.assert_array_equal(s.sample_field("crossed", "group"), i // 4)
        np.testing.assert_array_equal(s.sample_field("crossed", "background"), i % 4)
        np.testing.assert_array_equal(s.sample_field("crossed", "background_label"), (i % 4 + 1) % 2)
        expect = np.where(i % 4 == 0, "original", "mixed_rand")
        np.testing.assert_array_equal(s.variants("crossed"), expect)
        np.testing.assert_array_equal(s.sample_field("crossed", "variant"),
                                      [VARIANTS.index(v) for v in expect])
        assert s.factor_periods("crossed") == [1.0, 0.0]
    with h5py.File(out) as f:
        assert list(f["samples/crossed/variant"].attrs["names"]) == list(VARIANTS)


def test_unknown_variant_is_refused(tmp_path):
    class Bad(Crossed):
        def __getitem__(self, i):
            return {**super().__getitem__(i), "variant": "mixed_sideways"}

    with pytest.raises(DataError, match="variant 'mixed_sideways'; variants are"):
        pk.extract(torch.nn.Sequential(torch.nn.Identity()), Bad(), layers=["0"], out=tmp_path / "s.h5", progress=False)


def test_version_1_store_has_no_periods(tmp_path):
    """A version-1 store (no periods attribute) reads every factor as linear."""
    out = tmp_path / "s.h5"
    pk.extract(torch.nn.Sequential(torch.nn.Identity()), Crossed(), layers=["0"], out=out, split="crossed", progress=False)
    with h5py.File(out, "r+") as f:
        f.attrs["format_version"] = 1
        del f["samples/crossed/factors"].attrs["periods"]
    with open_store(out) as s:
        assert s.factor_periods("crossed") == [0.0, 0.0]
