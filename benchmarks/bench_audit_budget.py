"""Forward passes of ``probekit audit`` with the inits on a subsample and the mask check near the decision (issue 22).

    nice -n 10 python benchmarks/bench_audit_budget.py    # writes benchmarks/results/audit_passes_budget.json

120 shape images (60 test objects x 8 backgrounds), boxes as the foreground (so the mask check runs),
a robust and a shortcut ShapesCNN: every combination of ``init_objects`` (all, 30) and
``mask_check_objects`` (all, near); the forward passes per split and net, the verdict and the mask
check's flags of each, so the saving is read beside the figures it could move.
"""
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mask_check_subset import boxes_csv

from probekit.datasets._shapes import write_image_folder
from probekit.experiments.shortcut import train_shapes_cnn
from probekit.model_audit import audit_model

d = Path(tempfile.mkdtemp(prefix='audit-budget-'))
images, masks = write_image_folder(d, split="test", background="class", n=120)
csv = boxes_csv(images, masks, d / 'boxes.csv')
torch.set_num_threads(1)
res = {}
for name, bg in (("robust", "random"), ("shortcut", "class")):
    net = train_shapes_cnn(bg, seed=1)
    for io in ("all", 30):
        for mco in ("all", "near"):
            doc = audit_model(net, images, boxes=csv, out=d / f"{name}-{io}-{mco}", init_objects=io, mask_check_objects=mco,
                              n_boot=200, n_perm=50, progress=False, workers=0, overwrite=True).data
            c = doc["cost"]
            res[f"{name} init_objects={io} mask_check_objects={mco}"] = {
                "forward_passes": c["forward_passes"], "planned_total": c["forward_passes_total"],
                "done": c["forward_passes_done"], "flagged": doc["models"]["model"]["flagged"],
                "findings": doc["models"]["model"]["findings"],
                "mask_check": {k: v for k, v in doc["mask_sensitivity"].items() if k != "models"},
                "mask_flags": {k: v["flagged"] for k, v in doc["mask_sensitivity"]["models"]["model"].items()},
                "layers": {la: (v.get("background_vs_reference") or {}).get("ratio") for la, v in doc["models"]["model"]["layers"].items()}}
            print(name, io, mco, c["forward_passes_done"], doc["models"]["model"]["flagged"], flush=True)
(Path(__file__).resolve().parent / 'results' / 'audit_passes_budget.json').write_text(json.dumps(res, indent=1))
