"""Segmentation from patch features (plateflow/segment/, flows/segment.py): real patch tokens from
a tiny random-weight ViT whose tokens see the pixels, a real head trained on plates whose parts
are known, masks stitched at full resolution and scored against the truth."""

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flows.refresh import refresh_corpus
from flows.segment import patch_features, predict_segmentation, train_segmentation
from plateflow.config import RefreshConfig
from plateflow.experiments import experiments
from plateflow.layout import SEGMENTATION_OVERLAY, CorpusLayout
from plateflow.segment.patches import PatchParams
from plateflow.segment.train import SegConfig, confusion, iou_scores
from plateflow.split import split_of

from fixtures import DEVICE
from fixtures.plates import make_plate
from fixtures.segmentation import CLASSES, save_mask, segmented_plate

MODEL = "tiny_seg"  # 8 x 8 tokens a patch (tests/fixtures/tiny_models.py)
PARAMS = PatchParams(patch_size=64, overlap=16)
PLATES = 32


def segmented_corpus(root: Path, masks: Path) -> dict[str, np.ndarray]:
    masks.mkdir(parents=True)
    (masks / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    truth = {}
    for i in range(PLATES):
        folder = f"plate-{i + 1:03d}"
        image, mask = segmented_plate(i)
        make_plate(root, folder, image, quality=92)
        save_mask(masks / f"{folder}.png", mask)
        truth[folder] = mask
    return truth


@pytest.fixture(scope="module")
def segmented(tmp_path_factory, tiny_models, prefect_harness):
    """A corpus of plates whose parts are known, through patch-features (checked: an unchanged
    corpus costs nothing, a changed plate redoes only its own patches) and train-segmentation:
    and predict-segmentation: (root, the true masks, the experiment id, its ledger row)."""
    profiles, weights = tiny_models
    tmp_path = tmp_path_factory.mktemp("segmented")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PLATEFLOW_PROFILES", str(profiles))
        env.setenv("PLATEFLOW_WEIGHTS", str(weights))
        env.delenv("PLATEFLOW_GPU_CLASS", raising=False)
        root, masks = tmp_path / "corpus", tmp_path / "masks"
        truth = segmented_corpus(root, masks)
        assert np.asarray(Image.open(masks / "plate-001.png")).max() == 255  # unlabelled seams survive saving
        state = refresh_corpus(str(root), RefreshConfig(), return_state=True)  # previews and plates.parquet
        assert state.is_completed(), state.message

        state = patch_features(str(root), MODEL, PARAMS, return_state=True)
        assert state.is_completed(), state.message
        corpus = CorpusLayout(root)
        index = pq.read_table(corpus.patch_index(MODEL)).to_pylist()
        assert len(index) == PLATES * 88  # 512 x 384 in windows of 64 every 48 pixels: 11 x 8
        first = [r for r in index if r["plate_dir"] == "plate-001"]
        assert [r["box"] for r in first[:2]] == [[0, 0, 64, 64], [48, 0, 112, 64]] and first[-1]["box"] == [448, 320, 512, 384]
        tokens = np.load(root / first[0]["tokens_file"], mmap_mode="r")
        assert tokens.dtype == np.float16 and tokens.shape == (88, 64, 32)

        # An unchanged corpus costs nothing; a changed plate redoes only its own patches.
        stored = {p: p.stat().st_mtime_ns for p in corpus.patch_store(MODEL).glob("*.npy")}
        index_bytes = corpus.patch_index(MODEL).read_bytes()
        state = patch_features(str(root), MODEL, PARAMS, return_state=True)
        assert state.is_completed() and "(unchanged)" in state.message
        assert {p: p.stat().st_mtime_ns for p in corpus.patch_store(MODEL).glob("*.npy")} == stored
        assert corpus.patch_index(MODEL).read_bytes() == index_bytes
        image, mask = segmented_plate(100)
        make_plate(root, "plate-002", image, quality=92)
        save_mask(masks / "plate-002.png", mask)
        truth["plate-002"] = mask
        assert patch_features(str(root), MODEL, PARAMS, return_state=True).is_completed()
        now = {p: p.stat().st_mtime_ns for p in corpus.patch_store(MODEL).glob("*.npy")}
        assert len(set(now) - set(stored)) == 1 and all(now[p] == t for p, t in stored.items() if p in now)

        # A head trained on the labelled plates' tokens, scored on the held-out ones.
        state = train_segmentation(str(root), MODEL, str(masks), PARAMS, SegConfig(head="conv", epochs=25),
                                   return_state=True)
        assert state.is_completed(), state.message
        experiment = state.result()
        row = experiments(root, experiment)[0]
        assert row["feature_kind"] == "patches" and row["classes"] == CLASSES and row["test_size"] >= 3
        assert row["device"] == DEVICE  # trained where the GPU step runs
        assert row["miou"] >= 0.8, row["per_class"]
        assert (root / row["checkpoint"]).is_file() and (root / row["confusion_png"]).is_file()

        state = predict_segmentation(str(root), experiment, return_state=True)
        assert state.is_completed(), state.message
        yield root, truth, experiment, row


def test_patches_masks_from_a_few_labelled_plates_and_stitched_predictions(segmented, tiny_env):
    root, truth, experiment, row = segmented
    corpus = CorpusLayout(root)
    table = {r["plate_dir"]: r for r in pq.read_table(corpus.table).to_pylist()}
    sha = {r["plate_dir"]: r["sha256"] for r in pq.read_table(corpus.patch_index(MODEL)).to_pylist()}
    matrix = np.zeros((len(CLASSES), len(CLASSES)), np.int64)
    test = set()
    for folder, mask in truth.items():
        path = corpus.plate(folder).segmentation(experiment)
        with Image.open(path) as im:
            assert im.mode == "P" and im.size == (512, 384)
            predicted = np.asarray(im)
        assert predicted.max() < len(CLASSES)
        shares = [table[folder][f"seg_{c}"] for c in CLASSES]
        assert np.isclose(sum(shares), 1, atol=1e-4)
        assert np.allclose(shares, np.bincount(predicted.ravel(), minlength=4) / predicted.size, atol=1e-4)
        assert corpus.plate(folder).viz(SEGMENTATION_OVERLAY).is_file()
        if split_of(sha[folder], test_fraction=0.25) == "test":
            test.add(folder)
            matrix += confusion(mask.ravel(), predicted.ravel().astype(np.int64), len(CLASSES))
    assert len(truth) >= 20 and len(test) == row["test_size"]
    scores = iou_scores(matrix)
    assert scores["miou"] >= 0.8 and abs(scores["miou"] - row["miou"]) < 1e-6


@pytest.mark.browser
def test_the_masks_are_on_the_plates_report_pages(segmented, tiny_env):
    root, truth, experiment, row = segmented
    corpus = CorpusLayout(root)
    import shutil

    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium")
        tab = browser.new_page()
        errors = []
        tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        tab.goto((corpus.reports / "plate.html").as_uri() + "#0/plate-003")
        tab.wait_for_selector("img.overlay")
        text = tab.text_content("#plate")
        overlay = tab.eval_on_selector("img.overlay", "i => [i.complete, i.naturalWidth]")
        mask_link = tab.get_attribute("a[href$='.png']:text('full-resolution mask')", "href")
        browser.close()
    assert "Segmentation" in text and f"Experiment {experiment}" in text and "picture" in text
    assert overlay[0] and overlay[1] > 0 and mask_link.endswith(f"/segmentation/{experiment}.png")
    assert errors == []


def test_the_smart_crop_follows_a_plates_mask(segmented, tiny_env):
    root, truth, experiment, row = segmented
    corpus = CorpusLayout(root)
    # The smart crop follows the mask: a refresh asked to crop to the picture crops every plate
    # to its picture; a plate without a mask keeps the similarity crop.
    import json

    from plateflow.config import CropParams

    state = refresh_corpus(str(root), RefreshConfig(models=[MODEL], gpu_class="CPU",
                                                    crop=CropParams(mask_class="picture")), return_state=True)
    assert state.is_completed(), state.message
    overlaps = []
    for folder, mask in truth.items():
        rows, cols = np.nonzero(mask == 1)
        truth_box = [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
        table = {r["plate_dir"]: r for r in pq.read_table(corpus.table).to_pylist()}
        run = corpus.plate(folder).run(table[folder]["run_id"])
        chosen = json.loads((run / "smart_crop.json").read_text())
        assert chosen["chosen_by"] == "picture region of the plate's mask" and chosen["best_crop_idx"] is None
        assert table[folder]["crop_box"] == chosen["crop_box"]
        x0, y0, x1, y1 = chosen["crop_box"]
        with Image.open(run / "best_crop.jpg") as im:
            assert im.size == (x1 - x0, y1 - y0)
        inter = max(0, min(x1, truth_box[2]) - max(x0, truth_box[0])) * max(0, min(y1, truth_box[3]) - max(y0, truth_box[1]))
        overlaps.append(inter / ((x1 - x0) * (y1 - y0) + np.prod(np.subtract(truth_box[2:], truth_box[:2])) - inter))
    assert np.median(overlaps) >= 0.85 and min(overlaps) >= 0.75, sorted(np.round(overlaps, 3))
    corpus.plate("plate-001").segmentation(experiment).unlink()
    state = refresh_corpus(str(root), RefreshConfig(models=[MODEL], gpu_class="CPU",
                                                    crop=CropParams(mask_class="picture")), return_state=True)
    assert state.is_completed(), state.message
    table = {r["plate_dir"]: r for r in pq.read_table(corpus.table).to_pylist()}
    chosen = json.loads((corpus.plate("plate-001").run(table["plate-001"]["run_id"]) / "smart_crop.json").read_text())
    assert chosen["chosen_by"] == "similarity" and chosen["best_crop_idx"] is not None
    chosen = json.loads((corpus.plate("plate-003").run(table["plate-003"]["run_id"]) / "smart_crop.json").read_text())
    assert chosen["chosen_by"] == "picture region of the plate's mask"
