"""Feature contamination in a two-layer network on the structured feature model (Zhang et al. 2024).

Setup (the synthetic model of the authors' code, ``toy.py``, in the configuration their README names
as matching the theory; docs/EXPERIMENTS.md): x = [x_core, x_bg] V with a linearly
separable core, x_bg ~ U[0,1]^32 independent of y, OOD = the same points with x_bg flipped to
-U[0,1]^32; a width-256 two-layer network with biases, frozen output layer (a_j = +-1/m), hinge
loss, full-batch SGD with momentum. ReLU against the identity activation (and optionally GELU,
tanh). Tracked over training: the mean core and background weight projections
(1/m) sum_j ||C w_j|| and (1/m) sum_j ||B w_j|| and the ID and OOD losses.

The finding to reproduce: with ReLU the background projection grows above its initial level and the
OOD loss stays high while the ID loss goes to ~0; with the identity neither happens (for a linear
model the background terms cancel in the gradient: E[x_bg] is the same for both classes and the
gradient weights the classes with opposite signs).

Run: ``python -m probekit.experiments.contamination --out DIR`` or
``probekit.experiments.contamination.run(seeds=3, out_dir=DIR)``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ..analyses import weight_projections
from ..datasets import StructuredFeatures, make_structured
from ..store import StoreWriter
from ._common import fmt, mean_sd, out_path, pyplot, seeds_list, torch_threads, write_json

__all__ = ["TwoLayerNet", "run", "train_two_layer"]

Activation = Literal["relu", "identity", "gelu", "tanh", "leaky_relu", "sigmoid"]
_ACTS = {
    "relu": nn.ReLU,
    "identity": nn.Identity,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "sigmoid": nn.Sigmoid,
}


class TwoLayerNet(nn.Module):
    """``f(x) = sum_j a_j act(w_j . x + b_j) + b``, PyTorch default initialisation.

    With ``freeze_output=True`` the output layer is fixed to ``a_j = +1/m`` for the first half of
    the units and ``-1/m`` for the rest, with output bias 0 (not trained).
    """

    def __init__(self, d: int, width: int = 256, activation: Activation = "relu", freeze_output: bool = True) -> None:
        super().__init__()
        if activation not in _ACTS:
            raise ValueError(f"activation must be one of {sorted(_ACTS)}, got {activation!r}")
        self.fc1 = nn.Linear(d, width)
        self.act = _ACTS[activation]()
        self.fc2 = nn.Linear(width, 1)
        if freeze_output:
            with torch.no_grad():
                a = torch.full((1, width), 1.0 / width)
                a[:, width // 2 :] = -1.0 / width
                self.fc2.weight.copy_(a)
                self.fc2.bias.zero_()
            self.fc2.weight.requires_grad_(False)
            self.fc2.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x))).squeeze(-1)


def _loss(name: str, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if name == "hinge":
        return torch.clamp(1 - y * f, min=0).mean()
    if name == "logistic":
        return nn.functional.softplus(-y * f).mean()
    raise ValueError(f"loss must be 'hinge' or 'logistic', got {name!r}")


def _projections(W: np.ndarray, data: StructuredFeatures) -> tuple[float, float]:
    """Mean core and background projections (``probekit.analyses.weight_projections``)."""
    r = weight_projections(W, data.core_basis, data.bg_basis)
    return r.core, r.background


def train_two_layer(
    data: StructuredFeatures,
    *,
    activation: Activation = "relu",
    width: int = 256,
    loss: Literal["hinge", "logistic"] = "hinge",
    optimizer: Literal["sgd", "adamw"] = "sgd",
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 1e-3,
    steps: int = 2000,
    log_every: int = 100,
    freeze_output: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Full-batch training on ``data.X`` (ID); returns the history and the first-layer weights over steps.

    Returns
    -------
    dict with ``steps`` (logged steps, 0 included), ``core``, ``background`` (mean weight
    projections), ``id_loss``, ``ood_loss``, ``id_acc``, ``ood_acc`` (lists over logged steps),
    ``weights`` ({step: ndarray (width, d)}) and ``model``.
    """
    torch.manual_seed(seed)
    X = torch.tensor(data.X, dtype=torch.float32)
    Xo = torch.tensor(data.X_ood, dtype=torch.float32)
    y = torch.tensor(data.y, dtype=torch.float32)
    net = TwoLayerNet(X.shape[1], width, activation, freeze_output)
    params = [p for p in net.parameters() if p.requires_grad]
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
    hist: dict[str, Any] = {k: [] for k in ("steps", "core", "background", "id_loss", "ood_loss", "id_acc", "ood_acc")}
    hist["weights"] = {}

    def log(step: int) -> None:
        with torch.no_grad():
            f, fo = net(X), net(Xo)
            W = net.fc1.weight.detach().numpy().astype(np.float64)
        core, bg = _projections(W, data)
        hist["steps"].append(step)
        hist["core"].append(core)
        hist["background"].append(bg)
        hist["id_loss"].append(float(_loss(loss, f, y)))
        hist["ood_loss"].append(float(_loss(loss, fo, y)))
        hist["id_acc"].append(float(((f > 0).float() * 2 - 1 == y).float().mean()))
        hist["ood_acc"].append(float(((fo > 0).float() * 2 - 1 == y).float().mean()))
        hist["weights"][step] = W.astype(np.float32)

    log(0)
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        _loss(loss, net(X), y).backward()
        opt.step()
        if step % log_every == 0 or step == steps:
            log(step)
    hist["model"] = net
    return hist


