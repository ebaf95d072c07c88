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
