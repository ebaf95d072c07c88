"""Predicted accuracy at a deployment site against the truth, and the choice of fill and feathering.

The project's own kind of generator: three objects (crescent, cross, star; random colour, size, place
and rotation, anti-aliased edges) on procedural textures. Training families: brick, grass, gravel.
Deployment sites: two families no model saw (wood, tiles). Model kinds, small CNNs trained here on CPU:

- ``robust``: backgrounds independent of the class;
- ``partial_shortcut``: the background family is the class's own (crescent-brick, cross-grass,
  star-gravel) in 70 % of the training images;
- ``shortcut``: in 100 %;
- ``unsure``: a narrow network (4 channels) trained with 20 % of the labels shuffled;
- ``undertrained``: the robust data, 80 steps (the others: 300).

The user's folder (what the audit reads): 240 test images (80 per class) on the training families,
the class's own family in 90 % of them (the collection has the bias), with masks at the objects'
50 % coverage. Each site is 6 photos (160 x 160) of its family; the deployment split shows every
test object on the same 24 scene crops of 48 x 48 (``fit="crop"``).

Truth (known by generating it): each model's accuracy on 3,000 fresh images of fresh objects on fresh
textures of the site's family; and on fresh images of fresh objects on training-family textures
paired at random (what the crossed split estimates).

Measured:

1. fill x feather grid: the compositing gap (``composite_gap``) and the crossed split's error against
   the truth it estimates, per model; and the deployment prediction's error per feather;
2. with the chosen default: predicted accuracy (raw and corrected) against the truth per model and
   site, over ``--reps`` independent folders and photo sets (coverage of the interval); the crossed
   split's accuracy beside it (what the audit says without the deployment scenes).

    nice -n 10 python benchmarks/bench_deploy.py --out benchmarks/results/bench_deploy.json
"""

from __future__ import annotations

import argparse
import colorsys
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter
from torch import nn

from probekit.analyses import composite_gap, predicted_accuracy
from probekit.datasets import Counterfactuals

S = 32  # image side
PHOTO = 112  # scene photo side
CLASSES = ("crescent", "cross", "star")
TRAIN_FAMILIES = ("brick", "grass", "gravel")
SITES = ("wood", "tiles")
SS = 4  # supersampling of the object masks


# ----------------------------------------------------------------------------------------- textures
def _jitter(rng: np.random.Generator, base: tuple[float, float, float], amount: float = 0.08) -> np.ndarray:
    return np.clip(np.asarray(base) + rng.uniform(-amount, amount, 3), 0, 1)


