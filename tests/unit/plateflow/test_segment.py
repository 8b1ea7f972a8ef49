"""The parts of segmentation that need no model: the patch grid, curators' masks and their
errors, token targets, and stitching in strips into an indexed PNG (plateflow/segment/)."""

import io
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from plateflow.errors import ConfigError
from plateflow.segment.masks import IGNORE, fitted, mask_set, read_mask, token_targets
from plateflow.segment.patches import PatchParams, cut, windows
from plateflow.segment.stitch import IndexedPng, palette, stitch
from plateflow.segment.train import confusion, iou_scores


def test_windows_cover_the_plate_with_the_overlap_and_end_at_its_edges():
    params = PatchParams(patch_size=256, overlap=64)
    boxes = windows(1000, 700, params)
    xs = sorted({b[0] for b in boxes})
    ys = sorted({b[1] for b in boxes})
    assert xs == [0, 192, 384, 576, 744] and ys == [0, 192, 384, 444]
    assert all(b[2] - b[0] == 256 and b[3] - b[1] == 256 for b in boxes)
    assert boxes == sorted(boxes, key=lambda b: (b[1], b[0]))  # rows top to bottom
    assert windows(100, 80, params) == [(0, 0, 256, 256)]  # a small plate: one window past its edges
    with pytest.raises(ValueError, match="under half"):
        PatchParams(patch_size=128, overlap=64)


def test_a_window_past_the_edge_is_filled_with_the_edges_pixels():
    pixels = np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)
    out = cut(pixels, (20, 10, 36, 26))
    assert out.shape == (16, 16, 3)
    assert (out[:10, :10] == pixels[10:20, 20:30]).all() and (out[:, 15] == out[:, 9]).all()


def _png(tmp_path, name, array, mode="P"):
    path = tmp_path / f"{name}.png"
    im = Image.fromarray(array, mode)
    if mode == "P":
        im.putpalette([0] * 768)
    im.save(path)
    return path


def test_masks_are_matched_by_plate_id_or_folder_and_checked(tmp_path):
    m = np.zeros((30, 40), np.uint8)
    m[:, 20:] = 1
    m[0] = IGNORE
    _png(tmp_path, "BM.2001.34", m)  # by plate id
    _png(tmp_path, "plate-002", m)  # by folder
    _png(tmp_path, "nobody", m)
    found = mask_set(tmp_path, {"BM.2001.34": "plate-001", "p2": "plate-002", "p3": "plate-003"})
    assert set(found.files) == {"plate-001", "plate-002"} and found.classes == ["class_0", "class_1"]
    (tmp_path / "classes.txt").write_text("paper\npicture\n")
    assert mask_set(tmp_path, {"p2": "plate-002"}).classes == ["paper", "picture"]
    mask = read_mask(found.files["plate-001"])
    assert (mask == m).all()  # P: the indices, 255 kept
    assert fitted(mask, 400, 300, "x.png", 2) is mask  # drawn on a smaller copy: fine
    with pytest.raises(ConfigError, match="not the plate's shape"):
        fitted(mask, 400, 400, "x.png", 2)
    with pytest.raises(ConfigError, match="holds class 1; there are 1 classes"):
        fitted(mask, 40, 30, "x.png", 1)
    with pytest.raises(ConfigError, match="indexed"):
        read_mask(_png(tmp_path, "rgb", np.zeros((4, 4, 3), np.uint8), "RGB"))
    with pytest.raises(ConfigError, match="holds no"):
        mask_set(tmp_path, {"zz": "plate-zz"})
    with pytest.raises(ConfigError, match="not a folder"):
        mask_set(tmp_path / "missing", {})


def test_token_targets_take_the_class_under_each_tokens_centre():
    mask = np.zeros((100, 200), np.uint8)  # drawn at half the plate's size
    mask[:, 100:] = 1
    mask[:30] = IGNORE  # the top rows of the plate are unlabelled
    targets = token_targets(mask, (0, 0, 400, 400), (400, 200), grid=4)
    assert targets.shape == (4, 4)
    assert (targets[0] == IGNORE).all()  # unlabelled
    assert (targets[1, :2] == 0).all() and (targets[1, 2:] == 1).all()
    assert (targets[2:] == IGNORE).all()  # past the plate's bottom edge


