"""The public names of probekit are the functions, whatever was imported before (a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys


def test_function_names_are_not_shadowed_by_submodules(tmp_path):
    code = (
        "import probekit.cli, probekit.audit, probekit.extraction, probekit.report\n"
        "import probekit\n"
        "assert callable(probekit.audit) and type(probekit.audit).__name__ == 'function'\n"
        "assert callable(probekit.extract) and type(probekit.extract).__name__ == 'function'\n"
        "from probekit.audit import parse_threshold\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-1500:]
    assert r.stdout.strip() == "ok"
