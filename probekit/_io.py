"""Writing the files a verb produces whole or not at all (the JSON result, the HTML report)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from .errors import NO_SPACE, NOT_ALLOWED, WriteError, os_error_reason, short_path


def write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` whole or not at all, and return ``path``.

    The text goes into a temporary file beside ``path`` that is then renamed over it, so a reader (or
    a rerun) never finds half a file, and a failure leaves the old file as it was and no temporary
    file behind. A symbolic link is followed (the file it names is replaced, not the link); a path
    that exists and is no regular file (``/dev/stdout``, a named pipe) is written directly.

    Raises
    ------
    WriteError
        The operating system refused the write (disk full, permission denied, no such folder, ...);
        the message names the file and what to do.
    """
    path = Path(path)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    try:
        if target.exists() and not target.is_file():
            with open(target, "w", encoding=encoding) as f:
                f.write(text)
            return path
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding=encoding) as f:
                f.write(text)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; an output file gets the usual mode
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as e:
        raise _write_error(path, e) from e
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_error(path: Path, e: OSError) -> WriteError:
    number, reason = os_error_reason(e)
    where = short_path(path)
    if number in NO_SPACE:
        hint = "Free disk space (or write it elsewhere), then rerun"
    elif number in NOT_ALLOWED:
        hint = "Write it to a folder you may write to, or fix the permissions"
    elif not path.parent.is_dir():
        hint = f"The folder {short_path(path.parent)!r} does not exist: create it or choose another path"
    else:
        hint = "Check the path and the disk, then rerun"
    return WriteError(f"Cannot write {where!r}: {reason}. {hint}.", errno=number, path=str(path))
