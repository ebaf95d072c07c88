"""``--precision``: reduced precision for the audit's forward passes only where it cannot move a verdict.

Oracles: planted nets whose behaviour in bfloat16 is known by construction (bf16 autocast runs on the
CPU): a head whose two logits differ by less than bf16's rounding (its top-1 predictions collapse to one
class: the guard must fall back), a layer that subtracts two large nearly equal inputs (its output's
relative error is far above the tolerance), and a head with wide margins on clustered inputs (nothing
can move: bf16 is kept). End to end, a planted shortcut model audited in bf16 gets the verdict it gets in
float32.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from probekit._precision import TOLERANCE, check_precision, choose_precision, guard
from probekit.errors import DataError
from probekit.extractors import ModelSpec, capture, forward_precision


def _near_tie(d: int = 16) -> nn.Module:
    """Two logits that differ by ~1e-6 relative: equal once the head's weights are rounded to bf16."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 2))
    with torch.no_grad():
        net[2].weight[1] = net[2].weight[0] + 1e-6 * torch.randn(d)
        net[2].bias.zero_()
    return net.eval()


def _clustered(n: int = 24) -> tuple[nn.Module, TensorDataset]:
    """Inputs near 4 x one-hot, an identity body and a 3x identity head: margins of about 12."""
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(4)), net[0].bias.zero_()
        net[2].weight.copy_(3 * torch.eye(4)), net[2].bias.zero_()
    g = torch.Generator().manual_seed(1)
    y = torch.arange(n) % 4
    x = 4 * nn.functional.one_hot(y, 4).float() + 0.1 * torch.randn(n, 4, generator=g)
    return net.eval(), TensorDataset(x, y)


def test_near_tie_falls_back_to_fp32():
    net = _near_tie()
    data = TensorDataset(torch.randn(32, 16, generator=torch.Generator().manual_seed(2)), torch.zeros(32))
    with torch.no_grad():
        fp32 = net(data.tensors[0]).argmax(1)
    assert 0 < int(fp32.sum()) < 32  # both classes in fp32: a collapse to one class flips some
    choice = guard(choose_precision("bf16", "cpu"), "cpu", {"m": ModelSpec(net, ["0", "@output"])}, data, 32)
    assert choice.used == "fp32" and choice.dtype is None
    assert choice.checked["top1_differ"]["m"] > 0
    assert choice.reason.startswith("bf16 moved") and "top-1 predictions of m" in choice.reason
    assert choice.record()["requested"] == "bf16"


def test_cancelling_layer_falls_back_on_the_activations():
    net = nn.Sequential(nn.Linear(2, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, -1.0]])), net[0].bias.zero_()
    g = torch.Generator().manual_seed(3)
    data = TensorDataset(50 + torch.randn(16, 2, generator=g))  # x0 - x1 ~ 1.4; bf16 rounds 50 to 0.25
    choice = guard(choose_precision("bf16", "cpu"), "cpu", {"m": ModelSpec(net, ["0"])}, data, 16)
    assert choice.used == "fp32" and choice.checked["max_rel_error"]["m"] > TOLERANCE
    assert "moved the activations of m" in choice.reason and "top1_differ" in choice.checked


def test_wide_margins_keep_bf16():
    net, data = _clustered()
    choice = guard(choose_precision("bf16", "cpu"), "cpu", {"m": ModelSpec(net, ["0", "@output"])}, data, 24)
    assert choice.used == "bf16" and choice.dtype == torch.bfloat16 and choice.reason is None
    assert choice.checked["top1_differ"] == {"m": 0}
    assert 0 < choice.checked["max_rel_error"]["m"] <= TOLERANCE  # bf16 did run: not exactly fp32


def test_a_net_that_cannot_take_the_batch_leaves_the_error_to_the_extraction():
    net, _ = _clustered()
    data = TensorDataset(torch.randn(4, 7))  # 7 features for a net of 4
    choice = guard(choose_precision("bf16", "cpu"), "cpu", {"m": ModelSpec(net, ["0"])}, data, 4)
    assert choice.used == "fp32" and choice.reason == "the guard's first batch raised RuntimeError in m"


def test_auto_is_fp32_off_cuda_and_bad_values_refused():
    c = choose_precision("auto", "cpu")
    assert c.used == "fp32" and "cpu" in c.reason
    assert choose_precision("fp32", "cpu").reason is None
    with pytest.raises(DataError, match="--precision must be one of auto, fp32, bf16, fp16"):
        check_precision("half")


def test_forward_precision_autocasts_capture_and_pools_in_fp32():
    net, data = _clustered()
    x = data.tensors[0]
    with capture(net, ["0", "@output"], pool="avg") as cap:
        ref = cap.run(x)
        with forward_precision(torch.bfloat16):
            low = cap.run(x)
        again = cap.run(x)
    assert low["0"].dtype == torch.float32  # pooled in float32
    assert not torch.equal(low["0"], ref["0"])  # the forward pass did run in bf16
    torch.testing.assert_close(low["0"], ref["0"], rtol=2e-2, atol=2e-2)
    assert torch.equal(again["0"], ref["0"])  # outside the block nothing changes
    with pytest.raises(DataError):
        with forward_precision(torch.int8):
            pass


@pytest.mark.slow
def test_bf16_audit_gives_the_fp32_verdict_on_a_planted_shortcut(tmp_path, capsys):
    from probekit.datasets._shapes import write_image_folder
    from probekit.experiments.shortcut import train_shapes_cnn
    from probekit.model_audit import audit_model

    images, masks = write_image_folder(tmp_path / "f", split="test", background="class", n=24)
    w = tmp_path / "m.pt"
    torch.save(train_shapes_cnn("class", seed=1, epochs=3).state_dict(), w)
    kw = {"weights": w, "masks": masks, "n_inits": 1, "n_backgrounds": 4, "workers": 0, "n_boot": 40, "n_perm": 20,
          "progress": False}
    docs = {p: audit_model("probekit.experiments.shortcut:ShapesCNN", images, out=tmp_path / p, precision=p,
                           device="auto" if p == "bf16" else "cpu", **{**kw, "progress": p == "bf16"}).data
            for p in ("fp32", "bf16")}
    err = capsys.readouterr().err
    assert "probekit audit: device: cpu" in err  # --device auto says what it picked
    assert "probekit audit: precision bf16 (checked on a first batch of each net" in err
    assert docs["bf16"]["cost"]["precision"]["used"] == "bf16"  # the guard kept it
    assert set(docs["bf16"]["cost"]["precision"]["checked"]["samples"]) == {"model", "model@init0"}
    assert docs["fp32"]["cost"]["precision"] == {"requested": "fp32", "used": "fp32", "reason": None, "checked": {}}
    a, b = docs["fp32"]["models"]["model"], docs["bf16"]["models"]["model"]
    assert a["flagged"] and b["flagged"]
    assert a["verdict"] == b["verdict"]
    for k in ("flip_rate", "follows_background"):
        assert abs(a["behaviour"][k]["value"] - b["behaviour"][k]["value"]) <= 0.05
