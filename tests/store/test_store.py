"""The store: round trips, committed-row bounds, version dispatch, hand-written files."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import probekit as pk
from probekit.errors import DataError, LayerNotFoundError, StoreExistsError, StoreFormatError
from probekit.store import escape_name, unescape_name


def _write(path, n=10, batch=4, layers=("a", "b.c"), seed=0, mode="create"):
    rng = np.random.default_rng(seed)
    acts = {layer: rng.normal(size=(n, 3 + i)).astype(np.float32) for i, layer in enumerate(layers)}
    labels = rng.integers(0, 3, n)
    factors = rng.uniform(size=(n, 2)).astype(np.float32)
    with pk.StoreWriter(path, mode=mode) as w:
        w.add_split("train", n_rows=n, has_label=True, factor_names=["hue", "bright"])
        w.add_model("m", role="teacher", source="unit-test", weights_sha256="ab" * 32, param_count=7)
        for layer in layers:
            w.add_layer("m", "train", layer, feature_shape=acts[layer].shape[1:], attrs={"pool": "avg"})
        for s in range(0, n, batch):
            e = min(n, s + batch)
            w.write_rows("train", s, {"index": np.arange(s, e), "label": labels[s:e], "factors": factors[s:e]},
                         {"m": {layer: acts[layer][s:e] for layer in layers}})
    return acts, labels, factors


def test_round_trip(tmp_path):
    path = tmp_path / "s.h5"
    acts, labels, factors = _write(path)
    with pk.open_store(path) as s:
        assert s.splits == ["train"] and s.models == ["m"]
        assert s.n_rows("train") == 10 and s.n_rows("train", "m") == 10
        assert s.layers("m") == ["a", "b.c"]
        np.testing.assert_array_equal(s.acts("m", "train", "b.c")[:], acts["b.c"])
        np.testing.assert_array_equal(np.asarray(s.acts("m", "train", "a")), acts["a"])
        np.testing.assert_array_equal(s.sample_field("train", "label"), labels)
        np.testing.assert_array_equal(s.sample_field("train", "factors"), factors)
        np.testing.assert_array_equal(s.sample_field("train", "index"), np.arange(10))
        assert s.factor_names("train") == ["hue", "bright"]
        assert s.role("m") == "teacher" and s.model_attrs("m")["param_count"] == 7
        assert s.acts("m", "train", "a").attrs["pool"] == "avg"
        assert s.attrs["format"] == "probekit.activations" and s.attrs["format_version"] == 2


@pytest.mark.parametrize("rows", [1, 3, 7, 10, 100])
def test_iter_chunks_cover_rows_in_order(tmp_path, rows):
    acts, *_ = _write(tmp_path / "s.h5")
    with pk.open_store(tmp_path / "s.h5") as s:
        a = s.acts("m", "train", "a")
        parts = list(a.iter_chunks(rows))
        assert [p[0] for p in parts] == list(range(0, 10, rows))
        np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), acts["a"])


def test_fancy_indexing_matches_numpy(tmp_path):
    acts, *_ = _write(tmp_path / "s.h5")
    idx = np.array([7, 2, 2, 9, 0])
    with pk.open_store(tmp_path / "s.h5") as s:
        a = s.acts("m", "train", "a")
        np.testing.assert_array_equal(a[idx], acts["a"][idx])
        np.testing.assert_array_equal(a[-1], acts["a"][-1])
        np.testing.assert_array_equal(a[2:9:3], acts["a"][2:9:3])
        mask = np.arange(10) % 3 == 0
        np.testing.assert_array_equal(a[mask], acts["a"][mask])
        with pytest.raises(IndexError):
            a[10]


def test_reader_never_sees_uncommitted_rows(tmp_path):
    path = tmp_path / "s.h5"
    _write(path, n=10)
    # simulate a writer that wrote rows 8..10 but died before moving the counters
    with h5py.File(path, "r+") as f:
        f["samples/train"].attrs["rows_committed"] = 8
        f["models/m/acts/train"].attrs["rows_committed"] = 4
    with pk.open_store(path) as s:
        assert s.n_rows("train") == 8
        assert s.n_rows("train", "m") == 4
        assert s.acts("m", "train", "a").shape == (4, 3)
        assert len(s.sample_field("train", "label")) == 8
        assert len(list(s.acts("m", "train", "a").iter_chunks(3))) == 2


def test_resume_writer_reports_committed_and_rejects_out_of_order(tmp_path):
    path = tmp_path / "s.h5"
    _write(path, n=10)
    with h5py.File(path, "r+") as f:
        f["samples/train"].attrs["rows_committed"] = 8
        f["models/m/acts/train"].attrs["rows_committed"] = 8
    with pk.StoreWriter(path, mode="resume") as w:
        assert w.add_split("train", n_rows=10, has_label=True, factor_names=["hue", "bright"]) == 8
        w.add_model("m", role="teacher", weights_sha256="ab" * 32)
        assert w.add_layer("m", "train", "a", feature_shape=(3,)) == 8
        with pytest.raises(pk.ProbekitError, match="rows must be written in order"):
            w.write_rows("train", 9, {"index": [9], "label": [0], "factors": [[0, 0]]}, {})


def test_second_model_on_same_samples_checks_the_index(tmp_path):
    path = tmp_path / "s.h5"
    _write(path, n=10)
    with pk.StoreWriter(path, mode="resume") as w:
        w.add_split("train", n_rows=10, has_label=True, factor_names=["hue", "bright"])
        w.add_model("student", role="student")
        w.add_layer("student", "train", "x", feature_shape=(2,))
        w.write_rows("train", 0, {"index": np.arange(4)}, {"student": {"x": np.ones((4, 2), np.float32)}})
        with pytest.raises(DataError, match="differ from those stored"):
            w.write_rows("train", 4, {"index": np.array([5, 4, 6, 7])},
                         {"student": {"x": np.ones((4, 2), np.float32)}})
    with pk.open_store(path) as s:
        assert s.n_rows("train", "student") == 4 and s.n_rows("train", "m") == 10


def test_existing_output_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "s.h5"
    _write(path)
    before = path.read_bytes()
    with pytest.raises(StoreExistsError, match=r"--resume .* --overwrite"):
        pk.StoreWriter(path)
    assert path.read_bytes() == before


def test_other_weights_under_the_same_name_are_refused(tmp_path):
    path = tmp_path / "s.h5"
    _write(path)
    with pk.StoreWriter(path, mode="resume") as w, pytest.raises(DataError, match="other weights"):
        w.add_model("m", weights_sha256="cd" * 32)


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        pk.StoreWriter(tmp_path / "nope" / "s.h5")


def test_newer_format_version_is_refused(tmp_path):
    path = tmp_path / "s.h5"
    _write(path)
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = 3
    with pytest.raises(StoreFormatError, match=r"newer probekit .* Upgrade probekit"):
        pk.open_store(path)
    with pytest.raises(StoreFormatError, match="newer probekit"):
        pk.StoreWriter(path, mode="resume")


@pytest.mark.parametrize("content", [b"", b"not hdf5 at all", b"\x89HDF\r\n\x1a\n" + b"\0" * 20])
def test_non_hdf5_or_truncated_file_is_refused(tmp_path, content):
    path = tmp_path / "bad.h5"
    path.write_bytes(content)
    with pytest.raises(StoreFormatError, match="not a readable HDF5 file"):
        pk.open_store(path)


def test_foreign_hdf5_file_is_refused(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(StoreFormatError, match="not a probekit store"):
        pk.open_store(path)


def test_truncated_store_is_refused(tmp_path):
    path = tmp_path / "s.h5"
    _write(path, n=200)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreFormatError):
        with pk.open_store(path) as s:
            s.acts("m", "train", "a")[:]


def test_missing_split_model_layer_are_named(tmp_path):
    _write(tmp_path / "s.h5")
    with pk.open_store(tmp_path / "s.h5") as s:
        with pytest.raises(DataError, match="no split 'test_ood'; it has \\['train'\\]"):
            s.n_rows("test_ood")
        with pytest.raises(DataError, match="no model 'student'"):
            s.layers("student")
        with pytest.raises(LayerNotFoundError, match=r"no layer 'layer9'.*'a', 'b.c'"):
            s.acts("m", "train", "layer9")


def test_hand_written_store_is_readable(tmp_path):
    """A store written with plain h5py, following docs/FORMAT.md's MUST rules only."""
    path = tmp_path / "hand.h5"
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "probekit.activations"
        f.attrs["format_version"] = 1
        g = f.create_group("samples/test_id")
        g.attrs["rows_committed"] = 6
        g["index"] = np.arange(6)
        g["label"] = np.array([0, 1, 0, 1, 0, 1])
        g["factors"] = np.zeros((6, 1), np.float32)
        g["factors"].attrs["names"] = ["hue"]
        m = f.create_group("models/net")
        m.attrs["role"] = "model"
        a = m.create_group("acts/test_id")
        a.attrs["rows_committed"] = 6
        a["fc"] = x
    with pk.open_store(path) as s:
        np.testing.assert_array_equal(s.acts("net", "test_id", "fc")[:], x)
        assert s.factor_names("test_id") == ["hue"]
        assert s.n_expected("test_id") is None


