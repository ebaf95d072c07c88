"""probekit.models.load_model: the number of classes read from a checkpoint, constructor arguments,
module:callable from the current directory, and --pretrained refused quickly when offline.

Oracles: the model built by timm / torchvision in the test itself (same weights -> same logits), and
the parameter shapes written into the checkpoint.
"""

from __future__ import annotations

import socket
import sys
import textwrap
import time

import pytest
import torch

from probekit.errors import ModelLoadError
from probekit.models import load_model, parse_model_args

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(1)
    t10 = timm.create_model("resnet18", num_classes=10).eval()
    save_file(t10.state_dict(), str(d / "timm10.safetensors"))
    torch.manual_seed(2)
    tv7 = torchvision.models.resnet18(num_classes=7).eval()
    torch.save(tv7.state_dict(), d / "tv7.pt")
    torch.manual_seed(3)
    headless = timm.create_model("resnet18", num_classes=0).eval()
    save_file(headless.state_dict(), str(d / "headless.safetensors"))
    return d, t10, tv7, headless


def test_timm_classifier_size_is_read_from_the_checkpoint(ckpts):
    d, t10, _, _ = ckpts
    loaded = load_model("timm:resnet18", weights=d / "timm10.safetensors")
    assert loaded.module.num_classes == 10 and loaded.model_args == {"num_classes": 10}
    assert any("num_classes=10" in n for n in loaded.notes)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), t10(x))


def test_torchvision_classifier_size_is_read_from_the_checkpoint(ckpts):
    d, _, tv7, _ = ckpts
    loaded = load_model("torchvision:resnet18", weights=d / "tv7.pt")
    assert loaded.module.fc.out_features == 7
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), tv7(x))


def test_headless_timm_checkpoint_builds_a_headless_model(ckpts):
    d, _, _, headless = ckpts
    loaded = load_model("timm:resnet18", weights=d / "headless.safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = loaded.module(x)
        assert out.shape == (2, 512) and torch.equal(out, headless(x))


def test_other_mismatches_are_still_refused_with_the_list_and_the_routes(ckpts):
    d = ckpts[0]
    with pytest.raises(ModelLoadError) as e:
        load_model("timm:resnet34", weights=d / "timm10.safetensors")
    msg = str(e.value)
    assert "missing keys" in msg and "layer1.2.conv1.weight" in msg and "timm:resnet34" in msg
    assert "--model-arg" in msg and "package.module:callable" in msg and "\n" not in msg
    # an explicit num_classes is respected, so a checkpoint with another one does not fit
    with pytest.raises(ModelLoadError, match=r"fc.weight \(10, 512\) vs \(5, 512\)"):
        load_model("timm:resnet18", weights=d / "timm10.safetensors", model_args={"num_classes": 5})


def test_model_args_reach_the_constructor():
    m = load_model("timm:resnet18", model_args={"num_classes": 4, "drop_rate": 0.25}).module
    assert m.fc.out_features == 4 and m.drop_rate == 0.25
    assert load_model("torchvision:resnet18", model_args={"num_classes": 3}).module.fc.out_features == 3


@pytest.mark.parametrize(("spec", "ctor"), [("timm:resnet18", "timm.create_model('resnet18')"),
                                            ("torchvision:resnet18", "torchvision.models.get_model('resnet18')")])
def test_unknown_model_arg_names_the_constructor_and_the_key(spec, ctor):
    with pytest.raises(ModelLoadError) as e:
        load_model(spec, model_args={"nonsense_width": 3})
    msg = str(e.value)
    assert ctor in msg and "'nonsense_width'" in msg and "ResNet" in msg and "\n" not in msg


def test_parse_model_args_reads_literals_and_falls_back_to_strings():
    assert parse_model_args(["num_classes=3", "drop_rate=0.1", "act=gelu", "img_size=(64, 48)", "x='a=b'",
                             "flag=True", "none=None"]) == {
        "num_classes": 3, "drop_rate": 0.1, "act": "gelu", "img_size": (64, 48), "x": "a=b", "flag": True,
        "none": None}
    for bad in ["novalue", "=3", "two words=1"]:
        with pytest.raises(ModelLoadError, match="KEY=VALUE"):
            parse_model_args([bad])


CWD_MODULE = textwrap.dedent(
    """
    from torch import nn


    def net(width=4):
        return nn.Sequential(nn.Conv2d(3, width, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    """
)


def _without_cwd(monkeypatch, folder):
    """sys.path as a console script sees it: the current directory is not on it."""
    keep = [p for p in sys.path if p not in ("", ".") and p != str(folder)]
    monkeypatch.setattr(sys, "path", keep)  # restored after the test


def test_module_callable_in_the_current_directory_imports_without_pythonpath(tmp_path, monkeypatch):
    (tmp_path / "pk_cwd_models_a.py").write_text(CWD_MODULE)
    monkeypatch.chdir(tmp_path)
    _without_cwd(monkeypatch, tmp_path)
    try:
        loaded = load_model("pk_cwd_models_a:net", model_args={"width": 5})
        assert loaded.module[0].out_channels == 5
        assert sys.modules["pk_cwd_models_a"].__file__ == str(tmp_path / "pk_cwd_models_a.py")
        with pytest.raises(ModelLoadError, match=r"does not take the argument 'depth' \(its parameters: \['width'\]\)"):
            load_model("pk_cwd_models_a:net", model_args={"depth": 2})
        with pytest.raises(ModelLoadError, match=r"Run from the folder that holds pk_no_such_mod\.py"):
            load_model("pk_no_such_mod:net")
    finally:
        sys.modules.pop("pk_cwd_models_a", None)


def _no_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))


@pytest.mark.parametrize("spec", ["timm:resnet18", "torchvision:resnet18"])
def test_pretrained_with_a_hanging_network_fails_within_the_connect_timeout(spec, tmp_path, monkeypatch):
    """A network whose connections hang (the worst case) is given up after probekit.models.CONNECT_TIMEOUT."""
    _no_cache(monkeypatch, tmp_path)
    import probekit.models as pm

    monkeypatch.setattr(pm, "CONNECT_TIMEOUT", 0.5)

    def hang(*args, **kwargs):
        time.sleep(20)
        raise OSError("unreachable")

    monkeypatch.setattr(socket, "create_connection", hang)
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError) as e:
        load_model(spec, pretrained=True)
    took = time.perf_counter() - t0
    assert took < 3.0, took
    assert "not reachable" in str(e.value) and "--weights FILE" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("spec", ["timm:resnet18", "torchvision:resnet18"])
def test_pretrained_offline_for_real_fails_in_seconds(spec, tmp_path, monkeypatch):
    """Without any patching: this machine has no network (skipped where it has, so nothing downloads)."""
    import probekit.models as pm

    if pm._reachable("huggingface.co", timeout=1.0) or pm._reachable("download.pytorch.org", timeout=1.0):
        pytest.skip("the network is reachable here; the test would download weights")
    _no_cache(monkeypatch, tmp_path)
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError, match="not reachable"):
        load_model(spec, pretrained=True)
    assert time.perf_counter() - t0 < pm.CONNECT_TIMEOUT + 3.0
