"""Forward passes of timm nets with their weights as they come and channels-last, side by side (--memory-format).

For each net: one batch at the given size, random init, float32, ``inference_mode``; contiguous and
channels-last alternated (contiguous, channels-last, contiguous, channels-last, ...), the median of
``--repeats`` timings each after one warm-up; the largest relative difference of the outputs. The audit
converts only the weights (``probekit._layout``); so does this script.

    python benchmarks/bench_channels_last.py            # -> benchmarks/results/bench_channels_last.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
NETS = [("resnet50", 224, 32), ("resnet18", 64, 64), ("efficientnet_b0", 224, 32), ("mobilenetv3_small_100", 224, 32),
        ("convnext_tiny", 224, 16), ("test_resnet", 32, 64), ("vit_tiny_patch16_224", 224, 32)]


def _time(net: torch.nn.Module, x: torch.Tensor) -> float:
    t = time.perf_counter()
    with torch.inference_mode():
        net(x)
    return time.perf_counter() - t


def main() -> None:
    import timm

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_channels_last.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, size, batch in NETS:
        torch.manual_seed(0)
        net = timm.create_model(name, pretrained=False).eval()
        cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
        x = torch.randn(batch, 3, size, size)
        with torch.inference_mode():
            a, b = net(x), cl(x)
        rel = float((a - b).norm() / a.norm())
        times: dict[str, list[float]] = {"contiguous": [], "channels_last": []}
        _time(net, x), _time(cl, x)  # warm-up
        for _ in range(args.repeats):
            times["contiguous"].append(_time(net, x))
            times["channels_last"].append(_time(cl, x))
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"net": name, "size": size, "batch": batch, "median_s": med, "speedup": med["contiguous"] / med["channels_last"],
               "output_rel_error": rel}
        rows.append(row)
        print(f"{name:22s} {size:3d} px x {batch:2d}: contiguous {med['contiguous']:.3f} s, channels-last "
              f"{med['channels_last']:.3f} s, {row['speedup']:.2f}x, outputs within {rel:.1e}", flush=True)
    Path(args.out).write_text(json.dumps({"argv": sys.argv[1:], "threads": args.threads, "torch": torch.__version__,
                                          "load": os.getloadavg(), "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
