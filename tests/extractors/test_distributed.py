"""Distributed extraction: shards per rank merged into one store equal to a single-process extraction.

The oracle is ``probekit.extract`` run in one process on the same data and weights: the merged store
must hold the same datasets with the same attributes and the same values, row for row. The
multi-process tests launch real processes with a gloo process group (``init_method=file://`` in
tmp_path, no network), as ``torchrun`` would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

import probekit
from probekit.datasets import NpzDataset
from probekit.errors import DataError, ProbekitError, StoreExistsError
from probekit.extractors import ModelSpec, extract_distributed, shard_bounds, shard_path
from probekit.store import merge_shards

N = 37  # odd, not a multiple of the batch size nor of 2 or 3 ranks
LAYERS = ["0", "2", "4"]
# attributes that legitimately differ between two runs / a merged file and a direct one
VOLATILE_ATTRS = {"created", "merged_from_shards"}


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 8 * 8, 5),
    ).eval()


@pytest.fixture
def setup(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "data.npz"
    np.savez(data, x=rng.normal(size=(N, 3, 8, 8)).astype(np.float32), y=rng.integers(0, 3, N),
             factors=rng.normal(size=(N, 2)).astype(np.float32), factor_names=np.array(["bg", "tex"]),
             group=np.arange(N) // 2)
    net = _net()
    weights = tmp_path / "net.pt"
    torch.save(net, weights)
    return tmp_path, data, weights


def _reference(tmp_path: Path, data: Path, splits=("train",)) -> Path:
    ref = tmp_path / "ref.h5"
    for i, split in enumerate(splits):
        probekit.extract(_net(), NpzDataset(data), layers=LAYERS, out=ref, split=split, name="m",
                         source="tiny", batch_size=4, progress=False, mode="resume" if i else "create")
    return ref


def _tree(path: Path) -> dict[str, tuple[dict, np.ndarray | None]]:
    """Every group and dataset of a file: attributes, and the committed rows of row datasets."""
    out: dict[str, tuple[dict, np.ndarray | None]] = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            attrs = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in obj.attrs.items()
                     if k not in VOLATILE_ATTRS}
            value = None
            if isinstance(obj, h5py.Dataset):
                parent = obj.parent
                n = int(parent.attrs["rows_committed"]) if "rows_committed" in parent.attrs else obj.shape[0]
                value = obj[:n]
            out[name] = (attrs, value)

        f.visititems(visit)
        out["/"] = ({k: v for k, v in f.attrs.items() if k not in VOLATILE_ATTRS}, None)
    return out


def assert_same_store(got: Path, want: Path) -> None:
    a, b = _tree(got), _tree(want)
    assert sorted(a) == sorted(b)
    for name in b:
        assert a[name][0] == b[name][0], name
        if b[name][1] is not None:
            assert a[name][1].dtype == b[name][1].dtype, name
            if "/acts/" in name:
                # float32 forwards of a sample differ in the last bits with the size of the batch it
                # shares (oneDNN picks other kernels / summation orders; measured max 1.2e-6 relative):
                # rtol 1e-5 is ~100 ulps, far below the gap between two different rows, so a
                # misplaced or duplicated row still fails
                np.testing.assert_allclose(a[name][1], b[name][1], rtol=1e-5, atol=1e-6, err_msg=name)
            else:  # sample fields and weight rows: exact
                np.testing.assert_array_equal(a[name][1], b[name][1], err_msg=name)


# -- the shard plan ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 37, 100])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 7])
def test_shard_bounds_cover_each_row_once_balanced(n, k):
    blocks = [shard_bounds(n, k, r) for r in range(k)]
    rows = [i for lo, hi in blocks for i in range(lo, hi)]
    assert rows == list(range(n))  # in order, each exactly once (no DistributedSampler padding)
    sizes = [hi - lo for lo, hi in blocks]
    assert max(sizes) - min(sizes) <= 1
    assert sorted(sizes) == sorted([n // k + (r < n % k) for r in range(k)])


def test_shard_bounds_rejects_bad_rank():
    with pytest.raises(ProbekitError, match="rank"):
        shard_bounds(10, 2, 2)


# -- shards written by independent jobs (explicit rank), merged afterwards ------------------------------------
def _spec():
    return {"m": ModelSpec(_net(), LAYERS, source="tiny")}


def _write_shards(out: Path, data: Path, k: int, split="train", mode="create") -> list[Path]:
    for r in range(k):
        extract_distributed(_spec(), NpzDataset(data), out=out, split=split, rank=r, world_size=k,
                            batch_size=4, progress=False, device="cpu", mode=mode)
    return [shard_path(out, r, k) for r in range(k) if shard_path(out, r, k).exists()]


def test_independent_shards_merge_equals_single_process(setup):
    tmp_path, data, _ = setup
    out = tmp_path / "merged.h5"
    shards = _write_shards(out, data, 4)
    assert [p.name for p in shards] == [f"merged.h5.rank{r}-of-4.h5" for r in range(4)]
    with probekit.open_store(shards[1]) as s:  # a shard is a store; its index is the dataset's position
        assert s.sample_field("train", "index").tolist() == list(range(*shard_bounds(N, 4, 1)))
    merge_shards(shards[::-1], out)  # any order: sorted by dataset index
    assert_same_store(out, _reference(tmp_path, data))


def test_more_ranks_than_rows(tmp_path):
    rng = np.random.default_rng(1)
    data = tmp_path / "d.npz"
    np.savez(data, x=rng.normal(size=(3, 3, 8, 8)).astype(np.float32))
    out = tmp_path / "m.h5"
    shards = _write_shards(out, data, 5)
    assert len(shards) == 3  # empty ranks write nothing
    merge_shards(shards, out)
    ref = tmp_path / "ref.h5"
    probekit.extract(_net(), NpzDataset(data), layers=LAYERS, out=ref, split="train", name="m",
                     source="tiny", batch_size=4, progress=False)
    assert_same_store(out, ref)


class _FailAt(torch.utils.data.Dataset):
    def __init__(self, base, at):
        self.base, self.at, self.factor_names = base, at, base.factor_names

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        if i == self.at:
            raise RuntimeError("planted failure")
        return self.base[i]


def test_merge_refuses_incomplete_shard_then_resume_completes_it(setup):
    tmp_path, data, _ = setup
    out = tmp_path / "merged.h5"
    extract_distributed(_spec(), NpzDataset(data), out=out, split="train", rank=0, world_size=2,
                        batch_size=4, progress=False, device="cpu")
    # rank 1 holds rows 18..36; it dies reading row 30 after committing 3 batches of 4
    with pytest.raises(RuntimeError, match="planted"):
        extract_distributed(_spec(), _FailAt(NpzDataset(data), 30), out=out, split="train", rank=1,
                            world_size=2, batch_size=4, progress=False, device="cpu")
    shards = [shard_path(out, r, 2) for r in range(2)]
    with pytest.raises(DataError, match=r"rank1-of-2\.h5.*incomplete.*12 of 19 rows"):
        merge_shards(shards, out)
    assert not out.exists() and not out.with_name(out.name + ".merging").exists()
    extract_distributed(_spec(), NpzDataset(data), out=out, split="train", rank=1, world_size=2,
                        batch_size=4, progress=False, device="cpu", mode="resume")
    merge_shards(shards, out)
    assert_same_store(out, _reference(tmp_path, data))


def test_merge_refuses_incomplete_model_rows(setup):
    tmp_path, data, _ = setup
    out = tmp_path / "merged.h5"
    shards = _write_shards(out, data, 2)
    with h5py.File(shards[0], "r+") as f:  # as if the run stopped between the sample and model commits
        f["models/m/acts/train"].attrs["rows_committed"] = 8
    with pytest.raises(DataError, match=r"rank0-of-2\.h5.*incomplete.*model 'm' has 8 of 18"):
        merge_shards(shards, out)


def test_merge_refuses_overlap_mismatch_and_existing_output(setup):
    tmp_path, data, _ = setup
    out = tmp_path / "merged.h5"
    shards = _write_shards(out, data, 2)
    with pytest.raises(DataError, match="overlap"):
        merge_shards([shards[0], shards[0]], tmp_path / "dup.h5")
    other = tmp_path / "other.h5"
    probekit.extract(_net(), NpzDataset(data), layers=["0"], out=other, split="train", name="m",
                     source="tiny", batch_size=4, progress=False)
    with pytest.raises(DataError, match="layout"):
        merge_shards([shards[0], other], tmp_path / "bad.h5")
    merge_shards(shards, out)
    with pytest.raises(StoreExistsError, match="overwrite=True"):
        merge_shards(shards, out)
    merge_shards(shards, out, overwrite=True)
    with pytest.raises(DataError, match="at least one"):
        merge_shards([], tmp_path / "none.h5")


def test_without_process_group_is_a_plain_extraction(setup):
    tmp_path, data, _ = setup
    out = tmp_path / "single.h5"
    extract_distributed(_spec(), NpzDataset(data), out=out, split="train", batch_size=4, progress=False)
    assert not list(tmp_path.glob("single.h5.rank*"))
    assert_same_store(out, _reference(tmp_path, data))


def test_merged_store_streams_chunk_by_chunk(setup, monkeypatch):
    """The merge copies blocks no larger than its budget (here 1 KiB), and the result is unchanged."""
    import probekit.store._merge as merge_mod

    tmp_path, data, _ = setup
    out = tmp_path / "merged.h5"
    shards = _write_shards(out, data, 3)
    monkeypatch.setattr(merge_mod, "_COPY_BYTES", 1024)
    reads: list[tuple[int, int]] = []
    real_getitem = h5py.Dataset.__getitem__

    def spy(self, key):
        arr = real_getitem(self, key)
        if self.file.filename.endswith(".h5") and ".rank" in self.file.filename and isinstance(arr, np.ndarray):
            reads.append((arr.nbytes, arr.shape[0] if arr.ndim else 1))
        return arr

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    merge_shards(shards, out)
    monkeypatch.undo()
    # every row dataset is read in blocks of <= 1 KiB, or one row at a time when a row is larger (layer
    # "4", Flatten: 1536 bytes a row); weight rows go through HDF5's object copy, not through numpy
    assert len(reads) > 20 and all(nbytes <= 1024 or rows == 1 for nbytes, rows in reads)
    assert any(rows == 1 and nbytes == 1536 for nbytes, rows in reads)
    assert_same_store(out, _reference(tmp_path, data))


# -- real processes under a gloo process group ----------------------------------------------------------------
WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from probekit.datasets import NpzDataset
    from probekit.extractors import ModelSpec, extract_distributed

    rank, world, init, data, weights, out, split, mode, fail_at = sys.argv[1:10]
    rank, world, fail_at = int(rank), int(world), int(fail_at)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + init, rank=rank, world_size=world)

    class FailAt(torch.utils.data.Dataset):
        def __init__(self, base):
            self.base, self.factor_names = base, base.factor_names
        def __len__(self):
            return len(self.base)
        def __getitem__(self, i):
            if i == fail_at and rank == 1:
                raise RuntimeError("planted failure")
            return self.base[i]

    net = torch.load(weights, weights_only=False)
    if fail_at == -2 and rank == 1:  # another checkpoint on rank 1
        with torch.no_grad():
            net[0].bias.add_(1.0)
    try:
        extract_distributed({"m": ModelSpec(net, ["0", "2", "4"], source="tiny")}, FailAt(NpzDataset(data)),
                            out=out, split=split, mode=mode, batch_size=4, progress=False)
        print("OK", rank)
    except Exception as e:
        print("ERR", rank, type(e).__name__, e)
        sys.exit(3)
    finally:
        dist.destroy_process_group()
""")


