"""`plateflow deploy`: the work pools and every deployment on the configured Prefect server.

- the pools: one per GPU class (plateflow/pools.py, from profiles/gpu_classes.toml);
- refresh-corpus and retry-failed-plates, with their schedule and trigger, make-tiles, train-head and predict-head: prefect.yaml;
- embed-plates-<class>, one per pool, from one pattern (PrefectHQ/examples' ``deploy_many.py``):
  the GPU step that refresh sends runs to. A class added to the profile gets its pool and
  deployment with no other edit.

Running it again updates everything to match and changes nothing else.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EMBED_ENTRYPOINT = "flows/embed.py:embed_plates"


def deploy_embed_plates(home: Path = REPO) -> list[str]:
    """An embed-plates deployment on each pool, pinned to its class; returns their names. The
    code comes from ``home`` on the worker (as prefect.yaml's pull step says)."""
    from prefect.deployments.runner import RunnerDeployment
    from prefect.runner.storage import LocalStorage

    from plateflow.pools import embed_deployment_name, pool_definitions

    names = []
    for pool in pool_definitions().values():
        name = embed_deployment_name(pool)
        RunnerDeployment.from_storage(
            LocalStorage(str(home)), EMBED_ENTRYPOINT, name=name, work_pool_name=pool.name,
            parameters={"gpu_class": pool.gpu_class},
            description=f"The GPU step on {pool.gpu_class}: {pool.description} Refresh sends it runs.",
            tags=["plateflow"] + ([] if pool.gpu_class == "CPU" else ["gpu"]),
        ).apply()
        names.append(name)
    return names


def deploy_all(corpus: Path | None, home: Path = REPO, say=print, env: dict[str, str] | None = None) -> None:
    """Pools, prefect.yaml's deployments (``corpus``: their default root), then embed-plates-*.
    Raises RuntimeError with prefect's output if ``prefect deploy`` fails."""
    from plateflow.pools import ensure_pools

    for name, action in ensure_pools():
        say(f"{action:9s} work pool {name}")
    env = {**os.environ, **(env or {}), "PLATEFLOW_HOME": str(home),
           "PLATEFLOW_CORPUS": str(corpus) if corpus else os.environ.get("PLATEFLOW_CORPUS", "")}
    cmd = [str(Path(sys.executable).with_name("prefect")), "--no-prompt", "deploy", "--all"]
    done = subprocess.run(cmd, cwd=home, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"prefect deploy --all failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    say("deployed refresh-corpus, retry-failed-plates, make-tiles, train-head, predict-head (prefect.yaml)")
    say(f"deployed {', '.join(deploy_embed_plates(home))}")
