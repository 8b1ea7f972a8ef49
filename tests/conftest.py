import json
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session", autouse=True)
def _stop_local_server():
    """A refresh run in this process without a harness starts plateflow's local server in the
    background; it is stopped when the session ends, not left to its idle timeout."""
    yield
    from app.server import stop_local_server

    stop_local_server()


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for every flow test (starting one costs ~10 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def read_image(path) -> Image.Image:
    """The image file at ``path``, decoded, its file closed."""
    with Image.open(path) as im:
        im.load()
        return im


def paper_plate(width=320, height=240, seed=0, photo_colour=(40, 90, 160)) -> Image.Image:
    """A small plate: noisy off-white paper with a coloured block in the middle."""
    rng = np.random.default_rng(seed)
    a = np.clip(rng.normal(0, 3, (height, width, 1)) + [248, 246, 238], 0, 255).astype(np.uint8)
    y0, x0 = height // 4, width // 4
    a[y0:height - y0, x0:width - x0] = photo_colour
    a[y0:height - y0, x0:width - x0] += rng.integers(0, 20, (height - 2 * y0, width - 2 * x0, 1), dtype=np.uint8)
    return Image.fromarray(a)


def make_plate(root: Path, folder: str, image: Image.Image | bytes | None, filename="scan.jpg",
               manifest: dict | str | None = None, **save_kw) -> Path:
    """A plate folder in the notebooks' layout; ``manifest`` may be a dict, raw text or None."""
    d = root / "plates_structured" / folder
    (d / "source").mkdir(parents=True, exist_ok=True)
    if isinstance(image, Image.Image):
        image.save(d / "source" / filename, **save_kw)
    elif isinstance(image, bytes):
        (d / "source" / filename).write_bytes(image)
    if manifest is None:
        manifest = {"plate_id": folder, "source_image": f"source/{filename}"}
    if manifest is not False:
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        (d / "manifest.json").write_text(text)
    return d


@pytest.fixture
def corpus(tmp_path) -> Path:
    root = tmp_path / "corpus"
    for i in range(3):
        make_plate(root, f"plate-{i + 1:03d}", paper_plate(seed=i, photo_colour=(40 * i, 90, 160)))
    return root


def copy_corpus(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """(profiles dir, weights dir) with tiny random-weight timm and transformers models."""
    from tiny_models import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture
def tiny_env(tiny_models, monkeypatch):
    profiles, weights = tiny_models
    monkeypatch.setenv("PLATEFLOW_PROFILES", str(profiles))
    monkeypatch.setenv("PLATEFLOW_WEIGHTS", str(weights))
    monkeypatch.delenv("PLATEFLOW_GPU_CLASS", raising=False)
    return profiles, weights


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float, what: str, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API on 127.0.0.1: moto in server mode, reached through s3fs (its URL)."""
    import subprocess
    import sys
    import urllib.request

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def up():
        try:
            return urllib.request.urlopen(url + "/moto-api/", timeout=1).status == 200
        except OSError:
            return False

    try:
        wait_until(up, 60, "moto_server", every=0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def s3(s3_server, monkeypatch):
    """Credentials for the moto server in the environment, as a user would set them, and an
    s3fs filesystem to set up and inspect buckets with."""
    import s3fs

    env = {"AWS_ACCESS_KEY_ID": "plateflow-test", "AWS_SECRET_ACCESS_KEY": "plateflow-test-secret",
           "AWS_ENDPOINT_URL": s3_server, "AWS_DEFAULT_REGION": "us-east-1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()


def processes_with(marker: str) -> list[int]:
    """Pids of this machine's processes whose command line or environment holds ``marker`` (a
    test's own temporary folder): what a test started, and their children."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker.encode() in (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes():
                if (proc / "stat").read_text().split(") ")[1][0] != "Z":
                    found.append(int(proc.name))
        except OSError:
            continue
    return found


def assert_none_left(marker: str, timeout: float = 30) -> None:
    """Fail unless every process holding ``marker`` has ended within ``timeout``."""
    deadline = time.monotonic() + timeout
    while (left := processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes left behind: {[Path(f'/proc/{p}/cmdline').read_bytes()[:200] for p in left]}"
