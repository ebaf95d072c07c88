"""`probekit experiment NAME` prints its headline numbers and draws labelled plots: axis labels,
titles, legends that say what the activations / models are, seed lines labelled, ID and OOD lines in
distinct styles. Checked on a quick contamination run through the CLI (numbers against the JSON's
per-seed curves) and on the headline functions of the other experiments."""

from __future__ import annotations

import json
import re

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")
from matplotlib.figure import Figure

from probekit.cli import main as cli


@pytest.fixture
def figures(monkeypatch):
    saved = []
    orig = Figure.savefig

    def savefig(self, *a, **kw):
        saved.append(self)
        return orig(self, *a, **kw)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return saved


def _check_labelled(fig) -> list[str]:
    axes = [a for a in fig.axes if a.get_visible()]
    assert axes and fig._suptitle is not None and fig._suptitle.get_text()
    texts = []
    for a in axes:
        assert a.get_xlabel() and a.get_ylabel() and a.get_title(), (a.get_title(), a.get_xlabel())
        leg = a.get_legend()
        assert leg is not None
        texts += [t.get_text() for t in leg.get_texts()]
    return texts


@pytest.mark.slow
def test_contamination_prints_headline_and_draws_labelled_plot(tmp_path, capsys, figures):
    out = tmp_path / "c"
    assert cli(["experiment", "contamination", "--seeds", "2", "--quick", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    doc = json.loads((out / "contamination.json").read_text())
    # the printed peak growth of the ReLU network's background projection, against the per-seed curves
    growth = [max(r["background"]) / r["background"][0] for r in doc["per_seed"]["relu"]]
    line = next(x for x in printed.splitlines() if x.strip().startswith("ReLU network"))
    m = re.search(r"peaks at ([\d.]+) ± ([\d.]+)x", line)
    assert m and abs(float(m.group(1)) - np.mean(growth)) < 1e-3 and abs(float(m.group(2)) - np.std(growth, ddof=1)) < 1e-3
    ident = next(x for x in printed.splitlines() if x.strip().startswith("identity activation"))
    assert "never rises above its initial level" in ident
    assert len([x for x in printed.splitlines() if x.strip()]) <= 6  # a few lines, not a dump

    (fig,) = figures
    legend = _check_labelled(fig)
    assert "ReLU network" in legend and "identity activation (a linear network)" in legend
    assert {"seed 0", "seed 1"} <= set(legend)
    assert any("ID loss" in t for t in legend) and any("OOD loss" in t for t in legend)
    # the loss panel: every ID line and every OOD line differ in style, so neither hides the other
    loss_ax = next(a for a in fig.axes if "loss" in a.get_title())
    lines = [ln for ln in loss_ax.get_lines() if len(ln.get_xdata()) > 1]
    styles = {(ln.get_linestyle(), ln.get_linewidth()) for ln in lines}
    assert len(lines) == 2 * 2 * 2 and len(styles) == 2


def test_headlines_of_simplicity_distillation_and_shortcut():
    from probekit.experiments import distillation, shortcut, simplicity

    ms = lambda m, s=0.0: {"mean": m, "sd": s}  # noqa: E731
    simp = {"config": {"kind": "sym", "seeds": [0, 1], "epochs": 64, "mass": 0.9}, "seconds": 1.0, "store": "s.h5",
            "same_count_across_widths": True,
            "summary": {64: {"n_directions_per_seed": [4, 4], "align95_all_deg": ms(0.04, 0.01),
                             "centers_vs_widest_deg": ms(0.0)}}}
    text = "\n".join(simplicity.headline(simp))
    assert "width 64: [4, 4] directions" in text and "0.040 ± 0.010°" in text and "every width in every seed: yes" in text

    summ = {"teacher": {"id_acc": ms(0.953, 0.005), "ood_acc": ms(0.929), "drop": ms(0.024)},
            "student": {"id_acc": ms(0.931), "ood_acc": ms(0.305), "drop": ms(0.626, 0.022),
                        "rel_mse_id": ms(0.039), "rel_mse_ood": ms(0.695)}}
    dist = {"config": {"seeds": [0, 1], "composite": "additive"}, "summary": summ, "seconds": 1.0, "store": "d.h5",
            "findings": {"flagged_per_seed": {"teacher": [False, False], "student": [True, True]},
                         "student_minus_teacher_drop": ms(0.602, 0.02),
                         "student_drop_exceeds_teacher_every_seed": True,
                         "verdict_matches_ood_failure_every_seed": True}}
    text = "\n".join(distillation.headline(dist))
    assert "teacher (labels, broad backgrounds): ID 95.3 ± 0.5, OOD 92.9 ± 0.0, drop 2.4 ± 0.0 pts" in text
    assert "drop 62.6 ± 2.2 pts; rel-MSE ID 0.039" in text and "flagged by the verdict in 2 of 2" in text
    assert "60.2 ± 2.0 pts (positive in every seed: yes)" in text

    sc = {"seeds": {0: {"shortcut": {"flagged": True, "verdict": "shortcut relies on the background."},
                        "robust": {"flagged": False, "verdict": "robust is not flagged."}},
                    1: {"shortcut": {"flagged": False, "verdict": "shortcut is not flagged."},
                        "robust": {"flagged": False, "verdict": "robust is not flagged."}}}}
    lines = shortcut.headline(sc)
    assert "  seed 0: as expected (shortcut flagged, robust not)" in lines
    assert "  seed 1: NOT as expected (shortcut flagged, robust not)" in lines
    assert "    [FLAGGED] shortcut relies on the background." in lines
    assert sum("[not flagged]" in x for x in lines) == 3
