"""Heads benchmark: three light heads trained on 20,000 plates of cached features the size of
dinov2_base's (768-d, 16 views, float16: 492 MB), on this machine's CPU.

Builds a feature store (plateflow/features.py:write_store) of synthetic features whose class shows in
a random low-dimensional subspace under noise, and a labels CSV; then, in a fresh process (so
its peak RSS is its own), trains three configurations with plateflow/heads.py:train_experiment,
each recorded as an experiment, and reports the seconds of each, their total, the test
accuracy, and the peak RSS against the store's size; then the same trainings on a store of 200
plates, whose peak RSS is the fixed cost (the interpreter, torch and its CPU kernels, pyarrow,
matplotlib), so what the features themselves cost shows.

    uv run python benchmarks/heads.py [--plates 20000] [--views 16] [--dim 768] [--epochs 30]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from results import write_result  # noqa: E402 - benchmarks/results.py
CONFIGS = [{"head": "linear", "lr": 1e-3}, {"head": "linear", "lr": 1e-2}, {"head": "mlp", "lr": 1e-3}]


def build(root: Path, plates: int, views: int, dim: int, classes: int = 5) -> None:
    from plateflow.features import write_store

    rng = np.random.default_rng(0)
    basis = rng.normal(size=(classes, dim)).astype(np.float32)
    labels = rng.integers(0, classes, plates)
    rows, vectors = [], []
    for i in range(plates):
        sha = hashlib.sha256(str(i).encode()).hexdigest()
        rows.append({"plate_dir": f"plate-{i + 1:05d}", "plate_id": f"plate-{i + 1:05d}", "sha256": sha})
        v = rng.normal(size=(views, dim)).astype(np.float32) + 0.05 * basis[labels[i]]
        vectors.append(v.astype(np.float16))
    write_store(root / "features" / "dinov2_base", rows, vectors,
                {"model": "dinov2_base", "dim": dim, "kind": "plates", "embedding_key": "benchmark"})
    with open(root / "labels.csv", "w") as fh:
        fh.write("plate_id,label\n")
        fh.writelines(f"{r['plate_id']},class-{k}\n" for r, k in zip(rows, labels))


def train(root: Path, epochs: int) -> dict:
    from plateflow.config import HeadConfig
    from plateflow.heads import train_experiment
    from plateflow.labels import read_labels

    t0 = time.perf_counter()
    labels = read_labels(root, "class", root / "labels.csv")
    out = []
    for c in CONFIGS:
        t = time.perf_counter()
        row = train_experiment(root, "dinov2_base", "class", HeadConfig(epochs=epochs, **c), labels)
        out.append({**c, "seconds": time.perf_counter() - t, "accuracy": row["accuracy"], "macro_f1": row["macro_f1"],
                    "train": row["train_size"], "test": row["test_size"]})
    return {"configs": out, "total_s": time.perf_counter() - t0,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plates", type=int, default=20_000)
    ap.add_argument("--views", type=int, default=16)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--train-only", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.train_only:
        print(json.dumps(train(args.train_only, args.epochs)))
        return
    def run(plates: int) -> tuple[dict, float]:
        root = HERE / "out" / f"heads_{plates}x{args.views}x{args.dim}"
        if not (root / "features" / "dinov2_base" / "meta.json").exists():
            t = time.perf_counter()
            build(root, plates, args.views, args.dim)
            print(f"built the store of {plates} plates in {time.perf_counter() - t:.1f} s")
        store_mb = sum(p.stat().st_size for p in (root / "features" / "dinov2_base").iterdir()) / 2**20
        proc = subprocess.run([sys.executable, __file__, "--train-only", str(root), "--epochs", str(args.epochs)],
                              capture_output=True, text=True, check=True)
        return json.loads(proc.stdout.strip().splitlines()[-1]), store_mb

    result, store_mb = run(args.plates)
    # The same three trainings on 200 plates: the fixed cost (Python, torch and its CPU kernels, pyarrow, matplotlib).
    fixed, _ = run(200)
    print(f"{args.plates} plates x {args.views} views x {args.dim} float16: store {store_mb:.0f} MiB; "
          f"{args.epochs} epochs, batch 256\n")
    print("| head | lr | seconds | test accuracy | macro-F1 | train / test plates |")
    print("|---|---:|---:|---:|---:|---:|")
    for c in result["configs"]:
        print(f"| {c['head']} | {c['lr']:g} | {c['seconds']:.1f} | {c['accuracy']:.3f} | {c['macro_f1']:.3f} | "
              f"{c['train']} / {c['test']} |")
    above = result["peak_rss_mb"] - fixed["peak_rss_mb"]
    print(f"\nall three: {result['total_s']:.1f} s (target < 60); peak RSS {result['peak_rss_mb']:.0f} MiB = "
          f"{result['peak_rss_mb'] / store_mb:.2f} x the store (target < 2); the same trainings on 200 plates: "
          f"{fixed['peak_rss_mb']:.0f} MiB, so the features cost {above:.0f} MiB = {above / store_mb:.2f} x the store")
    result["fixed_peak_rss_mb"] = fixed["peak_rss_mb"]
    write_result("heads", {"plates": args.plates, "views": args.views, "dim": args.dim, "store_mib": round(store_mb, 1),
                           **{k: v for k, v in result.items() if k != "configs"},
                           **{f"{c['head']} lr {c['lr']:g}": {k: c[k] for k in ("seconds", "accuracy", "macro_f1")}
                              for c in result["configs"]}}, sys.argv[1:])


if __name__ == "__main__":
    main()
