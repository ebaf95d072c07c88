"""``--src DIR`` of the benchmarks: import probekit from another checkout, for before/after runs."""

from __future__ import annotations

import sys
from pathlib import Path


def use_checkout(src: str) -> None:
    """Put the checkout ``src`` first for ``import probekit``, ahead of the installed (editable) one.

    Call before importing probekit. The editable install's finder would map ``probekit`` back to this
    working tree, so it is removed; the checkout's own ``_source_tree`` finder then maps
    ``probekit.extractors`` / ``probekit.analyses`` to its folders.
    """
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in str(getattr(f, "__module__", "")).lower()]
    sys.path.insert(0, str(Path(src).resolve()))
