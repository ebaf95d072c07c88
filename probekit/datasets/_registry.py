"""Registry of built-in datasets, addressable by name from the CLI (``--data NAME``) and the API."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import DataError
from ..vocab import crossed_split_name


@dataclass(frozen=True)
class BuiltinDataset:
    """A registered dataset: ``factory(split, **kwargs)`` returns a torch ``Dataset``."""

    name: str
    factory: Callable[..., Any]
    splits: tuple[str, ...]
    description: str = ""
    default_splits: tuple[str, ...] = field(default=())


_REGISTRY: dict[str, BuiltinDataset] = {}


def register_dataset(
    name: str,
    factory: Callable[..., Any],
    *,
    splits: Sequence[str],
    description: str = "",
    default_splits: Sequence[str] | None = None,
) -> None:
    """Register a built-in dataset under ``name`` (splits it offers; the default ones to extract)."""
    _REGISTRY[name] = BuiltinDataset(
        name, factory, tuple(splits), description, tuple(default_splits or splits)
    )


def builtin_datasets() -> dict[str, BuiltinDataset]:
    """All registered datasets by name."""
    _load_builtins()
    return dict(_REGISTRY)


def get_dataset(name: str, split: str, **kwargs: Any) -> Any:
    """Instantiate one split of a built-in dataset."""
    _load_builtins()
    split = crossed_split_name(split, f"The built-in dataset {name!r}")
    if name not in _REGISTRY:
        raise DataError(
            f"There is no built-in dataset {name!r}; built-in datasets are {sorted(_REGISTRY)}."
        )
    entry = _REGISTRY[name]
    if split not in entry.splits:
        raise DataError(
            f"The built-in dataset {name!r} has no split {split!r}; its splits are {list(entry.splits)}."
        )
    return entry.factory(split, **kwargs)


def old_n_stress(n_stress: int | None, n_backgrounds: int, owner: str) -> int:
    """``n_backgrounds``, or ``n_stress`` (its old name, with a FutureWarning) when that is given."""
    if n_stress is None:
        return n_backgrounds
    warnings.warn(f"{owner}(n_stress=...) is now {owner}(n_backgrounds=...) (the split 'stress' is 'crossed'); "
                  "the old name goes in the next release.", FutureWarning, stacklevel=3)
    return n_stress


def _load_builtins() -> None:
    # The built-in generators register themselves on import; importing lazily keeps
    # `import probekit.datasets` light.
    try:
        from . import _builtin  # noqa: F401
    except ModuleNotFoundError as e:  # pragma: no cover - only while _builtin.py does not exist yet
        if e.name != f"{__package__}._builtin":
            raise
