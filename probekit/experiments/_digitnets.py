"""Small CNNs for background digits and their trainers (teacher, distilled student, controls).

The setup of the background-digits pilot (docs/EXPERIMENTS.md): a teacher CNN (3 conv blocks 16/32/64, ReLU, max-pool; fc 128 +
ReLU = the representation; fc 10) trained with cross-entropy on the broad ``union`` background
family, and a student of the same trunk with a linear 128-d head trained on ID images only to fit
the teacher's representation with MSE. Backgrounds and placements are redrawn every epoch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..datasets import BackgroundDigits

__all__ = [
    "DigitCNN",
    "fit_random_features_student",
    "render_split",
    "representations",
    "train_erm",
    "train_student",
    "train_teacher",
]


class DigitCNN(nn.Module):
    """Three conv blocks (16/32/64 channels, 3x3, ReLU, 2x2 max-pool) and a 128-d representation.

    Parameters
    ----------
    head : {"classifier", "representation"}
        ``classifier`` (teacher, ERM): ``rep`` is Linear(576, 128) + ReLU and ``head`` a Linear(128,
        10); ``forward`` returns logits. ``representation`` (student): ``rep`` is a plain
        Linear(576, 128) and ``forward`` returns it.

    Layers (``named_modules`` names): ``block1``, ``block2``, ``block3`` (outputs after pooling;
    ``block1.0`` is the first conv), ``rep`` (the 128-d representation), ``head``.
    """

    def __init__(self, head: Literal["classifier", "representation"] = "classifier", n_classes: int = 10) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))

        self.block1 = block(3, 16)
        self.block2 = block(16, 32)
        self.block3 = block(32, 64)
        self.head_kind = head
        if head == "classifier":
            self.rep: nn.Module = nn.Sequential(nn.Flatten(), nn.Linear(576, 128), nn.ReLU())
            self.head: nn.Module | None = nn.Linear(128, n_classes)
        elif head == "representation":
            self.rep = nn.Sequential(nn.Flatten(), nn.Linear(576, 128))
            self.head = None
        else:
            raise ValueError(f"head must be 'classifier' or 'representation', got {head!r}")

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return self.block3(self.block2(self.block1(x)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The 128-d representation."""
        return self.rep(self.trunk(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.features(x)
        return self.head(z) if self.head is not None else z


def render_split(split: str, seed: int, epoch: int = 0, renders: int = 1, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """All items of a bgdigits split as tensors ``(x, label)``."""
    a = BackgroundDigits(split, seed=seed, epoch=epoch, renders=renders, **kw).arrays()
    return torch.from_numpy(a["x"]), torch.from_numpy(a["label"])


@torch.no_grad()
def representations(model: DigitCNN, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """``model.features`` over ``x`` in batches, in eval mode."""
    was = model.training
    model.eval()
    out = torch.cat([model.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    model.train(was)
    return out


def _epochs_loop(
    model: nn.Module,
    split: str,
    seed: int,
    epochs: int,
    lr: float,
    batch_size: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    epoch_offset: int,
    on_epoch: Callable[[int, nn.Module], None] | None,
    composite: str,
) -> nn.Module:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    gen = torch.Generator().manual_seed(seed * 7919 + epoch_offset)
    model.train()
    for ep in range(epochs):
        x, y = render_split(split, seed, epoch=epoch_offset + ep, composite=composite)
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            b = perm[i : i + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[b]), y[b], x[b])
            loss.backward()
            opt.step()
        sched.step()
        if on_epoch is not None:
            on_epoch(ep + 1, model)
    model.eval()
    return model


def train_teacher(
    *,
    seed: int = 0,
    epochs: int = 60,
    split: str = "train_union",
    lr: float = 2e-3,
    batch_size: int = 64,
    composite: str = "additive",
    on_epoch: Callable[[int, nn.Module], None] | None = None,
) -> DigitCNN:
    """Train the teacher: cross-entropy on ``split`` (default the broad ``union`` family).

    Every epoch draws fresh backgrounds and placements (``BackgroundDigits(..., epoch=e)``). Model
    initialisation and batch order are seeded by ``seed``. ``on_epoch(epoch, model)`` is called
    after each epoch (e.g. to record checkpoints).
    """
    torch.manual_seed(seed)
    model = DigitCNN("classifier")
    return _epochs_loop(
        model, split, seed, epochs, lr, batch_size, lambda out, y, _x: F.cross_entropy(out, y), 0, on_epoch, composite
    )


def train_erm(*, seed: int = 0, epochs: int = 60, split: str = "train", **kw) -> DigitCNN:
    """The ERM-ID control: the teacher's architecture trained with cross-entropy on ID only."""
    return train_teacher(seed=seed, epochs=epochs, split=split, **kw)


def train_student(
    teacher: DigitCNN,
    *,
    seed: int = 0,
    epochs: int = 150,
    split: str = "train",
    lr: float = 2e-3,
    batch_size: int = 64,
    composite: str = "additive",
    init: DigitCNN | None = None,
    on_epoch: Callable[[int, nn.Module], None] | None = None,
) -> DigitCNN:
    """Distil ``teacher``'s 128-d representation into a fresh student with MSE, on ``split`` images.

    ``split="train"`` (ID backgrounds) is the paper's setting; ``"train_union"`` is the S-aug
    control. No labels are used. ``init`` gives the student's starting weights (default: a fresh
    ``DigitCNN("representation")`` seeded by ``seed + 1000``), so the caller can keep the
    initialisation for before/after comparisons.
    """
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if init is None:
        torch.manual_seed(seed + 1000)
        init = DigitCNN("representation")
    student = copy.deepcopy(init)

    def loss(out: torch.Tensor, _y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = teacher.features(x)
        return F.mse_loss(out, target)

    return _epochs_loop(student, split, seed, epochs, lr, batch_size, loss, 10_000, on_epoch, composite)


def fit_random_features_student(
    teacher: DigitCNN,
    *,
    seed: int = 0,
    epochs: int = 4,
    alpha: float = 1.0,
    split: str = "train",
    composite: str = "additive",
    init: DigitCNN | None = None,
) -> DigitCNN:
    """The S-RF control: a frozen random trunk; only the last linear stage is fitted (ridge) to the teacher.

    The trunk keeps its random initialisation (no feature learning); ``rep``'s Linear is the
    closed-form ridge solution from trunk features to the teacher representation on ``epochs``
    renders of the ``split`` images.
    """
    from sklearn.linear_model import Ridge

    if init is None:
        torch.manual_seed(seed + 1000)
        init = DigitCNN("representation")
    student = copy.deepcopy(init).eval()
    feats, targets = [], []
    with torch.no_grad():
        for ep in range(epochs):
            x, _ = render_split(split, seed, epoch=20_000 + ep, composite=composite)
            feats.append(student.trunk(x).flatten(1).numpy())
            targets.append(teacher.features(x).numpy())
    ridge = Ridge(alpha=alpha).fit(np.concatenate(feats), np.concatenate(targets))
    lin = student.rep[1]
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(ridge.coef_.astype(np.float32)))
        lin.bias.copy_(torch.from_numpy(ridge.intercept_.astype(np.float32)))
    return student
