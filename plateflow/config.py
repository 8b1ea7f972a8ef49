"""Typed configuration, validated where a flow or command starts."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator


class CharacterizeParams(BaseModel):
    """Parameters of the CPU characterisation step; all of them are part of its cache key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bins: int = Field(256, description="Histogram bins over 0..255; a power of two from 2 to 256.")
    background_threshold: int = Field(
        245, ge=1, le=255, description="A pixel is paper background when its Rec. 709 luminance is >= this."
    )
    max_pixels: int = Field(
        250_000_000,
        ge=1,
        lt=2**31,
        description="Plates with more pixels fail with a clear message instead of exhausting memory.",
    )
    very_large_megapixels: float = Field(30.0, gt=0, description="Flag plates above this size.")
    extreme_aspect_ratio: float = Field(
        3.0, ge=1, description="Flag plates whose long side exceeds the short side by this factor."
    )
    preview_size: int = Field(512, ge=16, le=4096, description="Longest side of viz/input_preview.png.")
    viz: bool = Field(True, description="Write the viz/ PNGs (preview and histogram plots).")
    working_copy: bool = Field(False, description="Leave working_copy.jpg for the crop and GPU steps.")
    working_short_side: int = Field(
        1024, ge=64, le=8192, description="Short side of the working copy the crop/GPU steps read."
    )

    @field_validator("bins")
    @classmethod
    def _bins_power_of_two(cls, v: int) -> int:
        if v < 2 or v > 256 or v & (v - 1):
            raise ValueError(f"bins must be a power of two between 2 and 256, got {v}")
        return v

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()[:16]


class CropParams(BaseModel):
    """Crop candidates and the smart-crop choice; part of the embedding and crop cache keys."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    n_candidates: int = Field(15, ge=1, le=256, description="Crop candidates besides the whole plate.")
    scales: tuple[float, ...] = Field(
        (0.8, 0.6, 0.45, 0.3), description="Candidate area as a fraction of the largest box of its aspect."
    )
    min_area_fraction: float = Field(0.0, ge=0, le=1, description="Smallest allowed crop, as plate area.")
    aspect_range: tuple[float, float] | None = Field(None, description="Allowed width/height of the crop.")
    crop_format: str = Field("jpeg", pattern="^(jpeg|png)$", description="Format of the saved best crop.")

    def fingerprint(self) -> str:
        data = self.model_dump(exclude={"crop_format"})
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def default_workers() -> int:
    """Plates characterised at once: one per core, at most 4 (each holds a decoded image)."""
    return max(1, min(4, os.cpu_count() or 1))


class RefreshConfig(BaseModel):
    """Everything a corpus refresh needs; written next to the outputs as ``.plateflow/config.json``."""

    model_config = ConfigDict(extra="forbid")

    root: Path = Field(description="Corpus root holding plates_structured/.")
    characterize: CharacterizeParams = Field(default_factory=CharacterizeParams)
    workers: int = Field(default_factory=default_workers, ge=1, le=64)

    @field_validator("root")
    @classmethod
    def _root_exists(cls, v: Path) -> Path:
        v = Path(v).expanduser().resolve()
        if not (v / "plates_structured").is_dir():
            raise ValueError(
                f"{v} is not a plate corpus: it has no plates_structured/ folder "
                "(create one with `plateflow ingest SRC --root ROOT`)"
            )
        return v