def test_weights_and_steps(tmp_path):
    path = tmp_path / "s.h5"
    _write(path)
    w0 = np.random.default_rng(1).normal(size=(5, 4))
    with pk.StoreWriter(path, mode="resume") as w:
        w.write_weights("m", "fc/1", w0, attrs={"module_type": "Linear"})
        w.write_weights("m", "fc/1", w0 * 2, step=100)
        w.write_weights("m", "fc/1", w0 * 3, step=20)
    with pk.open_store(path) as s:
        np.testing.assert_allclose(s.weights("m", "fc/1"), w0, rtol=1e-6)
        assert s.steps("m") == [20, 100]
        np.testing.assert_allclose(s.weights("m", "fc/1", step=20), 3 * w0, rtol=1e-6)
        assert s.weight_attrs("m", "fc/1")["module_type"] == "Linear"


@given(st.text(min_size=1, max_size=20))
def test_name_escaping_round_trips(name):
    assert unescape_name(escape_name(name)) == name
    assert "/" not in escape_name(name)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 40),
    batch=st.integers(1, 17),
    width=st.integers(1, 6),
    dtype=st.sampled_from(["float16", "float32"]),
)
def test_round_trip_property(tmp_path_factory, n, batch, width, dtype):
    path = tmp_path_factory.mktemp("p") / "s.h5"
    rng = np.random.default_rng(n * 100 + batch)
    x = rng.normal(size=(n, width)).astype(dtype)
    with pk.StoreWriter(path) as w:
        w.add_split("s", n_rows=None, has_label=False)
        w.add_model("m")
        w.add_layer("m", "s", "l", feature_shape=(width,), dtype=dtype)
        for s in range(0, n, batch):
            w.write_rows("s", s, {"index": np.arange(s, min(n, s + batch))}, {"m": {"l": x[s : s + batch]}})
    with pk.open_store(path) as s:
        got = s.acts("m", "s", "l")
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got[:], x)
        np.testing.assert_array_equal(np.concatenate([c for _, c in got.iter_chunks(max(1, batch - 1))]), x)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_write_rows_converts_and_places_rows_like_numpy(tmp_path, dtype):
    # write_rows writes numeric rows through HDF5's low-level hyperslab write; the stored values must
    # be numpy's conversion of the input, in the right rows, whatever the input's dtype and layout
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(5, 3, 10)) * 1e3  # float64, values beyond float16's precision
    path = tmp_path / "conv.h5"
    with pk.StoreWriter(path) as w:
        w.add_split("s", n_rows=10, has_label=True, factor_names=["f"])
        w.add_model("m")
        w.add_layer("m", "s", "map", feature_shape=(5, 3), dtype=dtype)
        for start, stop in ((0, 4), (4, 4), (4, 9), (9, 10)):  # an empty batch too
            rows = feats[..., start:stop].transpose(2, 0, 1)  # non-contiguous float64 view
            w.write_rows("s", start, {"index": np.arange(start, stop), "label": np.arange(start, stop) % 3,
                                      "factors": np.arange(start, stop, dtype=float)[:, None]},
                         {"m": {"map": rows}})
    with pk.open_store(path) as s:
        np.testing.assert_array_equal(s.acts("m", "s", "map")[:], feats.transpose(2, 0, 1).astype(dtype))
        np.testing.assert_array_equal(s.sample_field("s", "label"), np.arange(10) % 3)
        np.testing.assert_array_equal(s.sample_field("s", "factors")[:, 0], np.arange(10.0))
