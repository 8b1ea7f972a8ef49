"""A demo corpus from the photographs that ship inside scikit-image, laid out as scanned plates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# (sample name, file name, how it is saved) - a mix of formats and modes a real corpus has.
DEMO_PLATES = [
    ("astronaut", "astronaut.jpg", "JPEG"),
    ("coffee", "coffee.jpg", "JPEG"),
    ("chelsea", "chelsea.png", "PNG"),
    ("rocket", "rocket.jpg", "JPEG"),
    ("immunohistochemistry", "ihc_slide.tif", "TIFF"),
    ("hubble_deep_field", "hubble.jpg", "JPEG"),
    ("retina", "retina.jpg", "JPEG"),
    ("camera", "camera_gray.png", "PNG-L"),
    ("page", "book_page.tif", "TIFF-L"),
    ("coins", "coins_16bit.png", "PNG-I16"),
    ("logo", "logo_rgba.png", "PNG-RGBA"),
]


def paper(width: int, height: int, seed: int) -> np.ndarray:
    """An off-white sheet with fine grain, like a scanner's view of book paper."""
    rng = np.random.default_rng(seed)
    tint = np.array([248, 245, 236], np.float32)
    grain = rng.normal(0, 2.5, (height, width, 1)).astype(np.float32)
    return np.clip(tint + grain, 0, 255).astype(np.uint8)


def as_plate(photo: np.ndarray, seed: int, scale: int = 2, margin: float = 0.18) -> np.ndarray:
    """The photo, scaled up, centred on paper with margins (as a scanned plate looks)."""
    if photo.dtype == bool:
        photo = photo.astype(np.uint8) * 255
    if photo.ndim == 2:
        photo = np.repeat(photo[..., None], 3, axis=2)
    if photo.shape[2] == 4:  # composite alpha onto white before placing
        a = photo[..., 3:4].astype(np.float32) / 255
        photo = (photo[..., :3] * a + 255 * (1 - a)).astype(np.uint8)
    im = Image.fromarray(photo).resize((photo.shape[1] * scale, photo.shape[0] * scale), Image.LANCZOS)
    w, h = im.size
    mw, mh = int(w * margin), int(h * margin * 1.3)
    sheet = Image.fromarray(paper(w + 2 * mw, h + 2 * mh, seed))
    sheet.paste(im, (mw, mh))
    return np.asarray(sheet)


def write_demo_sources(folder: Path) -> list[Path]:
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for seed, (name, filename, kind) in enumerate(DEMO_PLATES):
        photo = getattr(data, name)()
        path = folder / filename
        if kind == "PNG-RGBA":
            Image.fromarray(photo).save(path)  # keep the alpha channel as shipped
        else:
            plate = as_plate(photo, seed)
            if kind == "JPEG":
                Image.fromarray(plate).save(path, quality=92)
            elif kind == "PNG":
                Image.fromarray(plate).save(path)
            elif kind == "TIFF":
                Image.fromarray(plate).save(path, compression="tiff_lzw")
            elif kind in ("PNG-L", "TIFF-L"):
                Image.fromarray(plate).convert("L").save(path)
            elif kind == "PNG-I16":
                gray = np.asarray(Image.fromarray(plate).convert("L")).astype(np.uint16) * 257
                Image.fromarray(gray).save(path)  # uint16 -> mode I;16
        written.append(path)
    return written
