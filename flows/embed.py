"""embed_plates: the GPU flow. One model over a list of plates, chunk by chunk, one chunk at a
time on each device (one GPU never runs two batches of ours at once); on a host with several
GPUs, a process per GPU (plateflow/devices.py). Deployed once per GPU-class work pool
(prefect.yaml); refresh sends it runs there (flows/routing.py), or calls it in-process."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from plateflow.atomic import write_json
from plateflow.devices import DeviceProcesses, device_count
from plateflow.layout import chunk_ledger
from plateflow.errors import ConfigError
from plateflow.profiles import dispatch_policy, load_profiles
from plateflow.embed.reader import PlateJob
from tasks.embed import embed_chunk
from plateflow.embed.writer import ChunkLedger, vectors_problem


@flow(name="embed-plates")
def embed_plates(model: str, gpu_class: str, jobs: list[PlateJob] | None = None, jobs_file: str | None = None,
                 chunk_size: int | None = None, weights_root: str | None = None,
                 report: str | None = None, root: str | None = None) -> dict[str, str | None]:
    """Embed the views of ``jobs`` (or of the plates listed in ``jobs_file``, a JSON file of
    PlateJob fields) with ``model``, ``chunk_size`` plates per embed-chunk task (default: the
    dispatch policy's, profiles/dispatch.toml); returns
    each job's name -> None or its error, and writes the same to ``report`` (a JSON file) when given.

    The plates are cut into chunks in the order given; each finished chunk is recorded in the
    ledger beside the vector store (``.chunks/<key>.json``: its plates, their outcomes, when), so
    a run sent again after it was killed skips the recorded chunks (a stat of their files) and
    starts at the first unfinished one, where a plate whose vectors are stored is not embedded
    again.

    Args:
        model: The embedding model, a name from profiles/models.toml (dinov2_base, ...).
        gpu_class: The GPU class whose batch size and dtype to use (profiles/gpu_classes.toml).
        jobs: The plates to embed (a caller in the same process may pass them; flow-run
            parameters are stored by the server, which refuses more than 512 KiB of them).
        jobs_file: A JSON file listing the plates instead, in the corpus (what a refresh writes,
            for a run in its own process or on a work pool).
        chunk_size: Plates per embed-chunk task, the unit of retry (empty: profiles/dispatch.toml).
        weights_root: A folder with one folder of weights per model, named as the model (empty: the Hugging Face cache).
        report: A JSON file to write each plate's outcome to.
        root: The corpus root, for a model of the corpus's own (a fine-tuned encoder).
    """
    logger = get_run_logger()
    if (jobs is None) == (jobs_file is None):
        raise ConfigError("embed-plates needs exactly one of jobs and jobs_file")
    if jobs_file is not None:
        if not Path(jobs_file).is_file():
            raise ConfigError(f"the plates file {jobs_file} is not on this machine ({socket.gethostname()}): "
                              f"embed-plates workers need the corpus at the same path as the refresh that "
                              f"sent the run (a shared filesystem)")
        jobs = [PlateJob(**{**j, "boxes": tuple(map(tuple, j["boxes"])), "original_size": tuple(j["original_size"])})
                for j in json.loads(Path(jobs_file).read_text())]
    profiles = load_profiles(root=root)
    chunk_size = chunk_size or dispatch_policy().gpu.chunk_size
    spec = profiles.model(model)
    batch_size, dtype = profiles.plan(model, gpu_class)
    embedding = profiles.gpu_class(gpu_class)
    readers, compile_mode = embedding.readers, embedding.compile
    ledger = ChunkLedger(chunk_ledger(jobs[0].cache_file)) if jobs else None
    chunks = [jobs[i:i + chunk_size] for i in range(0, len(jobs), chunk_size)]  # over all jobs: stable on a re-run
    outcome: dict[str, str | None] = {}
    finished = 0
    pending = []  # (index, chunk, its ledger key, the plates to embed)
    for n, chunk in enumerate(chunks):
        key = ledger.key(model, chunk)
        if ledger.finished(key, chunk):  # recorded complete, and its files are there: nothing to do
            outcome.update({j.name: None for j in chunk})
            finished += 1
            continue
        done = {j.name for j in chunk if vectors_problem(j.cache_file, len(j.boxes), spec.embed_dim) is None}
        outcome.update({p: None for p in done})
        pending.append((n, chunk, key, [j for j in chunk if j.name not in done]))
    devices = device_count() if sum(bool(todo) for *_, todo in pending) > 1 else 1

    def finish(n, chunk, key, result) -> None:
        outcome.update(result)
        ledger.record(key, chunk, {j.name: outcome[j.name] for j in chunk})
        logger.info("%s: chunk %d/%d done, %d/%d plates", model, n + 1, len(chunks), len(outcome), len(jobs))

    if devices == 1:
        for n, chunk, key, todo in pending:
            finish(n, chunk, key, embed_chunk(todo, spec, batch_size, dtype, chunk_name=str(n),
                                              weights_root=weights_root, readers=readers,
                                              compile=compile_mode) if todo else {})
    else:  # every device of the host: a process each, the chunks dealt out in turn
        import torch

        with DeviceProcesses(devices, torch.cuda.is_available()) as pool, \
                ThreadPoolTaskRunner(max_workers=devices) as runner:
            futures = [(n, chunk, key, runner.submit(embed_chunk, {
                "jobs": todo, "spec": spec, "batch_size": batch_size, "dtype": dtype, "chunk_name": str(n),
                "weights_root": weights_root, "readers": readers, "device_slot": k % devices,
                "compile": compile_mode}) if todo else None)
                for k, (n, chunk, key, todo) in enumerate(pending)]
            for n, chunk, key, future in futures:
                finish(n, chunk, key, future.result() if future is not None else {})
        logger.info("%s: %d chunks on %d devices (%s)", model, sum(pool.chunks.values()), devices,
                    ", ".join(f"device {d}: {c}" for d, c in sorted(pool.chunks.items())))
    logger.info("%s on %s: %d plates in %d chunks (%d recorded finished before), batch %d images, %s, reader %s%s",
                model, gpu_class, len(jobs), len(chunks), finished, batch_size, dtype, readers,
                f", compiled ({compile_mode})" if compile_mode else "")
    if report:
        write_json(Path(report), outcome)
    return outcome
