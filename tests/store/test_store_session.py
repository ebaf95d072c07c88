"""One writer session, read through its own view; the resume checks in store/ (issue 21: the audit opens
the store at most 3 times).

Oracles: rows written by hand (known values) read back through the view and through a fresh reader;
opens of the file counted by wrapping ``h5py.File``; the refusals of :func:`check_resume` built by hand
from a store with other fields, pools, weights and preprocessing.
"""

import collections
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from probekit.errors import DataError
from probekit.store import FINGERPRINT_ATTR, StoreWriter, check_resume, open_store, stored_fingerprint


@pytest.fixture
def opens(monkeypatch):
    """Opens of HDF5 files by name (h5py.File given a path; wrappers of open files are not opens)."""
    counted: collections.Counter = collections.Counter()
    real = h5py.File.__init__

    def init(self, name, *a, **kw):
        if isinstance(name, (str, bytes, os.PathLike)):
            counted[Path(os.fsdecode(name)).name] += 1
        real(self, name, *a, **kw)

    monkeypatch.setattr(h5py.File, "__init__", init)
    return counted


def _write(w: StoreWriter, split: str, x: np.ndarray, start: int = 0) -> None:
    w.write_rows(split, start, {"index": np.arange(start, start + len(x)), "label": np.arange(len(x)) % 2},
                 {"m": {"layer": x}})


def _declare(w: StoreWriter, split: str, n: int, *, pool: str = "avg", sha: str = "a" * 64) -> None:
    w.add_split(split, n_rows=n, has_label=True)
    w.add_model("m", weights_sha256=sha, preprocessing='{"size": 8}')
    w.add_layer("m", split, "layer", feature_shape=(3,), attrs={"pool": pool})


def test_view_reads_what_the_session_wrote_without_opening_the_file(tmp_path, opens):
    path = tmp_path / "s.h5"
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    with StoreWriter(path, mode="create") as w:
        _declare(w, "a", 4)
        _write(w, "a", x[:2])
        v = w.view()
        assert v.n_rows("a") == 2 and v.n_rows("a", "m") == 2  # what is committed when the view is made
        np.testing.assert_array_equal(np.asarray(v.acts("m", "a", "layer")), x[:2])
        v.close()  # leaves the writer open
        _write(w, "a", x[2:], start=2)
        assert w.view().n_rows("a") == 4
        w.set_attrs({FINGERPRINT_ATTR: '{"k": "v"}'})
    assert opens["s.h5"] == 1  # the session's one handle
    with open_store(path) as s:
        np.testing.assert_array_equal(np.asarray(s.acts("m", "a", "layer")), x)
    assert opens["s.h5"] == 3  # a reader: the counters' handle (which checks the format) and the reading one
    assert stored_fingerprint(path) == ({"k": "v"}, True)


def test_check_resume_refuses_what_does_not_fit(tmp_path):
    path = tmp_path / "s.h5"
    with StoreWriter(path, mode="create") as w:
        _declare(w, "a", 4)
        _write(w, "a", np.zeros((4, 3), np.float32))
    ok = {"n_rows": 4, "fields": ["label"], "factor_names": None, "weights_sha256": {"m": "a" * 64},
          "preprocessing": {"m": '{"size": 8}'}, "pools": {"m": {"layer": "avg"}}}
    with open_store(path) as s:
        check_resume(s, "a", **ok)  # the same run: nothing to refuse
        check_resume(s, "b", **{**ok, "n_rows": 9})  # a new split fits anything
        for change, words in ((("n_rows", 5), "holds 4 samples"), (("fields", []), "other fields"),
                              (("factor_names", ["hue"]), "other fields"),
                              (("weights_sha256", {"m": "b" * 64}), "other weights"),
                              (("preprocessing", {"m": '{"size": 9}'}), "other preprocessing"),
                              (("pools", {"m": {"layer": "max"}}), "pool 'avg'")):
            with pytest.raises(DataError, match=words):
                check_resume(s, "a", **{**ok, change[0]: change[1]})


def test_extract_models_writes_every_split_through_one_session(tmp_path, opens):
    import torch

    from probekit.extractors import ModelSpec, extract_models

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)).eval()
    x = torch.randn(10, 4)
    items = [{"x": x[i], "index": i, "label": i % 2} for i in range(10)]
    path = tmp_path / "s.h5"
    with StoreWriter(path, mode="create") as w:
        for split in ("a", "b"):
            extract_models({"m": ModelSpec(net, ["0", "@output"])}, items, out=w, split=split, progress=False,
                           batch_size=4)
    assert opens["s.h5"] == 1
    with open_store(path) as s, torch.no_grad():
        for split in ("a", "b"):  # the oracle: the net run by hand
            np.testing.assert_allclose(np.asarray(s.acts("m", split, "@output")), net(x).numpy(), rtol=1e-6)
            np.testing.assert_allclose(np.asarray(s.acts("m", split, "0")), net[0](x).numpy(), rtol=1e-6)
