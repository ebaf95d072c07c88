"""Default layers of every model family, in depth (execution) order, and each layer's default pool.

The expected layers are read off each architecture by hand (which modules are its blocks, which is its
head), not from the code: a ResNet's four stages, a ViT's blocks spread over its depth with the last
included, MobileNet's feature blocks, the blocks of a ModuleList. Every pick must also run in a forward
pass (a ModuleList never does) and extraction of the picks must succeed.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from probekit.errors import DataError
from probekit.extractors import (
    default_layers,
    default_pools,
    execution_order,
    list_layers,
    parse_layer_pools,
    resolve_pools,
)

X32 = torch.zeros(2, 3, 32, 32)


def _spread(n: int, k: int = 4) -> list[int]:
    """k indices spread evenly over 0..n-1, first and last included (the oracle of the spread)."""
    return sorted({round(i * (n - 1) / (k - 1) + 1e-9) for i in range(k)}) if n > k else list(range(n))


class OwnTransformer(nn.Module):
    """A ViT-like model of one's own: blocks in a ModuleList, a class token read by the head."""

    def __init__(self, depth: int = 6, dim: int = 16, n_classes: int = 3) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, stride=8)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, batch_first=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(len(t), -1, -1), t], dim=1)
        for b in self.blocks:
            t = b(t)
        return self.head(self.norm(t)[:, 0])


class MeanTokens(OwnTransformer):
    """The same blocks without a class token: the head averages the tokens."""

    def __init__(self) -> None:
        super().__init__(depth=3)
        del self.cls_token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        for b in self.blocks:
            t = b(t)
        return self.head(self.norm(t).mean(1))


