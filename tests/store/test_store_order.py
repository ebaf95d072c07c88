"""Layers in depth order: the writer records the order the layers ran in, the reader lists them so.

The oracle is the forward pass as written in each model below, not the code under test; the
fallback for stores without the record is natural order (numbers by value), checked on hand lists.
"""

from __future__ import annotations

import h5py
import torch
from torch import nn

import probekit
from probekit.cli import main
from probekit.store import StoreWriter
from probekit.store._reader import natural_key


class Net(nn.Module):
    """Attributes declared in an order unlike the forward's, and 12 blocks in a ModuleList: by name the
    layers would read blocks.0, blocks.1, blocks.10, blocks.11, blocks.2, ..., stage1, stage2, stem."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stage2 = nn.Linear(8, 8)
        self.stage1 = nn.Linear(8, 8)
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(12))
        self.stem = nn.Linear(4, 8)

    def forward(self, x):
        x = self.stage1(self.stem(x))
        x = self.stage2(x)
        for block in self.blocks:
            x = block(x)
        return x


#: the order in which Net.forward runs its modules, then its output
FORWARD = ["stem", "stage1", "stage2", *(f"blocks.{k}" for k in range(12)), "@output"]


class Data(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.full((4,), float(i)), i % 2


def test_extract_stores_layers_in_the_order_the_forward_runs_them(tmp_path):
    out = tmp_path / "s.h5"
    asked = ["blocks.11", "stage2", "@output", "blocks.4", "stem", *(f"blocks.{k}" for k in (0, 1, 2, 3)),
             *(f"blocks.{k}" for k in range(5, 11)), "stage1"]
    probekit.extract(Net(), Data(), layers=asked, out=out, progress=False, batch_size=4)
    with probekit.open_store(out) as s:
        assert s.layers("model") == FORWARD
        assert s.layers("model", "data") == FORWARD
        assert s.layer_order("model") == FORWARD
        assert s.weight_layers("model") == FORWARD[:-1]  # every Linear has weight rows; the output none
        assert list(s.describe()["models"]["model"]["acts"]["data"]["layers"]) == FORWARD
    with h5py.File(out, "r") as f:
        assert int(f.attrs["format_version"]) == 2  # an optional attribute: the format did not change


def test_probekit_info_lists_layers_by_depth(tmp_path, capsys):
    out = tmp_path / "s.h5"
    probekit.extract(Net(), Data(), layers=["blocks.11", "blocks.4", "stem"], out=out, progress=False)
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.index("stem:") < text.index("blocks.4:") < text.index("blocks.11:")


def test_a_layer_added_later_takes_its_place_by_depth(tmp_path):
    """A second split with one more layer: it goes after the layer that ran before it, not last."""
    out = tmp_path / "s.h5"
    probekit.extract(Net(), Data(), layers=["stem", "blocks.3"], out=out, split="a", progress=False)
    probekit.extract(Net(), Data(), layers=["stem", "stage2", "blocks.3"], out=out, split="b", progress=False,
                     mode="resume")
    with probekit.open_store(out) as s:
        assert s.layers("model") == ["stem", "stage2", "blocks.3"]
        assert s.layers("model", "a") == ["stem", "blocks.3"]


def test_writer_records_the_declaration_order(tmp_path):
    out = tmp_path / "s.h5"
    with StoreWriter(out, mode="create") as w:
        w.add_split("data", n_rows=2, has_label=False)
        w.add_model("m")
        for layer in ("z", "a", "m"):
            w.add_layer("m", "data", layer, feature_shape=(1,))
    with probekit.open_store(out) as s:
        assert s.layers("m") == ["z", "a", "m"]


def test_a_store_without_the_record_reads_in_natural_order_with_the_output_last(tmp_path):
    """Stores of older writers (and hand-written ones) have no layer_order."""
    out = tmp_path / "old.h5"
    names = ["blocks.11", "@output", "blocks.4", "stem", "blocks.4.attn", "layer10", "layer2", "Layer1"]
    with StoreWriter(out, mode="create") as w:
        w.add_split("data", n_rows=2, has_label=False)
        w.add_model("m")
        for layer in names:
            w.add_layer("m", "data", layer, feature_shape=(1,))
    with h5py.File(out, "r+") as f:
        del f["models/m"].attrs["layer_order"]
    with probekit.open_store(out) as s:
        assert s.layer_order("m") == []
        assert s.layers("m") == ["Layer1", "blocks.4", "blocks.4.attn", "blocks.11", "layer2", "layer10", "stem",
                                 "@output"]


def test_natural_key_compares_numbers_by_value():
    assert sorted(["b10", "b9", "b1", "a"], key=natural_key) == ["a", "b1", "b9", "b10"]
    assert sorted(["x.2.y", "x.10", "x.2"], key=natural_key) == ["x.2", "x.2.y", "x.10"]
    assert sorted(["@output", "z"], key=natural_key) == ["z", "@output"]
