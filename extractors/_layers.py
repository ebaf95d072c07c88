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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from probekit.errors import DataError, LayerNotFoundError
from probekit.vocab import OUTPUT_LAYER

__all__ = ["LayerInfo", "LayerSpec", "choose_layers", "class_token_head", "default_layers", "default_pool",
           "default_pools", "depth_sort", "execution_order", "forward_params", "glob_match", "list_layers",
           "parse_layer_pools", "parse_selector", "prefix_tokens", "resolve_layers", "resolve_pools",
           "takes_token_ids", "token_example"]

LayerSpec = str | Sequence[str] | Callable[..., bool]
"""What a user may pass as ``layers``: a name, a glob, ``name@K``, a list of these, or a predicate."""

_GLOB_CHARS = re.compile(r"[*?\[]")
_CALL_RE = re.compile(r"^(?P<name>.*)@(?P<call>\d+)$")
_HINT = "Run `probekit layers MODEL` to list them."


#: the reserved selector of the model's own output (its return value, e.g. the logits): hooked on the
#: root module and stored under this name, which no ``named_modules()`` name can take


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
    trace = _trace(model, example_input)
    return [LayerInfo(n, type(m).__name__, trace.shapes.get(n), trace.calls.get(n, 0)) for n, m in named]


# -- one traced forward pass: execution order and output shapes -------------------------------------------


@dataclass
class _Trace:
    order: list[str]  # modules (root excluded) in the order their forward began, first call
    shapes: dict[str, tuple[int, ...] | None]  # per-sample shape of the first output (first call)
    calls: dict[str, int]
    output_shape: tuple[int, ...] | None  # the model's own output (the @output layer)


def _trace(model: nn.Module, example_input: Any) -> _Trace:
    """Run ``model`` once on ``example_input`` (no_grad, eval) with hooks on every module; restore all."""
    named = [(n, m) for n, m in model.named_modules() if n != ""]
    order: list[str] = []
    shapes: dict[str, tuple[int, ...] | None] = {}
    calls: dict[str, int] = {n: 0 for n, _ in named}
    root: list[tuple[int, ...] | None] = []

    def shape_of(output: Any) -> tuple[int, ...] | None:
        t = first_tensor(output)
        return tuple(t.shape[1:]) if t is not None and t.ndim > 0 else None

    def make_hooks(name: str) -> tuple[Callable[..., None], Callable[..., None]]:
        def pre(_module: nn.Module, _inp: Any) -> None:
            if calls[name] == 0 and name not in shapes:
                order.append(name)
                shapes[name] = None  # set by the forward hook once the module returns

        def post(_module: nn.Module, _inp: Any, output: Any) -> None:
            calls[name] += 1
            if calls[name] == 1:
                shapes[name] = shape_of(output)

        return pre, post

    modes = {m: m.training for m in model.modules()}
    handles = []
    try:
        for n, m in named:
            pre, post = make_hooks(n)
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post))
        handles.append(model.register_forward_hook(lambda _m, _i, out: root.append(shape_of(out))))
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
    return _Trace(order, shapes, calls, root[0] if root else None)


def execution_order(module: nn.Module, example_input: Any = None) -> list[str]:
    """Module names in the order the forward pass runs them (depth order).

    Parameters
    ----------
    module : torch.nn.Module
        The model.
    example_input : torch.Tensor, dict of str to torch.Tensor, tuple of int, or None
        As for :func:`list_layers`. Given, one forward pass (no_grad, eval mode, every hook removed and
        train/eval flag restored afterwards) records when each module's forward *begins* (its first
        call): a container comes before its children (``layer1``, ``layer1.0``, ...) and a module that
        never runs (an ``nn.ModuleList``, an unused branch) is left out. None: registration order
        (``named_modules()``, root excluded), which is the execution order of ``nn.Sequential`` models,
        of blocks kept in an ``nn.ModuleList`` and of every model that creates its modules in the order
        it calls them; a model that creates them in another order needs the example input.

    Returns
    -------
    list of str
        Module names, root excluded.

    Examples
    --------
    >>> from torch import nn
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.head = nn.Linear(8, 2)  # created first, runs last
    ...         self.stem = nn.Linear(4, 8)
    ...     def forward(self, x):
    ...         return self.head(self.stem(x))
    >>> execution_order(Net()), execution_order(Net(), (4,))
    (['head', 'stem'], ['stem', 'head'])
    """
    if example_input is None:
        return [n for n, _ in module.named_modules() if n != ""]
    return _trace(module, example_input).order


