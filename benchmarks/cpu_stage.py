"""CPU stage benchmark: plateflow's characterisation against plain decoding and plain NumPy.

Builds >= 30 MP JPEG plates (a photograph on grainy off-white paper), then times, in one run and
with the same number of worker threads, each variant in its own subprocess (so peak memory is
measured per variant):

  decode      Image.open(...).load() of every source: the floor
  plateflow   characterize_image + save (JSON only, viz=False)
  +viz        the same with the preview and histogram PNGs
  numpy       a straightforward NumPy implementation of the same statistics

    uv run python benchmarks/cpu_stage.py [--plates 4] [--megapixels 32] [--workers 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


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
    from tasks.characterize import characterize_image
    from tasks.save import save_characterization

    out_root = Path(tempfile.mkdtemp(prefix="plateflow-bench-"))

    def decode(path):
        with Image.open(path) as im:
            im.load()

    def plateflow(path, viz):
        params = CharacterizeParams(viz=viz)
        result = characterize_image(path, params)
        plate_dir = out_root / path.stem
        ref = PlateRef(path.stem, plate_dir, path.stem, path, path.name)
        save_characterization(ref, out_root, result)

    fn = {
        "decode": decode,
        "plateflow": lambda p: plateflow(p, False),
        "plateflow+viz": lambda p: plateflow(p, True),
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
    return {"variant": variant, "seconds": min(times), "all_seconds": times,
            "peak_rss": peak_rss(),
            "rss_after_imports": rss_before}


def check_agreement(path: Path) -> float:
    """Max absolute difference between plateflow's and the NumPy statistics (they must agree)."""
    from plateflow.config import CharacterizeParams
    from tasks.characterize import characterize_image

    ours = characterize_image(path, CharacterizeParams(viz=False))
    ref = numpy_reference(path)
    assert ours.histograms["rgb_hist_full"] == dict(zip("rgb", ref["hist"])), "histograms differ"
    diffs = [abs(a - b) for k in ("mean_rgb", "std_rgb", "min_rgb", "max_rgb")
             for a, b in zip(ours.metadata[k], ref[k])]
    diffs.append(abs(ours.metadata["luminance_mean"] - ref["luminance_mean"]))
    diffs.append(abs(ours.metadata["background_ratio"] - ref["background_ratio"]))
    return max(diffs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plates", type=int, default=4)
    ap.add_argument("--megapixels", type=float, default=32.0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", type=Path, default=HERE / "out" / "cpu_plates")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
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
    for variant in ("decode", "plateflow", "plateflow+viz", "numpy"):
        cmd = [sys.executable, __file__, "--variant", variant, "--plates", str(args.plates),
               "--megapixels", str(args.megapixels), "--workers", str(args.workers),
               "--repeats", str(args.repeats), "--data", str(args.data)]
        results[variant] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    floor = results["decode"]["seconds"]
    limit = 2 * largest_decoded + 400e6
    print("\n| variant | s/plate | x decode | peak RSS (MB) | target |")
    print("|---|---|---|---|---|")
    targets = {"decode": "floor", "plateflow": "<= 1.5x", "plateflow+viz": "<= 2x", "numpy": "reference"}
    for v, r in results.items():
        print(f"| {v} | {r['seconds'] / len(paths):.3f} | {r['seconds'] / floor:.2f} | "
              f"{r['peak_rss'] / 1e6:.0f} | {targets[v]} |")
    speedup = results["numpy"]["seconds"] / results["plateflow"]["seconds"]
    print(f"\nplateflow vs NumPy: {speedup:.1f}x faster (target >= 10x)")
    print(f"peak memory limit (2 x largest decoded {largest_decoded / 1e6:.0f} MB + 400 MB): {limit / 1e6:.0f} MB; "
          f"plateflow+viz peak {results['plateflow+viz']['peak_rss'] / 1e6:.0f} MB "
          f"(of which {results['plateflow+viz']['rss_after_imports'] / 1e6:.0f} MB is the interpreter and imports)")
    print(f"max |plateflow - NumPy| over the statistics: {check_agreement(paths[0]):.2e}")


if __name__ == "__main__":
    main()
