"""probekit.testing.assert_no_background_shortcut and the README's pytest example, run as written on a tiny
generated folder: a model that reads the object passes, one that reads the background fails with its verdict."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from probekit.datasets import Counterfactuals
from probekit.report import build_gallery, predictions_from_store
from probekit.testing import assert_no_background_shortcut

README = Path(__file__).resolve().parents[2] / "README.md"
CLASSES = ("0_red", "1_green", "2_blue")  # folder order = colour channel order


def write_folder(root: Path, n_per_class: int = 12, size: int = 24, seed: int = 0) -> tuple[Path, Path]:
    """``images/<class>/<k>.png``: a square of the class's colour on a noisy background tinted the same way,
    with its mask: the background alone tells the class, and so does the object."""
    rng = np.random.default_rng(seed)
    eye = np.eye(3)
    for c, name in enumerate(CLASSES):
        (root / "images" / name).mkdir(parents=True)
        (root / "masks" / name).mkdir(parents=True)
        for k in range(n_per_class):
            img = 40 + 150 * eye[c] + rng.uniform(0, 40, (size, size, 3))
            s = int(rng.integers(8, 12))
            y0, x0 = (size - s) // 2 + rng.integers(-1, 2, 2)
            mask = np.zeros((size, size), dtype=np.uint8)
            mask[y0:y0 + s, x0:x0 + s] = 255
            img[mask > 0] = 255 * eye[c]
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / "images" / name / f"{k:02d}.png")
            Image.fromarray(mask).save(root / "masks" / name / f"{k:02d}.png")
    return root / "images", root / "masks"


class ColourNet(nn.Module):
    """Class scores = the mean colour of a patch: the centre (always the object) or a corner (always the
    background). The first cannot rely on the background; the second relies on nothing else."""

    def __init__(self, where: str = "centre") -> None:
        super().__init__()
        self.mix = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.mix.weight.copy_(10 * torch.eye(3).reshape(3, 3, 1, 1))
            self.mix.bias.zero_()
        self.where = where

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.mix(x)
        h, w = z.shape[-2:]
        patch = z[..., h // 2 - 2:h // 2 + 2, w // 2 - 2:w // 2 + 2] if self.where == "centre" else z[..., :3, :3]
        return patch.mean(dim=(2, 3))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("gate"))


def _readme_example() -> str:
    text = README.read_text()
    m = re.search(r"<!-- readme-pytest-example -->\n```py\n(.*?)```", text, flags=re.S)
    assert m, "README.md lost its pytest example (marked <!-- readme-pytest-example -->)"
    return m.group(1)


@pytest.mark.parametrize("where, passes", [("centre", True), ("corner", False)])
def test_readme_pytest_example_runs_as_written(folder, tmp_path, monkeypatch, where, passes):
    code = _readme_example()
    assert len(code.strip().splitlines()) <= 10
    data = tmp_path / "data"
    data.mkdir()
    (data / "images").symlink_to(folder[0])
    (data / "masks").symlink_to(folder[1])
    monkeypatch.chdir(tmp_path)
    pkg = types.ModuleType("my_pkg")
    pkg.build_model = lambda: ColourNet(where)
    monkeypatch.setitem(sys.modules, "my_pkg", pkg)
    ns: dict = {"__name__": "test_background"}
    exec(compile(code, "README.md", "exec"), ns)
    test = ns["test_model_does_not_read_the_background"]
    if passes:
        test()
    else:
        with pytest.raises(AssertionError, match=r"background's class.*report: .*report\.html"):
            test()


def test_passing_model_returns_the_document_and_leaves_no_temporary_folder(folder, tmp_path):
    doc = assert_no_background_shortcut(ColourNet("centre"), folder[0], masks=folder[1], out=tmp_path / "a")
    info = doc["models"]["model"]
    assert info["flagged"] is False
    assert info["behaviour"]["flip_rate"]["value"] == 0.0  # the centre never sees a background
    assert (tmp_path / "a" / "report.html").is_file()
    # the gallery reads the same predictions back from the store: the centre model never changes its mind
    preds = predictions_from_store(tmp_path / "a" / "acts.h5", "model")
    cf = Counterfactuals(folder[0], masks=folder[1])
    assert {k: len(v) for k, v in preds.items()} == {sp: len(cf.split(sp)) for sp in ("variants", "crossed")}
    mapped = predictions_from_store(tmp_path / "a" / "acts.h5", "model", class_map={0: 2, 1: 1})
    lut = np.array([2, 1, -1])  # output 2 is named by no entry: no folder class
    assert all((mapped[sp] == lut[preds[sp]]).all() for sp in preds)
    g = build_gallery(cf, preds)
    assert g["objects"] and all(o["changes"] == 0 for o in g["objects"] if o["changes"] is not None)


def test_shortcut_message_is_the_verdict_and_follows_the_background(folder, tmp_path):
    with pytest.raises(AssertionError) as e:
        assert_no_background_shortcut(ColourNet("corner"), folder[0], masks=folder[1], name="corner",
                                      out=tmp_path / "b")
    doc = __import__("json").loads((tmp_path / "b" / "audit.json").read_text())
    verdict = doc["models"]["corner"]["verdict"]
    assert str(e.value).startswith(verdict)
    # the corner is the background: the prediction is the background's class wherever it came from another one
    assert doc["models"]["corner"]["behaviour"]["follows_background"]["value"] == 1.0


def test_counterfactuals_are_accepted_with_their_own_seed(folder, tmp_path):
    cf = Counterfactuals(folder[0], masks=folder[1], seed=3, n_backgrounds=6)
    doc = assert_no_background_shortcut(ColourNet("centre"), cf, out=tmp_path / "c")
    assert doc["models"]["model"]["behaviour"]["n_backgrounds"] == 6
    with pytest.raises(ValueError, match="already hold their foreground"):
        assert_no_background_shortcut(ColourNet("centre"), cf, masks=folder[1])


def test_not_judged_fails_with_the_reason(folder, tmp_path, monkeypatch):
    """A model the audit could not judge fails the gate: its reason is in the message."""
    import probekit.model_audit as ma

    real = ma.audit_model

    def unjudged(*a, **k):
        result = real(*a, **k)
        info = result.data["models"][k.get("name", "model")]
        info.update({"flagged": None, "findings": [], "verdict": "model: no verdict.",
                     "judged": {"shortcut": False, "background_sensitive": False, "representation": False},
                     "verdict_reason": "only 2 objects: too few to judge"})
        return result

    monkeypatch.setattr(ma, "audit_model", unjudged)
    with pytest.raises(AssertionError, match=r"could not judge.*only 2 objects: too few to judge"):
        assert_no_background_shortcut(ColourNet("centre"), folder[0], masks=folder[1], out=tmp_path / "d")
