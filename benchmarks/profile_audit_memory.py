"""Where the memory of ``probekit.audit.audit()`` goes at its peak, on a store an audit wrote.

Runs the audit once (so that its lazy imports are loaded), then again under ``tracemalloc`` with a thread
that keeps a snapshot of the traced allocations at each new high (numpy reports its arrays to tracemalloc;
torch's are not traced, and the audit makes none). Prints the traced peak and the largest allocation
sites at it.

    python benchmarks/profile_audit_memory.py OUT/acts.h5 [--top 6]

The stores of ``benchmarks/bench_audit_scale.py`` are left in ``/tmp/bench-audit-*/audit/acts.h5``.
"""

from __future__ import annotations

import argparse
import threading
import time
import tracemalloc


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store")
    p.add_argument("--top", type=int, default=6)
    p.add_argument("--n-boot", type=int, default=500)
    p.add_argument("--n-perm", type=int, default=200)
    args = p.parse_args()

    from probekit.audit import audit
    from probekit.store import open_store

    def run() -> None:
        with open_store(args.store) as v:
            crossed = "crossed" if "crossed" in v.splits else "stress"  # a store from before the rename
            audit(v, train="train", test_id="test", test_ood="", crossed=crossed, variants="variants",
                  n_boot=args.n_boot, n_perm=args.n_perm, random_state=0, progress=False)

    run()  # the lazy imports (scikit-learn, scipy, ...) out of the way
    tracemalloc.start(12)
    best: list = [0, None]
    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            cur, _ = tracemalloc.get_traced_memory()
            if cur > best[0] * 1.02 + 1e6:
                best[0], best[1] = cur, tracemalloc.take_snapshot()
            time.sleep(0.01)

    base = _rss_mb()
    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    t0 = time.perf_counter()
    run()
    stop.set()
    th.join()
    _, peak = tracemalloc.get_traced_memory()
    print(f"audit() {time.perf_counter() - t0:.1f} s; RSS before {base:.0f} MB; traced peak {peak / 2**20:.0f} MB; "
          f"snapshot at {best[0] / 2**20:.0f} MB")
    if best[1] is not None:
        for st in best[1].statistics("traceback")[: args.top]:
            print(f"{st.size / 2**20:.1f} MB in {st.count} blocks")
            for line in st.traceback.format()[-6:]:
                print("   ", line)


if __name__ == "__main__":
    main()
