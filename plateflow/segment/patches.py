"""The patch index and the patch tokens: each plate cut, at full resolution, into square windows
(``PatchParams``: side and overlap in source pixels), each window through an encoder whose
patch tokens (a grid of ``grid x grid`` vectors) are kept in float16, one file per plate:
ROOT/.plateflow/patches/<model>/<sha256>-<version>.npy, shape (windows, grid*grid, dim), with a
small JSON record beside it (the plate's size and windows). Keyed like every cached step
(``cache_key("patches", ...)``): an unchanged plate is settled by the file's presence, a
changed plate redoes only its own windows.

Memory: the plate is decoded once to 8-bit RGB; windows are cut from it a batch at a time and
only that batch is turned into float tensors, so a 60 MP plate is never held in floats whole.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from plateflow.atomic import temp_file, write_json
from plateflow.caching import StepKey, cache_key
from plateflow.corpus import PlateRef
from plateflow.devices import compute_device
from plateflow.embed.models import LoadedModel
from plateflow.image import decode_image
from plateflow.layout import CorpusLayout
from plateflow.outcomes import PlateOutcome, isolated
from plateflow.profiles import ModelSpec
from plateflow.status import Status


class PatchParams(BaseModel):
    """How plates are cut into patches; all of it is part of each plate's patch key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    patch_size: int = Field(256, ge=32, le=4096, description="Side of a patch in source pixels.")
    overlap: int = Field(64, ge=0, le=2048, description="Pixels neighbouring patches share (blended when masks "
                                                        "are stitched).")
    max_pixels: int = Field(250_000_000, ge=1, lt=2**31, description="Plates with more pixels fail, as in a refresh.")

    @model_validator(mode="after")
    def _overlap_below_half(self) -> "PatchParams":
        if self.overlap * 2 >= self.patch_size:
            raise ValueError(f"overlap {self.overlap} must be under half the patch size {self.patch_size}")
        return self

    @property
    def stride(self) -> int:
        return self.patch_size - self.overlap

    def fingerprint(self) -> str:
        return self.model_dump_json()


def step_key(spec: ModelSpec, params: PatchParams) -> StepKey:
    """The patch tokens' key: the model's entry in the capability table, the patch parameters
    and the code of the patch and encoder modules."""
    return cache_key("patches", spec.identity(), params.fingerprint())


def _starts(length: int, size: int, stride: int) -> list[int]:
    if length <= size:
        return [0]
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] != length - size:
        starts.append(length - size)  # the last window ends at the edge
    return starts


def windows(width: int, height: int, params: PatchParams) -> list[tuple[int, int, int, int]]:
    """(x0, y0, x1, y1) of every patch, rows top to bottom, each row left to right. Every window is
    ``patch_size`` square; on a plate smaller than that it reaches past the edge (the part
    outside is filled with the edge's pixels and ignored when stitching)."""
    p = params.patch_size
    return [(x, y, x + p, y + p) for y in _starts(height, p, params.stride) for x in _starts(width, p, params.stride)]


def cut(pixels: np.ndarray, window: tuple[int, int, int, int]) -> np.ndarray:
    """The window's pixels (size x size x 3, uint8), edge-filled where it reaches past the plate."""
    x0, y0, x1, y1 = window
    h, w = pixels.shape[:2]
    inside = pixels[y0:min(y1, h), x0:min(x1, w)]
    if inside.shape[0] == y1 - y0 and inside.shape[1] == x1 - x0:
        return inside
    return np.pad(inside, ((0, y1 - y0 - inside.shape[0]), (0, x1 - x0 - inside.shape[1]), (0, 0)), mode="edge")


class PatchEncoder:
    """A model's patch tokens for a batch of windows: resized on the device (antialiased) to the
    model's input, normalised as the model's config says, then the encoder's last layer of patch
    tokens without its class and register tokens. ``grid`` tokens a side, ``dim`` each."""

    def __init__(self, model: LoadedModel, device: str = "cpu"):
        import torch

        self.torch = torch
        self.model = model
        self.device = torch.device(device)
        self.net = model.net.to(self.device).eval()
        self.size = model.spec.input_size
        if model.spec.backend == "timm":
            self.grid = int(self.net.patch_embed.grid_size[0])
            self.dim = int(self.net.num_features)
            self.prefix = int(getattr(self.net, "num_prefix_tokens", 1))
        else:  # transformers CLIP: the vision tower's last hidden state
            config = self.net.config
            self.grid = config.image_size // config.patch_size
            self.dim = config.hidden_size
            self.prefix = 1
        self.mean = torch.tensor(model.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(model.std, device=self.device).view(1, 3, 1, 1)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """(B, S, S, 3) uint8 -> (B, grid*grid, dim) float16."""
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device).permute(0, 3, 1, 2).float().div_(255)
            if x.shape[-1] != self.size:
                x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear",
                                                    antialias=True, align_corners=False)
            x = (x - self.mean) / self.std
            if self.model.spec.backend == "timm":
                tokens = self.net.forward_features(x)
            else:
                tokens = self.net.vision_model(pixel_values=x).last_hidden_state
            tokens = tokens[:, self.prefix:]
            return tokens.to(torch.float16).cpu().numpy()


