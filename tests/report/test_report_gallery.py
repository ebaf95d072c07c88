"""The gallery of what was audited: the objects the model changes its mind on most come first, every
prediction that differs from the original's is marked, thumbnails stay small (a 1,000-image audit's report
stays under 3 MB), and the thumbnails neither overlap nor overflow at 1,200 px in Chromium."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from probekit.datasets import Counterfactuals
from probekit.errors import DataError
from probekit.report import build_gallery, render_html, write_report


def _folder(root, classes=3, per_class=10, size=32, seed=0, noise=False):
    rng = np.random.default_rng(seed)
    for c in range(classes):
        for d in ("images", "masks"):
            (root / d / f"class{c:02d}").mkdir(parents=True)
        for k in range(per_class):
            if noise:  # the worst case for compression
                img = rng.integers(0, 256, (size, size, 3)).astype(np.uint8)
            else:
                img = np.full((size, size, 3), rng.integers(0, 256, 3), dtype=np.uint8)
            mask = np.zeros((size, size), dtype=np.uint8)
            mask[size // 4:3 * size // 4, size // 4:3 * size // 4] = 255
            img[mask > 0] = (255, 255, 255)
            Image.fromarray(img).save(root / "images" / f"class{c:02d}" / f"{k:03d}.png")
            Image.fromarray(mask).save(root / "masks" / f"class{c:02d}" / f"{k:03d}.png")
    return root / "images", root / "masks"


def _doc():
    return {"schema": "probekit.audit", "schema_version": 3, "store": "acts.h5", "models": {"m": {
        "role": "model", "flagged": False, "findings": [], "verdict": "m is not flagged.", "verdict_reason": None,
        "judged": {"shortcut": True, "background_sensitive": True, "representation": False}, "layers": {}}},
        "verdict": [], "skipped": []}


@pytest.fixture(scope="module")
def cf(tmp_path_factory):
    images, masks = _folder(tmp_path_factory.mktemp("gal"))
    return Counterfactuals(images, masks=masks, seed=0, n_backgrounds=4)


def _planted(cf, changes):
    """Predictions: every item the object's class, but object i wrong on its first ``changes[i]`` backgrounds."""
    labels = cf.folder.labels
    V, B = len(cf.variants), len(cf.backgrounds)
    pv = np.repeat(labels[cf.test_indices], V)
    ps = np.repeat(labels[cf.crossed_indices], B).reshape(-1, B)
    for pos, i in enumerate(cf.crossed_indices):
        k = changes.get(int(i), 0)
        ps[pos, :k] = (labels[i] + 1) % cf.num_classes
    return {"variants": pv, "crossed": ps.reshape(-1)}


def test_most_changed_objects_first_and_changes_marked(cf):
    objs = [int(i) for i in cf.crossed_indices]
    by_class = {}
    for i in objs:
        by_class.setdefault(int(cf.folder.labels[i]), []).append(i)
    planted = {by_class[0][0]: 1, by_class[0][1]: 3, by_class[0][2]: 2, by_class[1][0]: 4}
    g = build_gallery(cf, _planted(cf, planted), model="m", per_class=2)
    shown = [o["image"] for o in g["objects"]]
    assert shown[:2] == [by_class[0][1], by_class[0][2]]  # class 0: 3 changes, then 2
    assert shown[2] == by_class[1][0]
    assert len(shown) == 6 and g["n_objects"] == len(set(objs) | set(int(i) for i in cf.test_indices))
    for o in g["objects"]:
        assert o["changes"] == planted.get(o["image"], 0)
        assert sum(c["changed"] for c in o["backgrounds"]) == planted.get(o["image"], 0)
        assert not any(c["changed"] for c in o["cells"])  # every variant predicted as the original
        assert [c["name"] for c in o["cells"]] == g["columns"]
    html = render_html(_doc(), gallery=g)
    assert html.count('class="changed"') == sum(planted.get(i, 0) for i in shown)
    assert 'id="gallery"' in html and "What was audited" in html


def test_at_most_max_objects_and_thumbnails_decode_small(cf):
    g = build_gallery(cf, _planted(cf, {}), per_class=5, max_objects=4, thumb=40)
    assert g["n_shown"] == 4
    cell = g["objects"][0]["cells"][0]
    kind, data = re.match(r"data:image/(jpeg|png);base64,(.*)", cell["src"]).groups()
    img = Image.open(io.BytesIO(base64.b64decode(data)))
    assert img.format.lower() == kind and max(img.size) == 40 and (cell["width"], cell["height"]) == img.size


def test_mask_outline_is_drawn_on_the_masks_edge(cf):
    g = build_gallery(cf, _planted(cf, {}), per_class=1, thumb=32)
    mask_cell = g["objects"][0]["cells"][1]
    assert mask_cell["name"] == "mask"
    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(mask_cell["src"].split(",", 1)[1]))).convert("RGB"))
    magenta = (img[..., 0] > 200) & (img[..., 1] < 60) & (img[..., 2] > 200)
    # the mask is the square [8, 24) of a 32 px image: its edge, and nothing inside or far outside
    assert magenta[8, 8:24].all() and magenta[23, 8:24].all() and magenta[8:24, 8].all()
    assert not magenta[12:20, 12:20].any() and not magenta[:6].any()


