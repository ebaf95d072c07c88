"""Peak memory of extraction does not grow with the number of samples.

Runs ``probekit.extract`` in fresh subprocesses on N and 10N samples of a dataset that makes each item
from its index (so the data itself takes no memory), and compares the peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) of the two. Target: the difference is < 64 MB.

    python benchmarks/bench_memory.py [--n 256] [--factor 10] [--size 64] [--batch 32]

Writes JSON to benchmarks/results/bench_memory.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import timm, torch
from torch.utils.data import Dataset
import probekit

n, size, batch, out, writer_thread = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"


class Generated(Dataset):
    # each item is made from its index: the dataset holds nothing
    def __len__(self):
        return n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return torch.randn(3, size, size, generator=g), i % 10


torch.manual_seed(0)
model = timm.create_model("resnet18", pretrained=False).eval()
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
probekit.extract(model, Generated(), layers=["layer1", "layer2", "layer3", "layer4", "fc"], out=out,
                 pool={"layer1": "avg", "layer2": "avg", "layer3": "avg", "layer4": "flatten", "fc": "none"},
                 batch_size=batch, progress=False, writer_thread=writer_thread)
secs = time.perf_counter() - t0
rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with probekit.open_store(out) as s:
    rows = s.n_rows("data", "model")
    row_bytes = sum(s.acts("model", "data", l).row_nbytes for l in s.layers("model", "data"))
print(json.dumps({"n": n, "peak_rss_mb": rss1 / 1024, "rss_before_extract_mb": rss0 / 1024, "seconds": secs,
                  "rows": rows, "store_mb": rows * row_bytes / 2**20}))
"""


def run(n: int, size: int, batch: int, out: Path, writer_thread: bool) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(n), str(size), str(batch), str(out), "1" if writer_thread else "0"],
        capture_output=True, text=True, check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--factor", type=int, default=10)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_memory.json"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_memory_"))
    try:
        results = measure(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the stores are only measured, never kept
    result = {"benchmark": "bench_memory", "model": "timm:resnet18 (random init)", "input": [3, args.size, args.size],
              "batch": args.batch, "layers": "layer1-3 avg, layer4 flatten, fc none", "runs": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


def measure(args: argparse.Namespace, tmp: Path) -> list[dict]:
    """Peak RSS of the small and the large extraction, without and with the writer thread."""
    results = []
    for writer_thread in (False, True):
        small = run(args.n, args.size, args.batch, tmp / f"small{int(writer_thread)}.h5", writer_thread)
        large = run(args.n * args.factor, args.size, args.batch, tmp / f"large{int(writer_thread)}.h5", writer_thread)
        diff = large["peak_rss_mb"] - small["peak_rss_mb"]
        results.append({"writer_thread": writer_thread, "small": small, "large": large, "peak_rss_diff_mb": diff,
                        "pass_lt_64mb": diff < 64})
        print(f"writer_thread={writer_thread}: N={small['n']} peak RSS {small['peak_rss_mb']:.1f} MB "
              f"(store {small['store_mb']:.1f} MB); N={large['n']} peak RSS {large['peak_rss_mb']:.1f} MB "
              f"(store {large['store_mb']:.1f} MB); difference {diff:+.1f} MB (target < 64 MB)", flush=True)
    return results


if __name__ == "__main__":
    main()
