"""The README's Recorder lines pasted into an ordinary training script (a loop that knows nothing of
probekit, one probe set with the Recorder's default split name): training is bit-identical to the
script without them, and ``probekit analyze`` / ``probekit report`` on the store draw the run's story
over training (a series figure in the HTML, a verdict sentence in the audit JSON)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from probekit.cli import main as cli

README = Path(__file__).resolve().parents[2] / "README.md"

SCRIPT = '''
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import probekit

torch.manual_seed(0)
g = torch.Generator().manual_seed(1)
centres = 2.0 * torch.randn(3, 3, 8, 8, generator=g)
def make(n):
    y = torch.arange(n) % 3
    return TensorDataset(centres[y] + torch.randn(n, 3, 8, 8, generator=g), y)
data, probe_set = make(192), make(90)

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(8, 3)
    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.bn(self.conv1(x)))))
        return self.fc(self.drop(torch.relu(self.conv3(x)).mean(dim=(2, 3))))

model = Net()
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
loader = DataLoader(data, batch_size=32, shuffle=True)
model.train()
#RECORDER#
for epoch in range(4):
    for step0, (x, y) in enumerate(loader):
        step = epoch * len(loader) + step0
        #STEP#
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
final = {k: v.clone() for k, v in model.state_dict().items()}
'''


def _readme_lines() -> tuple[str, str]:
    text = README.read_text()
    section = text[text.index("## In your training loop"):]
    section = section[: section.index("\n## ", 3)]
    block = re.search(r"```\n(.*?)```", section, flags=re.S).group(1)
    rec = next(line for line in block.splitlines() if "probekit.Recorder(" in line)
    step = next(line.strip() for line in block.splitlines() if "rec.step(" in line)
    return rec, step


def _run(with_recorder: bool) -> dict:
    rec, step = _readme_lines() if with_recorder else ("", "pass")
    ns: dict = {"__name__": "user_script"}
    exec(compile(SCRIPT.replace("#RECORDER#", rec).replace("#STEP#", step), "train.py", "exec"), ns)
    return ns


@pytest.mark.slow
def test_readme_recorder_lines_train_bit_identically_and_report_draws_the_run(tmp_path, monkeypatch):
    rec_line, _ = _readme_lines()
    assert "split=" not in rec_line and "{" not in rec_line  # one probe set, the default split name
    monkeypatch.chdir(tmp_path)
    plain = _run(False)["final"]
    ns = _run(True)
    recorded = ns["final"]
    assert plain.keys() == recorded.keys()
    for k in plain:  # bit for bit, BatchNorm running statistics included
        assert torch_equal(plain[k], recorded[k]), k
    store = tmp_path / re.search(r'out="([^"]+)"', rec_line).group(1)
    every = int(re.search(r"every=(\d+)", rec_line).group(1))
    assert ns["rec"].recorded == list(range(0, 24, every))

    assert cli(["analyze", str(store), "--json", "audit.json", "--no-progress"]) == 0
    doc = json.loads(Path("audit.json").read_text())
    assert cli(["report", str(store), "-o", "run.html", "--audit", "audit.json"]) == 0
    html = Path("run.html").read_text()

    r = doc["series"]["model"]
    assert r["splits"] == ["probe"] and r["steps"] == ns["rec"].recorded
    p = r["probe"]["conv3"]
    assert p["method"] == "cv" and p["train"] == "probe" and len(p["accuracy"]) == len(r["steps"])
    # three separable classes: the trained network's conv3 separates them far above chance (1/3)
    assert p["accuracy"][-1] > 0.8
    assert r["cka_to_last"]["conv3"]["values"][-1] == pytest.approx(1.0, abs=1e-6)
    assert set(r["directions"]) == {"conv2", "conv3"}
    verdict = [line for line in doc["verdict"] if "recorded steps" in line]
    assert len(verdict) == 1 and "cross-validated within split 'probe'" in verdict[0], doc["verdict"]
    reasons = " | ".join(k["reason"] for k in doc["skipped"])
    assert "the store has no weight rows" not in reasons
    # the series section holds the figure over training
    sec = html[html.index('id="training"'):]
    sec = sec[: sec.find("<section", 10)] if "<section" in sec[10:] else sec
    assert sec.count("<img") >= 1 and "data:image/png;base64," in sec


def torch_equal(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.numpy(), b.numpy())
