"""Turning a MODEL spec (and an optional weights file) into an ``nn.Module``, and the image
preprocessing that model expects.

MODEL is ``timm:NAME``, ``torchvision:NAME`` or ``package.module:callable`` (returning a module; the
current directory is importable, as with ``python -m``). Constructor arguments come from
``model_args`` (CLI: ``--model-arg KEY=VALUE``). For timm and torchvision models, a weights file whose
classifier has another number of classes builds the model with that number of classes. Weights load
from safetensors, or through ``torch.load(..., weights_only=True)``; a pickle-only checkpoint is refused
unless the caller explicitly allows unpickling (only for files one trusts).

:func:`preprocessing_for` returns the PIL image -> tensor transform a model expects (timm's data
config, torchvision's weights transforms, or the image as it is) and a JSON-able description of it.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import difflib
import hashlib
import inspect
import os
import re
import socket
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from .errors import DataError, ModelLoadError
from .extractors import takes_token_ids, token_example
from .vocab import import_callable

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LoadedModel",
    "check_model_name",
    "check_n_inits",
    "describe_preprocessing",
    "dummy_input",
    "file_sha256",
    "load_model",
    "load_state_dict",
    "parse_model_args",
    "preprocessing_for",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# seconds a connectivity check may take before --pretrained is refused as offline
CONNECT_TIMEOUT = 3.0

_ROUTES = ("pass constructor arguments with --model-arg KEY=VALUE (Python: model_args={...}), or build "
           "the model in your own code and name it as package.module:callable (a .py file in the current "
           "directory works)")


@dataclass
class LoadedModel:
    """A model with where it came from and the input it expects.

    Attributes
    ----------
    module : torch.nn.Module
        The model, in eval mode.
    source : str
        The MODEL spec (``"timm:resnet18"``, ``"pkg.mod:fn"``) or the module's class name.
    input_size : tuple of int or None
        Per-sample input, e.g. ``(3, 224, 224)``; None when unknown.
    data_config : dict or None
        timm's data config (input size, interpolation, crop, mean, std) for timm models.
    kind : {"timm", "torchvision", "callable", "module"}
    model_args : dict
        The constructor arguments used, including ``num_classes`` when read from the checkpoint.
    pretrained : bool
        Whether timm / torchvision's pretrained weights were loaded.
    weights : str or None
        The weights file loaded into the model.
    tv_weights : torchvision weights enum member or None
        The torchvision weights fetched with ``pretrained=True`` (their transforms are the model's).
    notes : list of str
        What was inferred on the way (e.g. the number of classes read from the checkpoint).
    """

    module: nn.Module
    source: str
    input_size: tuple[int, ...] | None  # per sample, e.g. (3, 224, 224); None when unknown
    data_config: dict[str, Any] | None = None  # timm's preprocessing config when known
    kind: str = "module"
    model_args: dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False
    weights: str | None = None
    tv_weights: Any = None
    notes: list[str] = field(default_factory=list)

    def preprocessing(self, **overrides: Any) -> tuple[Any, dict[str, Any]]:
        """The model's own image transform and its description (:func:`preprocessing_for`)."""
        return preprocessing_for(self, **overrides)


def parse_model_args(items: Sequence[str] | None) -> dict[str, Any]:
    """``["num_classes=3", "drop_rate=0.1", "act='gelu'"]`` -> a dict of constructor arguments.

    Each value is read as a Python literal (``ast.literal_eval``: numbers, strings, tuples, lists,
    dicts, True/False/None); anything else is kept as the string given (``act=gelu`` -> ``"gelu"``).
    """
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ModelLoadError(
                f"--model-arg {item!r} is not KEY=VALUE with KEY a Python name; write it like "
                "--model-arg num_classes=3."
            )
        try:
            value: Any = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            value = text
        out[key] = value
    return out


def load_model(
    spec: str | nn.Module,
    *,
    weights: str | os.PathLike | None = None,
    pretrained: bool = False,
    allow_pickle: bool = False,
    model_args: Mapping[str, Any] | None = None,
) -> LoadedModel:
    """Build the model a spec names, load ``weights`` into it, and put it in eval mode.

    Parameters
    ----------
    spec : str or torch.nn.Module
        ``"timm:NAME"``, ``"torchvision:NAME"``, ``"package.module:callable"`` (the current directory
        is importable) or a module.
    weights : path, optional
        A ``.safetensors`` file or a torch state dict. For timm and torchvision models whose classifier
        in the file has another number of rows (classes), the model is built with
        ``num_classes`` = those rows when everything else fits (unless ``model_args`` sets it).
    pretrained : bool, default False
        timm / torchvision pretrained weights: from the local cache, else downloaded; refused within
        a few seconds when the network is unreachable.
    allow_pickle : bool, default False
        Allow a checkpoint that only unpickling can read (runs code from the file).
    model_args : dict, optional
        Keyword arguments of the constructor (``timm.create_model``, ``torchvision.models.get_model``
        or the callable), e.g. ``{"num_classes": 3}``.
    """
    args = dict(model_args or {})
    state, read_notes = _read_checkpoint(weights, allow_pickle=allow_pickle) if weights is not None else (None, [])
    if isinstance(spec, nn.Module):
        if args:
            raise ModelLoadError(
                f"model_args {sorted(args)} apply to a MODEL spec, not to an nn.Module that is already "
                "built; build it with those arguments yourself."
            )
        loaded = LoadedModel(spec, type(spec).__name__, _size_attr(spec))
    elif not isinstance(spec, str):
        raise ModelLoadError(
            f"The model must be a MODEL spec string or a torch nn.Module; got {type(spec).__name__}."
        )
    elif spec.startswith("timm:"):
        loaded = _fitted(_timm, spec[5:], pretrained, args, state, weights)
    elif spec.startswith("torchvision:"):
        loaded = _fitted(_torchvision, spec[len("torchvision:"):], pretrained, args, state, weights)
    elif ":" in spec:
        if pretrained:
            raise ModelLoadError(
                f"--pretrained (pretrained=True) applies to timm: and torchvision: models, not to {spec!r}; "
                "load its weights in the callable or pass them with --weights FILE."
            )
        loaded = _callable(spec, args)
    else:
        raise ModelLoadError(
            f"Cannot interpret the model {spec!r}. Use 'timm:NAME', 'torchvision:NAME' or "
            "'package.module:callable' (a module in the current directory works, e.g. mymodels:net)."
        )
    if state is not None and loaded.kind not in ("timm", "torchvision"):
        state, note = _fit_keys(loaded.module, state)
        loaded.notes += [note] if note else []
        _apply_state(loaded.module, state, weights, loaded.source)
    loaded.notes[:0] = read_notes
    loaded.weights = os.fspath(weights) if weights is not None else None
    loaded.module.eval()
    return loaded


# -- names and counts a run is given -------------------------------------------------------------------

_RESERVED_NAME = re.compile(r"@init\d+$")  # the seeded initialisations of model <m> are stored as <m>@init<k>


def check_model_name(name: str, flag: str = "--name") -> str:
    """Refuse a model name the store or the audit cannot take, before anything runs; return it.

    A name must be a non-empty string without ``/`` or surrounding spaces (the store's rule), and must not
    end in ``@init<k>``: the audit stores the seeded initialisations of model ``m`` as ``m@init0``,
    ``m@init1``, ... and reads any such name as one.

    Raises
    ------
    DataError
        Naming the flag (``--name``; pass ``flag="--teacher-name"`` etc. for another) and the fix.
    """
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"{flag} {name!r} is empty; give the model a name such as {flag} resnet.")
    if "/" in name or name in (".", ".."):
        raise DataError(f"{flag} {name!r} cannot name a model in the store: use no '/' (e.g. {name.replace('/', '-')!r}).")
    if name != name.strip():
        raise DataError(f"{flag} {name!r} has leading or trailing spaces; remove them.")
    m = _RESERVED_NAME.search(name)
    if m:
        raise DataError(
            f"{flag} {name!r} ends in {m.group(0)!r}, which is reserved for the seeded initialisations the audit "
            f"stores as <name>@init<k>; choose another name (e.g. {name[:m.start()] + '-' + m.group(0)[1:]!r})."
        )
    return name


