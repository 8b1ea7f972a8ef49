"""The wheels a CUDA host without a package index needs to run plateflow's GPU checks.

Such a host (a lab's GPU box, a cloud image with PyTorch) has torch and the scientific stack but
neither Prefect nor the rest of plateflow's packages, and cannot download them. This reads
uv.lock, walks plateflow's dependencies (and pytest's, for the GPU suite), leaves out what the
host already has (torch, CUDA's libraries, NumPy, SciPy, pyarrow, ...: --host-has) and downloads
the rest, at the locked versions, as wheels for the host's Python into a folder:

    python benchmarks/gpu/wheels.py --python-version 3.12 --dest .whl

then on the host, in the repository:

    python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:$PWD bash benchmarks/gpu/check.sh OUT
"""

from __future__ import annotations

import argparse
import fnmatch
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# What a CUDA host with PyTorch has (and what would not fit a small transfer): its versions serve.
HOST_HAS = ("torch", "torchvision", "triton", "nvidia-*", "cuda-*", "numpy", "scipy", "pyarrow", "pandas",
            "llvmlite", "numba", "scikit-image", "matplotlib", "fonttools", "contourpy", "kiwisolver", "networkx",
            "sympy", "mpmath", "transformers", "tokenizers", "safetensors", "huggingface-hub", "hf-xet", "grpcio",
            "setuptools", "pip", "pytest", "pluggy", "iniconfig", "pywin32")
# What the GPU checks do not use: the S3 client (buckets) and libvips (the best
# crop is then cut by Pillow, as where libvips is missing).
NOT_USED = ("s3fs", "aiobotocore", "botocore", "pyvips")
# The dev group's packages the GPU suite imports (not the browser, docs or S3 tooling).
TEST_PACKAGES = ("pytest", "pytest-timeout")
PIP = "python3"  # a Python with pip (uv's environments have none)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux_2_12_x86_64", "manylinux2010_x86_64", "manylinux_2_5_x86_64",
             "manylinux1_x86_64")


def closure(lock: dict, roots: list[dict], python: str, skip: list[str]) -> dict[str, str]:
    """name -> locked version of the ``roots`` (uv.lock dependency entries) and of everything they
    need on a Linux x86-64 host's CPython ``python`` (their markers and extras followed), short
    of the packages ``skip`` matches and what only they need."""
    from packaging.markers import Marker

    env = {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
    entries: dict[str, list[dict]] = {}
    for p in lock["package"]:
        entries.setdefault(p["name"], []).append(p)
    seen: dict[str, str] = {}
    todo = list(roots)
    while todo:
        dep = todo.pop()
        if "marker" in dep and not Marker(dep["marker"]).evaluate(env) \
                or any(fnmatch.fnmatch(dep["name"], pattern) for pattern in skip):
            continue
        candidates = [p for p in entries.get(dep["name"], []) if p["version"] == dep.get("version", p["version"])]
        if not candidates:
            continue
        package = candidates[0]
        for extra in dep.get("extra", []):
            todo += package.get("optional-dependencies", {}).get(extra, [])
        if package["name"] not in seen:
            seen[package["name"]] = package["version"]
            todo += package.get("dependencies", [])
    return seen


def has_wheel(lock: dict, name: str, version: str) -> bool:
    return any(p["name"] == name and p["version"] == version and p.get("wheels") for p in lock["package"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python-version", default="3.12", help="the host's Python (3.12: the workplace's CUDA image)")
    ap.add_argument("--dest", type=Path, default=REPO / ".whl")
    ap.add_argument("--host-has", default=",".join(HOST_HAS),
                    help="packages (fnmatch patterns) the host has already: left out")
    ap.add_argument("--leave-out", default=",".join(NOT_USED), help="packages the checks do not use: left out")
    ap.add_argument("--max-mb", type=float, default=58.0,
                    help="refuse a set larger than this (MiB; the device tool carries 64 MiB with the repository)")
    args = ap.parse_args()
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    root = next(p for p in lock["package"] if p["name"] == "plateflow")
    dev = root.get("dev-dependencies", {}).get("dev", [])
    roots = root["dependencies"] + [d for d in dev if d["name"] in TEST_PACKAGES]
    skip = [s.strip() for s in args.host_has.split(",") if s.strip()]
    skip += [s.strip() for s in args.leave_out.split(",") if s.strip()]
    wanted = {n: v for n, v in closure(lock, roots, args.python_version, skip).items() if n != "plateflow"}
    args.dest.mkdir(parents=True, exist_ok=True)
    for old in args.dest.glob("*.whl"):
        old.unlink()
    binary = {n: v for n, v in wanted.items() if has_wheel(lock, n, v)}
    cmd = [PIP, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", args.python_version, "--implementation", "cp", "-d", str(args.dest)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run(cmd + [f"{n}=={v}" for n, v in sorted(binary.items())], check=True)
    for name, version in sorted(set(wanted.items()) - set(binary.items())):  # a source release only (pyvips)
        subprocess.run([PIP, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(args.dest),
                        f"{name}=={version}"], check=True)
    for wheel in args.dest.glob("*-linux_x86_64.whl"):  # built here with compiled code: not for the host
        print(f"{wheel.name} was built for this machine, not the host", file=sys.stderr)
        return 1
    size = sum(w.stat().st_size for w in args.dest.glob("*.whl")) / 2**20
    print(f"{len(wanted)} packages, {size:.1f} MiB of wheels in {args.dest}")
    if size > args.max_mb:
        print(f"more than --max-mb {args.max_mb:g}: leave out what the host has (--host-has)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
