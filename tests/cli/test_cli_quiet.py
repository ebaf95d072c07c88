"""The command line without noise: a closed stdout, Ctrl-C, long paths, Python names, help, skips, flags.

Pipes are real: a child process whose stdout is a pipe that ``head -c 1`` (or nobody) reads.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from probekit.cli import build_parser, cli_message, main
from probekit.store import StoreWriter

REPO = Path(__file__).resolve().parents[2]

#: runs main(ARGV) 20 times in one interpreter, its stdout each time a fresh pipe to `head -c 1` (or,
#: with CLOSED=1, a pipe whose reader is already gone), and prints the exit codes as JSON on stderr
CHILD = textwrap.dedent(
    """
    import json, os, subprocess, sys

    from probekit.cli import main

    argv, closed = json.loads(sys.argv[1]), sys.argv[2] == "1"
    codes = []
    for _ in range(20):
        saved = os.dup(1)
        if closed:
            r, w = os.pipe()
            os.close(r)
            os.dup2(w, 1)
            os.close(w)
        else:
            head = subprocess.Popen(["head", "-c", "1"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
            os.dup2(head.stdin.fileno(), 1)
            head.stdin.close()
        try:
            codes.append(main(argv))
        finally:
            try:
                sys.stdout.flush()
            except BrokenPipeError:  # only if main() left something unwritten: the test fails on it
                codes.append("unflushed")
            os.dup2(saved, 1)
            os.close(saved)
        if not closed:
            head.wait()
    print("CODES " + json.dumps(codes), file=sys.stderr)
    """
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store with many layers, so that `info` writes more than one pipe buffer (64 KiB) of JSON."""
    out = tmp_path_factory.mktemp("pipes") / "s.h5"
    with StoreWriter(out, mode="create") as w:
        w.add_split("data", n_rows=4, has_label=True)
        w.add_model("m")
        layers = [f"block{k}.{'deep.' * 200}out" for k in range(64)]  # few layers (fast), long names
        for layer in layers:
            w.add_layer("m", "data", layer, feature_shape=(2,))
        w.write_rows("data", 0, {"index": np.arange(4), "label": np.arange(4) % 2},
                     {"m": {la: np.ones((4, 2), np.float32) for la in layers}})
    return out


def run_child(argv: list[str], closed: bool, cwd: Path) -> tuple[list, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(cwd), str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(argv), "1" if closed else "0"], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    *rest, last = proc.stderr.strip().splitlines()
    assert last.startswith("CODES "), proc.stderr[-3000:]
    return json.loads(last[6:]), "\n".join(rest)


TINY_MODEL = "import torch\n\ndef net():\n    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())\n"


@pytest.mark.parametrize("verb", [pytest.param("info", marks=pytest.mark.slow), "info --json",
                                  pytest.param("layers --json", marks=pytest.mark.slow)])
def test_a_reader_that_goes_away_ends_the_verb_quietly(store, tmp_path, verb):
    """`probekit info STORE | head -c 1`, 20 times, and 20 times with the reader gone before any write:
    never a traceback, never a word on stderr; exit 0 (everything fitted in the pipe) or 141 (SIGPIPE)."""
    (tmp_path / "tiny.py").write_text(TINY_MODEL)
    argv = verb.split() + ([str(store)] if verb.startswith("info") else ["tiny:net", "--input-shape", "4"])
    for closed in (False, True):
        codes, err = run_child(argv, closed, tmp_path)
        assert err == "", err[-3000:]
        assert set(codes) <= {0, 141}, codes
        if closed:
            assert codes == [141] * 20  # every write found the reader gone


def test_info_json_is_more_than_a_pipe_buffer(store, capsys):
    """The fixture's store makes `info --json` block on a full pipe, so head's exit hits a pending write."""
    assert main(["info", "--json", str(store)]) == 0
    assert len(capsys.readouterr().out) > 65536


# -- Ctrl-C -------------------------------------------------------------------------------------------------
def test_ctrl_c_during_audit_names_the_command_that_continues(monkeypatch, capsys, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("probekit.model_audit.audit_model", interrupted)
    argv = ["audit", "probekit.experiments.shortcut:ShapesCNN", "--data", str(tmp_path / "my images"), "--masks",
            str(tmp_path / "m"), "--out-dir", str(tmp_path / "out"), "--no-progress"]
    assert main(argv) == 130
    err = capsys.readouterr().err.strip()
    assert err == ("probekit: interrupted; a rerun of the same command continues from the last committed row: "
                   "probekit " + shlex.join(argv))
    assert "'" + str(tmp_path / "my images") + "'" in err  # quoted as a shell needs it


# -- messages in the command line's words ---------------------------------------------------------------------
def test_python_parameter_names_become_the_verbs_flags():
    said = cli_message("n_backgrounds=9 must lie in 1..7 for the 8 images of '/d'; lower n_backgrounds= or add "
                       "images.", "audit")
    assert said == "--backgrounds 9 must lie in 1..7 for the 8 images of '/d'; lower --backgrounds or add images."
    assert cli_message("test_fraction=1.0 leaves no train images in '/d'; lower test_fraction.", "audit") == \
        "--test-fraction 1.0 leaves no train images in '/d'; lower --test-fraction."
    assert cli_message("give the foreground as masks= or boxes=.", "audit") == \
        "give the foreground as --masks or --boxes."
    assert cli_message("The 'batch_size' parameter of extract must be an int >= 1.", "extract") == \
        "--batch-size must be an int >= 1."
    # a message that already names the flag says both on purpose; another verb has other flags
    both = "pad with max_length=T (as_samples(data, max_length=T); CLI --max-length T)."
    assert cli_message(both, "extract") == both
    assert cli_message("n_backgrounds=9 is too many", "analyze") == "n_backgrounds=9 is too many"


def test_a_long_path_is_cut_to_its_tail():
    path = "/data/images/cls/" + "loop/" * 130 + "x.png"  # 667 characters, as a symbolic link loop makes
    said = cli_message(f"The file {path!r} is not an image.", "audit")
    quoted = re.search(r"'([^']*)'", said).group(1)
    assert len(quoted) == 80 and quoted.startswith("...") and path.endswith(quoted[3:])


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from probekit.datasets._shapes import write_image_folder

    d = tmp_path_factory.mktemp("shapes")
    images, masks = write_image_folder(d, split="test", background="class", n=12)
    return images, masks


def _audit(images, masks, tmp_path, *extra):
    return main(["audit", "probekit.experiments.shortcut:ShapesCNN", "--data", str(images), "--masks", str(masks),
                 "--out-dir", str(tmp_path / "out"), "--no-progress", *extra])


@pytest.mark.parametrize("flags, said", [
    (["--backgrounds", "500"], "--backgrounds 500 must lie in 1..11"),
    (["--test-fraction", "0"], "--test-fraction 0.0 must lie in (0, 1]"),
])
def test_audit_errors_name_the_audit_flags(shapes, tmp_path, capsys, flags, said):
    images, masks = shapes
    assert _audit(images, masks, tmp_path, *flags) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and said in err, err
    assert "n_backgrounds" not in err and "test_fraction" not in err


def test_a_symbolic_link_loop_in_the_image_folder_is_one_short_line(shapes, tmp_path, capsys):
    import shutil

    images, masks = shapes
    looped = tmp_path / "images"
    shutil.copytree(images, looped)
    cls = sorted(p.name for p in looped.iterdir())[0]
    (looped / cls / "again").symlink_to("..", target_is_directory=True)
    assert _audit(looped, masks, tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"probekit: error: '{cls}/again' in {str(looped)!r} is a symbolic link to a folder above it "
                   "(a loop); remove the link or point it elsewhere.")


def test_missing_opencv_names_the_images_extra(shapes, tmp_path, capsys, monkeypatch):
    images, _ = shapes
    monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` raises ImportError
    assert main(["audit", "probekit.experiments.shortcut:ShapesCNN", "--data", str(images), "--foreground", "auto",
                 "--out-dir", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'probekit-audit[images]'" in err and "--masks or --boxes" in err
    assert "masks=" not in err


# -- help ---------------------------------------------------------------------------------------------------
def _verbs() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("verb", sorted(_verbs()))
def test_every_option_with_a_default_shows_it_in_help(verb, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # one line per option
    parser = _verbs()[verb]
    text = parser.format_help()
    blocks = re.split(r"\n(?=  -)", text.split("options:", 1)[1])
    for action in parser._actions:
        default = action.default
        if (not action.option_strings or action.help == argparse.SUPPRESS or default is None or default is False
                or default == [] or default == argparse.SUPPRESS):
            continue
        block = next(b for b in blocks if b.strip().startswith(action.option_strings[0]))
        assert "default" in block and str(default) in block, (verb, action.option_strings, block)


def test_test_fraction_shows_its_default():
    assert re.search(r"--test-fraction.*\(default: 0\.5\)", _verbs()["audit"].format_help(), flags=re.S)


def test_help_says_which_verb_takes_a_store_and_which_images():
    top = " ".join(build_parser().format_help().split())
    assert "audit MODEL + a folder of your images -> verdict, store, JSON and report (one command; for a store " \
           "you extracted yourself, use analyze)" in top
    assert "analyze a store you extracted -> every analysis it allows, the verdict, JSON (for a model and a " \
           "folder of images, use audit)" in top


# -- skipped analyses after `probekit audit` ------------------------------------------------------------------
SKIPPED = [
    *({"analysis": "probe", "model": "m", "layer": f"l{k}", "reason": "no OOD split was named (test_ood), so "
       "there is no ID/OOD gap to measure"} for k in range(4)),
    *({"analysis": a, "model": "m", "layer": f"l{k}", "reason": "no split with background factors"}
      for a in ("decodability", "correlation") for k in range(4)),
    *({"analysis": "nms", "model": "m", "layer": f"l{k}", "reason": "no OOD split was named (test_ood): no "
       "second background family"} for k in range(4)),
    {"analysis": "teacher-student", "reason": "needs one model with role 'teacher' and one with role 'student'"},
    {"analysis": "mystery", "model": "m", "reason": "something unforeseen"},
]


def _summary(audit_args) -> str:
    import io
    from contextlib import redirect_stdout

    from probekit.cli import _print_summary

    buf = io.StringIO()
    with redirect_stdout(buf):
        _print_summary({"models": {}, "skipped": SKIPPED}, audit_args=audit_args)
    return buf.getvalue()


def test_audit_lists_only_the_skips_a_user_can_act_on():
    text = _summary(argparse.Namespace(factors=None, teacher=None))
    assert text.strip().splitlines() == [
        "18 analyses skipped (audit.json lists each with its reason); these would run with more input:",
        "  decodability (m.l0, m.l1, m.l2 and 1 more): give --factors CSV (per-image background factors)",
        "  correlation (m.l0, m.l1, m.l2 and 1 more): give --factors CSV (per-image background factors)",
        "  teacher-student (store): give --teacher MODEL (with --teacher-weights FILE) to audit the model as its "
        "student",
        "  mystery (m): something unforeseen",  # a skip the command line does not know is shown as it is
    ]
    # given --factors, the skip is no longer the user's to fix: its own reason is shown
    with_factors = _summary(argparse.Namespace(factors="f.csv", teacher=None))
    assert "decodability (m.l0, m.l1, m.l2 and 1 more): no split with background factors" in with_factors


def test_analyze_lists_every_skip_but_those_its_mode_never_runs():
    text = _summary(None)
    assert text.strip().splitlines()[0] == "18 analyses skipped (the JSON lists each with its reason):"
    assert "no OOD split was named" in text
    from contextlib import redirect_stdout
    from io import StringIO

    from probekit.cli import _print_summary

    buf = StringIO()
    never = [{"analysis": "crossed decomposition", "model": "m", "layer": "@output", "actionable": False,
              "reason": "the model's output is judged by its behaviour, not decomposed"}]
    with redirect_stdout(buf):
        _print_summary({"models": {}, "skipped": never})
    assert buf.getvalue().strip() == "1 analyses skipped; none that more input would run."


# -- one meaning per flag -------------------------------------------------------------------------------------
@pytest.mark.parametrize("verb", ["audit", "demo", "experiment"])
def test_old_out_spelling_of_folder_verbs_still_works_with_a_note(verb, capsys):
    head = {"audit": ["audit", "m:f", "--data", "d"], "demo": ["demo"], "experiment": ["experiment", "shortcut"]}
    args = build_parser().parse_args([*head[verb], "-o", "there"])
    assert args.out == "there"
    err = capsys.readouterr().err.strip()
    assert err == ("probekit: FutureWarning: `-o DIR` is now `--out-dir DIR` (-o names a file in every verb); "
                   "the old spelling goes in the next release.")
    assert build_parser().parse_args([*head[verb], "--out-dir", "there"]).out == "there"
    assert capsys.readouterr().err == ""


class _FakeAudit:
    def __init__(self):
        self.data = {"models": {}, "schema": "probekit.audit"}

    def to_json(self, path):
        Path(path).write_text(json.dumps(self.data))

    def check(self, thresholds):
        return []


@pytest.mark.parametrize("argv, wrote, printed, note", [
    (["analyze", "S.h5", "-o", "r.json"], True, False, None),
    (["analyze", "S.h5", "--json"], False, True, None),
    (["analyze", "--json", "S.h5"], False, True, None),
    (["analyze", "S.h5", "--json", "r.json"], True, False, "`analyze --json FILE` is now `analyze -o FILE`"),
    (["analyze", "--json", "r.json", "S.h5"], True, False, "`analyze --json FILE` is now `analyze -o FILE`"),
    (["analyze", "S.h5", "--json", "-"], False, True, "`analyze --json -` is now `analyze --json`"),
])
def test_analyze_json_is_a_switch_and_o_the_file(monkeypatch, tmp_path, capsys, argv, wrote, printed, note):
    monkeypatch.chdir(tmp_path)
    seen = {}
    monkeypatch.setattr("probekit.cli._audit", lambda args: seen.setdefault("store", args.store) and _FakeAudit())
    assert main(argv) == 0
    assert seen["store"] == "S.h5"
    assert (tmp_path / "r.json").exists() == wrote
    out, err = capsys.readouterr()
    assert out.startswith('{\n "models"') == printed
    assert (note in err) if note else "FutureWarning" not in err
