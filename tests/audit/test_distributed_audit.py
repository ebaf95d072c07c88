"""``torchrun --nproc-per-node K -m probekit.cli audit ...``: the images split across ranks, one audit.json.

Oracle: a single-process audit of the same folder and model. The torchrun audit (2 gloo processes on
the CPU) must write the same audit.json (every figure, the verdict, the fingerprint under ``inputs``,
the forward passes counted) apart from the run's own record (``created``, ``store``, seconds and the
process count). The in-process tests run rank 0's split-and-append path with two ranks (a stand-in
process group whose other rank runs in the same process, on pickled copies of the calls), against the
same oracle, on paths the subprocess test does not take (``objects="auto"`` growing the crossed split in
two looks, GrabCut and the mask check's predictions), and check that a failure on another rank is
raised on rank 0 with its message.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import probekit as pk
from probekit import _distributed_audit as da
from probekit.cli import main
from probekit.datasets._shapes import write_image_folder
from probekit.errors import ProbekitError
from probekit.model_audit import audit_model

MODEL = "probekit.experiments.shortcut:ShapesCNN"
RUN_OWN = ("created", "store")  # the run's own record; cost is compared field by field below
COST_OWN = ("seconds", "seconds_extraction", "estimated_seconds", "processes")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("shapes")
    return write_image_folder(d, split="test", background="class", n=24)


@pytest.fixture(scope="module")
def shortcut(tmp_path_factory):
    """A ShapesCNN trained on backgrounds whose colour is the class: a planted shortcut."""
    from probekit.experiments.shortcut import train_shapes_cnn

    path = tmp_path_factory.mktemp("w") / "shortcut.pt"
    torch.save(train_shapes_cnn("class", seed=1, epochs=3).state_dict(), path)
    return path


def _same_audit(a: dict, b: dict) -> None:
    a, b = json.loads(json.dumps(a)), json.loads(json.dumps(b))
    ca, cb = a.pop("cost"), b.pop("cost")
    for k in RUN_OWN:
        a.pop(k, None), b.pop(k, None)
    assert a == b
    for k in COST_OWN:
        ca.pop(k, None), cb.pop(k, None)
    assert ca == cb


@pytest.mark.slow
def test_torchrun_audit_equals_a_single_process(folder, shortcut, tmp_path, monkeypatch):
    images, masks = folder
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["audit", MODEL, "--weights", str(shortcut), "--data", str(images), "--masks", str(masks), "--inits", "1",
            "--backgrounds", "4", "--n-boot", "40", "--n-perm", "20", "--workers", "0", "--no-progress"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29737"]
    r = subprocess.run([*torchrun, "-m", "probekit.cli", *args, "--out-dir", "dist"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("FLAGGED") == 1  # rank 0 alone reports
    monkeypatch.chdir(tmp_path)
    assert main([*args, "--out-dir", "single"]) == 0  # the oracle: one process (this one)
    dist, single = (json.loads((tmp_path / d / "audit.json").read_text()) for d in ("dist", "single"))
    assert dist["cost"]["processes"] == 2 and single["cost"]["processes"] == 1
    assert dist["models"]["model"]["flagged"]  # the planted shortcut, found by both
    assert dist["inputs"]["fingerprint"] == single["inputs"]["fingerprint"]
    _same_audit(dist, single)
    assert sorted(p.name for p in (tmp_path / "dist").iterdir()) == ["acts.h5", "audit.json", "report.html"]
    with pk.open_store(tmp_path / "dist" / "acts.h5") as a, pk.open_store(tmp_path / "single" / "acts.h5") as b:
        assert a.splits == b.splits and a.models == b.models
        for sp in b.splits:
            np.testing.assert_array_equal(a.sample_field(sp, "index"), b.sample_field(sp, "index"))
            assert a.n_expected(sp) == b.n_expected(sp)
            for m in b.models:
                for la in b.layers(m, sp):
                    np.testing.assert_allclose(a.acts(m, sp, la)[:], b.acts(m, sp, la)[:], rtol=1e-5, atol=1e-6)


class _Ranks:
    """A stand-in process group of ``world`` ranks: ranks 1..K-1 run each call of rank 0 in this process,
    on a pickled copy of it (as a torchrun rank receives it), through the code a real rank runs; or
    report ``fail`` instead."""

    def __init__(self, world, fail=None):
        self.world, self.fail, self.jobs = world, fail, []
        self.nets = [{} for _ in range(world)]

    def broadcast_object_list(self, box, src=0):
        self.jobs.append(box[0])

    def gather_object(self, obj, out, dst=0):
        job = pickle.loads(pickle.dumps(self.jobs[-1]))
        out[:] = [obj] + [self.fail or da._run_job(job, r, self.world, self.nets[r]) for r in range(1, self.world)]


def _ranks(monkeypatch, world=2, fail=None):
    group = _Ranks(world, fail)
    monkeypatch.setattr(da, "_LEADER", da._Leader(group, world))
    return group


@pytest.mark.slow
def test_split_across_ranks_equals_one_process_over_looks_and_mask_check(folder, shortcut, tmp_path, monkeypatch):
    """Two ranks (in this process): ``objects="auto"`` growing the crossed split in two looks (an open-ended
    split appended three times: the inits on a subsample of 5 objects stop before the model), and GrabCut's
    masks with the mask check's predictions split too."""
    images, _ = folder
    monkeypatch.setattr("probekit.model_audit.AUTO_MIN_OBJECTS", 10)  # looks on this 12-object folder too
    kw = {"foreground": "auto", "mask_check": 1, "weights": shortcut, "n_inits": 1, "n_backgrounds": 4, "init_objects": 5,
          "workers": 0, "n_boot": 40, "n_perm": 20, "progress": False, "objects": "auto",
          "decide": lambda *a: False}  # never decided: every look runs
    plain = audit_model(MODEL, images, out=tmp_path / "plain", **kw).data
    group = _ranks(monkeypatch)
    split = audit_model(MODEL, images, out=tmp_path / "split", **kw).data
    assert [j["split"] for j in group.jobs if j["kind"] == "extract"] == ["train", "test", "crossed", "crossed",
                                                                           "crossed", "variants"]
    crossed = [j for j in group.jobs if j.get("split") == "crossed"]
    # the inits on the first 5 objects with the model, the model alone to 10 (look 1), then to 12 (look 2)
    assert [(j["start"], sorted(j["specs"])) for j in crossed] == [(0, ["model", "model@init0"]), (5 * 4, ["model"]),
                                                                   (10 * 4, ["model"])]
    assert crossed[1]["nets"] == crossed[2]["nets"] == {}  # every net travels once
    kinds = [j["kind"] for j in group.jobs]
    assert kinds[0] == "map" and kinds.count("map") == 1  # GrabCut's masks, each rank a block of the images
    assert kinds.count("predict") == 2  # the mask check: eroded, dilated
    assert len(plain["cost"]["objects"]["looks_done"]) == 1 and plain["cost"]["objects"]["used"] == 12
    assert "eroded" in plain["mask_sensitivity"]["models"]["model"]
    assert split["cost"]["forward_passes_done"] == plain["cost"]["forward_passes_done"]
    _same_audit(split, plain)
    with pk.open_store(tmp_path / "split" / "acts.h5") as a, pk.open_store(tmp_path / "plain" / "acts.h5") as b:
        assert a.n_expected("crossed") is None and a.n_rows("crossed") == b.n_rows("crossed") == 12 * 4
        assert a.n_rows("crossed", "model@init0") == b.n_rows("crossed", "model@init0") == 5 * 4
        for sp in b.splits:
            np.testing.assert_array_equal(a.sample_field(sp, "index"), b.sample_field(sp, "index"))
            for m in b.models:
                for la in b.layers(m, sp):
                    np.testing.assert_allclose(a.acts(m, sp, la)[:], b.acts(m, sp, la)[:], rtol=1e-5, atol=1e-6)
    assert not list((tmp_path / "split").glob("*.part*"))