def texture(family: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A (h, w, 3) float texture of ``family``; stationary, so a crop of a big one is distributed as a small one."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    fine = rng.standard_normal((h, w)).astype(np.float32)
    if family == "brick":
        bh = rng.uniform(7, 10)
        bw = 2.1 * bh
        oy, ox = rng.uniform(0, bh), rng.uniform(0, bw)
        row = np.floor((yy + oy) / bh)
        xs = xx + ox + (row % 2) * bw / 2
        col = np.floor(xs / bw)
        mortar = ((yy + oy) % bh < 1.3) | (xs % bw < 1.3)
        ids = (row * 1000 + col).astype(np.int64)
        _, inv = np.unique(ids, return_inverse=True)
        shade = rng.uniform(0.8, 1.15, inv.max() + 1)[inv.reshape(h, w)]
        base = _jitter(rng, (0.62, 0.27, 0.2))
        img = base[None, None] * shade[..., None] * (1 + 0.06 * fine[..., None])
        img[mortar] = _jitter(rng, (0.75, 0.73, 0.68), 0.04)
        return np.clip(img, 0, 1)
    if family == "grass":
        streak = gaussian_filter(rng.standard_normal((h, w)).astype(np.float32), (5, 0.8), mode="wrap")
        streak /= streak.std() + 1e-6
        base = _jitter(rng, (0.25, 0.55, 0.18))
        return np.clip(base[None, None] * (1 + 0.22 * streak[..., None] + 0.05 * fine[..., None]), 0, 1)
    if family == "gravel":
        n = max(4, int(h * w / 30))
        pts = rng.uniform(0, 1, (n, 2)) * [h, w]
        val = rng.uniform(0.7, 1.25, n)
        d = (yy.reshape(-1, 1) - pts[:, 0]) ** 2 + (xx.reshape(-1, 1) - pts[:, 1]) ** 2
        part = np.partition(d, 1, axis=1)
        near = np.argmin(d, axis=1)
        edge = (np.sqrt(part[:, 1]) - np.sqrt(part[:, 0]) < 1.0).reshape(h, w)
        shade = val[near].reshape(h, w) * np.where(edge, 0.7, 1.0)
        base = _jitter(rng, (0.52, 0.49, 0.44), 0.06)
        return np.clip(base[None, None] * shade[..., None] * (1 + 0.05 * fine[..., None]), 0, 1)
    if family == "wood":
        warp = gaussian_filter(rng.standard_normal((h, w)).astype(np.float32), 6, mode="wrap")
        warp /= warp.std() + 1e-6
        period = rng.uniform(5, 8)
        grain = np.sin(2 * np.pi * (yy + 2.5 * warp + rng.uniform(0, period)) / period)
        base = _jitter(rng, (0.58, 0.4, 0.24))
        return np.clip(base[None, None] * (1 + 0.13 * grain[..., None] + 0.04 * fine[..., None]), 0, 1)
    if family == "tiles":
        t = rng.uniform(13, 17)
        oy, ox = rng.uniform(0, t, 2)
        grout = ((yy + oy) % t < 1.5) | ((xx + ox) % t < 1.5)
        ids = (np.floor((yy + oy) / t) * 1000 + np.floor((xx + ox) / t)).astype(np.int64)
        _, inv = np.unique(ids, return_inverse=True)
        tint = rng.uniform(0.92, 1.06, inv.max() + 1)[inv.reshape(h, w)]
        base = _jitter(rng, (0.55, 0.72, 0.78), 0.06)
        img = base[None, None] * tint[..., None] * (1 + 0.03 * fine[..., None])
        img[grout] = _jitter(rng, (0.3, 0.3, 0.32), 0.04)
        return np.clip(img, 0, 1)
    raise ValueError(family)


# ----------------------------------------------------------------------------------------- objects
def coverage(kind: int, rng: np.random.Generator) -> np.ndarray:
    """(S, S) anti-aliased coverage in [0, 1] of a random crescent / cross / star."""
    n = S * SS
    r = rng.uniform(0.28, 0.4) * n
    cy, cx = rng.uniform(r * 1.05, n - r * 1.05, 2)
    th = rng.uniform(0, 2 * np.pi)
    yy, xx = (np.mgrid[0:n, 0:n] + 0.5).astype(np.float32)
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(th) + dy * np.sin(th)
    v = -dx * np.sin(th) + dy * np.cos(th)
    if kind == 0:
        m = (u ** 2 + v ** 2 <= r ** 2) & ((u - 0.45 * r) ** 2 + v ** 2 > (0.8 * r) ** 2)
    elif kind == 1:
        a = 0.3 * r
        m = ((np.abs(u) <= r) & (np.abs(v) <= a)) | ((np.abs(v) <= r) & (np.abs(u) <= a))
    else:
        ang = np.arctan2(v, u) % (2 * np.pi / 5)
        t = np.abs(ang - np.pi / 5) / (np.pi / 5)  # 0 at a valley, 1 at a point
        m = np.sqrt(u ** 2 + v ** 2) <= r * (0.45 + 0.55 * t)
    return m.reshape(S, SS, S, SS).mean(axis=(1, 3)).astype(np.float32)


def object_colour(rng: np.random.Generator) -> np.ndarray:
    rgb = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.45, 0.9), rng.uniform(0.6, 0.95))
    shade = 1 + 0.12 * np.linspace(-1, 1, S)[None, :, None] * rng.choice([-1, 1])
    return np.clip(np.asarray(rgb)[None, None] * shade, 0, 1)


