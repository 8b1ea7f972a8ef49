"""Scale benchmark: what a refresh costs per plate, end to end through `plateflow refresh`.

Builds N tiny plates (64x64 PNG on paper) and runs, in one run and each as its own
`plateflow refresh` process on the embedded default (plateflow's local server, started by a
first refresh of an empty corpus that no variant is charged for, with a Prefect database of
its own):

  empty       a corpus with no plates: the fixed cost (imports, connecting, the tables)
  first       every plate characterized
  unchanged   nothing changed: every plate found current without a task run
  one changed one source rewritten

and reports each one's seconds, its cost per plate above the empty refresh, the refresh
process's peak RSS and how much Prefect's database grew; then the same with `--dask local:2`
(on a copy of the corpus as it was before its first refresh).

    uv run python benchmarks/scale.py --plates 20000

With ``--models``, the variants are refreshes with a model (a tiny random-weight ViT built from
its config, embedded on this machine's CPU: what is measured is what a refresh with models
costs around the model), written to ``scale-models-<plates>.json``:

    uv run python benchmarks/scale.py --plates 5000 --models --no-dask
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests")]
sys.path.insert(0, str(HERE))

from results import RESULTS, write_result  # noqa: E402 - benchmarks/results.py


def build(root: Path, n: int) -> None:
    from fixtures.plates import make_plate, paper_plate

    (root / "plates_structured").mkdir(parents=True, exist_ok=True)
    old = time.time() - 3600  # sources made an hour ago, as scans are
    for i in range(n):
        d = make_plate(root, f"plate-{i + 1:06d}", paper_plate(64, 64, seed=i), filename="scan.png")
        os.utime(d / "source" / "scan.png", (old, old))


PLATEFLOW = str(Path(sys.executable).with_name("plateflow"))


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


def refresh(root: Path, home: Path, *options: str) -> tuple[float, float, str]:
    """(seconds, peak RSS in MB of the refresh process itself, its last line)."""
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen([PLATEFLOW, "refresh", "--root", str(root), *options], env=_env(home),
                                stdout=out, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - t
        out.seek(0)
        text = out.read()
    if proc.returncode != 0:
        raise SystemExit(f"refresh failed ({proc.returncode}):\n{text[-5000:]}")
    return seconds, usage.ru_maxrss / 1024, text.strip().splitlines()[-1]


def db_mb(home: Path) -> float:
    return sum(p.stat().st_size for p in home.glob("prefect.db*")) / 2**20


def variants(root: Path, empty: Path, home: Path, options: tuple[str, ...]) -> list[tuple]:
    def change():
        from fixtures.plates import paper_plate

        paper_plate(64, 64, seed=10**6 + len(options)).save(root / "plates_structured" / "plate-000001" / "source"
                                                             / "scan.png")

    rows = []
    for name, prepare, where in [("empty", None, empty), ("first", None, root), ("unchanged", None, root),
                                 ("one changed", change, root)]:
        if prepare:
            prepare()
        db = db_mb(home)
        seconds, peak, last = refresh(where, home, *options)
        rows.append((name, seconds, peak, db_mb(home) - db, last))
    return rows


def work_alone(base: Path, n: int, workers: int, viz: bool) -> float:
    """Seconds per plate of the per-plate functions alone (``characterize_plates``: decode,
    statistics, files) on ``n`` fresh tiny plates with ``workers`` threads: what a computed plate
    costs without any orchestration. The first refresh's cost above it is orchestration."""
    from concurrent.futures import ThreadPoolExecutor

    from plateflow.config import CharacterizeParams
    from plateflow.corpus import discover_plates
    from plateflow.hashindex import sha256_file
    from plateflow.characterize.step import characterize_plates

    root = base / "work-alone"
    build(root, n)
    items = [(p, sha256_file(p.source_path), None) for p in discover_plates(root)]
    chunks = [items[i:i + 64] for i in range(0, len(items), 64)]
    t = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda c: characterize_plates(c, CharacterizeParams(viz=viz), root), chunks))
    return (time.perf_counter() - t) / n


