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


def test_pools_come_from_the_class_list_through_one_pattern(tmp_path):
    from plateflow.errors import ConfigError
    from plateflow.pools import embed_deployment_name

    pools = pool_definitions()
    assert pools["H200_141GB"].name == "plates-gpu-h200-141gb" and pools["CPU"].name == "plates-cpu"
    assert pools["CPU"].worker_limit == 2 and "H200" in pools["H200_141GB"].description  # override, profile
    assert embed_deployment_name(pools["LOW_VRAM"]) == "embed-plates-low-vram"
    bad = tmp_path / "work-pools.toml"
    bad.write_text('[pattern]\nname = "gpu-{slug}"\n\n[classes.V100_32GB]\nworker_limit = 1\n')
    with pytest.raises(ConfigError, match="V100_32GB, which profiles/gpu_classes.toml does not list"):
        pool_definitions(bad)
    bad.write_text('[pattern]\nname = "gpu-{slug}"\n')
    assert pool_definitions(bad)["T4_16GB"].name == "gpu-t4-16gb"


def test_deploy_creates_one_embed_deployment_per_pool_from_one_pattern():
    from app.deploy import REPO, deploy_embed_plates
    from plateflow.pools import embed_deployment_name

    ensure_pools()
    pools = pool_definitions()
    with get_client(sync_client=True) as client:
        try:
            names = deploy_embed_plates()
            assert names == [embed_deployment_name(p) for p in pools.values()]
            for pool in pools.values():
                d = client.read_deployment_by_name(f"embed-plates/{embed_deployment_name(pool)}")
                assert (d.work_pool_name, d.parameters) == (pool.name, {"gpu_class": pool.gpu_class})
                assert d.entrypoint == "flows/embed.py:embed_plates"
                assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
            first = {d.name: d.id for d in client.read_deployments()}
            assert deploy_embed_plates() == names  # again: updated in place, nothing added
            assert {d.name: d.id for d in client.read_deployments()} == first
        finally:  # the session's other tests run the GPU step in-process: no deployment may linger
            for d in client.read_deployments():
                if d.name.startswith("embed-plates-"):
                    client.delete_deployment(d.id)


@pytest.mark.parametrize("flow", ["flows.refresh:refresh_corpus", "flows.retry:retry_failed_plates",
                                  "flows.embed:embed_plates", "flows.tiles:make_tiles"])
def test_every_parameter_of_a_deployment_form_has_a_description(flow):
    """The UI's run form shows these: the flow docstring's Args, and each config field's description."""
    import importlib

    from prefect.utilities.callables import parameter_schema

    module, name = flow.split(":")
    schema = parameter_schema(getattr(importlib.import_module(module), name).fn).model_dump_for_openapi()
    fields = {k: v for k, v in schema["properties"].items()}
    for model, definition in schema.get("definitions", {}).items():
        fields |= {f"{model}.{k}": v for k, v in definition.get("properties", {}).items()}
    assert len(fields) >= 3
    assert [k for k, v in fields.items() if len(v.get("description") or "") < 10] == []
