"""Near-duplicate flags: precision and recall on a designed set, through the real path.

The set: originals (scikit-image's sample photographs, and generated plates that share one
layout: a picture on off-white paper with margins; colour fields, shapes, line drawings, text
pages), one altered copy of each of ``--pairs`` of them (cut by 1-5 % on each side, 5 px
cut from each side (the rocket among them), resized to 90 %, recompressed as JPEG q60, and all three
at once), ``--unrelated`` originals without a copy, and ``--blank`` blank pages (paper with
noise and uneven light). Every image is written to a file and characterized
(plateflow.characterize.step.characterize_image), then ``corpus_flags`` decides the corpus's flags as a
refresh does.

A flagged plate is a true positive when it names its own original (or copy); every other flag
is a false pair. Recall: designed pairs found, per alteration. Writes
benchmarks/results/near_duplicates.json.

    uv run python benchmarks/near_duplicates.py [--pairs 60 --unrelated 200 --blank 100]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from results import write_result  # noqa: E402 - benchmarks/results.py

# Sample images that are not near duplicates of each other (skimage also has a grey copy of
# its colour chessboard, a stereo pair and chelsea as "cat": real near duplicates, left out).
SAMPLES = ("astronaut", "brick", "camera", "cell", "chelsea", "coffee", "coins", "colorwheel",
           "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo",
           "microaneurysms", "moon", "page", "retina", "rocket", "text", "clock")
ALTERATIONS = ("crop", "5px", "resize90", "jpeg60", "crop+resize90+jpeg60")


def samples() -> list[tuple[str, Image.Image]]:
    from skimage import data

    out = []
    for name in SAMPLES:
        try:
            im = getattr(data, name)()
        except Exception:  # noqa: BLE001 - a sample that needs a download (offline): not used
            continue
        out.append((name, Image.fromarray(np.asarray(im)).convert("RGB")))
    return out


def generated_plate(seed: int, w: int = 700, h: int = 900) -> Image.Image:
    """A picture on off-white paper, placed as book plates are: one layout for all."""
    from matplotlib import colormaps

    r = np.random.default_rng(seed)
    page = Image.new("RGB", (w, h), tuple(int(v) for v in r.integers(222, 250, 3)))
    pw, ph = int(w * r.uniform(0.55, 0.85)), int(h * r.uniform(0.4, 0.7))
    kind = seed % 4
    if kind == 0:  # a colour field (a map, a painting's wash)
        f = r.normal(size=(ph // 16 + 1, pw // 16 + 1))
        grey = Image.fromarray((255 * (f - f.min()) / np.ptp(f)).astype(np.uint8)).resize((pw, ph), Image.Resampling.BICUBIC)
        cmap = colormaps[str(r.choice(["viridis", "magma", "terrain", "gist_earth", "copper", "bone"]))]
        pic = Image.fromarray((cmap(np.asarray(grey) / 255.0)[..., :3] * 255).astype(np.uint8))
    elif kind == 1:  # shapes
        pic = Image.new("RGB", (pw, ph), tuple(int(v) for v in r.integers(0, 255, 3)))
        d = ImageDraw.Draw(pic)
        for _ in range(30):
            x, y, s = r.integers(0, pw), r.integers(0, ph), r.integers(10, pw // 3)
            d.ellipse((x, y, x + s, y + s * r.uniform(0.3, 2)), fill=tuple(int(v) for v in r.integers(0, 255, 3)))
    elif kind == 2:  # a line drawing (an engraving)
        pic = Image.new("RGB", (pw, ph), (245, 240, 230))
        d = ImageDraw.Draw(pic)
        for _ in range(60):
            x, y = r.integers(0, pw), r.integers(0, ph)
            d.line((x, y, x + r.integers(-200, 200), y + r.integers(-200, 200)),
                   fill=tuple(int(v) for v in r.integers(0, 120, 3)), width=int(r.integers(1, 6)))
    else:  # a text page: lines of words
        pic = Image.new("RGB", (pw, ph), (240, 236, 226))
        d = ImageDraw.Draw(pic)
        for y in range(8, ph - 16, 22):
            x = 8 + (int(r.integers(0, 30)) if r.random() < 0.2 else 0)
            end = pw - 8 - (int(r.integers(0, pw // 2)) if r.random() < 0.15 else 0)
            while x < end:
                word = int(r.integers(12, 70))
                d.rectangle((x, y, min(x + word, end), y + 11), fill=(40, 35, 30))
                x += word + int(r.integers(6, 12))
    page.paste(pic, ((w - pw) // 2 + int(r.integers(-20, 20)), int(h * r.uniform(0.08, 0.2))))
    return page


def blank_page(seed: int, w: int = 700, h: int = 900) -> Image.Image:
    r = np.random.default_rng(10_000 + seed)
    y, x = np.mgrid[0:h, 0:w]
    light = 1 - 0.04 * r.random() * ((x / w - r.random()) ** 2 + (y / h - r.random()) ** 2)
    paper = np.asarray(r.integers(225, 250, 3), np.float32)
    pixels = paper * light[..., None] + r.normal(0, 2.0, (h, w, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def _jpeg(im: Image.Image, quality: int = 60) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _cut(im: Image.Image, left: float, top: float, right: float, bottom: float) -> Image.Image:
    w, h = im.size
    return im.crop((round(w * left), round(h * top), w - round(w * right), h - round(h * bottom)))


def _resize(im: Image.Image, factor: float = 0.9) -> Image.Image:
    return im.resize((round(im.width * factor), round(im.height * factor)), Image.Resampling.LANCZOS)


def alter(im: Image.Image, alteration: str, rng: np.random.Generator) -> Image.Image:
    if alteration == "crop":
        return _cut(im, *rng.uniform(0.01, 0.05, 4))
    if alteration == "5px":  # the case (the rocket): 5 px cut from each side
        return im.crop((5, 5, im.width - 5, im.height - 5))
    if alteration == "resize90":
        return _resize(im)
    if alteration == "jpeg60":
        return _jpeg(im)
    return _jpeg(_resize(_cut(im, *rng.uniform(0.01, 0.03, 4))))


def designed_set(pairs: int, unrelated: int, blank: int, seed: int = 0):
    """[(name, image)] in corpus order (originals, copies, blank pages), and {copy: original}."""
    rng = np.random.default_rng(seed)
    names, real = zip(*samples())
    rocket = names.index("rocket") if "rocket" in names else -1
    originals = list(real) + [generated_plate(s) for s in range(pairs + unrelated - len(real))]
    items = [(f"orig-{k:04d}", im) for k, im in enumerate(originals)]
    truth = {}
    for k in range(pairs):
        alteration = "5px" if k == rocket else ALTERATIONS[k % len(ALTERATIONS)]
        name = f"copy-{k:04d}-{alteration}"
        items.append((name, alter(originals[k], alteration, rng)))
        truth[name] = f"orig-{k:04d}"
    items += [(f"blank-{k:04d}", blank_page(k)) for k in range(blank)]
    return items, truth


def measure(pairs: int, unrelated: int, blank: int) -> dict:
    from plateflow.config import CharacterizeParams
    from plateflow.profiles import quality_profile
    from plateflow.characterize.step import characterize_image
    from plateflow.corpus_flags import corpus_flags

    items, truth = designed_set(pairs, unrelated, blank)
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name, im in items:
            path = Path(tmp) / f"{name}.png"
            im.save(path)
            q = characterize_image(path, CharacterizeParams(viz=False, working_copy=False)).metadata["quality"]
            rows.append({"plate_id": name, "plate_dir": name, "status": "ok", "width": im.width,
                         "height": im.height, "quality_flags": q["flags"], "pixel_hash": q["pixel_hash"],
                         "phash": q["phash"]})
    characterized = time.perf_counter() - started
    corpus_flags(rows, quality_profile())
    flagged = {r["plate_id"]: r["duplicate_of"] for r in rows if "near_duplicates" in r["quality_flags"]}
    true = {a: b for a, b in flagged.items() if truth.get(a) == b or truth.get(b) == a}
    false = {a: b for a, b in flagged.items() if a not in true}
    found = {copy for copy, orig in truth.items() if flagged.get(copy) == orig or flagged.get(orig) == copy}
    by_alteration = {}
    for alteration in ALTERATIONS:
        names = [c for c in truth if c.split("-", 2)[2] == alteration]
        by_alteration[alteration] = {"pairs": len(names), "found": sum(c in found for c in names)}
    return {
        "pairs": len(truth), "unrelated": len(items) - 2 * len(truth) - blank, "blank_pages": blank,
        "flagged": len(flagged), "true_pairs": len(true), "false_pairs": len(false),
        "precision": len(true) / len(flagged) if flagged else 1.0, "recall": len(found) / len(truth),
        "by_alteration": by_alteration, "false": [[a, b] for a, b in sorted(false.items())],
        "missed": sorted(set(truth) - found), "characterize_seconds": round(characterized, 1),
        "max_distance": quality_profile().near_duplicates.max_distance,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=60)
    ap.add_argument("--unrelated", type=int, default=200)
    ap.add_argument("--blank", type=int, default=100)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "near_duplicates.json")
    args = ap.parse_args()
    figures = measure(args.pairs, args.unrelated, args.blank)
    write_result("near_duplicates", figures, sys.argv[1:], args.out)
    print(f"precision {figures['precision']:.3f}, recall {figures['recall']:.3f} "
          f"({figures['true_pairs']} true, {figures['false_pairs']} false pairs; "
          f"{figures['pairs']} pairs, {figures['unrelated']} unrelated, {figures['blank_pages']} blank pages)")
    for alteration, f in figures["by_alteration"].items():
        print(f"  {alteration:22s} {f['found']}/{f['pairs']}")
    if figures["false"]:
        print("  false pairs:", figures["false"])
    if figures["missed"]:
        print("  missed:", figures["missed"])


if __name__ == "__main__":
    main()
