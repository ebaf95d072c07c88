"""What an audit was computed from: a fingerprint of every input that shapes the stored rows.

``probekit audit`` resumes an interrupted run by continuing the rows already in ``OUT/acts.h5``. That is
only right when the rerun's inputs are the stored run's: the same image and mask contents, foreground
mode and its parameters, seed, splits, backgrounds and their filling, model, weights and preprocessing.
:func:`fingerprint` hashes each of them into one entry of a dict (contents by the SHA-256 of their bytes,
read in blocks, never decoded); the store keeps it as the root attribute ``inputs_fingerprint`` (JSON),
and :func:`check_store` refuses, in one line naming the entries that differ, to continue a store written
from other inputs. ``--overwrite`` recomputes everything.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .errors import DataError
from .store import FINGERPRINT_ATTR, SETTINGS_ATTR, stored_fingerprint

__all__ = ["FINGERPRINT_ATTR", "SETTINGS_ATTR", "check_store", "file_sha256", "files_sha256", "fingerprint"]

_BLOCK = 1 << 20

# what each fingerprint entry means, for the one-line refusal
_WHAT = {
    "images": "the images (their files or contents)",
    "classes": "the class folders",
    "foreground": "the foreground (masks, boxes, --foreground auto or their contents)",
    "factors": "the --factors file",
    "fill": "how backgrounds are filled (OpenCV inpainting or mean colour)",
    "splits": "the splits (--seed, --test-fraction, --backgrounds, --objects)",
    "model": "the model (spec, arguments or weights)",
    "teacher": "the teacher (spec, arguments or weights)",
    "preprocessing": "the preprocessing (--image-size, --mean, --std)",
    "layers": "the layers (--layers)",
    "inits": "the seeded initialisations (--inits)",
    "init_objects": "the objects the seeded initialisations see (--init-objects)",
    "pools": "the layers' pooling (--pool)",
    "teacher_layers": "the teacher's layers (--teacher-layers)",
    "counterfactuals": "the composites (fill, soft edges, --deploy-backgrounds scenes)",
}


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def files_sha256(root: str | os.PathLike, rel_paths: Iterable[str]) -> str:
    """One SHA-256 over files named relative to ``root``: each file's path and the hash of its bytes,
    in the order given (a renamed, added, removed or edited file changes it)."""
    h = hashlib.sha256()
    root = Path(root)
    for rel in rel_paths:
        h.update(rel.encode())
        h.update(b"\0")
        h.update(file_sha256(root / rel).encode())
        h.update(b"\n")
    return h.hexdigest()


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint(entries: Mapping[str, Any]) -> dict[str, str]:
    """Each entry as a short stable string: hashes kept as they are, anything else hashed as JSON."""
    out: dict[str, str] = {}
    for key, value in entries.items():
        out[key] = value if isinstance(value, str) and len(value) == 64 else _digest(value)
    return out


def check_store(store: str | os.PathLike, fp: Mapping[str, str]) -> bool:
    """Whether ``store`` may be continued with inputs of fingerprint ``fp`` (read-only).

    Returns False when the store does not exist or holds nothing yet (it is then written anew), True
    when its fingerprint equals ``fp``. Raises :class:`DataError`, in one line naming what differs,
    for a store written from other inputs, or one holding models but no fingerprint (written by an
    older probekit or another command).
    """
    store = Path(store)
    if not store.exists():
        return False
    stored, has_models = stored_fingerprint(store)
    if stored is None:
        if not has_models:
            return False
        raise DataError(f"The store {str(store)!r} holds activations but no record of the inputs they came from "
                        "(written by an older probekit or another command); rerun with --overwrite to "
                        "recompute it, or give another --out-dir.")
    differ = [k for k in sorted(set(stored) | set(fp)) if stored.get(k) != fp.get(k)]
    if differ:
        what = "; ".join(_WHAT.get(k, k) for k in differ)
        raise DataError(f"The store {str(store)!r} was computed from other inputs than this run's ({what} "
                        "differ); rerun with --overwrite to recompute it, or give another --out-dir.")
    return True
