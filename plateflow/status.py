"""The words plateflow writes for what became of a plate: its status in plates.parquet and each
step's outcome (``Status``), and the steps a plate can fail at (``Step``, plates.parquet's
``failed_step``). String enums: they are the strings in the tables, and compare equal to them."""

from enum import StrEnum


class Status(StrEnum):
    OK = "ok"  # a plate: every step it needed is done
    FAILED = "failed"  # a plate or a step: see failed_step and error
    COMPUTED = "computed"  # a step: done by this run
    CACHED = "cached"  # a step: its stored result, for the same key, is kept
    NOT_RUN = "not_run"  # a step: not reached (an earlier step failed)
    SKIPPED = "skipped"  # a plate with nothing to make (no whole tile)


class Step(StrEnum):
    MANIFEST = "manifest"
    HASH = "hash"
    CHARACTERIZE = "characterize"
    SAVE = "save"
    CANDIDATES = "candidates"
    EMBED = "embed"
    SMART_CROP = "smart_crop"
    TILES = "tiles"
