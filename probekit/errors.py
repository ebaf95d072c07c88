"""One error hierarchy for probekit.

Every error a user can cause derives from :class:`ProbekitError`; the CLI catches it, prints one line
to stderr and exits with code 2. Messages follow one formula: what is wrong, where, and how to fix it.
"""

from __future__ import annotations

import errno as _errno
import os
import re

__all__ = [
    "DataError",
    "LayerNotFoundError",
    "ModelLoadError",
    "NotFittedError",
    "ProbekitError",
    "StoreExistsError",
    "StoreFormatError",
    "WriteError",
    "os_error_reason",
    "short_path",
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


class WriteError(ProbekitError, OSError):
    """Writing a file failed in the operating system: the disk is full, a size limit or quota was hit,
    permission was denied, or the device reported an I/O error.

    ``errno`` holds the operating system's error number when it is known (28: no space left), else
    ``None``; ``path`` the file.
    """

    def __init__(self, message: str, *, errno: int | None = None, path: str | None = None) -> None:
        super().__init__(message)
        self.errno = errno
        self.filename = path
        self.path = path

    def __str__(self) -> str:  # OSError would format (errno, strerror); the message says it all
        return str(self.args[0]) if self.args else ""


#: how long a path may be in a message before its middle is cut (``short_path``)
PATH_LIMIT = 80

_ERRNO_RE = re.compile(r"errno = (\d+)")
_REASON_RE = re.compile(r"error message = '([^']*)'")


def short_path(path: str | os.PathLike, limit: int = PATH_LIMIT) -> str:
    """``path`` as text, its head cut to ``...`` when longer than ``limit`` characters (the tail names
    the file; a symbolic link loop can make a path of hundreds of characters)."""
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if len(text) <= limit:
        return text
    return "..." + text[-(limit - 3):]


def os_error_reason(e: BaseException) -> tuple[int | None, str]:
    """The operating system's error number and reason behind ``e``, else ``(None, first line)``.

    Reads ``OSError.errno`` / ``strerror``, and the ``errno = N, error message = '...'`` text that
    HDF5 puts in the ``OSError`` and ``RuntimeError`` h5py raises for a failed write or flush.
    """
    number = getattr(e, "errno", None)
    text = str(e)
    if not isinstance(number, int):
        found = _ERRNO_RE.search(text)
        number = int(found.group(1)) if found else None
    found = _REASON_RE.search(text)  # h5py's strerror is all of HDF5's text: its own reason is in it
    reason = found.group(1) if found else getattr(e, "strerror", None)
    if not reason and number is not None:
        reason = os.strerror(number)
    if not reason:
        reason = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return number, reason


#: errno values that mean "no room": the disk or a quota is full, or a file size limit was hit
NO_SPACE = frozenset(getattr(_errno, n) for n in ("ENOSPC", "EDQUOT", "EFBIG") if hasattr(_errno, n))
#: errno values that mean "not allowed"
NOT_ALLOWED = frozenset(getattr(_errno, n) for n in ("EACCES", "EPERM", "EROFS") if hasattr(_errno, n))
