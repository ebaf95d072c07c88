"""Run every benchmark with the arguments docs/BENCHMARKS.md records, one after the other.

    python benchmarks/run_all.py            # everything (about 30-40 minutes on 2 CPU cores)
    python benchmarks/run_all.py --list     # the commands, without running them
    python benchmarks/run_all.py --only streaming probes

Each benchmark prints its table and writes its JSON under benchmarks/results/. Run it on an otherwise
idle machine: the benchmarks compare methods side by side, but other work on the cores still widens
their spread. A benchmark that fails is reported and the others still run; the exit status is 1 if
any failed. ``--cold`` streaming runs drop the page cache and need root; they are skipped otherwise.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# name -> argument lists of one script (the commands quoted in docs/BENCHMARKS.md)
BENCHMARKS: dict[str, list[list[str]]] = {
    "extract": [
        ["bench_extract.py", "--model", "resnet18", "--repeats", "7"],
        ["bench_extract.py", "--model", "resnet18", "--maps", "--repeats", "7"],
        ["bench_extract.py", "--model", "vit", "--n", "512", "--repeats", "7"],
        ["bench_extract.py", "--model", "vit", "--n", "512", "--maps", "--repeats", "7"],
        ["ab_weights_hash.py"],
    ],
    "memory": [["bench_memory.py"]],
    "feature_maps": [["bench_feature_maps.py", "--repeats", "15"]],
    "probes": [
        ["bench_probes.py", "--repeats", "9", "--out", str(RESULTS / "bench_probes.json")],
        ["bench_probes.py", "--repeats", "9", "--pause", "0", "--out", str(RESULTS / "bench_probes_nopause.json")],
        ["bench_probes.py", "--cv", "--repeats", "3", "--out", str(RESULTS / "bench_probes_cv.json")],
        ["ab_blas_spin.py"],
        ["bench_probes.py", "--stream", "--n", "64000", "--budget-mib", "32", "--repeats", "3",
         "--out", str(RESULTS / "bench_probes_stream.json")],
    ],
    "streaming": [
        ["bench_streaming.py", "--perms", "0", "100", "--repeats", "5"],
        ["bench_streaming.py", "--perms", "0", "100", "--repeats", "5", "--cold",
         "--out", str(RESULTS / "bench_streaming_cold.json")],
    ],
    "recorder": [["bench_recorder.py", "--repeats", "5", "--every", "50", "20", "10",
                  "--out", str(RESULTS / "bench_recorder.json")]],
    "channels_last": [["bench_channels_last.py"]],
    "distributed": [["bench_distributed.py", "--procs", "1", "2", "--n", "2048", "--repeat", "3",
                     "--out", str(RESULTS / "bench_distributed.json")]],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run only these benchmarks")
    ap.add_argument("--list", action="store_true", help="print the commands and exit")
    args = ap.parse_args()
    names = args.only or list(BENCHMARKS)
    failed = []
    for name in names:
        for argv in BENCHMARKS[name]:
            cmd = [sys.executable, str(HERE / argv[0]), *argv[1:]]
            shown = "python benchmarks/" + " ".join(argv).replace(str(HERE) + "/", "benchmarks/")
            if args.list:
                print(shown)
                continue
            if "--cold" in argv and os.geteuid() != 0:
                print(f"== {shown}\n   skipped: --cold drops the page cache, which needs root")
                continue
            print(f"== {shown}  (load {os.getloadavg()[0]:.1f})", flush=True)
            t = time.perf_counter()
            rc = subprocess.call(cmd, cwd=HERE.parent)
            print(f"   exit {rc} after {time.perf_counter() - t:.0f} s", flush=True)
            if rc:
                failed.append(shown)
    if failed:
        print("failed:\n  " + "\n  ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
