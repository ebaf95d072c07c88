"""Train a small CNN on background digits in a plain PyTorch loop, recorded by probekit.

The two lines marked ``# probekit`` are all a training script needs: build a Recorder with a small
fixed probe set, call ``rec.step(step)`` in the loop. Then ``probekit.series.series("run.h5")`` gives
the probe accuracy out of distribution, background sensitivity and direction counts over training.

    python examples/train_bgdigits.py --out run.h5        # 99 s on a busy 2-core machine
"""

from __future__ import annotations

import argparse
import time

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
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(2 * width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)  # 24 -> 12
        x = nn.functional.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)  # 12 -> 6
        x = torch.relu(self.conv3(x)).mean(dim=(2, 3))
        return self.fc(self.drop(x))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="run.h5")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--every", type=int, default=10, help="record every N steps (0: recorder off)")
    p.add_argument("--probe-size", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    torch.manual_seed(a.seed)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9)
    loader = DataLoader(get_dataset("bgdigits", "train"), batch_size=a.batch_size, shuffle=True)
    n = a.probe_size
    probe = {  # a small fixed probe set: training digits, unseen digits on OOD backgrounds, the crossed split
        "train": Subset(get_dataset("bgdigits", "train"), range(n)),
        "test_id": Subset(get_dataset("bgdigits", "test_id"), range(n)),
        "test_ood": Subset(get_dataset("bgdigits", "test_ood"), range(n)),
        "crossed": Subset(get_dataset("bgdigits", "crossed"), range(n)),
    }

    rec = pk.Recorder(model, ["conv2", "conv3"], probe, out=a.out, every=a.every) if a.every else None  # probekit

    t0 = time.perf_counter()
    step = 0
    model.train()
    for epoch in range(a.epochs):
        for batch in loader:
            if rec is not None:
                rec.step(step)  # probekit
            loss = nn.functional.cross_entropy(model(batch["x"]), batch["label"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
        print(f"epoch {epoch}: loss {loss.item():.3f} ({time.perf_counter() - t0:.1f} s)")
    if rec is not None:
        rec.record(step)  # the final model too
        print(f"recorded steps {rec.recorded[0]}..{rec.recorded[-1]} ({len(rec.recorded)}) in {a.out}")


if __name__ == "__main__":
    main()
