"""Report benchmark: building ROOT/reports/ and the corpus-wide quality flags at N plates.

Writes a plates.parquet of N synthetic plates (sizes, statistics, flags and hashes drawn at
random, a few percent flagged, some near-duplicate hashes) into a temporary corpus with a plate
folder and preview for each, then times, in this process:

  corpus flags   plateflow.characterize.quality.corpus_flags over every row (odd size, exact and near duplicates),
                 which each refresh runs when it writes plates.parquet;
  report         plateflow.report.build_report from scratch (index, plots, contact-sheet and flag pages);
  unchanged      build_report again, with nothing changed (the fingerprint check);

and, with Chromium, how long the index and a contact-sheet page take to load.

    uv run python benchmarks/report.py [--plates 100000]
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from results import write_result  # noqa: E402 - benchmarks/results.py, beside this file


def build_corpus(root: Path, n: int) -> None:
    import pyarrow as pa
    from PIL import Image

    from plateflow.atomic import write_parquet
    from plateflow.layout import CorpusLayout
    from plateflow.tables import PLATES_SCHEMA
    from plateflow.flags import PLATE_FLAGS

    rng = np.random.default_rng(0)
    corpus = CorpusLayout(root)
    corpus.plates.mkdir(parents=True)
    buf = io.BytesIO()
    Image.new("RGB", (128, 96), (230, 225, 210)).save(buf, "PNG")
    folders = [f"plate-{i + 1:06d}" for i in range(n)]
    for folder in folders:  # a plate folder with its preview, as a refresh leaves it
        (corpus.plates / folder / "viz").mkdir(parents=True)
        (corpus.plates / folder / "viz" / "input_preview.png").write_bytes(buf.getvalue())
    width = rng.normal(6000, 300, n).astype(int)
    height = (width * rng.normal(1.33, 0.05, n)).astype(int)
    width[:20] //= 8  # a few odd sizes
    phash = rng.integers(0, 2**63, n, dtype=np.uint64)
    phash[1::500] = phash[0:-1:500]  # a near duplicate every 500 plates
    flags = [[f for f in PLATE_FLAGS if rng.random() < 0.01] for _ in range(n)]
    status = np.where(rng.random(n) < 0.002, "failed", "ok")
    columns = {
        "plate_dir": folders, "plate_id": folders, "status": status.tolist(),
        "error": [None if s == "ok" else "ImageDecodeError: truncated" for s in status],
        "width": width.tolist(), "height": height.tolist(),
        "megapixels": (width * height / 1e6).tolist(), "luminance_mean": rng.normal(200, 20, n).tolist(),
        "entropy": rng.normal(5.5, 1.0, n).tolist(), "background_ratio": rng.random(n).tolist(),
        "paper_share": rng.random(n).tolist(),
        "quality_flags": flags, "pixel_hash": [f"h{i}" for i in range(n)],
        "phash": [f"{int(h):016x}" for h in phash], "characterize_status": ["cached"] * n,
        "original_path": [f"/scans/box-{i // 1000:03d}/scan {i:06d}.tif" for i in range(n)],
        "source_image": [f"source/scan {i:06d}.tif" for i in range(n)],
        "image_format": ["TIFF"] * n, "mode": ["RGB"] * n, "file_size_bytes": (width * height * 3).tolist(),
        "quality_scores": [{"brightness": 250, "foreground_brightness": 40, "paper_luminance": 231,
                            "foreground_share": float(f), "entropy": 6.0, "edge_width": 0.9, "tint_spread": 0.3}
                           for f in rng.random(n)],
    }
    rows = [{**{f.name: None for f in PLATES_SCHEMA}, **{k: v[i] for k, v in columns.items()}} for i in range(n)]
    table = pa.Table.from_pylist(rows, schema=PLATES_SCHEMA)
    write_parquet(corpus.table, table)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plates", type=int, default=100_000)
    ap.add_argument("--no-browser", action="store_true")
    args = ap.parse_args()

    from plateflow.profiles import quality_profile
    from plateflow.corpus_flags import corpus_flags
    from plateflow.report import CHUNK, build_report

    base = Path(tempfile.mkdtemp(prefix="plateflow-report-"))
    try:
        root = base / "corpus"
        t = time.perf_counter()
        rows = build_corpus(root, args.plates)
        print(f"{args.plates} plates written in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        corpus_flags(rows, quality_profile())
        flags_s = time.perf_counter() - t
        near = sum("near_duplicates" in (r["quality_flags"] or ()) for r in rows)
        import matplotlib  # noqa: F401 - imported once per refresh process anyway; timed apart
        t = time.perf_counter()
        report = build_report(root)
        build_s = time.perf_counter() - t
        t = time.perf_counter()
        build_report(root)
        again_s = time.perf_counter() - t
        pages = sorted(report.parent.glob("*.html"))
        size = {p.name: p.stat().st_size for p in pages}
        print("\n| step | seconds | target |")
        print("|---|---|---|")
        print(f"| corpus flags (odd size, exact and near duplicates; {near} near duplicates found) | {flags_s:.2f} | |")
        print(f"| report from scratch ({len(pages)} pages) | {build_s:.2f} | <= 5 s |")
        print(f"| report, nothing changed | {again_s:.3f} | |")
        print(f"\nindex.html {size['index.html'] / 1e3:.0f} kB; a contact-sheet page "
              f"{size['sheet-0001.html'] / 1e3:.0f} kB")
        figures = {"plates": args.plates, "corpus_flags_s": round(flags_s, 3), "near_duplicates": near,
                   "report_from_scratch_s": round(build_s, 3), "report_unchanged_s": round(again_s, 4),
                   "pages": len(pages), "index_kb": round(size["index.html"] / 1e3),
                   "sheet_page_kb": round(size["sheet-0001.html"] / 1e3)}
        if not args.no_browser:
            from playwright.sync_api import sync_playwright

            chromium = shutil.which("chromium") or "/usr/bin/chromium"
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium)
                tab = browser.new_page()
                middle = args.plates // 2
                for name in ("index.html", "sheet-0001.html",
                             f"plate.html#{middle // CHUNK}/plate-{middle + 1:06d}"):
                    t = time.perf_counter()
                    tab.goto(f"file://{report.parent / name}")
                    tab.wait_for_load_state("load")
                    if name.startswith("plate.html"):
                        tab.wait_for_selector("table.facts")
                    seconds = time.perf_counter() - t
                    figures[f"chromium_{name.split('.')[0]}_s"] = round(seconds, 3)
                    print(f"{name} loaded in Chromium in {seconds:.2f} s")
                browser.close()
        write_result("report", figures, sys.argv[1:])
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
