"""Extraction throughput vs the bare forward pass (CPU), measured side by side in one process.

Methods, run in alternation for several repeats on the same model and data:

Wall-clock throughput is the headline; process CPU time is also recorded (with ``--threads 1`` it is
the least sensitive to other load on the machine).

- ``bare``: ``model(x)`` under ``no_grad`` on pre-made batches (the floor; no data loading, no hooks).
- ``bare_loader``: ``model(x)`` on batches from a DataLoader over the same dataset probekit reads.
- ``probekit``: ``probekit.extract`` of 4 pooled layers (avg) into a new HDF5 store; the whole call,
  including opening the file, hashing the weights and reading the dataset.
- ``probekit_thread``: the same with ``writer_thread=True`` (HDF5 writes on a background thread).
- ``diy_hooks_h5py``: forward hooks pooling in the hook + per-batch h5py writes in the loop (what one
  writes by hand).
- ``tv_fx_h5py``: torchvision ``create_feature_extractor`` + pooling + per-batch h5py writes.

The machine may be shared: the script records the load average, and reports for each method the
median and the minimum (best) of the repeats; the minimum is the least disturbed by other processes.
Prints a table and writes JSON to benchmarks/results/bench_extract.json.

    python benchmarks/bench_extract.py [--n 256] [--batch 32] [--size 112] [--repeats 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import timm
import torch
from torch.utils.data import DataLoader, Dataset

import probekit

LAYERS = ["layer1", "layer2", "layer3", "layer4"]


class Images(Dataset):
    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], int(i % 10)


def run_bare(model, batches, **_):
    with torch.no_grad():
        for x in batches:
            model(x)


def run_bare_loader(model, data, batch, **_):
    with torch.no_grad():
        for x, _y in DataLoader(data, batch_size=batch, shuffle=False):
            model(x)


def run_probekit(model, data, batch, out, **_):
    probekit.extract(model, data, layers=LAYERS, out=out, pool="avg", batch_size=batch, mode="overwrite",
                     progress=False)


def run_probekit_thread(model, data, batch, out, **_):
    probekit.extract(model, data, layers=LAYERS, out=out, pool="avg", batch_size=batch, mode="overwrite",
                     progress=False, writer_thread=True)


def run_diy(model, data, batch, out, **_):
    feats: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(
        lambda m, i, o, n=n: feats.__setitem__(n, o.detach().mean(dim=(2, 3)))) for n in LAYERS]
    try:
        with h5py.File(out, "w") as f, torch.no_grad():
            n = len(data)
            dsets = None
            row = 0
            for x, y in DataLoader(data, batch_size=batch, shuffle=False):
                model(x)
                if dsets is None:
                    dsets = {k: f.create_dataset(k, (n, v.shape[1]), "f4") for k, v in feats.items()}
                    labels = f.create_dataset("label", (n,), "i8")
                b = len(x)
                for k, v in feats.items():
                    dsets[k][row:row + b] = v.numpy()
                labels[row:row + b] = y.numpy()
                row += b
    finally:
        for h in handles:
            h.remove()


def run_fx(model, data, batch, out, fx, **_):
    with h5py.File(out, "w") as f, torch.no_grad():
        n = len(data)
        dsets = None
        row = 0
        for x, y in DataLoader(data, batch_size=batch, shuffle=False):
            feats = {k: v.mean(dim=(2, 3)) for k, v in fx(x).items()}
            if dsets is None:
                dsets = {k: f.create_dataset(k, (n, v.shape[1]), "f4") for k, v in feats.items()}
                labels = f.create_dataset("label", (n,), "i8")
            b = len(x)
            for k, v in feats.items():
                dsets[k][row:row + b] = v.numpy()
            labels[row:row + b] = y.numpy()
            row += b


METHODS = {
    "bare": run_bare,
    "bare_loader": run_bare_loader,
    "probekit": run_probekit,
    "probekit_thread": run_probekit_thread,
    "diy_hooks_h5py": run_diy,
    "tv_fx_h5py": run_fx,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_extract.json"))
    args = ap.parse_args()

    from torchvision.models.feature_extraction import create_feature_extractor

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False).eval()
    x = torch.randn(args.n, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    data = Images(x)
    batches = [x[i:i + args.batch] for i in range(0, args.n, args.batch)]
    fx = create_feature_extractor(model, return_nodes={n: n for n in LAYERS}).eval()
    tmp = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    kw = dict(model=model, data=data, batch=args.batch, batches=batches, fx=fx)

    run_bare(model, batches[:2])  # warm-up
    load_start = os.getloadavg()
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    cpu: dict[str, list[float]] = {m: [] for m in METHODS}
    for r in range(args.repeats):
        for name, fn in METHODS.items():
            out = tmp / f"{name}.h5"
            c0, t0 = time.process_time(), time.perf_counter()
            fn(out=out, **kw)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{m} {t[-1]:.2f}s" for m, t in times.items()),
              flush=True)

    load_end = os.getloadavg()
    med = {m: statistics.median(t) for m, t in times.items()}
    best = {m: min(t) for m, t in times.items()}
    thr = {m: args.n / s for m, s in med.items()}
    ratio = {m: thr[m] / thr["bare"] for m in METHODS}
    ratio_best = {m: best["bare"] / best[m] for m in METHODS}
    cpu_med = {m: statistics.median(t) for m, t in cpu.items()}
    ratio_cpu = {m: cpu_med["bare"] / cpu_med[m] for m in METHODS}
    print(f"\nResNet-18 (timm, random init), CPU, {args.n} images 3x{args.size}x{args.size}, batch {args.batch}, "
          f"4 layers avg-pooled, torch threads {torch.get_num_threads()}; {args.repeats} repeats; "
          f"load average {load_start[0]:.1f} -> {load_end[0]:.1f}")
    print(f"{'method':<16} {'median s':>9} {'img/s':>8} {'vs bare':>8} {'best s':>8} {'vs bare':>8} "
          f"{'cpu s':>8} {'vs bare':>8}")
    for m in METHODS:
        print(f"{m:<16} {med[m]:>9.3f} {thr[m]:>8.1f} {ratio[m]:>8.3f} {best[m]:>8.3f} {ratio_best[m]:>8.3f} "
              f"{cpu_med[m]:>8.3f} {ratio_cpu[m]:>8.3f}")
    result = {
        "benchmark": "bench_extract", "model": "timm:resnet18 (random init)", "device": "cpu",
        "n": args.n, "batch": args.batch, "input": [3, args.size, args.size], "layers": LAYERS, "pool": "avg",
        "repeats": args.repeats, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "times_s": times, "median_s": med, "images_per_s": thr, "ratio_vs_bare": ratio,
        "best_s": best, "cpu_s": cpu, "cpu_median_s": cpu_med, "ratio_vs_bare_cpu": ratio_cpu, "ratio_vs_bare_best": ratio_best, "loadavg_start": load_start, "loadavg_end": load_end,
        "probekit_vs_bare_loader": thr["probekit"] / thr["bare_loader"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
