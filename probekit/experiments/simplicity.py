"""Simplicity bias: neuron directions collapse onto a few width-independent directions (Tsoy & Konstantinov 2024).

Setup (the authors' replication code, ``train_xor.py``; docs/EXPERIMENTS.md): XOR-like data (symmetric: class 0 at ±e1, class 1 at ±e2; or
skewed by an angle alpha), a bias-free two-layer ReLU network ``f(x) = sum_k a_k relu(w_k . x)``
in float64, PyTorch default initialisation multiplied by ``init_scale`` (2^-7), BCE-with-logits
loss, full-batch plain gradient descent (lr 2^-4). Widths 64, 512 and 4096.

Measured per width and over training: the number of distinct directions carrying 90% of the first
layer's squared weight norm (``probekit.analyses.DirectionClusters`` when available), their
centres, and for XOR the alignment check of the paper's notebook: the 95% quantile over neurons of
the angle to the nearest candidate axis (0, ±pi/2, ±pi for symmetric XOR; the cluster axes for
skewed XOR). The finding: the mass collapses onto the same few directions at every width; on
symmetric XOR onto the four axes ±e1, ±e2.

Run: ``python -m probekit.experiments.simplicity --out DIR``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ..analyses import DirectionClusters
from ..datasets import gen_skew_data, gen_sym_data, xor_axes
from ..store import StoreWriter
from ._common import fmt, mean_sd, out_path, pyplot, seeds_list, torch_threads, write_json

__all__ = ["alignment_quantile", "cluster_directions", "run", "train_xor"]


def train_xor(
    X: np.ndarray,
    y: np.ndarray,
    *,
    width: int,
    init_scale: float = 2.0**-7,
    lr: float = 2.0**-4,
    epochs: int = 2**13,
    log_steps: Iterable[int] = (),
    seed: int = 2,
) -> dict[str, Any]:
    """Full-batch GD on BCE-with-logits; returns ``{"weights": {step: W (width, d)}, "a": ..., "loss": ...}``."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(X.shape[1], width, bias=False), nn.ReLU(), nn.Linear(width, 1, bias=False))
    model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(init_scale)
    Xt = torch.from_numpy(np.asarray(X, dtype=np.float64))
    yt = torch.from_numpy(np.asarray(y, dtype=np.float64))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    lossf = nn.BCEWithLogitsLoss()
    log_steps = set(int(s) for s in log_steps) | {0, epochs}
    weights: dict[int, np.ndarray] = {}
    losses: dict[int, float] = {}
    for t in range(epochs + 1):
        if t in log_steps:
            weights[t] = model[0].weight.detach().numpy().copy()
        opt.zero_grad(set_to_none=True)
        loss = lossf(model(Xt).squeeze(-1), yt)
        if t in log_steps:
            losses[t] = float(loss.detach())
        if t == epochs:
            break
        loss.backward()
        opt.step()
    return {"weights": weights, "a": model[2].weight.detach().numpy().ravel().copy(), "loss": losses}


def alignment_quantile(W: np.ndarray, axes: np.ndarray, q: float = 0.95, mass: float | None = None) -> float:
    """The ``q`` quantile over neurons of the angle (radians) from ``w_k`` to its nearest axis.

    With ``mass`` given, only the largest neurons carrying that share of ``sum ||w_k||^2`` count.
    """
    W = np.asarray(W, dtype=np.float64)
    norms = np.linalg.norm(W, axis=1)
    keep = np.ones(len(W), bool) if mass is None else _mass_mask(norms, mass)
    u = W[keep] / np.maximum(norms[keep, None], 1e-300)
    ax = axes / np.linalg.norm(axes, axis=1, keepdims=True)
    ang = np.arccos(np.clip(u @ ax.T, -1.0, 1.0)).min(1)
    return float(np.quantile(ang, q))


def _mass_mask(norms: np.ndarray, mass: float) -> np.ndarray:
    sq = norms**2
    order = np.argsort(-sq)
    cum = np.cumsum(sq[order]) / sq.sum()
    k = int(np.searchsorted(cum, mass) + 1)
    keep = np.zeros(len(norms), bool)
    keep[order[:k]] = True
    return keep


def cluster_directions(W: np.ndarray, *, mass: float = 0.9, tol_deg: float = 10.0) -> dict[str, Any]:
    """Distinct directions among the neurons carrying ``mass`` of the squared weight norm.

    ``probekit.analyses.DirectionClusters(tol=tol_deg, mass=mass)``; returns ``n_directions``, the
    unit ``centers`` (k, d) and ``shares`` of those directions (largest first).
    """
    dc = DirectionClusters(mass=mass, tol=tol_deg).fit(W)
    k = int(dc.n_directions_)
    return {"n_directions": k, "centers": np.asarray(dc.centers_)[:k], "shares": np.asarray(dc.shares_)[:k],
            "spread_deg": np.asarray(dc.spread_)[:k]}


