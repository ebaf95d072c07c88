"""Where one ``probekit.extract`` call spends its time: cProfile of a single call, after a warm-up call.

    python benchmarks/profile_extract.py                       # ResNet-18, layer1..layer4 avg-pooled, 256 images
    python benchmarks/profile_extract.py --maps --n 128        # the 1x1-conv stand-in of bench_feature_maps, pool="none"
    python benchmarks/profile_extract.py --layer1-map          # ResNet-18 layer1 full map (bench_extract --maps)

Prints the total, the model's forward, and the probekit-side entries (weights hash, commits, store
declarations, data collation) by cumulative time. Random weights and inputs; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

import probekit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--maps", action="store_true", help="full feature maps of a write-bound stand-in model")
    ap.add_argument("--layer1-map", action="store_true", help="ResNet-18's layer1 as a full map (pool='none')")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--top", type=int, default=20)
    a = ap.parse_args()
    torch.manual_seed(0)
    if a.maps:
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 1), torch.nn.ReLU()).eval()
        layers, pool = ["1"], "none"
    else:
        import timm

        model = timm.create_model("resnet18", pretrained=False).eval()
        layers, pool = (["layer1"], "none") if a.layer1_map else (["layer1", "layer2", "layer3", "layer4"], "avg")
    data = TensorDataset(torch.randn(a.n, 3, a.size, a.size))
    out = Path(tempfile.mkdtemp(prefix="pk-prof-")) / "acts.h5"

    def call() -> None:
        probekit.extract(model, data, layers=layers, pool=pool, out=out, batch_size=a.batch, progress=False,
                         mode="overwrite")

    call()  # warm-up: imports, allocator, thread pools
    prof = cProfile.Profile()
    prof.enable()
    call()
    prof.disable()
    out.unlink()
    out.parent.rmdir()
    stats = pstats.Stats(prof).sort_stats("cumulative")
    stats.print_stats(r"probekit|extractors|_hashlib|h5py/_hl/(files|dataset)|forward_features|container", a.top)


if __name__ == "__main__":
    main()
