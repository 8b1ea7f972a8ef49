"""A segmentation experiment applied to the corpus: each plate with patch tokens of the
experiment's model and patch parameters gets

- its full-resolution mask, ``<plate>/segmentation/<experiment>.png`` (indexed PNG, one class a
  palette entry), stitched and written in strips, never held whole;
- an overlay of the mask on its preview, ``viz/segmentation_overlay.png``;
- per-class area shares in plates.parquet, ``seg_<class>`` (and ``seg_experiment``).

The stitching's peak memory (NumPy's allocations, by tracemalloc) is measured per plate.
"""

from __future__ import annotations

import logging
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from plateflow import experiments as ledger
from plateflow.atomic import temp_file, write_bytes, write_json, write_parquet
from plateflow.devices import compute_device
from plateflow.errors import ConfigError
from plateflow.layout import PREVIEW, SEGMENTATION_OVERLAY, CorpusLayout, safe_key
from plateflow.segment.patches import load_tokens, stored_record
from plateflow.segment.stitch import IndexedPng, palette
from plateflow.segment.train import SegHead, stitch_plate
from plateflow.tables import read_corpus_table

OVERLAY_ALPHA = 0.45


def load_segmentation(root: Path, experiment_id: str) -> tuple[object, dict]:
    """The experiment's head and checkpoint; ``ConfigError`` naming what is missing or damaged."""
    import torch

    rows = ledger.experiments(root, experiment_id)
    if not rows:
        raise ConfigError(f"no experiment {experiment_id!r} in {CorpusLayout(Path(root)).experiments_db} "
                          f"(`plateflow experiments --root {root}` lists them)")
    if rows[0]["feature_kind"] != "patches":
        raise ConfigError(f"experiment {experiment_id} is a {rows[0]['head']} head on {rows[0]['feature_kind']}, not a "
                          f"segmentation: `plateflow predict --experiment {experiment_id}` applies it")
    path = Path(root) / rows[0]["checkpoint"]
    try:  # weights only: a checkpoint is never code
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        return SegHead.from_state(ckpt), ckpt
    except FileNotFoundError:
        raise ConfigError(f"the checkpoint {path} of experiment {experiment_id} is missing; train it again with "
                          f"`plateflow train-seg`") from None
    except Exception as exc:  # noqa: BLE001 - torch's unpickler and state loading each raise their own
        raise ConfigError(f"the checkpoint {path} of experiment {experiment_id} is damaged ({type(exc).__name__}); "
                          f"train it again with `plateflow train-seg`") from None


def share_columns(classes: list[str]) -> list[str]:
    return [f"seg_{safe_key(c, 60)}" for c in classes]


def overlay(preview: Path, mask: np.ndarray, colours: list[tuple[int, int, int]]) -> bytes:
    """The preview with the mask's class colours blended over it, as PNG bytes."""
    import io

    with Image.open(preview) as im:
        base = np.asarray(im.convert("RGB"), np.float32)
    colour = np.asarray(colours, np.float32)[mask]
    out = Image.fromarray((base * (1 - OVERLAY_ALPHA) + colour * OVERLAY_ALPHA).astype(np.uint8))
    buf = io.BytesIO()
    out.save(buf, "PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def predict_plate(head, tokens: np.ndarray, record: dict, mask_path: Path, preview: Path | None,
                  classes: list[str], device: str = "cpu") -> tuple[np.ndarray, int]:
    """Write the plate's mask (and overlay); returns (area share per class, peak bytes while stitching)."""
    colours = palette(len(classes))
    counts = np.zeros(len(classes), np.int64)
    width, height = record["width"], record["height"]
    tracemalloc.start()
    try:
        with temp_file(mask_path) as (fd, _):
            with os.fdopen(os.dup(fd), "wb") as fh:
                png = IndexedPng(fh, width, height, colours)

                def emit(rows: np.ndarray) -> None:
                    counts[:] += np.bincount(rows.ravel(), minlength=len(classes))[:len(classes)]
                    png.write(rows)

                stitch_plate(head, tokens, record, (width, height), emit, device)
                png.close()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    if preview is not None and preview.is_file():
        with Image.open(preview) as im:
            size = im.size
        strips: list[np.ndarray] = []
        stitch_plate(head, tokens, record, size, strips.append, device)
        write_bytes(preview.parent / SEGMENTATION_OVERLAY, overlay(preview, np.concatenate(strips), colours))
    return counts / max(1, counts.sum()), peak


def predict_segmentation(root: Path, experiment_id: str, logger=None, device: str | None = None) -> dict:
    """Masks, overlays and area shares for every plate with the experiment's patch tokens, the
    head on ``device`` (the GPU when torch sees one); returns {"plates", "failed", "peak_bytes",
    "columns"}."""
    logger = logger or logging.getLogger(__name__)
    root = Path(root)
    corpus = CorpusLayout(root)
    head, ckpt = load_segmentation(root, experiment_id)
    device = device or compute_device()
    head = head.to(device)
    classes = ckpt["classes"]
    index_path = corpus.patch_index(ckpt["model"])
    if not index_path.is_file():
        raise ConfigError(f"{index_path} does not exist: run `plateflow patches --root {root} --model {ckpt['model']}` "
                          f"first")
    index = pq.read_table(index_path, columns=["plate_dir", "plate_id", "tokens_file", "version"])
    plates = {}
    for d, f, v in zip(*(index.column(c).to_pylist() for c in ("plate_dir", "tokens_file", "version"))):
        if v == ckpt["patches_version"]:
            plates[d] = root / f
    if not plates:
        raise ConfigError(f"no plate has patch tokens of experiment {experiment_id}'s model and patch parameters "
                          f"({ckpt['patch_params']}): run `plateflow patches` with them first")
    shares, failed, peak = {}, {}, 0
    for folder, tokens_file in sorted(plates.items()):
        plate = corpus.plate(folder)
        try:
            record = stored_record(tokens_file)
            if record is None:
                raise ConfigError(f"its patch tokens {tokens_file.name} are missing; run `plateflow patches` again")
            share, used = predict_plate(head, load_tokens(tokens_file, record), record,
                                        plate.segmentation(experiment_id), plate.viz(PREVIEW), classes, device)
            shares[folder], peak = share, max(peak, used)
        except (OSError, ValueError, ConfigError) as exc:
            failed[folder] = f"{type(exc).__name__}: {exc}"
            logger.warning("%s: no mask (%s)", folder, failed[folder])
    columns = share_columns(classes)
    table = read_corpus_table(root)
    if table is not None:
        folders = table.column("plate_dir").to_pylist()
        for name in [*columns, "seg_experiment"]:
            if name in table.column_names:
                table = table.drop_columns([name])
        for i, name in enumerate(columns):
            table = table.append_column(pa.field(name, pa.float32()), pa.array(
                [float(shares[d][i]) if d in shares else None for d in folders], pa.float32()))
        table = table.append_column(pa.field("seg_experiment", pa.string()), pa.array(
            [experiment_id if d in shares else None for d in folders], pa.string()))
        write_parquet(corpus.table, table)
    write_json(corpus.segmenter, {"experiment": experiment_id, "classes": classes})
    logger.info("experiment %s: %d masks written, %d failed; stitching peaked at %.1f MB", experiment_id,
                len(shares), len(failed), peak / 2**20)
    return {"plates": len(shares), "failed": failed, "peak_bytes": peak, "columns": columns}
