"""The package's rooms import one another without a cycle (issue 21): foundation -> wings -> front door.

Every ``import`` of a probekit module anywhere in a module (function bodies included) is an edge between
rooms (``probekit.store``, ``probekit.datasets``, ``probekit.extractors``, ``probekit.analyses``, the
front-door modules, ...); the room graph must be acyclic.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DIRS = {"probekit": ROOT / "probekit", "probekit.extractors": ROOT / "extractors",
        "probekit.analyses": ROOT / "analyses"}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, d in DIRS.items():
        for f in d.rglob("*.py"):
            parts = list(f.relative_to(d).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([pkg, *parts])] = f
    return mods


def _room(m: str) -> str:
    return ".".join(m.split(".")[:2])


def _edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    rooms: dict[str, set[str]] = {}
    for m, f in mods.items():
        base = m if f.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(f.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    b = base.split(".")
                    t = ".".join(b[:len(b) - (node.level - 1)] + ([node.module] if node.module else []))
                else:
                    t = node.module or ""
                targets = [f"{t}.{a.name}" for a in node.names] + ([t] if node.module else [])
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                if t in mods and _room(t) != _room(m) and _room(t) != "probekit":
                    rooms.setdefault(_room(m), set()).add(_room(t))
    return rooms


def test_no_import_cycle_between_rooms():
    graph = _edges(_modules())
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(v: str) -> None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph.get(v, ())):
            assert state.get(w) != 1, f"import cycle: {' -> '.join([*path[path.index(w):], w])}"
            if w not in state:
                visit(w)
        path.pop()
        state[v] = 2

    for v in sorted(graph):
        if v not in state:
            visit(v)
    assert graph, "the walk found no imports at all: the test would pass vacuously"


def test_foundation_never_imports_the_wings_or_the_front_door():
    graph = _edges(_modules())
    # the foundation: the format, the shared words, errors, and the small helpers they write with
    base = {"probekit.store", "probekit.vocab", "probekit.errors", "probekit._version", "probekit._io",
            "probekit._json"}
    for low in base:
        above = graph.get(low, set()) - base
        assert not above, f"{low} imports {sorted(above)}"


# private modules of the core that every package may use: the foundation's own helpers
FOUNDATION_HELPERS = {"probekit._version", "probekit._io", "probekit._json"}
def _package(m: str, mods: dict[str, Path]) -> str:
    """The package a module belongs to: a subpackage of probekit (store, datasets, report, extractors,
    analyses, ...) or the core (the modules directly under probekit/)."""
    two = ".".join(m.split(".")[:2])
    return two if two in mods and mods[two].name == "__init__.py" else "probekit"


def _private_imports(mods: dict[str, Path]) -> set[str]:
    """``importer -> module.name`` for every import of a private module or name from another package."""
    found = set()
    for m, f in mods.items():
        base = m if f.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    b = base.split(".")
                    t = ".".join(b[:len(b) - (node.level - 1)] + ([node.module] if node.module else []))
                else:
                    t = node.module or ""
                pairs = [(f"{t}.{a.name}" if f"{t}.{a.name}" in mods else t, a.name) for a in node.names]
            elif isinstance(node, ast.Import):
                pairs = [(a.name, "") for a in node.names]
            else:
                continue
            for target, name in pairs:
                if target not in mods or _package(target, mods) == _package(m, mods) or target in FOUNDATION_HELPERS:
                    continue
                hidden = any(p.startswith("_") and p != "__init__" for p in target.split(".")[1:])
                if hidden or (name.startswith("_") and not target.endswith(f".{name}")):
                    found.add(f"{m} -> {target if target.endswith(f'.{name}') or not name else f'{target}.{name}'}")
    return found


def test_no_private_name_imported_across_packages():
    mods = _modules()
    found = _private_imports(mods)
    assert not found, f"private names imported across packages: {sorted(found)}"


def test_the_private_import_check_sees_one(tmp_path):
    """The check above finds a private import across packages when there is one (it cannot pass vacuously)."""
    fake = tmp_path / "fake.py"
    fake.write_text("from .store._format import ROLES\nfrom .store import _format\nfrom .store import ROLES as R\n")
    found = _private_imports({**_modules(), "probekit.fake": fake})
    assert {x for x in found if x.startswith("probekit.fake")} == {"probekit.fake -> probekit.store._format.ROLES",
                                                                   "probekit.fake -> probekit.store._format"}
