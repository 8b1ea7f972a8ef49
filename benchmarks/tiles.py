"""Tiles benchmark: `make-tiles` in both modes against plain decoding of the same sources.

Builds large JPEG plates (a photograph on grainy paper, as benchmarks/cpu_stage.py), ingests
them, then measures in one run, with the worker threads make-tiles uses (one per core):

  decode          decode_image of every source (EXIF, 8-bit RGB: the decode rules tiles use)
  classic         the make-tiles flow, classic mode, every plate in train (the grid of whole
                  tiles, each a PNG), to a folder: a fresh tile store and DEST each time
  noise-framed    the same, noise-framed (the remainders too, framed by noise)
  classic → s3    classic again, to a bucket of a moto S3 server on 127.0.0.1 (through s3fs)
  noise → s3      noise-framed to the bucket

  uv run python benchmarks/tiles.py [--plates 4] [--megapixels 24] [--size 512x512] [--level 1]

Reports seconds (best of --repeats); for the flows also an unchanged re-run (the command's fixed
cost: a flow run, hashing, the shard check), and the work above it as a ratio to decoding, in
tiles/s and PNG MB/s written; and the PNG encoder alone, Pillow's against plateflow's
(plateflow/tiles.py:encode_png), on the same tiles. Writes benchmarks/out/tiles.json.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from results import write_result  # noqa: E402 - benchmarks/results.py
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def start_moto() -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_ENDPOINT_URL=url,
                      AWS_DEFAULT_REGION="us-east-1")
    return proc, url


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plates", type=int, default=4)
    ap.add_argument("--megapixels", type=float, default=24.0)
    ap.add_argument("--size", default="512x512")
    ap.add_argument("--level", type=int, default=1, help="PNG compression level of the tiles")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from benchmarks.cpu_stage import build_plates
    from plateflow.config import default_workers
    from plateflow.corpus import discover_plates
    from plateflow.ingest import ingest
    from plateflow.image import decode_image
    from plateflow.tiles import TileParams, cut_tiles, encode_png, split_of

    work = HERE / "out" / "tiles_bench"
    sources = build_plates(HERE / "out" / "cpu_plates", args.plates, args.megapixels)
    root = work / "corpus"
    if not root.exists():
        ingest(sources, root)
    plates = [p for p in discover_plates(root) if hasattr(p, "source_path")]
    source_mb = sum(p.source_path.stat().st_size for p in plates) / 1e6
    shas = {p.folder: hashlib.sha256(p.source_path.read_bytes()).hexdigest() for p in plates}
    w, _, h = args.size.partition("x")
    workers = default_workers()  # what make-tiles runs at once

    def best(fn) -> float:
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    def decode_all():
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda p: decode_image(p.source_path, 250_000_000, shas[p.folder]).image.load(), plates))

    results = {"decode": {"seconds": best(decode_all)}}

    # The encoder alone: the tiles of each plate cut once, then only encoded, on the same threads.
    params = TileParams(width=int(w), height=int(h), png_compress_level=args.level)
    cut = [t.image for p in plates
           for t in cut_tiles(decode_image(p.source_path, 250_000_000, shas[p.folder]).image, shas[p.folder],
                              "train", params)]

    def encode_all(encode):
        with ThreadPoolExecutor(workers) as pool:
            return sum(pool.map(encode, cut))

    def pillow_png(im):
        buf = io.BytesIO()
        im.save(buf, "PNG", compress_level=args.level)
        return len(buf.getvalue())

    results["PNG encode alone: Pillow"] = {"seconds": best(lambda: encode_all(pillow_png)), "tiles": len(cut)}
    results["PNG encode alone: plateflow"] = {"seconds": best(lambda: encode_all(lambda im: len(encode_png(im, args.level)))),
                                              "tiles": len(cut)}

    from app.local_server import local_api
    from flows.tiles import make_tiles
    from plateflow.layout import CorpusLayout

    moto, _ = start_moto()
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("bench")
    try:
        with local_api():
            for mode in ("classic", "noise-framed"):
                params = TileParams(width=int(w), height=int(h), mode=mode, png_compress_level=args.level)
                assert all(split_of(s, params) == "train" for s in shas.values())
                for target in ("folder", "s3"):
                    out = str(work / "dest") if target == "folder" else "s3://bench/tiles"

                    def run(out=out, params=params):
                        shutil.rmtree(CorpusLayout(root).tile_store, ignore_errors=True)
                        if out.startswith("s3://"):
                            fs.invalidate_cache()
                            if fs.exists(out):
                                fs.rm(out, recursive=True)
                        else:
                            shutil.rmtree(out, ignore_errors=True)
                        state = make_tiles(str(root), params, out, return_state=True)
                        assert state.is_completed(), state.message

                    seconds = best(run)
                    unchanged = best(lambda: make_tiles(str(root), params, out, return_state=True))
                    store = CorpusLayout(root).tile_store
                    n_tiles = sum(len(json.loads(p.read_bytes())["rows"]) for p in store.glob("*.json"))
                    png_mb = sum(p.stat().st_size for p in store.glob("*.tar")) / 1e6
                    label = ("classic" if mode == "classic" else "noise-framed") + (" → s3" if target == "s3" else "")
                    results[label] = {"seconds": seconds, "unchanged_rerun": unchanged, "tiles": n_tiles,
                                      "png_mb": png_mb}
    finally:
        moto.terminate()
        moto.wait()
    ref = results["decode"]["seconds"]
    print(f"{len(plates)} plates of {args.megapixels:g} MP ({source_mb:.0f} MB of JPEG), {args.size} tiles, "
          f"PNG level {args.level}, {workers} workers, best of {args.repeats}\n")
    print("| variant | seconds | unchanged re-run | work: seconds − re-run | work × decode | tiles/s | PNG MB/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        fixed = r.get("unchanged_rerun", 0.0)
        work = r["seconds"] - fixed
        tiles = f"{r['tiles'] / work:.0f}" if r.get("tiles") else "–"
        png = f"{r['png_mb'] / work:.0f}" if r.get("png_mb") else "–"
        print(f"| {name} | {r['seconds']:.2f} | {fixed:.2f} | {work:.2f} | {work / ref:.2f} | {tiles} | {png} |")
    write_result("tiles", {"plates": len(plates), "megapixels": args.megapixels, "size": args.size, "workers": workers,
                           "source_mb": round(source_mb, 1), **results}, sys.argv[1:])


if __name__ == "__main__":
    main()
