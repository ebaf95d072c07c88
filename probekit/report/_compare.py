"""The HTML report of a checkpoint comparison (:func:`probekit.compare.compare_checkpoints`): one file."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from ..verdict import LEVEL, RULES, level_pct
from . import _plots as P
from ._findings import pct, points
from ._html import _env

__all__ = ["render_compare_html", "write_compare_report"]

_WORD = {True: "FLAGGED", False: "not detected", None: "not judged"}


def _bars(names: list[str], ests: list[Mapping[str, Any] | None], *, title: str, ylabel: str,
          ylim: tuple[float | None, float | None], zero: bool = False) -> str:
    fig, ax = plt.subplots(figsize=(max(6.4, 0.9 * len(names) + 2), 3.4))
    vals = np.array([P._err(e) for e in ests]).reshape(-1, 3)
    ax.bar(np.arange(len(names)), vals[:, 0], 0.6, yerr=[vals[:, 1], vals[:, 2]], capsize=3, color="#4c72b0")
    if zero:
        ax.axhline(0, color="k", linewidth=1)
    ax.set_xticks(range(len(names)), [P.wrap_label(n, 16, 3) for n in names], fontsize=8)
    P.honest_ylim(ax, *ylim)
    ax.set_title(P.safe_text(title, 80), fontsize=10)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    P.fit_ticklabels(fig, ax)
    fig.tight_layout()
    return P.to_data_uri(fig)


def _over_steps(doc: Mapping[str, Any]) -> str:
    rows = doc["checkpoints"]
    names = sorted(rows, key=lambda m: rows[m]["step"])
    steps = np.array([rows[m]["step"] for m in names], dtype=float)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for ax, keys, title, ylabel in (
            (axes[0], [("reliance", "reliance", "#4c72b0")], "reliance over training", "share of predictions"),
            (axes[1], [("accuracy_own_background", "own-class backgrounds", "#2ca02c"),
                       ("accuracy_other_background", "other-class backgrounds", "#d62728")],
             "accuracy by background over training", "accuracy")):
        for key, label, color in keys:
            v = np.array([P._err(rows[m][key]) for m in names]).reshape(-1, 3)
            ax.plot(steps, v[:, 0], marker="o", color=color, label=label)
            ax.fill_between(steps, v[:, 0] - v[:, 1], v[:, 0] + v[:, 2], color=color, alpha=0.2, linewidth=0)
        P.honest_ylim(ax, 0, 1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step (from the checkpoint's name)", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return P.to_data_uri(fig)


def render_compare_html(doc: Mapping[str, Any], gallery: Mapping[str, Any] | None = None) -> str:
    """The comparison report's HTML text (with ``gallery``, the images that were audited)."""
    rows = doc["checkpoints"]
    order = list(rows)
    ranking = list(doc["ranking"])
    level = level_pct(doc.get("ci_level", LEVEL))  # the checkpoints' intervals, those the findings read
    diff_level = level_pct(doc.get("difference_ci_level", doc.get("ci_level", LEVEL)))
    margins = {r["reliance"].get("margin") for r in rows.values()} - {None}
    shortcut_rule = RULES["shortcut"].describe(margins.pop() if len(margins) == 1 else None)
    table = []
    for k, m in enumerate(ranking, 1):
        r = rows[m]
        det = r["reliance"].get("detectable")
        table.append([str(k), m, "–" if r.get("step") is None else str(r["step"]),
                      pct(r["reliance"], 1) if r["reliance"]["value"] is not None else (r["reliance"].get("reason")
                                                                                         or "–"),
                      _WORD[r.get("shortcut")], "–" if det is None else f"{100 * det:.0f} %",
                      pct(r["accuracy_own_background"], 1), pct(r["accuracy_other_background"], 1),
                      points(r["bg_gap_crossed"]), pct(r["background_effect"], 1), pct(r["flip_rate"])])
    diffs = [[d["checkpoint"], d["reference"], points(d["reliance_difference"]).replace("pts", "points"),
              "yes" if d["excludes_zero"] else "no"] for d in doc["differences"]]
    figures = [{"src": _bars(order, [rows[m]["reliance"] for m in order], title="reliance per checkpoint",
                             ylabel="share of predictions (1 = complete)", ylim=(0, 1)),
                "alt": "reliance per checkpoint",
                "caption": f"Reliance of each checkpoint (training order) with its {level} % interval over objects "
                           "and backgrounds."}]
    if doc["differences"]:
        figures.append({"src": _bars([d["checkpoint"] for d in doc["differences"]],
                                     [d["reliance_difference"] for d in doc["differences"]],
                                     title=f"reliance minus {doc['reference']}'s (paired)",
                                     ylabel="difference in reliance", ylim=(-0.1, 0.1), zero=True),
                        "alt": "paired differences in reliance",
                        "caption": f"Each checkpoint's reliance minus {doc['reference']}'s, with the paired "
                                   f"{diff_level} % interval (the same resampled objects and backgrounds for both): a "
                                   "whisker clear of the line at 0 is a difference beyond sampling noise."})
    if doc.get("has_steps"):
        figures.append({"src": _over_steps(doc), "alt": "reliance and accuracy over training steps", "wide": True,
                        "caption": "Over the training steps the checkpoints' names carry: reliance (left) and "
                                   "accuracy on own-class and other-class backgrounds (right); bands: "
                                   f"{level} % intervals."})
    return _env().get_template("compare.html.j2").render(
        model=str(doc.get("model", "")), data=str(doc.get("data", "")), n_objects=doc["n_objects"],
        n_backgrounds=doc["n_backgrounds"], seed=doc["seed"], n=len(order), best=ranking[0],
        definition=doc["reliance_definition"], interval=doc["interval"], figures=figures,
        shortcut_rule=shortcut_rule,
        ranking={"header": ["rank", "checkpoint", "step", "reliance", "shortcut", "smallest detectable",
                            "accuracy, own-class backgrounds", "accuracy, other-class backgrounds", "own − other",
                            "background effect", "prediction changes"], "rows": table, "left": 2},
        diffs={"header": ["checkpoint", "minus", f"difference in reliance (paired {diff_level} % CI)",
                          "interval excludes 0"], "rows": diffs, "left": 2},
        files=[[m, str((doc.get("files") or {}).get(m, ""))] for m in order],
        galleries=[gallery] if gallery and gallery.get("objects") else [])


def write_compare_report(doc: Mapping[str, Any], out: str | os.PathLike,
                         gallery: Mapping[str, Any] | None = None) -> Path:
    """Write :func:`render_compare_html` of ``doc`` to ``out`` (atomically)."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(render_compare_html(doc, gallery), encoding="utf-8")
    tmp.replace(out)
    return out
