"""The GPU step: embed every plate's crop candidates with one model, in batches across plates.

Reader (a thread pool: decode the working copy, cut and letterbox the views), mapper (the
only code that touches the device: one forward pass serves many plates), writer (a
content-addressed vector store, one .npy per plate and model). The model is built inside the
process that uses it, never at import time and never passed through a Prefect cache key.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image
from prefect import task

from plateflow.atomic import write_bytes
from plateflow.caching import code_version
from plateflow.config import CropParams
from plateflow.caching import retry_transient
from plateflow.errors import ConfigError, GpuOutOfMemoryError
from plateflow.profiles import ModelSpec

log = logging.getLogger(__name__)
CODE_VERSION = code_version("tasks.embeddings", "tasks.crops")


class ModelUnavailableError(ConfigError):
    """No weights for a model: the message names the model and how to provide them."""


# ---------------------------------------------------------------------------------------------
# Models


@dataclass
class LoadedModel:
    spec: ModelSpec
    net: "object"  # torch.nn.Module
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: int


def weights_dir(spec: ModelSpec, weights_root: Path | None) -> Path | None:
    root = weights_root or (Path(os.environ["PLATEFLOW_WEIGHTS"]) if os.environ.get("PLATEFLOW_WEIGHTS") else None)
    if root and (Path(root) / spec.name).is_dir():
        return Path(root) / spec.name
    return None


def load_model(spec: ModelSpec, weights_root: Path | None = None) -> LoadedModel:
    """Weights from PLATEFLOW_WEIGHTS/<model>/ (or ``weights_root``), else the Hugging Face cache,
    else the hub when online. Normalisation comes from the model's own config."""
    local = weights_dir(spec, weights_root)
    try:
        if spec.backend == "timm":
            return _load_timm(spec, local)
        return _load_transformers(spec, local)
    except (OSError, ValueError, RuntimeError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ModelUnavailableError(
            f"no weights for model {spec.name} ({spec.hub_id}): {type(exc).__name__}: {str(exc)[:300]}. "
            f"Provide them by running `huggingface-cli download {spec.hub_id}` on a machine with "
            f"internet and copying the Hugging Face cache (~/.cache/huggingface) here, or by putting "
            f"the weights in $PLATEFLOW_WEIGHTS/{spec.name}/"
            + (" (model.safetensors)" if spec.backend == "timm" else " (save_pretrained layout)")
        ) from exc


def _load_timm(spec: ModelSpec, local: Path | None) -> LoadedModel:
    import timm
    from timm.data import resolve_model_data_config

    kwargs = dict(num_classes=0, img_size=spec.input_size, **spec.model_kwargs)
    if local is not None:
        files = [p for p in (local / "model.safetensors", local / "pytorch_model.bin") if p.is_file()]
        if not files:
            raise FileNotFoundError(f"{local} has no model.safetensors or pytorch_model.bin")
        net = timm.create_model(spec.architecture, pretrained=True,
                                pretrained_cfg_overlay={"file": str(files[0])}, **kwargs)
    else:
        net = timm.create_model(f"hf-hub:{spec.hub_id}", pretrained=True, **kwargs)
    cfg = resolve_model_data_config(net)
    interp = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}.get(
        cfg.get("interpolation"), Image.Resampling.BICUBIC)
    return LoadedModel(spec, net.eval(), tuple(cfg["mean"]), tuple(cfg["std"]), interp)


def _load_transformers(spec: ModelSpec, local: Path | None) -> LoadedModel:
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    source = str(local) if local is not None else spec.hub_id
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    net = CLIPVisionModelWithProjection.from_pretrained(source, local_files_only=offline)
    try:
        proc = CLIPImageProcessor.from_pretrained(source, local_files_only=offline)
    except OSError:
        proc = CLIPImageProcessor()  # CLIP's own defaults (OpenAI mean/std)
    return LoadedModel(spec, net.eval(), tuple(proc.image_mean), tuple(proc.image_std),
                       Image.Resampling(proc.resample))


# ---------------------------------------------------------------------------------------------
# Reader


