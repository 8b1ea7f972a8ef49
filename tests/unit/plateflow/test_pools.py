import re

import pytest
from prefect import get_client

from plateflow.pools import ensure_pools, work_pool
from plateflow.profiles import load_profiles

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_the_pool_and_its_queues_are_created_once_and_then_left_alone():
    pool = work_pool()
    first = dict(ensure_pools())
    assert set(first) == {f"work pool {pool.name}"} | {f"work queue {pool.name}/{q.name}" for q in pool.queues.values()}
    assert set(first.values()) <= {"created", "unchanged"}
    assert set(dict(ensure_pools()).values()) == {"unchanged"}
    with get_client(sync_client=True) as client:
        made = client.read_work_pool(pool.name)
        queues = {q.name: q for q in client.read_work_queues(work_pool_name=pool.name)}
    assert made.type == "process" and "command" in made.base_job_template["job_configuration"]
    assert "H100" in queues["h100-80gb"].description and "cpu" in queues


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


def test_queues_come_from_the_class_list_through_one_pattern(tmp_path):
    from plateflow.errors import ConfigError

    pool = work_pool()
    assert pool.name == "plates" and set(pool.queues) == set(load_profiles().classes)
    assert pool.queue("H200_141GB").name == "h200-141gb" and pool.queue("CPU").name == "cpu"
    assert pool.queue("CPU").worker_limit == 2 and "H200" in pool.queue("H200_141GB").description  # override, profile
    assert all(q.worker_limit == 1 for c, q in pool.queues.items() if c != "CPU")
    with pytest.raises(ConfigError, match="no work queue for GPU class V100: profiles/gpu_classes.toml does not list it"):
        pool.queue("V100")
    bad = tmp_path / "work-pools.toml"
    bad.write_text('[pattern]\nname = "gpu-{slug}"\n\n[classes.V100_32GB]\nworker_limit = 1\n')
    with pytest.raises(ConfigError, match="V100_32GB, which profiles/gpu_classes.toml does not list"):
        work_pool(bad)
    bad.write_text('[pool]\nname = "lab"\n[pattern]\nname = "gpu-{slug}"\n')
    assert work_pool(bad).name == "lab" and work_pool(bad).queue("T4_16GB").name == "gpu-t4-16gb"
    bad.write_text('[pattern]\nname = "gpu"\n')
    with pytest.raises(ConfigError, match="two GPU classes get one queue name"):
        work_pool(bad)


def test_deploy_creates_one_embed_deployment_on_the_cpu_queue():
    from app.deploy import REPO, deploy_embed_plates
    from plateflow.pools import EMBED_DEPLOYMENT

    from prefect.deployments.runner import RunnerDeployment
    from prefect.runner.storage import LocalStorage

    ensure_pools()
    with get_client(sync_client=True) as client:
        try:
            # What an earlier plateflow left: a deployment per class, red where that GPU is missing.
            RunnerDeployment.from_storage(LocalStorage(str(REPO)), "flows/embed.py:embed_plates",
                                          name="embed-plates-h100-80gb", work_pool_name="plates").apply()
            assert deploy_embed_plates() == "embed-plates"
            assert [d.name for d in client.read_deployments() if d.name.startswith("embed-plates")] == ["embed-plates"]
            d = client.read_deployment_by_name(EMBED_DEPLOYMENT)
            assert (d.work_pool_name, d.work_queue_name, d.parameters) == ("plates", "cpu", {"gpu_class": "CPU"})
            assert d.entrypoint == "flows/embed.py:embed_plates"
            assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
            assert "h100-80gb" in d.description  # the queue of every class is named
            first = {d.name: d.id for d in client.read_deployments()}
            assert deploy_embed_plates() == "embed-plates"  # again: updated in place, nothing added
            assert {d.name: d.id for d in client.read_deployments()} == first
        finally:  # the session's other tests run the GPU step in-process: no deployment may linger
            for d in client.read_deployments():
                if d.name == "embed-plates":
                    client.delete_deployment(d.id)


@pytest.mark.parametrize("flow", ["flows.refresh:refresh_corpus", "flows.retry:retry_failed_plates",
                                  "flows.embed:embed_plates", "flows.tiles:make_tiles", "flows.heads:train_head",
                                  "flows.heads:predict_head", "flows.features:tile_features",
                                  "flows.segment:patch_features", "flows.segment:train_segmentation",
                                  "flows.segment:predict_segmentation", "flows.finetune:finetune"])
def test_every_parameter_of_a_deployment_form_has_a_description(flow):
    """The UI's run form shows these: the flow docstring's Args, and each config field's description."""
    import importlib

    from prefect.utilities.callables import parameter_schema

    module, name = flow.split(":")
    schema = parameter_schema(getattr(importlib.import_module(module), name).fn).model_dump_for_openapi()
    fields = {k: v for k, v in schema["properties"].items()}
    for model, definition in schema.get("definitions", {}).items():
        fields |= {f"{model}.{k}": v for k, v in definition.get("properties", {}).items()}
    assert len(fields) >= 2
    assert [k for k, v in fields.items() if len(v.get("description") or "") < 10] == []
    # The run form renders descriptions as markdown: an <angle-bracketed> word would vanish as HTML.
    assert [k for k, v in fields.items() if re.search(r"<[A-Za-z]", v["description"])] == []
