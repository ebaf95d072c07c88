"""``probekit.vocab``: the words every layer of probekit shares, defined once.

A foundation module (no torch, no analyses): the store, the datasets, the extractors, the analyses
and the front door import these names from here.

- the store's sample fields and the image variants of Xiao et al. 2020 (the ``variant`` codes);
- the reserved layer name of a model's own output and the naming of seeded initialisations;
- :class:`Estimate`, the ``{"value", "ci"}`` pair every figure of the audit document is;
- the materiality margins of the verdict's findings (:mod:`probekit.verdict` owns the rules that read
  them; the analyses take them as their defaults, so both read one definition).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

__all__ = [
    "ALPHA",
    "INIT_RE",
    "OUTPUT_LAYER",
    "PULL_MARGIN",
    "PULL_MAX_IMBALANCE",
    "RATIO_MARGIN",
    "RELIANCE_EFFECT_MARGIN",
    "RELIANCE_MARGIN",
    "SAMPLE_FIELDS",
    "VARIANTS",
    "Estimate",
    "init_name",
]

#: the optional per-sample fields of a store split besides ``index`` (docs/FORMAT.md)
SAMPLE_FIELDS = ("index", "label", "factors", "group", "background", "background_label", "variant")
#: ``variant`` codes index this tuple (the image variants of Xiao et al. 2020, "Noise or Signal: The
#: Role of Image Backgrounds in Object Recognition")
VARIANTS = ("original", "only_fg", "no_fg", "only_bg", "mixed_same", "mixed_rand", "mixed_next")
#: the reserved layer name under which a model's own output is stored (hooked on the root module)
OUTPUT_LAYER = "@output"
#: seeded initialisations of model ``<base>`` are stored as models ``<base>@init<k>``
INIT_RE = re.compile(r"^(?P<base>.+)@init(?P<k>\d+)$")

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
