"""The repository's docs and code refer to no notes outside it (the design, pilot and papers notes
users do not have): what they need is restated in docs/."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# built from parts, so this file does not match itself
NAMES = ["." + "./" + "shared", "PILOT" + ".md", "PAPERS" + ".md", "DESIGN" + ".md", "STYLE" + ".md"]
SUFFIXES = {".py", ".md", ".j2", ".toml", ".txt", ".cfg", ".yml", ".yaml", ".json", ".html", ".rst"}


def _files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
        files = [ROOT / f for f in out]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an sdist): walk the tree
        files = [p for p in ROOT.rglob("*") if ".venv" not in p.parts and ".git" not in p.parts]
    return [f for f in files if f.suffix in SUFFIXES and f.is_file()]


def test_no_reference_to_notes_outside_the_repository():
    files = _files()
    assert any(f.name == "EXPERIMENTS.md" for f in files) and any(f.name == "series.py" for f in files)
    hits = [f"{f.relative_to(ROOT)}:{i}: {line.strip()[:80]}"
            for f in files for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1)
            if any(n in line for n in NAMES)]
    assert not hits, "\n".join(hits)


def test_experiments_doc_restates_the_pilot_and_the_papers():
    text = (ROOT / "docs" / "EXPERIMENTS.md").read_text()
    for fact in ("arXiv 2406.03345", "arXiv 2405.17299", "### The background-digits pilot",
                 "hue 0–0.30", "hue 0.45–0.80", "23.7 ± 7.6", "2.67x"):
        assert fact in text, fact
