"""Detecting the local GPU and mapping it to a class with the rules in profiles/."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import asdict, dataclass

from plateflow.profiles import Profiles


@dataclass(frozen=True)
class Device:
    name: str
    memory_gb: float
    capability: float  # compute capability, e.g. 9.0; 0 for the CPU
    cuda: bool


# What a GPU driver torch can reach leaves on Linux: NVIDIA's, WSL's, ROCm's.
DRIVER_PATHS = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def no_gpu_driver() -> bool:
    """True when no GPU can be there: CUDA_VISIBLE_DEVICES hides every one, or a Linux machine
    has no GPU driver. Then the CPU is known without importing torch (half a gigabyte and a
    second or two, which a refresh that only sends GPU work to a pool would pay for nothing)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return True
    return sys.platform == "linux" and not any(os.path.exists(p) for p in DRIVER_PATHS)


def detect_devices() -> list[Device]:
    """Every CUDA device this process sees (CUDA_VISIBLE_DEVICES applies), in index order; the
    CPU alone when there is none."""
    if no_gpu_driver():
        return [Device("cpu", 0.0, 0.0, False)]
    import torch

    if not torch.cuda.is_available():
        return [Device("cpu", 0.0, 0.0, False)]
    out = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        out.append(Device(props.name, props.total_memory / 2**30, float(f"{props.major}.{props.minor}"), True))
    return out


def detect_device() -> Device:
    """The first device: the one a process pinned to a GPU (``plateflow worker``) uses."""
    return detect_devices()[0]


def classify(device: Device, profiles: Profiles) -> str:
    """The GPU class for a device: the first matching rule; CPU when there is no CUDA device."""
    if not device.cuda:
        return "CPU"
    for rule in profiles.rules:
        if rule.name and not re.search(rule.name, device.name, re.IGNORECASE):
            continue
        if device.memory_gb >= rule.min_memory_gb and device.capability >= rule.min_capability:
            return rule.gpu_class
    return "LOW_VRAM"


def gpu_class(profiles: Profiles, device: Device | None = None) -> str:
    """PLATEFLOW_GPU_CLASS if set (validated), else the detected class."""
    override = os.environ.get("PLATEFLOW_GPU_CLASS")
    if override:
        return profiles.gpu_class(override).name
    return classify(device or detect_device(), profiles)


def hardware_report(profiles: Profiles) -> dict:
    devices = detect_devices()
    device = devices[0]
    cls = gpu_class(profiles, device)
    embedding = profiles.gpu_class(cls)
    plans = {}
    for name in profiles.models:
        try:
            batch, dtype = profiles.plan(name, cls)
            plans[name] = {"batch_size": batch, "dtype": dtype}
        except ValueError as exc:
            plans[name] = {"refused": str(exc)}
    return {"device": asdict(device), "gpu_class": cls,
            "devices": [{"index": i, **asdict(d), "gpu_class": classify(d, profiles)} for i, d in enumerate(devices)],
            "overridden": bool(os.environ.get("PLATEFLOW_GPU_CLASS")),
            "embedding": {"readers": embedding.readers, "compile": embedding.compile or None},
            "models": plans}
