"""Full feature maps (pool="none") are disk-bound: probekit's write rate vs the raw sequential write
rate of the same disk, measured side by side in one process.

Methods, alternated for several repeats, each writing the same number of bytes to the same folder:

- ``raw_write``: one pre-computed float32 array written with plain ``file.write`` in 8 MiB blocks,
  then ``os.fsync`` (the disk's sequential write floor).
- ``h5py_contiguous``: the same array as one contiguous h5py dataset, flushed and fsynced.
- ``probekit``: ``probekit.extract(..., pool="none")`` of a layer's full output, fsynced. The model
  is a write-bound stand-in (a 1x1 conv stem: 64 x H x W floats per sample for a few MACs each), and
  its bare forward time, measured in the same repeat as ``forward``, is subtracted, so the ratio
  compares writing with writing.

    python benchmarks/bench_feature_maps.py [--n 128] [--size 112] [--repeats 5]

Prints a table and writes benchmarks/results/bench_feature_maps.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import TensorDataset

import probekit


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default=None, help="folder on the disk to measure (default: a temp folder)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_feature_maps.json"))
    a = ap.parse_args()

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 1), torch.nn.ReLU()).eval()
    layer = "1"
    x = torch.randn(a.n, 3, a.size, a.size)
    data = TensorDataset(x)
    row_shape = (64, a.size, a.size)
    arr = np.random.default_rng(0).standard_normal((a.n, *row_shape)).astype(np.float32)
    nbytes = arr.nbytes
    times: dict[str, list[float]] = {k: [] for k in ("raw_write", "h5py_contiguous", "forward", "probekit")}
    base = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="pk-bench-"))
    for r in range(a.repeats):
        p = base / f"raw{r}.bin"
        t = time.perf_counter()
        with open(p, "wb") as f:
            mv = memoryview(arr.reshape(-1).view(np.uint8))
            for s in range(0, nbytes, 8 << 20):
                f.write(mv[s:s + (8 << 20)])
        _fsync(p)
        times["raw_write"].append(time.perf_counter() - t)
        p.unlink()

        p = base / f"h5{r}.h5"
        t = time.perf_counter()
        with h5py.File(p, "w") as f:
            f.create_dataset("x", data=arr)
        _fsync(p)
        times["h5py_contiguous"].append(time.perf_counter() - t)
        p.unlink()

        t = time.perf_counter()
        with torch.no_grad():
            for s in range(0, a.n, a.batch):
                model(x[s:s + a.batch])
        times["forward"].append(time.perf_counter() - t)

        p = base / f"pk{r}.h5"
        t = time.perf_counter()
        probekit.extract(model, data, layers=[layer], pool="none", out=p, batch_size=a.batch, progress=False)
        _fsync(p)
        times["probekit"].append(time.perf_counter() - t)
        p.unlink()

    med = {k: statistics.median(v) for k, v in times.items()}
    rate = {
        "raw_write": nbytes / med["raw_write"],
        "h5py_contiguous": nbytes / med["h5py_contiguous"],
        # writing share of probekit's time: its total minus the forward pass of the same batches
        "probekit": nbytes / max(1e-9, med["probekit"] - med["forward"]),
    }
    print(f"{a.n} samples of a {row_shape} float32 = {nbytes / 2**20:.0f} MiB, {a.repeats} repeats, "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"{'method':<18} {'median s':>9} {'MiB/s':>9} {'vs raw':>7}")
    for k in ("raw_write", "h5py_contiguous", "probekit"):
        print(f"{k:<18} {med[k]:>9.3f} {rate[k] / 2**20:>9.0f} {rate[k] / rate['raw_write']:>7.2f}")
    print(f"{'forward (subtracted)':<18} {med['forward']:>9.3f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"args": vars(a), "row_shape": row_shape, "bytes": nbytes,
                                       "times": times, "median": med, "rate_bytes_per_s": rate,
                                       "ratio_vs_raw": {k: v / rate["raw_write"] for k, v in rate.items()},
                                       "loadavg": os.getloadavg()}, indent=1))


if __name__ == "__main__":
    main()
