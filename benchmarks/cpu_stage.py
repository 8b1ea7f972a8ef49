"""CPU stage benchmark: plateflow's characterization against plain decoding and plain NumPy.

Builds >= 30 MP JPEG plates (a photograph on grainy off-white paper), then times, in one run and
with the same number of worker threads, each variant in its own subprocess (so peak memory is
measured per variant):

  decode      Image.open(...).load() of every source: the floor
  plateflow   characterize_image + save (JSON only, viz=False)
  no flags    the same without the quality flags (no pixel hash, no plate_quality): their cost
  +viz        the same with the preview and histogram PNGs
  +working    the same with the working copy the GPU stage reads (refresh with models)
  numpy       a straightforward NumPy implementation of the same statistics

    uv run python benchmarks/cpu_stage.py [--plates 4] [--megapixels 32] [--workers 1]

With ``--end-to-end`` it builds a mixed corpus of large plates instead (a 32 MP JPEG, a 24 MP
LZW TIFF, a 24 MP 16-bit grayscale PNG and a 10:1 panorama JPEG of 40 MP, twice) and times, in the same
run, plain decoding of those sources against `plateflow refresh` of a fresh copy of the corpus
(its cost above a refresh of a corpus of one tiny plate: the fixed cost of a command that has
work, imports of the CPU stage included), with and without the viz files, with the same
number of workers, and then what each part of the characterization costs, in a worker thread
in process. Two distinct images of each kind, so 8 plates:

    uv run python benchmarks/cpu_stage.py --end-to-end --workers 1
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from results import write_result  # noqa: E402 - benchmarks/results.py


def build_plates(folder: Path, n: int, megapixels: float) -> list[Path]:
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    width = int((megapixels * 1e6 * 4 / 3) ** 0.5)
    height = int(width * 3 / 4)
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.hubble_deep_field()]
    paths = []
    for i in range(n):
        path = folder / f"plate-{i:02d}-{width}x{height}.jpg"
        paths.append(path)
        if path.exists():
            continue
        rng = np.random.default_rng(i)
        grain = rng.normal(0, 3.0, (height, width, 1)).astype(np.float32)
        sheet = np.clip(np.array([247, 244, 235], np.float32) + grain, 0, 255).astype(np.uint8)
        im = Image.fromarray(sheet)
        photo = Image.fromarray(photos[i % len(photos)])
        pw = int(width * 0.7)
        ph = int(pw * photo.height / photo.width)
        ph = min(ph, int(height * 0.8))
        im.paste(photo.resize((pw, ph), Image.BICUBIC), ((width - pw) // 2, (height - ph) // 2))
        im.save(path, quality=92)
    return paths


def numpy_reference(path: Path, threshold: int = 245) -> dict:
    """The statistics as a notebook would compute them: NumPy over the pixel array."""
    from PIL import Image

    a = np.asarray(Image.open(path).convert("RGB"))
    flat = a.reshape(-1, 3).astype(np.float64)
    lum = np.floor(flat @ np.array([0.2126, 0.7152, 0.0722]) + 0.5)
    bg = lum >= threshold
    out = {
        "mean_rgb": flat.mean(0).tolist(), "std_rgb": flat.std(0).tolist(),
        "min_rgb": flat.min(0).tolist(), "max_rgb": flat.max(0).tolist(),
        "luminance_mean": float(lum.mean()), "luminance_std": float(lum.std()),
        "hist": [np.bincount(a[..., c].ravel(), minlength=256).tolist() for c in range(3)],
        "fg_hist": [np.bincount(a[..., c].reshape(-1)[~bg], minlength=256).tolist() for c in range(3)],
        "background_ratio": float(bg.mean()),
    }
    p = np.bincount(lum.astype(np.int64), minlength=256) / lum.size
    p = p[p > 0]
    out["entropy"] = float(-(p * np.log2(p)).sum())
    return out


def peak_rss() -> int:
    """This process's peak resident memory (VmHWM resets on exec, unlike ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_variant(variant: str, paths: list[Path], workers: int, repeats: int) -> dict:
    from PIL import Image

    from plateflow.config import CharacterizeParams
    from plateflow.corpus import PlateRef
    from plateflow.characterize.step import characterize_image
    from plateflow.characterize.save import save_characterization

    out_root = Path(tempfile.mkdtemp(prefix="plateflow-bench-"))

    def decode(path):
        with Image.open(path) as im:
            im.load()

    def plateflow(path, viz, working_copy=False):
        params = CharacterizeParams(viz=viz, working_copy=working_copy)
        result = characterize_image(path, params)
        plate_dir = out_root / path.stem
        ref = PlateRef(path.stem, plate_dir, path.stem, path, path.name)
        save_characterization(ref, out_root, result)

    if variant.endswith("(no quality flags)"):
        import functools

        # Aliased: a plain `import plateflow...` here would make `plateflow` (the function above) the package.
        from plateflow.characterize import histograms as histograms_module
        from plateflow.characterize import quality as quality_module

        quality_module.plate_quality = lambda *args, **kw: ({"flags": []}, None)
        histograms_module.compute_histograms = functools.partial(histograms_module.compute_histograms, pixel_hash=False)

    fn = {
        "decode": decode,
        "plateflow (no quality flags)": lambda p: plateflow(p, False),
        "plateflow+viz (no quality flags)": lambda p: plateflow(p, True),
        "plateflow": lambda p: plateflow(p, False),
        "plateflow+viz": lambda p: plateflow(p, True),
        "plateflow+viz+working copy": lambda p: plateflow(p, True, True),
        "numpy": numpy_reference,
    }[variant]
    # Warm up: compiles the histogram kernel (cached on disk) and pages the files in.
    warm = out_root / "warm.png"
    Image.new("RGB", (8, 8)).save(warm)
    if variant.startswith("plateflow"):
        fn(warm)
    for p in paths:
        p.read_bytes()
    rss_before = peak_rss()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(fn, paths))
        times.append(time.perf_counter() - start)
    shutil.rmtree(out_root, ignore_errors=True)
    return {"variant": variant, "seconds": min(times), "all_seconds": times,
            "peak_rss": peak_rss(),
            "rss_after_imports": rss_before}


