"""Train a small CNN on background digits with PyTorch Lightning, recorded by probekit's callback.

The one line marked ``# probekit`` is all a Lightning script needs: pass
``probekit.RecorderCallback(layers, probe_set, out=..., every=...)`` to the ``Trainer``. It records the
LightningModule at step 0, after every ``every``-th optimizer step and at the end of training, without
changing training (same final weights, bit for bit). The probe set here is one split (the Recorder's
default name, ``probe``) of the "crossed" images: every digit on the same backgrounds, so the
report draws cross-validated probe accuracy, background sensitivity and the background factors' share
over training, next to CKA to the last step and the direction counts.

    pip install "probekit-audit[lightning]"
    python examples/train_lightning.py --out run.h5
    probekit report run.h5 -o run.html
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

import probekit as pk
from probekit.datasets import get_dataset


class SmallCNN(nn.Module):
    def __init__(self, width: int = 16, n_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(2 * width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)  # 24 -> 12
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)  # 12 -> 6
        x = torch.relu(self.conv3(x)).mean(dim=(2, 3))
        return self.fc(self.drop(x))


class LitCNN(L.LightningModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.net = SmallCNN()
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch["x"]), batch["label"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def main(argv: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Train; return the final state dict (the recorded store is ``--out``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="run.h5")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--train-size", type=int, default=0, help="use the first N training images (0: all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--every", type=int, default=10, help="record every N optimizer steps (0: callback off)")
    p.add_argument("--probe-size", type=int, default=160, help="crossed images in the probe set (16 per backgrounds' round)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    L.seed_everything(a.seed, verbose=False)
    model = LitCNN(lr=a.lr)
    train = get_dataset("bgdigits", "train")
    if a.train_size:
        train = Subset(train, range(a.train_size))
    loader = DataLoader(train, batch_size=a.batch_size, shuffle=True)
    probe_set = Subset(get_dataset("bgdigits", "crossed"), range(a.probe_size))  # digits x the same backgrounds

    callbacks = [pk.RecorderCallback(["net.conv2", "net.conv3"], probe_set, out=a.out, every=a.every)] if a.every else []  # probekit
    trainer = L.Trainer(max_epochs=a.epochs, callbacks=callbacks, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, loader)
    if a.every:
        print(f"recorded steps {callbacks[0].recorder.recorded} in {a.out}")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


if __name__ == "__main__":
    main()
