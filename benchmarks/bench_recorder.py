"""Overhead of probekit.Recorder on the example training loop (examples/train_bgdigits.py).

Runs the example with the recorder off and with every=N for several N, side by side in one process,
``--repeats`` times each in interleaved order, and reports the median wall time, the overhead ratio and
the cost per record. Usage::

    python benchmarks/bench_recorder.py --repeats 5 --every 50 20 10 --out benchmarks/results/bench_recorder.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _checkout import use_checkout

ROOT = Path(__file__).resolve().parents[1]


def _example():
    spec = importlib.util.spec_from_file_location("train_bgdigits", ROOT / "examples" / "train_bgdigits.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--every", type=int, nargs="+", default=[50, 20, 10])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--probe-size", type=int, default=300)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--src", default=None, help="import probekit from this checkout (before/after runs)")
    a = p.parse_args()
    if a.src:
        use_checkout(a.src)
    if a.threads:
        torch.set_num_threads(a.threads)
    ex = _example()
    configs = [0, *a.every]  # 0: recorder off
    times: dict[int, list[float]] = {c: [] for c in configs}
    records: dict[int, int] = {}
    with tempfile.TemporaryDirectory() as d:
        ex.main(["--out", f"{d}/warm.h5", "--epochs", "1", "--every", "5"])  # warm-up (imports, caches)
        for r in range(a.repeats):
            for c in configs:
                out = Path(d) / f"run_{c}_{r}.h5"
                buf = io.StringIO()
                t0 = time.perf_counter()
                with contextlib.redirect_stdout(buf):
                    ex.main(["--out", str(out), "--epochs", str(a.epochs), "--every", str(c),
                             "--probe-size", str(a.probe_size)])
                times[c].append(time.perf_counter() - t0)
                if c:
                    import probekit as pk

                    with pk.open_store(out) as s:
                        records[c] = len(s.steps("model"))
                    out.unlink()
    off = statistics.median(times[0])
    rows = []
    for c in configs:
        med = statistics.median(times[c])
        n = records.get(c, 0)
        rows.append({"every": c or None, "median_s": round(med, 3), "ratio_vs_off": round(med / off, 3),
                     "records": n, "ms_per_record": round(1000 * (med - off) / n, 1) if n else None,
                     "all_s": [round(t, 3) for t in times[c]]})
        label = "off" if not c else f"every={c}"
        print(f"{label:>9}: median {med:6.2f} s  x{med / off:5.2f}  records {n:3d}"
              + (f"  {1000 * (med - off) / n:6.1f} ms/record" if n else ""))
    result = {"epochs": a.epochs, "probe_size_per_split": a.probe_size, "splits": 4, "repeats": a.repeats,
              "threads": torch.get_num_threads(), "rows": rows}
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
