"""Scale benchmark: what a refresh costs per plate, end to end through `plateflow refresh`.

Builds N tiny plates (64x64 PNG on paper) and runs, in one run and each as its own
`plateflow refresh` process on the embedded default (a temporary server, a Prefect database of
its own):

  empty       a corpus with no plates: the fixed cost (imports, the server's start)
  first       every plate characterised
  unchanged   nothing changed: every plate found current without a task run
  one changed one source rewritten

and reports each one's seconds, its cost per plate above the empty refresh, the process's peak
RSS and how much Prefect's database grew.

    uv run python benchmarks/scale.py --plates 20000
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests")]


def build(root: Path, n: int) -> None:
    from conftest import make_plate, paper_plate

    (root / "plates_structured").mkdir(parents=True, exist_ok=True)
    old = time.time() - 3600  # sources made an hour ago, as scans are
    for i in range(n):
        d = make_plate(root, f"plate-{i + 1:06d}", paper_plate(64, 64, seed=i), filename="scan.png")
        os.utime(d / "source" / "scan.png", (old, old))


def refresh(root: Path, home: Path) -> tuple[float, float, str]:
    """(seconds, peak RSS in MB of the refresh process, its last line)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    done = subprocess.run([str(Path(sys.executable).with_name("plateflow")), "refresh", "--root", str(root)],
                          env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if done.returncode != 0:
        raise SystemExit(f"refresh failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    peak = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    return seconds, peak, done.stdout.strip().splitlines()[-1]


def db_mb(home: Path) -> float:
    return sum(p.stat().st_size for p in home.glob("prefect.db*")) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plates", type=int, default=20_000)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="plateflow-scale-"))
    home = base / "prefect-home"
    empty = base / "empty"
    (empty / "plates_structured").mkdir(parents=True)
    root = base / "corpus"
    t = time.perf_counter()
    build(root, args.plates)
    print(f"{args.plates} plates built in {time.perf_counter() - t:.0f} s under {base}")

    refresh(empty, home)  # the database's creation is not any variant's cost
    rows = []
    for name, prepare, where in [
        ("empty", None, empty),
        ("first", None, root),
        ("unchanged", None, root),
        ("one changed", lambda: __import__("conftest").paper_plate(64, 64, seed=10**6).save(
            root / "plates_structured" / "plate-000001" / "source" / "scan.png"), root),
    ]:
        if prepare:
            prepare()
        db = db_mb(home)
        seconds, peak, last = refresh(where, home)
        rows.append((name, seconds, peak, db_mb(home) - db, last))
    empty_s = rows[0][1]
    print(f"\n| refresh ({args.plates} plates) | seconds | ms per plate above empty | peak RSS MB (max so far) "
          f"| Prefect DB growth MB |")
    print("|---|---|---|---|---|")
    for name, seconds, peak, grew, _ in rows:
        per = "" if name == "empty" else f"{1000 * (seconds - empty_s) / args.plates:.2f}"
        if name == "one changed":
            per = f"{seconds - empty_s:.1f} s above empty (one plate)"
        print(f"| {name} | {seconds:.1f} | {per} | {peak:.0f} | {grew:.2f} |")
    for name, *_, last in rows:
        print(f"{name}: {last}")


if __name__ == "__main__":
    main()
