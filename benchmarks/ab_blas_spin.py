"""Why bench_probes.py pauses before each timed fit: OpenBLAS's spinning worker threads.

    python benchmarks/ab_blas_spin.py [--repeats 6]

Times the 16,000 x 512 x 10 torch probe fit of bench_probes.py four ways, alternating: right after a
4,000 x 512 by 512 x 10 numpy (OpenBLAS) product, after a 0.5 s pause, after the product and a pause,
and back to back with the previous fit. On 2 cores the OpenBLAS workers, which busy-wait for a while
after a call, take a core from the torch fit that follows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_probes import make_data

from probekit.analyses import LinearProbe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=6)
    args = ap.parse_args()
    Xtr, ytr, _, _ = make_data(16000, 512, 10)
    rng = np.random.default_rng(0)
    A, B = rng.random((4000, 512)), rng.random((512, 10))
    LinearProbe(C=1.0, backend="torch").fit(Xtr, ytr)  # warm-up
    res: dict[str, list[float]] = {"after a numpy product": [], "after a 0.5 s pause": [],
                                   "after a product and a 0.5 s pause": [], "back to back": []}
    for _ in range(args.repeats):
        for k in res:
            if "product" in k:
                A @ B
            if "pause" in k:
                time.sleep(0.5)
            t = time.perf_counter()
            LinearProbe(C=1.0, backend="torch").fit(Xtr, ytr)
            res[k].append(time.perf_counter() - t)
    for k, v in res.items():
        print(f"{k:36s} median {1000 * statistics.median(v):5.0f} ms  ({', '.join(f'{1000 * x:.0f}' for x in v)})")
    print(f"load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
