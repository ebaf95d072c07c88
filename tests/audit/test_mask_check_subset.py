"""The mask check on the objects near the decision (issue 22): which objects are rerun, and that the
answer is the full rerun's.

Oracles: hand-made predictions and margins (``near_decision``), scipy's softmax (``_softmax_margin``),
and the full rerun itself (``mask_check_objects="all"``) on planted models: one that answers the same
class with a huge margin whatever it sees (nothing is near, the sentinels do not move, nothing else is
rerun), a shortcut CNN (every object is near: all rerun) and a robust CNN whose confident objects do
move with a 3 px erosion of box masks on 32 px images (a sentinel moves: everything is rerun).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import expit, softmax
from torch import nn

from probekit.model_audit import (
    MASK_CHECK_SENTINELS_MIN,
    _mask_sensitivity,
    _object_order,
    _Progress,
    _softmax_margin,
    near_decision,
    sentinels,
)


def test_near_decision_by_hand():
    group = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    pred = np.array([1, 1, 0, 2, 1, 1, 0, 0])
    margin = np.array([0.9, 0.8, 0.9, 0.9, 0.9, 0.3, 0.7, 0.6])
    # object 1 answers differently across its backgrounds; object 2 has a margin of 0.3 on one of them
    assert near_decision(group, pred, margin, 0.5).tolist() == [1, 2]
    assert near_decision(group, pred, margin, 0.2).tolist() == [1]
    assert near_decision(group, pred, margin, 0.65).tolist() == [1, 2, 3]
    assert near_decision(group, pred, margin, 0.0).tolist() == [1]


def test_softmax_margin_against_scipy():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(20, 5)) * 3
    p = np.sort(softmax(z, axis=1), axis=1)
    assert _softmax_margin(z) == pytest.approx(p[:, -1] - p[:, -2])
    one = rng.normal(size=(7, 1))
    assert _softmax_margin(one) == pytest.approx(np.abs(expit(one[:, 0]) - (1 - expit(one[:, 0]))))


def test_sentinels_are_a_seeded_quarter_of_the_far_objects():
    far = np.arange(100, 160)  # 60 objects: a quarter is 15
    s = sentinels(far, seed=3)
    assert s.size == 15 and np.isin(s, far).all() and np.array_equal(s, sentinels(far, seed=3))
    assert not np.array_equal(s, sentinels(far, seed=4))
    assert sentinels(np.arange(20), 0).size == MASK_CHECK_SENTINELS_MIN
    assert sentinels(np.arange(5), 0).tolist() == [0, 1, 2, 3, 4]


class Constant(nn.Module):
    """Answers class 0 with a huge margin, whatever the image."""

    def forward(self, x):
        out = torch.zeros(len(x), 3)
        out[:, 0] = 20.0 + 0 * x.mean()
        return out


@pytest.mark.slow
def test_near_gives_the_full_reruns_answer(tmp_path):
    from PIL import Image

    from probekit.datasets import Counterfactuals
    from probekit.datasets._shapes import write_image_folder
    from probekit.experiments.shortcut import train_shapes_cnn
    from probekit.model_audit import _Rows

    images, masks = write_image_folder(tmp_path, split="test", background="class", n=60)
    rows = []
    for p in sorted(images.rglob("*.png")):
        m = np.asarray(Image.open(masks / p.relative_to(images))) > 0
        ys, xs = np.nonzero(m)
        rows.append(f"{p.relative_to(images).as_posix()},{xs.min()},{ys.min()},{xs.max() + 1},{ys.max() + 1}")
    csv = tmp_path / "boxes.csv"
    csv.write_text("path,x0,y0,x1,y1\n" + "\n".join(rows) + "\n")
    torch.manual_seed(0)
    models = {"constant": Constant(), "shortcut": train_shapes_cnn("class", seed=1, epochs=8, n_train=600),
              "robust": train_shapes_cnn("random", seed=1, epochs=8, n_train=600)}
    cf_kwargs = {"seed": 0, "n_backgrounds": 8, "test_fraction": 0.5, "transform": None}
    cf = Counterfactuals(images, boxes=csv, **cf_kwargs)
    crossed = cf.split("crossed")
    n_obj = len(cf.crossed_indices)
    order = _object_order(n_obj, 0)
    where = np.array([crossed.locate(i)[::2] for i in range(len(crossed))])
    passes = {}
    for name, net in models.items():
        net.eval()
        loader = torch.utils.data.DataLoader(_Rows(crossed, np.arange(len(crossed))), batch_size=64)
        with torch.no_grad():
            o = np.concatenate([net(b["x"]).numpy() for b in loader])
        stored = {name: {"group": where[:, 0], "background": where[:, 1], "pred": o.argmax(1),
                         "margin": _softmax_margin(o)}}
        near = near_decision(where[:, 0], o.argmax(1), _softmax_margin(o), 0.5)
        got = {}
        for mode in ("all", "near"):
            bar = _Progress(0, False, 64)
            got[mode] = _mask_sensitivity({name: net}, images, {"boxes": str(csv)}, cf_kwargs, order, n_obj, 3, 64,
                                          "cpu", 0, 100, 20, 0, bar, stored if mode == "near" else None,
                                          near if mode == "near" else None)
            passes[name, mode] = bar.done
        assert got["near"]["models"] == got["all"]["models"], name
    n_rows = n_obj * 8
    assert passes["constant", "all"] == 2 * n_rows
    # nothing near, 8 sentinels that do not move: only they are rerun
    assert passes["constant", "near"] == 2 * MASK_CHECK_SENTINELS_MIN * 8
    assert passes["shortcut", "near"] == 2 * n_rows  # every object answers with its background: all near
