"""examples/train_lightning.py: a Lightning Trainer with probekit.RecorderCallback trains bit-for-bit as
without it, and the audit of its store draws the run over training in the HTML report."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lightning")  # in the dev extra: runs in CI

import probekit as pk
from probekit.report import write_report

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_lightning.py"


def _example():
    spec = importlib.util.spec_from_file_location("train_lightning_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_recorder_callback_is_public():
    from probekit.extractors import RecorderCallback
    from probekit.extractors._recorder import RecorderCallback as private

    assert pk.RecorderCallback is RecorderCallback is private
    assert "RecorderCallback" in pk.__all__


@pytest.mark.slow
def test_lightning_example_is_bit_identical_and_reports_over_training(tmp_path):
    ex = _example()
    args = ["--epochs", "2", "--train-size", "192", "--batch-size", "32", "--probe-size", "80"]
    plain = ex.main([*args, "--every", "0", "--out", str(tmp_path / "off.h5")])
    recorded = ex.main([*args, "--every", "4", "--out", str(tmp_path / "run.h5")])
    assert not (tmp_path / "off.h5").exists()
    assert plain.keys() == recorded.keys()
    for k in plain:  # weights, BatchNorm statistics and its batch counter: bit for bit
        assert plain[k].dtype == recorded[k].dtype
        assert np.array_equal(plain[k].numpy(), recorded[k].numpy()), k
    with pk.open_store(tmp_path / "run.h5") as s:
        # 2 epochs x 6 batches = 12 optimizer steps: step 0, every 4th, and the end
        assert s.steps("model") == [0, 4, 8, 12]
        assert s.acts_splits("model", 12) == ["probe"]

    audit = pk.audit(tmp_path / "run.h5", n_boot=20, n_perm=20, progress=False)
    r = audit.data["series"]["model"]
    assert r["probe"]["net.conv3"]["method"] == "cv"
    # the probe split is the crossed set: groups and background factors give the background figures
    assert set(r["background_sensitivity"]) == set(r["background_share"]) == {"net.conv2", "net.conv3"}
    assert set(r["directions"]) == {"net.conv2", "net.conv3"}
    assert any("recorded steps" in line for line in audit.data["verdict"])
    html = write_report(audit.data, tmp_path / "run.html").read_text()
    sec = html[html.index('id="training"'):]
    assert "<img" in sec and "data:image/png;base64," in sec
