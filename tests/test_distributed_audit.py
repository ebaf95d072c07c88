"""``torchrun --nproc-per-node K -m probekit.cli audit ...``: the images split across ranks, one audit.json.

Oracle: a single-process audit of the same folder and model. The torchrun audit (2 gloo processes on
the CPU) must write the same audit.json (every figure, the verdict, the fingerprint under ``inputs``,
the forward passes counted) apart from the run's own record (``created``, ``store``, seconds and the
process count). The in-process tests run rank 0's split-and-append path with one rank (a stand-in
process group), against the same oracle, on the paths a 2-process run of a small folder may not take
(``objects="auto"`` growing the crossed split in two looks), and check that a failure on another rank
is raised on rank 0 with its message.
"""

from __future__ import annotations

import json
import os
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


class _OneRank:
    """A stand-in process group of one rank; ``errors`` are what other ranks would report."""

    def __init__(self, errors=()):
        self.errors, self.jobs = list(errors), []

    def broadcast_object_list(self, box, src=0):
        self.jobs.append(box[0])

    def gather_object(self, obj, out, dst=0):
        out[:] = [obj, *self.errors][:len(out)]


def _leader(monkeypatch, world=1, errors=()):
    group = _OneRank(errors)
    leader = da._Leader(group, world)
    monkeypatch.setattr(da, "_LEADER", leader)
    return group


@pytest.mark.slow
def test_split_and_append_equals_one_process_over_looks(folder, shortcut, tmp_path, monkeypatch):
    """``objects="auto"`` growing the crossed split in two looks (an open-ended split appended twice)."""
    images, masks = folder
    kw = {"masks": masks, "weights": shortcut, "n_inits": 1, "workers": 0, "n_boot": 40, "n_perm": 20, "progress": False,
          "objects": "auto", "decide": lambda *a: False}  # never decided: every look runs
    plain = audit_model(MODEL, images, out=tmp_path / "plain", **kw).data
    group = _leader(monkeypatch)
    split = audit_model(MODEL, images, out=tmp_path / "split", **kw).data
    assert [j["split"] for j in group.jobs if j["kind"] == "extract"] == ["train", "test", "stress", "stress",
                                                                           "variants"]
    stress = [j for j in group.jobs if j["split"] == "stress"]
    assert [j["start"] for j in stress] == [0, 10 * 8]  # the second look appends after the first's rows
    assert stress[1]["nets"] == {}  # every net travels once
    assert len(plain["cost"]["objects"]["looks_done"]) == 1 and plain["cost"]["objects"]["used"] == 12
    _same_audit(split, plain)
    with pk.open_store(tmp_path / "split" / "acts.h5") as a, pk.open_store(tmp_path / "plain" / "acts.h5") as b:
        assert a.n_expected("stress") is None and a.n_rows("stress") == b.n_rows("stress") == 12 * 8
        np.testing.assert_array_equal(a.sample_field("stress", "index"), b.sample_field("stress", "index"))
        for m in b.models:
            for la in b.layers(m, "stress"):
                np.testing.assert_array_equal(a.acts(m, "stress", la)[:], b.acts(m, "stress", la)[:])
    assert not list((tmp_path / "split").glob("*.part*"))


def test_a_failure_on_another_rank_is_raised_on_rank_0(folder, tmp_path, monkeypatch):
    from probekit.extractors import ModelSpec, extract_models

    images, masks = folder
    _leader(monkeypatch, world=2, errors=["DataError: the disk of rank 1 is full"])
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    data = torch.utils.data.TensorDataset(torch.randn(9, 12), torch.arange(9) % 2)
    run = da.forward_runner(extract_models, precision="fp32", device="cpu")
    with pytest.raises(ProbekitError, match=r"Rank 1 of 2 failed extracting split 'data': DataError: the disk"):
        run({"m": ModelSpec(net, ["1"])}, data, out=tmp_path / "s.h5", split="data", mode="create")
    assert not list(tmp_path.glob("s.h5.part*"))  # rank 0's shard is not left behind
