"""Figures of the report: matplotlib (Agg) to PNG data URIs, so the HTML stays one self-contained file.

Every label that may come from a user (model, layer, factor names) goes through :func:`safe_text`,
since matplotlib would otherwise parse ``$...$`` as mathtext.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

COLORS = {"teacher": "#1f77b4", "student": "#d62728", "model": "#2ca02c"}
_EXTRA = ["#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#ff7f0e"]


def safe_text(s: Any, limit: int = 48) -> str:
    text = str(s).replace("$", r"\$")  # outside $...$ a backslash is literal; only $ starts mathtext
    return text if len(text) <= limit else text[: limit - 1] + "…"


def model_colors(models: Mapping[str, str]) -> dict[str, str]:
    """A colour per model: by role where unique, then from a fixed cycle."""
    out, used, extra = {}, set(), iter(_EXTRA * 4)
    for name, role in models.items():
        c = COLORS.get(role)
        out[name] = c if c and c not in used else next(extra)
        used.add(out[name])
    return out


def wrap_label(s: Any, width: int = 18, lines: int = 3) -> str:
    """A tick label on up to ``lines`` lines of ``width`` characters, broken after dots, spaces, ``_``, ``/``
    and ``~`` where it can; the last line ends in an ellipsis only when the whole would not fit."""
    out: list[str] = []
    line = ""
    for tok in re.split(r"(?<=[.\s_/~])", str(s)):
        while len(tok) > width:  # a part longer than a line: split it
            if line:
                out.append(line)
                line = ""
            out.append(tok[:width])
            tok = tok[width:]
        if len(line) + len(tok) > width and line:
            out.append(line)
            line = ""
        line += tok
    if line:
        out.append(line)
    out = [p.strip() for p in out if p.strip()]
    if len(out) > lines:
        out = out[:lines]
        out[-1] = out[-1][: width - 1] + "…"
    return "\n".join(p.replace("$", r"\$") for p in out)


def _boxes_overlap(a: Any, b: Any, pad: float = 1.0) -> bool:
    return not (a.x1 + pad <= b.x0 or b.x1 + pad <= a.x0 or a.y1 + pad <= b.y0 or b.y1 + pad <= a.y0)


def tick_overlap(fig: Any, ax: Any) -> bool:
    """Whether any two x tick labels of ``ax`` overlap (or run past the figure's edges) once drawn."""
    fig.draw_without_rendering()  # the layout a draw makes, without rasterising (the same boxes, a third of the time)
    r = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(r) for t in ax.get_xticklabels() if t.get_text()]
    return any(_boxes_overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def fit_ticklabels(fig: Any, ax: Any) -> None:
    """Make the x tick labels readable: if they overlap, rotate them, then shrink them (never below 6 pt)."""
    if not tick_overlap(fig, ax):
        return
    for t in ax.get_xticklabels():
        t.set_rotation(30)
        t.set_ha("right")
        t.set_rotation_mode("anchor")
    size = float(ax.get_xticklabels()[0].get_fontsize()) if ax.get_xticklabels() else 8.0
    while tick_overlap(fig, ax) and size > 6:
        size -= 1
        for t in ax.get_xticklabels():
            t.set_fontsize(size)


def honest_ylim(ax: Any, low: float | None = None, high: float | None = None) -> None:
    """At least ``[low, high]`` on the y axis, widened to whatever is drawn: a flat line looks flat."""
    lo, hi = ax.get_ylim()
    ax.set_ylim(min(lo, low) if low is not None else lo, max(hi, high) if high is not None else hi)


def to_data_uri(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _err(est: Mapping[str, Any] | None) -> tuple[float, float, float]:
    if not est or est.get("value") is None:
        return np.nan, 0.0, 0.0
    v = float(est["value"])
    ci = est.get("ci") or [v, v]
    lo = 0.0 if ci[0] is None else max(0.0, v - float(ci[0]))
    hi = 0.0 if ci[1] is None else max(0.0, float(ci[1]) - v)
    return v, lo, hi


def layer_lines(
    series: Mapping[str, Sequence[tuple[str, Mapping[str, Any] | None]]],
    *,
    title: str,
    ylabel: str,
    colors: Mapping[str, str],
    styles: Mapping[str, str] | None = None,
    hline: float | None = None,
    hline_label: str = "",
    ylim: tuple[float | None, float | None] | None = None,
) -> str:
    """One line per series over layers (x axis = layer position, in the order the series give), with CI
    error bars.

    ``series`` maps a legend label to ``[(layer, {"value", "ci"}), ...]``; the part of the label before
    " · " picks the colour, the part after it the line style. ``ylim``: the least y range shown (widened
    to the data), e.g. ``(0, 1)`` for shares and accuracies so that a flat line looks flat.
    """
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    all_layers: list[str] = []
    for pts in series.values():
        for layer, _ in pts:
            if layer not in all_layers:
                all_layers.append(layer)
    pos = {name: i for i, name in enumerate(all_layers)}
    for label, pts in series.items():
        model, _, kind = label.partition(" · ")
        xs = [pos[layer] for layer, _ in pts]
        vals = np.array([_err(e) for _, e in pts]).reshape(-1, 3)
        ax.errorbar(xs, vals[:, 0], yerr=[vals[:, 1], vals[:, 2]], marker="o", capsize=3,
                    color=colors.get(model, "#333"), linestyle=(styles or {}).get(kind, "-"),
                    label=safe_text(label, 40))
    if hline is not None:
        ax.axhline(hline, color="#888", linestyle=":", linewidth=1, label=hline_label or None)
    ax.set_xticks(range(len(all_layers)), [wrap_label(n, 16, 2) for n in all_layers], fontsize=8)
    if ylim is not None:
        honest_ylim(ax, *ylim)
    ax.set_title(safe_text(title, 80))
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    fit_ticklabels(fig, ax)
    return to_data_uri(fig)


def histograms(
    panels: Sequence[tuple[str, Mapping[str, Any], str]],
    *,
    xlabel: str,
    vline_key: str | None = None,
    vline_label: str = "",
) -> str:
    """Small multiples of pre-binned histograms: ``(title, {"edges", "counts", vline_key}, color)``."""
    n = len(panels)
    cols = min(4, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.3 * rows), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    for ax, (title, h, color) in zip(axes.ravel(), panels, strict=False):
        edges = np.asarray(h["edges"], dtype=float)
        counts = np.asarray(h["counts"], dtype=float)
        ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color=color, alpha=0.8)
        if vline_key and h.get(vline_key) is not None:
            ax.axvline(float(h[vline_key]), color="k", linestyle="--", linewidth=1, label=vline_label)
            ax.legend(fontsize=7, frameon=False)
        ax.set_title(safe_text(title, 40), fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("units", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return to_data_uri(fig)


def grouped_bars(
    groups: Sequence[str],
    bars: Mapping[str, Sequence[Mapping[str, Any] | None]],
    *,
    title: str,
    ylabel: str,
    colors: Mapping[str, str],
    ylim: tuple[float | None, float | None] | None = None,
    marks: Mapping[int, tuple[float, str]] | None = None,
) -> str:
    """Bars per group (e.g. layer pairs) and per series (e.g. ID / OOD), with CI whiskers.

    ``marks`` maps a group's position to ``(y, label)``: a black tick across that group (a threshold).
    ``ylim``: the least y range shown (widened to the data). Long group names are wrapped, not cut.
    """
    fig, ax = plt.subplots(figsize=(max(6.4, 2.6 * len(groups)), 3.2))
    k = len(bars)
    width = 0.8 / max(1, k)
    for j, (label, ests) in enumerate(bars.items()):
        vals = np.array([_err(e) for e in ests]).reshape(-1, 3)
        x = np.arange(len(groups)) + (j - (k - 1) / 2) * width
        ax.bar(x, vals[:, 0], width, yerr=[vals[:, 1], vals[:, 2]], capsize=3, label=safe_text(label),
               color=colors.get(label, _EXTRA[j % len(_EXTRA)]))
    for n, (i, (y, label)) in enumerate((marks or {}).items()):
        ax.hlines(y, i - 0.45, i + 0.45, colors="k", linewidth=2, label=label if n == 0 else None)
    multiline = any("\n" in g for g in groups)
    ax.set_xticks(range(len(groups)), [safe_text(g, 200) if multiline else wrap_label(g, 22, 3) for g in groups],
                  fontsize=8)
    if ylim is not None:
        honest_ylim(ax, *ylim)
    ax.set_title(safe_text(title, 80))
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, frameon=False)
    fit_ticklabels(fig, ax)
    return to_data_uri(fig)


def cluster_shares(title: str, shares: Sequence[float], spreads: Sequence[float] | None,
                   n_directions: int | None, color: str) -> str:
    """Cumulative mass share of the direction clusters, largest first (every cluster drawn), with the
    90 % line and the count of clusters that reach it."""
    shares = np.sort(np.asarray(shares, dtype=float))[::-1]
    cum = np.cumsum(shares) / max(shares.sum(), 1e-300)
    fig, ax = plt.subplots(figsize=(3.4, 2.4))
    ax.step(np.arange(1, len(cum) + 1), cum, where="post", color=color)
    ax.axhline(0.9, color="#888", linestyle=":", linewidth=1)
    if n_directions:
        ax.axvline(n_directions, color="k", linestyle="--", linewidth=1,
                   label=f"{n_directions} of {len(cum)} clusters carry 90%")
        ax.legend(fontsize=7, frameon=False, loc="lower right")
    ax.set_xscale("log" if len(cum) > 30 else "linear")
    ax.set_ylim(0, 1.02)
    ax.set_title(safe_text(title, 40), fontsize=9)
    ax.set_xlabel("clusters, largest first", fontsize=8)
    ax.set_ylabel("cumulative share of ‖w‖²", fontsize=8)
    ax.tick_params(labelsize=7)
    return to_data_uri(fig)


def attribution_grid(examples: Sequence[Mapping[str, Any]], title: str) -> str:
    """Input, |attribution| and mask outline for a few images (HxWx3 input, HxW attribution/mask)."""
    n = len(examples)
    fig, axes = plt.subplots(2, n, figsize=(1.7 * n, 3.6), squeeze=False)
    for j, ex in enumerate(examples):
        img = np.asarray(ex["input"], dtype=float)
        img = (img - img.min()) / (np.ptp(img) + 1e-12)
        attr = np.abs(np.asarray(ex["attr"], dtype=float))
        axes[0, j].imshow(img, cmap=None if img.ndim == 3 else "gray")
        axes[1, j].imshow(attr, cmap="inferno")
        if ex.get("mask") is not None:
            axes[1, j].contour(np.asarray(ex["mask"], dtype=float), levels=[0.5], colors="cyan", linewidths=0.8)
        share = ex.get("background_share")
        axes[1, j].set_title(f"bg {share:.2f}" if share is not None else "", fontsize=8)
        for ax in axes[:, j]:
            ax.axis("off")
    fig.suptitle(safe_text(title, 80), fontsize=10)
    fig.tight_layout()
    return to_data_uri(fig)


def finding_panels(panels: Sequence[Mapping[str, Any]], colors: Mapping[str, str]) -> str:
    """The graded figures beside the verdict, one panel each, side by side.

    Each panel: ``title``, ``ylabel``, ``groups`` (model names), ``series`` ({legend: [estimate per group]}
    — one series is coloured per model, several are told apart by hatching), optional ``scale`` (100 for
    points), ``ylim`` (the least range shown), ``marks`` ({group position: (y, label)}: a black threshold
    tick), ``hline`` ((y, label): a dashed line across, e.g. chance) and ``notes`` ({group position: text}
    written at the bottom of an empty bar, e.g. "not computed").
    Whiskers are the estimates' intervals.
    """
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(3.5 * n + 0.4, 3.4), squeeze=False)
    hatches = [None, "///", "..", "xx"]
    for ax, p in zip(axes.ravel(), panels, strict=True):
        groups = list(p["groups"])
        series = p["series"]
        scale = float(p.get("scale", 1.0))
        k = len(series)
        width = 0.8 / max(1, k)
        for j, (label, ests) in enumerate(series.items()):
            vals = np.array([_err(e) for e in ests]).reshape(-1, 3) * scale
            x = np.arange(len(groups)) + (j - (k - 1) / 2) * width
            cols = [colors.get(g, "#555") for g in groups]
            ax.bar(x, vals[:, 0], width, yerr=[vals[:, 1], vals[:, 2]], capsize=3, color=cols,
                   hatch=hatches[j % len(hatches)] if k > 1 else None, edgecolor="white" if k > 1 else None,
                   label=safe_text(label) if k > 1 else None, error_kw={"elinewidth": 1.4})
        for m, (i, (y, label)) in enumerate((p.get("marks") or {}).items()):
            ax.hlines(y * scale, i - 0.45, i + 0.45, colors="k", linewidth=2.2, label=label if m == 0 else None)
        for m, (i, (y, label)) in enumerate((p.get("dotted") or {}).items()):
            ax.hlines(y * scale, i - 0.45, i + 0.45, colors="#555", linewidth=1.6, linestyles=":",
                      label=label if m == 0 else None)
        if p.get("hline") is not None:
            y, label = p["hline"]
            ax.axhline(y * scale, color="#666", linestyle="--", linewidth=1, label=label)
        for i, text in (p.get("notes") or {}).items():
            ax.text(i, 0.02 * scale, safe_text(text, 30), ha="center", va="bottom", fontsize=7, color="#555",
                    rotation=90)
        ax.set_xticks(range(len(groups)), [wrap_label(g, 14, 2) for g in groups], fontsize=8)
        ax.set_xlim(-0.6, len(groups) - 0.4)
        lo, hi = p.get("ylim", (0.0, 1.0))
        honest_ylim(ax, lo * scale if lo is not None else None, hi * scale if hi is not None else None)
        ax.set_title(safe_text(p["title"], 60), fontsize=9)
        ax.set_ylabel(p["ylabel"], fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(alpha=0.3, axis="y")
        fit_ticklabels(fig, ax)
    legend: dict[str, Any] = {}
    for ax in axes.ravel():  # one legend below the panels, where it hides no bar
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(lab, h)
    fig.tight_layout(rect=(0, 0.1 if legend else 0, 1, 1))
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=min(4, len(legend)), fontsize=7,
                   frameon=False)
    return to_data_uri(fig)
