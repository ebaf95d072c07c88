"""Neuron weight rows of Linear and Conv layers, and a fingerprint of a model's weights."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import nn

__all__ = ["param_count", "weight_rows", "weights_sha256"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def weight_rows(module: nn.Module) -> np.ndarray | None:
    """The incoming weight vector of every unit of a Linear or Conv layer.

    Parameters
    ----------
    module : torch.nn.Module
        The layer.

    Returns
    -------
    numpy.ndarray of shape (units, fan_in), float32, or None
        For ``nn.Linear``, the rows of ``weight`` (out_features, in_features); for ``nn.Conv1d/2d/3d``,
        each filter flattened: ``weight.reshape(out_channels, -1)`` (grouped convolutions give
        ``in_channels / groups * prod(kernel_size)`` columns). None for any other module (and for a
        lazy module not yet initialised).

    Examples
    --------
    >>> from torch import nn
    >>> weight_rows(nn.Conv2d(3, 8, 5)).shape
    (8, 75)
    >>> weight_rows(nn.ReLU()) is None
    True
    """
    if not isinstance(module, (nn.Linear, *_CONV)):
        return None
    w = module.weight
    if isinstance(w, nn.parameter.UninitializedParameter):
        return None
    return w.detach().reshape(w.shape[0], -1).to("cpu", torch.float32).numpy().copy()


def _tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """The tensor's raw bytes as a uint8 array (a view of a contiguous CPU tensor: hashlib reads the
    buffer in place, where ``tobytes()`` copied every weight once more before hashing it)."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    if t.numel() == 0:
        return np.empty(0, dtype=np.uint8)
    return t.view(torch.uint8).numpy()


def weights_sha256(model: nn.Module) -> str:
    """A SHA-256 fingerprint of a model's state dict (parameters and buffers).

    The hash covers, for every entry sorted by name: the name, the dtype, the shape and the raw bytes.
    Equal weights give equal hashes across runs and devices; any change of a value, a shape or a name
    changes it.

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    str
        64 hexadecimal digits.
    """
    h = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, torch.Tensor):  # extra state objects are not weights
            continue
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(repr(tuple(t.shape)).encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def param_count(model: nn.Module) -> int:
    """Number of parameters (shared parameters counted once)."""
    return int(sum(p.numel() for p in model.parameters()))
