"""Token models on the command line: `probekit layers` with an integer dummy input and `probekit extract`
with a module:callable model and dataset, against the model's own output_hidden_states."""

from __future__ import annotations

import importlib
import json
import os
import sys
import textwrap

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

import probekit
from probekit.cli import main

MODULE = textwrap.dedent('''
    import numpy as np
    import torch
    import transformers

    VOCAB, T_MAX, N = 50, 12, 11


    def bert():
        torch.manual_seed(0)
        return transformers.BertModel(transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=32))


    def gpt2():
        torch.manual_seed(0)
        return transformers.GPT2Model(transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=1, eos_token_id=1))


    class Texts(torch.utils.data.Dataset):
        """Token ids of several lengths, no padding, no attention mask: probekit pads and builds it."""

        def __init__(self):
            rng = np.random.default_rng(3)
            self.ids = [rng.integers(2, VOCAB, size=int(n)) for n in rng.integers(2, T_MAX + 1, size=N)]

        def __len__(self):
            return N

        def __getitem__(self, i):
            return {"input_ids": torch.as_tensor(self.ids[i]), "label": i % 2}


    def texts():
        return Texts()
''')

LAYERS = {"bert": {"encoder.layer.0": 1, "encoder.layer.1": 2}, "gpt2": {"h.0": 1, "h.1": None}}


@pytest.fixture
def tokmods(tmp_path, monkeypatch):
    (tmp_path / "tokmods.py").write_text(MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("tokmods", None)
    mod = importlib.import_module("tokmods")
    yield mod
    sys.modules.pop("tokmods", None)


def _oracle(mod, family: str) -> dict[str, dict[str, np.ndarray]]:
    import torch

    model = getattr(mod, family)().eval()
    data = mod.Texts()
    n = len(data)
    lens = [len(data.ids[i]) for i in range(n)]
    T = max(lens)
    ids = torch.zeros(n, T, dtype=torch.long)
    mask = torch.zeros(n, T, dtype=torch.long)
    for i, ln in enumerate(lens):
        ids[i, :ln] = torch.as_tensor(data.ids[i])
        mask[i, :ln] = 1
    with torch.no_grad():
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        if family == "gpt2":  # hidden_states[-1] is after ln_f: the last block's own output from a hook
            got = {}
            h = model.h[1].register_forward_hook(lambda m, i, o: got.setdefault("h.1", o[0] if isinstance(o, tuple) else o))
            model(input_ids=ids, attention_mask=mask)
            h.remove()
    m = mask.double().unsqueeze(-1)
    out = {}
    for layer, k in LAYERS[family].items():
        t = (hs[k] if k is not None else got[layer]).double()
        out[layer] = {"tokens_mean": ((t * m).sum(1) / m.sum(1)).numpy(), "cls": t[:, 0].numpy(),
                      "last": t[torch.arange(n), mask.sum(1) - 1].numpy()}
    return out


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_cli_extract_matches_masked_oracle(tokmods, tmp_path, family):
    want = _oracle(tokmods, family)
    for pool in ("tokens_mean", "cls", "last"):
        out = tmp_path / f"{family}-{pool}.h5"
        rc = main(["extract", f"tokmods:{family}", "--data", "tokmods:texts", "--layers", ",".join(LAYERS[family]),
                   "--pool", pool, "--batch-size", "4", "--no-progress", "-o", str(out)])
        assert rc == 0
        with probekit.open_store(out) as s:
            for layer in LAYERS[family]:
                got = np.asarray(s.acts("model", "data", layer)[:])
                np.testing.assert_allclose(got, want[layer][pool], rtol=0, atol=1e-5, err_msg=f"{layer} {pool}")


def test_cli_layers_on_a_token_model(tokmods, capsys):
    assert main(["layers", "tokmods:bert", "--seq-len", "7", "--json", "--filter", "encoder.layer.*"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["encoder.layer.0", "encoder.layer.1"]  # direct children only
    assert all(r["output_shape"] == [7, 16] for r in rows)
    assert main(["layers", "tokmods:bert", "--json", "--filter", "encoder.layer.**"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = [r["name"] for r in rows]
    assert "encoder.layer.0.attention.self.query" in names and len(names) > 10
    calls = {r["name"]: r["n_calls"] for r in rows}
    assert calls["encoder.layer.0"] == 1


def test_cli_layers_errors_fit_the_model_kind(tokmods, capsys):
    assert main(["layers", "tokmods:bert", "--seq-len", "40"]) == 2  # longer than max_position_embeddings
    err = capsys.readouterr().err
    assert "input_ids of length 40" in err and "--seq-len" in err and "C,H,W" not in err
    assert main(["layers", "probekit.experiments.shortcut:ShapesCNN", "--seq-len", "8"]) == 2
    assert "--input-shape" in capsys.readouterr().err


def test_cli_glob_with_modules_that_never_run_is_reported(tokmods, tmp_path, capsys):
    out = tmp_path / "glob.h5"
    rc = main(["extract", "tokmods:bert", "--data", "tokmods:texts", "--layers", "encoder.layer.0.attention.**",
               "--pool", "tokens_mean", "--no-progress", "-o", str(out)])
    assert rc == 0
    err = capsys.readouterr().err
    assert "probekit: warning: Layer 'encoder.layer.0.attention.self.dropout' (Dropout), which a glob matched, did not run" in err
    with probekit.open_store(out) as s:
        stored = s.layers("model", "data")
    assert "encoder.layer.0.attention.output.dense" in stored
    assert "encoder.layer.0.attention.self.dropout" not in stored  # sdpa takes the dropout as an argument


def test_cli_padding_flags(tokmods, tmp_path, capsys):
    want = _oracle(tokmods, "gpt2")
    out = tmp_path / "left.h5"
    assert main(["extract", "tokmods:gpt2", "--data", "tokmods:texts", "--layers", "h.0", "--pool", "last",
                 "--padding-side", "left", "--pad-id", "5", "--no-progress", "-o", str(out)]) == 0
    with probekit.open_store(out) as s:
        np.testing.assert_allclose(np.asarray(s.acts("model", "data", "h.0")[:]), want["h.0"]["last"], rtol=0, atol=1e-5)
    out = tmp_path / "none.h5"
    assert main(["extract", "tokmods:bert", "--data", "tokmods:texts", "--layers", "encoder.layer.1", "--pool", "none",
                 "--batch-size", "4", "--no-progress", "-o", str(out)]) == 2
    assert "--max-length" in capsys.readouterr().err
    assert main(["extract", "tokmods:bert", "--data", "tokmods:texts", "--layers", "encoder.layer.1", "--pool", "none",
                 "--max-length", "12", "--batch-size", "4", "--no-progress", "-o", str(out), "--overwrite"]) == 0
    with probekit.open_store(out) as s:
        assert s.acts("model", "data", "encoder.layer.1").shape == (11, 12, 16)
        assert s.acts("model", "data", "@attention_mask").shape == (11, 12)
