"""Curators' masks: a folder of indexed PNGs named by plate (``<plate_id>.png`` or
``<plate folder>.png``), each pixel a class index, 255 where nothing is labelled (ignored in
training and scoring). Class names are the lines of ``classes.txt`` in the folder (line i names
class i), else ``class_<i>``. A mask may be drawn on a smaller copy of the plate: it is scaled
to the plate (nearest neighbour) as long as its aspect ratio is the plate's within 2 %.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from plateflow.errors import ConfigError

IGNORE = 255  # an unlabelled pixel
MAX_CLASSES = 64
CLASSES_FILE = "classes.txt"


@dataclass(frozen=True)
class MaskSet:
    """The masks of a folder: class names, and each matched plate folder's mask file."""

    classes: list[str]
    files: dict[str, Path]  # plate folder -> mask PNG


def read_mask(path: Path) -> np.ndarray:
    """(h, w) uint8 class indices; ``ConfigError`` naming the file when it is not a one-band PNG."""
    try:
        with Image.open(path) as im:
            if im.format != "PNG" or im.mode not in ("P", "L"):
                raise ConfigError(f"mask {path.name}: a mask is an indexed (P) or greyscale (L) PNG of class "
                                  f"indices, not {im.format} {im.mode}")
            return np.array(im, np.uint8)  # P: the palette indices; L: the values
    except OSError as exc:
        raise ConfigError(f"mask {path.name} cannot be read: {exc}") from None


def mask_set(folder: Path, plates: dict[str, str]) -> MaskSet:
    """The masks in ``folder`` for ``plates`` (plate_id -> plate folder); ``ConfigError`` in one
    line when the folder is missing, holds no mask of a known plate, or names too many classes."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"--masks {folder} is not a folder of mask PNGs")
    by_folder = {v: v for v in plates.values()}
    files: dict[str, Path] = {}
    for path in sorted(folder.glob("*.png")):
        owner = plates.get(path.stem) or by_folder.get(path.stem)
        if owner is not None:
            files[owner] = path
    if not files:
        raise ConfigError(f"--masks {folder} holds no <plate_id>.png or <plate folder>.png of a plate in the corpus")
    names_file = folder / CLASSES_FILE
    if names_file.is_file():
        try:
            names = [line.strip() for line in names_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{names_file} cannot be read as UTF-8 text: {exc}") from None
    else:
        top = max(int(v.max(initial=0)) for v in (_labelled(read_mask(p)) for p in files.values()))
        names = [f"class_{i}" for i in range(top + 1)]
    if not 2 <= len(names) <= MAX_CLASSES:
        raise ConfigError(f"{folder}: {len(names)} classes; a segmentation needs 2 to {MAX_CLASSES} "
                          f"(one name a line in {CLASSES_FILE})")
    if len(set(names)) != len(names):
        raise ConfigError(f"{names_file}: a class name appears twice")
    return MaskSet(names, files)


def _labelled(mask: np.ndarray) -> np.ndarray:
    return mask[mask != IGNORE]


def fitted(mask: np.ndarray, width: int, height: int, name: str, classes: int) -> np.ndarray:
    """``mask`` at the plate's aspect ratio, its values checked; ``ConfigError`` otherwise."""
    h, w = mask.shape
    if abs((w / h) / (width / height) - 1) > 0.02:
        raise ConfigError(f"mask {name} is {w}x{h}, the plate {width}x{height}: not the plate's shape")
    bad = _labelled(mask)
    if bad.size and int(bad.max()) >= classes:
        raise ConfigError(f"mask {name} holds class {int(bad.max())}; there are {classes} classes "
                          f"(255 marks unlabelled pixels)")
    return mask


def token_targets(mask: np.ndarray, window: tuple[int, int, int, int], plate_size: tuple[int, int],
                  grid: int) -> np.ndarray:
    """The class under the centre of each token of ``window`` (source pixels), from ``mask``
    (drawn at any scale of the plate): (grid, grid) uint8, IGNORE where it is unlabelled or the
    window reaches past the plate."""
    width, height = plate_size
    h, w = mask.shape
    x0, y0, x1, y1 = window
    centres = (np.arange(grid) + 0.5) / grid
    xs = x0 + centres * (x1 - x0)
    ys = y0 + centres * (y1 - y0)
    out = np.full((grid, grid), IGNORE, np.uint8)
    inside_x, inside_y = xs < width, ys < height
    mx = np.minimum((xs[inside_x] * w / width).astype(int), w - 1)
    my = np.minimum((ys[inside_y] * h / height).astype(int), h - 1)
    out[np.ix_(inside_y, inside_x)] = mask[np.ix_(my, mx)]
    return out