def dummy_input(loaded: LoadedModel, preprocessing: Mapping[str, Any] | None = None) -> Any:
    """A batch of one dummy sample for a dry forward pass (the layer and pool choice), or None.

    A token model (its forward takes ``input_ids``) gets 16 token ids (fewer when its position table is
    shorter) with an all-ones attention mask; an image model zeros of its input size: the preprocessed
    size (``preprocessing["input_size"]`` from :func:`preprocessing_for`), else ``loaded.input_size``.
    None when neither is known (callers then fall back to registration order).
    """
    if takes_token_ids(loaded.module):
        cfg = getattr(loaded.module, "config", None)
        longest = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        return token_example(min(16, longest) if isinstance(longest, int) and longest > 0 else 16)
    size = (preprocessing or {}).get("input_size") or loaded.input_size
    return torch.zeros(1, *size) if size else None


def check_n_inits(n: int, flag: str = "--inits") -> int:
    """Refuse a number of seeded initialisations that is not an integer >= 0 (0: no init reference)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise DataError(f"{flag} must be an integer >= 0 (seeded initialisations as the reference; 0: none); "
                        f"got {n!r}.")
    return n


# -- construction ---------------------------------------------------------------------------------------


def _fitted(build: Callable[..., LoadedModel], name: str, pretrained: bool, args: dict[str, Any],
            state: dict[str, torch.Tensor] | None, path: Any) -> LoadedModel:
    """Build a timm / torchvision model; with a checkpoint whose classifier has K rows, with K classes."""
    loaded = build(name, pretrained, args)
    if state is None:
        return loaded
    state, note = _fit_keys(loaded.module, state)
    loaded.notes += [note] if note else []
    if "num_classes" not in args:
        k = _checkpoint_classes(loaded, state)
        if k is not None:
            loaded = build(name, pretrained, {**args, "num_classes": k})
            loaded.notes += [note] if note else []
            loaded.notes.append(f"num_classes={k} read from the classifier in {os.fspath(path)!r}")
    _apply_state(loaded.module, state, path, loaded.source)
    return loaded


def _default_classes(loaded: LoadedModel) -> int:
    n = getattr(loaded.module, "num_classes", None)
    if isinstance(n, int):
        return n
    return int(loaded.model_args.get("num_classes", 1000))


def _checkpoint_classes(loaded: LoadedModel, state: dict[str, torch.Tensor]) -> int | None:
    """The checkpoint's number of classes when its classifier is all that differs from the model."""
    own = loaded.module.state_dict()
    n = _default_classes(loaded)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    differ = [k for k in own if k in state and state[k].shape != own[k].shape]
    if unexpected:
        return None
    if missing and not differ and loaded.kind == "timm":  # a headless checkpoint (num_classes=0)
        head = _timm_head_keys(loaded.module)
        return 0 if head and set(missing) == head else None
    if missing or not differ:
        return None
    rows = set()
    for k in differ:
        a, b = own[k], state[k]
        if a.ndim == 0 or b.ndim != a.ndim or a.shape[0] != n or a.shape[1:] != b.shape[1:]:
            return None
        rows.add(int(b.shape[0]))
    return rows.pop() if len(rows) == 1 else None


