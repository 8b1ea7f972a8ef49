"""`plateflow deploy`: the work pool and every deployment on the configured Prefect server.

- the pool and its queues: one queue per GPU class (plateflow/pools.py, from
  profiles/gpu_classes.toml); a class added to the profile gets its queue with no other edit;
- refresh-corpus and retry-failed-plates, with their schedule and trigger, make-tiles, train-head
  and predict-head: prefect.yaml;
- embed-plates: the GPU step that refresh sends runs to, each to its class's queue.

Running it again updates everything to match and changes nothing else.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EMBED_ENTRYPOINT = "flows/embed.py:embed_plates"


def deploy_embed_plates(home: Path = REPO) -> str:
    """The embed-plates deployment, on the CPU class's queue of the pool (so it is Ready wherever
    a CPU worker runs); refresh sends each GPU run to its class's queue. The code comes from
    ``home`` on the worker (as prefect.yaml's pull step says). Returns its name."""
    from prefect.deployments.runner import RunnerDeployment
    from prefect.runner.storage import LocalStorage

    from plateflow.pools import EMBED_FLOW, work_pool

    pool = work_pool()
    classes = ", ".join(f"{q.gpu_class} -> {q.name}" for q in pool.queues.values())
    RunnerDeployment.from_storage(
        LocalStorage(str(home)), EMBED_ENTRYPOINT, name=EMBED_FLOW, work_pool_name=pool.name,
        work_queue_name=pool.home.name, parameters={"gpu_class": pool.home.gpu_class},
        description=(f"The GPU step: refresh sends its runs to the work queue of their GPU class "
                     f"({classes}), where that class's workers (`plateflow worker`) take them."),
        tags=["plateflow"],
    ).apply()
    _remove_per_class_deployments()
    return EMBED_FLOW


def _remove_per_class_deployments() -> list[str]:
    """Remove the embed-plates-<class> deployments an earlier plateflow made, one per class
    pool: on a site without that GPU they only show as Not Ready. Returns their names."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    from plateflow.pools import EMBED_FLOW

    with get_client(sync_client=True) as client:
        old = [d for d in client.read_deployments(flow_filter=FlowFilter(name=FlowFilterName(any_=[EMBED_FLOW])))
               if d.name.startswith(f"{EMBED_FLOW}-")]
        for d in old:
            client.delete_deployment(d.id)
    return [d.name for d in old]


def deploy_all(corpus: Path | None, home: Path = REPO, say=print, env: dict[str, str] | None = None) -> None:
    """Pools, prefect.yaml's deployments (``corpus``: their default root), then embed-plates-*.
    Raises RuntimeError with prefect's output if ``prefect deploy`` fails."""
    from plateflow.pools import ensure_pools

    for name, action in ensure_pools():
        say(f"{action:9s} {name}")
    env = {**os.environ, **(env or {}), "PLATEFLOW_HOME": str(home),
           "PLATEFLOW_CORPUS": str(corpus) if corpus else os.environ.get("PLATEFLOW_CORPUS", "")}
    cmd = [str(Path(sys.executable).with_name("prefect")), "--no-prompt", "deploy", "--all"]
    done = subprocess.run(cmd, cwd=home, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"prefect deploy --all failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    say("deployed refresh-corpus, retry-failed-plates, make-tiles, train-head, predict-head (prefect.yaml)")
    say(f"deployed {deploy_embed_plates(home)} (the GPU step; its runs go to each class's queue)")
