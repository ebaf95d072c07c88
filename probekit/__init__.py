"""probekit: audit trained neural networks for feature contamination.

The small public API. Heavy modules (torch, the analyses) load on first use, so ``import probekit``
and ``probekit --help`` stay fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from ._source_tree import install_source_tree_finder as _install_source_tree_finder
from ._version import __version__ as __version__
from .audit import Audit as Audit
from .audit import audit as audit  # imported eagerly: the function, not the submodule, must own the name
from .errors import ProbekitError as ProbekitError
from .store import Store as Store
from .store import StoreWriter as StoreWriter
from .store import open_store as open_store

_install_source_tree_finder()

_LAZY = {
    "audit_model": ("probekit.model_audit", "audit_model"),
    "extract": ("probekit.extraction", "extract"),
    "extract_pair": ("probekit.extraction", "extract_pair"),
    "list_layers": ("probekit.extractors", "list_layers"),
    "load_model": ("probekit.models", "load_model"),
    "preprocessing_for": ("probekit.models", "preprocessing_for"),
    "load_data": ("probekit.datasets", "load_data"),
    "Recorder": ("probekit.extractors", "Recorder"),
    "RecorderCallback": ("probekit.extractors", "RecorderCallback"),
}

__all__ = ["Audit", "ProbekitError", "Store", "StoreWriter", "__version__", "audit", "open_store", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'probekit' has no attribute {name!r}")