def test_originals_predictions_are_the_reference_without_variants(cf):
    labels = cf.folder.labels
    B = len(cf.backgrounds)
    crossed = np.repeat(labels[cf.crossed_indices], B)  # right on every background
    test = (labels[cf.test_indices] + 1) % cf.num_classes  # wrong on every original
    g = build_gallery(cf, {"crossed": crossed, "test": test}, per_class=1)
    for o in g["objects"]:
        assert [c["name"] for c in o["cells"]] == ["original", "mask"]
        assert o["cells"][0]["pred"] != o["label"]
        assert o["changes"] == B and all(c["changed"] for c in o["backgrounds"])


def test_prediction_names_and_no_folder_class(cf):
    labels = cf.folder.labels
    B = len(cf.backgrounds)
    crossed = np.repeat(labels[cf.crossed_indices], B).reshape(-1, B)
    crossed[:, 0] = -1  # an output the class map does not name
    g = build_gallery(cf, {"crossed": crossed.reshape(-1)}, per_class=1)
    assert all(o["backgrounds"][0]["pred"] == "no folder class" and o["backgrounds"][0]["changed"]
               for o in g["objects"])
    g = build_gallery(cf, {"crossed": np.full(len(cf.split("crossed")), 2)}, per_class=1,
                      prediction_names=["cat", "dog", "tench"])
    assert {c["pred"] for o in g["objects"] for c in o["backgrounds"]} == {"tench"}
    assert all(o["label"].startswith("class") for o in g["objects"])  # the objects keep the folder's names


def test_the_old_key_stress_gives_the_same_gallery_with_one_warning(cf):
    """``{"stress": ...}`` (the crossed split's name in earlier releases) is read as ``"crossed"``."""
    import warnings

    preds = _planted(cf, {int(cf.crossed_indices[0]): 2})
    want = build_gallery(cf, preds, per_class=1)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        got = build_gallery(cf, {"variants": preds["variants"], "stress": preds["crossed"]}, per_class=1)
    assert [str(w.message) for w in rec if issubclass(w.category, FutureWarning)] == [
        "build_gallery: the predictions' key 'stress' is now 'crossed' (the crossed split's one name); the old key "
        "goes in the next release."]
    assert got == want and any(o["changes"] for o in got["objects"])


def test_wrong_number_of_predictions_is_refused(cf):
    with pytest.raises(DataError, match="predictions for the 'crossed' split"):
        build_gallery(cf, {"crossed": np.zeros(3, dtype=int)})
    with pytest.raises(DataError, match="needs the model's predictions"):
        build_gallery(cf, {})


@pytest.mark.slow
def test_report_of_a_thousand_image_audit_stays_small(tmp_path):
    images, masks = _folder(tmp_path, classes=10, per_class=100, size=96, noise=True)
    big = Counterfactuals(images, masks=masks)
    rng = np.random.default_rng(0)
    preds = {sp: rng.integers(0, 10, len(big.split(sp))) for sp in ("variants", "crossed")}
    g = build_gallery(big, preds, model="m")
    out = write_report(_doc(), tmp_path / "report.html", gallery=g)
    assert g["n_shown"] == 20 and g["n_objects"] == 500
    assert out.stat().st_size < 3_000_000, out.stat().st_size
    assert len(json.dumps(g)) < 2_500_000


LAYOUT_JS = """<script>
window.addEventListener('load', () => {
  const W = document.documentElement.clientWidth;
  const t = [...document.querySelectorAll('figure.thumb')].map(e => e.getBoundingClientRect());
  let overlaps = 0, outside = 0;
  for (let i = 0; i < t.length; i++) {
    if (t[i].right > W) outside++;
    for (let j = i + 1; j < t.length; j++) {
      const a = t[i], b = t[j];
      if (a.left < b.right - 1 && b.left < a.right - 1 && a.top < b.bottom - 1 && b.top < a.bottom - 1) overlaps++;
    }
  }
  const caps = [...document.querySelectorAll('figure.thumb figcaption')].filter(e => e.scrollWidth > e.clientWidth + 1);
  const pre = document.createElement('pre'); pre.id = 'layout';
  pre.textContent = JSON.stringify({n: t.length, overlaps, outside, cut: caps.length,
                                    page: document.documentElement.scrollWidth - W});
  document.body.appendChild(pre);
});
</script>"""


def test_gallery_layout_in_chromium(cf, tmp_path, browser):
    g = build_gallery(cf, _planted(cf, {}), model="a-model-with-a-long-name" * 3)
    path = tmp_path / "gallery.html"
    path.write_text(render_html(_doc(), gallery=g).replace("</body>", LAYOUT_JS + "</body>"), encoding="utf-8")
    _png, dom, errors = browser(path, width=1200, height=2400)
    assert errors == []
    m = re.search(r'<pre id="layout">(.*?)</pre>', dom, flags=re.S)
    out = json.loads(m.group(1).replace("&quot;", '"'))
    assert out["n"] == sum(len(o["cells"]) + len(o["backgrounds"]) for o in g["objects"])
    assert out == {**out, "overlaps": 0, "outside": 0, "cut": 0}
    assert out["page"] <= 0
