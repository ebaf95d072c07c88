"""Rows of 1 MiB or more (full feature maps): one-row chunks, written as raw chunks when the bytes match.

The oracle is the numpy array handed to the writer: what h5py reads back (and probekit's reader) must
equal it byte for byte, whichever write path the writer took.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest

import probekit as pk

# 64 x 64 x 64 float32 = 1 MiB per row: the writer gives these one-row chunks
SHAPE = (64, 64, 64)


def _write(path, acts, *, batch=3, n_rows="known", compression=None, mode="create", start=0, stop=None):
    n = len(acts)
    stop = n if stop is None else stop
    with pk.StoreWriter(path, mode=mode, compression=compression) as w:
        w.add_split("s", n_rows=n if n_rows == "known" else None, has_label=False)
        w.add_model("m")
        got = w.add_layer("m", "s", "conv", feature_shape=acts.shape[1:], dtype=str(acts.dtype))
        assert got == start
        for s in range(start, stop, batch):
            e = min(stop, s + batch)
            w.write_rows("s", s, {"index": np.arange(s, e)}, {"m": {"conv": acts[s:e]}})


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("n_rows", ["known", "unknown"])
def test_large_rows_round_trip(tmp_path, dtype, n_rows):
    acts = np.random.default_rng(0).normal(size=(7, *SHAPE)).astype(dtype)
    if dtype == "float16":  # 2 x 1 MiB rows so that float16 rows are 1 MiB as well
        acts = np.concatenate([acts, acts[:, ::-1]], axis=1)
    p = tmp_path / "big.h5"
    _write(p, acts, n_rows=n_rows)
    with h5py.File(p, "r") as f:
        ds = f["models/m/acts/s/conv"]
        assert ds.chunks == (1, *acts.shape[1:])
        assert ds.shape == acts.shape
        np.testing.assert_array_equal(ds[...], acts)
    with pk.open_store(p) as store:
        np.testing.assert_array_equal(np.asarray(store.acts("m", "s", "conv")), acts)
        np.testing.assert_array_equal(store.sample_field("s", "index"), np.arange(len(acts)))


def test_large_rows_compressed_and_converted(tmp_path):
    """A filtered dataset, or rows of another dtype, take the ordinary write: same values back."""
    acts = np.random.default_rng(1).normal(size=(4, *SHAPE))  # float64 into a float32 dataset
    p = tmp_path / "gz.h5"
    with pk.StoreWriter(p, compression="gzip") as w:
        w.add_split("s", n_rows=4, has_label=False)
        w.add_model("m")
        w.add_layer("m", "s", "conv", feature_shape=SHAPE, dtype="float32")
        for s in (0, 2):
            w.write_rows("s", s, {"index": np.arange(s, s + 2)}, {"m": {"conv": acts[s:s + 2]}})
    with h5py.File(p, "r") as f:
        ds = f["models/m/acts/s/conv"]
        assert ds.compression == "gzip"
        np.testing.assert_array_equal(ds[...], acts.astype(np.float32))


def test_large_rows_resume_overwrites_uncommitted_chunks(tmp_path):
    """A batch written but never committed (an interrupted run) is rewritten by the resumed run."""
    acts = np.random.default_rng(2).normal(size=(6, *SHAPE)).astype(np.float32)
    p = tmp_path / "resume.h5"
    _write(p, acts, batch=2, stop=4)
    # an interrupted third batch: its chunks are in the file, the counters never moved
    with h5py.File(p, "r+") as f:
        ds = f["models/m/acts/s/conv"]
        ds[4:6] = np.full((2, *SHAPE), 7.0, dtype=np.float32)
    with pk.open_store(p) as store:
        assert store.n_rows("s", model="m") == 4
    _write(p, acts, batch=2, mode="resume", start=4)
    with h5py.File(p, "r") as f:
        np.testing.assert_array_equal(f["models/m/acts/s/conv"][...], acts)
