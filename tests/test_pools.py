import pytest
from prefect import get_client

from plateflow.pools import ensure_pools, pool_definitions

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_pools_are_created_once_and_then_left_alone():
    first = dict(ensure_pools())
    assert set(first) == {p.name for p in pool_definitions().values()}
    assert set(first.values()) <= {"created", "unchanged"}
    assert set(dict(ensure_pools()).values()) == {"unchanged"}
    with get_client(sync_client=True) as client:
        pool = client.read_work_pool("plates-gpu-h100-80gb")
    assert pool.type == "process" and "H100" in pool.description
    assert "command" in pool.base_job_template["job_configuration"]


@pytest.mark.server
def test_prefect_deploy_all_creates_every_deployment_with_its_pool_and_schedule(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from prefect.settings import PREFECT_API_URL

    ensure_pools()
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PLATEFLOW_HOME": str(repo),
           "PLATEFLOW_CORPUS": str(tmp_path / "corpus")}
    prefect_cli = Path(sys.executable).with_name("prefect")
    done = subprocess.run([str(prefect_cli), "--no-prompt", "deploy", "--all"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    with get_client(sync_client=True) as client:
        refresh = client.read_deployment_by_name("refresh-corpus/refresh-corpus")
        retry = client.read_deployment_by_name("retry-failed-plates/retry-failed-plates")
        h100 = client.read_deployment_by_name("embed-plates/embed-plates-h100-80gb")
    assert refresh.work_pool_name == "plates-cpu" and refresh.parameters == {"root": str(tmp_path / "corpus")}
    assert [s.schedule.cron for s in refresh.schedules] == ["0 2 * * *"]
    assert retry.work_pool_name == "plates-cpu"
    assert h100.work_pool_name == "plates-gpu-h100-80gb" and h100.parameters == {"gpu_class": "H100_80GB"}
