"""The runner only composes: reader -> mapper -> writer, chunk by chunk, and logs how long each
part took (clip-retrieval's ``runner.py``). ``embed_chunk`` is the Prefect task around it."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from plateflow.devices import compute_device
from plateflow.profiles import ModelSpec
from plateflow.embed.mapper import forward_with_backoff, encoder_for, to_host
from plateflow.embed.models import LoadedModel
from plateflow.embed.reader import READER_KINDS, PlateJob, PlateReader, prefetch_batches, reader_threads
from plateflow.embed.writer import VectorWriter

log = logging.getLogger(__name__)


def encode_plates(encoder, jobs: list[PlateJob], model: LoadedModel, batch_size: int,
               num_workers: int = 2, pin_memory: bool = False, readers: str = "threads",
               stats: dict | None = None) -> Iterator[tuple[PlateJob, np.ndarray | None, str | None]]:
    """Yield (job, vectors, None) or (job, None, error) per plate, each exactly once.

    One forward pass serves many plates: a batch holds ``batch_size // views`` plates. Readers
    are ``num_workers`` threads that decode with Pillow ("threads"), or that read JPEG bytes for
    the device to decode ("device"). ``stats``, if given, receives the seconds spent waiting for
    the readers and on the device.
    """
    if readers not in READER_KINDS:
        raise ValueError(f"readers must be one of {', '.join(READER_KINDS)}, not {readers!r}")
    views_per_plate = max(1, max(len(j.boxes) for j in jobs))
    plates_per_batch = max(1, batch_size // views_per_plate)
    dataset = PlateReader(jobs, model.spec.input_size, pin_memory=pin_memory, encoded=readers == "device")
    micro = batch_size
    waited = on_device = 0.0  # where the time goes: the log says which side is the bottleneck
    batches = prefetch_batches(dataset, plates_per_batch, num_workers)
    # One batch in flight: batch k+1 is cut and its forward pass queued before batch k's vectors
    # are waited for, so the device never idles while this thread hands out results and
    # prepares the next batch.
    in_flight = None

    def results(ok, host, done):
        nonlocal on_device
        t = time.perf_counter()
        if done is not None:
            done.synchronize()
        on_device += time.perf_counter() - t
        start = 0
        for i, plate in ok:
            n = plate.boxes.shape[0]
            yield jobs[i], host[start:start + n].numpy(), None
            start += n

    while True:
        t0 = time.perf_counter()
        batch = next(batches, None)
        t1 = time.perf_counter()
        waited += t1 - t0
        if batch is None:
            break
        ok, failed = batch
        if dataset.encoded and ok:
            decoded = encoder.decode([plate for _, plate in ok])
            failed = failed + [(i, p) for (i, _), p in zip(ok, decoded) if isinstance(p, str)]
            ok = [(i, p) for (i, _), p in zip(ok, decoded) if not isinstance(p, str)]
        for i, error in failed:
            yield jobs[i], None, error
        queued = None
        if ok:
            views = encoder.cut_views([plate for _, plate in ok])
            vectors, micro = forward_with_backoff(encoder, views, micro)
            queued = (ok, *to_host(vectors))
            on_device += time.perf_counter() - t1
        if in_flight is not None:
            yield from results(*in_flight)
        in_flight = queued
    if in_flight is not None:
        yield from results(*in_flight)
    log.info("%s: %.2f s waiting for the readers (%s), %.2f s cutting views and embedding on %s",
             model.spec.name, waited, readers, on_device,
             getattr(encoder, "device", "?"))
    if stats is not None:
        stats.update(waited_s=waited, device_s=on_device)


def embed_and_store(jobs: list[PlateJob], spec: ModelSpec, batch_size: int, dtype: str,
                  device: str | None = None, num_workers: int | None = None,
                  weights_root: Path | None = None, model: LoadedModel | None = None,
                  readers: str | None = None, compile: str = "") -> dict[str, str | None]:
    """Embed ``jobs``; write each plate's vectors to its cache file. ``readers``: see
    ``encode_plates`` (None: "device" on a GPU, "threads" on the CPU).

    Returns each job's name -> None when done, or the error message of a plate that failed alone.
    """
    import torch

    if not jobs:
        return {}
    device = device or compute_device()
    if readers is None:
        readers = "device" if torch.device(device).type == "cuda" else "threads"
    model, encoder = encoder_for(spec, device, dtype, weights_root, model, compile)
    workers = num_workers if num_workers is not None else reader_threads()
    outcome: dict[str, str | None] = {}
    with VectorWriter() as writer:  # stores vectors while the device works on the next batch
        for job, vectors, error in encode_plates(encoder, jobs, model, batch_size, workers,
                                                 pin_memory=encoder.device.type == "cuda", readers=readers):
            if error is None:
                writer.write(job.cache_file, vectors)
            outcome[job.name] = error
        t = time.perf_counter()
    log.info("%s: %d plates' vectors written in %.2f s on the writer's threads (%.2f s waited for at the end)",
             spec.name, len(jobs), writer.seconds, time.perf_counter() - t)
    return outcome