def _match_centers(c1: np.ndarray, c2: np.ndarray) -> float:
    """Largest angle (deg) from a centre of ``c1`` to its nearest centre of ``c2`` (symmetrised)."""
    if len(c1) == 0 or len(c2) == 0:
        return float("nan")
    cos = np.clip(c1 @ c2.T, -1, 1)
    a = np.degrees(np.arccos(cos))
    return float(max(a.min(1).max(), a.min(0).max()))


def run(
    seeds: int | Iterable[int] = 3,
    out_dir: str | None = None,
    quick: bool = False,
    *,
    kind: Literal["sym", "skew"] = "sym",
    alpha: float = math.pi / 3,
    widths: tuple[int, ...] = (64, 512, 4096),
    epochs: int | None = None,
    init_scale: float = 2.0**-7,
    lr: float = 2.0**-4,
    mass: float = 0.9,
    tol_deg: float = 10.0,
    threads: int | None = 1,
    verbose: bool = True,
) -> dict[str, Any]:
    """Train each width on each seed (model seed; the data seed is 100 + seed); write store, JSON, plots.

    ``summary`` per width: the direction count, the alignment quantiles (all neurons and the 90%-mass
    neurons, degrees), and across widths the largest angle between matched cluster centres. With
    ``verbose``, prints the headline numbers (:func:`headline`).
    """
    t0 = time.time()
    seeds = seeds_list(seeds)
    epochs = epochs if epochs is not None else (2**11 if quick else 2**13)
    log_steps = sorted({0, *[int(2**k) for k in range(4, int(math.log2(epochs)) + 1)], epochs})
    out = out_path(out_dir, "simplicity")
    axes = xor_axes(math.pi / 2 if kind == "sym" else alpha)
    config = dict(seeds=seeds, kind=kind, alpha=alpha if kind == "skew" else math.pi / 2, widths=list(widths),
                  epochs=epochs, init_scale=init_scale, lr=lr, mass=mass, tol_deg=tol_deg, quick=quick)
    per_seed: list[dict[str, Any]] = []
    store = out / "simplicity.h5"
    with torch_threads(threads), StoreWriter(store, mode="overwrite") as w:
        for seed in seeds:
            X, y = gen_sym_data(256, 2, seed=100 + seed) if kind == "sym" else gen_skew_data(512, 2, alpha=alpha, seed=100 + seed)
            rec: dict[str, Any] = {"seed": seed, "widths": {}}
            for m in widths:
                h = train_xor(X, y, width=m, init_scale=init_scale, lr=lr, epochs=epochs, log_steps=log_steps, seed=seed)
                name = f"width{m}_seed{seed}"
                w.add_model(name, role="model", source=f"probekit.experiments.simplicity:xor_relu(width={m})")
                for step, W in h["weights"].items():
                    w.write_weights(name, "0", W.astype(np.float32), step=step)
                Wf = h["weights"][epochs]
                w.write_weights(name, "0", Wf.astype(np.float32))
                over_time = []
                for step in log_steps:
                    c = cluster_directions(h["weights"][step], mass=mass, tol_deg=tol_deg)
                    over_time.append({"step": step, "n_directions": c["n_directions"],
                                      "align95_deg": math.degrees(alignment_quantile(h["weights"][step], axes)),
                                      "scale": float(np.sqrt((h["weights"][step] ** 2).sum())),
                                      "loss": h["loss"][step]})
                c = cluster_directions(Wf, mass=mass, tol_deg=tol_deg)
                rec["widths"][m] = {
                    "n_directions": c["n_directions"],
                    "centers": c["centers"],
                    "shares": c["shares"],
                    "spread_deg": c["spread_deg"],
                    "align95_all_deg": math.degrees(alignment_quantile(Wf, axes)),
                    "align95_mass_deg": math.degrees(alignment_quantile(Wf, axes, mass=mass)),
                    "centers_to_axes_deg": _match_centers(c["centers"], axes),
                    "final_loss": h["loss"][epochs],
                    "over_time": over_time,
                }
                if seed == seeds[0]:
                    np.save(out / f"W_width{m}.npy", Wf)
            ref = rec["widths"][widths[-1]]["centers"]
            for m in widths:
                rec["widths"][m]["centers_vs_widest_deg"] = _match_centers(rec["widths"][m]["centers"], ref)
            per_seed.append(rec)
    summary = {}
    for m in widths:
        rs = [r["widths"][m] for r in per_seed]
        summary[m] = {
            k: mean_sd([r[k] for r in rs])
            for k in ("n_directions", "align95_all_deg", "align95_mass_deg", "centers_to_axes_deg",
                      "centers_vs_widest_deg", "final_loss")
        }
        summary[m]["n_directions_per_seed"] = [r["n_directions"] for r in rs]
    result = {
        "experiment": "simplicity",
        "config": config,
        "summary": summary,
        "same_count_across_widths": all(len({r["widths"][m]["n_directions"] for m in widths}) == 1 for r in per_seed),
        "per_seed": per_seed,
        "store": str(store),
        "seconds": round(time.time() - t0, 1),
    }
    _plot(out, widths, epochs, axes, per_seed, kind)
    result["plots"] = [str(out / "simplicity.png")]
    write_json(out / "simplicity.json", result)
    if verbose:
        print("\n".join(headline(result)))
    return result


