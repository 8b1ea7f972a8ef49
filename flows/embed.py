"""embed_plates: the GPU flow. One model over a list of plates, chunk by chunk, one chunk at a
time (one GPU never runs two batches of ours at once). Deployed once per GPU-class work pool
(prefect.yaml); refresh sends it runs there (plateflow/routing.py), or calls it in-process."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from plateflow.atomic import write_json
from plateflow.profiles import load_profiles
from tasks.embeddings import PlateJob, embed_chunk


@flow(name="embed-plates")
def embed_plates(model: str, jobs: list[PlateJob], gpu_class: str, chunk_size: int = 512,
                 weights_root: str | None = None, report: str | None = None) -> dict[str, str | None]:
    """Embed the views of ``jobs`` with ``model``; returns plate_id -> None or its error, and
    writes the same to ``report`` (a JSON file in the corpus) when given."""
    logger = get_run_logger()
    profiles = load_profiles()
    spec = profiles.model(model)
    batch_size, dtype = profiles.plan(model, gpu_class)
    readers = profiles.gpu_class(gpu_class).readers
    logger.info("%s on %s: %d plates, batch %d images, %s, reader %s", model, gpu_class, len(jobs),
                batch_size, dtype, readers)
    outcome: dict[str, str | None] = {}
    for start in range(0, len(jobs), chunk_size):
        chunk = jobs[start:start + chunk_size]
        outcome.update(embed_chunk(chunk, spec, batch_size, dtype, chunk_name=str(start // chunk_size),
                                   weights_root=weights_root, readers=readers))
        logger.info("%s: %d/%d plates embedded", model, len(outcome), len(jobs))
    if report:
        write_json(Path(report), outcome)
    return outcome
