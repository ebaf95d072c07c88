"""Turning a MODEL spec (and an optional weights file) into an ``nn.Module``.

MODEL is ``timm:NAME``, ``torchvision:NAME`` or ``package.module:callable`` (returning a module).
Weights load from safetensors, or through ``torch.load(..., weights_only=True)``; a pickle-only
checkpoint is refused unless the caller explicitly allows unpickling (only for files one trusts).
"""

from __future__ import annotations

import difflib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .datasets import import_callable
from .errors import DataError, ModelLoadError

__all__ = ["LoadedModel", "file_sha256", "load_model", "load_state_dict"]


@dataclass
class LoadedModel:
    """A model with where it came from and the input it expects."""

    module: nn.Module
    source: str
    input_size: tuple[int, ...] | None  # per sample, e.g. (3, 224, 224); None when unknown
    data_config: dict[str, Any] | None = None  # timm's preprocessing config when known


def load_model(
    spec: str | nn.Module,
    *,
    weights: str | os.PathLike | None = None,
    pretrained: bool = False,
    allow_pickle: bool = False,
) -> LoadedModel:
    """Build the model a spec names, load ``weights`` into it, and put it in eval mode."""
    if isinstance(spec, nn.Module):
        loaded = LoadedModel(spec, type(spec).__name__, None)
    elif spec.startswith("timm:"):
        loaded = _timm(spec[5:], pretrained)
    elif spec.startswith("torchvision:"):
        loaded = _torchvision(spec[len("torchvision:"):], pretrained)
    elif ":" in spec:
        try:
            fn = import_callable(spec, "callable returning an nn.Module")
        except DataError as e:
            raise ModelLoadError(str(e)) from e
        module = fn()
        if not isinstance(module, nn.Module):
            raise ModelLoadError(f"{spec!r} returned a {type(module).__name__}, not a torch nn.Module.")
        loaded = LoadedModel(module, spec, getattr(module, "input_size", None))
    else:
        raise ModelLoadError(
            f"Cannot interpret the model {spec!r}. Use 'timm:NAME', 'torchvision:NAME' or "
            "'package.module:callable'."
        )
    if weights is not None:
        state = load_state_dict(weights, allow_pickle=allow_pickle)
        _apply_state(loaded.module, state, weights)
    loaded.module.eval()
    return loaded


def _timm(name: str, pretrained: bool) -> LoadedModel:
    import timm

    if name not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        raise ModelLoadError(
            f"timm has no model {name!r}. Close names: {close}. List them with "
            "`python -c \"import timm; print(timm.list_models('*pattern*'))\"`."
        )
    try:
        model = timm.create_model(name, pretrained=pretrained)
    except Exception as e:  # downloads fail in many ways (no network, no hub package, missing file)
        if pretrained:
            raise ModelLoadError(
                f"Could not fetch pretrained weights for timm:{name} ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:120]}). Offline? Pass the weights as a file with --weights FILE."
            ) from e
        raise
    cfg = timm.data.resolve_data_config({}, model=model)
    return LoadedModel(model, f"timm:{name}", tuple(cfg["input_size"]), cfg)


def _torchvision(name: str, pretrained: bool) -> LoadedModel:
    import torchvision

    names = torchvision.models.list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5)
        raise ModelLoadError(f"torchvision has no model {name!r}. Close names: {close}.")
    try:
        model = torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None)
    except Exception as e:
        if pretrained:
            raise ModelLoadError(
                f"Could not fetch pretrained weights for torchvision:{name} ({type(e).__name__}). "
                "Offline? Pass the weights as a file with --weights FILE."
            ) from e
        raise
    return LoadedModel(model, f"torchvision:{name}", (3, 224, 224))


def load_state_dict(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors or a torch checkpoint, without unpickling by default."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"The weights file {str(path)!r} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise ModelLoadError(f"Cannot read {str(path)!r} as safetensors ({e}).") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as e:
        if not allow_pickle and "Unsupported global" in str(e):  # a real pickle naming Python objects
            raise ModelLoadError(
                f"The checkpoint {str(path)!r} holds Python objects that only unpickling can read, and "
                "probekit does not unpickle by default (it can run code). If you trust the file, pass "
                "--allow-pickle (allow_pickle=True); better, re-save it as a state dict or safetensors."
            ) from e
        raise ModelLoadError(
            f"Cannot read the checkpoint {str(path)!r}: it is not a torch checkpoint or it is damaged "
            f"({type(e).__name__}). Check the file, or save the weights again (safetensors preferred)."
        ) from e
    for key in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(
            f"The checkpoint {str(path)!r} does not hold a state dict (name -> tensor)."
        )
    if obj and all(k.startswith("module.") for k in obj):  # saved from DataParallel / DDP
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _apply_state(model: nn.Module, state: dict[str, torch.Tensor], path: Any) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_few(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches {_few(shapes)}")
        raise ModelLoadError(
            f"The weights in {str(path)!r} do not fit the model: {'; '.join(parts)}. Is the checkpoint "
            "for another architecture (or another number of classes)?"
        )
    model.load_state_dict(state)


def _few(items: list[str], n: int = 4) -> str:
    shown = ", ".join(items[:n])
    return f"[{shown}{f', ... ({len(items)} in all)' if len(items) > n else ''}]"


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
