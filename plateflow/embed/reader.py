"""The reader: threads that read each working copy once, nothing more.

Decoding (on a GPU), cutting, resizing and letterboxing all of a batch's views happens on the
device (``ViewEncoder.decode``, ``.cut_views``), where it costs a fraction of the forward pass:
resizing a plate's views on the host's CPU cores, or decoding them there with Pillow, cannot
keep a large GPU's forward pass fed (docs/scaling.md), while the GPU's JPEG decoder can.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
from PIL import Image
from pydantic import Field
from pydantic.dataclasses import dataclass as pydantic_dataclass


@pydantic_dataclass(frozen=True)
class PlateJob:
    """One plate's input to the GPU step: small, picklable (a flow-run parameter, so each field
    says what it is in the Prefect UI's form)."""

    name: Annotated[str, Field(description="What the job is called in outcomes: the plate's folder (or a tile's key).")]
    working_copy: Annotated[str, Field(description="Path of the plate's working_copy.jpg.")]
    original_size: Annotated[tuple[int, int], Field(description="The source's (width, height) in pixels.")]
    boxes: Annotated[tuple[tuple[int, int, int, int], ...],
                     Field(description="Crop candidates (x0, y0, x1, y1) in source pixels; box 0 is the whole plate.")]
    cache_file: Annotated[str, Field(description="The .npy file the plate's vectors are stored in.")]


@dataclass
class DecodedPlate:
    pixels: "object"   # (H, W, 3) uint8 torch tensor: on the device, or pinned when feeding a GPU
    boxes: np.ndarray  # (K, 4) float64: the candidate boxes in ``pixels`` coordinates


@dataclass
class EncodedPlate:
    """A working copy's JPEG bytes, read by a reader thread, decoded on the device in a batch."""

    data: "object"  # 1-D uint8 torch tensor
    job: PlateJob


def decoded_plate(job: PlateJob, pixels) -> DecodedPlate:
    """A plate decoded to ``pixels`` (H, W, 3), with its boxes in those pixels' coordinates."""
    sx, sy = pixels.shape[1] / job.original_size[0], pixels.shape[0] / job.original_size[1]
    return DecodedPlate(pixels, np.asarray(job.boxes, np.float64) * [sx, sy, sx, sy])


class PlateReader:
    """Item i: plate i's working copy, decoded, with its boxes in that copy's pixels (``read_plate``),
    or with ``encoded``, its JPEG bytes for the device to decode (``read_encoded``)."""

    def __init__(self, jobs: list[PlateJob], size: int, pin_memory: bool = False, encoded: bool = False):
        self.jobs, self.size, self.pin_memory, self.encoded = jobs, size, pin_memory, encoded

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int):
        """(i, DecodedPlate or EncodedPlate) or (i, error message): an unreadable working copy
        fails only its plate."""
        if self.encoded:
            return i, read_encoded(self.jobs[i], self.size, self.pin_memory)
        return i, read_plate(self.jobs[i], self.size, self.pin_memory)


def read_plate(job: PlateJob, size: int, pin_memory: bool = False) -> "DecodedPlate | str":
    """Decode one plate's working copy for views of ``size`` px; an error message if unreadable.

    Pillow's decode releases the GIL; its header parsing and the copy out of the decoder do
    not (see ``prefetch_batches``). The only torch call is the allocation; the copy into it is
    NumPy's.
    """
    import torch

    try:
        with Image.open(job.working_copy) as im:  # closed on a decoding error too
            # JPEG DCT scaling: decode at the smallest scale that still gives every view at
            # least twice the model's input size (a 2-4x cheaper decode).
            smallest = min(min(x1 - x0, y1 - y0) for x0, y0, x1, y1 in job.boxes)
            scale = min(1.0, 2 * size / (smallest * im.width / job.original_size[0]))
            im.draft("RGB", (round(im.width * scale), round(im.height * scale)))
            work = im.convert("RGB") if im.mode != "RGB" else im
            work.load()
    except (OSError, SyntaxError, ValueError) as exc:
        return f"cannot read working copy {Path(job.working_copy).name}: {exc}"
    pixels = torch.empty((work.height, work.width, 3), dtype=torch.uint8, pin_memory=pin_memory)
    np.copyto(pixels.numpy(), np.asarray(work))
    return decoded_plate(job, pixels)


def read_encoded(job: PlateJob, size: int, pin_memory: bool = False) -> "EncodedPlate | DecodedPlate | str":
    """A working copy's bytes, when they are a whole JPEG (start and end markers), for the device
    to decode; anything else (another format, a truncated file) goes to ``read_plate``, which
    decodes it or says what is wrong. The file read releases the GIL."""
    import torch

    try:
        data = np.fromfile(job.working_copy, dtype=np.uint8)
    except OSError as exc:
        return f"cannot read working copy {Path(job.working_copy).name}: {exc}"
    if data[:3].tobytes() == b"\xff\xd8\xff" and data[-2:].tobytes() == b"\xff\xd9":
        return EncodedPlate(torch.from_numpy(data), job)
    return read_plate(job, size, pin_memory)


READER_KINDS = ("threads", "device")


def prefetch_batches(dataset: PlateReader, plates_per_batch: int, workers: int):
    """Batches of plates read ahead by reader threads, in order: (ok, failed), each a list of
    (index, DecodedPlate or EncodedPlate, or error message).

    On the CPU the threads decode with Pillow (the forward pass needs the cores anyway).
    Feeding a GPU they only read each working copy's bytes (``dataset.encoded``), and the GPU
    decodes a batch at once: Pillow decoding in many threads holds the GIL that the thread
    launching the GPU's kernels needs, and reader processes would move every decoded plate
    through shared memory.
    """
    batch = []
    for item in _read_threads(dataset, workers, _lookahead(plates_per_batch, workers)):
        batch.append(item)
        if len(batch) == plates_per_batch:
            yield _split(batch)
            batch = []
    if batch:
        yield _split(batch)


def _lookahead(plates_per_batch: int, workers: int) -> int:
    """Plates read ahead of the device: two batches."""
    return max(2 * workers, 2 * plates_per_batch)


def _split(items):
    return ([(i, v) for i, v in items if not isinstance(v, str)],
            [(i, v) for i, v in items if isinstance(v, str)])


def _read_threads(dataset: PlateReader, workers: int, lookahead: int):
    n = len(dataset)
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="plateflow-reader") as pool:
        pending = deque(pool.submit(dataset.__getitem__, i) for i in range(min(n, lookahead)))
        submitted = len(pending)
        while pending:
            item = pending.popleft().result()
            if submitted < n:
                pending.append(pool.submit(dataset.__getitem__, submitted))
                submitted += 1
            yield item


def reader_threads() -> int:
    """Reader threads: every core but the one that drives the device."""
    return max(1, (os.cpu_count() or 2) - 1)
