"""Scaling of distributed extraction: 1 vs K processes (gloo on CPU, or NCCL on GPUs), side by side.

Each configuration launches K worker processes (a file:// rendezvous in a temporary directory, as
torchrun would set up) that run :func:`probekit.extractors.extract_distributed` on the same data, with
one torch thread per process so that K processes use K cores. Reported per configuration: the
extraction phase (all ranks, from a barrier after start-up to a barrier after the last shard is
written), the merge on rank 0, throughput in samples/s, and the speed-up and efficiency against 1
process. Process start-up (importing torch, building the model) is not counted.

Run:  python benchmarks/bench_distributed.py --procs 1 2 --n 512 --out benchmarks/results/bench_distributed.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER = r"""
import json, sys, time, torch, torch.distributed as dist
from torch.utils.data import TensorDataset
import torchvision
from probekit.extractors import ModelSpec, extract_distributed, shard_path
from probekit.store import merge_shards

rank, world, init, out, n, batch, size, threads, device = sys.argv[1:10]
rank, world, n, batch, size, threads = int(rank), int(world), int(n), int(batch), int(size), int(threads)
torch.set_num_threads(threads)
backend = "nccl" if device == "cuda" else "gloo"
dist.init_process_group(backend, init_method="file://" + init, rank=rank, world_size=world)
if device == "cuda":
    torch.cuda.set_device(rank)
    device = f"cuda:{rank}"
g = torch.Generator().manual_seed(0)
data = TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g))
torch.manual_seed(0)
net = torchvision.models.resnet18(num_classes=10).eval()
spec = {"m": ModelSpec(net, ["layer1", "layer2", "layer3", "layer4"], source="torchvision:resnet18")}
dist.barrier()
t0 = time.perf_counter()
extract_distributed(spec, data, out=out, split="data", batch_size=batch, device=device, merge=False if world > 1 else True,
                    progress=False, dtype="float16")
dist.barrier()
t1 = time.perf_counter()
if world > 1 and rank == 0:
    merge_shards([shard_path(out, r, world) for r in range(world)], out)
t2 = time.perf_counter()
dist.barrier()
if rank == 0:
    print("RESULT " + json.dumps({"extract_s": t1 - t0, "merge_s": t2 - t1}))
dist.destroy_process_group()
"""


def run(k: int, n: int, batch: int, size: int, threads: int, device: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "worker.py"
        script.write_text(WORKER)
        out = Path(tmp) / "acts.h5"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        procs = [subprocess.Popen([sys.executable, str(script), str(r), str(k), str(Path(tmp) / "init"), str(out),
                                   str(n), str(batch), str(size), str(threads), device],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
                 for r in range(k)]
        outs = [p.communicate()[0] for p in procs]
        if any(p.returncode for p in procs):
            raise SystemExit("a worker failed:\n" + "\n".join(outs))
        res = next(json.loads(line[7:]) for line in outs[0].splitlines() if line.startswith("RESULT "))
        res["store_bytes"] = out.stat().st_size
    res.update(procs=k, n=n, total_s=res["extract_s"] + res["merge_s"])
    res["samples_per_s"] = n / res["total_s"]
    res["extract_samples_per_s"] = n / res["extract_s"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--n", type=int, default=512, help="samples")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=64, help="image side (3 x size x size)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeat", type=int, default=2, help="runs per configuration; the fastest is kept")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    rows = []
    for k in args.procs:
        best = min((run(k, args.n, args.batch, args.size, args.threads, args.device) for _ in range(args.repeat)),
                   key=lambda r: r["total_s"])
        rows.append(best)
    base = rows[0]
    print(f"resnet18 on {args.n} x 3x{args.size}x{args.size}, batch {args.batch}, layer1-4 avg-pooled, float16, "
          f"{args.threads} thread(s)/process, {args.device}")
    print(f"{'procs':>5} {'extract s':>10} {'merge s':>8} {'total s':>8} {'samples/s':>10} {'speed-up':>9} {'efficiency':>10}")
    for r in rows:
        r["speedup"] = base["total_s"] / r["total_s"]
        r["efficiency"] = r["speedup"] * base["procs"] / r["procs"]
        print(f"{r['procs']:>5} {r['extract_s']:>10.2f} {r['merge_s']:>8.3f} {r['total_s']:>8.2f} "
              f"{r['samples_per_s']:>10.1f} {r['speedup']:>9.2f} {r['efficiency']:>10.2f}")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
