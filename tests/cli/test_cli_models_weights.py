"""The command line with a user's own checkpoints (issue 15): `--weights` alone loads a timm or
torchvision model with another number of classes, `--model-arg` reaches the constructor, a
module:callable in the current directory needs no PYTHONPATH, DataLoaders as data, one-line errors.

Oracles: the stored activations equal the model's own outputs computed in the test (timm's
forward_features / forward_head, torchvision's create_feature_extractor, the logits).
"""

from __future__ import annotations

import json
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch

import probekit
from probekit.cli import main
from probekit.errors import DataError

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")


def _one_line_error(capsys, rc):
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("probekit: error: "), err
    return err[0]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    np.savez(d / "x.npz", x=x.numpy(), y=np.arange(6) % 2)
    return d, x


def test_timm_checkpoint_with_10_classes_loads_with_weights_alone(inputs, tmp_path, capsys):
    from safetensors.torch import save_file

    d, x = inputs
    torch.manual_seed(4)
    model = timm.create_model("resnet18", num_classes=10).eval()
    save_file(model.state_dict(), str(tmp_path / "resnet18_10cls.safetensors"))
    out = tmp_path / "t.h5"
    rc = main(["extract", "timm:resnet18", "--weights", str(tmp_path / "resnet18_10cls.safetensors"),
               "--data", str(d / "x.npz"), "--layers", "global_pool,fc", "-o", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "num_classes=10 read from the classifier" in err
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        logits = model(x)
    with probekit.open_store(out) as s:
        np.testing.assert_allclose(s.acts("model", "data", "global_pool")[:], feats.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(s.acts("model", "data", "fc")[:], logits.numpy(), rtol=1e-5, atol=1e-5)
    with h5py.File(out, "r") as f:  # tensors from an .npz: no image transform ran, none is recorded
        assert "preprocessing" not in f["models/model"].attrs


def test_torchvision_state_dict_with_7_classes_loads_with_weights_alone(inputs, tmp_path, capsys):
    from torchvision.models.feature_extraction import create_feature_extractor

    d, x = inputs
    torch.manual_seed(5)
    model = torchvision.models.resnet18(num_classes=7).eval()
    torch.save(model.state_dict(), tmp_path / "resnet18_7cls.pt")
    out = tmp_path / "tv.h5"
    rc = main(["extract", "torchvision:resnet18", "--weights", str(tmp_path / "resnet18_7cls.pt"),
               "--data", str(d / "x.npz"), "--layers", "layer3,avgpool,fc", "-o", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    with torch.no_grad():
        ref = create_feature_extractor(model, {"layer3": "layer3", "avgpool": "avgpool", "fc": "fc"})(x)
    with probekit.open_store(out) as s:
        assert s.acts("model", "data", "fc").shape == (6, 7)
        np.testing.assert_allclose(s.acts("model", "data", "fc")[:], ref["fc"].numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(s.acts("model", "data", "avgpool")[:], ref["avgpool"].flatten(1).numpy(),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(s.acts("model", "data", "layer3")[:], ref["layer3"].mean((2, 3)).numpy(),
                                   rtol=1e-5, atol=1e-5)


def test_layers_with_weights_and_the_mismatch_message_names_the_routes(tmp_path, capsys):
    from safetensors.torch import save_file

    save_file(timm.create_model("resnet18", num_classes=3).state_dict(), str(tmp_path / "r3.safetensors"))
    assert main(["layers", "timm:resnet18", "--weights", str(tmp_path / "r3.safetensors"), "--input-shape",
                 "3,32,32", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["fc"]["output_shape"] == [3]
    line = _one_line_error(capsys, main(["layers", "timm:resnet34", "--weights", str(tmp_path / "r3.safetensors")]))
    assert "do not fit the model timm:resnet34" in line and "--model-arg KEY=VALUE" in line
    assert "package.module:callable" in line


def test_model_arg_through_the_cli_and_an_unknown_one_is_one_line(capsys):
    assert main(["layers", "timm:resnet18", "--model-arg", "num_classes=5", "--input-shape", "3,32,32",
                 "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["fc"]["output_shape"] == [5]
    line = _one_line_error(capsys, main(["layers", "timm:resnet18", "--model-arg", "num_clases=5"]))
    assert "timm.create_model('resnet18') does not take the argument 'num_clases'" in line
    line = _one_line_error(capsys, main(["layers", "timm:resnet18", "--model-arg", "num_classes"]))
    assert "KEY=VALUE" in line


HELPER = textwrap.dedent(
    """
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, IterableDataset, TensorDataset

    X = torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    Y = torch.arange(10) % 2


    def net(width=4):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, width, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(width, 2))


    def loader():
        return DataLoader(TensorDataset(X, Y), batch_size=4, shuffle=True)


    def subset_loader():
        return DataLoader(TensorDataset(X, Y), batch_size=4, sampler=[0, 2, 4])


    class Stream(IterableDataset):
        def __iter__(self):
            return iter(zip(X, Y))


    def stream_loader():
        return DataLoader(Stream(), batch_size=4)


    class Explodes(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            if i >= 3:
                raise ZeroDivisionError("item three is broken")
            return X[i], int(Y[i])


    def explodes():
        return Explodes()
    """
)


@pytest.fixture
def cwd_helper(tmp_path, monkeypatch):
    """pk_cli_models_helper.py in the current directory, which is NOT on sys.path (as for a console script)."""
    (tmp_path / "pk_cli_models_helper.py").write_text(HELPER)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    yield tmp_path
    sys.modules.pop("pk_cli_models_helper", None)


def test_module_callable_and_dataloader_from_the_current_directory(cwd_helper, capsys):
    rc = main(["extract", "pk_cli_models_helper:net", "--model-arg", "width=6", "--data",
               "pk_cli_models_helper:loader", "--layers", "0,4", "-o", "o.h5", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    helper = sys.modules["pk_cli_models_helper"]
    assert helper.__file__ == str(cwd_helper / "pk_cli_models_helper.py")
    model = helper.net(width=6).eval()
    with torch.no_grad():
        logits = model(helper.X)
        conv = model[0](helper.X).mean((2, 3))
    with probekit.open_store(cwd_helper / "o.h5") as s:  # rows in dataset order, not the loader's shuffle
        np.testing.assert_allclose(s.acts("model", "data", "4")[:], logits.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s.acts("model", "data", "0")[:], conv.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("data", "phrase"), [
    ("pk_cli_models_helper:subset_loader", "has the sampler list, which takes other rows"),
    ("pk_cli_models_helper:stream_loader", "reads an IterableDataset"),
    ("pk_cli_models_helper:explodes", "ZeroDivisionError: item three is broken"),
])
def test_dataloaders_that_cannot_be_read_in_order_and_raw_errors_are_one_line(cwd_helper, capsys, data, phrase):
    rc = main(["extract", "pk_cli_models_helper:net", "--data", data, "--layers", "0", "-o", "o.h5",
               "--batch-size", "2", "--no-progress"])
    assert phrase in _one_line_error(capsys, rc)


def test_unknown_callable_argument_is_one_line(cwd_helper, capsys):
    line = _one_line_error(capsys, main(["layers", "pk_cli_models_helper:net", "--model-arg", "depth=2"]))
    assert "pk_cli_models_helper:net does not take the argument 'depth'" in line and "['width']" in line


def test_python_extract_takes_a_dataloader_as_its_dataset(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    ds = TensorDataset(torch.randn(9, 4), torch.arange(9) % 3)
    probekit.extract(net, DataLoader(ds, batch_size=4, shuffle=True), layers=["0"], out=tmp_path / "a.h5",
                     progress=False)
    with probekit.open_store(tmp_path / "a.h5") as s, torch.no_grad():
        np.testing.assert_allclose(s.acts("model", "data", "0")[:], net[0](ds.tensors[0]).numpy(), rtol=1e-6)
    with pytest.raises(DataError, match="sampler"):
        probekit.extract(net, DataLoader(ds, sampler=[1, 2]), layers=["0"], out=tmp_path / "b.h5", progress=False)


def test_input_shape_is_refused_by_extract_in_one_line(inputs, tmp_path, capsys):
    d, _ = inputs
    line = _one_line_error(capsys, main(["extract", "timm:resnet18", "--data", str(d / "x.npz"), "--layers", "fc",
                                         "-o", str(tmp_path / "o.h5"), "--input-shape", "3,32,32"]))
    assert "--input-shape is not used by extract" in line and "--image-size" in line
    assert not (tmp_path / "o.h5").exists()
    line = _one_line_error(capsys, main(["extract", "timm:resnet18", "--data", str(d / "x.npz"), "--layers", "fc",
                                         "-o", str(tmp_path / "o.h5"), "--image-size", "32"]))
    assert "is not one" in line


def test_pretrained_offline_through_the_cli_is_one_line(tmp_path, monkeypatch, capsys):
    import socket

    import probekit.models as pm

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(pm, "CONNECT_TIMEOUT", 0.5)

    def refuse(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    line = _one_line_error(capsys, main(["layers", "timm:resnet18", "--pretrained"]))
    assert "huggingface.co is not reachable" in line and "--weights FILE" in line


def test_layers_dummy_input_follows_image_size_and_bad_values_are_one_line(capsys):
    assert main(["layers", "timm:resnet18", "--image-size", "64", "--filter", "layer4", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["layer4"]["output_shape"] == [512, 2, 2]  # 64 px / 32
    line = _one_line_error(capsys, main(["layers", "timm:resnet18", "--model-arg", "num_classes=abc"]))
    assert "timm.create_model('resnet18') failed with the arguments num_classes='abc'" in line
    line = _one_line_error(capsys, main(["layers", "timm:resnet18", "--mean", "0.5,0.5"]))
    assert "--mean needs 3 values" in line