# -- default layers: spread over the depth of any model family ---------------------------------------------

_DRY_RUN_ERRORS = (RuntimeError, ValueError, TypeError, IndexError)  # a model that cannot take the dummy input

_HEAD_NAMES = ("fc", "head", "heads", "classifier", "last_linear", "lm_head", "score")
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _param_kids(node: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    return [(prefix + n, c) for n, c in node.named_children() if _n_params(c) > 0]


def _expansion(name: str, m: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """What a unit expands into: the blocks of a container, or the children of a module whose
    parameters sit mostly in one container (a transformers encoder and its ``layer`` list); None: a unit
    that stays whole (a residual block, a leaf)."""
    kids = _param_kids(m, f"{name}.")
    if len(kids) < 2 and not (kids and isinstance(m, (nn.ModuleList, nn.ModuleDict))):
        if len(kids) == 1 and isinstance(kids[0][1], _CONTAINERS):  # a wrapper of one container
            return kids
        return None
    if isinstance(m, _CONTAINERS):
        return kids
    total = _n_params(m)
    if any(isinstance(c, _CONTAINERS) and len(_param_kids(c, "")) >= 2 and 2 * _n_params(c) >= total
           for _, c in kids):
        return kids
    return None


def _structural_units(module: nn.Module, rank: Callable[[str], float], want: int) -> list[str]:
    """Depth units of a model without feature_info: its trunk's blocks, the head left out."""
    prefix, node = "", module
    headless = False
    while True:
        kids = sorted(_param_kids(node, prefix), key=lambda kv: rank(kv[0]))
        if not headless and len(kids) > 1 and (isinstance(kids[-1][1], nn.Linear)
                                               or kids[-1][0].rsplit(".", 1)[-1] in _HEAD_NAMES):
            kids, headless = kids[:-1], True  # the final head (one): its output is the @output layer
        if len(kids) == 1 and any(True for _ in kids[0][1].children()):
            prefix, node = f"{kids[0][0]}.", kids[0][1]  # a wrapper, or the trunk beside the head
            continue
        break
    units: list[tuple[str, nn.Module]] = list(kids)
    blocks: set[str] = set()  # members of an expanded container

    def expand(i: int, into: list[tuple[str, nn.Module]]) -> None:
        if isinstance(units[i][1], _CONTAINERS):
            blocks.update(n for n, _ in into)
        units[i:i + 1] = into

    while True:  # a ModuleList or ModuleDict never runs itself: always replaced by its blocks
        i = next((i for i, (_, m) in enumerate(units) if isinstance(m, (nn.ModuleList, nn.ModuleDict))), None)
        if i is None:
            break
        expand(i, _param_kids(units[i][1], f"{units[i][0]}."))
    while len(units) < want:  # too few units to spread over: open the largest container
        options = [(i, e) for i, (n, m) in enumerate(units) if (e := _expansion(n, m))]
        if not options:
            break
        i, into = max(options, key=lambda ie: _n_params(units[ie[0]][1]))
        expand(i, into)
        while True:
            j = next((j for j, (_, m) in enumerate(units) if isinstance(m, (nn.ModuleList, nn.ModuleDict))), None)
            if j is None:
                break
            expand(j, _param_kids(units[j][1], f"{units[j][0]}."))
    units.sort(key=lambda kv: rank(kv[0]))
    total = sum(_n_params(m) for _, m in units)
    in_blocks = [(n, m) for n, m in units if n in blocks]
    if len(in_blocks) >= 2 and 2 * sum(_n_params(m) for _, m in in_blocks) >= total:
        return [n for n, _ in in_blocks]  # the blocks hold the model: stem and final norm left out
    composite = [(n, m) for n, m in units if any(True for _ in m.children())]
    if len(composite) >= 2:
        return [n for n, _ in composite]  # stages / blocks rather than a loose stem conv or norm
    return [n for n, _ in units]


def default_layers(module: nn.Module, max_layers: int = 4, example_input: Any = None) -> list[str]:
    """Up to ``max_layers`` layers spread over a model's depth, in depth order, the last block included.

    Parameters
    ----------
    module : torch.nn.Module
        Any model: timm, torchvision, transformers, or your own.
    max_layers : int, default 4
        How many layers at most; picks are spread evenly over the candidates (first and last included).
    example_input : torch.Tensor, dict of str to torch.Tensor, tuple of int, or None
        As for :func:`list_layers`. Given, one forward pass orders the candidates by execution and drops
        any module that does not run; None, or an input the model raises on: registration order (see
        :func:`execution_order`).

    Returns
    -------
    list of str
        Module names (never the model's head: its output is the reserved layer ``@output``).

    Notes
    -----
    Candidates: a timm model's ``feature_info`` modules (the stages its ``features_only`` mode
    returns). Other models: the trunk (descending through wrappers and past a final head: a ``Linear``
    or a child named fc / head / heads / classifier / last_linear / lm_head / score), its parameterised
    children; an ``nn.ModuleList`` / ``nn.ModuleDict`` (which never runs itself) is replaced by its
    blocks, and while there are fewer candidates than ``max_layers`` the largest ``nn.Sequential`` (or a
    module whose parameters sit mostly in one, such as a transformers encoder and its ``layer`` list)
    is opened into its blocks. When blocks of opened containers hold at least half the parameters, only
    they are candidates (a transformer's blocks, not its embedding or final norm); otherwise, when two
    or more candidates have children of their own (ResNet stages), only those. With more candidates
    than ``max_layers``, those with submodules are kept when there are enough of them (a timm ResNet
    gives ``layer1`` ... ``layer4``, not its stem activation ``act1``).

    Raises
    ------
    DataError
        When the model has no parameterised submodule that runs (name the layers yourself).

    Examples
    --------
    >>> from torch import nn
    >>> class Tiny(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.embed = nn.Linear(4, 8)
    ...         self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(6))
    ...         self.head = nn.Linear(8, 2)
    ...     def forward(self, x):
    ...         x = self.embed(x)
    ...         for b in self.blocks:
    ...             x = b(x)
    ...         return self.head(x)
    >>> default_layers(Tiny())
    ['blocks.0', 'blocks.2', 'blocks.3', 'blocks.5']
    """
    if not isinstance(max_layers, int) or isinstance(max_layers, bool) or max_layers < 1:
        raise DataError(f"max_layers must be an int >= 1; got {max_layers!r}.")
    order = None
    if example_input is not None:
        try:
            order = execution_order(module, example_input)
        except _DRY_RUN_ERRORS:  # the extraction reports a model that cannot take its input; here,
            order = None  # the choice falls back to registration order
    position = {n: i for i, n in enumerate(order if order is not None else execution_order(module))}

    def rank(name: str) -> float:
        return position.get(name, float("inf"))

    names = {n for n, _ in module.named_modules()}
    info = getattr(module, "feature_info", None)
    picked: list[str] = []
    if isinstance(info, Sequence) and info and all(isinstance(d, Mapping) and "module" in d for d in info):
        picked = list(dict.fromkeys(str(d["module"]) for d in info if str(d["module"]) in names))
    if not picked:
        picked = _structural_units(module, rank, max_layers)
    if order is not None:
        picked = sorted((p for p in picked if p in position), key=rank)  # modules that run, in depth order
    if not picked:
        raise DataError(f"Could not choose layers of {type(module).__name__} on its own; name them with "
                        "--layers (see `probekit layers MODEL`).")
    if len(picked) > max_layers:  # stages / blocks before a loose stem activation, when they suffice
        modules = dict(module.named_modules())
        composite = [p for p in picked if any(True for _ in modules[p].children())]
        picked = composite if len(composite) >= max_layers else picked
    if len(picked) > max_layers:
        step = (len(picked) - 1) / (max_layers - 1) if max_layers > 1 else 0.0
        idx = sorted({int(i * step + 0.5) for i in range(max_layers)}) if max_layers > 1 else [len(picked) - 1]
        picked = [picked[i] for i in idx]
    return picked


# -- default pooling: tokens as tokens, maps averaged -------------------------------------------------------

_PREFIX_PARAMS = ("cls_token", "class_token", "dist_token", "distillation_token", "reg_token", "register_tokens")


def prefix_tokens(module: nn.Module) -> int:
    """How many prefix tokens (class, distillation, register tokens) a token model puts before its
    patches: timm's ``num_prefix_tokens``, else the number of such parameters (``cls_token``,
    ``class_token``, ``dist_token``, ``distillation_token``: one token each; ``reg_token`` /
    ``register_tokens``: their length)."""
    own = getattr(module, "num_prefix_tokens", None)
    if isinstance(own, int) and not isinstance(own, bool):
        return own
    n = 0
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in _PREFIX_PARAMS:
            n += int(p.shape[-2]) if leaf in ("reg_token", "register_tokens") and p.ndim >= 2 else 1
    return n


def class_token_head(module: nn.Module) -> bool:
    """Whether the model is ViT-style with a class token that its head reads.

    timm: a ``cls_token`` and ``global_pool == "token"``; a timm model that pools its tokens
    otherwise (``"avg"``, ``"map"``) does not read it. Others (transformers' ViT / DeiT, torchvision's
    ViT, your own): a parameter named ``cls_token`` or ``class_token``, unless the model's config sets
    ``use_mean_pooling`` (transformers' BEiT / Data2Vec).
    """
    pool = getattr(module, "global_pool", None)
    if isinstance(pool, str):  # timm
        return pool == "token" and getattr(module, "cls_token", None) is not None
    cfg = getattr(module, "config", None)
    if getattr(cfg, "use_mean_pooling", False) is True:
        return False
    return any(n.rsplit(".", 1)[-1] in ("cls_token", "class_token") for n, _ in module.named_parameters())


def default_pool(module: nn.Module, layer: str, output_shape: Sequence[int] | None,
                 module_type: str | None = None) -> str:
    """The pooling mode a layer gets by default, from its per-sample output shape.

    Parameters
    ----------
    module : torch.nn.Module
        The model the layer belongs to.
    layer : str
        The layer's selector (a module name, ``name@K`` or ``@output``); used for its module's type.
    output_shape : sequence of int or None
        The layer's per-sample output shape (batch axis dropped), e.g. from :func:`list_layers`.
    module_type : str, optional
        The layer module's class name (read from ``module`` when not given).

    Returns
    -------
    str
        ``"cls"`` for a token output ``(T, D)`` of a model whose head reads its class token
        (:func:`class_token_head`: timm ViTs with ``global_pool="token"``, transformers' ViT);
        ``"tokens_mean"`` for a token output of a model with prefix tokens its head does not read (the
        mean over the patch tokens); ``"avg"`` for any other output: the mean over every token of a
        model without prefix tokens (what ``tokens_mean`` with no prefix gives; the real tokens only
        when there is an attention mask), the spatial mean of a map ``(C, H, W)``, the mean over L of a
        Conv1d-style ``(C, L)`` output, and a vector ``(D,)`` kept as it is.
    """
    from ._hooks import _CHANNELS_FIRST_1D

    if output_shape is None or len(output_shape) != 2:
        return "avg"
    if module_type is None:
        base, _ = parse_selector(layer)
        mod = module if base == OUTPUT_LAYER else dict(module.named_modules()).get(base)
        module_type = type(mod).__name__ if mod is not None else ""
    if module_type in {c.__name__ for c in _CHANNELS_FIRST_1D}:
        return "avg"
    if class_token_head(module):
        return "cls"
    return "tokens_mean" if prefix_tokens(module) > 0 else "avg"


def default_pools(module: nn.Module, layers: Sequence[str], example_input: Any) -> dict[str, str]:
    """:func:`default_pool` of each layer (selectors as :func:`resolve_layers` gives them), from one
    forward pass on ``example_input`` (as for :func:`list_layers`)."""
    return resolve_pools(module, layers, None, example_input)


def parse_layer_pools(text: str | None) -> dict[str, str]:
    """Read a per-layer pool: ``"MODE"``, ``"LAYER=MODE,..."`` or both (``"cls,@output=avg"``).

    A bare MODE applies to every layer not named (stored under the key ``"*"``, kept last); ``LAYER``
    may be a module name, ``name@K``, ``@output`` or a glob (``"blocks.*=cls"``). Whitespace around
    items is ignored.

    Returns
    -------
    dict of str to str
        Layer (or glob) -> mode, named layers first, then ``"*"`` when a bare mode was given; empty for
        None or an empty text.

    Raises
    ------
    DataError
        On an unknown mode, two bare modes, an empty layer name, or a layer named twice.

    Examples
    --------
    >>> parse_layer_pools("tokens_mean, blocks.11=cls, @output=avg")
    {'blocks.11': 'cls', '@output': 'avg', '*': 'tokens_mean'}
    """
    from ._pooling import POOLS

    out: dict[str, str] = {}
    default: str | None = None
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        layer, sep, mode = (s.strip() for s in item.rpartition("=")) if "=" in item else ("", "", item)
        if mode not in POOLS:
            raise DataError(f"--pool {text!r}: {mode!r} is not a pool; use one of {', '.join(POOLS)} "
                            "(for one layer: LAYER=MODE, e.g. --pool blocks.11=cls,@output=avg).")
        if not sep:
            if default is not None:
                raise DataError(f"--pool {text!r} gives two modes for every layer ({default!r}, {mode!r}); "
                                "give one, and LAYER=MODE for the others.")
            default = mode
            continue
        if not layer:
            raise DataError(f"--pool {text!r}: {item!r} names no layer; write LAYER=MODE.")
        if layer in out:
            raise DataError(f"--pool {text!r} names layer {layer!r} twice; keep one.")
        out[layer] = mode
    if default is not None:
        out["*"] = default
    return out


def resolve_pools(module: nn.Module, layers: Sequence[str], pool: str | Mapping[str, str] | None,
                  example_input: Any) -> dict[str, str]:
    """The pooling mode of each layer: what the user named, else a default that fits the layer.

    Parameters
    ----------
    module : torch.nn.Module
        The model.
    layers : sequence of str
        Module names, globs, ``name@K`` or ``@output``, resolved with :func:`resolve_layers` (a glob gives
        each module it matches its own entry).
    pool : str, dict of str to str, or None
        A mode, the text of :func:`parse_layer_pools` (``"cls,@output=avg"``), or a dict layer (or
        glob) -> mode with ``"*"`` for every other layer. None: :func:`default_pool` for every layer.
    example_input : torch.Tensor, dict of str to torch.Tensor, or tuple of int
        A batch for one forward pass (as for :func:`list_layers`), which gives each layer's output
        shape.

    Returns
    -------
    dict of str to str
        Selector -> mode, for ``pool=`` of :func:`probekit.extract` (every layer named).

    Notes
    -----
    A mode named for a layer (or a glob matching it) is used as given. A mode for every layer (a bare
    mode, or ``"*"``) is used where it fits the layer's output; the model's own output ``@output``,
    where it does not (``cls`` on the logits ``(K,)`` of a classifier), gets its default instead, so
    ``--pool cls --layers blocks.11,@output`` pools the block's class token and keeps the logits. Any
    other layer it does not fit is an error naming the layer and the pools that fit.

    Raises
    ------
    DataError
        When a mode for every layer does not fit a layer other than ``@output``, or the model raises on
        ``example_input``.
    LayerNotFoundError
        When a layer matches no module.
    """
    from ._pooling import POOLS, pools_for_rank

    if isinstance(pool, str):
        spec = parse_layer_pools(pool) if ("=" in pool or "," in pool or pool not in POOLS) else {"*": pool}
    else:
        spec = dict(pool or {})
    try:
        trace = _trace(module, example_input)
    except _DRY_RUN_ERRORS as e:
        raise DataError(
            f"Could not run {type(module).__name__} on a dummy input to choose each layer's pool "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); check the input size, or "
            "name a pool for every layer (--pool LAYER=MODE,...)."
        ) from e
    modules = dict(module.named_modules())
    out: dict[str, str] = {}
    for sel in resolve_layers(module, list(layers)):
        base, _ = parse_selector(sel)
        shape = trace.output_shape if base == OUTPUT_LAYER else trace.shapes.get(base)
        mod = module if base == OUTPUT_LAYER else modules.get(base)
        mtype = type(mod).__name__ if mod is not None else ""
        named = next((spec[k] for k in (sel, base) if k in spec), None)
        if named is None:
            named = next((m for k, m in spec.items() if k != "*" and glob_match(base, k)), None)
        if named is not None:
            out[sel] = named
            continue
        own = default_pool(module, sel, shape, mtype)
        every = spec.get("*")
        if every is None:
            out[sel] = own
            continue
        from ._hooks import _CHANNELS_FIRST_1D

        fits = pools_for_rank(len(shape) + 1, isinstance(mod, _CHANNELS_FIRST_1D)) if shape is not None else list(POOLS)
        if every in fits:
            out[sel] = every
        elif base == OUTPUT_LAYER:
            out[sel] = own
        else:
            dims = "x".join(map(str, shape)) if shape is not None else "?"
            raise DataError(
                f"Pool {every!r} does not fit layer {sel!r} (output {dims} per sample); pools that fit: "
                f"{', '.join(fits)}. Give it its own: --pool {every},{sel}={fits[0]}."
            )
    return out


# -- the layers of one model of several (a teacher of another architecture) ------------------------------


def choose_layers(module: nn.Module, layers: str | Sequence[str] | None = None, *,
                  like: Sequence[str] | None = None, example_input: Any = None, max_layers: int = 4,
                  flag: str = "--layers") -> list[str]:
    """The layers to extract from one model, chosen for that model on its own.

    Parameters
    ----------
    module : torch.nn.Module
        The model (e.g. the teacher).
    layers : str or sequence of str, optional
        What the user named for this model (``--teacher-layers``): ``"a,b"`` text or a list of names,
        globs or ``name@K``, resolved on ``module``; ``@output`` is left out (the caller adds it).
    like : sequence of str, optional
        Another model's layers (the student's ``--layers``): used when ``layers`` is None and every one
        of them names a module of ``module`` (the same architecture, so the two compare layer by layer).
    example_input : optional
        As for :func:`default_layers` (depth order by execution, modules that do not run left out).
    max_layers : int, default 4
        For :func:`default_layers`.
    flag : str, default "--layers"
        The option named in errors (``"--teacher-layers"``).

    Returns
    -------
    list of str
        Selectors of ``module``, without ``@output``: ``layers`` resolved; else ``like`` when it fits;
        else :func:`default_layers` of ``module`` (never another model's names that it lacks).

    Raises
    ------
    LayerNotFoundError
        When ``layers`` names no module of ``module``; the message names ``flag`` and the closest names.
    """
    if isinstance(layers, str):
        layers = [s.strip() for s in layers.split(",") if s.strip()]
    if layers:
        wanted = [la for la in layers if la != OUTPUT_LAYER]
        if not wanted:
            return []
        try:
            return resolve_layers(module, wanted)
        except LayerNotFoundError as e:
            raise LayerNotFoundError(f"{flag}: {e}") from e
    names = {n for n, _ in module.named_modules() if n}
    if like:
        mine = [la for la in like if la != OUTPUT_LAYER]
        if mine and all(parse_selector(la)[0] in names for la in mine):
            return mine
    return default_layers(module, max_layers=max_layers, example_input=example_input)


def _natural_key(name: str) -> tuple[Any, ...]:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name) if p)