def _timm_head_keys(model: nn.Module) -> set[str]:
    try:
        head = model.get_classifier()  # type: ignore[operator]
    except Exception:
        return set()
    for mname, mod in model.named_modules():
        if mod is head and mname:
            return {f"{mname}.{p}" for p, _ in mod.named_parameters()} | {
                f"{mname}.{b}" for b, _ in mod.named_buffers()}
    return set()


def _bad_argument(what: str, args: dict[str, Any], e: Exception) -> ModelLoadError:
    m = re.search(r"unexpected keyword argument '(\w+)'", str(e))
    first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    if m:
        key = m.group(1)
        return ModelLoadError(
            f"{what} does not take the argument {key!r} ({first}); remove --model-arg {key}=... "
            "(model_args) or check the constructor's parameter names."
        )
    shown = ", ".join(f"{k}={v!r}" for k, v in args.items())
    return ModelLoadError(
        f"{what} failed with the arguments {shown} ({type(e).__name__}: {first}); check the --model-arg "
        "values (model_args)."
    )


def _timm(name: str, pretrained: bool, args: dict[str, Any]) -> LoadedModel:
    import timm

    arch = name.split(".")[0]  # 'resnet18.a1_in1k' names pretrained weights of 'resnet18'
    if arch not in timm.list_models():
        close = difflib.get_close_matches(arch, timm.list_models(), n=5)
        raise ModelLoadError(
            f"timm has no model {name!r}. Close names: {close}. List them with "
            "`python -c \"import timm; print(timm.list_models('*pattern*'))\"`, or name your own "
            "model as package.module:callable."
        )
    what = f"timm.create_model({name!r})"
    if pretrained:
        model = _timm_pretrained(name, args, what)
    else:
        try:
            model = timm.create_model(name, pretrained=False, **args)
        except Exception as e:
            if not args:
                raise
            raise _bad_argument(what, args, e) from e
    cfg = timm.data.resolve_model_data_config(model)
    img = getattr(getattr(model, "patch_embed", None), "img_size", None)  # e.g. a ViT built at 64 px
    if isinstance(img, (tuple, list)) and len(img) == 2 and tuple(img) != tuple(cfg["input_size"][1:]):
        cfg["input_size"] = (cfg["input_size"][0], int(img[0]), int(img[1]))
    return LoadedModel(model, f"timm:{name}", tuple(cfg["input_size"]), dict(cfg), kind="timm",
                       model_args=args, pretrained=pretrained)


