"""Benchmark results as data: ``write_result`` writes benchmarks/results/<benchmark>.json with
the machine, the versions, the command, the date and the figures, for the docs to render."""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PACKAGES = ("prefect", "numpy", "pillow", "pyarrow", "torch", "timm", "imagehash", "matplotlib")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def write_result(benchmark: str, figures: dict, argv: list[str], out: Path | None = None) -> Path:
    """Write the figures of one run of ``benchmarks/<benchmark>.py`` (its arguments ``argv``)."""
    path = out or RESULTS / f"{benchmark}.json"
    result = {
        "benchmark": benchmark,
        "command": " ".join(["uv run python", f"benchmarks/{benchmark}.py", *argv]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "versions": {p: v for p in PACKAGES if (v := _version(p))},
        "figures": figures,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return path
