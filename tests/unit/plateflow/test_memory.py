"""A refresh process keeps freed memory for the next plate: the second plate's buffers reuse the
first's pages instead of being faulted in again."""

import os
import subprocess
import sys

import yaml

from fixtures import REPO
from plateflow.memory import GLIBC_ENV

PROBE = """
import resource, sys, threading
from plateflow.memory import reuse_freed_memory
print(reuse_freed_memory())
from plateflow.image import Image  # numpy's import starts threads: the setting must come first

def plate():  # a decoded plate's worth of buffers, made and freed in a worker thread, as a refresh does
    im = Image.new("RGB", (8000, 5000), (240, 236, 228)); grey = im.convert("L"); del im, grey

def faults():
    t = threading.Thread(target=plate); t.start(); t.join()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

faults()
before = faults()
print(faults() - before)
"""


def _second_plate_faults(**env) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env={**os.environ, **env}, capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()
    return out[0], int(out[1])


def test_a_second_plate_reuses_the_pages_of_the_first():
    kept, reused = _second_plate_faults()
    system, faulted = _second_plate_faults(PLATEFLOW_MALLOC="system")
    assert (kept, system) == ("True", "False")
    assert faulted > 20_000  # 160 MB of Pillow's buffers faulted in again (4 KiB pages)
    assert reused < faulted / 20, (reused, faulted)


def test_the_work_pools_flow_runs_get_the_same_settings():
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert spec["definitions"]["work_pools"]["cpu"]["job_variables"]["env"] == GLIBC_ENV