def table(rows: list[tuple], plates: int, title: str, alone: float | None = None) -> dict:
    """Print the variants' table; return its figures."""
    empty_s = rows[0][1]
    print(f"\n| {title} ({plates} plates) | seconds | ms per plate above empty | peak RSS MB | Prefect DB growth MB |")
    print("|---|---|---|---|---|")
    for name, seconds, peak, grew, _ in rows:
        per = "" if name == "empty" else f"{1000 * (seconds - empty_s) / plates:.2f}"
        if name == "one changed":
            per = f"{seconds - empty_s:.1f} s above empty, {seconds - rows[2][1]:+.1f} s vs unchanged"
        print(f"| {name} | {seconds:.1f} | {per} | {peak:.0f} | {grew:.2f} |")
    if alone is not None:
        first = (rows[1][1] - empty_s) / plates
        print(f"\nper computed plate: {1000 * first:.2f} ms in the first refresh (above empty), "
              f"{1000 * alone:.2f} ms for the per-plate functions alone (same threads): orchestration "
              f"{1000 * (first - alone):.2f} ms per plate")
    for name, *_, last in rows:
        print(f"{name}: {last}")
    return {name: {"seconds": round(seconds, 2), "ms_per_plate_above_empty": round(1000 * (seconds - empty_s) / plates, 3),
                   "peak_rss_mb": round(peak), "prefect_db_growth_mb": round(grew, 2)}
            for name, seconds, peak, grew, _ in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plates", type=int, default=20_000)
    ap.add_argument("--no-dask", action="store_true", help="Skip the --dask local:2 variants.")
    ap.add_argument("--viz", action="store_true", help="Write the viz/ PNGs too (the targets are without them).")
    ap.add_argument("--models", action="store_true",
                    help="Refreshes with a tiny random-weight model (tiny_dinov2, on the CPU).")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="plateflow-scale-"))
    models = ()
    if args.models:
        from fixtures.tiny_models import build_tiny_models

        profiles, weights = build_tiny_models(base / "tiny-models")
        os.environ.update(PLATEFLOW_PROFILES=str(profiles), PLATEFLOW_WEIGHTS=str(weights), HF_HUB_OFFLINE="1")
        models = ("--models", "tiny_dinov2", "--gpu-class", "CPU")
    home = base / "prefect-home"
    empty = base / "empty"
    (empty / "plates_structured").mkdir(parents=True)
    root = base / "corpus"
    t = time.perf_counter()
    build(root, args.plates)
    print(f"{args.plates} plates built in {time.perf_counter() - t:.0f} s under {base}")
    if not args.no_dask:
        shutil.copytree(root, base / "corpus-dask", copy_function=shutil.copy2)
    try:
        refresh(empty, home)  # the local server's start and the database's creation are no variant's cost
        viz = (() if args.viz else ("--no-viz",)) + models
        in_process = variants(root, empty, home, viz)
        from plateflow.config import default_workers

        title = "refresh --models tiny_dinov2" if models else "refresh"
        alone = None if models else work_alone(base, min(args.plates, 2000), default_workers(), args.viz)
        figures = {"plates": args.plates, title: table(in_process, args.plates, title, alone)}
        if not args.no_dask:
            figures[f"{title} --dask local:2"] = table(variants(base / "corpus-dask", empty, home,
                                                                ("--dask", "local:2", *viz)),
                                                       args.plates, f"{title} --dask local:2")
        write_result("scale", figures, sys.argv[1:],
                     out=RESULTS / f"scale-{'models-' if models else ''}{args.plates}.json")
    finally:
        subprocess.run([PLATEFLOW, "local-server", "--stop"], env=_env(home), capture_output=True)
        shutil.rmtree(base, ignore_errors=True)  # 10^5 plates are gigabytes


if __name__ == "__main__":
    main()
