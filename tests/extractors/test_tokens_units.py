"""The pieces of token-model support, on small hand-made tensors and modules (no transformers needed):
mask-aware pools against values computed by hand, per-batch padding, item and model checks, layer globs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import probekit
from probekit.datasets import as_samples
from probekit.errors import DataError
from probekit.extractors import MASK_LAYER, Padding, capture, glob_match, pool, resolve_layers
from probekit.extractors._tokens import collate_inputs


# -- pools with a mask ------------------------------------------------------------------------------------
def _tokens() -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])  # row 0 right-padded, row 1 left-padded
    return t, mask


def test_masked_pools_by_hand():
    t, mask = _tokens()
    rows = [t[0, :3], t[1, 1:]]  # the real tokens of each row
    want = {
        "tokens_mean": torch.stack([r.mean(0) for r in rows]),
        "avg": torch.stack([r.mean(0) for r in rows]),
        "max": torch.stack([r.amax(0) for r in rows]),
        "cls": torch.stack([r[0] for r in rows]),
        "last": torch.stack([r[-1] for r in rows]),
    }
    for mode, w in want.items():
        torch.testing.assert_close(pool(t, mode, 0, mask=mask), w, rtol=0, atol=0, msg=mode)
    # a prefix skips the first real tokens of each row, whatever the padding side
    torch.testing.assert_close(pool(t, "tokens_mean", 1, mask=mask), torch.stack([r[1:].mean(0) for r in rows]))
    # flatten and none keep every position
    torch.testing.assert_close(pool(t, "none", 0, mask=mask), t)
    # without a mask: last is the last position
    torch.testing.assert_close(pool(t, "last", 0), t[:, -1])


def test_masked_pool_errors():
    t, mask = _tokens()
    with pytest.raises(DataError, match="has no real token"):
        pool(t, "tokens_mean", 3, mask=mask)  # row 0 has 3 real tokens, all skipped
    with pytest.raises(DataError, match=r"attention mask has shape \(2, 3\)"):
        pool(t, "tokens_mean", 0, mask=mask[:, :3])
    with pytest.raises(DataError, match="'last' needs a 3-D token tensor"):
        pool(torch.zeros(2, 3, 4, 4), "last")


def test_half_precision_masked_mean_accumulates_in_float32():
    t, mask = _tokens()
    got = pool(t.half(), "tokens_mean", 0, mask=mask)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, pool(t, "tokens_mean", 0, mask=mask), rtol=1e-3, atol=1e-2)


# -- padding ------------------------------------------------------------------------------------------------
def _item(ids: list[int], i: int, **extra) -> dict:
    return {"inputs": {"input_ids": torch.tensor(ids), **extra}, "index": i}


def test_collate_pads_right_and_left_and_builds_the_mask():
    items = [_item([5, 6, 7], 0, token_type_ids=torch.tensor([0, 0, 1])),
             _item([8], 1, token_type_ids=torch.tensor([1]))]
    b = collate_inputs(items, Padding(side="right"), pad_id=9)
    assert b["padded"]
    assert b["inputs"]["input_ids"].tolist() == [[5, 6, 7], [8, 9, 9]]
    assert b["inputs"]["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["inputs"]["token_type_ids"].tolist() == [[0, 0, 1], [1, 0, 0]]
    b = collate_inputs(items, Padding(side="left", max_length=4), pad_id=0)
    assert b["inputs"]["input_ids"].tolist() == [[0, 5, 6, 7], [0, 0, 0, 8]]
    assert b["inputs"]["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert b["index"].tolist() == [0, 1]
    with pytest.raises(DataError, match="more than max_length=2"):
        collate_inputs(items, Padding(max_length=2), pad_id=0)
    with pytest.raises(DataError, match="no token"):
        collate_inputs([_item([], 0)], Padding(), pad_id=0)
    with pytest.raises(DataError, match="padding side must be 'right' or 'left'"):
        Padding(side="middle")


def test_collate_extends_a_given_mask():
    items = [{"inputs": {"input_ids": torch.tensor([5, 6, 0]), "attention_mask": torch.tensor([1, 1, 0])}, "index": 0},
             {"inputs": {"input_ids": torch.tensor([7]), "attention_mask": torch.tensor([1])}, "index": 1}]
    b = collate_inputs(items, Padding(), pad_id=0)
    assert b["inputs"]["attention_mask"].tolist() == [[1, 1, 0], [1, 0, 0]]


# -- items and models -----------------------------------------------------------------------------------------
class TinyLM(nn.Module):
    """Embedding + a position-wise layer (no mixing across tokens): each token's features depend on it alone."""

    def __init__(self, takes_mask: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 4)
        self.block = nn.Linear(4, 4)
        self.takes_mask = takes_mask

    def forward(self, input_ids, attention_mask=None):
        return self.block(self.emb(input_ids))


class NoMaskLM(TinyLM):
    def forward(self, input_ids):
        return self.block(self.emb(input_ids))


def _data(lengths=(3, 1, 4, 2, 5)) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"input_ids": torch.as_tensor(rng.integers(1, 20, size=n)), "label": i % 2} for i, n in enumerate(lengths)]


