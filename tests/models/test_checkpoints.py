"""Checkpoints as people save them: Lightning ``.ckpt`` (the network in ``self.net`` / ``self.model``),
timm train.py checkpoints (``args`` an argparse.Namespace, an EMA copy), and hostile files.

The oracle of every load is the network that was saved: after loading, every tensor equals the saved
network's own (not the EMA copy's, not a loss's buffer). Hostile files must be refused with no code run
(a marker file that the payload would create must not exist) and the message must say "refused", not
"damaged".
"""

from __future__ import annotations

import argparse
import pickle

import pytest
import torch
from torch import nn

from probekit.cli import main
from probekit.errors import DataError, ModelLoadError
from probekit.models import check_model_name, check_n_inits, load_model, load_state_dict


def small_net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def _same(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)


class Payload:
    """Unpickling it would create the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def lightning_ckpt(tmp_path_factory):
    """A real Lightning checkpoint: the network in self.net, a loss with a class-weight buffer beside it."""
    L = pytest.importorskip("lightning")
    torch.manual_seed(0)

    class Module(L.LightningModule):
        def __init__(self, width: int = 4) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = small_net()
            self.loss = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0]))

        def training_step(self, batch, _i):
            x, y = batch
            return self.loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    d = tmp_path_factory.mktemp("lt")
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 8, 8), torch.randint(0, 2, (8,)))
    module = Module()
    trainer = L.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=str(d), accelerator="cpu")
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    trainer.save_checkpoint(d / "last.ckpt")
    return d / "last.ckpt", module.net


@pytest.mark.slow  # a real Lightning fit: 8 s alone, more on a loaded machine
@pytest.mark.filterwarnings("ignore:.*treespec")
def test_lightning_ckpt_with_the_network_in_self_net(lightning_ckpt):
    path, net = lightning_ckpt
    raw = load_state_dict(path)
    assert "loss.weight" in raw and all(k.startswith(("net.", "loss.")) for k in raw)  # as Lightning saved it
    loaded = load_model(small_net(), weights=path)
    _same(loaded.module, net)
    assert any("'net.'" in n and "1 other entries left out" in n for n in loaded.notes)


def test_lightning_layout_under_self_model_for_a_timm_model_with_its_own_classes(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(1)
    trained = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    state = {f"model.{k}": v for k, v in trained.state_dict().items()}
    state["criterion.weight"] = torch.ones(3)
    torch.save({"epoch": 4, "global_step": 40, "pytorch-lightning_version": "2.4.0", "state_dict": state,
                "hyper_parameters": {"lr": 0.1, "arch": "test_resnet"}}, tmp_path / "m.ckpt")
    loaded = load_model("timm:test_resnet", weights=tmp_path / "m.ckpt")
    assert loaded.module.num_classes == 3  # read from the classifier under the prefix
    _same(loaded.module, trained)


def test_a_prefix_is_stripped_only_when_the_rest_fits():
    from probekit.models import _fit_keys

    class Wrapper(nn.Module):  # the model's own keys begin with "net.": nothing to strip
        def __init__(self) -> None:
            super().__init__()
            self.net = small_net()

    w = Wrapper()
    state, note = _fit_keys(w, w.state_dict())
    assert note is None and state.keys() == w.state_dict().keys()
    net = small_net()
    other = {f"net.{k}": v for k, v in nn.Sequential(nn.Linear(2, 2)).state_dict().items()}
    assert _fit_keys(net, other) == (other, None)  # another architecture under the prefix: left as it is
    with pytest.raises(ModelLoadError, match="another architecture"):
        load_model(small_net(), weights=_save(other))
    ema = small_net()
    for p in ema.parameters():
        p.data.add_(1.0)
    both = {**{f"model_ema.module.{k}": v for k, v in ema.state_dict().items()},
            **{f"model.{k}": v for k, v in net.state_dict().items()}}
    fitted, note = _fit_keys(small_net(), both)
    assert "'model.'" in note
    for k, v in net.state_dict().items():  # the trained weights, not the EMA copy
        torch.testing.assert_close(fitted[k], v, rtol=0, atol=0)
    ddp = {f"module.{k}": v for k, v in net.state_dict().items()}
    _same(load_model(small_net(), weights=_save(ddp)).module, net)


def _save(obj, name: str = "w.pt"):
    import tempfile

    path = tempfile.mkdtemp() + "/" + name
    torch.save(obj, path)
    return path


def test_timm_train_py_checkpoint_loads_without_allow_pickle(tmp_path):
    timm = pytest.importorskip("timm")
    from timm.utils import CheckpointSaver, ModelEmaV3

    torch.manual_seed(2)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=5)
    ema = ModelEmaV3(model, decay=0.5)
    for p in ema.module.parameters():
        p.data.mul_(0.5)  # the EMA copy differs from the model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    args = argparse.Namespace(model="test_resnet", lr=0.1, epochs=3, img_size=None, mean=(0.5, 0.5, 0.5),
                              aa="rand-m9", device="cpu", distributed=False, opt="sgd")
    saver = CheckpointSaver(model=model, optimizer=opt, args=args, model_ema=ema, checkpoint_dir=str(tmp_path),
                            recovery_dir=str(tmp_path), max_history=1)
    saver.save_checkpoint(epoch=0, metric=0.75)
    path = tmp_path / "last.pth.tar"
    loaded = load_model("timm:test_resnet", weights=path)
    assert loaded.module.num_classes == 5
    _same(loaded.module, model)
    assert any("state_dict_ema" in n for n in loaded.notes)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["in_namespace", "in_checkpoint", "bare_pickle", "protocol0"])
def test_hostile_checkpoints_are_refused_and_never_run(tmp_path, how, capsys):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth.tar"
    net = small_net()
    if how == "in_namespace":  # timm's layout, with the payload inside args
        torch.save({"state_dict": net.state_dict(), "args": argparse.Namespace(model="x", hook=Payload(str(marker)))}, path)
    elif how == "in_checkpoint":
        torch.save({"state_dict": net.state_dict(), "epoch": 1, "payload": Payload(str(marker))}, path)
    elif how == "bare_pickle":
        path.write_bytes(pickle.dumps(Payload(str(marker))))
    else:
        path.write_bytes(pickle.dumps(Payload(str(marker)), protocol=0))
    with pytest.raises(ModelLoadError) as err:
        load_state_dict(path)
    text = str(err.value)
    assert "refused: the checkpoint contains code/objects" in text and "open" in text
    assert "damaged" not in text and "--allow-pickle" in text
    assert not marker.exists()
    assert main(["layers", "torchvision:resnet18", "--weights", str(path), "--input-shape", "3,32,32"]) == 2
    err_line = capsys.readouterr().err
    assert "refused" in err_line and "damaged" not in err_line
    assert not marker.exists()
    if how == "in_checkpoint":  # the payload is live: unpickling, which the user must ask for, runs it
        load_state_dict(path, allow_pickle=True)
        assert marker.exists()


def test_damaged_files_are_still_called_damaged(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(small_net().state_dict(), good)
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:300])
    (tmp_path / "noise.pt").write_bytes(bytes(range(256)) * 3)
    for name in ("cut.pt", "noise.pt"):
        with pytest.raises(ModelLoadError, match="damaged") as err:
            load_state_dict(tmp_path / name)
        assert "refused" not in str(err.value)


def test_a_directory_given_as_weights(tmp_path):
    torch.save(small_net().state_dict(), tmp_path / "model.pt")
    with pytest.raises(ModelLoadError, match=r"is a directory; give the checkpoint file .*model\.pt"):
        load_state_dict(tmp_path)


def test_reserved_and_bad_model_names_and_init_counts():
    for good in ("resnet", "x@init", "init0", "a@b"):
        assert check_model_name(good) == good
    for bad, words in (("x@init0", "reserved"), ("model@init12", "reserved"), ("a/b", "'/'"), ("", "empty"),
                       (" x", "spaces")):
        with pytest.raises(DataError, match=words):
            check_model_name(bad)
    assert check_n_inits(0) == 0 and check_n_inits(3) == 3
    for bad in (-1, True, 1.5):
        with pytest.raises(DataError, match=">= 0"):
            check_n_inits(bad)