def render(kind: int, bg: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (S, S, 3) image and its coverage."""
    a = coverage(kind, rng)[..., None]
    img = a * object_colour(rng) + (1 - a) * bg
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8), a[..., 0]


def families_for(labels: np.ndarray, p_own: float, rng: np.random.Generator) -> list[str]:
    own = rng.random(labels.size) < p_own
    rand = rng.integers(0, 3, labels.size)
    return [TRAIN_FAMILIES[int(c if o else r)] for c, o, r in zip(labels, own, rand, strict=True)]


def make_images(n: int, fams: list[str] | str, rng: np.random.Generator, labels: np.ndarray | None = None):
    labels = rng.integers(0, 3, n) if labels is None else labels
    xs, covs = [], []
    for k in range(n):
        fam = fams if isinstance(fams, str) else fams[k]
        img, c = render(int(labels[k]), texture(fam, S, S, rng), rng)
        xs.append(img)
        covs.append(c)
    return np.stack(xs), np.stack(covs), labels


def to_tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2).float().div_(255.0)


# ----------------------------------------------------------------------------------------- models
class Net(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def train(x: torch.Tensor, y: torch.Tensor, *, width: int, steps: int, seed: int, lr: float = 3e-3) -> nn.Module:
    torch.manual_seed(seed)
    net = Net(width)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        xb = x[idx]
        flip = torch.rand(len(idx), generator=g) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
        loss = nn.functional.cross_entropy(net(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


@torch.no_grad()
def predict(net: nn.Module, x: torch.Tensor, batch: int = 512) -> np.ndarray:
    return torch.cat([net(x[k:k + batch]).argmax(1) for k in range(0, len(x), batch)]).numpy()


# ----------------------------------------------------------------------------------------- data on disk
def write_folder(root: Path, n_per_class: int, rng: np.random.Generator) -> None:
    labels = np.repeat(np.arange(3), n_per_class)
    x, cov, _ = make_images(labels.size, families_for(labels, 0.9, rng), rng, labels)
    for k in range(labels.size):
        for sub, arr in (("images", x[k]), ("masks", (cov[k] > 0.5).astype(np.uint8) * 255)):
            d = root / sub / CLASSES[labels[k]]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(d / f"{k:04d}.png")


def write_site(root: Path, family: str, n_photos: int, rng: np.random.Generator) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for k in range(n_photos):
        img = np.round(texture(family, PHOTO, PHOTO, rng) * 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"photo{k}.png")
    return root


def rows(ds) -> tuple[torch.Tensor, np.ndarray]:
    """All items of a split: stacked inputs and (group, background, label, variant) columns."""
    xs, meta = [], []
    for k in range(len(ds)):
        it = ds[k]
        xs.append(it["x"])
        meta.append((it["group"], it["background"], it["label"], it["variant"]))
    return torch.stack(xs), np.asarray(meta)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/bench_deploy.json")
    ap.add_argument("--n-train", type=int, default=3000)
    ap.add_argument("--n-true", type=int, default=2000)
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--photos", type=int, default=6)
    ap.add_argument("--n-deploy", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--fills", default="telea,ns,mean,shift,borrow")
    ap.add_argument("--feathers", default="0,0.5,auto")
    ap.add_argument("--threads", type=int, default=1)  # 2 threads ran 14x slower per step on a loaded 2-core machine
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    rng = np.random.default_rng(2026)
    out: dict = {"command": "python benchmarks/bench_deploy.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()), "image_side": S}

    # ---- models
    ytr = rng.integers(0, 3, args.n_train)
    data = {}
    for name, p_own in (("random", 0.0), ("p70", 0.7), ("p100", 1.0)):
        x, _, _ = make_images(args.n_train, families_for(ytr, p_own, rng), rng, ytr)
        data[name] = to_tensor(x)
    y = torch.from_numpy(ytr)
    noisy = y.clone()
    flip = torch.from_numpy(rng.random(args.n_train) < 0.2)
    noisy[flip] = torch.from_numpy(rng.integers(0, 3, int(flip.sum())))
    specs = {"robust": ("random", y, 8, args.steps), "partial_shortcut": ("p70", y, 8, args.steps),
             "shortcut": ("p100", y, 8, args.steps), "unsure": ("random", noisy, 3, args.steps),
             "undertrained": ("random", y, 8, 80)}
    models = {}
    for k, (name, (d, lab, width, steps)) in enumerate(specs.items()):
        models[name] = train(data[d], lab, width=width, steps=steps, seed=k)
    del data
    out["train_seconds"] = round(time.time() - t0, 1)
    print(f"trained {list(models)} in {out['train_seconds']} s", flush=True)

    # ---- truth
    truth: dict = {m: {} for m in models}
    conds = {"id": None, "repaired": "repaired", **{s: s for s in SITES}}
    for cond in conds:
        lab = rng.integers(0, 3, args.n_true)
        if cond == "id":
            fams = families_for(lab, 0.9, rng)
        elif cond == "repaired":
            fams = [TRAIN_FAMILIES[int(k)] for k in rng.integers(0, 3, args.n_true)]
        else:
            fams = cond
        x, _, _ = make_images(args.n_true, fams, rng, lab)
        xt = to_tensor(x)
        for m, net in models.items():
            truth[m][cond] = float(np.mean(predict(net, xt) == lab))
    out["truth"] = truth
    print("truth", json.dumps(truth), flush=True)

    def evaluate(root: Path, fill: str, feather, seed: int, with_deploy: bool) -> dict:
        sites = [root / "sites" / s for s in SITES] if with_deploy else None
        cf = Counterfactuals(root / "folder" / "images", masks=root / "folder" / "masks", fill=fill,
                             feather=feather, test_fraction=1.0, seed=seed, n_backgrounds=8,
                             variants=["original", "composite_self"], deploy_backgrounds=sites,
                             n_deploy=args.n_deploy)
        res: dict = {"settings": cf.settings}
        xv, mv = rows(cf.split("variants"))
        xs, ms = rows(cf.split("crossed"))
        deploy = {sp: rows(cf.split(sp)) for sp in cf.deploy_splits}
        orig, comp = mv[:, 3] == 0, mv[:, 3] == 7
        for m, net in models.items():
            pv = predict(net, xv)
            gap = composite_gap(pv[orig], pv[comp], mv[orig, 2], mv[orig, 0])
            ps = predict(net, xs)
            r = {"composite_gap": gap.to_dict(), "crossed": float(np.mean(ps == ms[:, 2])),
                 "original": gap.accuracy_original}
            for sp, (xd, md) in deploy.items():
                pd = predict(net, xd)
                site = sp.split(":", 1)[1]
                unit = cf.scenes.photo_of(cf.deploy_splits.index(sp))[md[:, 1]]
                pa = predicted_accuracy(pd, md[:, 2], md[:, 0], md[:, 1], scene_unit=unit, composite=gap)
                r[site] = pa.to_dict()
            res[m] = r
        return res

    # ---- 1. the fill x feather grid, on the first folder
    work = Path(tempfile.mkdtemp(prefix="bench_deploy_"))
    roots = []
    for rep in range(args.reps):
        root = work / f"rep{rep}"
        write_folder(root / "folder", args.per_class, rng)
        for s in SITES:
            write_site(root / "sites" / s, s, args.photos, rng)
        roots.append(root)
    grid = {}
    fills = args.fills.split(",")
    feathers = [f if f == "auto" else float(f) for f in args.feathers.split(",")]
    deploy_mae, crossed_mae, corrected_mae = {}, {}, {}
    for feather in feathers:
        for fill in fills:
            key = f"{fill}/feather={feather}"
            g = grid[key] = evaluate(roots[0], fill, feather, 0, with_deploy=fill == fills[0])
            gaps = {m: round(100 * g[m]["composite_gap"]["value"], 1) for m in models}
            cerr = {m: round(100 * (g[m]["crossed"] - truth[m]["repaired"]), 1) for m in models}
            crossed_mae[key] = float(np.mean([abs(v) for v in cerr.values()]))
            print(f"{key}: gap {gaps} crossed-truth {cerr} ({time.time() - t0:.0f} s)", flush=True)
            if fill == fills[0]:
                derr = [100 * (g[m][s]["value"] - truth[m][s]) for m in models for s in SITES]
                cerr2 = [100 * ((g[m][s]["corrected"] or g[m][s])["value"] - truth[m][s]) for m in models for s in SITES]
                deploy_mae[str(feather)] = float(np.mean(np.abs(derr)))
                corrected_mae[str(feather)] = float(np.mean(np.abs(cerr2)))
                print(f"  deploy raw error {[round(v, 1) for v in derr]}; with the correction where material "
                      f"{[round(v, 1) for v in cerr2]}", flush=True)
    # the measured best: the feather whose deployment prediction errs least, then the fill whose crossed
    # split errs least at that feather
    best_feather = min(feathers, key=lambda f: deploy_mae[str(f)])
    best_fill = min(fills, key=lambda f: crossed_mae[f"{f}/feather={best_feather}"])
    out["grid"] = grid
    out["choice"] = {"deploy_mae_by_feather": deploy_mae, "deploy_mae_corrected_by_feather": corrected_mae,
                     "crossed_mae_by_config": crossed_mae,
                     "feather": best_feather, "fill": best_fill}
    print("chosen", out["choice"], flush=True)

    # ---- 2. the chosen settings, over reps
    reps = [evaluate(root, best_fill, best_feather, k, with_deploy=True) for k, root in enumerate(roots)]
    out["reps"] = reps
    summary: dict = {"per_model": {}, "mae_raw": None, "mae_final": None}
    err_raw, err_final, err_crossed, cover, cover_final = [], [], [], [], []
    for m in models:
        summary["per_model"][m] = {}
        for s in SITES:
            t = truth[m][s]
            rr = [r[m][s] for r in reps]
            raw = [x["value"] for x in rr]
            fin = [x["corrected"]["value"] if x["corrected"] else x["value"] for x in rr]
            cov_raw = [x["ci"][0] <= t <= x["ci"][1] for x in rr]
            cov_fin = [(x["corrected"] or x)["ci"][0] <= t <= (x["corrected"] or x)["ci"][1] for x in rr]
            crossed = [r[m]["crossed"] for r in reps]
            err_raw += [v - t for v in raw]
            err_final += [v - t for v in fin]
            err_crossed += [v - t for v in crossed]
            cover += cov_raw
            cover_final += cov_fin
            summary["per_model"][m][s] = {
                "truth": t, "predicted_raw": raw, "predicted_final": fin,
                "ci_raw": [x["ci"] for x in rr], "covered_raw": cov_raw, "covered_final": cov_fin,
                "crossed": crossed, "composite_gap": [r[m]["composite_gap"]["value"] for r in reps]}
    summary["mae_raw"] = float(np.mean(np.abs(err_raw)))
    summary["mae_final"] = float(np.mean(np.abs(err_final)))
    summary["max_abs_final"] = float(np.max(np.abs(err_final)))
    summary["mae_crossed"] = float(np.mean(np.abs(err_crossed)))
    summary["max_abs_crossed"] = float(np.max(np.abs(err_crossed)))
    summary["coverage_raw"] = [int(np.sum(cover)), len(cover)]
    summary["coverage_final"] = [int(np.sum(cover_final)), len(cover_final)]
    out["summary"] = summary
    out["seconds"] = round(time.time() - t0, 1)
    print(json.dumps({k: v for k, v in summary.items() if k != "per_model"}), flush=True)
    for m in models:
        for s in SITES:
            d = summary["per_model"][m][s]
            print(f"{m:17s} {s:6s} truth {100 * d['truth']:5.1f}  raw {[round(100 * v, 1) for v in d['predicted_raw']]} "
                  f"final {[round(100 * v, 1) for v in d['predicted_final']]} crossed "
                  f"{[round(100 * v, 1) for v in d['crossed']]}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out} in {out['seconds']} s")


if __name__ == "__main__":
    main()
