"""Make ``probekit.extractors`` / ``probekit.analyses`` importable when ``probekit`` is imported from a
source checkout.

The distribution installs the root folders ``extractors/`` and ``analyses/`` as
``probekit.extractors`` and ``probekit.analyses`` (``package-dir`` in pyproject.toml). An installed copy has them
inside the package, and an editable install maps them with setuptools' finder. But ``python -m
probekit.cli`` (or ``torchrun -m probekit.cli``) started from the repository root puts the checkout
first on ``sys.path``, so Python imports the source ``probekit/`` — which has no ``extractors``
inside — and the subpackages went missing (CI found it). This finder, consulted only after every
other one, maps exactly those two names to the sibling folders; nothing else is exposed.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path
from typing import Any

_MAPPED = ("extractors", "analyses")


class _SourceTreeFinder(importlib.abc.MetaPathFinder):
    def __init__(self, root: Path) -> None:
        self.root = root

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        package, _, sub = fullname.partition(".")
        if package != "probekit" or sub not in _MAPPED:
            return None
        folder = self.root / sub
        return importlib.util.spec_from_file_location(
            fullname, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )


def install_source_tree_finder() -> None:
    here = Path(__file__).resolve().parent
    if all((here / sub).is_dir() for sub in _MAPPED):  # installed layout: nothing to do
        return
    root = here.parent
    if not all((root / sub / "__init__.py").is_file() for sub in _MAPPED):
        return
    if not any(isinstance(f, _SourceTreeFinder) for f in sys.meta_path):
        sys.meta_path.append(_SourceTreeFinder(root))
