"""The surfaces corpus: deterministic, tight boxes inside the frames, every class, grey, empty and non-square frames."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from detect.data.coco import Layout, load_coco
from detect.data.surfaces import SurfaceRecipe, corpus_summary, generate_surfaces, render_frame
from detect.data.surfaces_defects import BOX_ALPHA, DRAWERS, SURFACE_CLASSES
from detect.data.surfaces_sheet import contact_sheet
from detect.data.surfaces_textures import FAMILIES
from edge_runtime.errors import ConfigError, UserInputError

SMALL = SurfaceRecipe(count=24, seed=7, image_format="png", gray_fraction=0.3,
                      frame_sizes=((96, 96), (128, 96), (96, 144), (160, 120)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("surfaces")
    spec = generate_surfaces(out, SMALL, line="surf", image_size=96, progress=False)
    return out, spec


def test_same_seed_same_bytes_other_seed_other_images(corpus, tmp_path):
    out, _ = corpus
    again = tmp_path / "again"
    generate_surfaces(again, SMALL, line="surf", image_size=96, progress=False)
    for name in ("all.json", "train.json", "val.json"):
        assert (Layout(again).annotations / name).read_bytes() == (Layout(out).annotations / name).read_bytes()
    for f in sorted(Layout(out).images.iterdir()):
        assert (Layout(again).images / f.name).read_bytes() == f.read_bytes(), f.name
    other = render_frame(np.random.default_rng([8, 1, 0]), SMALL, ["crack"]).image
    first = cv2.imread(str(Layout(out).images / "surf_00000.png"))
    assert other.shape != first.shape or not np.array_equal(other, first)


def test_boxes_inside_frames_every_class_grey_empty_and_non_square(corpus):
    out, spec = corpus
    coco = load_coco(Layout(out).all)
    size = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        iw, ih = size[a["image_id"]]
        assert x >= 0 and y >= 0 and x + w <= iw and y + h <= ih and min(w, h) >= 2, a
    summary = corpus_summary(out)
    assert set(summary["boxes"]) == set(SURFACE_CLASSES)
    assert 0 < summary["empty"] < summary["frames"] and summary["gray"] > 0 and summary["parts"] > 0
    assert any(w != h for w, h in size.values()) and any(h > w for w, h in size.values())  # tall frames too
    frames = json.loads((out / "surfaces.json").read_text())["frames"]
    for f in frames:
        img = cv2.imread(str(Layout(out).images / f["file_name"]))
        grey = bool((img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all())
        assert grey == f["gray"], f["file_name"]
        assert img.shape[:2] == (f["height"], f["width"])
    assert list(spec.classes) == list(SURFACE_CLASSES) and spec.source.is_file()


@pytest.mark.parametrize("name", SURFACE_CLASSES)
def test_each_defect_changes_pixels_only_under_its_footprint_and_its_box_is_tight(name):
    """Pixels outside the footprint stay as they were; every side of the box touches a footprint pixel."""
    rng = np.random.default_rng(3)
    h, w = 240, 320
    for i in range(5):
        mark = DRAWERS[name](np.random.default_rng([3, i]), h, w, 0.7)
        assert mark is not None
        img = rng.random((h, w, 3)).astype(np.float32)
        before = img.copy()
        mark.apply(img, rng.random((h, w, 3)).astype(np.float32))
        ph, pw = mark.alpha.shape
        support = np.zeros((h, w), bool)
        support[mark.y:mark.y + ph, mark.x:mark.x + pw] = mark.alpha > 0
        changed = np.abs(img - before).max(axis=2) > 1e-6
        assert not (changed & ~support).any()
        x0, y0, x1, y1 = mark.box()
        strong = np.zeros((h, w), bool)
        strong[mark.y:mark.y + ph, mark.x:mark.x + pw] = mark.alpha >= BOX_ALPHA * mark.alpha.max()
        ys, xs = np.nonzero(strong)
        assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_at_least_eight_material_families_render_in_range():
    assert len(FAMILIES) >= 8
    for name, make in FAMILIES.items():
        tex = make(np.random.default_rng(1), 48, 80)
        assert tex.shape == (48, 80, 3) and 0.0 <= tex.min() and tex.max() <= 1.0, name
        assert tex.std() > 0.005, f"{name} is flat"


def test_contact_sheet_draws_the_corpus(corpus, tmp_path):
    out, _ = corpus
    png = contact_sheet(out, tmp_path / "sheet.png", n=16, cols=8, side=64)
    sheet = cv2.imread(str(png))
    assert sheet.shape == (22 + 2 * (64 + 16), 8 * 64, 3)


def test_bad_recipe_and_foreign_files_are_refused_with_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="gray_fraction must be in"):
        generate_surfaces(tmp_path / "a", SurfaceRecipe(count=4, gray_fraction=1.5), progress=False)
    (tmp_path / "b" / "images").mkdir(parents=True)
    (tmp_path / "b" / "images" / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(UserInputError, match="holiday.jpg.*empty or new folder"):
        generate_surfaces(tmp_path / "b", SurfaceRecipe(count=4), progress=False)
