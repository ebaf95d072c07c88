"""Shared fixtures: a seeded RNG, headless Chromium for rendering HTML reports, trained shapes CNNs shared
across tests, and a child Python whose probekit.vocab says other numbers."""

from __future__ import annotations

import copy
import functools
import json
import shutil
import subprocess
import sys
from collections.abc import Mapping
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


# probekit.vocab loaded first and edited, then the rest of the package: as if vocab.py said these numbers.
# The constants are the child's first argument, taken off sys.argv before the script's body runs.
_EDITED_VOCAB = r'''
import importlib.util as _util, json as _json, sys as _sys

_spec = _util.find_spec("probekit")
_pkg = _util.module_from_spec(_spec)
_sys.modules["probekit"] = _pkg
import probekit.vocab as _vocab
for _k, _v in _json.loads(_sys.argv.pop(1)).items():
    setattr(_vocab, _k, _v)
_spec.loader.exec_module(_pkg)
'''


@pytest.fixture
def with_constants(tmp_path):
    """``run(body, constants, *args)``: the script ``body`` in a child Python in which probekit.vocab's
    ``constants`` (name -> value) replace its own, before anything of probekit reads them; ``args`` are the
    body's ``sys.argv[1:]``. Returns the ``subprocess.CompletedProcess`` (stdout and stderr captured)."""

    def run(body: str, constants: Mapping[str, float], *args: str, timeout: float = 120):
        script = tmp_path / "with_constants.py"
        script.write_text(_EDITED_VOCAB + body)
        return subprocess.run([sys.executable, str(script), json.dumps(dict(constants)), *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=timeout)

    return run