def quality_side() -> int:
    from plateflow.profiles import quality_profile

    return quality_profile().scale.long_side


def plot_seconds(path: Path, repeats: int = 20) -> float:
    """Seconds to draw one plate's three histogram PNGs (after the first, which draws the axes)."""
    from plateflow.config import CharacterizeParams
    from plateflow.characterize.step import characterize_image
    from plateflow.characterize.viz import histogram_plots

    record = characterize_image(path, CharacterizeParams(viz=False)).histograms
    histogram_plots(record)
    start = time.perf_counter()
    for _ in range(repeats):
        histogram_plots(record)
    return (time.perf_counter() - start) / repeats


def check_agreement(path: Path) -> float:
    """Max absolute difference between plateflow's and the NumPy statistics (they must agree)."""
    from plateflow.config import CharacterizeParams
    from plateflow.characterize.step import characterize_image

    ours = characterize_image(path, CharacterizeParams(viz=False))
    ref = numpy_reference(path)
    assert ours.histograms["rgb_hist_full"] == dict(zip("rgb", ref["hist"])), "histograms differ"
    diffs = [abs(a - b) for k in ("mean_rgb", "std_rgb", "min_rgb", "max_rgb")
             for a, b in zip(ours.metadata[k], ref[k])]
    diffs.append(abs(ours.metadata["luminance_mean"] - ref["luminance_mean"]))
    diffs.append(abs(ours.metadata["background_ratio"] - ref["background_ratio"]))
    return max(diffs)