def run(
    seeds: int | Iterable[int] = 3,
    out_dir: str | None = None,
    quick: bool = False,
    *,
    activations: tuple[str, ...] = ("relu", "identity"),
    nonlinear: bool = False,
    loss: Literal["hinge", "logistic"] = "hinge",
    freeze_output: bool = True,
    steps: int | None = None,
    lr: float = 0.05,
    n: int = 1000,
    threads: int | None = 1,
    verbose: bool = True,
) -> dict[str, Any]:
    """Train each activation on each seed; write ``contamination.h5``, ``contamination.json``, plots.

    The JSON's ``summary`` gives, per activation and as mean ± sd over seeds: the background
    projection's growth ``bg_final / bg_init``, the core growth, the final ID and OOD losses and
    their gap ``ood_loss - id_loss``, and the OOD accuracy. With ``verbose``, prints the headline
    numbers (:func:`headline`).
    """
    t0 = time.time()
    seeds = seeds_list(seeds)
    steps = steps if steps is not None else (300 if quick else 1500)
    log_every = max(1, steps // 30)
    out = out_path(out_dir, "contamination")
    config = dict(
        seeds=seeds, activations=list(activations), nonlinear=nonlinear, loss=loss, freeze_output=freeze_output,
        optimizer="sgd", momentum=0.9, weight_decay=1e-3, lr=lr, steps=steps, n=n, width=256,
        d_core=32, d_bg=32, d=256, quick=quick,
    )
    per_seed: dict[str, list[dict[str, Any]]] = {a: [] for a in activations}
    store = out / "contamination.h5"
    with torch_threads(threads), StoreWriter(store, mode="overwrite") as w:
        for seed in seeds:
            data = make_structured(n, nonlinear=nonlinear, seed=seed)
            for act in activations:
                h = train_two_layer(
                    data, activation=act, loss=loss, lr=lr, steps=steps, log_every=log_every,
                    freeze_output=freeze_output, seed=seed,
                )
                name = f"{act}_seed{seed}"
                w.add_model(name, role="model", source=f"probekit.experiments.contamination:TwoLayerNet({act})")
                for step, W in h["weights"].items():
                    w.write_weights(name, "fc1", W, step=step)
                w.write_weights(name, "fc1", h["weights"][h["steps"][-1]])
                rec = {k: h[k] for k in ("steps", "core", "background", "id_loss", "ood_loss", "id_acc", "ood_acc")}
                rec.update(
                    seed=seed,
                    bg_growth=h["background"][-1] / h["background"][0],
                    core_growth=h["core"][-1] / h["core"][0],
                    bg_max_growth=max(h["background"]) / h["background"][0],
                    final_id_loss=h["id_loss"][-1],
                    final_ood_loss=h["ood_loss"][-1],
                    loss_gap=h["ood_loss"][-1] - h["id_loss"][-1],
                    final_ood_acc=h["ood_acc"][-1],
                    final_id_acc=h["id_acc"][-1],
                )
                per_seed[act].append(rec)
    keys = ("bg_growth", "bg_max_growth", "core_growth", "final_id_loss", "final_ood_loss", "loss_gap",
            "final_id_acc", "final_ood_acc")
    summary = {a: {k: mean_sd([r[k] for r in per_seed[a]]) for k in keys} for a in activations}
    result = {
        "experiment": "contamination",
        "config": config,
        "summary": summary,
        "per_seed": per_seed,
        "store": str(store),
        "seconds": round(time.time() - t0, 1),
    }
    _plot(per_seed, out, config)
    result["plots"] = [str(out / "contamination.png")]
    write_json(out / "contamination.json", result)
    if verbose:
        print("\n".join(headline(result)))
    return result


ACTIVATION_LABELS = {
    "relu": "ReLU network",
    "identity": "identity activation (a linear network)",
    "gelu": "GELU network",
    "tanh": "tanh network",
    "leaky_relu": "LeakyReLU(0.1) network",
    "sigmoid": "sigmoid network",
}


def headline(result: dict[str, Any]) -> list[str]:
    """The experiment's headline numbers, a few lines (mean ± sd over seeds)."""
    c = result["config"]
    lines = [f"contamination: {len(c['seeds'])} seed(s), two-layer width-{c['width']} networks, {c['loss']} loss, "
             f"{c['steps']} full-batch SGD steps (background projection = (1/m) Σ_j ||B w_j||, relative to step 0)"]
    for act, s in result["summary"].items():
        grows = s["bg_max_growth"]["mean"] > 1.0 + 1e-6
        lines.append(
            f"  {ACTIVATION_LABELS.get(act, act)}: background projection "
            + (f"peaks at {fmt(s['bg_max_growth'])}x its initial level, ends at {fmt(s['bg_growth'])}x"
               if grows else f"never rises above its initial level, ends at {fmt(s['bg_growth'])}x")
            + f"; OOD minus ID loss {fmt(s['loss_gap'])}; OOD accuracy {fmt(s['final_ood_acc'])}")
    lines.append(f"  ({result['seconds']} s) store {result['store']}, plot {result.get('plots', ['-'])[0]}")
    return lines


def _plot(per_seed: dict[str, list[dict[str, Any]]], out, config: dict[str, Any] | None = None) -> None:
    from matplotlib.lines import Line2D

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    colours = {"relu": "C3", "identity": "C0", "gelu": "C1", "tanh": "C2", "leaky_relu": "C4", "sigmoid": "C5"}
    markers = ["o", "s", "^", "D", "v", "P", "X"]
    seeds = sorted({r["seed"] for recs in per_seed.values() for r in recs})
    for act, recs in per_seed.items():
        c = colours.get(act, "k")
        for r in recs:
            mk = markers[seeds.index(r["seed"]) % len(markers)]
            s = np.asarray(r["steps"])
            every = max(1, len(s) // 8)
            kw = dict(color=c, alpha=0.8, marker=mk, ms=4, markevery=every)
            axes[0].plot(s, np.asarray(r["background"]) / r["background"][0], **kw)
            axes[1].plot(s, np.asarray(r["core"]) / r["core"][0], **kw)
            # ID: thick, pale, underneath; OOD: thin dashed on top, so neither hides the other
            axes[2].plot(s, r["id_loss"], color=c, lw=3.5, alpha=0.35, ls="-", zorder=1)
            axes[2].plot(s, r["ood_loss"], color=c, lw=1.2, ls="--", marker=mk, ms=4, markevery=every, zorder=2)
    loss = (config or {}).get("loss", "hinge")
    axes[0].set_title("background projection (1/m) Σ_j ||B w_j||, relative to init")
    axes[0].set_ylabel("background projection / value at step 0 (×)")
    axes[1].set_title("core projection (1/m) Σ_j ||C w_j||, relative to init")
    axes[1].set_ylabel("core projection / value at step 0 (×)")
    axes[2].set_title(f"{loss} loss on training (ID) and background-flipped (OOD) data")
    axes[2].set_ylabel(f"mean {loss} loss")
    axes[2].set_yscale("symlog", linthresh=1e-3)
    for a in axes:
        a.set_xlabel("training step (full-batch SGD)")
    for a in axes[:2]:
        a.axhline(1.0, color="grey", lw=0.8, ls=":")
    act_handles = [Line2D([], [], color=colours.get(a, "k"), label=ACTIVATION_LABELS.get(a, a)) for a in per_seed]
    seed_handles = [Line2D([], [], color="k", ls="none", marker=markers[i % len(markers)], label=f"seed {sd}")
                    for i, sd in enumerate(seeds)]
    axes[0].legend(handles=act_handles + seed_handles + [Line2D([], [], color="grey", lw=0.8, ls=":",
                                                                  label="initial level (1×)")], fontsize=7)
    axes[1].legend(handles=act_handles + seed_handles, fontsize=7)
    axes[2].legend(handles=act_handles + seed_handles + [
        Line2D([], [], color="k", lw=3.5, alpha=0.35, label="ID loss (training data)"),
        Line2D([], [], color="k", lw=1.2, ls="--", label="OOD loss (background sign flipped)")], fontsize=7)
    fig.suptitle("Feature contamination on the structured feature model: ReLU learns the label-independent "
                 "background, a linear network does not")
    fig.tight_layout()
    fig.savefig(out / "contamination.png", dpi=90)
    plt.close(fig)


def _main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m probekit.experiments.contamination")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--activations", default="relu,identity", help="comma list of relu,identity,gelu,tanh,...")
    p.add_argument("--nonlinear", action="store_true", help="two-sphere core instead of the linear one")
    p.add_argument("--loss", default="hinge", choices=["hinge", "logistic"])
    p.add_argument("--train-output", action="store_true", help="train the second layer too")
    p.add_argument("--steps", type=int, default=None)
    a = p.parse_args(argv)
    run(seeds=a.seeds, out_dir=a.out, quick=a.quick, activations=tuple(a.activations.split(",")),
        nonlinear=a.nonlinear, loss=a.loss, freeze_output=not a.train_output, steps=a.steps)  # prints its headline
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
