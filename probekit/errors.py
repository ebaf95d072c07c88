"""One error hierarchy for probekit.

Every error a user can cause derives from :class:`ProbekitError`; the CLI catches it, prints one line
to stderr and exits with code 2. Messages follow one formula: what is wrong, where, and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "DataError",
    "LayerNotFoundError",
    "ModelLoadError",
    "NotFittedError",
    "ProbekitError",
    "StoreExistsError",
    "StoreFormatError",
]


class ProbekitError(Exception):
    """Base class of every error probekit raises on bad input or state."""


class StoreFormatError(ProbekitError, ValueError):
    """A file is not a probekit store, is damaged, or was written by another format version."""


class StoreExistsError(ProbekitError, FileExistsError):
    """The output store exists and neither resume nor overwrite was asked for."""


class NotFittedError(ProbekitError, ValueError, AttributeError):
    """An estimator was used before ``fit``."""


class LayerNotFoundError(ProbekitError, KeyError):
    """A requested layer (or glob) matches no module, or a store lacks a layer."""

    def __str__(self) -> str:  # KeyError would repr() the message and add quotes
        return str(self.args[0]) if self.args else ""


class ModelLoadError(ProbekitError, ValueError):
    """A model spec or a weights file could not be turned into a model."""


class DataError(ProbekitError, ValueError):
    """A data spec, a dataset item or an array has the wrong form."""
