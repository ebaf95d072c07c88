"""What the weights fingerprint costs a short pooled extraction: ``probekit.extract`` as shipped, with the
SHA-256 skipped, and with it on a background thread, beside the bare forward, alternated.

    python benchmarks/ab_weights_hash.py [--n 256] [--repeats 9]

ResNet-18 (timm, random init), 3x112x112, ``layer1..layer4`` avg-pooled, batch 32. The two variants
patch ``probekit.extractors._pipeline.weights_sha256`` for the call (the thread variant joins the hash
before the timer stops); they are measurements, not modes probekit offers. Prints medians and ratios
to the bare forward.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import timm
import torch
from torch.utils.data import TensorDataset

import probekit
from probekit.extractors import _pipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=9)
    a = ap.parse_args()
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False).eval()
    x = torch.randn(a.n, 3, 112, 112)
    data = TensorDataset(x)
    out = Path(tempfile.mkdtemp(prefix="pk-hash-")) / "a.h5"
    real = _pipeline.weights_sha256

    def run(kind: str) -> float:
        box: dict[str, threading.Thread] = {}
        if kind == "no_hash":
            _pipeline.weights_sha256 = lambda m: ""
        elif kind == "hash_thread":
            def start(m: torch.nn.Module) -> str:
                box["t"] = threading.Thread(target=real, args=(m,))
                box["t"].start()
                return ""
            _pipeline.weights_sha256 = start
        t0 = time.perf_counter()
        try:
            probekit.extract(model, data, layers=["layer1", "layer2", "layer3", "layer4"], out=out,
                             batch_size=32, mode="overwrite", progress=False)
            if "t" in box:
                box["t"].join()
        finally:
            _pipeline.weights_sha256 = real
        return time.perf_counter() - t0

    def bare(_: str) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            for s in range(0, a.n, 32):
                model(x[s:s + 32])
        return time.perf_counter() - t0

    methods = {"bare": bare, "probekit": run, "no_hash": run, "hash_thread": run}
    run("probekit")
    bare("")
    times: dict[str, list[float]] = {k: [] for k in methods}
    for r in range(a.repeats):
        for k in (list(methods) if r % 2 == 0 else list(methods)[::-1]):
            times[k].append(methods[k](k))
    out.unlink(missing_ok=True)
    out.parent.rmdir()
    b = statistics.median(times["bare"])
    for k, v in times.items():
        print(f"{k:<12} median {statistics.median(v):.3f} s  vs bare {b / statistics.median(v):.3f}")
    print(f"load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
