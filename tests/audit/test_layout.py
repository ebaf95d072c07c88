"""``--memory-format``: channels-last weights for the audit's conv nets only where the first images show nothing moves.

Oracles: the net's own forward pass as it was (the values channels-last must reproduce up to float32
rounding); planted nets that cannot take channels-last by construction (``x.view(n, -1)`` raises on a
channels-last map; ``as_strided`` with the contiguous strides reads the map's values in another order
without raising); the weights' bytes before the audit (what restore must give back). End to end, a
planted shortcut model audited through the CLI with ``--memory-format contiguous`` and by default gets the
same verdict and the same figures within float rounding.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from probekit._layout import TOLERANCE, LayoutChoice, check_memory_format
from probekit.errors import DataError
from probekit.extractors import ModelSpec, capture


class _Conv(nn.Module):
    """Two convolutions, a pooled head; ``tail`` picks how the map reaches the head."""

    def __init__(self, tail: str = "pool") -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.tail = tail
        self.head = nn.Linear(8 if tail == "pool" else 8 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if self.tail == "pool":
            y = y.mean((2, 3))
        elif self.tail == "view":  # raises on a channels-last map
            y = y.view(y.size(0), -1)
        else:  # "strided": reads the storage as if it were contiguous, wrong values without an error
            n, c, h, w = y.shape
            y = y.as_strided((n, c * h * w), (c * h * w, 1))
        return self.head(y)


def _data(n: int = 8) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, 6, 6, generator=g))


def _spec(net: nn.Module) -> ModelSpec:
    return ModelSpec(net.eval(), ["body.1", "body.3", "@output"], pool="avg")


def _cl(net: nn.Module) -> bool:
    w = net.body[0].weight
    return w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()


def test_a_conv_net_runs_channels_last_with_its_values_and_gets_its_weights_back():
    torch.manual_seed(1)
    net = _Conv()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = _data().tensors[0]
    with capture(net, ["body.1", "body.3", "@output"], pool="avg") as cap:
        ref = cap.run(x)
    choice = LayoutChoice("auto")
    choice.apply("cpu", {"m": _spec(net)}, _data())
    assert choice.nets == {"m": "channels_last"} and choice.reasons == {} and _cl(net)
    assert choice.checked["m"]["samples"] == 4 and choice.checked["m"]["top1_differ"] == 0
    assert choice.checked["m"]["max_rel_error"] <= 1e-6  # float32 reordering only
    with capture(net, ["body.1", "body.3", "@output"], pool="avg") as cap:
        got = cap.run(x)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)
    choice.restore()
    assert not _cl(net) and all(t.is_contiguous() for t in net.parameters())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # a change of strides copies exactly
    assert "channels-last for m" in choice.describe()


@pytest.mark.parametrize("tail, why", [("view", "channels-last raised RuntimeError in m"),
                                       ("strided", "channels-last moved")])
def test_a_net_that_cannot_take_channels_last_stays_as_it_was(tail, why):
    torch.manual_seed(2)
    net = _Conv(tail)
    choice = LayoutChoice("auto")
    choice.apply("cpu", {"m": _spec(net)}, _data())
    assert choice.nets == {"m": "contiguous"} and choice.reasons["m"].startswith(why)
    assert not _cl(net)  # undone at once: the extraction runs the net as it came
    if tail == "strided":  # the planted error is order 1, far above float rounding
        assert choice.checked["m"]["max_rel_error"] > 100 * TOLERANCE
    out = net(_data().tensors[0])  # and the net still runs
    assert out.shape == (8, 3)


def test_copies_of_one_architecture_share_its_check():
    torch.manual_seed(3)
    a, b, bad, bad2 = _Conv(), _Conv(), _Conv("view"), _Conv("view")
    choice = LayoutChoice("auto")
    choice.apply("cpu", {"m": _spec(a), "m@init0": _spec(b)}, _data())
    assert choice.nets == {"m": "channels_last", "m@init0": "channels_last"}
    assert choice.checked["m@init0"] == {"as": "m"} and _cl(b)
    # another architecture (the view head's weight is wider), checked on its own, its copy left as it is too
    choice.apply("cpu", {"t": _spec(bad), "t@init0": _spec(bad2)}, _data())
    assert choice.nets["t"] == choice.nets["t@init0"] == "contiguous"
    assert choice.reasons["t@init0"] == choice.reasons["t"] and choice.checked["t@init0"] == {"as": "t"}
    choice.restore()
    assert not any(_cl(n) for n in (a, b, bad, bad2))
    rec = json.loads(json.dumps(choice.record()))  # JSON as audit.json stores it
    assert rec["requested"] == "auto" and set(rec["nets"]) == {"m", "m@init0", "t", "t@init0"}


def test_nets_left_alone_say_why():
    torch.manual_seed(4)
    choice = LayoutChoice(check_memory_format("contiguous"))
    net = _Conv()
    choice.apply("cpu", {"m": _spec(net)}, _data())
    assert choice.reasons == {"m": "requested"} and not _cl(net)
    one = nn.Sequential(nn.Conv2d(3, 4, 6), nn.Flatten(), nn.Linear(4, 2))  # a patch embedding only (ViT-like)
    auto = LayoutChoice("auto")
    auto.apply("cpu", {"v": ModelSpec(one, ["0"])}, _data())
    auto.apply("mps", {"m": _spec(_Conv())}, _data())
    assert auto.reasons == {"v": "fewer than two 2-D convolutions: nothing to gain",
                            "m": "channels-last is used on the CPU and CUDA only, not mps"}
    flat = LayoutChoice("auto")
    flat.apply("cpu", {"m": _spec(_Conv())}, TensorDataset(torch.randn(4, 3, 36)))  # not images
    assert flat.reasons["m"] == "inputs of 2 dimensions, not images"
    assert "memory format: as the nets are" in auto.describe()
    with pytest.raises(DataError, match="--memory-format must be one of auto, contiguous"):
        check_memory_format("channels_last")


def test_a_timm_resnet_matches_its_own_forward_pass():
    timm = pytest.importorskip("timm")
    torch.manual_seed(5)
    net = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    x = torch.randn(4, 3, 64, 64)
    layers = ["layer1", "layer3", "@output"]
    with capture(net, layers, pool="avg") as cap:
        ref = cap.run(x)
    choice = LayoutChoice("auto")
    choice.apply("cpu", {"r": ModelSpec(net, layers, pool="avg")}, TensorDataset(x))
    assert choice.nets == {"r": "channels_last"}
    with capture(net, layers, pool="avg") as cap:
        got = cap.run(x)
    for k in layers:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5)
    choice.restore()


@pytest.mark.slow
def test_the_cli_verdict_does_not_depend_on_the_memory_format(tmp_path, capsys):
    from probekit.cli import main
    from probekit.datasets._shapes import write_image_folder
    from probekit.experiments.shortcut import train_shapes_cnn

    images, masks = write_image_folder(tmp_path / "f", split="test", background="class", n=24)
    w = tmp_path / "m.pt"
    torch.save(train_shapes_cnn("class", seed=1, epochs=3).state_dict(), w)
    docs = {}
    for fmt in ("auto", "contiguous"):
        out = tmp_path / fmt
        rc = main(["audit", "probekit.experiments.shortcut:ShapesCNN", "--data", str(images), "--weights", str(w),
                   "--masks", str(masks), "--inits", "1", "--backgrounds", "4", "--workers", "0", "--n-boot", "40",
                   "--n-perm", "20", "--device", "cpu", "--memory-format", fmt, "--out-dir", str(out),
                   "--fail-on-flag"])
        assert rc == 1  # the planted shortcut is flagged either way
        docs[fmt] = json.loads((out / "audit.json").read_text())
    err = capsys.readouterr().err
    assert "memory format: channels-last for model" in err and "memory format: as the nets are (requested)" in err
    auto, cont = docs["auto"]["cost"]["memory_format"], docs["contiguous"]["cost"]["memory_format"]
    assert auto["nets"] == {"model": "channels_last", "model@init0": "channels_last"}
    assert cont["nets"] == {"model": "contiguous", "model@init0": "contiguous"}
    a, b = docs["auto"]["models"]["model"], docs["contiguous"]["models"]["model"]
    assert a["flagged"] and a["verdict"] == b["verdict"] and a["flagged"] == b["flagged"]
    assert a["behaviour"]["flip_rate"]["value"] == b["behaviour"]["flip_rate"]["value"]  # same predictions
    diffs = _differ(docs["auto"]["models"], docs["contiguous"]["models"])
    assert not diffs, diffs[:10]

    # a module passed to the API leaves the audit with its own weights, in their own format
    from probekit.experiments.shortcut import ShapesCNN
    from probekit.model_audit import audit_model

    net = ShapesCNN()
    net.load_state_dict(torch.load(w, weights_only=True))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    doc = audit_model(net, images, masks=masks, out=tmp_path / "api", n_inits=1, n_backgrounds=2, workers=0,
                      n_boot=20, n_perm=10, mask_check=0, device="cpu", progress=False).data
    assert doc["cost"]["memory_format"]["nets"]["model"] == "channels_last"
    assert all(t.is_contiguous() for t in net.state_dict().values())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def _differ(a, b, path="", rtol=1e-4, atol=1e-5):
    """The leaves of two JSON documents that differ: numbers beyond float rounding, anything else at all."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path}: keys {sorted(set(a) ^ set(b))}"]
        return [d for k in a for d in _differ(a[k], b[k], f"{path}.{k}", rtol, atol)]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: lengths {len(a)} {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _differ(x, y, f"{path}[{i}]", rtol, atol)]
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return [] if abs(a - b) <= atol + rtol * abs(b) else [f"{path}: {a} {b}"]
    return [] if a == b else [f"{path}: {a!r} {b!r}"]
