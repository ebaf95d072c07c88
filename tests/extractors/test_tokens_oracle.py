"""Token models (transformers' BERT and GPT-2 built from configs, random init, nothing downloaded):
keyword inputs, per-batch padding and mask-aware pooling against the model's own
``output_hidden_states=True`` with a masked mean / first / last token written here."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import probekit  # noqa: E402
from probekit.datasets import as_samples  # noqa: E402
from probekit.errors import DataError  # noqa: E402

VOCAB, T_MAX, N = 50, 12, 13
ATOL = 1e-5


def bert() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32)
    return transformers.BertModel(cfg).eval()


def gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                  bos_token_id=1, eos_token_id=1)
    return transformers.GPT2Model(cfg).eval()


# the model's hidden_states index of each stored layer: BERT's blocks give hidden_states[i + 1];
# GPT-2's last hidden state is after ln_f
LAYERS = {"bert": {"embeddings": 0, "encoder.layer.0": 1, "encoder.layer.1": 2},
          "gpt2": {"h.0": 1, "ln_f": 2}}
MAKERS = {"bert": bert, "gpt2": gpt2}


def lengths() -> list[int]:
    return [int(v) for v in np.random.default_rng(1).integers(2, T_MAX + 1, size=N)]


class Texts(torch.utils.data.Dataset):
    """Variable-length token items (no padding), with labels; ``padded`` pads them to T_MAX itself."""

    def __init__(self, padded: bool = False, with_mask: bool = True) -> None:
        rng = np.random.default_rng(2)
        self.ids = [rng.integers(2, VOCAB, size=n) for n in lengths()]
        self.padded, self.with_mask = padded, with_mask

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        ids = torch.as_tensor(self.ids[i])
        mask = torch.ones_like(ids)
        if self.padded:
            ids = torch.cat([ids, torch.zeros(T_MAX - len(ids), dtype=ids.dtype)])
            mask = torch.cat([mask, torch.zeros(T_MAX - len(mask), dtype=mask.dtype)])
        item = {"input_ids": ids, "label": i % 3}
        if self.with_mask:
            item["attention_mask"] = mask
        return item


def oracle(model: torch.nn.Module, family: str) -> dict[str, dict[str, np.ndarray]]:
    """Per layer: masked mean, first and last real token, from output_hidden_states on one padded batch."""
    data = Texts(padded=True)
    ids = torch.stack([data[i]["input_ids"] for i in range(N)])
    mask = torch.stack([data[i]["attention_mask"] for i in range(N)])
    with torch.no_grad():
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    m = mask.double().unsqueeze(-1)
    last = mask.sum(1) - 1
    out = {}
    for layer, k in LAYERS[family].items():
        h = hs[k].double()
        out[layer] = {"tokens_mean": ((h * m).sum(1) / m.sum(1)).numpy(),
                      "cls": h[:, 0].numpy(),
                      "last": h[torch.arange(N), last].numpy()}
    return out


@pytest.mark.parametrize("family", ["bert", "gpt2"])
@pytest.mark.parametrize("pool", ["tokens_mean", "cls", "last"])
def test_python_api_matches_masked_oracle(tmp_path, family, pool):
    model = MAKERS[family]()
    want = oracle(model, family)
    out = tmp_path / "acts.h5"
    # batch size 4: batches of several lengths, each padded to its own longest item
    probekit.extract(model, Texts(), layers=list(LAYERS[family]), out=out, pool=pool, batch_size=4,
                     progress=False)
    with probekit.open_store(out) as s:
        for layer in LAYERS[family]:
            got = np.asarray(s.acts("model", "data", layer)[:])
            assert got.shape == (N, 16)
            np.testing.assert_allclose(got, want[layer][pool], rtol=0, atol=ATOL)
        np.testing.assert_array_equal(s.sample_field("data", "label"), np.arange(N) % 3)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_variable_length_items_equal_prepadded_ones(tmp_path, family):
    model = MAKERS[family]()
    layers = list(LAYERS[family])
    runs = {}
    for tag, data in [("ragged", Texts()), ("prepadded", Texts(padded=True)), ("mask_built", Texts(with_mask=False))]:
        out = tmp_path / f"{tag}.h5"
        probekit.extract(model, data, layers=layers, out=out, pool="tokens_mean", batch_size=5, progress=False)
        with probekit.open_store(out) as s:
            runs[tag] = {la: np.asarray(s.acts("model", "data", la)[:]) for la in layers}
    for la in layers:
        np.testing.assert_allclose(runs["ragged"][la], runs["prepadded"][la], rtol=0, atol=ATOL)
        np.testing.assert_allclose(runs["mask_built"][la], runs["prepadded"][la], rtol=0, atol=ATOL)


def test_unmasked_mean_differs_from_oracle_so_the_test_can_fail():
    """The bug of the issue, kept visible: a plain mean over padded tokens is far from the masked one."""
    model = bert()
    want = oracle(model, "bert")["encoder.layer.1"]["tokens_mean"]
    data = Texts(padded=True)
    ids = torch.stack([data[i]["input_ids"] for i in range(N)])
    with torch.no_grad():
        plain = model(input_ids=ids, output_hidden_states=True).hidden_states[2].mean(1).double().numpy()
    assert np.abs(plain - want).max() > 100 * ATOL


def test_left_padding_gives_the_right_padded_features_for_gpt2(tmp_path):
    model = gpt2()
    want = oracle(model, "gpt2")
    out = tmp_path / "left.h5"
    probekit.extract(model, as_samples(Texts(), padding_side="left", pad_id=3), layers=["h.0", "ln_f"], out=out,
                     pool="last", batch_size=4, progress=False)
    with probekit.open_store(out) as s:
        for layer in ("h.0", "ln_f"):
            np.testing.assert_allclose(np.asarray(s.acts("model", "data", layer)[:]), want[layer]["last"],
                                       rtol=0, atol=ATOL)


def test_pool_none_stores_the_mask_beside_the_tokens(tmp_path):
    model = bert()
    out = tmp_path / "none.h5"
    with pytest.raises(DataError, match="max_length"):
        probekit.extract(model, Texts(), layers=["encoder.layer.1"], out=out, pool="none", batch_size=4,
                         progress=False)
    probekit.extract(model, as_samples(Texts(), max_length=T_MAX), layers=["encoder.layer.1"], out=out,
                     pool="none", batch_size=4, progress=False, mode="overwrite")
    data = Texts(padded=True)
    mask = np.stack([data[i]["attention_mask"].numpy() for i in range(N)])
    with probekit.open_store(out) as s:
        tokens = np.asarray(s.acts("model", "data", "encoder.layer.1")[:])
        stored_mask = np.asarray(s.acts("model", "data", probekit.extractors.MASK_LAYER)[:])
    assert tokens.shape == (N, T_MAX, 16)
    np.testing.assert_array_equal(stored_mask, mask)
    m = stored_mask[..., None]
    mean = (tokens * m).sum(1) / m.sum(1)
    np.testing.assert_allclose(mean, oracle(model, "bert")["encoder.layer.1"]["tokens_mean"], rtol=0, atol=ATOL)
