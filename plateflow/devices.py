"""Every device of a host for the in-process GPU step: one worker process per device, each pinned
to its GPU with CUDA_VISIBLE_DEVICES before torch starts in it, each keeping its model loaded
between chunks. The chunks are the ones a single device would run, in the same batches, so
every plate's vectors are the same bytes whatever the number of devices; each plate's vectors
are written by the process that made them (one file per plate), and the tables by the refresh.

``PLATEFLOW_DEVICES=N`` sets the number of devices (on a CPU machine: N processes, simulated
devices, for tests and for hosts with many cores); otherwise it is the number of visible GPUs.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

_ACTIVE: "DeviceProcesses | None" = None
_MODELS: dict = {}  # in a device process: (model spec, weights) -> LoadedModel


def device_count() -> int:
    """The devices the GPU step may use at once in this process's host."""
    value = os.environ.get("PLATEFLOW_DEVICES")
    if value:
        try:
            return max(1, int(value))
        except ValueError:
            from plateflow.errors import ConfigError

            raise ConfigError(f"PLATEFLOW_DEVICES={value!r}: give the number of devices (1, 2, ...)") from None
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def _pin(index: int, cuda: bool) -> None:
    if cuda:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(index)


def _embed(jobs, spec, batch_size: int, dtype: str, weights_root: str | None, readers: str) -> dict:
    """In a device process: the chunk through the model this process keeps loaded."""
    from plateflow.embed.models import load_model
    from plateflow.embed.runner import embed_and_store

    key = (spec.model_dump_json(), weights_root)
    if key not in _MODELS:
        _MODELS[key] = load_model(spec, Path(weights_root) if weights_root else None)
    return embed_and_store(jobs, spec, batch_size, dtype, weights_root=Path(weights_root) if weights_root else None,
                           model=_MODELS[key], readers=readers)


class DeviceProcesses:
    """``n`` worker processes, process i on device i; ``embed(slot, ...)`` runs a chunk on one."""

    def __init__(self, n: int, cuda: bool):
        context = multiprocessing.get_context("spawn")  # torch (and CUDA) start fresh in each
        self.pools = [ProcessPoolExecutor(1, mp_context=context, initializer=_pin, initargs=(i, cuda))
                      for i in range(n)]
        self.chunks: Counter = Counter()
        self._lock = threading.Lock()

    def __enter__(self) -> "DeviceProcesses":
        global _ACTIVE
        _ACTIVE = self
        return self

    def __exit__(self, *exc) -> None:
        global _ACTIVE
        _ACTIVE = None
        for pool in self.pools:
            pool.shutdown(wait=True, cancel_futures=True)

    def embed(self, slot: int, *args) -> dict:
        with self._lock:
            self.chunks[slot % len(self.pools)] += 1
        return self.pools[slot % len(self.pools)].submit(_embed, *args).result()


def active() -> DeviceProcesses | None:
    """The device processes of the GPU step running in this process, if it uses several."""
    return _ACTIVE
