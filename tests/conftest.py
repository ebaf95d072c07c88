"""Shared fixtures: a seeded RNG, and headless Chromium for rendering HTML reports."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch


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
