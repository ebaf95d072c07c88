"""Streaming passes (BackgroundCorrelation, linear CKA) vs raw h5py read throughput of the same file.

    python benchmarks/bench_streaming.py [--n 100000 --d 512 --factors 6 --perms 100]

Writes a float32 store-like HDF5 dataset (chunked along rows) to a temp dir, then times: a bare
read of every chunk, a BackgroundCorrelation pass (Pearson + permutation null, Spearman off), and a
linear CKA pass of the layer against itself shifted. Reports MB/s of each.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np


class H5Acts:
    """The Activations protocol over one h5py dataset (shape, n_rows, iter_chunks, slicing)."""

    def __init__(self, ds: h5py.Dataset) -> None:
        self._ds, self.shape, self.n_rows = ds, ds.shape, ds.shape[0]

    def iter_chunks(self, rows=None):
        rows = rows or 8192
        for s in range(0, self.n_rows, rows):
            yield s, self._ds[s:s + rows]

    def __getitem__(self, k):
        return self._ds[k]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--factors", type=int, default=6)
    ap.add_argument("--perms", type=int, default=100)
    ap.add_argument("--chunk-rows", type=int, default=8192)
    args = ap.parse_args()

    from probekit.analyses import BackgroundCorrelation, linear_cka

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "acts.h5"
        with h5py.File(path, "w") as f:
            ds = f.create_dataset("acts", shape=(args.n, args.d), dtype="float32", chunks=(1024, args.d))
            for s in range(0, args.n, 8192):
                e = min(args.n, s + 8192)
                ds[s:e] = rng.normal(size=(e - s, args.d)).astype(np.float32)
        F = rng.normal(size=(args.n, args.factors))
        mb = args.n * args.d * 4 / 2**20
        with h5py.File(path, "r") as f:
            acts = H5Acts(f["acts"])
            t = time.perf_counter()
            for _, a in acts.iter_chunks(args.chunk_rows):
                a.sum()
            t_read = time.perf_counter() - t
            t = time.perf_counter()
            BackgroundCorrelation(n_permutations=args.perms, spearman=False, chunk_rows=args.chunk_rows,
                                  random_state=0).fit(acts, F)
            t_corr = time.perf_counter() - t
            t = time.perf_counter()
            linear_cka(acts, acts, chunk_rows=args.chunk_rows)
            t_cka = time.perf_counter() - t
        print(f"file {mb:.0f} MiB ({args.n} x {args.d} float32), chunk_rows {args.chunk_rows}")
        print(f"raw h5py read            : {t_read:6.2f} s  {mb / t_read:7.0f} MiB/s")
        print(f"BackgroundCorrelation ({args.perms} perms x {args.factors} factors): {t_corr:6.2f} s  "
              f"{mb / t_corr:7.0f} MiB/s  ({t_corr / t_read:.1f}x read time)")
        print(f"linear_cka (X vs X, reads twice): {t_cka:6.2f} s  {2 * mb / t_cka:7.0f} MiB/s read "
              f"({t_cka / t_read:.1f}x read time)")


if __name__ == "__main__":
    main()