def own_cnn() -> nn.Sequential:
    def stage(i: int, o: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())

    return nn.Sequential(stage(3, 8), stage(8, 8), nn.MaxPool2d(2), stage(8, 16), stage(16, 16), stage(16, 16),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


class Shuffled(nn.Module):
    """Modules created in another order than they run (the head and the last stage first)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 2)
        self.stage2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stage2(self.stage1(self.stem(x))).mean((2, 3)))


def _runs(model: nn.Module, names: list[str], x: torch.Tensor) -> None:
    ran = {i.name for i in list_layers(model, x) if i.n_calls > 0}
    assert set(names) <= ran, set(names) - ran


def test_own_transformer_blocks_in_a_module_list_are_expanded_and_spread():
    net = OwnTransformer(depth=6).eval()
    picks = default_layers(net)
    assert picks == [f"blocks.{i}" for i in _spread(6)]
    assert picks[-1] == "blocks.5" and "blocks" not in picks and "head" not in picks
    assert default_layers(net, example_input=X32) == picks
    _runs(net, picks, X32)
    assert default_layers(OwnTransformer(depth=12)) == [f"blocks.{i}" for i in (0, 4, 7, 11)]


def test_depth_order_is_execution_order_not_name_order():
    net = OwnTransformer(depth=12).eval()
    order = execution_order(net, X32)
    assert order.index("blocks.11") > order.index("blocks.4") > order.index("patch")
    assert "blocks" not in order  # a ModuleList never runs
    assert order.index("head") == len(order) - 1
    sh = Shuffled().eval()
    assert execution_order(sh)[:2] == ["fc", "stage2"]  # registration order without an input
    assert [n for n in execution_order(sh, X32) if "." not in n] == ["stem", "stage1", "stage2", "fc"]
    assert default_layers(sh, example_input=X32) == ["stem", "stage1", "stage2"]


def test_own_cnn_in_a_sequential():
    net = own_cnn().eval()
    # five conv stages (children 0, 1, 3, 4, 5), the Linear head (8) left out
    assert default_layers(net) == ["0", "1", "4", "5"]
    assert default_layers(net, max_layers=5) == ["0", "1", "3", "4", "5"]
    _runs(net, default_layers(net), X32)


def test_timm_families():
    timm = pytest.importorskip("timm")
    net = timm.create_model("test_resnet", pretrained=False).eval()  # feature_info: act1, layer1..4
    assert default_layers(net, example_input=X32) == ["layer1", "layer2", "layer3", "layer4"]
    vit = timm.create_model("test_vit", pretrained=False, img_size=32).eval()
    assert len(vit.blocks) == 6
    picks = default_layers(vit, example_input=X32)
    assert picks == [f"blocks.{i}" for i in _spread(6)]
    pools = default_pools(vit, [*picks, "@output"], X32)
    assert pools == {**{p: "cls" for p in picks}, "@output": "avg"}
    gap = timm.create_model("test_vit", pretrained=False, img_size=32, global_pool="avg").eval()
    assert default_pools(gap, ["blocks.5"], X32) == {"blocks.5": "tokens_mean"}  # the head reads no class token


@pytest.mark.slow
def test_timm_full_size_families():
    timm = pytest.importorskip("timm")
    net = timm.create_model("resnet18", pretrained=False).eval()
    assert default_layers(net, example_input=X32) == ["layer1", "layer2", "layer3", "layer4"]
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32).eval()
    assert default_layers(vit, example_input=X32) == ["blocks.0", "blocks.4", "blocks.7", "blocks.11"]


def test_torchvision_families():
    tv = pytest.importorskip("torchvision")
    r18 = tv.models.resnet18(weights=None, num_classes=5).eval()
    assert default_layers(r18) == default_layers(r18, example_input=X32) == ["layer1", "layer2", "layer3", "layer4"]
    mob = tv.models.mobilenet_v3_small(weights=None).eval()
    n = len(mob.features)  # 13 blocks in `features`; the classifier is the head
    assert default_layers(mob, example_input=X32) == [f"features.{i}" for i in _spread(n)]
    assert default_pools(r18, ["layer4", "@output"], X32) == {"layer4": "avg", "@output": "avg"}


def test_hf_vit_from_a_tiny_config():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=6,
                                 num_attention_heads=2, intermediate_size=32, num_labels=3)
    net = transformers.ViTForImageClassification(cfg).eval()
    picks = default_layers(net, example_input=X32)
    blocks = [n for n, m in net.named_modules() if type(m).__name__ == "ViTLayer"]  # the 6 encoder blocks
    assert len(blocks) == 6 and picks == [blocks[i] for i in _spread(6)]
    assert "classifier" not in picks
    _runs(net, picks, X32)
    assert set(default_pools(net, picks, X32).values()) == {"cls"}


def test_token_pools_of_own_models():
    net = OwnTransformer(depth=2).eval()
    assert default_pools(net, ["blocks.1", "patch", "@output"], X32) == {
        "blocks.1": "cls", "patch": "avg", "@output": "avg"}
    mt = MeanTokens().eval()  # no prefix token: the mean over every token
    assert default_pools(mt, ["blocks.2"], X32) == {"blocks.2": "avg"}


def test_parse_layer_pools():
    assert parse_layer_pools("cls") == {"*": "cls"}
    assert parse_layer_pools(" blocks.11=cls , avg,@output=none") == {"blocks.11": "cls", "@output": "none", "*": "avg"}
    assert parse_layer_pools(None) == parse_layer_pools("") == {}
    for bad, words in (("mean", "not a pool"), ("cls,avg", "two modes"), ("=cls", "names no layer"),
                       ("a=cls,a=avg", "twice")):
        with pytest.raises(DataError, match=words):
            parse_layer_pools(bad)


def test_resolve_pools_keeps_the_output_out_of_a_token_pool():
    net = OwnTransformer(depth=3).eval()
    assert resolve_pools(net, ["blocks.2", "@output"], "cls", X32) == {"blocks.2": "cls", "@output": "avg"}
    assert resolve_pools(net, ["blocks.2", "@output"], "blocks.*=tokens_mean,@output=none", X32) == {
        "blocks.2": "tokens_mean", "@output": "none"}
    with pytest.raises(DataError, match=r"does not fit layer 'patch'.*--pool cls,patch=avg"):
        resolve_pools(net, ["patch", "blocks.2"], "cls", X32)


def test_extract_cls_with_the_output_layer(tmp_path):
    """`extract --pool cls --layers blocks.2,@output`: the block's class token and the logits, as stored."""
    from probekit import extract
    from probekit.store import open_store

    net = OwnTransformer(depth=3).eval()
    x = torch.randn(5, 3, 32, 32)
    pools = resolve_pools(net, ["blocks.2", "@output"], "cls", x[:1])
    out = extract(net, torch.utils.data.TensorDataset(x), layers=["blocks.2", "@output"], pool=pools,
                  out=tmp_path / "s.h5", progress=False)
    tokens = {}
    h = net.blocks[2].register_forward_hook(lambda _m, _i, o: tokens.setdefault("t", o))
    with torch.no_grad():
        logits = net(x)
    h.remove()
    with open_store(out) as s:
        torch.testing.assert_close(torch.from_numpy(s.acts("model", "data", "blocks.2")[:]), tokens["t"][:, 0])
        torch.testing.assert_close(torch.from_numpy(s.acts("model", "data", "@output")[:]), logits)


def test_no_layer_to_choose_is_one_clear_error():
    with pytest.raises(DataError, match="--layers"):
        default_layers(nn.Linear(3, 2))
    with pytest.raises(DataError, match="max_layers"):
        default_layers(own_cnn(), max_layers=0)


def test_a_teacher_of_another_architecture_gets_its_own_layers():
    from probekit.errors import LayerNotFoundError
    from probekit.extractors import choose_layers

    tv = pytest.importorskip("torchvision")
    student = OwnTransformer(depth=6).eval()
    teacher = tv.models.resnet18(weights=None, num_classes=3).eval()
    student_layers = default_layers(student)
    assert choose_layers(teacher, like=student_layers) == ["layer1", "layer2", "layer3", "layer4"]
    assert choose_layers(teacher, "layer3, layer4,@output") == ["layer3", "layer4"]
    with pytest.raises(LayerNotFoundError, match=re.escape("--teacher-layers: No layer of ResNet matches 'blocks.0'")):
        choose_layers(teacher, "blocks.0", flag="--teacher-layers")
    same = OwnTransformer(depth=6).eval()  # the same architecture: the student's layers, to compare layer by layer
    assert choose_layers(same, like=["blocks.1", "blocks.4"]) == ["blocks.1", "blocks.4"]


def test_dummy_input_follows_the_preprocessing():
    from probekit.models import dummy_input, load_model

    loaded = load_model(OwnTransformer(depth=2))
    assert dummy_input(loaded) is None
    x = dummy_input(loaded, {"input_size": [3, 32, 32]})
    assert tuple(x.shape) == (1, 3, 32, 32)
    assert default_layers(loaded.module, example_input=x) == ["blocks.0", "blocks.1"]


def test_depth_sort_uses_the_recorded_order_and_numbers_as_numbers():
    from probekit.extractors import depth_sort

    net = OwnTransformer(depth=12).eval()
    names = ["@output", "blocks.11", "norm", "blocks.4", "patch", "blocks.10"]
    assert sorted(names[1:]) == ["blocks.10", "blocks.11", "blocks.4", "norm", "patch"]  # by name: wrong
    assert depth_sort(names, execution_order(net, X32)) == ["patch", "blocks.4", "blocks.10", "blocks.11", "norm",
                                                            "@output"]
    assert depth_sort(names) == ["blocks.4", "blocks.10", "blocks.11", "norm", "patch", "@output"]
    sh = Shuffled().eval()
    assert depth_sort(["stage2", "stage1", "stem"], execution_order(sh, X32)) == ["stem", "stage1", "stage2"]


def test_a_dummy_input_the_model_cannot_take():
    net = OwnTransformer(depth=6).eval()
    bad = torch.zeros(1, 5, 32, 32)  # 5 channels for a 3-channel stem
    assert default_layers(net, example_input=bad) == default_layers(net)  # registration order instead
    with pytest.raises(DataError, match=r"dummy input to choose each layer's pool.*--pool LAYER=MODE"):
        resolve_pools(net, ["blocks.5"], None, bad)
    assert resolve_pools(net, ["blocks.*", "@output"], None, X32) == {
        **{f"blocks.{i}": "cls" for i in range(6)}, "@output": "avg"}