def build_mixed(folder: Path, copies: int = 2) -> list[Path]:
    """The mixed corpus's sources, ``copies`` distinct images of each kind: JPEG, LZW TIFF,
    16-bit PNG, a 10:1 panorama."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    jpegs = build_plates(folder / "jpeg", copies, 32.0)
    bases = build_plates(folder / "src24", copies, 24.0)
    out = []
    for i, (jpeg, base) in enumerate(zip(jpegs, bases)):
        tiff, png16 = folder / f"plate-{i}-lzw-5657x4243.tif", folder / f"plate-{i}-gray16-5657x4243.png"
        pano = folder / f"plate-{i}-panorama-20000x2000.jpg"
        if not tiff.exists():
            with Image.open(base) as im:
                im.save(tiff, compression="tiff_lzw")
        if not png16.exists():
            with Image.open(base) as im:
                grey = np.asarray(im.convert("L"), np.uint16) * 257 + np.random.default_rng(i).integers(
                    0, 200, (im.height, im.width), dtype=np.uint16)
            Image.fromarray(grey).save(png16, compress_level=6)  # uint16: mode I;16
        if not pano.exists():
            with Image.open(jpeg) as im:
                strip = im.crop((0, im.height // 2 - 1000, im.width, im.height // 2 + 1000))
                wide = Image.new("RGB", (20000, 2000))
                for x in range(0, 20000, strip.width):
                    wide.paste(strip, (x, 0))
                wide.save(pano, quality=92)
        out += [jpeg, tiff, png16, pano]
    return out


def end_to_end(args) -> None:
    import os

    from PIL import Image

    sources = build_mixed(args.data / "mixed")
    base = Path(tempfile.mkdtemp(prefix="plateflow-e2e-"))
    plateflow = str(Path(sys.executable).with_name("plateflow"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(base / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")

    def corpus(name: str) -> Path:
        root = base / name
        for i, src in enumerate(sources):
            d = root / "plates_structured" / f"plate-{i + 1:03d}"
            (d / "source").mkdir(parents=True)
            shutil.copy2(src, d / "source" / src.name)
            (d / "manifest.json").write_text(json.dumps({"plate_id": d.name, "source_image": f"source/{src.name}"}))
        return root

    def refresh(root: Path, *options: str) -> float:
        t = time.perf_counter()
        subprocess.run([plateflow, "refresh", "--root", str(root), "--workers", str(args.workers), *options],
                       env=env, check=True, capture_output=True)
        return time.perf_counter() - t

    def decode(path: Path) -> None:
        with Image.open(path) as im:
            im.load()

    def one_tiny_plate(name: str) -> Path:
        from PIL import Image

        root = base / name
        d = root / "plates_structured" / "plate-001"
        (d / "source").mkdir(parents=True)
        # A picture on paper, so that every step a plate takes runs (a blank page skips the
        # perceptual hash, and with it the first-call import of scipy's DCT).
        tiny = Image.new("RGB", (64, 64), (240, 238, 230))
        tiny.paste(Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 40, 3), np.uint8)), (12, 16))
        tiny.save(d / "source" / "tiny.png")
        (d / "manifest.json").write_text(json.dumps({"plate_id": "plate-001", "source_image": "source/tiny.png"}))
        return root

    (base / "empty" / "plates_structured").mkdir(parents=True)
    try:
        refresh(base / "empty")  # starts the local server: no variant's cost
        results: dict[str, list[float]] = {"decode": [], "empty refresh": [], "one tiny plate": [],
                                           "refresh --no-viz": [], "refresh": []}
        for r in range(args.repeats):
            for p in sources:
                p.read_bytes()  # the page cache holds them for every variant alike
            t = time.perf_counter()
            with ThreadPoolExecutor(args.workers) as pool:
                list(pool.map(decode, sources))
            results["decode"].append(time.perf_counter() - t)
            results["empty refresh"].append(refresh(base / "empty"))
            results["one tiny plate"].append(refresh(one_tiny_plate(f"tiny-{r}")))
            results["refresh --no-viz"].append(refresh(corpus(f"noviz-{r}"), "--no-viz"))
            results["refresh"].append(refresh(corpus(f"viz-{r}")))
    finally:
        subprocess.run([plateflow, "local-server", "--stop"], env=env, capture_output=True)
        shutil.rmtree(base, ignore_errors=True)  # a corpus a variant and repeat: gigabytes
    best = {k: min(v) for k, v in results.items()}
    floor, fixed = best["decode"], best["one tiny plate"]
    mp = sum(w * h for w, h in (Image.open(p).size for p in sources)) / 1e6
    print(f"{len(sources)} plates, {mp:.0f} MP in all ({', '.join(p.suffix for p in sources)}); "
          f"{args.workers} worker(s), best of {args.repeats}")
    print("\n| variant | seconds | above a refresh of one tiny plate | x decode | target |")
    print("|---|---|---|---|---|")
    print(f"| plain decode (floor) | {floor:.2f} | | 1.00 | |")
    print(f"| empty refresh | {best['empty refresh']:.2f} | | | |")
    print(f"| one tiny plate (fixed cost of a refresh with work) | {fixed:.2f} | | | |")
    for name in ("refresh --no-viz", "refresh"):
        print(f"| {name} | {best[name]:.2f} | {best[name] - fixed:.2f} | {(best[name] - fixed) / floor:.2f} | "
              f"<= 2x, toward 1.5x |")
    cmd = [sys.executable, __file__, "--parts", "--repeats", str(args.repeats), "--data", str(args.data)]
    split = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    print(f"\nwhat each part costs, in one thread, in process (best of {args.repeats}):\n")
    print("| part | seconds | x plain decode |\n|---|---|---|")
    for part, seconds in split.items():
        print(f"| {part} | {seconds:.2f} | {seconds / split['plain decode']:.2f} |")
    write_result("cpu_stage", {"plates": len(sources), "megapixels": round(mp), "workers": args.workers,
                               "repeats": args.repeats, "seconds": {k: round(v, 3) for k, v in best.items()},
                               "x_decode": {n: round((best[n] - fixed) / floor, 2) for n in ("refresh --no-viz", "refresh")},
                               "parts_seconds": split},
                 sys.argv[1:])


def parts(sources: list[Path], repeats: int) -> dict[str, float]:
    """Seconds of each part of the characterization over ``sources`` in one worker thread, as a
    refresh runs its tasks (best of ``repeats``): the steps of ``characterize_image`` and
    ``save_characterization`` timed one by one, against plain decoding in a worker thread too,
    measured first (before plateflow sets Pillow's allocation)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(_parts, sources, repeats).result()


def _parts(sources: list[Path], repeats: int) -> dict[str, float]:
    import hashlib
    import os

    from PIL import Image

    def plain(path: Path) -> None:
        with Image.open(path) as im:
            im.load()

    best: dict[str, float] = {}

    def timed(part: str, seconds: float) -> None:
        totals[part] = totals.get(part, 0.0) + seconds

    for p in sources:
        p.read_bytes()
    for _ in range(repeats):
        t = time.perf_counter()
        for p in sources:
            plain(p)
        best["plain decode"] = min(best.get("plain decode", 1e9), time.perf_counter() - t)

    from plateflow.characterize.histograms import compute_histograms, histogram_record
    from plateflow.characterize.metadata import image_metadata
    from plateflow.characterize.quality import plate_quality
    from plateflow.characterize.save import save_characterization
    from plateflow.characterize.step import Characterization
    from plateflow.characterize.viz import png_bytes
    from plateflow.config import CharacterizeParams
    from plateflow.corpus import PlateRef
    from plateflow.hashindex import SourceIndex, open_source
    from plateflow.image import decode_bytes, recycle, release_recycled
    from plateflow.profiles import quality_profile

    params, profile = CharacterizeParams(), quality_profile()
    out = Path(tempfile.mkdtemp(prefix="plateflow-parts-"))
    index = SourceIndex(out)
    stamps = {}
    for p in sources:
        os.utime(p, (time.time() - 3600,) * 2)  # hashed well after its last write: trusted, as a corpus's sources are
        stamps[p] = (index.sha256(p), index.stamp(p))
    warm = out / "warm.png"
    Image.new("RGB", (64, 64), (200, 190, 180)).save(warm)
    for r in range(repeats + 1):  # the first round warms up (imports, the plots' backgrounds)
        totals: dict[str, float] = {}
        for p in ([warm] if r == 0 else []) + sources:
            t = time.perf_counter()
            with open(p, "rb") as fh:
                hashlib.file_digest(fh, "sha256")
            timed("hash (the refresh's one)", time.perf_counter() - t)
            sha, stamp = stamps.get(p, (None, None))
            t = time.perf_counter()
            with open_source(p, sha, stamp) as (data, sha256):
                decoded = decode_bytes(data, p.name, params.max_pixels, sha256, grey=True)
            timed("decode (read, 16-bit and alpha to 8-bit)", time.perf_counter() - t)
            t = time.perf_counter()
            hist = compute_histograms(decoded.image, params.background_threshold)
            metadata = image_metadata(decoded, hist, params)
            timed("histograms and pixel hash", time.perf_counter() - t)
            t = time.perf_counter()
            metadata["quality"], small = plate_quality(hist, decoded.image, decoded.image, profile)
            timed("quality flags (with the preview-size image)", time.perf_counter() - t)
            t = time.perf_counter()
            preview = png_bytes(small)
            timed("preview PNG", time.perf_counter() - t)
            recycle(decoded.image)
            del decoded
            result = Characterization(sha256, "bench", metadata, histogram_record(hist, params.bins), preview)
            t = time.perf_counter()
            save_characterization(PlateRef(p.stem, out / f"round-{r}" / p.stem, p.stem, p, p.name), out, result)
            timed("histogram plots and files written", time.perf_counter() - t)
        release_recycled()
        shutil.rmtree(out / f"round-{r}", ignore_errors=True)
        if r:
            for part, seconds in totals.items():
                best[part] = min(best.get(part, 1e9), seconds)
    shutil.rmtree(out, ignore_errors=True)
    return {k: round(v, 3) for k, v in best.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plates", type=int, default=4)
    ap.add_argument("--megapixels", type=float, default=32.0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", type=Path, default=HERE / "out" / "cpu_plates")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--end-to-end", action="store_true", help="Through `plateflow refresh`, on a mixed corpus.")
    ap.add_argument("--parts", action="store_true", help=argparse.SUPPRESS)  # child of --end-to-end
    args = ap.parse_args()
    if args.parts:
        print(json.dumps(parts(build_mixed(args.data / "mixed"), args.repeats)))
        return
    if args.end_to_end:
        end_to_end(args)
        return
    paths = build_plates(args.data, args.plates, args.megapixels)
    if args.variant:  # child process: run one variant, print JSON
        repeats = 1 if args.variant == "numpy" else args.repeats
        print(json.dumps(run_variant(args.variant, paths, args.workers, repeats)))
        return

    from PIL import Image

    sizes = [Image.open(p).size for p in paths]
    largest_decoded = max(w * h * 3 for w, h in sizes)
    print(f"{len(paths)} plates, {sizes[0][0]}x{sizes[0][1]} ({sizes[0][0] * sizes[0][1] / 1e6:.1f} MP), "
          f"{sum(p.stat().st_size for p in paths) / len(paths) / 1e6:.1f} MB JPEG each; "
          f"{args.workers} worker thread(s), best of {args.repeats}")
    results = {}
    for variant in ("decode", "plateflow (no quality flags)", "plateflow", "plateflow+viz (no quality flags)",
                    "plateflow+viz", "plateflow+viz+working copy", "numpy"):
        cmd = [sys.executable, __file__, "--variant", variant, "--plates", str(args.plates),
               "--megapixels", str(args.megapixels), "--workers", str(args.workers),
               "--repeats", str(args.repeats), "--data", str(args.data)]
        results[variant] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    floor = results["decode"]["seconds"]
    limit = 2 * largest_decoded + 400e6
    print("\n| variant | s/plate | x decode | peak RSS (MB) | target |")
    print("|---|---|---|---|---|")
    targets = {"decode": "floor", "plateflow (no quality flags)": "", "plateflow": "<= 1.5x",
               "plateflow+viz (no quality flags)": "", "plateflow+viz": "<= 2x",
               "plateflow+viz+working copy": "(with models)", "numpy": "reference"}
    for v, r in results.items():
        print(f"| {v} | {r['seconds'] / len(paths):.3f} | {r['seconds'] / floor:.2f} | "
              f"{r['peak_rss'] / 1e6:.0f} | {targets[v]} |")
    print(f"\nquality flags (pixel hash, scores at {quality_side()} px, perceptual hash), target <= 10% of the CPU stage:")
    for viz, what in (("+viz", "with the viz files (the default; the preview is the flags' image)"),
                      ("", "without the viz files (--no-viz)")):
        flags = results[f"plateflow{viz}"]["seconds"] / results[f"plateflow{viz} (no quality flags)"]["seconds"] - 1
        print(f"  {what}: {100 * flags:+.1f}%")
    print(f"histogram plots (matplotlib, three PNGs): {1000 * plot_seconds(paths[0]):.1f} ms per plate")
    speedup = results["numpy"]["seconds"] / results["plateflow"]["seconds"]
    print(f"\nplateflow vs NumPy: {speedup:.1f}x faster (target >= 10x)")
    print(f"peak memory limit (2 x largest decoded {largest_decoded / 1e6:.0f} MB + 400 MB): {limit / 1e6:.0f} MB; "
          f"plateflow+viz peak {results['plateflow+viz']['peak_rss'] / 1e6:.0f} MB "
          f"(of which {results['plateflow+viz']['rss_after_imports'] / 1e6:.0f} MB is the interpreter and imports)")
    print(f"max |plateflow - NumPy| over the statistics: {check_agreement(paths[0]):.2e}")


if __name__ == "__main__":
    main()