def test_a_failure_on_another_rank_is_raised_on_rank_0(tmp_path, monkeypatch):
    from probekit.extractors import ModelSpec, extract_models

    _ranks(monkeypatch, fail="DataError: the disk of rank 1 is full")
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    data = torch.utils.data.TensorDataset(torch.randn(9, 12), torch.arange(9) % 2)
    run = da.forward_runner(extract_models, precision="fp32", device="cpu")
    with pytest.raises(ProbekitError, match=r"Rank 1 of 2 failed extracting split 'data': DataError: the disk"):
        run({"m": ModelSpec(net, ["1"])}, data, out=tmp_path / "s.h5", split="data", mode="create")
    assert not list(tmp_path.glob("s.h5.part*"))  # rank 0's shard is not left behind


def test_shard_samples_keep_their_dataset_index():
    from probekit.extractors import shard_bounds, shard_samples

    data = torch.utils.data.TensorDataset(torch.arange(11.0).unsqueeze(1), torch.arange(11) % 2)
    blocks = [shard_samples(data, *shard_bounds(11, 3, r)) for r in range(3)]
    got = [int(b[i]["index"]) for b in blocks for i in range(len(b))]
    assert got == list(range(11)) and [len(b) for b in blocks] == [3, 4, 4]
    assert [float(b[0]["x"][0]) for b in blocks] == [0.0, 3.0, 7.0]  # each row is the dataset's own
    with pytest.raises(ProbekitError, match=r"within \[0, 11\]; got \[5, 12\)"):
        shard_samples(data, 5, 12)
