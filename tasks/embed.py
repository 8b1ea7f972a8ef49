"""The GPU step's Prefect task: a chunk of plates through one model (plateflow/embed/runner.py)."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from plateflow.caching import retry_transient
from plateflow.devices import active
from plateflow.embed.reader import PlateJob
from plateflow.embed.runner import embed_and_store
from plateflow.profiles import ModelSpec


@task(name="embed-chunk", task_run_name="embed-{spec.name}-{chunk_name}", retries=2,
      retry_delay_seconds=[5, 30], retry_jitter_factor=0.5, retry_condition_fn=retry_transient)
def embed_chunk(jobs: list[PlateJob], spec: ModelSpec, batch_size: int, dtype: str,
                chunk_name: str = "0", weights_root: str | None = None,
                readers: str = "device", device_slot: int | None = None,
                compile: str = "") -> dict[str, str | None]:
    """A chunk of plates through one model; only GpuOutOfMemoryError/I/O failures are retried.
    ``readers`` and ``compile``: the GPU class's reader kind (see ``encode_plates``) and
    torch.compile mode (empty: none). ``device_slot``: the
    device process that runs it, when the flow uses every device of the host
    (plateflow/devices.py); else it runs in this process."""
    if device_slot is not None and (pool := active()) is not None:
        return pool.embed(device_slot, jobs, spec, batch_size, dtype, weights_root, readers, compile)
    return embed_and_store(jobs, spec, batch_size, dtype, weights_root=Path(weights_root) if weights_root else None,
                           readers=readers, compile=compile)
