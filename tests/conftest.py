"""Shared fixtures: a seeded RNG, headless Chromium for rendering HTML reports, and trained shapes CNNs
shared across tests."""

from __future__ import annotations

import copy
import functools
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import probekit.experiments.shortcut as _shortcut

# Several tests (and `probekit demo`'s own-images part) train the same shapes CNN: the same background
# colouring, seed, epochs and data. Training is deterministic (one torch thread, seeded), so each
# configuration is trained once per test session and every caller gets its own copy. Patched here,
# before any test module or probekit.demo imports the name.
_train_shapes_cnn = _shortcut.train_shapes_cnn


@functools.cache
def _trained_shapes_cnn(background: str, seed: int, epochs: int, n_train: int, lr: float):
    return _train_shapes_cnn(background, seed=seed, epochs=epochs, n_train=n_train, lr=lr)


@functools.wraps(_train_shapes_cnn)
def _shared_train_shapes_cnn(background: str = "random", *, seed: int = 0, epochs: int = 20, n_train: int = 1500,
                             lr: float = 3e-3):
    return copy.deepcopy(_trained_shapes_cnn(background, seed, epochs, n_train, lr))


_shortcut.train_shapes_cnn = _shared_train_shapes_cnn


@pytest.fixture(autouse=True)
def _seed():
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture
def browser(tmp_path):
    """``render(html_path) -> (png_path, dom_text, console_errors)`` with headless Chromium.

    Skips when no Chromium is installed (CI installs Debian's package in .ci/run).
    """
    exe = _chromium()
    if exe is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium)")

    def render(html: Path, width: int = 1200, height: int = 2400) -> tuple[Path, str, list[str]]:
        png = tmp_path / (html.stem + ".png")
        flags = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--hide-scrollbars", f"--user-data-dir={tmp_path / 'chrome-profile'}",
                 "--enable-logging=stderr", "--v=0", f"--window-size={width},{height}"]
        url = html.resolve().as_uri()
        shot = subprocess.run([*flags, f"--screenshot={png}", url], capture_output=True, text=True, timeout=120)
        dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
        logs = shot.stderr + dom.stderr
        errors = [line for line in logs.splitlines() if "CONSOLE" in line and ("ERROR" in line or "Uncaught" in line)]
        errors += [line for line in logs.splitlines() if "Failed to load resource" in line]
        assert png.exists(), f"chromium wrote no screenshot: {shot.stderr[-500:]}"
        return png, dom.stdout, errors

    return render
