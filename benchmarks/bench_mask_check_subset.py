"""The mask check on the objects near the decision (issue 22, item 2): agreement with the full rerun.

    nice -n 10 python benchmarks/bench_mask_check_subset.py          # writes benchmarks/results/bench_mask_check_subset.json
    python benchmarks/bench_mask_check_subset.py --quick

``probekit audit`` with approximate masks (boxes, GrabCut) reruns the model on the crossed split with
every mask eroded and dilated (``mask_check`` px) and reports the behaviour figures there. With
``mask_check_objects="near"`` it reruns only the objects whose *stored* predictions could move
(:func:`probekit.model_audit.near_decision`: predicted differently across backgrounds, or a top-2
softmax margin below a threshold on some background) and keeps the stored predictions of the others.

Here, on shape folders (``probekit.datasets._shapes``: the background colour is the class in the
folder's images) with boxes as the foreground, for models that are planted shortcuts (trained on
class-coloured backgrounds), robust (random colours), partial (their logits mixed, w x shortcut +
(1 - w) x robust), undertrained (1 epoch) and untrained: the model's outputs on the audit's crossed
split (what the audit stores) and its eroded / dilated predictions of every object are computed once;
for each margin threshold the subset answer is formed as the audit forms it, with the rule alone
("near": rerun objects get their new predictions, the others keep their stored ones) and with the
audit's seeded sample of the other objects ("near+sentinels": when any sampled object's prediction
moved, every object is rerun), and compared with the full rerun: the shortcut finding (``flagged``),
reliance, the flip rate, and the forward passes needed. Masks eroded / dilated by 1, 2 and 3 px on
32 px images.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
THRESHOLDS = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9]


class Mix(nn.Module):
    """A partial shortcut: w x the shortcut model's logits + (1 - w) x the robust model's."""

    def __init__(self, shortcut: nn.Module, robust: nn.Module, w: float) -> None:
        super().__init__()
        self.a, self.b, self.w = shortcut, robust, w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w * self.a(x) + (1 - self.w) * self.b(x)


def boxes_csv(images: Path, masks: Path, out: Path) -> Path:
    from PIL import Image

    rows = []
    for p in sorted(images.rglob("*.png")):
        m = np.asarray(Image.open(masks / p.relative_to(images))) > 0
        ys, xs = np.nonzero(m)
        rows.append(f"{p.relative_to(images).as_posix()},{xs.min()},{ys.min()},{xs.max() + 1},{ys.max() + 1}")
    out.write_text("path,x0,y0,x1,y1\n" + "\n".join(rows) + "\n")
    return out


def figures(pred: np.ndarray, where: np.ndarray, labels: np.ndarray, n_boot: int, seed: int) -> dict:
    from probekit.analyses import background_reliance

    g, b = where[:, 0], where[:, 1]
    r = background_reliance(pred, g, b, label=labels[g], background_label=labels[b], n_boot=n_boot, random_state=seed)
    flips = np.array([len(set(pred[g == o])) > 1 for o in np.unique(g)])
    return {"flagged": r.shortcut, "reliance": r.reliance, "flip_rate": float(flips.mean())}


def _outputs(model: nn.Module, ds, batch: int = 64) -> np.ndarray:
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False, num_workers=0)
    with torch.no_grad():
        return np.concatenate([model(it["x"]).numpy() for it in loader])


def one(model: nn.Module, images: Path, csv: Path, k: int, seed: int, n_boot: int) -> dict:
    """Every threshold's subset answer (with and without the sentinel sample) against the full rerun.

    The stored outputs are the model's outputs on the audit's own crossed split (what ``probekit audit``
    stores as ``@output``); the eroded / dilated predictions are computed once for every object."""
    from probekit.datasets import Counterfactuals
    from probekit.model_audit import _softmax_margin, near_decision, sentinels
    from probekit.models import load_model, preprocessing_for

    transform, _ = preprocessing_for(load_model(model))
    cf_kwargs = {"seed": seed, "n_backgrounds": 8, "test_fraction": 0.5, "transform": transform}
    cf0 = Counterfactuals(images, **cf_kwargs, boxes=csv)
    base = cf0.split("crossed")
    o = _outputs(model, base)
    bw = np.array([base.locate(i)[::2] for i in range(len(base))])
    stored = {"group": bw[:, 0], "pred": o.argmax(1), "margin": _softmax_margin(o)}
    pos = {(int(g), int(b)): i for i, (g, b) in enumerate(bw)}
    objects = np.unique(bw[:, 0])
    res: dict = {"n_objects": int(objects.size), "original": figures(stored["pred"], bw, cf0.folder.labels,
                                                                       n_boot, seed), "adjust": {}}
    for adjust in (-k, k):
        key = "eroded" if adjust < 0 else "dilated"
        alt = Counterfactuals(images, **cf_kwargs, mask_adjust=adjust, verify="header", boxes=csv)
        full = alt.split("crossed")
        where = np.array([full.locate(i)[::2] for i in range(len(full))])
        new = _outputs(model, full).argmax(1)
        old = stored["pred"][[pos[(int(g), int(b))] for g, b in where]]
        labels = alt.folder.labels
        truth = figures(new, where, labels, n_boot, seed)
        per: dict = {"full": truth, "changed_rows": int((new != old).sum()), "rows": len(where), "thresholds": {}}
        for t in THRESHOLDS:
            near = near_decision(stored["group"], stored["pred"], stored["margin"], t)
            check = sentinels(np.setdiff1d(objects, near), seed)
            first = np.isin(where[:, 0], np.union1d(near, check))
            escalated = bool((new != old)[np.isin(where[:, 0], check)].any())
            for rule, again in (("near", np.isin(where[:, 0], near)), ("near+sentinels", np.ones(len(where), bool)
                                                                        if escalated else first)):
                pred = np.where(again, new, old)
                f = figures(pred, where, labels, n_boot, seed)
                per["thresholds"].setdefault(str(t), {})[rule] = {
                    **f, "rows_rerun": int(again.sum()), "escalated": escalated if rule != "near" else None,
                    "same_flag": f["flagged"] == truth["flagged"], "d_reliance": abs(f["reliance"] - truth["reliance"]),
                    "d_flip_rate": abs(f["flip_rate"] - truth["flip_rate"]),
                    "missed_rows": int(((new != old) & ~again).sum())}
        res["adjust"][key] = per
    return res


def main(argv: list[str] | None = None) -> dict:
    from probekit.datasets._shapes import write_image_folder
    from probekit.experiments.shortcut import ShapesCNN, train_shapes_cnn

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n-images", type=int, default=120)
    ap.add_argument("--pixels", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_mask_check_subset.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    res: dict = {"config": {"n_images": args.n_images, "pixels": args.pixels, "seeds": args.seeds,
                            "thresholds": THRESHOLDS}, "runs": []}
    for seed in args.seeds[:1] if args.quick else args.seeds:
        torch.manual_seed(seed)
        sc, rb = train_shapes_cnn("class", seed=seed + 1), train_shapes_cnn("random", seed=seed + 1)
        models = {"shortcut": sc, "robust": rb, "partial_0.3": Mix(sc, rb, 0.3), "partial_0.5": Mix(sc, rb, 0.5),
                  "partial_0.7": Mix(sc, rb, 0.7)}
        if not args.quick:
            models["shortcut_1_epoch"] = train_shapes_cnn("class", seed=seed + 1, epochs=1)
            models["robust_1_epoch"] = train_shapes_cnn("random", seed=seed + 1, epochs=1)
            torch.manual_seed(100 + seed)
            models["untrained"] = ShapesCNN().eval()
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            images, masks = write_image_folder(tmp, split="test", background="class", seed=seed,
                                               n=40 if args.quick else args.n_images)
            csv = boxes_csv(images, masks, tmp / "boxes.csv")
            for name, m in models.items():
                for k in args.pixels:
                    r = one(m.eval(), images, csv, k, seed, 100 if args.quick else 300)
                    res["runs"].append({"model": name, "seed": seed, "pixels": k, **r})
                    th = r["adjust"]["eroded"]["thresholds"][str(0.5)]["near+sentinels"]
                    print(f"seed {seed} {name:18s} k={k} full flag {r['adjust']['eroded']['full']['flagged']} "
                          f"rows@0.5 {th['rows_rerun']}/{r['adjust']['eroded']['rows']} esc {th['escalated']} "
                          f"same {th['same_flag']} dR {th['d_reliance']:.3f} {time.perf_counter() - t0:.0f}s",
                          file=sys.stderr, flush=True)
    res["summary"] = summary(res)
    res["config"]["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print("\n".join(table(res)))
    return res


def summary(res: dict) -> dict:
    out: dict = {}
    for k in res["config"]["pixels"]:
        for t in THRESHOLDS:
            for rule in ("near", "near+sentinels"):
                cells = [a["thresholds"][str(t)][rule] | {"rows": a["rows"], "changed": a["changed_rows"]}
                         for r in res["runs"] if r["pixels"] == k for a in r["adjust"].values()]
                out.setdefault(f"k={k}", {}).setdefault(str(t), {})[rule] = {
                    "answers": len(cells), "same_flag": float(np.mean([c["same_flag"] for c in cells])),
                    "max_d_reliance": float(max(c["d_reliance"] for c in cells)),
                    "mean_d_reliance": float(np.mean([c["d_reliance"] for c in cells])),
                    "max_d_flip_rate": float(max(c["d_flip_rate"] for c in cells)),
                    "share_rows_rerun": float(np.sum([c["rows_rerun"] for c in cells]) / np.sum([c["rows"] for c in cells])),
                    "escalated": (float(np.mean([c["escalated"] for c in cells])) if rule != "near" else None),
                    "rows_changed": int(np.sum([c["changed"] for c in cells])),
                    "rows_changed_missed": int(np.sum([c["missed_rows"] for c in cells]))}
    return out


def table(res: dict) -> list[str]:
    lines = ["| mask px | margin threshold | rule | same `flagged` as the full rerun | reliance difference, mean / max | "
             "flip-rate difference, max | forward passes (share of the full rerun) | escalated to all | rows whose "
             "prediction moved: missed / all |", "|---|---|---|---|---|---|---|---|---|"]
    for k, byt in res["summary"].items():
        for t, rules in byt.items():
            for rule, s in rules.items():
                esc = "–" if s["escalated"] is None else f"{100 * s['escalated']:.0f} %"
                lines.append(f"| {k[2:]} | {t} | {rule} | {100 * s['same_flag']:.0f} % ({s['answers']}) | "
                             f"{s['mean_d_reliance']:.4f} / {s['max_d_reliance']:.3f} | {s['max_d_flip_rate']:.3f} | "
                             f"{100 * s['share_rows_rerun']:.0f} % | {esc} | {s['rows_changed_missed']} / {s['rows_changed']} |")
    lines += ["", "| seed | model | px | objects | flagged: original / eroded / dilated (full rerun) | rows moved eroded / "
              "dilated |", "|---|---|---|---|---|---|"]
    for r in res["runs"]:
        e, d = r["adjust"]["eroded"], r["adjust"]["dilated"]
        lines.append(f"| {r['seed']} | {r['model']} | {r['pixels']} | {r['n_objects']} | {r['original']['flagged']} / "
                     f"{e['full']['flagged']} / {d['full']['flagged']} | {e['changed_rows']} / {d['changed_rows']} |")
    return lines


if __name__ == "__main__":
    main()
