"""Reproducible experiments of the two papers.

Each experiment is a module with ``run(seeds=..., out_dir=..., quick=False) -> dict`` that trains
its models, writes a store (first-layer weights over steps, and for distillation representations),
a JSON of its figures with the seeds, and PNG plots. ``EXPERIMENTS`` maps names to the ``run``
functions (``probekit experiment NAME``); modules load on first use, so importing this package is
cheap. The digit networks and their training (``DigitCNN``, ``train_teacher``, ``train_student``) and
``torch_threads`` are public for the demo and for runs of one's own; they load on first use too.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any

from ..errors import ProbekitError

__all__ = ["EXPERIMENTS", "DigitCNN", "get_experiment", "torch_threads", "train_student", "train_teacher"]

_LAZY = {
    "DigitCNN": "probekit.experiments._digitnets",
    "train_student": "probekit.experiments._digitnets",
    "train_teacher": "probekit.experiments._digitnets",
    "torch_threads": "probekit.experiments._common",
}

_MODULES = {
    "contamination": "probekit.experiments.contamination",
    "simplicity": "probekit.experiments.simplicity",
    "distillation": "probekit.experiments.distillation",
    "shortcut": "probekit.experiments.shortcut",
}


class _LazyRegistry(dict):
    """name -> run function, importing the module on first access."""

    def __getitem__(self, name: str) -> Callable[..., dict[str, Any]]:
        if name not in _MODULES:
            raise ProbekitError(
                f"There is no experiment {name!r}; the experiments are {sorted(_MODULES)}."
            )
        return import_module(_MODULES[name]).run

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in _MODULES else default

    def values(self):  # type: ignore[override]
        return [self[n] for n in _MODULES]

    def items(self):  # type: ignore[override]
        return [(n, self[n]) for n in _MODULES]


EXPERIMENTS: dict[str, Callable[..., dict[str, Any]]] = _LazyRegistry.fromkeys(_MODULES)


def get_experiment(name: str) -> Callable[..., dict[str, Any]]:
    """The ``run`` function of experiment ``name``."""
    return EXPERIMENTS[name]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'probekit.experiments' has no attribute {name!r}")
