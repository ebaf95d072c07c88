"""The hook context manager, pooling and weight rows, against manual computations."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import timm
import torch
from torch import nn

from probekit.errors import DataError
from probekit.extractors import POOLS, capture, pool, weight_rows, weights_sha256
from probekit.extractors._weights import param_count


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks for m in model.modules())


class Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


# -- hooks are removed and modes restored ------------------------------------------------------------
def test_hooks_removed_and_mode_restored_after_exception_in_forward():
    net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), Boom())
    net.train()
    net[1].eval()
    with pytest.raises(RuntimeError, match="boom"):
        with capture(net, ["0", "1"]) as cap:
            assert not net.training and not net[0].training  # eval inside the block
            assert not no_hooks(net)
            cap.run(torch.zeros(2, 4))
    assert no_hooks(net)
    assert net.training and net[0].training and not net[1].training and net[2].training


def test_hooks_removed_after_a_normal_block_and_eval_mode_is_used_inside():
    net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.9))
    net.train()
    x = torch.ones(3, 4)
    with capture(net, "1", pool="none") as cap:
        got = cap.run(x)["1"]
    with torch.no_grad():
        want = net[0](x)  # dropout is the identity in eval mode
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert no_hooks(net) and net.training and net[1].training


def test_run_outside_the_block_is_an_error():
    net = nn.Sequential(nn.Linear(2, 2))
    with capture(net, "0") as cap:
        pass
    with pytest.raises(DataError, match="inside `with capture"):
        cap.run(torch.zeros(1, 2))


# -- in-place operations later in the forward ----------------------------------------------------------
def test_inplace_relu_and_residual_add_do_not_change_captured_values():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False).eval()
    x = torch.randn(2, 3, 32, 32)
    blk = model.layer1[0]
    assert model.act1.inplace and blk.act2.inplace
    # manual oracle: run the pieces by hand on fresh tensors
    with torch.no_grad():
        stem_bn = model.bn1(model.conv1(x))  # later modified in place by act1 (ReLU inplace)
        h = model.maxpool(torch.relu(stem_bn))
        bn2 = blk.bn2(blk.conv2(blk.act1(blk.bn1(blk.conv1(h)))))  # later `x += shortcut` mutates it
    layers = ["bn1", "layer1.0.bn2"]
    for mode in ("none", "flatten", "avg", "max"):
        with capture(model, layers, pool=mode) as cap:
            got = cap.run(x)
        for name, ref in (("bn1", stem_bn), ("layer1.0.bn2", bn2)):
            want = pool(ref, mode)
            assert torch.max(torch.abs(got[name] - want)) < 1e-5, (name, mode)
            # the mutation really happens: the post-ReLU value differs from what we captured
    assert (stem_bn < 0).any()


# -- modules called more than once ------------------------------------------------------------------------
class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(self.lin(x) * 2.0)


def test_module_called_twice_is_a_clear_error():
    net = Twice()
    with pytest.raises(DataError) as info:
        with capture(net, "lin") as cap:
            cap.run(torch.zeros(1, 3))
    assert str(info.value) == (
        "Layer 'lin' (Linear) runs more than once in one forward pass. Pick one call with 'lin@0' "
        "(first), 'lin@1' (second), and so on."
    )
    assert no_hooks(net)


def test_call_selector_picks_the_right_call():
    torch.manual_seed(0)
    net = Twice()
    x = torch.randn(4, 3)
    with torch.no_grad():
        first = net.lin(x)
        second = net.lin(first * 2.0)
    with capture(net, ["lin@1", "lin@0"], pool="none") as cap:
        got = cap.run(x)
    assert list(got) == ["lin@1", "lin@0"]
    torch.testing.assert_close(got["lin@0"], first, rtol=0, atol=0)
    torch.testing.assert_close(got["lin@1"], second, rtol=0, atol=0)
    with pytest.raises(DataError, match=r"asks for call 2 of layer 'lin', but it ran only 2 time"):
        with capture(net, "lin@2") as cap:
            cap.run(x)


def test_layer_that_does_not_run_is_an_error():
    net = nn.Sequential(nn.Linear(2, 2))
    net.add_module("spare", nn.Linear(2, 2))
    net.forward = lambda x: net[0](x)  # type: ignore[method-assign]
    with pytest.raises(DataError, match="did not run during the forward pass"):
        with capture(net, "spare") as cap:
            cap.run(torch.zeros(1, 2))


# -- outputs that are not plain tensors ------------------------------------------------------------------
class Multi(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x):
        if self.kind == "tuple":
            return (x + 1, x + 2)
        if self.kind == "dict":
            return {"a": x + 1, "b": x + 2}
        return [None, [x + 3]]


@pytest.mark.parametrize("kind, key, offset", [("tuple", None, 1), ("tuple", 1, 2), ("dict", None, 1),
                                               ("dict", "b", 2), ("nested", None, 3)])
def test_tuple_list_dict_outputs(kind, key, offset):
    net = nn.Sequential(Multi(kind))
    x = torch.arange(6.0).reshape(2, 3)
    with capture(net, "0", pool="none", output_key=key) as cap:
        got = cap.run(x)["0"]
    torch.testing.assert_close(got, x + offset)


def test_output_without_tensor_is_an_error():
    class NoTensor(nn.Module):
        def forward(self, x):
            return "text"

    net = nn.Sequential(NoTensor())
    with pytest.raises(DataError, match="returned str"):
        with capture(net, "0") as cap:
            cap.run(torch.zeros(1))


# -- pooling against numpy ----------------------------------------------------------------------------------
@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_pool_modes_against_numpy(rng):
    maps = rng.normal(size=(3, 4, 5, 6)).astype(np.float32)
    tok = rng.normal(size=(3, 7, 8)).astype(np.float32)
    vec = rng.normal(size=(3, 8)).astype(np.float32)
    cases = [
        (maps, "avg", maps.mean(axis=(2, 3))), (maps, "max", maps.max(axis=(2, 3))),
        (maps, "flatten", maps.reshape(3, -1)), (maps, "none", maps),
        (tok, "avg", tok.mean(axis=1)), (tok, "max", tok.max(axis=1)), (tok, "cls", tok[:, 0]),
        (tok, "tokens_mean", tok[:, 1:].mean(axis=1)), (tok, "flatten", tok.reshape(3, -1)),
        (vec, "avg", vec), (vec, "max", vec), (vec, "flatten", vec), (vec, "none", vec),
    ]
    for arr, mode, want in cases:
        got = pool(torch.from_numpy(arr), mode).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=f"{arr.shape} {mode}")
    np.testing.assert_allclose(pool(torch.from_numpy(tok), "tokens_mean", num_prefix_tokens=3).numpy(),
                               tok[:, 3:].mean(axis=1), rtol=1e-6)


def test_pool_conv1d_output_is_channels_first_in_capture(rng):
    net = nn.Sequential(nn.Conv1d(2, 4, 3))
    x = torch.from_numpy(rng.normal(size=(5, 2, 9)).astype(np.float32))
    with capture(net, "0", pool="avg") as cap:
        got = cap.run(x)["0"].numpy()
    with torch.no_grad():
        raw = net(x).numpy()
    np.testing.assert_allclose(got, raw.mean(axis=2), rtol=1e-6, atol=1e-6)


def test_pool_returns_a_copy_never_a_view():
    t = torch.ones(2, 3, 4)
    for mode in POOLS:
        out = pool(t, mode)
        t_before = out.clone()
        t.add_(1.0)
        torch.testing.assert_close(out, t_before)
        t.sub_(1.0)


def test_pool_half_precision_accumulates_in_float32():
    t = torch.full((1, 2, 64, 64), 1.0 / 3.0, dtype=torch.float16)
    out = pool(t, "avg")
    assert out.dtype == torch.float32
    assert abs(out[0, 0].item() - float(np.float16(1.0 / 3.0))) < 1e-6


def test_pool_rank_mismatch_names_layer_and_fitting_modes():
    with pytest.raises(DataError) as info:
        pool(torch.zeros(2, 3, 4, 4), "cls", layer="layer1")
    assert str(info.value) == (
        "Pool 'cls' does not fit layer 'layer1', whose output has shape (N, 3, 4, 4) (rank 4): 'cls' "
        "needs a 3-D token tensor (N, T, D). Pools that fit: avg, max, flatten, none. Pass another pool "
        "for this layer, e.g. pool={'layer1': 'avg'}."
    )
    with pytest.raises(DataError, match="must be one of"):
        pool(torch.zeros(2, 3), "mean")


def test_pool_mismatch_raised_from_capture_leaves_no_hooks():
    net = nn.Sequential(nn.Conv2d(1, 2, 3))
    with pytest.raises(DataError, match="Pool 'tokens_mean' does not fit layer '0'"):
        with capture(net, "0", pool="tokens_mean") as cap:
            cap.run(torch.zeros(1, 1, 5, 5))
    assert no_hooks(net)


def test_pool_dict_needs_every_layer():
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    with pytest.raises(DataError, match="names no mode for layer '1'"):
        capture(net, ["0", "1"], pool={"0": "avg"}).__enter__()
    with capture(net, ["0", "1"], pool={"0": "none", "*": "flatten"}) as cap:
        assert cap.modes == {"0": "none", "1": "flatten"}


# -- weights ------------------------------------------------------------------------------------------------
def test_weight_rows_linear_and_conv():
    torch.manual_seed(0)
    lin, c1, c2, c3 = nn.Linear(5, 3), nn.Conv1d(2, 4, 3), nn.Conv2d(3, 6, (2, 5), groups=3), nn.Conv3d(1, 2, 2)
    np.testing.assert_array_equal(weight_rows(lin), lin.weight.detach().numpy())
    for conv in (c1, c2, c3):
        w = conv.weight.detach().numpy()
        rows = weight_rows(conv)
        assert rows.shape == (w.shape[0], int(np.prod(w.shape[1:])))
        for unit in range(w.shape[0]):
            np.testing.assert_array_equal(rows[unit], w[unit].ravel())
    assert weight_rows(nn.ReLU()) is None and weight_rows(nn.BatchNorm2d(3)) is None


def test_weights_sha256_matches_hashlib_over_sorted_state_dict():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    assert weights_sha256(net) == h.hexdigest()
    other = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    other.load_state_dict(net.state_dict())
    assert weights_sha256(other) == weights_sha256(net)
    with torch.no_grad():
        other[0].weight[0, 0] += 1e-3
    assert weights_sha256(other) != weights_sha256(net)
    assert param_count(net) == 3 * 2 + 2 + 2 + 2
