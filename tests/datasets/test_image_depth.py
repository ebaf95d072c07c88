"""Images of other bit depths are read at their own scale (a 16-bit PNG was clipped almost white)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from probekit.datasets import ForegroundFolder


def test_sixteen_bit_png_keeps_its_contrast(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    for c in ("a", "b"):
        (tmp_path / "img" / c).mkdir(parents=True)
        (tmp_path / "mask" / c).mkdir(parents=True)
        Image.fromarray(ramp).save(tmp_path / "img" / c / "x.png")  # 16-bit grayscale PNG (mode I;16)
        m = np.zeros((48, 64), np.uint8)
        m[10:30, 10:40] = 255
        Image.fromarray(m).save(tmp_path / "mask" / c / "x.png")
        assert Image.open(tmp_path / "img" / c / "x.png").mode.startswith("I")
    folder = ForegroundFolder(tmp_path / "img", masks=tmp_path / "mask")
    arr = folder.image(0)
    assert arr.dtype == np.uint8 and arr.shape == (48, 64, 3)
    want = np.rint(ramp / 65535 * 255).astype(np.uint8)  # the ramp at 8 bits: 0 .. 255, not clipped
    np.testing.assert_array_equal(arr[:, :, 0], want)
    assert arr.min() == 0 and arr.max() == 255 and (arr > 250).mean() < 0.05
