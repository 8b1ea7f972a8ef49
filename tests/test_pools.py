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


def test_a_pool_gets_one_run_per_free_place_never_one_per_chunk():
    from flows.routing import split_runs

    def sizes(*args, **kw):
        runs = split_runs(*args, **kw)
        assert [r.start for r in runs[1:]] == [r.stop for r in runs[:-1]]  # contiguous, in order
        assert (runs[0].start, runs[-1].stop) == (0, args[0])  # every plate once
        return [len(r) for r in runs]

    assert sizes(5000, 1, 512) == [5000]  # one worker: one run, its chunks tasks inside it
    assert sizes(5000, 0, 512) == [5000]  # no worker online yet: still one run
    assert sizes(5000, 3, 512) == [1667, 1667, 1666]
    assert sizes(1000, 8, 512) == [500, 500]  # no run smaller than a chunk...
    assert sizes(10, 4, 512) == [10]
    assert sizes(50_000, 1, 512, max_run_plates=20_000) == [16667, 16667, 16666]  # ...nor past the cap
    assert sizes(96, 1, 16, max_run_plates=16) == [16] * 6
    assert split_runs(0, 2, 512) == []