def test_pipeline_means_over_real_tokens_only(tmp_path):
    model = TinyLM()
    data = _data()
    out = probekit.extract(model, data, layers=["block"], out=tmp_path / "a.h5", pool="tokens_mean", batch_size=2,
                           progress=False)
    with torch.no_grad():
        want = np.stack([model(d["input_ids"][None])[0].mean(0).numpy() for d in data])
    with probekit.open_store(out) as s:
        np.testing.assert_allclose(np.asarray(s.acts("model", "data", "block")[:]), want, rtol=0, atol=1e-6)


def test_model_without_attention_mask(tmp_path):
    # items of one length: no padding, the built mask only pools
    same = _data((3, 3, 3))
    probekit.extract(NoMaskLM(), same, layers=["block"], out=tmp_path / "same.h5", pool="last", progress=False)
    with pytest.raises(DataError, match="takes no 'attention_mask', so the padding would change its outputs"):
        probekit.extract(NoMaskLM(), _data(), layers=["block"], out=tmp_path / "b.h5", progress=False)


def test_items_with_inputs_the_model_does_not_take(tmp_path):
    data = [{**d, "token_type_id": torch.zeros_like(d["input_ids"])} for d in _data()]
    with pytest.raises(DataError, match=r"input\(s\) \['token_type_id'\], which the forward of model 'model'"):
        probekit.extract(TinyLM(), data, layers=["block"], out=tmp_path / "c.h5", progress=False)
    assert not (tmp_path / "c.h5").exists()


def test_items_must_give_the_same_inputs():
    data = _data()
    data[2] = {"input_ids": data[2]["input_ids"], "attention_mask": torch.ones(4, dtype=torch.long), "label": 0}
    ds = as_samples(data)
    assert ds.input_keys == ("input_ids",)
    with pytest.raises(DataError, match="has the inputs"):
        ds[2]
    # a tokenizer's (1, T) tensors for one text are squeezed
    ds = as_samples([{"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.tensor([[1, 1, 1]])}])
    assert ds[0]["inputs"]["input_ids"].shape == (3,)


def test_integer_inputs_skip_no_prefix_token_by_default(tmp_path):
    """A plain (N, T) tensor of token ids: tokens_mean averages every token (no class token to skip)."""
    model = NoMaskLM()
    ids = torch.randint(1, 20, (6, 5))
    out = probekit.extract(model, torch.utils.data.TensorDataset(ids), layers=["block"], out=tmp_path / "i.h5",
                           pool="tokens_mean", progress=False)
    with torch.no_grad():
        want = model(ids).mean(1).numpy()
    with probekit.open_store(out) as s:
        np.testing.assert_allclose(np.asarray(s.acts("model", "data", "block")[:]), want, rtol=0, atol=1e-6)


def test_pool_none_mask_layer_attrs(tmp_path):
    out = probekit.extract(TinyLM(), as_samples(_data(), max_length=6), layers=["block"], out=tmp_path / "n.h5",
                           pool="none", batch_size=2, progress=False)
    with probekit.open_store(out) as s:
        m = s.acts("model", "data", MASK_LAYER)
        assert m.shape == (5, 6) and m.attrs["pool"] == "mask"
        np.testing.assert_array_equal(np.asarray(m[:]).sum(1), [3, 1, 4, 2, 5])


# -- globs ----------------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.1)  # never runs (as a dropout handed to a fused kernel as an argument)

    def forward(self, x):
        return self.lin(x)


class Enc(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.ModuleList([Block() for _ in range(2)])
        self.spare = nn.Linear(4, 4)  # never runs

    def forward(self, x):
        for blk in self.layer:
            x = blk(x)
        return x


def test_dotted_globs_match_part_by_part():
    assert glob_match("layer1.0", "layer*")  # no dot: fnmatch over the whole name, as before
    assert glob_match("encoder.layer.0", "encoder.layer.*")
    assert not glob_match("encoder.layer.0.output", "encoder.layer.*")
    assert glob_match("encoder.layer.0.output", "encoder.layer.**")
    assert glob_match("encoder.layer.0.output.dense", "encoder.**.dense")
    assert glob_match("encoder.dense", "encoder.**.dense")  # ** spans zero parts too
    assert not glob_match("encoder", "encoder.**")  # ... but at the end at least one
    enc = Enc()
    assert resolve_layers(enc, "layer.*") == ["layer.0", "layer.1"]
    assert resolve_layers(enc, "layer.**") == ["layer.0", "layer.0.lin", "layer.0.drop", "layer.1", "layer.1.lin",
                                               "layer.1.drop"]
    assert resolve_layers(enc, "layer.*.lin") == ["layer.0.lin", "layer.1.lin"]


def test_glob_matched_modules_that_never_run_are_reported_not_fatal():
    enc = Enc()
    with pytest.warns(UserWarning) as caught:
        with capture(enc, "layer.**") as cap:
            got = cap.run(torch.zeros(2, 4))
            assert list(got) == ["layer.0", "layer.0.lin", "layer.1", "layer.1.lin"]
            assert cap.skipped == ["layer.0.drop", "layer.1.drop"]
            assert list(cap.run(torch.zeros(2, 4))) == list(got)  # the next pass keeps the same layers
    assert [str(w.message).split(",")[0] for w in caught] == ["Layer 'layer.0.drop' (Dropout)",
                                                               "Layer 'layer.1.drop' (Dropout)"]
    assert "which a glob matched, did not run in the forward pass; it is left out" in str(caught[0].message)
    with pytest.raises(DataError, match="did not run during the forward pass"):  # named exactly: an error
        with capture(enc, ["layer.0", "spare"]) as cap:
            cap.run(torch.zeros(2, 4))
