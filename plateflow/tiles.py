"""Model-input tiles: each plate cut into tiles of one size, with a train/test split that comes
from its content hash, written as WebDataset shards.

- ``classic``: a plate smaller than the tile in either dimension is skipped, with the reason; a
  test plate becomes one tile, the whole plate reduced to fit; a train plate is cut into the
  grid of whole tiles, the remainders dropped.
- ``noise-framed``: every cell of a grid that includes the remainders (one cell for a plate
  smaller than the tile; the whole plate reduced to fit for a test plate) is centred on a frame
  of Gaussian noise, seeded from the plate's content hash and the tile's index, so a re-run is
  byte-identical.

Tiles come from the full-resolution source by the CPU stage's decode rules (plateflow/image.py:
EXIF orientation, any mode to 8-bit RGB), as RGB or L. A plate's tiles are stored once per key
(content hash, tile parameters, code) in ROOT/.plateflow/tiles/, as the tar members its shard
holds, so a re-run cuts nothing for unchanged plates.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import struct
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from plateflow.atomic import write_bytes
from plateflow.caching import cache_key, step_version
from plateflow.corpus import PlateRef
from plateflow.layout import safe_key
from plateflow.split import Split, split_of as plate_split
from plateflow.outcomes import PlateOutcome, isolated

class TileParams(BaseModel):
    """What tiles are cut; all of it but the shard settings is part of each plate's tile key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    width: int = Field(ge=8, le=8192, description="Tile width in pixels.")
    height: int = Field(ge=8, le=8192, description="Tile height in pixels.")
    mode: Literal["classic", "noise-framed"] = Field("classic", description="classic: whole tiles only; "
                                                     "noise-framed: remainders and small plates framed by noise.")
    grayscale: bool = Field(False, description="L tiles instead of RGB.")
    test_every: int | None = Field(None, ge=2, description="A plate is in the test set when its hash is 0 mod this.")
    test_fraction: float | None = Field(None, gt=0, lt=1, description="Or: this share of plates, by hash, is test.")
    noise_mean: float = Field(127.5, ge=0, le=255, description="Mean of the noise frame (noise-framed).")
    noise_std: float = Field(40.0, ge=0, le=255, description="Standard deviation of the noise frame.")
    png_compress_level: int = Field(1, ge=0, le=9, description="PNG compression of the tiles: 1-3 ISA-L (1: fastest), "
                                                               "4-9 zlib (smaller, slower), 0 stored.")
    max_pixels: int = Field(250_000_000, ge=1, lt=2**31, description="Plates with more pixels fail, as in a refresh.")
    shard_megabytes: float = Field(256.0, gt=0, description="Most megabytes in one shard.")
    shard_groups: int = Field(16, ge=1, le=1000, description="Shards are grouped by plate hash into this many groups: "
                                                             "a changed plate rewrites only its group's shards.")

    @model_validator(mode="after")
    def _one_split_rule(self) -> "TileParams":
        if self.test_every is not None and self.test_fraction is not None:
            raise ValueError("give test_every or test_fraction, not both")
        return self

    def fingerprint(self) -> str:
        data = self.model_dump(exclude={"shard_megabytes", "shard_groups"})
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def key(self, sha256: str) -> str:
        return cache_key("tiles", self.fingerprint())(sha256)

    def earlier_key(self, sha256: str) -> str:
        """The same key as spelled before every step was keyed one way: a store written then is
        adopted by renaming (``stored_tiles``), not cut again."""
        return f"tiles-{sha256}-{self.fingerprint()}-{step_version('tiles')}"


def split_of(sha256: str, params: TileParams) -> Split:
    """train or test, from the content hash alone (plateflow/split.py)."""
    return plate_split(sha256, params.test_every, params.test_fraction)


def group_of(sha256: str, params: TileParams) -> int:
    return int(sha256[16:24], 16) % params.shard_groups


@dataclass
class Tile:
    index: int
    box: tuple[int, int, int, int]  # the region of the plate it shows, in its pixels
    image: Image.Image


