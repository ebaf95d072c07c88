"""`probekit audit` in one process and under `torchrun --nproc-per-node K`: wall time, and what differs.

Generates a folder of shapes with masks (probekit/datasets/_shapes.py), saves a seeded timm model at
random initialisation, then runs the same ``probekit audit`` command once in one process and once under
torchrun with K processes (one per GPU with ``--device cuda``; gloo on the CPU), one after the other in
this run, and compares the two audit.json field by field (every number and bool but the run's own
record). Writes ``<results>/bench_audit_torchrun_<label>.json``.

Usage::

    python benchmarks/bench_audit_torchrun.py --nproc 2 --device cuda --images 1000 --label gpu-2
    python benchmarks/bench_audit_torchrun.py --nproc 2 --device cpu --images 24 --size 32 \\
        --image-size 32 --inits 1 --label cpu-dry-run       # the CPU dry run of the same path
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OWN = ("created", "store", "cost")  # the run's own record


def _flatten(doc, prefix=""):
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _flatten(v, f"{prefix}[{i}]")
    elif isinstance(doc, (bool, int, float, str)) or doc is None:
        yield prefix, doc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--size", type=int, default=64, help="side of the generated images")
    p.add_argument("--model", default="timm:resnet18")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--inits", type=int, default=3)
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default="auto")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--n-boot", type=int, default=100)
    p.add_argument("--n-perm", type=int, default=50)
    p.add_argument("--port", type=int, default=29651)
    p.add_argument("--label", default="run")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()

    import torch

    from probekit.datasets._shapes import write_image_folder
    from probekit.models import load_model

    work = Path(tempfile.mkdtemp(prefix="bench-audit-torchrun-"))
    images, masks = write_image_folder(work / "folder", split="test", background="class", seed=0, n=args.images,
                                       size=args.size)
    torch.manual_seed(0)
    w = work / "w.pt"
    torch.save(load_model(args.model).module.state_dict(), w)
    audit = ["-m", "probekit.cli", "audit", args.model, "--weights", str(w), "--data", str(images), "--masks",
             str(masks), "--image-size", str(args.image_size), "--inits", str(args.inits), "--device", args.device,
             "--precision", args.precision, "--workers", str(args.workers), "--n-boot", str(args.n_boot),
             "--n-perm", str(args.n_perm), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    runs = {"single": [sys.executable, *audit, "--out-dir", str(work / "single")],
            f"torchrun-{args.nproc}": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                       "--nproc-per-node", str(args.nproc), *audit, "--out-dir",
                                       str(work / "torchrun")]}
    walls, docs = {}, {}
    for name, cmd in runs.items():
        t = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work)
        walls[name] = time.perf_counter() - t
        if r.returncode:
            sys.stderr.write(r.stderr[-4000:])
            raise SystemExit(f"{name} failed (exit {r.returncode})")
        out = work / ("single" if name == "single" else "torchrun") / "audit.json"
        docs[name] = json.loads(out.read_text())
    (a, b) = (dict(_flatten({k: v for k, v in d.items() if k not in OWN})) for d in docs.values())
    diffs = {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
    num = [abs(x - y) for x, y in diffs.values() if isinstance(x, float) and isinstance(y, float)]
    m = [d["models"]["model"] for d in docs.values()]
    res = {"label": args.label, "argv": sys.argv[1:], "nproc": args.nproc, "device": args.device,
           "n_images": args.images, "model": args.model, "wall_s": walls,
           "speedup": walls["single"] / walls[f"torchrun-{args.nproc}"],
           "processes": [d["cost"].get("processes") for d in docs.values()],
           "precision": [d["cost"].get("precision") for d in docs.values()],
           "forward_passes_done": [d["cost"]["forward_passes_done"] for d in docs.values()],
           "seconds_extraction": [d["cost"]["seconds_extraction"] for d in docs.values()],
           "seconds_audit": [d["cost"]["seconds"] for d in docs.values()],
           "load": os.getloadavg(),
           "flagged": [x["flagged"] for x in m], "verdicts_equal": m[0]["verdict"] == m[1]["verdict"],
           "n_fields": len(a), "n_fields_differing": len(diffs), "max_abs_difference": max(num, default=0.0),
           "differing": sorted(diffs)[:20]}
    print(json.dumps(res, indent=1))
    path = Path(args.results) / f"bench_audit_torchrun_{args.label}.json"
    path.write_text(json.dumps(res, indent=1))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
