"""The characterization's parameters; all of them are part of its cache key."""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, ConfigDict, Field, field_validator

from plateflow.limits import MAX_MEGAPIXELS
from plateflow.profiles import quality_profile


class CharacterizeParams(BaseModel):
    """Parameters of the CPU characterization step; all of them are part of its cache key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bins: int = Field(256, description="Histogram bins over 0..255; a power of two from 2 to 256.")
    background_threshold: int = Field(
        245, ge=1, le=255, description="A pixel is paper background when its Rec. 709 luminance is >= this."
    )
    max_pixels: int = Field(
        int(MAX_MEGAPIXELS * 1e6),
        ge=1,
        lt=2**31,
        description="Plates with more pixels fail with a clear message instead of exhausting memory.",
    )
    very_large_megapixels: float = Field(30.0, gt=0, description="Flag plates above this size.")
    extreme_aspect_ratio: float = Field(
        default_factory=lambda: quality_profile().odd_aspect_ratio.max_ratio, ge=1,
        description="extreme_aspect: the long side exceeds the short side by this factor (default: "
                    "odd_aspect_ratio's max_ratio in profiles/quality.toml, set once there).")
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