def _launch(tmp_path: Path, k: int, data: Path, weights: Path, out: Path, *, split="train", mode="create",
            fail_at=-1, tag="run") -> list[tuple[int, str]]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    init = tmp_path / f"init-{tag}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(k), str(init), str(data), str(weights),
                               str(out), split, mode, str(fail_at)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for r in range(k)]
    results = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        results.append((p.returncode, text))
    return results


def test_two_processes_gloo_equal_single_process_and_audit_reads_it(setup):
    tmp_path, data, weights = setup
    out = tmp_path / "merged.h5"
    res = _launch(tmp_path, 2, data, weights, out, split="train", tag="a")
    assert all(rc == 0 for rc, _ in res), res
    # a second split, added to the shards with mode="resume"; the merged store is rebuilt with both
    res = _launch(tmp_path, 2, data, weights, out, split="test_id", mode="resume", tag="b")
    assert all(rc == 0 for rc, _ in res), res
    assert_same_store(out, _reference(tmp_path, data, splits=("train", "test_id")))
    with probekit.open_store(out) as s:
        assert s.n_rows("train", "m") == N and s.sample_field("test_id", "index").tolist() == list(range(N))
        assert s.factor_names("train") == ["bg", "tex"]
    doc = probekit.audit(out, n_boot=20, n_perm=10, progress=False).data
    assert set(doc["models"]["m"]["layers"]) == set(LAYERS)


