"""``probekit.vocab``: the words every layer of probekit shares, defined once.

A foundation module (no torch, no analyses): the store, the datasets, the extractors, the analyses
and the front door import these names from here.

- the store's sample fields and the image variants of Xiao et al. 2020 (the ``variant`` codes);
- the reserved layer name of a model's own output and the naming of seeded initialisations;
- the name of the crossed counterfactual split probekit writes (:data:`CROSSED_SPLIT`), and how its
  old name is still read (:func:`crossed_split_name`);
- :class:`Estimate`, the ``{"value", "ci"}`` pair every figure of the audit document is;
- :class:`Padding`, how keyword-input items of different lengths are batched (datasets and extractors);
- :func:`import_callable`, how a ``package.module:callable`` the user names is imported (models, data);
- :func:`jsonable`, the one conversion of results to JSON-safe Python (analyses, audit, experiments);
- the materiality margins of the verdict's findings (:mod:`probekit.verdict` owns the rules that read
  them; the analyses take them as their defaults, so both read one definition).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ._json import jsonable as jsonable
from .errors import DataError

__all__ = [
    "ALPHA",
    "CROSSED_SPLIT",
    "INIT_RE",
    "OLD_CROSSED_SPLIT",
    "OUTPUT_LAYER",
    "PULL_MARGIN",
    "PULL_MAX_IMBALANCE",
    "RATIO_MARGIN",
    "RELIANCE_EFFECT_MARGIN",
    "RELIANCE_MARGIN",
    "SAMPLE_FIELDS",
    "VARIANTS",
    "Estimate",
    "Padding",
    "crossed_split_name",
    "import_callable",
    "init_name",
    "jsonable",
    "pct",
    "points",
]

#: the optional per-sample fields of a store split besides ``index`` (docs/FORMAT.md)
SAMPLE_FIELDS = ("index", "label", "factors", "group", "background", "background_label", "variant")
#: ``variant`` codes index this tuple (the image variants of Xiao et al. 2020, "Noise or Signal: The
#: Role of Image Backgrounds in Object Recognition"), and ``composite_self`` (appended, so older codes keep
#: their meaning): an object pasted back on its own image with the background filled, the compositing
#: control of :func:`probekit.analyses.composite_gap`
VARIANTS = ("original", "only_fg", "no_fg", "only_bg", "mixed_same", "mixed_rand", "mixed_next", "composite_self")
#: the reserved layer name under which a model's own output is stored (hooked on the root module)
OUTPUT_LAYER = "@output"
#: seeded initialisations of model ``<base>`` are stored as models ``<base>@init<k>``
INIT_RE = re.compile(r"^(?P<base>.+)@init(?P<k>\d+)$")
#: the crossed counterfactual split (every object ``group`` on the same set of ``background`` ids) as
#: probekit's datasets, ``probekit audit`` and ``probekit analyze`` name it
CROSSED_SPLIT = "crossed"
#: its name in earlier releases (stores, ``audit.json``, the datasets' split names): still read, with a
#: FutureWarning, for one release
OLD_CROSSED_SPLIT = "stress"
#: every interval of the verdict is two-sided at level 1 - ALPHA; a finding holds when the low end of the
#: interval drawn is above its margin, i.e. its one-sided test of "at or below the margin" rejects at
#: ALPHA / 2 (so the whisker in the report and the threshold tick can never disagree)
ALPHA = 0.05
#: materiality of the shortcut finding: the share of predictions that take the background's class
#: beyond chance (1 = a complete shortcut)
RELIANCE_MARGIN = 0.03
#: materiality of the background-sensitive finding: accuracy that moves with the background without a
#: preferred class, as a fraction (0.05 = 5 points)
RELIANCE_EFFECT_MARGIN = 0.05
#: materiality of the background pull, which stands in for reliance where backgrounds carry no class
#: (synthetic backgrounds): the share of predictions backgrounds move towards the same classes
PULL_MARGIN = 0.05
#: the pull stands in only while no class holds more than this multiple of its balanced share of the
#: objects: with imbalanced classes, noise that moves predictions off the majority class reads as a pull
PULL_MAX_IMBALANCE = 1.5
#: materiality of the representation finding: a layer's background component over its reference's
RATIO_MARGIN = 1.25


def crossed_split_name(name: str, where: str) -> str:
    """``name`` with the crossed split's old name (:data:`OLD_CROSSED_SPLIT`) read as the new one.

    ``"stress"`` becomes :data:`CROSSED_SPLIT` with one FutureWarning naming ``where`` it was given (the
    old name goes in the next release); any other name is returned as given.
    """
    if name != OLD_CROSSED_SPLIT:
        return name
    warnings.warn(f"{where}: the split {OLD_CROSSED_SPLIT!r} is now {CROSSED_SPLIT!r} (one name for the crossed "
                  f"split everywhere); the old name goes in the next release. Write {CROSSED_SPLIT!r}.",
                  FutureWarning, stacklevel=3)
    return CROSSED_SPLIT


def _with_ci(e: Any, spec: str, suffix: str) -> str:
    """``100 * value`` formatted by ``spec``, then ``suffix``, then the interval in the same format."""
    if not e or e.get("value") is None:
        return "–"
    ci = e.get("ci")
    text = f"{100 * float(e['value']):{spec}}{suffix}"
    if ci and ci[0] is not None and ci[1] is not None:
        text += f" [{100 * float(ci[0]):{spec}}, {100 * float(ci[1]):{spec}}]"
    return text


def pct(e: Any, digits: int = 0) -> str:
    """An estimate as a percentage with its interval, ``"12 % [8, 15]"``; "–" when absent."""
    return _with_ci(e, f".{digits}f", " %")


def points(e: Any, digits: int = 1, unit: str = "pts") -> str:
    """A difference of accuracies in points with its interval, ``"+12.0 pts [+8.1, +15.2]"``."""
    return _with_ci(e, f"+.{digits}f", f" {unit}")


def init_name(model: str, k: int) -> str:
    """The store name of seeded initialisation ``k`` of ``model``."""
    return f"{model}@init{int(k)}"


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A figure and its interval: ``{"value": float | None, "ci": [low, high] | None}`` in the document.

    Non-finite numbers become ``None`` ("could not be computed"); NaN never reaches the JSON.
    """

    value: float | None
    ci: tuple[float, float] | None = None

    @classmethod
    def of(cls, value: Any, ci: Sequence[Any] | None = None) -> Estimate:
        v = None if value is None or not math.isfinite(float(value)) else float(value)
        c = None
        if ci is not None and len(ci) == 2 and all(x is not None and math.isfinite(float(x)) for x in ci):
            c = (float(ci[0]), float(ci[1]))
        return cls(v, c)

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "ci": None if self.ci is None else [self.ci[0], self.ci[1]]}


