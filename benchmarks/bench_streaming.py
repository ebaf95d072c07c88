"""One-pass analyses (BackgroundCorrelation, linear CKA) vs the raw HDF5 read of the same store.

    python benchmarks/bench_streaming.py [--n 100000 --d 512 --perms 100 --repeats 5 --cold]

Writes a probekit store (two float32 layers ``x`` and ``y`` of ``d`` units over ``n`` rows, HDF5
chunks of 1024 rows, ``factors`` background factors in /samples), then times, alternating the
methods in every repeat (medians reported):

- ``read_h5py``: plain h5py slices of layer ``x`` in the analyses' chunk rows (the floor of any
  one-pass analysis of one layer); ``read_h5py_xy`` the same for ``x`` and ``y`` (CKA's floor);
- ``read_store``: probekit's ``Activations.iter_chunks`` of the same layer;
- ``corr_P``: ``BackgroundCorrelation(n_permutations=P, spearman=False)`` for each P in ``--perms``
  (P=0: analytic null, no permutation products);
- ``cka``: ``linear_cka(x, y)``;
- ``gemm_corr_P`` / ``gemm_cka``: the products these passes cannot avoid (per chunk ``a.T @ G`` with
  the P x factors permuted columns; ``a.T a``, ``b.T b``, ``a.T b``) on in-memory float32 chunks,
  through the same BLAS (numpy's): the arithmetic floor on this CPU.

``--cold`` drops the page cache before every timed method (needs root), so reads come from the
disk, as they do for a store larger than memory; by default the file is in the page cache and the
read floor is memory bandwidth. ``--src DIR`` imports probekit from another checkout (e.g. a
``git worktree`` of an older commit) for before/after runs. Writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from _checkout import use_checkout


def _drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("1\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--factors", type=int, default=6)
    ap.add_argument("--perms", type=int, nargs="+", default=[0, 100])
    ap.add_argument("--chunk-rows", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each timed method")
    ap.add_argument("--src", default=None, help="import probekit from this checkout")
    ap.add_argument("--skip", nargs="*", default=[], help="methods to leave out (e.g. gemm_cka)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_streaming.json"))
    a = ap.parse_args()
    if a.src:
        use_checkout(a.src)

    import h5py
    import numpy as np

    import probekit
    import probekit.analyses as pa
    from probekit.analyses import BackgroundCorrelation, linear_cka
    from probekit.store import StoreWriter
    print(f"probekit from {Path(probekit.__file__).parent.parent}, analyses from {Path(pa.__file__).parent}")
    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp(prefix="pk-stream-"))
    path = tmp / "acts.h5"
    R, n, d = a.chunk_rows, a.n, a.d
    with StoreWriter(path, mode="create") as w:
        w.add_split("train", n_rows=n, has_label=False, factor_names=[f"f{i}" for i in range(a.factors)])
        w.add_model("m", role="model")
        for layer in ("x", "y"):
            w.add_layer("m", "train", layer, feature_shape=(d,), dtype="float32")
        mix = rng.normal(size=(d, d)).astype(np.float32) / np.sqrt(d)
        for s in range(0, n, 8192):
            e = min(n, s + 8192)
            x = rng.normal(size=(e - s, d)).astype(np.float32)
            f = rng.normal(size=(e - s, a.factors))
            x[:, :8] += f[:, :1].astype(np.float32)  # a few units carry factor 0
            w.write_rows("train", s, samples={"index": np.arange(s, e), "factors": f},
                         acts={"m": {"x": x, "y": np.tanh(x @ mix)}})
    mib = n * d * 4 / 2**20

    def read_h5py(names=("x",)):
        with h5py.File(path, "r") as f:
            for nm in names:
                ds = f[f"models/m/acts/train/{nm}"]
                for s in range(0, n, R):
                    ds[s:s + R].sum()

    methods = {
        "read_h5py": lambda: read_h5py(),
        "read_h5py_xy": lambda: read_h5py(("x", "y")),
    }

    def read_store():
        with probekit.open_store(path) as st:
            for _, c in st.acts("m", "train", "x").iter_chunks(R):
                c.sum()

    methods["read_store"] = read_store
    for P in a.perms:
        def corr(P=P):
            with probekit.open_store(path) as st:
                F = st.sample_field("train", "factors")
                BackgroundCorrelation(n_permutations=P, spearman=False, chunk_rows=R, random_state=0).fit(
                    st.acts("m", "train", "x"), F)
        methods[f"corr_{P}"] = corr

    def cka():
        with probekit.open_store(path) as st:
            linear_cka(st.acts("m", "train", "x"), st.acts("m", "train", "y"), chunk_rows=R)

    methods["cka"] = cka

    # arithmetic floors: the same products on in-memory chunks, same BLAS (numpy's), same chunk count
    ca = rng.normal(size=(R, d)).astype(np.float32)
    cb = rng.normal(size=(R, d)).astype(np.float32)
    n_chunks = -(-n // R)
    for P in a.perms:
        if P == 0:
            continue
        g = rng.normal(size=(R, P * a.factors)).astype(np.float32)
        methods[f"gemm_corr_{P}"] = lambda g=g: [ca.T @ g for _ in range(n_chunks)]
    methods["gemm_cka"] = lambda: [(ca.T @ ca, cb.T @ cb, ca.T @ cb) for _ in range(n_chunks)]
    methods = {k: v for k, v in methods.items() if k not in a.skip}

    times: dict[str, list[float]] = {k: [] for k in methods}
    for r in range(a.repeats + 1):  # the first round warms up (imports, allocator) and is dropped
        for k, fn in methods.items():
            if a.cold and not k.startswith("gemm"):
                _drop_caches()
            t = time.perf_counter()
            fn()
            if r:
                times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    for p in tmp.iterdir():
        p.unlink()
    tmp.rmdir()

    floor = med["read_h5py"]
    print(f"store: {n} x {d} float32 per layer ({mib:.0f} MiB), chunk_rows {R}, "
          f"{'cold (page cache dropped)' if a.cold else 'page cache warm'}, {a.repeats} repeats, "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"{'method':<16} {'median s':>9} {'MiB/s':>8} {'vs read':>8}  note")
    rows = {}
    for k, v in med.items():
        read_mib = 2 * mib if k in ("cka", "read_h5py_xy", "gemm_cka") else mib
        ref = med.get("read_h5py_xy", floor) if read_mib > mib else floor
        note = ""
        if k.startswith("corr_") and f"gemm_{k}" in med:
            note = f"unavoidable products {med[f'gemm_{k}'] / v:.0%} of the time"
        if k == "cka" and "gemm_cka" in med:
            note = f"unavoidable products {med['gemm_cka'] / v:.0%} of the time"
        rows[k] = {"median_s": v, "mib_per_s": read_mib / v, "vs_read": ref / v}
        print(f"{k:<16} {v:>9.3f} {read_mib / v:>8.0f} {ref / v:>8.2f}  {note}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"args": vars(a), "mib_per_layer": mib, "times": times, "rows": rows,
                                       "loadavg": os.getloadavg()},
                                      indent=1))


if __name__ == "__main__":
    main()
