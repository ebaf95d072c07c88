"""One JSON-safe conversion for every result the package writes (analyses, audit, experiments)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from numbers import Integral, Real
from typing import Any

import numpy as np


def jsonable(v: Any) -> Any:
    """Turn numpy scalars/arrays, tuples, mappings and dataclasses into JSON-safe Python (NaN/inf -> None)."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: jsonable(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, Mapping):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return jsonable(v.tolist())
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (Integral, np.integer)):
        return int(v)
    if isinstance(v, (Real, np.floating)):
        f = float(v)
        return f if math.isfinite(f) else None
    return v