@dataclass(frozen=True)
class PatchJob:
    """One plate's patches to compute: its source, content hash and where its tokens go."""

    plate: PlateRef
    sha256: str
    tokens_file: str


def record_path(tokens_file: Path) -> Path:
    return Path(tokens_file).with_suffix(".json")


def tokens_path(root: Path, spec: ModelSpec, params: PatchParams, sha256: str) -> Path:
    return CorpusLayout(Path(root)).patch_store(spec.name) / f"{sha256}-{step_key(spec, params).version}.npy"


def stored_record(tokens_file: Path) -> dict | None:
    """A plate's stored patch record ({"width", "height", "windows", "grid", "dim"}) when its
    token file is in place, else None."""
    try:
        record = json.loads(record_path(tokens_file).read_bytes())
        if Path(tokens_file).stat().st_size > 0 and isinstance(record, dict) and "windows" in record:
            return record
    except (OSError, ValueError):
        pass
    return None


def plate_patches(job: PatchJob, encoder: PatchEncoder, params: PatchParams, batch: int = 16) -> dict:
    """Decode the plate, cut its windows and store their tokens; returns its record."""
    decoded = decode_image(job.plate.source_path, params.max_pixels, job.sha256)
    pixels = np.asarray(decoded.image.convert("RGB"))
    height, width = pixels.shape[:2]
    boxes = windows(width, height, params)
    tokens_file = Path(job.tokens_file)
    shape = (len(boxes), encoder.grid * encoder.grid, encoder.dim)
    with temp_file(tokens_file) as (fd, _):
        with os.fdopen(os.dup(fd), "wb") as fh:  # plain writes: a full disk is an OSError, never SIGBUS
            np.lib.format.write_array_header_1_0(fh, {"descr": "<f2", "fortran_order": False, "shape": shape})
            for start in range(0, len(boxes), batch):
                fh.write(encoder(np.stack([cut(pixels, b) for b in boxes[start:start + batch]])).tobytes())
    record = {"width": width, "height": height, "windows": boxes, "grid": encoder.grid, "dim": encoder.dim,
              "patch_size": params.patch_size, "overlap": params.overlap}
    write_json(record_path(tokens_file), record)
    return record


def load_tokens(tokens_file: Path, record: dict) -> np.ndarray:
    """A plate's patch tokens, memory-mapped: (windows, grid, grid, dim) float16."""
    tokens = np.load(tokens_file, mmap_mode="r")
    n, g, d = len(record["windows"]), record["grid"], record["dim"]
    if tokens.shape != (n, g * g, d) or tokens.dtype != np.float16:
        raise ValueError(f"{tokens_file} holds {tokens.dtype} {tokens.shape}, its record says float16 {(n, g * g, d)}")
    return tokens.reshape(n, g, g, d)


def patches_of_plates(jobs: list[PatchJob], spec: ModelSpec, params: PatchParams, device: str | None = None,
                      weights_root: str | None = None, logger=None) -> list[PlateOutcome]:
    """Each plate's patch tokens (stored ones are kept), the model loaded once for the batch; a
    plate fails alone."""
    import logging

    from plateflow.embed.models import load_model

    logger = logger or logging.getLogger(__name__)
    stored = {j.plate.folder: stored_record(Path(j.tokens_file)) for j in jobs}
    todo = [j for j in jobs if stored[j.plate.folder] is None]
    encoder = None
    if todo:  # the model is loaded only when a plate needs it (a batch run again after it was lost: none)
        device = device or compute_device()
        encoder = PatchEncoder(load_model(spec, Path(weights_root) if weights_root else None), device)
    return [isolated(j.plate.folder, "patches", lambda j=j: stored[j.plate.folder], logger, status=Status.CACHED)
            if stored[j.plate.folder] is not None else
            isolated(j.plate.folder, "patches", lambda j=j: plate_patches(j, encoder, params), logger) for j in jobs]


def index_rows(root: Path, plate: PlateRef, sha256: str, tokens_file: Path, record: dict, version: str) -> list[dict]:
    """The plate's rows of patches.parquet."""
    relative = str(Path(tokens_file).relative_to(root))
    return [{"patch_id": f"{plate.folder}:{i}", "plate_dir": plate.folder, "plate_id": plate.plate_id,
             "sha256": sha256, "index": i, "box": list(box), "tokens_file": relative, "version": version,
             "grid": record["grid"], "dim": record["dim"]} for i, box in enumerate(record["windows"])]
