"""Full feature maps (pool="none") are disk-bound: probekit's write rate vs the raw sequential write
rate of the same disk, measured side by side in one process.

Every method writes the same bytes (one pre-computed float32 array, or the same-sized layer output) to
a new file in the same folder and ends with ``os.fsync``, so each time is "these bytes are on disk".
The methods run in a rotated order in every repeat (a method never always follows the same other one:
ext4 here is mounted with ``discard`` and the previous file is unlinked just before), and the table
shows medians over the repeats.

This machine is a VM whose kernel reports free memory back to the host (virtio-balloon free page
reporting): a page that has been free for a few seconds costs a host fault when it is touched again,
and writing 392 MiB into the page cache then takes ~1 s instead of ~0.08 s (the same bytes, same
disk). Which mode a method hits depends on what ran before it, not on the disk. So before every timed
call the script touches and frees ``--settle-mib`` of memory (untimed), and every method starts from
the same state: recently used, host-backed free pages, as on an ordinary machine. ``--settle-mib 0``
turns that off.

Floors (the disk):

- ``raw_write``: ``os.write`` of the array in 8 MiB blocks into a new file, then ``os.fsync``: the
  page-cache write plus the flush to disk, the same contract probekit's rows meet at the end of a
  run. Its two parts are also recorded: ``raw_write.buffered`` (the ``write`` calls only, into the
  page cache) and ``raw_write.fsync``.
- ``raw_direct``: the same bytes with ``O_DIRECT`` from a page-aligned 8 MiB buffer (the page cache
  bypassed; the copy into the aligned buffer is included), then ``os.fsync``.
- ``dd``: ``dd if=/dev/zero bs=8M conv=fsync`` of the same size, timed around the subprocess (a sanity
  check of the disk independent of Python; its process start is included).

HDF5 and probekit:

- ``h5py_contiguous``: the array as one contiguous h5py dataset in one call.
- ``store_writer``: ``probekit.store.StoreWriter`` writing the array as committed batches of
  ``--batch`` rows (``write_rows``: the commit protocol's two flushes per batch included) - probekit's
  write path without a model.
- ``forward``: the model's bare forward on the same batches (no hooks, no file).
- ``probekit``: ``probekit.extract(..., pool="none")`` of the model's last layer into a new store. The
  model is a write-bound stand-in (a 1x1 conv stem: 64 x H x W floats per sample for a few MACs
  each). Its write share is ``probekit - forward`` of the same repeat (median over repeats). The
  forward pass stops in the hook of the last requested layer, and with the synchronous writer that
  map is written as the layer's own tensor, without the capture hook's safety copy (nothing of the
  model runs between the hook and the write).
- ``probekit_copy`` (the default before commit 1433a6b): the same with ``stop_early=False``: the
  capture hook copies each map (so that a later in-place op cannot change it) into a host buffer the
  pipeline reuses across batches.
- ``probekit_fresh`` (diagnostic: the path before the reused buffers): as ``probekit_copy`` with the
  hook's copy going to a new tensor every batch (``pool(..., out=None)``). A new 100 MB tensor is
  mapped fresh by glibc (allocations over 32 MiB) and page-faulted on every batch.

    python benchmarks/bench_feature_maps.py [--n 128] [--size 112] [--batch 32] [--repeats 9]

Prints a table and writes benchmarks/results/bench_feature_maps.json. Run it alone on the machine
(``flock`` on a shared one): every number here moves with other processes' CPU and disk use; the load
average at the start and end is recorded.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import TensorDataset

import probekit
from probekit.extractors import _hooks
from probekit.store import StoreWriter

_BLOCK = 8 << 20


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
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--settle-mib", type=int, default=None,
                    help="memory touched and freed before each timed call (default: 2 x the bytes + 512)")
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
    src = memoryview(arr.reshape(-1).view(np.uint8))
    aligned = mmap.mmap(-1, _BLOCK)  # page-aligned, as O_DIRECT needs
    aligned_mv = memoryview(aligned)
    parts: dict[str, list[float]] = {"raw_write.buffered": [], "raw_write.fsync": []}

    def raw_write(p: Path) -> None:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            t = time.perf_counter()
            for s in range(0, nbytes, _BLOCK):
                os.write(fd, src[s:s + _BLOCK])
            t1 = time.perf_counter()
            os.fsync(fd)
            parts["raw_write.buffered"].append(t1 - t)
            parts["raw_write.fsync"].append(time.perf_counter() - t1)
        finally:
            os.close(fd)

    def raw_direct(p: Path) -> None:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        try:
            for s in range(0, nbytes, _BLOCK):
                m = min(_BLOCK, nbytes - s)
                aligned_mv[:m] = src[s:s + m]
                # O_DIRECT needs a multiple of the block size: round the last write up, cut the file after
                os.write(fd, aligned_mv[:(m + 4095) // 4096 * 4096])
            os.ftruncate(fd, nbytes)
            os.fsync(fd)
        finally:
            os.close(fd)

    def dd(p: Path) -> None:
        subprocess.run(["dd", "if=/dev/zero", f"of={p}", "bs=8M", f"count={-(-nbytes // _BLOCK)}",
                        "conv=fsync", "status=none"], check=True)

    def h5py_contiguous(p: Path) -> None:
        with h5py.File(p, "w") as f:
            f.create_dataset("x", data=arr)
        _fsync(p)

    def store_writer(p: Path) -> None:
        with StoreWriter(p, mode="create") as w:
            w.add_split("data", n_rows=a.n, has_label=False)
            w.add_model("m")
            w.add_layer("m", "data", layer, feature_shape=row_shape)
            for s in range(0, a.n, a.batch):
                e = min(a.n, s + a.batch)
                w.write_rows("data", s, {"index": np.arange(s, e)}, {"m": {layer: arr[s:e]}})
        _fsync(p)

    def forward(p: Path) -> None:
        with torch.no_grad():
            for s in range(0, a.n, a.batch):
                model(x[s:s + a.batch])

    def extract(p: Path, **kw: object) -> None:
        probekit.extract(model, data, layers=[layer], pool="none", out=p, batch_size=a.batch, progress=False,
                         **kw)
        _fsync(p)

    real_pool = _hooks.pool

    def extract_copy(p: Path) -> None:
        extract(p, stop_early=False)

    def pool_fresh(t: torch.Tensor, mode: str, *args: object, **kwargs: object) -> torch.Tensor:
        kwargs.pop("out", None)  # the pipeline's reused buffer declined: a new tensor per batch
        return real_pool(t, mode, *args, **kwargs)

    def extract_fresh(p: Path) -> None:
        _hooks.pool = pool_fresh
        try:
            extract_copy(p)
        finally:
            _hooks.pool = real_pool

    methods: dict[str, Callable[[Path], None]] = {
        "raw_write": raw_write, "raw_direct": raw_direct, "dd": dd, "h5py_contiguous": h5py_contiguous,
        "store_writer": store_writer, "forward": forward, "probekit": extract,
        "probekit_copy": extract_copy, "probekit_fresh": extract_fresh,
    }
    times: dict[str, list[float]] = {k: [] for k in methods}
    base = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="pk-bench-"))
    load_start = os.getloadavg()
    extract(base / "warmup.h5")  # imports, first-call costs
    (base / "warmup.h5").unlink()
    settle = (2 * nbytes + (512 << 20)) if a.settle_mib is None else a.settle_mib << 20
    names = list(methods)
    for r in range(a.repeats):
        k0 = r % len(names)
        for k in names[k0:] + names[:k0]:
            p = base / f"{k}{r}.bin"
            if settle:
                np.ones(settle, dtype=np.uint8)  # touched, then freed: host-backed free pages
            t = time.perf_counter()
            methods[k](p)
            times[k].append(time.perf_counter() - t)
            p.unlink(missing_ok=True)
    load_end = os.getloadavg()
    if not a.dir:
        shutil.rmtree(base, ignore_errors=True)

    times.update(parts)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    # write shares: each repeat's extract minus the same repeat's bare forward, median over repeats
    for k in ("probekit", "probekit_copy", "probekit_fresh"):
        share = [e - f for e, f in zip(times[k], times["forward"], strict=True)]
        med[f"{k}.write_share"], best[f"{k}.write_share"] = statistics.median(share), min(share)
    rate = {k: nbytes / max(1e-9, v) for k, v in med.items() if k != "forward"}
    rate.pop("raw_write.fsync")
    floor = rate["raw_write"]
    rows = ["raw_write", "raw_write.buffered", "raw_direct", "dd", "h5py_contiguous", "store_writer",
            "probekit.write_share", "probekit_copy.write_share", "probekit_fresh.write_share",
            "probekit", "probekit_copy", "probekit_fresh"]
    print(f"{a.n} samples of a {row_shape} float32 = {nbytes / 2**20:.0f} MiB, {a.repeats} repeats, "
          f"load {load_start[0]:.1f} -> {load_end[0]:.1f}")
    print(f"{'method':<28} {'median s':>9} {'best s':>8} {'MiB/s':>7} {'vs raw_write':>12}")
    for k in rows:
        print(f"{k:<28} {med[k]:>9.3f} {best[k]:>8.3f} {rate[k] / 2**20:>7.0f} {rate[k] / floor:>12.2f}")
    print(f"{'forward (subtracted)':<28} {med['forward']:>9.3f} {best['forward']:>8.3f}")
    print(f"{'raw_write.fsync (part)':<28} {med['raw_write.fsync']:>9.3f} {best['raw_write.fsync']:>8.3f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({
        "args": vars(a), "row_shape": row_shape, "bytes": nbytes, "times": times, "median": med,
        "best": best, "rate_bytes_per_s": rate, "ratio_vs_raw_write": {k: v / floor for k, v in rate.items()},
        "settle_bytes": settle, "loadavg_start": load_start, "loadavg_end": load_end, "torch_threads": torch.get_num_threads(),
        "h5py": h5py.version.version, "hdf5": h5py.version.hdf5_version,
    }, indent=1))


if __name__ == "__main__":
    main()
