"""Where `probekit audit` spends its time, at several folder sizes (issues 21 item 5 and 22).

Each configuration runs in a fresh child process (so its peak RSS is its own) on a generated folder of
shapes with masks (probekit/datasets/_shapes.py), with a timm CNN at random initialisation. The child
times the audit's phases by wrapping the functions it calls (model loading, building the splits,
extraction per split, seeded initialisations, the analyses, the mask check), counts the forward passes
per net and split (rows handed to the extraction pipeline and to the mask check's predictions), the
opens of the store ``acts.h5`` (``h5py.File`` given a path; other HDF5 files counted apart, and
``h5py_file_objects`` counts every ``h5py.File`` made, including the wrappers h5py builds around a file
already open, which the first version of this script reported as opens), peak RSS, and then times the **bare forward passes** the audit
needs over the same composited images: every composited image pre-made as a tensor in memory (not
timed), each net run over the rows it needs in the audit's batch size under ``no_grad``. ``bare /
audit`` is the share of the audit's wall time that is forward passes (target >= 0.8x, issue 22).

The audit's wall (``wall_s``) is the first audit of a fresh process: it includes the imports the audit
makes on its way (timm, the report's); ``--warm`` audits the folder a second time in the same process
(another output folder, so nothing is resumed) and reports that wall as ``wall_warm_s`` (imports and
first-call costs paid). ``--pairs N --before DIR`` runs N interleaved pairs, the checkout DIR (e.g. the
code before a change: ``git archive fe1784a | tar -x -C DIR``) then this tree, each in a fresh child, and
prints the ratio per pair and the medians.

Usage::

    python benchmarks/bench_audit_scale.py --images 30 --pairs 3 --before /tmp/before --warm --label spine
    python benchmarks/bench_audit_scale.py --images 100 1000 --label after
    python benchmarks/bench_audit_scale.py --images 120 --model timm:resnet50 --image-size 224 \\
        --foreground auto --label after-resnet50

Writes ``benchmarks/results/bench_audit_scale_<label>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _cpu() -> float:
    """CPU seconds of this process and of its finished children (DataLoader workers): on a shared machine
    less moved by the other work than the wall time."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _split_of(key: str) -> str:
    """The image split a forward-pass count belongs to: ``net/split`` keys, the mask check's on the crossed
    split; ``stress`` (the crossed split's name before it was ``crossed``: the code before a change) as
    ``crossed``."""
    sp = key.split("/")[-1] if "/" in key else "crossed"
    return "crossed" if sp == "stress" else sp


