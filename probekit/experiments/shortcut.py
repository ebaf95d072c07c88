"""A shortcut model and a robust one, on generated shapes: the case the verdict must get right.

The same small CNN is trained twice on the built-in ``shapes`` (three shape classes): once where
the background colour equals the class (``background="class"``: a network can classify by colour
alone, and does) and once on random background colours (only the shape tells the class). Both are
audited on the same crossed split (every test shape on the same 9 backgrounds, three of each
class colour): the first must be flagged, the second must not. ``probekit experiment shortcut``
trains both, extracts them into one store, audits it and prints the two verdicts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..audit import audit
from ..datasets import Shapes
from ..extraction import extract
from ._common import out_path, seeds_list, torch_threads, write_json

__all__ = ["ShapesCNN", "run", "train_shapes_cnn"]

SPLITS = ("train", "test", "crossed", "variants")
LAYERS = ["features.0", "features.3", "features.6", "@output"]


class ShapesCNN(nn.Module):
    """Three 3x3 conv blocks (8, 16, 32 channels, ReLU, 2x2 max-pool), global average pool, linear head."""

    def __init__(self, n_classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(32, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_shapes_cnn(background: str = "random", *, seed: int = 0, epochs: int = 20, n_train: int = 1500,
                     lr: float = 3e-3) -> ShapesCNN:
    """Train :class:`ShapesCNN` on ``shapes`` ``train`` with the given background colouring (Adam, batch 32)."""
    data = Shapes("train", seed=seed, background=background, n_train=n_train)
    x = torch.from_numpy(np.stack([data.item(i)["x"] for i in range(len(data))]))
    y = torch.tensor([data.item(i)["label"] for i in range(len(data))])
    torch.manual_seed(seed)
    net = ShapesCNN()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    with torch_threads(1):
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=g).split(32):
                opt.zero_grad()
                nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
                opt.step()
    return net.eval()


def run(seeds: Any = 1, out_dir: str | os.PathLike | None = None, quick: bool = False,
        progress: bool = True, verbose: bool = True) -> dict[str, Any]:
    """Train the shortcut and the robust model per seed, extract, audit; return the verdicts.

    With ``verbose``, prints the two verdicts of every seed (:func:`headline`).
    """
    out = out_path(out_dir, "shortcut")
    results: dict[str, Any] = {"seeds": {}}
    for seed in seeds_list(seeds):
        store = Path(out) / f"shortcut_seed{seed}.h5"
        models = {bg: train_shapes_cnn(bg, seed=seed, epochs=10 if quick else 20)
                  for bg in ("class", "random")}
        names = {"class": "shortcut", "random": "robust"}
        inits = {}
        for k in range(3):
            torch.manual_seed(10_000 + k)
            inits[f"shortcut@init{k}"] = ShapesCNN().eval()
            torch.manual_seed(10_000 + k)
            inits[f"robust@init{k}"] = ShapesCNN().eval()
        for i, split in enumerate(SPLITS):
            data = Shapes(split, seed=seed, background="class" if split in ("train", "test") else "random")
            extract({names[bg]: net for bg, net in models.items()} | inits, data, layers=LAYERS, out=store,
                    split=split, mode="overwrite" if i == 0 else "resume", progress=progress,
                    source="probekit.experiments.shortcut:ShapesCNN")
        doc = audit(store, train="train", test_id="test", test_ood="test", progress=progress).data
        results["seeds"][seed] = {m: {"flagged": doc["models"][m]["flagged"],
                                      "verdict": doc["models"][m]["verdict"]} for m in names.values()}
    write_json(Path(out) / "shortcut.json", results)
    if verbose:
        print("\n".join(headline(results)))
    return results


def headline(results: dict[str, Any]) -> list[str]:
    """The two verdicts per seed: the shortcut model must be flagged, the robust one must not."""
    lines = ["shortcut: a CNN trained where the background colour gives the class (shortcut) and one trained on "
             "random background colours (robust), audited on the same crossed split"]
    for seed, r in results["seeds"].items():
        ok = r["shortcut"]["flagged"] and not r["robust"]["flagged"]
        lines.append(f"  seed {seed}: " + ("as expected" if ok else "NOT as expected")
                     + " (shortcut flagged, robust not)")
        for m in ("shortcut", "robust"):
            tag = {True: "FLAGGED", False: "not flagged", None: "not judged"}[r[m]["flagged"]]
            lines.append(f"    [{tag}] {r[m]['verdict']}")
    return lines
