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