def _timm_pretrained(name: str, args: dict[str, Any], what: str) -> nn.Module:
    """timm pretrained weights: the local cache first (no network), then the hub if it is reachable."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    url = getattr(cfg, "url", None) if cfg is not None else None
    first: Exception | None = None
    if hub_id:
        try:
            with _hf_offline():
                return timm.create_model(name, pretrained=True, **args)
        except TypeError as e:
            raise _bad_argument(what, args, e) from e
        except Exception as e:  # not in the cache
            first = e
    if hub_id:
        try:
            from huggingface_hub import constants

            host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
        except ImportError:
            host = "huggingface.co"
        cached = False
    elif url:
        host = urlparse(url).hostname or ""
        cached = _torch_hub_cached(url)
    else:
        raise ModelLoadError(f"timm has no pretrained weights for {name!r}; pass a weights file with --weights FILE.")
    if not cached and not _reachable(host):
        raise ModelLoadError(
            f"Cannot fetch pretrained weights for timm:{name}: {host} is not reachable (offline?) and they "
            "are not in the local cache. Pass the weights as a file with --weights FILE (safetensors or "
            "a state dict), or fetch them once on a machine with network."
        ) from first
    try:
        return timm.create_model(name, pretrained=True, **args)
    except TypeError as e:
        raise _bad_argument(what, args, e) from e
    except Exception as e:
        raise ModelLoadError(
            f"Could not fetch pretrained weights for timm:{name} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:120] if str(e) else ''}). Pass the weights as a file with --weights FILE."
        ) from e


@contextlib.contextmanager
def _hf_offline() -> Iterator[None]:
    """Hugging Face hub offline mode for the duration: the cache or an immediate error, no retries."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


def _torch_hub_cached(url: str) -> bool:
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))
    return os.path.isfile(path)


def _reachable(host: str, port: int = 443, timeout: float | None = None) -> bool:
    """Whether a TCP connection to ``host`` (or the HTTPS proxy) opens within ``timeout`` seconds."""
    timeout = CONNECT_TIMEOUT if timeout is None else timeout
    proxy = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
                  if os.environ.get(k)), None)
    if proxy:
        p = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = p.hostname or host, p.port or 80
    ok: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=attempt, daemon=True)  # name resolution ignores socket timeouts
    t.start()
    t.join(timeout)
    return bool(ok)


def _torchvision(name: str, pretrained: bool, args: dict[str, Any]) -> LoadedModel:
    import torchvision

    names = torchvision.models.list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5)
        raise ModelLoadError(
            f"torchvision has no model {name!r}. Close names: {close}. Or name your own model as "
            "package.module:callable."
        )
    what = f"torchvision.models.get_model({name!r})"
    tv_weights = None
    if pretrained:
        tv_weights = torchvision.models.get_model_weights(name).DEFAULT
        url = tv_weights.url
        host = urlparse(url).hostname or ""
        if not _torch_hub_cached(url) and not _reachable(host):
            raise ModelLoadError(
                f"Cannot fetch pretrained weights for torchvision:{name}: {host} is not reachable (offline?) "
                f"and {os.path.basename(urlparse(url).path)} is not in the torch hub cache "
                f"({torch.hub.get_dir()}). Pass the weights as a file with --weights FILE."
            )
    try:
        model = torchvision.models.get_model(name, weights=tv_weights, **args)
    except TypeError as e:
        raise _bad_argument(what, args, e) from e
    except ValueError as e:  # e.g. num_classes that does not fit the pretrained weights
        if not args:
            raise
        raise _bad_argument(what, args, e) from e
    except Exception as e:
        if pretrained:
            raise ModelLoadError(
                f"Could not fetch pretrained weights for torchvision:{name} ({type(e).__name__}). "
                "Pass the weights as a file with --weights FILE."
            ) from e
        if args:
            raise _bad_argument(what, args, e) from e
        raise
    return LoadedModel(model, f"torchvision:{name}", (3, 224, 224), kind="torchvision", model_args=args,
                       pretrained=pretrained, tv_weights=tv_weights)


