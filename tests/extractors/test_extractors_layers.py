"""Layer selection (names, globs, predicates, name@K) and the layer listing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from probekit.errors import DataError, LayerNotFoundError
from probekit.extractors import LayerInfo, list_layers, parse_selector, resolve_layers


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.layer1 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU())
        self.shared = nn.ReLU()
        self.unused = nn.Linear(3, 3)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.shared(self.stem(x))
        x = self.layer2(self.layer1(x))
        x = self.shared(x)  # `shared` runs twice per forward
        return self.head(x.mean(dim=(2, 3)))


NAMES = ["stem", "layer1", "layer1.0", "layer1.1", "layer2", "layer2.0", "layer2.1", "shared", "unused", "head"]


def test_named_modules_are_what_the_test_assumes():
    assert [n for n, _ in Net().named_modules() if n] == NAMES


def test_exact_names_keep_request_order():
    assert resolve_layers(Net(), ["head", "stem", "layer1.0"]) == ["head", "stem", "layer1.0"]
    assert resolve_layers(Net(), "layer2") == ["layer2"]


def test_glob_expands_in_model_order_and_dedupes():
    net = Net()
    assert resolve_layers(net, "layer?") == ["layer1", "layer2"]
    # fnmatch's * crosses dots
    assert resolve_layers(net, "layer*") == ["layer1", "layer1.0", "layer1.1", "layer2", "layer2.0", "layer2.1"]
    assert resolve_layers(net, "layer*.1") == ["layer1.1", "layer2.1"]
    assert resolve_layers(net, ["head", "layer?", "layer1"]) == ["head", "layer1", "layer2"]


def test_glob_never_picks_the_root():
    assert resolve_layers(nn.Sequential(nn.ReLU()), "*") == ["0"]


def test_predicate_with_name_or_with_module():
    net = Net()
    assert resolve_layers(net, lambda name: name.endswith(".0")) == ["layer1.0", "layer2.0"]
    assert resolve_layers(net, lambda name, m: isinstance(m, nn.Linear)) == ["unused", "head"]
    with pytest.raises(LayerNotFoundError, match="matches no module of Net"):
        resolve_layers(net, lambda name: False)


def test_call_selector_is_parsed_and_kept():
    assert parse_selector("shared@1") == ("shared", 1)
    assert parse_selector("blocks.0") == ("blocks.0", None)
    assert parse_selector("odd@name") == ("odd@name", None)
    assert resolve_layers(Net(), ["shared@1", "shared@0"]) == ["shared@1", "shared@0"]
    assert resolve_layers(Net(), "layer?.1@0") == ["layer1.1@0", "layer2.1@0"]


def test_unknown_layer_names_close_matches_and_the_hint_exact_message():
    net = nn.Sequential()
    net.add_module("encoder", nn.Linear(2, 2))
    net.add_module("classifier", nn.Linear(2, 2))
    with pytest.raises(LayerNotFoundError) as info:
        resolve_layers(net, "clasifier")
    assert str(info.value) == (
        "No layer of Sequential matches 'clasifier'. Closest names: 'classifier'. "
        "Run `probekit layers MODEL` to list them."
    )
    with pytest.raises(LayerNotFoundError) as info:
        resolve_layers(Net(), "layr1")
    msg = str(info.value)
    assert msg.startswith("No layer of Net matches 'layr1'. Closest names: ")
    close = msg.split("Closest names: ")[1].split(". Run")[0].split(", ")
    assert "'layer1'" in close and "'head'" not in close and len(close) <= 5


def test_unknown_glob_and_one_bad_item_in_a_list():
    with pytest.raises(LayerNotFoundError) as info:
        resolve_layers(Net(), ["head", "blocks.*"])
    assert str(info.value).startswith("No layer of Net matches 'blocks.*'. No similar name; its top-level modules are 'stem'")
    assert str(info.value).endswith("Run `probekit layers MODEL` to list them.")
    with pytest.raises(LayerNotFoundError) as info:
        resolve_layers(Net(), "zzzzzz")
    top = list(dict.fromkeys(n.split(".")[0] for n, _ in Net().named_modules() if n))
    assert f"No similar name; its top-level modules are {', '.join(repr(t) for t in top)}" in str(info.value)


def test_empty_or_bad_layer_requests():
    with pytest.raises(DataError, match="empty"):
        resolve_layers(Net(), [])
    with pytest.raises(DataError, match="must hold strings"):
        resolve_layers(Net(), ["head", 3])
    with pytest.raises(DataError, match="Got int instead"):
        resolve_layers(Net(), 3)


def test_list_layers_shapes_and_calls_from_one_forward():
    net = Net()
    net.train()
    net.layer1.eval()  # a mixed state must come back exactly
    infos = list_layers(net, (3, 8, 8))
    by_name = {i.name: i for i in infos}
    assert [i.name for i in infos] == NAMES
    assert by_name["stem"] == LayerInfo("stem", "Conv2d", (4, 8, 8), 1)
    assert by_name["layer2"].output_shape == (8, 4, 4)
    assert by_name["shared"].n_calls == 2
    assert by_name["shared"].output_shape == (4, 8, 8)  # shape of the first call
    assert by_name["unused"] == LayerInfo("unused", "Linear", None, 0)
    assert by_name["head"].output_shape == (5,)
    assert net.training and not net.layer1.training and not net.layer1[0].training and net.layer2.training
    for m in net.modules():
        assert not m._forward_hooks


def test_list_layers_removes_hooks_when_forward_raises():
    net = Net()
    with pytest.raises(RuntimeError):
        list_layers(net, torch.zeros(1, 5, 8, 8))  # wrong channel count
    assert net.training
    for m in net.modules():
        assert not m._forward_hooks


def test_list_layers_tuple_output_uses_first_tensor():
    class TupleOut(nn.Module):
        def forward(self, x):
            return (None, x * 2, x[:, :1])

    net = nn.Sequential(TupleOut())
    infos = list_layers(net, torch.zeros(2, 3, 4))
    assert infos[0].output_shape == (3, 4)