def letterbox(view: Image.Image, size: int, fill: tuple[int, int, int], resample) -> Image.Image:
    """Fit the whole view into size x size, padding with ``fill`` (no centre crop: no bias)."""
    w, h = view.size
    scale = size / max(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    canvas = Image.new("RGB", (size, size), fill)
    # reducing_gap: a C box reduction first, then the model's filter over the last factor of 2.
    canvas.paste(view.resize(new, resample, reducing_gap=2.0), ((size - new[0]) // 2, (size - new[1]) // 2))
    return canvas


@dataclass(frozen=True)
class PlateJob:
    """One plate's input to the GPU step: small, picklable."""

    plate_id: str
    working_copy: str
    original_size: tuple[int, int]
    boxes: tuple[tuple[int, int, int, int], ...]
    cache_file: str


class ViewsDataset:
    """Item i: every view of plate i as one uint8 tensor (views, 3, S, S)."""

    def __init__(self, jobs: list[PlateJob], size: int, fill, resample):
        self.jobs, self.size, self.fill, self.resample = jobs, size, fill, resample

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int):
        """(i, views) or (i, error message): one unreadable working copy fails only its plate."""
        import torch

        job = self.jobs[i]
        try:
            with Image.open(job.working_copy) as im:
                # JPEG DCT scaling: decode at the smallest scale that still gives every view at
                # least the model's input size (a 2-4x cheaper decode and resize).
                smallest = min(min(x1 - x0, y1 - y0) for x0, y0, x1, y1 in job.boxes)
                scale = min(1.0, 2 * self.size / (smallest * im.width / job.original_size[0]))
                im.draft("RGB", (round(im.width * scale), round(im.height * scale)))
                work = im.convert("RGB")
        except (OSError, SyntaxError, ValueError) as exc:
            return i, f"cannot read working copy {Path(job.working_copy).name}: {exc}"
        sx, sy = work.width / job.original_size[0], work.height / job.original_size[1]
        views = []
        for x0, y0, x1, y1 in job.boxes:
            crop = work.crop((round(x0 * sx), round(y0 * sy), max(round(x1 * sx), round(x0 * sx) + 1),
                              max(round(y1 * sy), round(y0 * sy) + 1)))
            views.append(np.asarray(letterbox(crop, self.size, self.fill, self.resample)))
        return i, torch.from_numpy(np.stack(views)).permute(0, 3, 1, 2).contiguous()


def _collate(items):
    import torch

    ok = [(i, t) for i, t in items if not isinstance(t, str)]
    failed = [(i, t) for i, t in items if isinstance(t, str)]
    views = torch.cat([t for _, t in ok]) if ok else None
    return [i for i, _ in ok], [t.shape[0] for _, t in ok], views, failed


# ---------------------------------------------------------------------------------------------
# Mapper


class Embedder:
    """Normalises uint8 views on the device and returns L2-normalised float32 vectors."""

    def __init__(self, model: LoadedModel, device: str, dtype: str):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        self.backend = model.spec.backend
        self.net = model.net.to(self.device)
        self.mean = torch.tensor(model.mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(model.std, device=self.device).view(1, 3, 1, 1) * 255
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def __call__(self, views_uint8):
        torch = self.torch
        x = views_uint8.to(self.device, non_blocking=True)
        with torch.inference_mode():
            x = (x.float() - self.mean) / self.std
            amp = self.dtype != torch.float32
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=amp):
                out = self.net(x) if self.backend == "timm" else self.net(pixel_values=x).image_embeds
            return torch.nn.functional.normalize(out.float(), dim=-1).cpu()


def forward_with_backoff(embed, views, micro: int) -> tuple["object", int]:
    """Embed ``views`` in micro-batches; on out-of-memory halve the micro-batch and redo that part.

    Returns (vectors in input order, the micro-batch size that worked). Nothing is emitted twice:
    a failed micro-batch produces no output.
    """
    import torch

    out, i = [], 0
    while i < views.shape[0]:
        try:
            out.append(embed(views[i:i + micro]))
            i += micro
        except torch.OutOfMemoryError:
            if micro == 1:
                raise GpuOutOfMemoryError("CUDA out of memory even at batch size 1") from None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            micro = max(1, micro // 2)
            log.warning("out of memory: batch size halved to %d", micro)
    return torch.cat(out), micro


def prefetch_batches(dataset: ViewsDataset, plates_per_batch: int, workers: int, pin_memory: bool):
    """Batches of plates, prepared ahead by a thread pool, in order.

    Threads, not processes: Pillow's decode and resize release the GIL, and a forked worker
    would inherit Prefect's threads and a CUDA context.
    """
    from concurrent.futures import ThreadPoolExecutor

    n = len(dataset)
    lookahead = max(2 * workers, 2 * plates_per_batch)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        pending = [pool.submit(dataset.__getitem__, i) for i in range(min(n, lookahead))]
        submitted = len(pending)
        while pending:
            take, pending = pending[:plates_per_batch], pending[plates_per_batch:]
            items = [f.result() for f in take]
            while submitted < n and len(pending) < lookahead:
                pending.append(pool.submit(dataset.__getitem__, submitted))
                submitted += 1
            indices, counts, views, failed = _collate(items)
            if views is not None and pin_memory:
                views = views.pin_memory()
            yield indices, counts, views, failed


def embed_jobs(embed, jobs: list[PlateJob], model: LoadedModel, batch_size: int,
               num_workers: int = 2, pin_memory: bool = False
               ) -> Iterator[tuple[PlateJob, np.ndarray | None, str | None]]:
    """Yield (job, vectors, None) or (job, None, error) per plate, each exactly once.

    One forward pass serves many plates: a batch holds ``batch_size // views`` plates.
    """
    fill = tuple(int(round(m * 255)) for m in model.mean)
    views_per_plate = max(1, max(len(j.boxes) for j in jobs))
    dataset = ViewsDataset(jobs, model.spec.input_size, fill, model.interpolation)
    micro = batch_size
    for indices, counts, views, failed in prefetch_batches(
            dataset, max(1, batch_size // views_per_plate), num_workers, pin_memory):
        for i, error in failed:
            yield jobs[i], None, error
        if views is None:
            continue
        vectors, micro = forward_with_backoff(embed, views, micro)
        start = 0
        for i, n in zip(indices, counts):
            yield jobs[i], vectors[start:start + n].numpy(), None
            start += n


# ---------------------------------------------------------------------------------------------
# Writer: content-addressed store ROOT/.plateflow/embeddings/<model>/<sha256>-<key>.npy


def embedding_key(spec: ModelSpec, params: CropParams) -> str:
    data = f"{spec.model_dump_json()}|{params.fingerprint()}|{CODE_VERSION}"
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def store_path(root: Path, spec: ModelSpec, sha256: str, params: CropParams) -> Path:
    return Path(root) / ".plateflow" / "embeddings" / spec.name / f"{sha256}-{embedding_key(spec, params)}.npy"


def save_vectors(path: Path, vectors: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, vectors.astype(np.float32))
    write_bytes(Path(path), buf.getvalue())


def run_embedding(jobs: list[PlateJob], spec: ModelSpec, batch_size: int, dtype: str,
                  device: str | None = None, num_workers: int | None = None,
                  weights_root: Path | None = None, model: LoadedModel | None = None) -> dict[str, str | None]:
    """Embed ``jobs``; write each plate's vectors to its cache file.

    Returns plate_id -> None when done, or the error message of a plate that failed alone.
    """
    import torch

    if not jobs:
        return {}
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model or load_model(spec, weights_root)
    embed = Embedder(model, device, dtype)
    workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
    outcome: dict[str, str | None] = {}
    for job, vectors, error in embed_jobs(embed, jobs, model, batch_size, workers, pin_memory=device == "cuda"):
        if error is None:
            save_vectors(Path(job.cache_file), vectors)
        outcome[job.plate_id] = error
    return outcome


@task(name="embed-chunk", task_run_name="embed-{spec.name}-{chunk_name}", retries=2,
      retry_delay_seconds=[5, 30], retry_jitter_factor=0.5, retry_condition_fn=retry_transient)
def embed_chunk(jobs: list[PlateJob], spec: ModelSpec, batch_size: int, dtype: str,
                chunk_name: str = "0", weights_root: str | None = None) -> dict[str, str | None]:
    """A chunk of plates through one model; only GpuOutOfMemoryError/I/O failures are retried."""
    return run_embedding(jobs, spec, batch_size, dtype, weights_root=Path(weights_root) if weights_root else None)