@dataclass(frozen=True)
class Padding:
    """How keyword-input items of different lengths are batched.

    Attributes
    ----------
    pad_id : int or None
        The id ``input_ids`` are padded with; None: the model's ``config.pad_token_id``, else 0 (any id
        works: the attention mask hides the padding from the real tokens).
    side : {"right", "left"}
        Where the padding goes (default right, which keeps every real token's position).
    max_length : int or None
        Pad every batch to this length (needed by ``pool="none"``, which stores every position, when
        the items have several lengths); an item longer than it is refused (no truncation).
    """

    pad_id: int | None = None
    side: str = "right"
    max_length: int | None = None

    def __post_init__(self) -> None:
        if self.side not in ("right", "left"):
            raise DataError(f"The padding side must be 'right' or 'left'. Got {self.side!r} instead.")
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 1):
            raise DataError(f"max_length must be an int >= 1 or None. Got {self.max_length!r} instead.")
        if self.pad_id is not None and (not isinstance(self.pad_id, int) or self.pad_id < 0):
            raise DataError(f"pad_id must be an int >= 0 or None. Got {self.pad_id!r} instead.")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _import_module(module_name: str) -> Any:
    """``importlib.import_module``, with the current directory importable as with ``python -m``.

    The current directory joins ``sys.path`` (at its front, and for the rest of the process, as
    ``python -m`` puts it there) only when the module is not found without it.
    """
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        top = module_name.split(".")[0]
        cwd = os.getcwd()
        on_path = {os.path.abspath(p or os.curdir) for p in sys.path}
        if e.name not in (top, module_name) and not (e.name and module_name.startswith(e.name + ".")):
            raise  # the module was found; something it imports is missing
        if os.path.abspath(cwd) in on_path:
            raise
        sys.path.insert(0, cwd)
        importlib.invalidate_caches()
        return importlib.import_module(module_name)


def import_callable(spec: str, what: str = "callable") -> Callable[..., Any]:
    """Import ``package.module:attr`` (only what the user names; nothing else is executed).

    The current directory is importable (as with ``python -m``): ``mymodels:net`` finds a
    ``mymodels.py`` there without PYTHONPATH.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise DataError(f"{spec!r} is not of the form 'package.module:{what}'.")
    try:
        module = _import_module(module_name)
    except ImportError as e:
        raise DataError(
            f"Cannot import the module {module_name!r} of {spec!r} ({e}). Run from the folder that holds "
            f"{module_name.split('.')[0]}.py (or its package folder), or add that folder to PYTHONPATH."
        ) from e
    except Exception as e:  # the module itself raised while it was imported
        raise DataError(
            f"Importing the module {module_name!r} of {spec!r} raised {type(e).__name__}: "
            f"{_first_line(e)}. Fix the module (run `python -c \"import {module_name}\"` to see the traceback)."
        ) from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise DataError(f"The module {module_name!r} has no attribute {attr!r} (from {spec!r}).")
        obj = getattr(obj, part)
    if not callable(obj):
        raise DataError(f"{spec!r} names a {type(obj).__name__}, not a {what}.")
    return obj
