"""`torchrun --nproc-per-node 2 -m probekit.cli extract ...` equals a single-process `probekit extract`."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import probekit as pk

pytestmark = pytest.mark.slow


def test_torchrun_cli_equals_single_process(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(37, 6)).astype(np.float32), y=np.arange(37) % 3)
    (tmp_path / "netmod.py").write_text(
        "import torch\ndef net():\n    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    args = ["extract", "netmod:net", "--data", "d.npz", "--layers", "0,2", "--batch-size", "4", "--no-progress"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29731"]
    r = subprocess.run([*torchrun, "-m", "probekit.cli", *args, "-o", "dist.h5"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "from 2 shards" in r.stderr
    r = subprocess.run([sys.executable, "-m", "probekit.cli", *args, "-o", "single.h5"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    with pk.open_store(tmp_path / "dist.h5") as a, pk.open_store(tmp_path / "single.h5") as b:
        assert a.n_rows("data", "model") == b.n_rows("data", "model") == 37
        np.testing.assert_array_equal(a.sample_field("data", "index"), b.sample_field("data", "index"))
        np.testing.assert_array_equal(a.sample_field("data", "label"), b.sample_field("data", "label"))
        for layer in ("0", "2"):
            np.testing.assert_allclose(a.acts("model", "data", layer)[:], b.acts("model", "data", layer)[:],
                                       rtol=1e-5, atol=1e-6)


def test_torchrun_cli_per_layer_pool_equals_single_process(tmp_path):
    """``--pool LAYER=MODE,...`` under torchrun is resolved on the model as in one process: each layer
    stored with its own pool, rows equal to a single process's and to a hooked forward pass (the oracle)."""
    import torch

    rng = np.random.default_rng(1)
    x = rng.normal(size=(23, 3, 6, 6)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(23) % 2)
    (tmp_path / "convmod.py").write_text(
        "import torch\ndef net():\n    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 5, 3),\n"
        "                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(5, 2))\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    args = ["extract", "convmod:net", "--data", "d.npz", "--layers", "0,2,@output", "--pool", "avg,0=max",
            "--batch-size", "4", "--no-progress"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29733"]
    r = subprocess.run([*torchrun, "-m", "probekit.cli", *args, "-o", "dist.h5"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "from 2 shards" in r.stderr
    r = subprocess.run([sys.executable, "-m", "probekit.cli", *args, "-o", "single.h5"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    sys.path.insert(0, str(tmp_path))
    try:
        import convmod
    finally:
        sys.path.remove(str(tmp_path))
    net = convmod.net().eval()
    with torch.no_grad():
        c0 = net[0](torch.from_numpy(x))
        c2 = net[2](net[1](c0))
    want = {"0": c0.amax(dim=(2, 3)).numpy(), "2": c2.mean(dim=(2, 3)).numpy()}
    with pk.open_store(tmp_path / "dist.h5") as a, pk.open_store(tmp_path / "single.h5") as b:
        for store in (a, b):
            assert {la: store.acts("model", "data", la).attrs["pool"] for la in ("0", "2")} == {"0": "max",
                                                                                               "2": "avg"}
        np.testing.assert_array_equal(a.sample_field("data", "index"), np.arange(23))
        for layer in ("0", "2", "@output"):
            np.testing.assert_allclose(a.acts("model", "data", layer)[:], b.acts("model", "data", layer)[:],
                                       rtol=1e-5, atol=1e-6)
        for layer, w in want.items():
            np.testing.assert_allclose(a.acts("model", "data", layer)[:], w, rtol=1e-5, atol=1e-6)