def cut_tiles(image: Image.Image, sha256: str, split: Split, params: TileParams) -> list[Tile] | str:
    """The plate's tiles, or why it has none."""
    tw, th = params.width, params.height
    w, h = image.size
    if params.mode == "classic":
        if w < tw or h < th:
            return f"{w}x{h} is smaller than the {tw}x{th} tile"
        if split == "test":
            return [Tile(0, (0, 0, w, h), _fit(image, tw, th))]
        return [Tile(k, box, image.crop(box)) for k, box in enumerate(_grid(w, h, tw, th, whole=True))]
    if split == "test" or (w <= tw and h <= th):
        return [Tile(0, (0, 0, w, h), _framed(_fit(image, tw, th), sha256, 0, params))]
    return [Tile(k, box, _framed(image.crop(box), sha256, k, params))
            for k, box in enumerate(_grid(w, h, tw, th, whole=False))]


def _grid(w: int, h: int, tw: int, th: int, whole: bool) -> list[tuple[int, int, int, int]]:
    nx, ny = (w // tw, h // th) if whole else (-(-w // tw), -(-h // th))
    return [(x * tw, y * th, min(w, (x + 1) * tw), min(h, (y + 1) * th)) for y in range(ny) for x in range(nx)]


def _fit(image: Image.Image, tw: int, th: int) -> Image.Image:
    """The whole image reduced (never enlarged) to fit inside tw x th, its aspect kept."""
    scale = min(tw / image.width, th / image.height, 1.0)
    if scale == 1.0:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    factor = max(1, int(1 / scale))
    base = image.reduce(factor) if factor > 1 else image
    return base.resize(size, Image.Resampling.LANCZOS)


def _framed(cell: Image.Image, sha256: str, index: int, params: TileParams) -> Image.Image:
    """``cell`` centred on a tw x th frame of Gaussian noise seeded by the plate's hash and ``index``."""
    if cell.size == (params.width, params.height):
        return cell
    channels = 1 if cell.mode == "L" else 3
    rng = np.random.default_rng([int(sha256[:16], 16), index])
    noise = rng.standard_normal((params.height, params.width, channels), dtype=np.float32)
    noise = noise * np.float32(params.noise_std) + np.float32(params.noise_mean)
    pixels = np.clip(np.rint(noise, out=noise), 0, 255, out=noise).astype(np.uint8)
    frame = Image.fromarray(pixels[..., 0] if channels == 1 else pixels)
    frame.paste(cell, ((params.width - cell.width) // 2, (params.height - cell.height) // 2))
    return frame


def encode_png(image: Image.Image, level: int = 1) -> bytes:
    """An 8-bit RGB or L image as PNG: every row Sub-filtered (each byte less the one a pixel
    to its left), then deflated, by ISA-L at levels 1-3 (``isal``: about 4x zlib's speed at
    level 1, and smaller output), by zlib at 4-9 and stored at 0.

    Pillow's encoder picks a filter per row by trying them all, and its deflate is zlib's: at
    level 1 it takes twice this one's time for the tiles of a scan, which is most of a
    make-tiles run (benchmarks/tiles.py). Any PNG reader reads these files."""
    a = np.asarray(image)
    h, w = a.shape[:2]
    c = 1 if a.ndim == 2 else a.shape[2]
    if a.dtype != np.uint8 or c not in (1, 3):
        raise ValueError(f"encode_png takes 8-bit RGB or L, not {image.mode}")
    rows = a.reshape(h, w * c)
    filtered = np.empty((h, w * c + 1), np.uint8)
    filtered[:, 0] = 1  # filter type Sub
    filtered[:, 1:1 + c] = rows[:, :c]
    np.subtract(rows[:, c:], rows[:, :-c], out=filtered[:, 1 + c:], casting="unsafe")  # mod 256
    raw = filtered.data
    if 1 <= level <= 3:
        from isal import isal_zlib

        data = isal_zlib.compress(raw, level)
    else:
        data = zlib.compress(raw, level)
    header = struct.pack(">IIBBBBB", w, h, 8, 2 if c == 3 else 0, 0, 0, 0)
    return b"".join((b"\x89PNG\r\n\x1a\n", _chunk(b"IHDR", header), _chunk(b"IDAT", data), _chunk(b"IEND", b"")))


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(tag)))


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """A tar member with fixed metadata: the same tiles give the same bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
    tar.addfile(info, io.BytesIO(data))


def tile_archive(plate: PlateRef, sha256: str, params: TileParams) -> tuple[bytes, list[dict], str | None]:
    """One plate's tiles as the tar members of a WebDataset shard (``<plate>-<index>.png`` and
    ``.json`` each), their rows for tiles.parquet, and why it has none (or None)."""
    from plateflow.image import decode_image

    decoded = decode_image(plate.source_path, params.max_pixels, sha256)
    image = decoded.image.convert("L") if params.grayscale else decoded.image
    split = split_of(sha256, params)
    tiles = cut_tiles(image, sha256, split, params)
    if isinstance(tiles, str):
        return b"", [], tiles
    buf, rows = io.BytesIO(), []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for t in tiles:
            key = f"{safe_key(plate.plate_id)}-{t.index:05d}"  # a WebDataset key: no dot, no separator
            meta = {"plate_id": plate.plate_id, "sha256": sha256, "box": list(t.box), "split": split,
                    "mode": params.mode, "index": t.index}
            _member(tar, f"{key}.png", encode_png(t.image, params.png_compress_level))
            _member(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
            rows.append({"key": key, **meta, "width": t.image.width, "height": t.image.height})
    return buf.getvalue(), rows, None


@dataclass(frozen=True)
class TileJob:
    plate: PlateRef
    sha256: str


def tiles_of_plates(jobs: list[TileJob], params: TileParams, store: Path, logger=None) -> list[PlateOutcome]:
    """Each plate's tile archive, stored under ``store`` by its key (``ROOT/.plateflow/tiles``)."""
    logger = logger or logging.getLogger(__name__)

    def one(job: TileJob) -> dict:
        data, rows, reason = tile_archive(job.plate, job.sha256, params)
        record = {"rows": rows, "reason": reason, "split": split_of(job.sha256, params)}
        write_bytes(store / f"{params.key(job.sha256)}.tar", data)
        write_bytes(store / f"{params.key(job.sha256)}.json", json.dumps(record).encode())
        return record

    return [isolated(j.plate.folder, "tiles", lambda j=j: one(j), logger) for j in jobs]


