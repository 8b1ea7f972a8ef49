import os
from pathlib import Path

import pytest

from fixtures import DEVICE
from fixtures.plates import make_plate, paper_plate  # noqa: E402
from fixtures.processes import free_port, wait_until  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
if DEVICE == "cpu":
    # The suite on the CPU, as CI runs it, also on a host with a GPU: plateflow's model steps
    # use a GPU whenever torch sees one. PLATEFLOW_TEST_DEVICE=cuda runs them on the GPU.
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


def pytest_configure(config):
    if os.environ.get("PLATEFLOW_TEST_DEVICE", "cpu") not in ("cpu", "cuda"):
        raise pytest.UsageError(f"PLATEFLOW_TEST_DEVICE={os.environ['PLATEFLOW_TEST_DEVICE']!r}: cpu or cuda")
    if DEVICE == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise pytest.UsageError("PLATEFLOW_TEST_DEVICE=cuda, but torch sees no CUDA device "
                                    f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES="
                                    f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r})")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """A test marked gpu runs only where it can: selected (`-m gpu`) without a GPU, the session
    stops with a message instead of skipping it."""
    needs = [item.nodeid for item in items if item.get_closest_marker("gpu")]
    if needs and DEVICE != "cuda":
        raise pytest.UsageError(f"{len(needs)} selected test(s) need a CUDA device ({needs[0]}, ...): run them with "
                                f"PLATEFLOW_TEST_DEVICE=cuda on a GPU host; the default run leaves them out (-m 'not gpu')")


@pytest.fixture(scope="session", autouse=True)
def _stop_local_server():
    """A refresh run in this process without a harness starts plateflow's local server in the
    background; it is stopped when the session ends, not left to its idle timeout."""
    yield
    from app.local_server import stop_local_server

    stop_local_server()


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for every flow test (starting one costs ~10 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def corpus(tmp_path) -> Path:
    root = tmp_path / "corpus"
    for i in range(3):
        make_plate(root, f"plate-{i + 1:03d}", paper_plate(seed=i, photo_colour=(40 * i, 90, 160)))
    return root


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """(profiles dir, weights dir) with tiny random-weight timm and transformers models."""
    from fixtures.tiny_models import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture
def tiny_env(tiny_models, monkeypatch):
    profiles, weights = tiny_models
    monkeypatch.setenv("PLATEFLOW_PROFILES", str(profiles))
    monkeypatch.setenv("PLATEFLOW_WEIGHTS", str(weights))
    monkeypatch.delenv("PLATEFLOW_GPU_CLASS", raising=False)
    return profiles, weights


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