def test_three_processes_gloo_equal_single_process(setup):
    tmp_path, data, weights = setup
    out = tmp_path / "merged.h5"
    res = _launch(tmp_path, 3, data, weights, out, tag="c")
    assert all(rc == 0 for rc, _ in res), res
    assert_same_store(out, _reference(tmp_path, data))


def test_failed_rank_stops_every_rank_and_resume_finishes(setup):
    tmp_path, data, weights = setup
    out = tmp_path / "merged.h5"
    res = _launch(tmp_path, 2, data, weights, out, fail_at=30, tag="d")
    assert res[1][0] == 3 and "planted failure" in res[1][1]
    assert res[0][0] == 3 and "Rank(s) [1] of 2 failed" in res[0][1]  # no hang at the barrier
    assert not out.exists()
    with probekit.open_store(shard_path(out, 1, 2)) as s:
        assert s.n_rows("train", "m") == 12  # rows 18..29: three committed batches of 4
    res = _launch(tmp_path, 2, data, weights, out, mode="resume", tag="e")
    assert all(rc == 0 for rc, _ in res), res
    assert_same_store(out, _reference(tmp_path, data))


def test_ranks_with_different_weights_are_refused_before_extraction(setup):
    tmp_path, data, weights = setup
    out = tmp_path / "merged.h5"
    res = _launch(tmp_path, 2, data, weights, out, fail_at=-2, tag="f")
    for rc, text in res:  # every rank refuses alike, nothing is written
        assert rc == 3 and "other weights on rank 1 than on rank 0" in text, text
    assert not list(tmp_path.glob("merged.h5*"))
