"""A Markdown summary of an audit: for a CI step summary (``$GITHUB_STEP_SUMMARY``) or a model card.

The verdict table (one row per model: the verdict, the figure its shortcut finding read with its interval
and the margin it was judged against, the smallest reliance the audit could detect, accuracy on own-class
and other-class backgrounds and their difference in points, the background effect, the representation),
the verdict sentences, and the findings per model (holds / does not hold / not judged).

The shortcut finding reads reliance, or the background pull where the backgrounds carry no class and the
pull stands in (:func:`probekit.verdict.shortcut_estimate`): each model's figure sits under the heading
that names it, "–" under the other, with the interval whose low end its rule reads, and "flagged above"
is that rule's margin. Columns in
which no model has a figure are left out; a schema-2 document (no reliance yet) shows its background pull.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..verdict import MARKS, level_pct, shortcut_estimate
from ._findings import FINDINGS, model_verdicts, pct, points

__all__ = ["summary_markdown", "write_summary"]


def _md(text: Any) -> str:
    """A user string safe inside a Markdown table cell (no pipe, no line break, no HTML)."""
    s = str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")
    return s.replace("<", "&lt;").replace(">", "&gt;")


def _layers(info: Mapping[str, Any]) -> str:
    compared = [la for la, r in (info.get("layers") or {}).items() if "background_flag" in r]
    if not compared:
        return "–"
    above = [la for la in compared if info["layers"][la].get("background_flag")]
    return f"above its reference at {len(above)} of {len(compared)} layers"


def _read(b: Mapping[str, Any]) -> tuple[str | None, Mapping[str, Any] | None]:
    """Which figure the model's shortcut finding read (``"reliance"``, ``"pull"``, or None: not judged) and
    that figure as its rule reads it (:func:`probekit.verdict.shortcut_estimate`); a schema-2 document (no
    reliance) has only its pull, with no margin recorded."""
    est = shortcut_estimate(b)
    if est is not None:
        return ("pull" if est.get("stand_in") == "pull" else "reliance"), est
    if "reliance" not in b and (b.get("pull") or {}).get("value") is not None:
        return "pull", {**b["pull"], "margin": None}
    return None, b.get("reliance")


def _reliance(b: Mapping[str, Any]) -> str:
    which, est = _read(b)
    return "–" if which == "pull" else pct(est, 1)


def _pull(b: Mapping[str, Any]) -> str:
    which, est = _read(b)
    return pct(est, 1) if which == "pull" else "–"


def _threshold(b: Mapping[str, Any]) -> str:
    """The margin of the rule that judged the shortcut: the pull's where it stood in, else reliance's."""
    margin = (_read(b)[1] or {}).get("margin")
    return "–" if margin is None else f"{100 * float(margin):.0f} %"


def _detectable(b: Mapping[str, Any]) -> str:
    r = b.get("reliance") or {}
    d = r.get("detectable")
    if d is None or b.get("_status") != "not_flagged":  # the power of a search that found nothing
        return "–"
    return f"{100 * float(d):.0f} %"


def _own_other(b: Mapping[str, Any]) -> str:
    own, other = b.get("accuracy_own_background"), b.get("accuracy_other_background")
    if (own or {}).get("value") is None and (other or {}).get("value") is None:
        return "–"
    return f"{pct(own)} / {pct(other)}"


_COLUMNS: list[tuple[str, Callable[[Mapping[str, Any]], str]]] = [
    # (header, cell from behaviour); a column whose every cell is "–" is left out
    (f"reliance [{level_pct()} % CI]", _reliance),
    (f"{MARKS['pull'].heading} [{level_pct()} % CI]", _pull),
    ("flagged above", _threshold),
    ("smallest detectable reliance (where none was found)", _detectable),
    ("accuracy, own-class / other-class backgrounds", _own_other),
    ("own − other", lambda b: points(b.get("bg_gap_crossed"))),
    ("background effect", lambda b: pct(b.get("background_effect"), 1)),
    ("prediction changes", lambda b: pct(b.get("flip_rate"))),
]


def summary_markdown(doc: Mapping[str, Any], *, title: str | None = None) -> str:
    """The Markdown summary of an audit document."""
    models = doc.get("models") or {}
    verdicts = model_verdicts(doc)
    store = Path(str(doc.get("store") or "audit")).name
    lines = [f"## {_md(title or f'probekit audit: {store}')}", ""]
    if not verdicts:
        return "\n".join([*lines, "No model in this audit.", ""])
    n_bad = sum(v.status == "flagged" for v in verdicts)
    n_none = sum(v.status == "not_judged" for v in verdicts)
    lines.append(f"{len(verdicts)} model(s): {n_bad} flagged, {len(verdicts) - n_bad - n_none} not flagged, "
                 f"{n_none} not judged.")
    lines.append("")
    beh = {v.model: {**(models[v.model].get("behaviour") or {}), "_status": v.status} for v in verdicts}
    cells = {h: {m: fn(b) for m, b in beh.items()} for h, fn in _COLUMNS}
    cols = [h for h, _ in _COLUMNS if any(c != "–" for c in cells[h].values())]
    header = ["model", "verdict", *cols, "representation"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for v in verdicts:
        badge = {"flagged": "**FLAGGED**", "not_flagged": "not flagged", "not_judged": "*not judged*"}[v.status]
        row = [_md(v.model), badge, *[cells[h][v.model] for h in cols], _layers(models[v.model])]
        lines.append("| " + " | ".join(row) + " |")
    notes = [f"Intervals: {level_pct()} %, resampling objects and backgrounds."]
    if cols and cols[0].startswith("reliance"):
        notes.append("Reliance: the share of predictions that take the background's class beyond a within-object "
                     "shuffle (1 = a complete shortcut).")
    if any(h.startswith(MARKS["pull"].heading) for h in cols):
        notes.append("Where the backgrounds carry no class, the background pull (the share of predictions "
                     "backgrounds move towards the same classes, beyond a within-object shuffle) stands in for "
                     f"reliance: the shortcut finding then holds when {MARKS['pull'].rule}.")
    lines += ["", " ".join(notes), ""]
    for v in verdicts:
        lines.append(f"- **{_md(v.model)}** ({v.badge}): {_md(v.verdict)}")
        if v.status == "not_judged" and v.reason and v.reason != v.verdict:
            lines.append(f"  - not judged because: {_md(v.reason)}")
    lines += ["", "| model | " + " | ".join(FINDINGS) + " |", "|---|" + "---|" * len(FINDINGS)]
    word = {True: "**holds**", False: "no", None: "not judged"}
    for v in verdicts:
        lines.append(f"| {_md(v.model)} | " + " | ".join(word[v.findings[f]] for f in FINDINGS) + " |")
    lines += ["", f"probekit {_md(doc.get('probekit_version', ''))} · {_md(doc.get('created', ''))}", ""]
    return "\n".join(lines)


def write_summary(doc: Mapping[str, Any], path: str | os.PathLike, *, append: bool | None = None) -> Path:
    """Write :func:`summary_markdown` of ``doc`` to ``path``.

    ``append`` defaults to true when ``path`` is the file named by ``$GITHUB_STEP_SUMMARY`` (GitHub
    collects every tool's summary of a step in that one file), else the file is replaced.
    """
    path = Path(path)
    text = summary_markdown(doc)
    if append is None:
        env = os.environ.get("GITHUB_STEP_SUMMARY")
        append = bool(env) and path.resolve() == Path(env).resolve()
    if append:
        with path.open("a", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path