def stored_tiles(store: Path, params: TileParams, sha256: str) -> dict | None:
    """The plate's stored tile record (rows, reason, split), if its archive is in place."""
    key = params.key(sha256)
    try:
        record = json.loads((store / f"{key}.json").read_bytes())
    except FileNotFoundError:
        if not _adopt_earlier(store, params, sha256):
            return None
        return stored_tiles(store, params, sha256)
    except (OSError, ValueError):
        return None
    return record if (store / f"{key}.tar").is_file() else None


def _adopt_earlier(store: Path, params: TileParams, sha256: str) -> bool:
    """Rename the plate's archive and record stored under ``earlier_key`` to ``key``: the
    archive first, so a record is never there without its archive."""
    earlier, key = params.earlier_key(sha256), params.key(sha256)
    if not (store / f"{earlier}.json").is_file():
        return False
    for suffix in (".tar", ".json"):
        if (store / f"{earlier}{suffix}").exists():
            os.replace(store / f"{earlier}{suffix}", store / f"{key}{suffix}")
    return True


def write_shard(fh: BinaryIO, archives: list[Path]) -> None:
    """One WebDataset shard of the plates' stored archives, in order, streamed into ``fh``."""
    with tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as shard:
        for archive in archives:
            with tarfile.open(archive) as plate:
                for member in plate.getmembers():
                    shard.addfile(member, plate.extractfile(member))