def _stitched(boxes, size, probs_of, out_size, overlap):
    strips = []
    stitch(boxes, size, probs_of, out_size, overlap, strips.append)
    return np.concatenate(strips)


def test_stitching_follows_the_windows_and_blends_their_overlap():
    params = PatchParams(patch_size=64, overlap=16)
    size = (300, 200)
    boxes = windows(*size, params)

    def left_right(idx):  # each window says: class 1 right of x = 150, class 0 left of it
        out = np.zeros((len(idx), 2, 8, 8), np.float32)
        for k, i in enumerate(idx):
            x0, _, x1, _ = boxes[i]
            centres = x0 + (np.arange(8) + 0.5) * (x1 - x0) / 8
            out[k, 1] = (centres >= 150)[None, :]
            out[k, 0] = 1 - out[k, 1]
        return out

    mask = _stitched(boxes, size, left_right, size, params.overlap)
    assert mask.shape == (200, 300)
    columns = mask.mean(axis=0)
    assert (columns[:140] == 0).all() and (columns[160:] == 1).all()  # the edge within a token of x = 150
    half = _stitched(boxes, size, left_right, (150, 100), params.overlap)  # any output size
    assert half.shape == (100, 150) and (half[:, :70] == 0).all() and (half[:, 80:] == 1).all()


def test_a_60_megapixel_mask_is_stitched_in_strips_within_its_band(tmp_path):
    """The stitcher's only full-width buffer is a band one window tall: for 4 classes on a
    9,000 x 6,700 plate that is about 46 MB, and the whole stitch stays within three bands."""
    params = PatchParams()
    width, height, classes = 9000, 6700, 4
    boxes = windows(width, height, params)
    rng = np.random.default_rng(0)
    noise = rng.random((classes, 16, 16)).astype(np.float32)

    def probabilities(idx):
        out = np.repeat(noise[None] * 0.1, len(idx), axis=0)
        for k, i in enumerate(idx):
            out[k, (boxes[i][1] // 1000) % classes] += 1  # a class per 1000-pixel band of rows
        return out

    band = classes * (params.patch_size + 1) * width * 4 + (params.patch_size + 1) * width * 4
    path = tmp_path / "mask.png"
    counts = np.zeros(classes, np.int64)
    tracemalloc.start()
    try:
        with open(path, "wb") as fh:
            png = IndexedPng(fh, width, height, palette(classes))

            def emit(rows):
                counts[:] += np.bincount(rows.ravel(), minlength=classes)
                png.write(rows)

            stitch(boxes, (width, height), probabilities, (width, height), params.overlap, emit)
            png.close()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * band, f"{peak / 2**20:.0f} MB for a band of {band / 2**20:.0f} MB"
    assert counts.sum() == width * height
    with Image.open(path) as im:
        assert im.mode == "P" and im.size == (width, height)
        Image.MAX_IMAGE_PIXELS = None
        rows = np.asarray(im.crop((0, 0, width, 1400)))
    assert (rows[:1150] == 0).all() and (rows[1220:] == 1).all()  # windows from y = 1152 say class 1


def test_an_indexed_png_must_get_all_its_rows():
    buf = io.BytesIO()
    png = IndexedPng(buf, 10, 3, palette(2))
    png.write(np.ones((2, 10), np.uint8))
    with pytest.raises(ValueError, match="2 rows written"):
        png.close()


def test_iou_per_class_and_mean_over_the_classes_present():
    truth = np.array([0, 0, 1, 1, IGNORE, 2], np.uint8)
    predicted = np.array([0, 1, 1, 1, 0, 0], np.int64)
    scores = iou_scores(confusion(truth, predicted, 3))
    assert np.allclose(scores["iou"], [1 / 3, 2 / 3, 0]) and np.isclose(scores["miou"], 1 / 3)
    assert np.isclose(scores["accuracy"], 3 / 5)