def _callable(spec: str, args: dict[str, Any]) -> LoadedModel:
    try:
        fn = import_callable(spec, "callable returning an nn.Module")
    except DataError as e:
        raise ModelLoadError(str(e)) from e
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = None
    if params is not None and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        bad = [k for k in args if k not in names]
        if bad:
            raise ModelLoadError(
                f"{spec} does not take the argument {bad[0]!r} (its parameters: {names or 'none'}); "
                f"remove --model-arg {bad[0]}=... (model_args) or fix its name."
            )
    try:
        module = fn(**args)
    except TypeError as e:
        if "argument" in str(e):
            raise _bad_argument(spec, args, e) from e
        raise ModelLoadError(f"{spec} raised {type(e).__name__} building the model: {_line(e)}") from e
    except Exception as e:
        raise ModelLoadError(f"{spec} raised {type(e).__name__} building the model: {_line(e)}") from e
    if not isinstance(module, nn.Module):
        raise ModelLoadError(f"{spec!r} returned a {type(module).__name__}, not a torch nn.Module.")
    return LoadedModel(module, spec, _size_attr(module), kind="callable", model_args=args)


def _size_attr(module: nn.Module) -> tuple[int, ...] | None:
    """A module's ``input_size`` attribute (per sample, e.g. (3, 64, 64)) when it is a sequence of ints."""
    size = getattr(module, "input_size", None)
    if isinstance(size, (tuple, list)) and size and all(isinstance(v, int) for v in size):
        return tuple(size)
    return None


def _line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


# -- weights ----------------------------------------------------------------------------------------


