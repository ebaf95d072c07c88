"""The crossed split of an image folder vs plain images: extraction throughput and peak memory (CPU).

A folder of generated images (``--size`` px JPEGs, 10 classes: a random shape of a class-dependent kind
and hue on a random two-colour gradient with noise; the shape's exact mask as a PNG) is written to a
temporary directory. ``probekit.datasets.Counterfactuals`` builds its splits (masks checked and every
image decoded once in the constructor; ``fill="auto"``: OpenCV inpainting when installed), with a
``torchvision`` transform resizing to ``--input`` px. A randomly initialised timm ResNet-18's
``layer1..layer4`` (avg-pooled, float32) are extracted with ``probekit.extract`` into a temporary store:

- ``stress``: ``--n`` foregrounds, each on the same ``--backgrounds`` backgrounds (``--n`` x B rows:
  composite of a cached foreground and mask onto a cached, filled, resized background + transform);
- ``plain``: the same number of rows of original images (the ``test`` split: the ``--n``
  foregrounds' own images, cycled B times, so every row decodes its JPEG + transform).

Throughput is rows per second of the whole ``extract`` call (after one untimed warm-up call); the
headline is the ratio stress / plain (target >= 0.8). The data side alone (reading every item without a model) is timed too.
Methods alternate for ``--repeats`` rounds; medians are reported.

Peak memory: for each folder size in ``--rss-sizes``, a fresh subprocess (this script with ``--child``)
generates nothing, builds the counterfactuals of a folder of that many images and extracts the stress
split of its first ``--rss-n`` foregrounds (the same rows at every folder size) and reports VmHWM of
/proc/self/status, so a flat figure shows that memory does not grow with the folder.

    python benchmarks/bench_counterfactual.py [--n 1000] [--backgrounds 8] [--folder 1000]
        [--rss-sizes 1000,4000] [--rss-n 100] [--size 256] [--input 224] [--batch 64] [--repeats 1]
        [--threads 2] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
from PIL import Image, ImageDraw

RESULTS = Path(__file__).parent / "results"
LAYERS = ["layer1", "layer2", "layer3", "layer4"]
N_CLASSES = 10


def vmhwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_folder(root: Path, n: int, size: int, seed: int = 0) -> tuple[Path, Path]:
    """``n`` JPEGs in ``root/img/c<k>/`` and their masks (PNG) in ``root/masks/c<k>/``."""
    rng = np.random.default_rng(seed)
    img_dir, mask_dir = root / "img", root / "masks"
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for c in range(N_CLASSES):
        (img_dir / f"c{c}").mkdir(parents=True, exist_ok=True)
        (mask_dir / f"c{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        c = i % N_CLASSES
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = np.clip(np.cos(rng.uniform(0, np.pi)) * xx + np.sin(rng.uniform(0, np.pi)) * yy, 0, 1)[..., None]
        bg = (1 - t) * a + t * b + rng.normal(0, 12, (size, size, 3))
        im = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
        mask = Image.new("L", (size, size), 0)
        r = int(rng.integers(size // 8, size // 3))
        cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
        box = [cx - r, cy - r, cx + r, cy + r]
        hue = (c * 36 + int(rng.integers(-10, 10))) % 360
        colour = f"hsv({hue},90%,{int(rng.integers(60, 100))}%)"
        for draw, fill in ((ImageDraw.Draw(im), colour), (ImageDraw.Draw(mask), 255)):
            if c % 3 == 0:
                draw.ellipse(box, fill=fill)
            elif c % 3 == 1:
                draw.rectangle(box, fill=fill)
            else:
                draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        im.save(img_dir / f"c{c}" / f"{i:06d}.jpg", quality=90)
        mask.save(mask_dir / f"c{c}" / f"{i:06d}.png")
    return img_dir, mask_dir


def build(img_dir: Path, mask_dir: Path, args):
    from torchvision import transforms as T

    from probekit.datasets import Counterfactuals

    tf = T.Compose([T.Resize((args.input, args.input)), T.ToTensor()])
    return Counterfactuals(img_dir, masks=mask_dir, test_fraction=1.0, n_backgrounds=args.backgrounds,
                           seed=0, transform=tf)


def subsets(cf, n: int):
    from torch.utils.data import Subset

    b = len(cf.backgrounds)
    test = cf.split("test")
    stress = cf.split("crossed")
    # the plain rows are the stress foregrounds' own images, cycled to as many rows as the stress split
    # (so fixed per-call costs weigh the same); n > 8 defeats the folder's 8-image cache, so every plain
    # row decodes its JPEG
    fg = cf.crossed_indices[:n]
    pos = {int(i): k for k, i in enumerate(cf.test_indices.tolist())}
    rows = min(len(stress), len(fg) * b)
    plain = Subset(test, [pos[int(fg[r % len(fg)])] for r in range(rows)])
    return plain, Subset(stress, list(range(rows)))


def extract_once(model, data, split: str, args) -> float:
    import probekit as pk

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        pk.extract(model, data, layers=LAYERS, out=Path(tmp) / "acts.h5", split=split, batch_size=args.batch,
                   progress=False)
        return time.perf_counter() - t0


def read_once(data) -> float:
    t0 = time.perf_counter()
    for k in range(len(data)):
        data[k]
    return time.perf_counter() - t0


def model_of():
    import timm
    import torch

    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=0).eval()


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    img_dir, mask_dir = Path(args.child) / "img", Path(args.child) / "masks"
    t0 = time.perf_counter()
    cf = build(img_dir, mask_dir, args)
    t_build = time.perf_counter() - t0
    _, stress = subsets(cf, args.rss_n)
    extract_once(model_of(), stress, "stress", args)
    print(json.dumps({"folder_images": len(cf.folder), "rows": len(stress), "build_s": t_build,
                      "peak_rss_mib": vmhwm_mib()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="foregrounds (= plain images) extracted")
    ap.add_argument("--backgrounds", type=int, default=8)
    ap.add_argument("--folder", type=int, default=0, help="images in the throughput folder (default: n + 2B)")
    ap.add_argument("--rss-sizes", default="1000,4000", help="folder sizes of the peak-memory runs ('' skips)")
    ap.add_argument("--rss-n", type=int, default=100, help="foregrounds extracted in each peak-memory run")
    ap.add_argument("--size", type=int, default=256, help="side of the generated JPEGs")
    ap.add_argument("--input", type=int, default=224, help="side the transform resizes to")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    import torch
    from torch.utils.data import Subset

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_cf_"))
    result: dict = {
        "command": "python benchmarks/bench_counterfactual.py " + " ".join(sys.argv[1:]),
        "config": {k: v for k, v in vars(args).items() if k not in ("child", "out")},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "loadavg_start": os.getloadavg()},
    }
    try:
        n_folder = args.folder or args.n + 2 * args.backgrounds
        t0 = time.perf_counter()
        img_dir, mask_dir = make_folder(tmp / "main", n_folder, args.size)
        result["generate_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        cf = build(img_dir, mask_dir, args)
        result["build_s"] = time.perf_counter() - t0
        result["fill"] = cf.fill
        plain, stress = subsets(cf, args.n)
        result["rows"] = {"plain": len(plain), "stress": len(stress)}
        print(f"folder {n_folder} images, plain {len(plain)} rows, stress {len(stress)} rows, fill {cf.fill}, "
              f"built in {result['build_s']:.1f} s", flush=True)
        reads = {"plain": [], "stress": []}
        for _ in range(args.repeats):
            for name, data in (("plain", plain), ("stress", stress)):
                reads[name].append(read_once(data))
        model = model_of()
        extract_once(model, Subset(plain, range(min(len(plain), 2 * args.batch))), "warmup", args)
        times = {"plain": [], "stress": []}
        for r in range(args.repeats):
            for name, data in (("plain", plain), ("stress", stress)):
                times[name].append(extract_once(model, data, name, args))
                print(f"repeat {r}: {name} {len(data)} rows in {times[name][-1]:.1f} s "
                      f"({len(data) / times[name][-1]:.1f} rows/s)", flush=True)
        rate = {k: len(d) / statistics.median(times[k]) for k, d in (("plain", plain), ("stress", stress))}
        read_rate = {k: len(d) / statistics.median(reads[k]) for k, d in (("plain", plain), ("stress", stress))}
        result["extract_s"] = times
        result["extract_rows_per_s"] = rate
        result["read_s"] = reads
        result["read_rows_per_s"] = read_rate
        result["throughput_ratio_stress_over_plain"] = rate["stress"] / rate["plain"]
        print(f"extract rows/s: plain {rate['plain']:.1f}, stress {rate['stress']:.1f}, ratio "
              f"{result['throughput_ratio_stress_over_plain']:.3f}; data only rows/s: plain "
              f"{read_rate['plain']:.0f}, stress {read_rate['stress']:.0f}", flush=True)
        del cf, plain, stress, model
        shutil.rmtree(tmp / "main", ignore_errors=True)

        peaks = []
        for size in [int(s) for s in args.rss_sizes.split(",") if s.strip()]:
            folder = tmp / f"rss{size}"
            make_folder(folder, size, args.size, seed=1)
            cmd = [sys.executable, __file__, "--child", str(folder), "--rss-n", str(args.rss_n),
                   "--backgrounds", str(args.backgrounds), "--input", str(args.input), "--batch", str(args.batch),
                   "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            peaks.append(json.loads(out.strip().splitlines()[-1]))
            print(f"peak RSS, folder of {size} images, {peaks[-1]['rows']} stress rows: "
                  f"{peaks[-1]['peak_rss_mib']:.0f} MiB (built in {peaks[-1]['build_s']:.1f} s)", flush=True)
            shutil.rmtree(folder, ignore_errors=True)
        result["peak_rss"] = peaks
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["machine"]["loadavg_end"] = os.getloadavg()
    out = Path(args.out) if args.out else RESULTS / "bench_counterfactual.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
