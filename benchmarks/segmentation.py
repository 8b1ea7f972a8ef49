"""Segmentation benchmark, on this machine's CPU:

- patches: windows per second through ``PatchEncoder`` (cut from a decoded plate, resized on
  the device, the encoder's patch tokens to float16) for a ViT-S/14 (DINOv2's architecture,
  random weights, 224 px), against the same model's forward pass alone on ready tensors;
- stitching: seconds and peak memory (tracemalloc: NumPy's allocations) to stitch one 60 MP
  plate's mask (9,000 x 6,700, windows of 256 every 192 pixels, 4 classes) into an indexed PNG,
  against writing the same mask with Pillow from an array already in memory;
- train-seg: seconds to train a conv head on 50 labelled plates' tokens (dinov2_base-sized:
  16 x 16 tokens of 768, 20 windows a plate) read from memory-mapped token files, the plates
  found among a patch index of 20,000 plates.

    uv run python benchmarks/segmentation.py [--windows 64] [--epochs 10]
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def patches_per_second(windows: int) -> dict:
    import timm
    import torch

    from plateflow.embed.models import LoadedModel
    from plateflow.profiles import ModelSpec
    from plateflow.segment.patches import PatchEncoder, PatchParams, cut
    from plateflow.segment.patches import windows as grid

    torch.manual_seed(0)
    net = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=224).eval()
    spec = ModelSpec(name="vit_s14", backend="timm", hub_id="-", architecture="vit_small_patch14_dinov2",
                     family="dinov2", input_size=224, embed_dim=384, min_vram_gb=0, batch={"CPU": 16})
    encoder = PatchEncoder(LoadedModel(spec, net, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    rng = np.random.default_rng(0)
    plate = rng.integers(0, 255, (2048, 2048, 3), np.uint8)
    boxes = grid(2048, 2048, PatchParams())[:windows]
    encoder(np.stack([cut(plate, b) for b in boxes[:4]]))  # warm-up
    t = time.perf_counter()
    for start in range(0, len(boxes), 16):
        encoder(np.stack([cut(plate, b) for b in boxes[start:start + 16]]))
    through = time.perf_counter() - t
    x = torch.rand(16, 3, 224, 224)
    with torch.inference_mode():
        net.forward_features(x[:4])
        t = time.perf_counter()
        for _ in range(0, len(boxes), 16):
            net.forward_features(x)
        alone = time.perf_counter() - t
    return {"windows": len(boxes), "patches_per_s": round(len(boxes) / through, 2),
            "model_only_per_s": round(16 * len(range(0, len(boxes), 16)) / alone, 2),
            "ratio_to_model_only": round(through / alone, 3)}


def stitching() -> dict:
    from PIL import Image

    from plateflow.segment.patches import PatchParams, windows
    from plateflow.segment.stitch import IndexedPng, palette, stitch

    width, height, classes = 9000, 6700, 4
    params = PatchParams()
    boxes = windows(width, height, params)
    noise = np.random.default_rng(0).random((classes, 16, 16)).astype(np.float32)

    def probabilities(idx):
        out = np.repeat(noise[None], len(idx), axis=0)
        for k, i in enumerate(idx):
            out[k, (boxes[i][1] // 1000) % classes] += 1
        return out

    mask = np.empty((height, width), np.uint8)
    filled = [0]

    def emit(rows):
        mask[filled[0]:filled[0] + len(rows)] = rows
        png.write(rows)
        filled[0] += len(rows)

    buf = io.BytesIO()
    tracemalloc.start()
    t = time.perf_counter()
    png = IndexedPng(buf, width, height, palette(classes))
    stitch(boxes, (width, height), probabilities, (width, height), params.overlap, emit)
    png.close()
    seconds = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1] - mask.nbytes  # the benchmark's own copy is not the stitcher's
    tracemalloc.stop()
    im = Image.fromarray(mask, "P")
    im.putpalette([v for c in palette(classes) for v in c])
    t = time.perf_counter()
    im.save(io.BytesIO(), "PNG", compress_level=6)
    pillow = time.perf_counter() - t
    return {"plate": f"{width}x{height}", "windows": len(boxes), "classes": classes, "seconds": round(seconds, 2),
            "peak_mb": round(peak / 2**20, 1), "band_mb": round((classes + 1) * 257 * width * 4 / 2**20, 1),
            "pillow_png_write_s": round(pillow, 2), "ratio_to_pillow_write": round(seconds / pillow, 2)}


def train_seg(epochs: int) -> dict:
    import hashlib

    from plateflow.segment.train import LabelledPlate, SegConfig, fit

    rng = np.random.default_rng(0)
    labelled, grid, dim, windows, classes = 50, 16, 768, 20, 4
    with tempfile.TemporaryDirectory() as tmp:
        index_rows = 20_000 * windows  # the patch index a train-seg run reads to find its plates
        import pyarrow as pa

        t = time.perf_counter()
        index = pa.table({"plate_dir": [f"plate-{i // windows:05d}" for i in range(index_rows)],
                          "version": ["v"] * index_rows})
        wanted = {f"plate-{i:05d}" for i in range(0, 20_000, 400)}
        _ = [d for d in index.column("plate_dir").to_pylist() if d in wanted]
        find = time.perf_counter() - t
        plates = []
        centres = rng.normal(0, 1, (classes, dim)).astype(np.float32)
        for i in range(labelled):
            truth = rng.integers(0, classes, (windows, grid, grid))
            tokens = (centres[truth] + rng.normal(0, 2, (windows, grid, grid, dim))).astype(np.float16)
            path = Path(tmp) / f"{i}.npy"
            np.save(path, tokens)
            sha = hashlib.sha256(str(i).encode()).hexdigest()
            p = LabelledPlate(f"plate-{i}", sha, np.load(path, mmap_mode="r"),
                              {"width": 256, "height": 256, "windows": [], "grid": grid}, np.zeros((1, 1), np.uint8),
                              "train")
            p.targets = truth.astype(np.uint8)  # known: no masks to read
            plates.append(p)
        for k, p in enumerate(plates):
            p.split = "validation" if k % 10 == 0 else "train"
        t = time.perf_counter()
        fit(plates, classes, SegConfig(head="conv", epochs=epochs), "cpu", logging.getLogger("bench"))
        seconds = time.perf_counter() - t
    return {"store_plates": 20_000, "labelled_plates": labelled, "windows_per_plate": windows,
            "tokens": f"{grid}x{grid}x{dim} float16", "epochs": epochs, "index_scan_s": round(find, 3),
            "train_s": round(seconds, 1), "s_per_epoch": round(seconds / epochs, 2)}


def main() -> None:
    from results import write_result

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=64, help="windows through the encoder")
    parser.add_argument("--epochs", type=int, default=10, help="train-seg epochs")
    args = parser.parse_args()
    figures = {"patches": patches_per_second(args.windows), "stitching_60mp": stitching(),
               "train_seg": train_seg(args.epochs)}
    for name, values in figures.items():
        print(name, values)
    write_result("segmentation", figures, sys.argv[1:])


if __name__ == "__main__":
    main()