def _child(args: argparse.Namespace) -> dict:
    import importlib

    if args.src:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _checkout import use_checkout

        use_checkout(args.src)
    import h5py
    import torch

    A = importlib.import_module("probekit.audit")  # the module (probekit.audit is also a function)
    E = importlib.import_module("probekit.extraction")
    MA = importlib.import_module("probekit.model_audit")
    M = importlib.import_module("probekit.models")
    from probekit.datasets import _images as I
    from probekit.datasets._shapes import write_image_folder

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-audit-"))
    images, masks = write_image_folder(work / "folder", split="test", background="random", seed=0,
                                       n=args.n, size=args.size)
    phases: dict[str, float] = collections.defaultdict(float)
    passes: dict[str, int] = collections.Counter()
    opens: dict[str, int] = collections.Counter()  # file name -> opens; "(open file)" -> wrappers of open ones

    stack: list[float] = []  # time spent in nested phases, per open phase: each phase is exclusive

    def timed(mod, name, phase, count=None):
        fn = getattr(mod, name)

        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            stack.append(0.0)
            try:
                return fn(*a, **kw)
            finally:
                took = time.perf_counter() - t0
                inner = stack.pop()
                if stack:
                    stack[-1] += took
                key = phase(a, kw) if callable(phase) else phase
                phases[key] += took - inner
                if count is not None:
                    count(a, kw)
        setattr(mod, name, wrapper)

    def count_extract(a, kw):
        models, data = a[0], a[1]
        for nm in models:
            passes[f"{nm}/{kw.get('split')}"] += len(data)

    real_file_init = h5py.File.__init__

    def file_init(self, name, *a, **kw):
        opens[Path(os.fsdecode(name)).name if isinstance(name, (str, bytes, os.PathLike)) else "(open file)"] += 1
        return real_file_init(self, name, *a, **kw)

    h5py.File.__init__ = file_init
    X = importlib.import_module("probekit.extractors")
    # probekit.extraction holds its own reference (the code before the change calls it); the audit
    # after it calls probekit.extractors' at call time: each path goes through one wrapper
    timed(E, "extract_models", lambda a, kw: f"extract {kw.get('split')}", count_extract)
    timed(X, "extract_models", lambda a, kw: f"extract {kw.get('split')}", count_extract)
    timed(M, "load_model", "load model")
    timed(A, "audit", "analyses")
    timed(I.Counterfactuals, "__init__", "build splits")
    R = importlib.import_module("probekit.report")  # the report: the gallery's composites, the HTML and its plots
    for name in ("build_gallery", "deploy_examples"):
        if hasattr(R, name):
            timed(R, name, "report")
    for cls in {o for o in vars(A).values() if isinstance(o, type) and hasattr(o, "to_html")}:
        timed(cls, "to_html", "report")
    if hasattr(MA, "_auto_masks"):  # GrabCut once per image (in workers) before the splits
        timed(MA, "_auto_masks", "grabcut")
    for name in ("_seeded_init", "_mask_sensitivity", "_init_net"):
        if hasattr(MA, name):
            timed(MA, name, name.strip("_").replace("_", " "))
    if hasattr(MA, "_predict"):
        def count_predict(a, kw):
            nets = a[0] if isinstance(a[0], dict) else {"model": a[0]}  # after / before the change
            passes["mask check"] += len(a[1]) * len(nets)
        timed(MA, "_predict", "mask check forward", count_predict)
    kwargs = dict(masks=None if args.foreground == "auto" else masks,
                  foreground="auto" if args.foreground == "auto" else None,
                  out=work / "audit", n_inits=args.inits, progress=False, image_size=args.image_size,
                  batch_size=args.batch_size, n_boot=args.n_boot, n_perm=args.n_perm)
    if args.device != "cpu":
        kwargs["device"] = args.device
    kwargs.update(json.loads(args.extra))
    torch.manual_seed(0)  # the random model: the same weights before and after the change
    t0, c0 = time.perf_counter(), _cpu()
    result = MA.audit_model(args.model, images, **kwargs)
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    counted = dict(opens)
    wall_warm = cpu_warm = None
    if args.warm:  # the same audit again in this process: imports and first calls already paid
        torch.manual_seed(0)
        t0, c0 = time.perf_counter(), _cpu()
        MA.audit_model(args.model, images, **{**kwargs, "out": work / "audit-warm"})
        wall_warm, cpu_warm = time.perf_counter() - t0, _cpu() - c0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rss_children_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    doc = result.data
    m = doc["models"]["model"]
    verdict = {"flagged": m.get("flagged"),
               "flip_rate": (m.get("behaviour") or {}).get("flip_rate", {}).get("value"),
               "accuracy_original": ((m.get("behaviour") or {}).get("accuracy") or {}).get("original", {}).get("value")}
    h5py.File.__init__ = real_file_init

    # the bare forward passes over the same composited images
    loaded = M.load_model(args.model)
    dev = torch.device(MA.resolve_device(args.device) if hasattr(MA, "resolve_device") else args.device)
    net = loaded.module.eval().to(dev)
    transform, _ = M.preprocessing_for(loaded, image_size=args.image_size)
    folder_kwargs = {"foreground": "auto"} if args.foreground == "auto" else {"masks": masks}
    cf = I.Counterfactuals(images, seed=0, transform=transform, **folder_kwargs)
    per_split = collections.Counter()
    done = (doc.get("cost") or {}).get("forward_passes_done")
    if done is not None:  # the audit's own count: rows a staged or resumed call skips are not passes
        plan = {sp: nets for sp, nets in doc["cost"]["forward_passes"].items() if sp != "mask check"}
        passes = collections.Counter({f"{nm}/{sp}": n for sp, nets in plan.items() for nm, n in nets.items()})
        passes["mask check"] = (doc.get("mask_sensitivity") or {}).get("forward_passes", 0)  # near objects only
        for key, n in passes.items():
            per_split[_split_of(key)] += n
    else:  # the code before the change: the wrapper's count of rows handed to the pipeline
        for key, n in passes.items():
            per_split[_split_of(key)] += n
    # timed with the weights as they come (contiguous) and channels-last (what --memory-format auto runs for
    # a conv net that passes its check): the audit's share of bare passes is read against the format it used
    bare = dict.fromkeys(f for f in args.bare.split(",") if f)
    with torch.no_grad():
        for fmt in bare:
            bare[fmt] = 0.0
            net = net.to(memory_format=torch.channels_last if fmt == "channels_last" else torch.contiguous_format)
            for sp in ("train", "test", "variants", "crossed"):
                if not per_split.get(sp):
                    continue
                # a checkout from before the rename (no `crossed_indices`) knows the crossed split as 'stress' only
                ds = cf.split("stress" if sp == "crossed" and not hasattr(cf, "crossed_indices") else sp)
                xs = torch.stack([ds[k]["x"] for k in range(len(ds))]).to(dev)
                reps = per_split[sp] / len(ds)  # nets (and mask-check passes) that saw this split
                net(xs[:args.batch_size])  # warm-up
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t1 = time.perf_counter()
                for start in range(0, len(xs), args.batch_size):
                    net(xs[start:start + args.batch_size])
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                bare[fmt] += (time.perf_counter() - t1) * reps
    used = ((doc.get("cost") or {}).get("memory_format") or {}).get("nets", {}).get("model", "contiguous")
    own = bare.get(used, bare.get("contiguous"))
    known = sum(phases.values())
    return {"n_images": args.n, "model": args.model, "image_size": args.image_size,
            "foreground": args.foreground, "wall_s": wall, "phases_s": dict(phases),
            "other_s": wall - known, "forward_passes": dict(passes),
            "forward_passes_total": int(done if done is not None else sum(passes.values())), "store_opens": counted.get("acts.h5", 0),
            "h5_opens_other": {k: v for k, v in counted.items() if k not in ("acts.h5", "(open file)")},
            "h5py_file_objects": sum(counted.values()), "wall_warm_s": wall_warm, "cpu_s": cpu,
            "cpu_warm_s": cpu_warm,
            "peak_rss_mb": rss_mb, "peak_rss_children_mb": rss_children_mb, "bare_forward_s": own,
            "bare_over_audit": None if own is None else own / wall, "bare_forward_by_format_s": bare,
            "memory_format": used, "verdict": verdict, "cost": doc.get("cost"),
            "threads": args.threads, "device": str(dev), "load": os.getloadavg(), "src": args.src or "this tree",
            "probekit_file": A.__file__}


