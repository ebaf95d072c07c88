"""Extraction throughput and memory vs the bare forward pass and peers (CPU), side by side in one script.

Methods, run in alternation for several repeats on the same model object and the same data:

- ``bare``: ``model(x)`` under ``no_grad`` on pre-made batches (the floor; no data loading, no hooks).
- ``bare_loader``: ``model(x)`` on batches from a DataLoader over the same dataset probekit reads.
- ``probekit``: ``probekit.extract`` of the layers into a new HDF5 store; the whole call, including
  opening the file, hashing the weights and reading the dataset.
- ``probekit_thread``: the same with ``writer_thread=True`` (HDF5 writes on a background thread).
- ``diy_hooks_h5py``: forward hooks pooling in the hook + per-batch h5py writes in the loop (what one
  writes by hand).
- ``tv_fx_h5py``: torchvision ``create_feature_extractor`` + pooling + per-batch h5py writes.
- ``thingsvision``: ``thingsvision.get_extractor_from_model`` on the same model, ``extract_features``
  over a DataLoader (features kept in memory, the reduction passed as its ``flatten_fn``), then
  ``thingsvision.utils.storing.save_features(..., file_format="hdf5")`` per layer (its README's path).
- ``thingsvision_stream``: the same extractor with ``extract_features(output_dir=...,
  save_in_one_file=True)`` (its documented path for features that do not fit in memory: .npy chunks,
  then one .npy per layer).

The thingsvision methods run only where ``import thingsvision`` succeeds (it needs its own
environment; see docs/BENCHMARKS.md); otherwise the script prints why they are skipped.

Configurations (equal work for every method: same layers, same reduction, float32 written):

- ``--model resnet18`` (timm, random init): ``layer1..layer4`` avg-pooled over H, W;
  ``--maps``: the full ``layer1`` map (64 x H/4 x W/4), ``pool="none"``.
- ``--model vit`` (timm ``vit_tiny_patch16_224`` at ``--size``, random init): ``blocks.3``,
  ``blocks.7``, ``blocks.11`` with ``--vit-pool tokens_mean`` (mean of the patch tokens, class token
  skipped) or ``cls``; ``--maps``: the full ``blocks.3`` token sequence (T x 192), ``pool="none"``.

Wall-clock throughput (median of the repeats) is the headline; the minimum (best) and process CPU time
are also recorded. Peak RSS is measured per method in a fresh subprocess (the script re-invokes itself
with ``--only METHOD --rss``: imports for that method, model and data built, one call, then the peak
resident set size, VmHWM of /proc/self/status; ``ru_maxrss`` would inherit the parent's peak through
fork + exec on Linux); peak GPU memory is recorded only on CUDA. The machine
may be shared: the script records the load average.

    python benchmarks/bench_extract.py [--model resnet18|vit] [--maps] [--n 256] [--batch 32]
        [--size 112] [--repeats 10] [--threads 0] [--no-rss] [--out PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars for any method (probekit runs progress=False)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # thingsvision imports tensorflow

import h5py
import timm
import torch
import torchvision
from torch.utils.data import DataLoader, Dataset

RESULTS = Path(__file__).parent / "results"
ALL_METHODS = ["bare", "bare_loader", "probekit", "probekit_thread", "diy_hooks_h5py", "tv_fx_h5py",
               "thingsvision", "thingsvision_stream"]


class Images(Dataset):
    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], int(i % 10)


# --- the reductions, written independently of probekit (the DIY baselines and thingsvision use them)

def reduce(t: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "avg":  # channels-first map (N, C, H, W)
        return t.mean(dim=(2, 3))
    if mode == "tokens_mean":  # (N, T, D), one class token first
        return t[:, 1:].mean(dim=1)
    if mode == "cls":
        return t[:, 0].clone()
    if mode == "none":
        return t.clone()
    raise ValueError(mode)


def config(args) -> dict:
    if args.model == "resnet18":
        model = timm.create_model("resnet18", pretrained=False)
        layers, pool = (["layer1"], "none") if args.maps else (["layer1", "layer2", "layer3", "layer4"], "avg")
        desc = f"ResNet-18 (timm, random init), input 3x{args.size}x{args.size}"
    elif args.model == "vit":
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=args.size)
        layers, pool = (["blocks.3"], "none") if args.maps else (["blocks.3", "blocks.7", "blocks.11"], args.vit_pool)
        desc = f"ViT-Tiny/16 (timm vit_tiny_patch16_224, img_size={args.size}, random init)"
    else:
        raise SystemExit(f"unknown --model {args.model!r}; use resnet18 or vit")
    return {"model": model.eval(), "layers": layers, "pool": pool, "desc": desc}


# --- methods

def run_bare(model, batches, device, **_):
    with torch.no_grad():
        for x in batches:
            model(x.to(device))


def run_bare_loader(model, data, batch, device, **_):
    with torch.no_grad():
        for x, _y in DataLoader(data, batch_size=batch, shuffle=False):
            model(x.to(device))


def run_probekit(model, data, batch, out, layers, pool, device, **_):
    import probekit

    probekit.extract(model, data, layers=layers, out=out, pool=pool, batch_size=batch, mode="overwrite",
                     progress=False, device=device)


def run_probekit_thread(model, data, batch, out, layers, pool, device, **_):
    import probekit

    probekit.extract(model, data, layers=layers, out=out, pool=pool, batch_size=batch, mode="overwrite",
                     progress=False, writer_thread=True, device=device)


def _write_loop(f, n, feats, y, row, dsets):
    if not dsets:
        for k, v in feats.items():
            dsets[k] = f.create_dataset(k, (n, *v.shape[1:]), "f4")
        dsets["label"] = f.create_dataset("label", (n,), "i8")
    b = len(y)
    for k, v in feats.items():
        dsets[k][row:row + b] = v.cpu().numpy()
    dsets["label"][row:row + b] = y.numpy()
    return row + b


def run_diy(model, data, batch, out, layers, pool, device, **_):
    feats: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(
        lambda m, i, o, n=n: feats.__setitem__(n, reduce(o.detach(), pool))) for n in layers]
    try:
        with h5py.File(out, "w") as f, torch.no_grad():
            dsets: dict = {}
            row = 0
            for x, y in DataLoader(data, batch_size=batch, shuffle=False):
                model(x.to(device))
                row = _write_loop(f, len(data), feats, y, row, dsets)
    finally:
        for h in handles:
            h.remove()


def run_fx(model, data, batch, out, fx, pool, device, **_):
    with h5py.File(out, "w") as f, torch.no_grad():
        dsets: dict = {}
        row = 0
        for x, y in DataLoader(data, batch_size=batch, shuffle=False):
            feats = {k: reduce(v, pool) for k, v in fx(x.to(device)).items()}
            row = _write_loop(f, len(data), feats, y, row, dsets)


def _tv_extractor(model, pool, device):
    from thingsvision import get_extractor_from_model

    # thingsvision assigns flatten_fn as a class attribute, so a plain function would receive the
    # extractor as its first argument; staticmethod gives it the activation only.
    flatten = None if pool == "none" else staticmethod(lambda act: reduce(act, pool))
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Using device: cpu"
        return get_extractor_from_model(model=model, device=device, backend="pt", flatten_fn=flatten)


def run_thingsvision(model, data, batch, out, layers, pool, device, **_):
    from thingsvision.utils.storing import save_features

    ex = _tv_extractor(model, pool, device)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the collate function will be replaced with images only collate"
        feats = ex.extract_features(batches=DataLoader(data, batch_size=batch, shuffle=False),
                                    module_names=layers, flatten_acts=pool != "none", output_type="ndarray")
        for k, v in feats.items():
            save_features(v, out_path=str(Path(out) / k), file_format="hdf5")


def run_thingsvision_stream(model, data, batch, out, layers, pool, device, **_):
    ex = _tv_extractor(model, pool, device)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ex.extract_features(batches=DataLoader(data, batch_size=batch, shuffle=False), module_names=layers,
                            flatten_acts=pool != "none", output_type="ndarray", output_dir=str(out),
                            save_in_one_file=True)


RUNNERS = {
    "bare": run_bare, "bare_loader": run_bare_loader, "probekit": run_probekit,
    "probekit_thread": run_probekit_thread, "diy_hooks_h5py": run_diy, "tv_fx_h5py": run_fx,
    "thingsvision": run_thingsvision, "thingsvision_stream": run_thingsvision_stream,
}
WRITES = {"probekit", "probekit_thread", "diy_hooks_h5py", "tv_fx_h5py", "thingsvision", "thingsvision_stream"}
DIRS = {"thingsvision", "thingsvision_stream"}  # these write a folder of files


def available_methods() -> tuple[list[str], dict[str, str]]:
    skipped = {}
    try:
        import thingsvision  # noqa: F401
    except Exception as e:
        why = f"`import thingsvision` failed: {type(e).__name__}: {e}"
        skipped = {"thingsvision": why, "thingsvision_stream": why}
    return [m for m in ALL_METHODS if m not in skipped], skipped


def out_path(tmp: Path, method: str) -> Path:
    return tmp / method if method in DIRS else tmp / f"{method}.h5"


def clear(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()


def size_mb(p: Path) -> float | None:
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20
    return p.stat().st_size / 2**20 if p.exists() else None


def setup(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = config(args)
    model = cfg["model"].to(args.device)
    x = torch.randn(args.n, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    data = Images(x)
    batches = [x[i:i + args.batch] for i in range(0, args.n, args.batch)]
    kw = dict(model=model, data=data, batch=args.batch, batches=batches, layers=cfg["layers"], pool=cfg["pool"],
              device=args.device, fx=None)
    return cfg, kw


def make_fx(kw) -> None:
    from torchvision.models.feature_extraction import create_feature_extractor

    kw["fx"] = create_feature_extractor(kw["model"], return_nodes={n: n for n in kw["layers"]}).eval()


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB: VmHWM of /proc/self/status where there is one.

    ``getrusage(RUSAGE_SELF).ru_maxrss`` is not used on Linux: the kernel carries the parent's high-water
    mark over the fork + exec that starts the child, so a child of a 1.4 GB parent reports >= 1.4 GB.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_rss(args) -> None:
    """One call of one method in this fresh process; print its peak RSS (and GPU peak on CUDA) as JSON."""
    m = args.only
    if m.startswith("probekit"):
        import probekit  # noqa: F401
    if m.startswith("thingsvision"):
        import thingsvision  # noqa: F401
    _cfg, kw = setup(args)
    if m == "tv_fx_h5py":
        make_fx(kw)
    tmp = Path(tempfile.mkdtemp(prefix="bench_extract_rss_"))
    run_bare(kw["model"], kw["batches"][:1], args.device)  # same warm-up as the timed process
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = peak_rss_mb()
    out = out_path(tmp, m)
    RUNNERS[m](out=out, **kw)
    peak = peak_rss_mb()
    gpu = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    print(json.dumps({"method": m, "peak_rss_mb": peak, "rss_before_call_mb": before, "peak_gpu_mb": gpu,
                      "file_mb": size_mb(out)}))
    shutil.rmtree(tmp, ignore_errors=True)


def measure_rss(args, method: str) -> dict:
    cmd = [sys.executable, __file__, "--only", method, "--rss", "--model", args.model, "--n", str(args.n),
           "--batch", str(args.batch), "--size", str(args.size), "--threads", str(args.threads),
           "--device", args.device, "--vit-pool", args.vit_pool] + (["--maps"] if args.maps else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"method": method, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def default_out(args) -> Path:
    if args.model == "resnet18" and not args.maps:
        return RESULTS / "bench_extract.json"
    return RESULTS / f"bench_extract_{args.model}{'_maps' if args.maps else ''}.json"


def fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18", choices=["resnet18", "vit"])
    ap.add_argument("--maps", action="store_true", help="extract one full feature map (pool='none') instead")
    ap.add_argument("--vit-pool", default="tokens_mean", choices=["tokens_mean", "cls"])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--methods", nargs="*", default=None, help="subset of methods (default: all available)")
    ap.add_argument("--no-rss", action="store_true", help="skip the per-method peak-RSS subprocesses")
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rss", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.only:
        child_rss(args)
        return

    methods, skipped = available_methods()
    if args.methods:
        methods = [m for m in methods if m in args.methods]
    for m, why in skipped.items():
        print(f"skipping {m}: {why}")
    if "probekit" in " ".join(methods):
        import probekit  # noqa: F401  (import before timing)
    cfg, kw = setup(args)
    if "tv_fx_h5py" in methods:
        make_fx(kw)
    tmp = Path(tempfile.mkdtemp(prefix="bench_extract_"))

    run_bare(kw["model"], kw["batches"][:1], args.device)  # warm-up
    for m in methods:  # one untimed call each: first-call costs (lazy imports, allocator) out of the timings
        RUNNERS[m](out=out_path(tmp, m), **kw)
    files = {m: size_mb(out_path(tmp, m)) if m in WRITES else None for m in methods}
    load_start = os.getloadavg()
    times: dict[str, list[float]] = {m: [] for m in methods}
    cpu: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(args.repeats):
        for name in methods:
            out = out_path(tmp, name)
            clear(out)
            c0, t0 = time.process_time(), time.perf_counter()
            RUNNERS[name](out=out, **kw)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{m} {t[-1]:.2f}s" for m, t in times.items()),
              flush=True)
    load_end = os.getloadavg()
    shutil.rmtree(tmp, ignore_errors=True)

    rss = {} if args.no_rss else {m: measure_rss(args, m) for m in methods}
    load_after_rss = os.getloadavg()
    med = {m: statistics.median(t) for m, t in times.items()}
    best = {m: min(t) for m, t in times.items()}
    thr = {m: args.n / s for m, s in med.items()}
    ratio = {m: thr[m] / thr["bare"] for m in methods}
    ratio_best = {m: best["bare"] / best[m] for m in methods}
    cpu_med = {m: statistics.median(t) for m, t in cpu.items()}
    ratio_cpu = {m: cpu_med["bare"] / cpu_med[m] for m in methods}
    peers = [m for m in methods if m not in ("bare", "bare_loader", "probekit", "probekit_thread")]
    vs_best_peer = thr["probekit"] / max(thr[m] for m in peers) if peers and "probekit" in thr else None

    what = "one full map, pool='none'" if args.maps else f"{len(cfg['layers'])} layers pooled '{cfg['pool']}'"
    print(f"\n{cfg['desc']}, {args.device}, {args.n} images, batch {args.batch}, {', '.join(cfg['layers'])} "
          f"({what}), float32, torch threads {torch.get_num_threads()}; {args.repeats} repeats; "
          f"load average {load_start[0]:.1f} -> {load_end[0]:.1f}")
    print(f"{'method':<20} {'median s':>9} {'samples/s':>10} {'vs bare':>8} {'best s':>8} {'vs bare':>8} "
          f"{'cpu s':>8} {'vs bare':>8} {'peak RSS MB':>12} {'call +MB':>9} {'GPU MB':>7} {'file MB':>8}")
    for m in methods:
        r = rss.get(m, {})
        grow = r["peak_rss_mb"] - r["rss_before_call_mb"] if "peak_rss_mb" in r else None
        print(f"{m:<20} {med[m]:>9.3f} {thr[m]:>10.1f} {ratio[m]:>8.3f} {best[m]:>8.3f} {ratio_best[m]:>8.3f} "
              f"{cpu_med[m]:>8.3f} {ratio_cpu[m]:>8.3f} {fmt(r.get('peak_rss_mb'), '12.1f')} {fmt(grow, '9.1f')} "
              f"{fmt(r.get('peak_gpu_mb'), '7.1f')} {fmt(files[m], '8.2f')}")
    if vs_best_peer is not None:
        print(f"probekit vs the fastest peer measured here: {vs_best_peer:.3f}x")
    versions = {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
                "h5py": h5py.__version__, "numpy": __import__("numpy").__version__}
    if "thingsvision" in methods:
        import thingsvision

        versions["thingsvision"] = thingsvision.__version__
    result = {
        "benchmark": "bench_extract", "model": cfg["desc"], "device": args.device, "n": args.n,
        "batch": args.batch, "input": [3, args.size, args.size], "layers": cfg["layers"], "pool": cfg["pool"],
        "dtype_written": "float32", "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine(),
        "versions": versions, "executable": sys.executable, "methods": methods, "skipped": skipped,
        "times_s": times, "median_s": med, "samples_per_s": thr, "ratio_vs_bare": ratio, "best_s": best,
        "ratio_vs_bare_best": ratio_best, "cpu_s": cpu, "cpu_median_s": cpu_med, "ratio_vs_bare_cpu": ratio_cpu,
        "file_mb": files, "rss": rss, "loadavg_start": load_start, "loadavg_end": load_end,
        "loadavg_after_rss": load_after_rss, "probekit_vs_fastest_peer": vs_best_peer,
        "probekit_vs_bare_loader": thr["probekit"] / thr["bare_loader"] if {"probekit", "bare_loader"} <= set(thr)
        else None,
    }
    out = Path(args.out) if args.out else default_out(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
