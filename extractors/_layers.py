"""Choosing layers: exact module names, globs, predicates, and call selectors (``name@K``).

Layer names are exactly the names of ``model.named_modules()``. A selector may end in ``@K`` to pick the
K-th call (0-based) of a module that runs several times in one forward pass (a shared block, a module
applied in a loop).

Globs: a glob without a dot matches whole names as :func:`fnmatch.fnmatchcase` does, so its ``*``
crosses dots (``layer*``: ``layer1`` and every module under it). A glob with a dot is matched part by
part: ``*`` and ``?`` stay within one part and ``**`` (a whole part) spans any number of parts (at
least one at the end), so ``encoder.layer.*`` picks the blocks ``encoder.layer.0``,
``encoder.layer.1``, ... and not their submodules, ``encoder.layer.**`` every module under
``encoder.layer``, and ``encoder.**.dense`` every ``dense`` at any depth under ``encoder``.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from probekit.errors import DataError, LayerNotFoundError

__all__ = ["LayerInfo", "LayerSpec", "forward_params", "glob_match", "list_layers", "parse_selector",
           "resolve_layers", "takes_token_ids", "token_example"]

LayerSpec = str | Sequence[str] | Callable[..., bool]
"""What a user may pass as ``layers``: a name, a glob, ``name@K``, a list of these, or a predicate."""

_GLOB_CHARS = re.compile(r"[*?\[]")
_CALL_RE = re.compile(r"^(?P<name>.*)@(?P<call>\d+)$")
_HINT = "Run `probekit layers MODEL` to list them."


#: the reserved selector of the model's own output (its return value, e.g. the logits): hooked on the
#: root module and stored under this name, which no ``named_modules()`` name can take
OUTPUT_LAYER = "@output"


def parse_selector(selector: str) -> tuple[str, int | None]:
    """Split ``"name@K"`` into ``("name", K)``; a plain name gives ``(name, None)``.

    Parameters
    ----------
    selector : str
        A module name or glob, optionally followed by ``@K`` with K a non-negative integer.

    Returns
    -------
    name : str
        The module name (or glob) without the call selector.
    call : int or None
        The 0-based call index, or None when no call was picked.
    """
    m = _CALL_RE.match(selector)
    if m is None:
        return selector, None
    return m.group("name"), int(m.group("call"))


def _is_glob(pattern: str) -> bool:
    return _GLOB_CHARS.search(pattern) is not None


def _match_parts(parts: list[str], pats: list[str]) -> bool:
    if not pats:
        return not parts
    if pats[0] == "**":  # zero or more parts; a trailing one: one or more (``a.**`` is under ``a``, not ``a``)
        first = 1 if len(pats) == 1 else 0
        return any(_match_parts(parts[i:], pats[1:]) for i in range(first, len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pats[0]) and _match_parts(parts[1:], pats[1:])


def glob_match(name: str, pattern: str) -> bool:
    """Whether the module name ``name`` matches the glob ``pattern`` (see the module docstring).

    Examples
    --------
    >>> glob_match("layer1.0", "layer*"), glob_match("encoder.layer.0.output", "encoder.layer.*")
    (True, False)
    >>> glob_match("encoder.layer.0", "encoder.layer.*"), glob_match("encoder.layer.0.output", "encoder.**")
    (True, True)
    """
    if "." not in pattern:
        return fnmatch.fnmatchcase(name, pattern)
    return _match_parts(name.split("."), pattern.split("."))


def _not_found(model: nn.Module, item: str, names: list[str]) -> LayerNotFoundError:
    close = difflib.get_close_matches(item, names, n=5, cutoff=0.5)
    if not close and _is_glob(item):  # compare the glob's literal part with the names
        close = difflib.get_close_matches(_GLOB_CHARS.sub("", item), names, n=5, cutoff=0.5)
    if close:
        hint = f"Closest names: {', '.join(repr(c) for c in close)}."
    else:  # nothing similar: show what there is (the top-level modules, then a count)
        tops = list(dict.fromkeys(n.split(".")[0] for n in names))
        shown = ", ".join(repr(t) for t in tops[:8]) + (", ..." if len(tops) > 8 else "")
        hint = f"No similar name; its top-level modules are {shown} ({len(names)} modules in all)."
    return LayerNotFoundError(f"No layer of {type(model).__name__} matches {item!r}. {hint} {_HINT}")


def _call_predicate(pred: Callable[..., bool], name: str, module: nn.Module, n_params: int) -> bool:
    return bool(pred(name, module) if n_params >= 2 else pred(name))


def resolve_layers(model: nn.Module, layers: LayerSpec) -> list[str]:
    """Turn a layer request into the list of module names (selectors) it picks.

    Parameters
    ----------
    model : torch.nn.Module
        The model whose ``named_modules()`` are searched. The root module (name ``""``) is never picked.
    layers : str, sequence of str, or callable
        An exact module name (``"layer3.1.conv2"``), a glob (``"layer*"``, ``"blocks.*.mlp.fc2"``,
        ``"encoder.layer.*"`` for direct children only, ``"encoder.**"`` for every descendant; see the
        module docstring), either followed by ``@K`` to pick the K-th call of a module called
        several times per forward, a list mixing these, or a predicate ``f(name)`` or
        ``f(name, module)`` returning True for the modules to keep.

    Returns
    -------
    list of str
        Selectors (module names, with ``@K`` kept where given), deduplicated. Each glob or predicate
        expands in model order; the items of a list keep their requested order.

    Raises
    ------
    LayerNotFoundError
        When an item (or the predicate) matches no module. The message names the closest module names
        and points to ``probekit layers MODEL``.
    DataError
        When ``layers`` is empty or of an unsupported type.

    Examples
    --------
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> resolve_layers(net, "*")
    ['0', '1', '2']
    >>> resolve_layers(net, ["2", "0"])
    ['2', '0']
    """
    return resolve_layers_matched(model, layers)[0]


def resolve_layers_matched(model: nn.Module, layers: LayerSpec) -> tuple[list[str], set[str]]:
    """:func:`resolve_layers`, and the selectors that only a glob or the predicate picked (not named).

    A module that a glob picked but that never runs in the forward pass is left out with a warning by
    :class:`~probekit.extractors.Capture`; a module named exactly must run.
    """
    named = [(n, m) for n, m in model.named_modules() if n != ""]
    names = [n for n, _ in named]
    name_set = set(names)
    if callable(layers) and not isinstance(layers, str):
        try:
            n_params = len(inspect.signature(layers).parameters)
        except (TypeError, ValueError):
            n_params = 1
        picked = [n for n, m in named if _call_predicate(layers, n, m, n_params)]
        if not picked:
            raise LayerNotFoundError(
                f"The layer predicate {getattr(layers, '__name__', repr(layers))} matches no module of "
                f"{type(model).__name__}. {_HINT}"
            )
        return picked, set(picked)
    if isinstance(layers, str):
        items: list[Any] = [layers]
    elif isinstance(layers, Sequence):
        items = list(layers)
    else:
        raise DataError(
            "The 'layers' parameter must be a module name, a glob, a list of these, or a callable. "
            f"Got {type(layers).__name__} instead."
        )
    if not items:
        raise DataError("The 'layers' parameter is empty; name at least one layer. " + _HINT)
    out: list[str] = []
    seen: set[str] = set()
    named_exactly: set[str] = set()
    for item in items:
        if not isinstance(item, str):
            raise DataError(
                f"The 'layers' list must hold strings (module names or globs). Got {item!r} instead."
            )
        item = item.strip()
        base, call = parse_selector(item)
        suffix = "" if call is None else f"@{call}"
        if base in name_set or base == OUTPUT_LAYER:
            matches = [base]
            named_exactly.add(base + suffix)
        elif _is_glob(base):
            matches = [n for n in names if glob_match(n, base)]
        else:
            matches = []
        if not matches:
            raise _not_found(model, item, names)
        for n in matches:
            sel = n + suffix
            if sel not in seen:
                seen.add(sel)
                out.append(sel)
    return out, {sel for sel in out if sel not in named_exactly}


@dataclass(frozen=True)
class LayerInfo:
    """One hookable module, as seen in one forward pass.

    Attributes
    ----------
    name : str
        The module's name in ``named_modules()``.
    module_type : str
        The module's class name (e.g. ``"Conv2d"``).
    output_shape : tuple of int or None
        Per-sample shape of the first tensor the module returned (batch axis dropped); None when the
        module returned no tensor or was not called.
    n_calls : int
        How many times the module ran in the forward pass (0: not used by ``forward``; >1: pick a call
        with ``name@K``).
    """

    name: str
    module_type: str
    output_shape: tuple[int, ...] | None
    n_calls: int


def first_tensor(output: Any, key: int | str | None = None) -> torch.Tensor | None:
    """The tensor a hook keeps from a module's output.

    Tuples and lists give their first tensor (searched depth-first), dicts their first tensor value;
    ``key`` picks an element (an int for sequences, a str for mappings) instead.
    """
    if isinstance(output, torch.Tensor):
        return output
    if key is not None:
        try:
            return first_tensor(output[key])
        except (KeyError, IndexError, TypeError):
            return None
    if isinstance(output, dict):
        values: Sequence[Any] = list(output.values())
    elif isinstance(output, (tuple, list)):
        values = output
    else:
        return None
    for v in values:
        t = first_tensor(v)
        if t is not None:
            return t
    return None


def forward_params(model: nn.Module) -> set[str]:
    """The named parameters of ``model.forward`` (empty when its signature cannot be read)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return set()
    return {n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def takes_token_ids(model: nn.Module) -> bool:
    """Whether ``model`` is a token model: its forward takes ``input_ids`` (transformers' text models)."""
    return "input_ids" in forward_params(model)


def token_example(seq_len: int, batch: int = 1) -> dict[str, torch.Tensor]:
    """A dummy token batch: ``input_ids`` (id 0, which every vocabulary has) and an all-ones
    ``attention_mask``, both of shape ``(batch, seq_len)``."""
    return {"input_ids": torch.zeros(batch, seq_len, dtype=torch.long),
            "attention_mask": torch.ones(batch, seq_len, dtype=torch.long)}


def _example_batch(model: nn.Module, example_input: Any) -> Any:
    if isinstance(example_input, (tuple, list)) and all(isinstance(s, int) for s in example_input):
        example_input = torch.zeros((1, *example_input))
    param = next(iter(model.parameters()), None)
    if param is None:
        return example_input

    def move(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        return t.to(device=param.device, dtype=param.dtype if t.is_floating_point() else t.dtype)

    if isinstance(example_input, dict):
        return {k: move(v) for k, v in example_input.items()}
    return move(example_input)


def list_layers(model: nn.Module, example_input: Any) -> list[LayerInfo]:
    """List every module of ``model`` with the shape of its output, from one dummy forward pass.

    The pass runs under ``torch.no_grad()`` in eval mode; every hook is removed and every module's
    train/eval flag restored afterwards, even when the forward pass raises.

    Parameters
    ----------
    model : torch.nn.Module
        The model to inspect.
    example_input : torch.Tensor, dict of str to torch.Tensor, or tuple of int
        A batch to run (with the batch axis first), a dict of keyword inputs (``model(**batch)``, e.g.
        :func:`token_example` for a transformers text model), or the per-sample input shape such as
        ``(3, 224, 224)``, for which a batch of one zero tensor is made.

    Returns
    -------
    list of LayerInfo
        One entry per named module (the root excluded), in ``named_modules()`` order.

    Examples
    --------
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    >>> [(i.name, i.module_type, i.output_shape) for i in list_layers(net, (4,))]
    [('0', 'Linear', (8,)), ('1', 'ReLU', (8,))]
    """
    named = [(n, m) for n, m in model.named_modules() if n != ""]
    shapes: dict[str, tuple[int, ...] | None] = {}
    calls: dict[str, int] = {n: 0 for n, _ in named}

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inp: Any, output: Any) -> None:
            calls[name] += 1
            if name not in shapes:
                t = first_tensor(output)
                shapes[name] = tuple(t.shape[1:]) if t is not None and t.ndim > 0 else None

        return hook

    modes = {m: m.training for m in model.modules()}
    handles = []
    try:
        for n, m in named:
            handles.append(m.register_forward_hook(make_hook(n)))
        model.eval()
        batch = _example_batch(model, example_input)
        with torch.no_grad():
            if isinstance(batch, dict):
                model(**batch)
            else:
                model(batch)
    finally:
        for h in handles:
            h.remove()
        for m, flag in modes.items():
            m.training = flag
    return [LayerInfo(n, type(m).__name__, shapes.get(n), calls[n]) for n, m in named]