def headline(result: dict[str, Any]) -> list[str]:
    """The experiment's headline numbers, a few lines (mean ± sd over seeds)."""
    c = result["config"]
    lines = [f"simplicity: {c['kind']} XOR, {len(c['seeds'])} seed(s), {c['epochs']} epochs of full-batch GD; "
             f"directions = distinct first-layer directions carrying {100 * c['mass']:.0f}% of the weight mass"]
    for m, s in result["summary"].items():
        lines.append(f"  width {m}: {s['n_directions_per_seed']} directions (per seed); 95% quantile angle to the "
                     f"nearest axis {fmt(s['align95_all_deg'], 3)}°; centres vs the widest net "
                     f"{fmt(s['centers_vs_widest_deg'], 3)}°")
    lines.append("  same direction count at every width in every seed: "
                 + ("yes" if result["same_count_across_widths"] else "no"))
    lines.append(f"  ({result['seconds']} s) store {result['store']}, plot {result.get('plots', ['-'])[0]}")
    return lines


def _plot(out, widths, epochs, axes, per_seed, kind: str = "sym") -> None:
    plt = pyplot()
    fig, ax = plt.subplots(1, len(widths) + 1, figsize=(4.4 * (len(widths) + 1), 4.2))
    seed0 = per_seed[0]["seed"]
    for i, m in enumerate(widths):
        W = np.load(out / f"W_width{m}.npy")
        sq = (W**2).sum(1)
        theta = np.degrees(np.arctan2(W[:, 1], W[:, 0]))
        ax[i].scatter(theta, sq / sq.sum(), s=6, label=f"one neuron (seed {seed0})")
        for j, a in enumerate(axes):
            ax[i].axvline(np.degrees(np.arctan2(a[1], a[0])), color="grey", lw=0.8, ls="--",
                          label="XOR cluster axes" if j == 0 else None)
        ax[i].set_title(f"width {m}: each neuron's weight share vs direction\n(end of training, seed {seed0})",
                        fontsize=9)
        ax[i].set_xlabel("direction θ_k of neuron k's weights (degrees)")
        ax[i].set_ylabel("share of weight mass ρ_k = ||w_k||² / Σ_j ||w_j||²", fontsize=8)
        ax[i].set_xlim(-185, 185)
        ax[i].legend(fontsize=7)
    styles = ["-", "--", ":", "-."]
    for si, rec in enumerate(per_seed):
        for wi, m in enumerate(widths):
            ot = rec["widths"][m]["over_time"]
            ax[-1].plot([o["step"] for o in ot], [o["align95_deg"] for o in ot], color=f"C{wi}",
                        ls=styles[si % len(styles)], label=f"width {m}, seed {rec['seed']}")
    ax[-1].set_xscale("symlog", linthresh=16)
    ax[-1].set_yscale("symlog", linthresh=0.1)
    ax[-1].set_title("alignment over training: 95% quantile over neurons\nof the angle to the nearest XOR axis",
                     fontsize=9)
    ax[-1].set_xlabel("epoch (full-batch GD; symlog scale)")
    ax[-1].set_ylabel("angle to the nearest axis (degrees; symlog)")
    ax[-1].legend(fontsize=6, ncol=2 if len(per_seed) > 1 else 1)
    fig.suptitle(f"Simplicity bias on {'symmetric' if kind == 'sym' else 'skewed'} XOR: the first layer's weights "
                 "collapse onto a few directions at every width")
    fig.tight_layout()
    fig.savefig(out / "simplicity.png", dpi=90)
    plt.close(fig)


def _main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m probekit.experiments.simplicity")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--kind", default="sym", choices=["sym", "skew"])
    a = p.parse_args(argv)
    run(seeds=a.seeds, out_dir=a.out, quick=a.quick, kind=a.kind)  # prints its headline
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
