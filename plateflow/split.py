"""The train/test split of a corpus: decided from each plate's content hash alone, so adding
plates never moves one, all of a plate's tiles share its split, and the tiles and the heads
trained on cached features (plateflow/heads.py) agree on which plates are held out."""

from __future__ import annotations

from typing import Literal

Split = Literal["train", "test"]


def split_of(sha256: str, test_every: int | None = None, test_fraction: float | None = None) -> Split:
    """test when the hash's first 64 bits are 0 mod ``test_every``, or below ``test_fraction``
    of their range; train otherwise (and with neither rule)."""
    x = int(sha256[:16], 16)
    if test_every is not None:
        return "test" if x % test_every == 0 else "train"
    if test_fraction is not None:
        return "test" if x / 2**64 < test_fraction else "train"
    return "train"


def in_validation(sha256: str, fraction: float) -> bool:
    """Whether a train plate is held out to choose the best checkpoint: from the hash's next 64
    bits, independent of the train/test rule."""
    return int(sha256[16:32], 16) / 2**64 < fraction
