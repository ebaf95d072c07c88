"""Profile the counterfactual splits' items (compositing, filling, decoding) on a generated folder.

    python benchmarks/profile_compositing.py 1000 32 masks      # 1,000 shape images at 32 px, exact masks
    python benchmarks/profile_compositing.py 30 224 auto        # 30 images at 224 px, GrabCut masks
    python benchmarks/profile_compositing.py 1000 32 masks /tmp/before   # the code of another checkout

Builds the folder (probekit/datasets/_shapes.py), the model's preprocessing (timm test_resnet below 128 px,
else resnet50), reads every item of the variants and crossed splits in order under cProfile, and prints ms
per item, the forward pass's ms per image (batch 32), and the 40 calls with the most cumulative time
(counts of mask reads, decodes, fills and distance transforms come from its `ncalls` column).
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

if len(sys.argv) > 4:  # a checkout to profile instead of this tree (`git archive REV | tar -x -C DIR`)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _checkout import use_checkout

    use_checkout(sys.argv[4])

from probekit import models as M
from probekit.datasets import _images as I
from probekit.datasets._shapes import write_image_folder

torch.set_num_threads(2)
n, size, fg = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
work = Path(tempfile.mkdtemp())
images, masks = write_image_folder(work / "f", split="test", background="random", seed=0, n=n, size=size)
loaded = M.load_model("timm:resnet50" if size >= 128 else "timm:test_resnet")
transform, _ = M.preprocessing_for(loaded, image_size=size)
cf = I.Counterfactuals(images, seed=0, transform=transform, **({"foreground": "auto"} if fg == "auto" else {"masks": masks}))
pr = cProfile.Profile()
for sp in ("variants", "crossed"):
    ds = cf.split("stress" if sp == "crossed" and not hasattr(cf, "crossed_indices") else sp)  # before the rename
    t = time.perf_counter()
    pr.enable()
    for k in range(len(ds)):
        ds[k]
    pr.disable()
    print(sp, len(ds), "items", f"{(time.perf_counter() - t) / len(ds) * 1000:.2f} ms/item")
net = loaded.module.eval()
x = torch.stack([ds[k]["x"] for k in range(32)])
with torch.no_grad():
    net(x)
    t = time.perf_counter()
    net(x)
    print(f"forward {(time.perf_counter() - t) / 32 * 1000:.2f} ms/image")
pstats.Stats(pr).sort_stats("cumulative").print_stats(40)