def load_state_dict(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors or a torch checkpoint, without unpickling by default.

    Parameters
    ----------
    path : path
        A ``.safetensors`` file, a torch state dict, or a training checkpoint holding one: timm's
        train.py (``state_dict``, ``state_dict_ema``, ``args`` as an ``argparse.Namespace``, ``epoch``,
        optimizer state...), Lightning's ``.ckpt`` (``state_dict``), or a dict under ``model`` /
        ``model_state_dict`` / ``module``.
    allow_pickle : bool, default False
        Read checkpoints that only unpickling can read (it runs code from the file: only for files one
        trusts). Without it, ``torch.load(weights_only=True)`` reads tensors, plain containers, numbers
        and strings, and ``argparse.Namespace`` (admitted as data: a Namespace built from the file sets
        attributes and runs no code).

    Returns
    -------
    dict of str to torch.Tensor
        The state dict as stored: a training wrapper's key prefix (Lightning's ``net.`` / ``model.``,
        DataParallel's ``module.``) is removed by :func:`load_model`, which knows the model's keys.

    Raises
    ------
    ModelLoadError
        When the path is missing or a directory, the file is damaged or holds no state dict, or it
        holds code or objects that only unpickling can read ("refused: the checkpoint contains
        code/objects ...", naming them) and ``allow_pickle`` is False.
    """
    return _read_checkpoint(path, allow_pickle=allow_pickle)[0]


#: timm train.py saves its ``args`` (an argparse.Namespace); a Namespace holds attributes and runs no code
_SAFE_GLOBALS: list[Any] = [argparse.Namespace]
_STATE_KEYS = ("state_dict", "model", "model_state_dict", "module")


def _read_checkpoint(path: str | os.PathLike, *, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict of a weights file, and notes on what was read (e.g. an EMA copy left out)."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".pt", ".pth", ".bin", ".ckpt"))
        hint = f" (it holds {', '.join(inside[:4])}{', ...' if len(inside) > 4 else ''})" if inside else ""
        raise ModelLoadError(f"The weights {str(path)!r} is a directory; give the checkpoint file{hint}.")
    if not path.is_file():
        raise ModelLoadError(f"The weights file {str(path)!r} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path)), []
        except Exception as e:
            raise ModelLoadError(f"Cannot read {str(path)!r} as safetensors ({e}).") from e
    try:
        if allow_pickle:
            obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
        else:
            with torch.serialization.safe_globals(_SAFE_GLOBALS):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        objects = None if allow_pickle else _code_in_pickle(path, str(e))
        if objects:
            raise ModelLoadError(
                f"Loading {str(path)!r} refused: the checkpoint contains code/objects that only unpickling can "
                f"read ({', '.join(objects[:3])}{', ...' if len(objects) > 3 else ''}), and probekit does not "
                "unpickle by default (unpickling runs code from the file). If you trust the file, pass "
                "--allow-pickle (allow_pickle=True); better, re-save it as a state dict or safetensors."
            ) from e
        raise ModelLoadError(
            f"Cannot read the checkpoint {str(path)!r}: it is not a torch checkpoint or it is damaged "
            f"({type(e).__name__}). Check the file, or save the weights again (safetensors preferred)."
        ) from e
    notes: list[str] = []
    if isinstance(obj, dict) and isinstance(obj.get("state_dict_ema"), dict) and isinstance(obj.get("state_dict"), dict):
        notes.append(f"read 'state_dict' of {str(path)!r}; its EMA copy 'state_dict_ema' is not used")
    for key in _STATE_KEYS:
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(
            f"The checkpoint {str(path)!r} does not hold a state dict (name -> tensor)."
        )
    return obj, notes


_PICKLE_STRINGS = ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING")


def _code_in_pickle(path: Path, error: str) -> list[str] | None:
    """The Python objects (``module.name``) a checkpoint's pickle names that a safe load refused, or
    None when the file is no readable pickle (damaged, or not a checkpoint).

    Reads the opcodes only (:func:`pickletools.genops` builds no object): the torch zip's ``data.pkl``,
    else the file's consecutive pickles (torch's legacy format, a bare pickle).
    """
    import pickletools
    import zipfile

    def scan(f: Any) -> list[str]:
        names: list[str] = []
        strings: list[str] = []
        for op, arg, _ in pickletools.genops(f):
            if op.name in ("GLOBAL", "INST"):
                names.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL":
                names.append(".".join(strings[-2:]))
            elif op.name in _PICKLE_STRINGS:
                strings.append(arg if isinstance(arg, str) else str(arg))
            elif op.name == "STOP":
                break
        return names

    found: list[str] | None = None
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                member = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                if member is None:
                    return None
                with z.open(member) as f:
                    found = scan(f)
        else:
            with open(path, "rb") as f:
                while True:  # the legacy format: several pickles, then raw tensor bytes
                    try:
                        names = scan(f)
                    except Exception:
                        break
                    found = (found or []) + names
                    if not f.peek(1):
                        break
    except (OSError, zipfile.BadZipFile):
        return None
    if found is None:
        return None
    named = re.findall(r"GLOBAL ([\w.]+)", error)  # what torch's safe unpickler refused
    refused = list(dict.fromkeys(named or [n for n in found if not n.startswith(("torch.", "collections."))]))
    return refused or None


def _fit_keys(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str | None]:
    """``state`` with a training wrapper's key prefix removed when (and only when) the rest fits ``model``.

    Lightning keeps the network in an attribute (``self.net``, ``self.model``: keys ``net.conv1.weight``),
    DataParallel / DDP in ``module``. A prefix is removed when the keys under it are exactly the model's
    keys (their shapes are checked when the weights are applied); the keys outside it (a loss's buffers,
    an EMA copy) are left out, and said. Among several prefixes that fit, one without "ema" in it, then
    the shortest. A state whose keys are the model's is returned as it is.
    """
    own = set(model.state_dict())
    if not own or set(state) == own:
        return state, None
    counts: dict[str, int] = {}
    for k in state:
        parts = k.split(".")
        for i in range(1, len(parts)):
            p = ".".join(parts[:i]) + "."
            counts[p] = counts.get(p, 0) + 1
    fits = [p for p, c in counts.items() if c == len(own) and {k[len(p):] for k in state if k.startswith(p)} == own]
    if not fits:
        return state, None
    prefix = min(fits, key=lambda p: ("ema" in p.lower(), len(p), p))
    rest = len(state) - len(own)
    note = (f"weights read from the keys under {prefix!r} (a training wrapper's attribute)"
            + (f"; {rest} other entries left out" if rest else ""))
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, note


def _apply_state(model: nn.Module, state: dict[str, torch.Tensor], path: Any, source: str = "") -> None:
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
        target = f"the model {source}" if source else "the model"
        raise ModelLoadError(
            f"The weights in {os.fspath(path)!r} do not fit {target}: {'; '.join(parts)}. Is the checkpoint "
            f"for another architecture or configuration? {_ROUTES[0].upper()}{_ROUTES[1:]}."
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


# -- preprocessing ------------------------------------------------------------------------------------


def preprocessing_for(
    spec: LoadedModel | str | nn.Module,
    model: nn.Module | None = None,
    *,
    image_size: int | Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> tuple[Callable[[Any], torch.Tensor], dict[str, Any]]:
    """The PIL image -> tensor transform a model expects, and a JSON-able description of it.

    Parameters
    ----------
    spec : LoadedModel, str or torch.nn.Module
        What :func:`load_model` returned (preferred: it knows the pretrained weights and timm's data
        config), a MODEL spec string, or a module.
    model : torch.nn.Module, optional
        The built model, when ``spec`` is a string (timm reads its data config from it).
    image_size : int or (H, W), optional
        The model's input size (the image is resized and centre-cropped to it); overrides the model's.
    mean, std : sequence of 3 floats, optional
        Normalisation per RGB channel; overrides the model's.

    Returns
    -------
    transform : callable
        PIL image -> float tensor (C, H, W).
    info : dict
        ``kind`` (timm / torchvision / callable / module), ``source`` (where the settings came from),
        ``input_size`` ([C, H, W] or None for images at their own size), ``mean``, ``std``,
        ``steps`` (each step as text), ``overrides`` and ``note``; ``json.dumps`` takes it.

    Notes
    -----
    timm models use timm's data config (``timm.data.resolve_model_data_config``, corrected to a
    ``patch_embed.img_size`` the model was built with) and ``timm.data.create_transform``: input size,
    interpolation, crop and mean/std. torchvision models use their pretrained weights' ``transforms()``
    when they were loaded with ``pretrained=True``, else the standard ImageNet preprocessing (resize
    256, centre crop 224, ImageNet mean/std), which the note says. Other models get the image at its own
    size as a [0, 1] tensor (resized to a module's ``input_size`` attribute when it has one).
    """
    size = _hw(image_size)
    mean = _channels("mean", mean)
    std = _channels("std", std)
    if std is not None and any(s <= 0 for s in std):
        raise DataError(f"--std values must be positive; got {list(std)}.")
    overrides = {k: v for k, v in (("image_size", list(size) if size else None), ("mean", mean), ("std", std))
                 if v is not None}
    loaded = spec if isinstance(spec, LoadedModel) else None
    if loaded is not None:
        kind, name, module = loaded.kind, loaded.source.partition(":")[2], loaded.module
    elif isinstance(spec, nn.Module):
        kind, name, module = "module", type(spec).__name__, spec
    elif isinstance(spec, str) and spec.startswith(("timm:", "torchvision:")):
        kind, _, name = spec.partition(":")
        module = model
    elif isinstance(spec, str):
        kind, name, module = "callable", spec, model
    else:
        raise DataError(f"preprocessing_for needs a LoadedModel, a MODEL spec or a module; got {type(spec).__name__}.")

    note = ""
    if kind == "timm":
        import timm.data

        if loaded is not None and loaded.data_config is not None:
            cfg = dict(loaded.data_config)
        elif module is not None:
            cfg = dict(timm.data.resolve_model_data_config(module))
        else:
            import timm

            pcfg = timm.models.get_pretrained_cfg(name.split(".")[0]) if name else None
            cfg = dict(timm.data.resolve_data_config({}, pretrained_cfg=pcfg.to_dict() if pcfg else None))
        if size:
            cfg["input_size"] = (cfg["input_size"][0], *size)
        if mean is not None:
            cfg["mean"] = tuple(mean)
        if std is not None:
            cfg["std"] = tuple(std)
        transform = timm.data.create_transform(**cfg)
        source = "timm data config (timm.data.resolve_model_data_config) with timm.data.create_transform"
        extra = {"interpolation": cfg.get("interpolation"), "crop_pct": cfg.get("crop_pct"),
                 "crop_mode": cfg.get("crop_mode")}
    elif kind == "torchvision":
        tv = loaded.tv_weights if loaded is not None else None
        if tv is not None and not overrides:
            transform = tv.transforms()
            source = f"torchvision weights {tv}.transforms()"
        else:
            from torchvision.transforms import InterpolationMode

            if tv is not None:
                t = tv.transforms()
                crop0, resize0 = t.crop_size[0], t.resize_size[0]
                interp, m0, s0 = t.interpolation, tuple(t.mean), tuple(t.std)
                source = f"torchvision weights {tv}.transforms() with overrides"
            else:
                crop0, resize0, interp, m0, s0 = 224, 256, InterpolationMode.BILINEAR, IMAGENET_MEAN, IMAGENET_STD
                source = "standard ImageNet preprocessing"
                note = ("the model does not have torchvision's pretrained weights, so its own preprocessing is "
                        "not known: standard ImageNet preprocessing (resize 256, centre crop 224, ImageNet "
                        "mean/std) is used; set --image-size / --mean / --std if it was trained otherwise")
            hw = size or (crop0, crop0)
            resize = round(max(hw) * resize0 / crop0)
            transform = _compose(resize, hw, interp, mean or m0, std or s0)
        extra = {}
    else:
        if size is None and loaded is not None and loaded.input_size and len(loaded.input_size) == 3:
            size = tuple(loaded.input_size[1:])
            source = "the module's input_size attribute; images as [0, 1] tensors"
        elif size is None:
            source = "the image at its own size as a [0, 1] tensor"
            note = ("images are not resized or normalised for this model: every image must have one size; "
                    "set --image-size / --mean / --std to resize or normalise them")
        else:
            source = "--image-size; images as [0, 1] tensors"
        from torchvision.transforms import InterpolationMode

        transform = _compose(max(size) if size else None, size, InterpolationMode.BILINEAR, mean, std)
        extra = {}
    steps = _describe(transform)
    crop = next((s["size"] for s in steps if s["op"] == "center_crop"), None)
    norm = next((s for s in steps if s["op"] == "normalize"), None)
    info: dict[str, Any] = {
        "kind": kind,
        "model": name,
        "source": source,
        "input_size": [3, *crop] if crop else None,
        "mean": norm["mean"] if norm else None,
        "std": norm["std"] if norm else None,
        **{k: v for k, v in extra.items() if v is not None},
        "steps": [s["text"] for s in steps],
        "overrides": overrides,
        "note": note,
    }
    return transform, info


def describe_preprocessing(info: Mapping[str, Any]) -> str:
    """One line for people: what :func:`preprocessing_for` returned."""
    text = f"preprocessing ({info.get('source')}): {' -> '.join(info.get('steps', []))}"
    return f"{text}; note: {info['note']}" if info.get("note") else text


def _hw(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    vals = [int(size)] if isinstance(size, (int, float)) else [int(s) for s in size]
    if len(vals) == 3:
        vals = vals[1:]
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or any(v < 1 for v in vals):
        raise DataError(f"--image-size must be S or H,W (positive pixels); got {size!r}.")
    return vals[0], vals[1]


def _channels(what: str, values: Sequence[float] | None) -> list[float] | None:
    if values is None:
        return None
    vals = [float(v) for v in values]
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3:
        raise DataError(f"--{what} needs 3 values (one per RGB channel) or one for all; got {vals}.")
    return vals


def _compose(resize: int | None, crop: tuple[int, int] | None, interp: Any, mean: Any, std: Any) -> Any:
    from torchvision import transforms as T

    steps: list[Any] = []
    if resize is not None and crop is not None:
        steps += [T.Resize(resize, interpolation=interp, antialias=True), T.CenterCrop(list(crop))]
    steps.append(T.ToTensor())
    if mean is not None or std is not None:
        steps.append(T.Normalize(list(mean) if mean is not None else [0.0] * 3,
                                 list(std) if std is not None else [1.0] * 3))
    return T.Compose(steps)


def _describe(transform: Any) -> list[dict[str, Any]]:
    """Each step of a (torchvision / timm) transform as data, for the stored description."""
    out: list[dict[str, Any]] = []

    def r(v: Any) -> list[float]:
        return [round(float(x), 6) for x in (v.tolist() if hasattr(v, "tolist") else v)]

    def interp(t: Any) -> str:
        i = getattr(t, "interpolation", None)
        return str(getattr(i, "value", i))

    for t in getattr(transform, "transforms", [transform]):
        name = type(t).__name__
        if name == "ImageClassification":  # torchvision weights' transforms
            out += [
                {"op": "resize", "size": list(t.resize_size), "text": f"resize {list(t.resize_size)} {interp(t)}"},
                {"op": "center_crop", "size": [t.crop_size[0]] * 2 if len(t.crop_size) == 1 else list(t.crop_size),
                 "text": f"center crop {t.crop_size}"},
                {"op": "to_tensor", "text": "to tensor [0, 1]"},
                {"op": "normalize", "mean": r(t.mean), "std": r(t.std),
                 "text": f"normalize mean {r(t.mean)} std {r(t.std)}"},
            ]
        elif name == "Resize":
            size = t.size if isinstance(t.size, int) else list(t.size)
            out.append({"op": "resize", "size": size, "text": f"resize {size} {interp(t)}"})
        elif name == "CenterCrop":
            size = list(t.size) if not isinstance(t.size, int) else [t.size, t.size]
            out.append({"op": "center_crop", "size": size, "text": f"center crop {size[0]}x{size[1]}"})
        elif name in ("ToTensor", "MaybeToTensor", "PILToTensor"):
            out.append({"op": "to_tensor", "text": "to tensor [0, 1]" if name != "PILToTensor" else "to uint8 tensor"})
        elif name == "Normalize":
            out.append({"op": "normalize", "mean": r(t.mean), "std": r(t.std),
                        "text": f"normalize mean {r(t.mean)} std {r(t.std)}"})
        else:
            out.append({"op": name, "text": repr(t).replace("\n", " ")})
    return out
