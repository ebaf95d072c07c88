"""The report's building blocks: a formatted number, an estimate's cell, an empty section."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _est(e: Mapping[str, Any] | None, digits: int = 3) -> tuple[str, str]:
    if not e or e.get("value") is None:
        return "–", ""
    ci = e.get("ci")
    ci_text = f"[{_fmt(ci[0], digits)}, {_fmt(ci[1], digits)}]" if ci else ""
    return _fmt(float(e["value"]), digits), ci_text


def _cell(e: Mapping[str, Any] | None, digits: int = 3) -> str:
    v, ci = _est(e, digits)
    return f"{v} {ci}".strip()


def _section(sid: str, title: str, intro: str = "") -> dict[str, Any]:
    return {"id": sid, "title": title, "intro": intro, "figures": [], "tables": [], "lines": [], "galleries": []}
