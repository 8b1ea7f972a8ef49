"""Every device of a host for the in-process GPU step: one worker process per device, each pinned
to its GPU with CUDA_VISIBLE_DEVICES before torch starts in it, each keeping its model loaded
between chunks. The chunks are the ones a single device would run, in the same batches, so
every plate's vectors are the same bytes whatever the number of devices; each plate's vectors
are written by the process that made them (one file per plate), and the tables by the refresh.

``PLATEFLOW_DEVICES=N`` sets the number of devices (on a CPU machine: N processes, simulated
devices, for tests and for hosts with many cores; past the number of GPUs, processes share them
in turn); otherwise it is the number of visible GPUs.
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


def compute_device() -> str:
    """Where plateflow's model steps run: ``"cuda"`` when torch sees a GPU, else ``"cpu"``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


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


def pin_values(count: int, visible: str | None) -> list[str]:
    """The CUDA_VISIBLE_DEVICES value that pins a child process to each of the ``count`` GPUs a
    process sees, in torch's order: the entries of its own CUDA_VISIBLE_DEVICES (``visible``:
    indices or GPU UUIDs) where that is set, else 0 to count - 1."""
    entries = [e.strip() for e in (visible or "").split(",") if e.strip()]
    return entries[:count] if entries else [str(i) for i in range(count)]


def visible_gpus() -> list[str]:
    """``pin_values`` of this process: one value per GPU torch sees here (none on a CPU host)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return pin_values(count, os.environ.get("CUDA_VISIBLE_DEVICES"))


def _pin(value: str | None) -> None:
    if value is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = value


def _embed(jobs, spec, batch_size: int, dtype: str, weights_root: str | None, readers: str,
           compile: str = "") -> dict:
    """In a device process: the chunk through the model this process keeps loaded."""
    from plateflow.embed.models import load_model
    from plateflow.embed.runner import embed_and_store

    key = (spec.model_dump_json(), weights_root)
    if key not in _MODELS:
        _MODELS[key] = load_model(spec, Path(weights_root) if weights_root else None)
    return embed_and_store(jobs, spec, batch_size, dtype, weights_root=Path(weights_root) if weights_root else None,
                           model=_MODELS[key], readers=readers, compile=compile)


class DeviceProcesses:
    """``n`` worker processes, process i on GPU i (of this process's, in turn where there are
    fewer); ``embed(slot, ...)`` runs a chunk on one."""

    def __init__(self, n: int, cuda: bool):
        context = multiprocessing.get_context("spawn")  # torch (and CUDA) start fresh in each
        gpus = visible_gpus() if cuda else []
        self.pools = [ProcessPoolExecutor(1, mp_context=context, initializer=_pin,
                                          initargs=(gpus[i % len(gpus)] if gpus else None,))
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