def _flatten(doc, prefix=""):
    """Every number and bool of a document, by its path (for comparing two audits' figures)."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _flatten(v, f"{prefix}[{i}]")
    elif isinstance(doc, (bool, int, float)) or doc is None:
        yield prefix, doc


def _device_check(args: argparse.Namespace) -> dict:
    """One audit of a small folder on the CPU and on ``args.device``: do the verdict and figures agree?"""
    if args.src:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _checkout import use_checkout

        use_checkout(args.src)
    import torch

    from probekit.datasets._shapes import write_image_folder
    from probekit.model_audit import audit_model

    work = Path(tempfile.mkdtemp(prefix="bench-audit-dev-"))
    images, masks = write_image_folder(work / "folder", split="test", background="class", seed=0, n=args.n,
                                       size=args.size)
    torch.manual_seed(0)
    loaded = _build_model(args.model)
    w = work / "w.pt"
    torch.save(loaded.state_dict(), w)
    docs = {}
    for i, dev in enumerate(("cpu", args.device)):
        r = audit_model(args.model, images, masks=masks, weights=w, out=work / f"{i}-{dev}", n_inits=args.inits,
                        progress=False, image_size=args.image_size, device=dev, n_boot=args.n_boot,
                        n_perm=args.n_perm)
        docs[f"{i}-{dev}"] = {k: v for k, v in r.data.items() if k not in ("created", "cost", "store")}
    a, b = (dict(_flatten(d)) for d in docs.values())
    diffs = {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
    num = [abs(x - y) for x, y in diffs.values() if isinstance(x, float) and isinstance(y, float)]
    m = {d: docs[d]["models"]["model"] for d in docs}
    return {"devices": list(docs), "n_images": args.n, "model": args.model, "flagged": [v["flagged"] for v in m.values()],
            "verdicts_equal": len({v["verdict"] for v in m.values()}) == 1, "n_fields": len(a),
            "n_fields_differing": len(diffs), "max_abs_difference": max(num, default=0.0),
            "differing": sorted(diffs)[:20]}


def _build_model(spec: str):
    from probekit.models import load_model

    return load_model(spec).module


def _table(paths: list[str]) -> str:
    """A markdown table of result files of this script."""
    lines = ["| label | device | images | model | wall s | extraction s | analyses s | forward passes | "
             "peak RSS MB | bare / audit | flagged |", "|" + "---|" * 11]
    for p in paths:
        d = json.loads(Path(p).read_text())
        for r in d.get("rows", []):
            ph = r["phases_s"]
            ext = sum(v for k, v in ph.items() if k.startswith("extract"))
            lines.append(f"| {d['label']} | {r.get('device', 'cpu')} | {r['n_images']} | {r['model']} | "
                         f"{r['wall_s']:.1f} | {ext:.1f} | {ph.get('analyses', 0):.1f} | "
                         f"{r['forward_passes_total']} | {r['peak_rss_mb']:.0f} | {_ratio(r.get('bare_over_audit'))} | "
                         f"{r['verdict']['flagged']} |")
    return "\n".join(lines)


def _ratio(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _run_child(args: argparse.Namespace, n: int, src: str) -> dict:
    """One configuration in a fresh child process; its row, with the child's whole wall (``process_s``:
    interpreter start, imports, the folder, the audit, the bare forward passes)."""
    cmd = [sys.executable, __file__, "--child", "--n", str(n), "--model", args.model, "--image-size",
           str(args.image_size), "--size", str(args.size), "--foreground", args.foreground, "--inits",
           str(args.inits), "--batch-size", str(args.batch_size), "--n-boot", str(args.n_boot),
           "--n-perm", str(args.n_perm), "--threads", str(args.threads), "--extra", args.extra, "--src", src,
           "--device", args.device, "--bare", args.bare, *(["--warm"] if args.warm else [])]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(out.returncode)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["process_s"] = time.perf_counter() - t0
    return row


def _pairs(args: argparse.Namespace) -> None:
    """``--pairs N``: N interleaved pairs (``--before`` checkout, then this tree) per folder size."""
    import statistics

    if not args.before:
        raise SystemExit("--pairs needs --before DIR (a checkout of the code before)")
    out = {"label": args.label, "argv": sys.argv[1:], "before": str(Path(args.before).resolve()), "pairs": []}
    path = Path(args.results) / f"bench_audit_scale_{args.label}.json"
    for n in args.images:
        for i in range(args.pairs):
            pair = {"n_images": n, "before": _run_child(args, n, args.before), "after": _run_child(args, n, "")}
            out["pairs"].append(pair)
            b, a = pair["before"], pair["after"]
            warm = (f", warm {b['wall_warm_s']:.2f} -> {a['wall_warm_s']:.2f} s (CPU {b['cpu_warm_s']:.2f} -> "
                    f"{a['cpu_warm_s']:.2f} s)" if args.warm else "")
            print(f"n={n} pair {i + 1}: audit wall {b['wall_s']:.2f} -> {a['wall_s']:.2f} s, CPU {b['cpu_s']:.2f} -> "
                  f"{a['cpu_s']:.2f} s "
                  f"(x{b['wall_s'] / a['wall_s']:.2f}){warm}; store opens {b['store_opens']} -> {a['store_opens']}; "
                  f"verdict {b['verdict']} -> {a['verdict']}", flush=True)
            path.write_text(json.dumps(out, indent=1))
        rows = [p for p in out["pairs"] if p["n_images"] == n]
        for key in ("wall_s", "cpu_s", "process_s", *(["wall_warm_s", "cpu_warm_s"] if args.warm else [])):
            before = statistics.median(p["before"][key] for p in rows)
            after = statistics.median(p["after"][key] for p in rows)
            ratio = statistics.median(p["before"][key] / p["after"][key] for p in rows)
            out.setdefault("medians", {}).setdefault(str(n), {})[key] = {"before": before, "after": after,
                                                                         "ratio_median": ratio}
            print(f"n={n} {key}: median before {before:.2f} s, after {after:.2f} s, median ratio x{ratio:.2f}")
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, nargs="+", default=[100])
    p.add_argument("--model", default="timm:resnet18")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--size", type=int, default=64, help="side of the generated images")
    p.add_argument("--foreground", choices=["masks", "auto"], default="masks")
    p.add_argument("--inits", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--n-boot", type=int, default=500)
    p.add_argument("--n-perm", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--extra", default="{}", help="JSON of further audit_model keywords (e.g. workers)")
    p.add_argument("--label", default="run")
    p.add_argument("--device", default="cpu", help="the audit's and the bare forward's device (cpu, cuda, auto)")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="folder of the JSON")
    p.add_argument("--src", default="", help="import probekit from this checkout (before/after runs)")
    p.add_argument("--warm", action="store_true", help="also time a second audit in the same process")
    p.add_argument("--bare", default="contiguous,channels_last",
                   help="memory formats of the timed bare forward passes (comma-separated; empty: none); bare / audit "
                   "reads the one the audit's model ran in")
    p.add_argument("--pairs", type=int, default=0, help="interleaved before/after pairs (with --before)")
    p.add_argument("--before", default="", help="the checkout of the code before, for --pairs")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--device-check", action="store_true",
                   help="audit a small folder (--n images) on the CPU and on --device; print what differs")
    p.add_argument("--table", nargs="+", metavar="JSON", help="print a markdown table of these result files")
    args = p.parse_args()
    if args.table:
        print(_table(args.table))
        return
    if args.device_check:
        res = _device_check(args)
        print(json.dumps(res, indent=1))
        (Path(args.results) / f"bench_audit_scale_{args.label}.json").write_text(json.dumps(res, indent=1))
        return
    if args.child:
        print(json.dumps(_child(args)))
        return
    if args.pairs:
        _pairs(args)
        return
    rows = []
    for n in args.images:
        row = _run_child(args, n, args.src)
        rows.append(row)
        print(f"n={n}: wall {row['wall_s']:.1f} s, forward passes {row['forward_passes_total']}, store opens "
              f"{row['store_opens']}, peak RSS {row['peak_rss_mb']:.0f} MB, bare/audit "
              f"{_ratio(row.get('bare_over_audit'))} ({row.get('memory_format', 'contiguous')}); phases " +
              ", ".join(f"{k} {v:.1f}" for k, v in sorted(row["phases_s"].items(), key=lambda kv: -kv[1])),
              flush=True)
        path = Path(args.results) / f"bench_audit_scale_{args.label}.json"
        path.write_text(json.dumps({"label": args.label, "argv": sys.argv[1:], "rows": rows}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
