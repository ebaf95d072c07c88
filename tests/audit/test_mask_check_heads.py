"""The mask check reads a model's head as the audit does: one logit, or a class map of many outputs.

On a two-class shape folder whose backgrounds are red for circles and green for squares, two kinds of
planted models with the same heads:

- shortcuts, that read only the background's colour (the mean of G - R over the image's corners, far
  from the object): a complete shortcut by construction. The audit reads them as flagged; the mask
  check, which reruns them on the crossed split with eroded / dilated boxes, must read them the same way.
- their robust twins, that read only the object: the light grey shape's pixels (every channel above
  0.8; no background pixel of the generator comes near) and whether they fill the corners of their
  bounding box (a square does, a circle does not). Neither the audit nor the mask check may flag them, and the
  mask check's figures must be the audit's (no prediction changes, none follows the background). The
  class-map twin also lets the background pick which of its class's two outputs is highest (a
  fine-grained head), which the class map must hide.

Before the fix the mask check took the argmax of the raw output: always 0 for one logit (the shortcut
not flagged; the robust twin's predictions "follow" every red background), and output indices compared
with folder classes for a class map (the robust twin's circles read as the background's class: flagged).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from probekit.datasets import write_image_folder
from probekit.model_audit import audit_model


class _IdentityBody(torch.nn.Module):
    """A 1 x 1 convolution set to the identity, a hidden layer the audit can hook, and the head's width."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.body = torch.nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.body.weight.copy_(torch.eye(3)[:, :, None, None])
            self.body.bias.zero_()


class _CornerColour(_IdentityBody):
    """``s`` = mean over the 4x4 corners of G - R (> 0 on green backgrounds): one logit ``s``, or the four
    outputs ``(-s, -s - 1, s - 1, s)`` whose argmax is 3 where s > 0 and 0 where s < 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(x)
        c = torch.cat([x[:, :, :4, :4], x[:, :, :4, -4:], x[:, :, -4:, :4], x[:, :, -4:, -4:]], dim=2)
        s = (c[:, 1] - c[:, 0]).mean(dim=(1, 2)) * 10
        if self.width == 1:
            return s[:, None]
        return torch.stack([-s, -s - 1, s - 1, s], dim=1)


class _ObjectCorners(_IdentityBody):
    """Reads the object alone: ``c`` = the share of the 4 corners of the object's bounding box that are
    the object's pixels (every channel above 0.8), after a 3 x 3 opening that drops the thin rims of grey
    a background image's own object may leave: 1 for a square, 0 for a circle, with the box 1 px smaller
    or larger too. ``s = 10 (c - 0.5)``: one logit ``s``; or four outputs ``(-S - t, -S + t, S - t, S + t)``,
    ``S = 5 tanh(s)``, ``t = tanh`` of the corners' G - R, whose argmax is a circle's (0, 1) or a square's
    (2, 3) output, the background choosing which of the two (|S| > 1 > |t|)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(x)
        m = (x.amin(dim=1, keepdim=True) > 0.8).float()
        m = F.max_pool2d(-F.max_pool2d(-m, 3, 1, 1), 3, 1, 1)[:, 0]
        rows, cols = m.amax(dim=2), m.amax(dim=1)
        top, bottom = rows.argmax(dim=1), rows.shape[1] - 1 - rows.flip(1).argmax(dim=1)
        left, right = cols.argmax(dim=1), cols.shape[1] - 1 - cols.flip(1).argmax(dim=1)
        n = torch.arange(len(m))
        c = (m[n, top, left] + m[n, top, right] + m[n, bottom, left] + m[n, bottom, right]) / 4
        s = 10 * (c - 0.5)
        if self.width == 1:
            return s[:, None]
        k = torch.cat([x[:, :, :4, :4], x[:, :, :4, -4:], x[:, :, -4:, :4], x[:, :, -4:, -4:]], dim=2)
        S, t = 5 * torch.tanh(s), torch.tanh((k[:, 1] - k[:, 0]).mean(dim=(1, 2)) * 10)
        return torch.stack([-S - t, -S + t, S - t, S + t], dim=1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("two-shapes")
    images, masks = write_image_folder(d, split="test", background="class", n=36, size=32)
    for root in (images, masks):
        shutil.rmtree(root / "triangle")  # two classes: circle (red backgrounds), square (green)
    rows = []
    for p in sorted(images.rglob("*.png")):
        ys, xs = np.nonzero(np.asarray(Image.open(masks / p.relative_to(images))) > 0)
        rows.append(f"{p.relative_to(images).as_posix()},{xs.min()},{ys.min()},{xs.max() + 1},{ys.max() + 1}")
    boxes = d / "boxes.csv"
    boxes.write_text("path,x0,y0,x1,y1\n" + "\n".join(rows) + "\n")
    return images, boxes


@pytest.mark.parametrize("width,class_map", [(1, None), (4, {0: 0, 1: 0, 2: 1, 3: 1})],
                         ids=["one-logit", "class-map"])
def test_mask_check_reads_the_head_as_the_audit_does(folder, tmp_path, width, class_map):
    images, boxes = folder
    doc = audit_model(_CornerColour(width), images, boxes=boxes, out=tmp_path / "a", n_inits=0, n_backgrounds=4, layers=["body"],
                      mask_check=1, mean=[0, 0, 0], std=[1, 1, 1], image_size=32, n_boot=100, n_perm=20,
                      progress=False, workers=0, class_map=class_map, mask_check_objects="all").data
    b = doc["models"]["model"]["behaviour"]
    assert doc["models"]["model"]["flagged"] is True  # the audit's own reading: a complete shortcut
    assert b["flip_rate"]["value"] > 0.5
    checked = doc["mask_sensitivity"]["models"]["model"]
    assert set(checked) == {"eroded", "dilated"}
    for r in checked.values():  # the corners do not move with the boxes: the same reading, the same figures
        assert r["flagged"] is True
        assert r["flip_rate"] == pytest.approx(b["flip_rate"]["value"], abs=0.05)


@pytest.mark.parametrize("width,class_map", [(1, None), (4, {0: 0, 1: 0, 2: 1, 3: 1})],
                         ids=["one-logit", "class-map"])
def test_mask_check_reads_a_robust_head_as_the_audit_does(folder, tmp_path, width, class_map):
    images, boxes = folder
    doc = audit_model(_ObjectCorners(width), images, boxes=boxes, out=tmp_path / "a", n_inits=0, n_backgrounds=4,
                      layers=["body"], mask_check=1, mean=[0, 0, 0], std=[1, 1, 1], image_size=32, n_boot=100,
                      n_perm=20, progress=False, workers=0, class_map=class_map, mask_check_objects="all").data
    info = doc["models"]["model"]
    b = info["behaviour"]
    # the audit's own reading: the object's class on every background, so no shortcut
    assert info["flagged"] is False and "shortcut" not in info["findings"]
    assert b["accuracy"]["original"]["value"] == 1.0
    assert b["flip_rate"]["value"] == 0.0 and b["follows_background"]["value"] == 0.0
    checked = doc["mask_sensitivity"]["models"]["model"]
    assert set(checked) == {"eroded", "dilated"}
    for r in checked.values():  # the object's corners read the same with the box 1 px smaller or larger
        assert r["flagged"] is False
        assert r["flip_rate"] == pytest.approx(0.0, abs=0.05)
        assert r["follows_background"] == pytest.approx(0.0, abs=0.05)
        assert r["reliance"]["value"] == pytest.approx(b["reliance"]["value"], abs=0.05)