def depth_sort(layers: Sequence[str], order: Sequence[str] | None = None) -> list[str]:
    """Layer selectors in depth order: by ``order`` (from :func:`execution_order`, e.g. recorded at
    extraction), ``@output`` last; layers ``order`` lacks (or all, without it) follow in natural order,
    where numbers compare as numbers (``blocks.4`` before ``blocks.11``; names alone cannot put ``stem``
    before ``stage1``: that needs ``order``). ``name@K`` calls of one module keep K's order.

    Examples
    --------
    >>> depth_sort(["@output", "blocks.11", "blocks.4", "blocks.4@1", "blocks.4@0"])
    ['blocks.4', 'blocks.4@0', 'blocks.4@1', 'blocks.11', '@output']
    >>> depth_sort(["stage1", "stem", "head"], order=["stem", "stage1", "head"])
    ['stem', 'stage1', 'head']
    """
    pos = {n: i for i, n in enumerate(order or ())}

    def key(sel: str) -> tuple[Any, ...]:
        base, call = parse_selector(sel)
        if base == OUTPUT_LAYER:
            return (2, 0, (), -1 if call is None else call)
        if base in pos:
            return (0, pos[base], (), -1 if call is None else call)
        return (1, 0, _natural_key(base), -1 if call is None else call)

    return sorted(dict.fromkeys(layers), key=key)
