"""The GPU step: embed every plate's crop candidates with one model, in batches across plates.

Reader (threads reading each working copy: its JPEG bytes, decoded on the GPU in one nvJPEG
batch, or decoded by Pillow in the threads on the CPU),
mapper (the only code that touches the device: decode, cut and letterbox every view of a batch
of plates, then one forward pass serves them all, one batch in flight), writer (a
content-addressed vector store, one .npy per plate and model). The model is built inside the
process that uses it, never at import time and never passed through a Prefect cache key.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import threading
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
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
from plateflow.errors import CacheEntryError, ConfigError, GpuOutOfMemoryError
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


def weights_dir(spec: ModelSpec, weights_root: Path | None) -> Path | None:
    root = weights_root or (Path(os.environ["PLATEFLOW_WEIGHTS"]) if os.environ.get("PLATEFLOW_WEIGHTS") else None)
    if root and (Path(root) / spec.name).is_dir():
        return Path(root) / spec.name
    return None


def load_model(spec: ModelSpec, weights_root: Path | None = None) -> LoadedModel:
    """Weights from PLATEFLOW_WEIGHTS/<model>/ (or ``weights_root``), else the Hugging Face cache,
    else the hub when online. Normalisation comes from the model's own config. The vectors'
    dimension must be the table's ``embed_dim`` (the corpus tables are typed by it)."""
    local = weights_dir(spec, weights_root)
    try:
        loaded = _load_timm(spec, local) if spec.backend == "timm" else _load_transformers(spec, local)
    except (OSError, ValueError, RuntimeError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise _unavailable(spec, f"{type(exc).__name__}: {str(exc)[:300]}") from exc
    dim = loaded.net.num_features if spec.backend == "timm" else loaded.net.config.projection_dim
    if dim != spec.embed_dim:
        raise ConfigError(f"model {spec.name}: its weights give {dim}-dimensional vectors, but the "
                          f"capability table (profiles/models.toml) says embed_dim = {spec.embed_dim}; "
                          f"correct the table or the weights")
    return loaded


def _unavailable(spec: ModelSpec, why: str) -> ModelUnavailableError:
    return ModelUnavailableError(
        f"no weights for model {spec.name} ({spec.hub_id}): {why}. "
        f"Provide them by running `huggingface-cli download {spec.hub_id}` on a machine with "
        f"internet and copying the Hugging Face cache (~/.cache/huggingface) here, or by putting "
        f"the weights in $PLATEFLOW_WEIGHTS/{spec.name}/"
        + (" (model.safetensors)" if spec.backend == "timm" else " (save_pretrained layout)"))


# One of these, in a weights folder or a hub repository, holds (or indexes the shards of) a
# model; timm loads a folder's weights from one file, so only the first two there.
SINGLE_FILE_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
WEIGHT_FILES = (*SINGLE_FILE_WEIGHTS, "model.safetensors.index.json", "pytorch_model.bin.index.json")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it (1, on, yes, true), read now, not at import."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def require_weights(spec: ModelSpec, weights_root: Path | None = None) -> None:
    """Raise ModelUnavailableError, before any work, when this machine cannot have the model's
    weights: none in the local folder or the Hugging Face cache, and the hub is off
    (HF_HUB_OFFLINE). Online, the hub may still provide them; ``load_model`` then says if not.
    Reads no weights: only which files exist."""
    import huggingface_hub

    local = weights_dir(spec, weights_root)
    if local is not None:
        loadable = SINGLE_FILE_WEIGHTS if spec.backend == "timm" else WEIGHT_FILES
        if not any((local / f).is_file() for f in loadable):
            raise _unavailable(spec, f"{local} has no {' or '.join(loadable)}")
        return
    cached = any(isinstance(huggingface_hub.try_to_load_from_cache(spec.hub_id, f), str) for f in WEIGHT_FILES)
    if not cached and hub_offline():
        raise _unavailable(spec, "not in the Hugging Face cache, and the hub is off (HF_HUB_OFFLINE)")


def _load_timm(spec: ModelSpec, local: Path | None) -> LoadedModel:
    import timm
    from timm.data import resolve_model_data_config

    kwargs = dict(num_classes=0, img_size=spec.input_size, **spec.model_kwargs)
    if local is not None:
        files = [local / f for f in SINGLE_FILE_WEIGHTS if (local / f).is_file()]
        if not files:
            raise FileNotFoundError(f"{local} has no {' or '.join(SINGLE_FILE_WEIGHTS)}")
        net = timm.create_model(spec.architecture, pretrained=True,
                                pretrained_cfg_overlay={"file": str(files[0])}, **kwargs)
    else:
        net = timm.create_model(f"hf-hub:{spec.hub_id}", pretrained=True, **kwargs)
    cfg = resolve_model_data_config(net)
    return LoadedModel(spec, net.eval(), tuple(cfg["mean"]), tuple(cfg["std"]))


def _load_transformers(spec: ModelSpec, local: Path | None) -> LoadedModel:
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    source = str(local) if local is not None else spec.hub_id
    offline = hub_offline()
    net = CLIPVisionModelWithProjection.from_pretrained(source, local_files_only=offline)
    try:
        proc = CLIPImageProcessor.from_pretrained(source, local_files_only=offline)
    except OSError:
        proc = CLIPImageProcessor()  # CLIP's own defaults (OpenAI mean/std)
    return LoadedModel(spec, net.eval(), tuple(proc.image_mean), tuple(proc.image_std))


# ---------------------------------------------------------------------------------------------
# Reader: read each working copy once, nothing more. Decoding (on a GPU), cutting, resizing and
# letterboxing all of a batch's views happens on the device (Embedder.decode, .extract), where
# it costs a fraction of the forward pass. On a 16-core H100 host, resizing 16 views per plate
# on the CPU capped the stage at ~150 plates/s, and Pillow decoding in 15 reader threads at 257,
# under the ~510 plates/s the H100's forward pass allows (8,228 images/s, 16 views a plate);
# nvJPEG decodes several thousand a second.


@dataclass(frozen=True)
class PlateJob:
    """One plate's input to the GPU step: small, picklable."""

    plate_id: str
    working_copy: str
    original_size: tuple[int, int]
    boxes: tuple[tuple[int, int, int, int], ...]
    cache_file: str


@dataclass
class DecodedPlate:
    pixels: "object"   # (H, W, 3) uint8 torch tensor: on the device, or pinned when feeding a GPU
    boxes: np.ndarray  # (K, 4) float64: the candidate boxes in ``pixels`` coordinates


@dataclass
class EncodedPlate:
    """A working copy's JPEG bytes, read by a reader thread, decoded on the device in a batch."""

    data: "object"  # 1-D uint8 torch tensor
    job: PlateJob


def _decoded(job: PlateJob, pixels) -> DecodedPlate:
    """A plate decoded to ``pixels`` (H, W, 3), with its boxes in those pixels' coordinates."""
    sx, sy = pixels.shape[1] / job.original_size[0], pixels.shape[0] / job.original_size[1]
    return DecodedPlate(pixels, np.asarray(job.boxes, np.float64) * [sx, sy, sx, sy])


def letterbox_geometry(boxes: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """For each box: the region to sample so that the box fills the centre of a size x size view
    at one scale (x0, y0, x1, y1, in the image's pixels), and that centre window (x, y, w, h).

    Letterboxed, not centre-cropped: a centre crop would bias the choice toward the centre.
    """
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    scale = size / np.maximum(w, h)
    nw = np.clip(np.round(w * scale), 1, size)
    nh = np.clip(np.round(h * scale), 1, size)
    x, y = (size - nw) // 2, (size - nh) // 2
    px, py = w / nw, h / nh  # source pixels per output pixel
    x0, y0 = boxes[:, 0] - x * px, boxes[:, 1] - y * py
    region = np.stack([x0, y0, x0 + size * px, y0 + size * py], axis=1)
    return region, np.stack([x, y, nw, nh], axis=1)


class ViewsDataset:
    """Item i: plate i's working copy, decoded, with its boxes in that copy's pixels (``read_plate``),
    or with ``encoded``, its JPEG bytes for the device to decode (``read_encoded``)."""

    def __init__(self, jobs: list[PlateJob], size: int, pin_memory: bool = False, encoded: bool = False):
        self.jobs, self.size, self.pin_memory, self.encoded = jobs, size, pin_memory, encoded

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int):
        """(i, DecodedPlate or EncodedPlate) or (i, error message): an unreadable working copy
        fails only its plate."""
        if self.encoded:
            return i, read_encoded(self.jobs[i], self.size, self.pin_memory)
        return i, read_plate(self.jobs[i], self.size, self.pin_memory)


def read_plate(job: PlateJob, size: int, pin_memory: bool = False) -> "DecodedPlate | str":
    """Decode one plate's working copy for views of ``size`` px; an error message if unreadable.

    Pillow's decode releases the GIL; its header parsing and the copy out of the decoder do
    not (see ``prefetch_batches``). The only torch call is the allocation; the copy into it is
    NumPy's.
    """
    import torch

    try:
        with Image.open(job.working_copy) as im:  # closed on a decoding error too
            # JPEG DCT scaling: decode at the smallest scale that still gives every view at
            # least twice the model's input size (a 2-4x cheaper decode).
            smallest = min(min(x1 - x0, y1 - y0) for x0, y0, x1, y1 in job.boxes)
            scale = min(1.0, 2 * size / (smallest * im.width / job.original_size[0]))
            im.draft("RGB", (round(im.width * scale), round(im.height * scale)))
            work = im.convert("RGB") if im.mode != "RGB" else im
            work.load()
    except (OSError, SyntaxError, ValueError) as exc:
        return f"cannot read working copy {Path(job.working_copy).name}: {exc}"
    pixels = torch.empty((work.height, work.width, 3), dtype=torch.uint8, pin_memory=pin_memory)
    np.copyto(pixels.numpy(), np.asarray(work))
    return _decoded(job, pixels)


def read_encoded(job: PlateJob, size: int, pin_memory: bool = False) -> "EncodedPlate | DecodedPlate | str":
    """A working copy's bytes, when they are a whole JPEG (start and end markers), for the device
    to decode; anything else (another format, a truncated file) goes to ``read_plate``, which
    decodes it or says what is wrong. The file read releases the GIL."""
    import torch

    try:
        data = np.fromfile(job.working_copy, dtype=np.uint8)
    except OSError as exc:
        return f"cannot read working copy {Path(job.working_copy).name}: {exc}"
    if data[:3].tobytes() == b"\xff\xd8\xff" and data[-2:].tobytes() == b"\xff\xd9":
        return EncodedPlate(torch.from_numpy(data), job)
    return read_plate(job, size, pin_memory)


# ---------------------------------------------------------------------------------------------
# Mapper


class Embedder:
    """Cuts, letterboxes and normalises views on the device; returns L2-normalised float32 vectors.

    On a GPU with a reduced-precision dtype the weights are held in that dtype, so no forward
    pass spends time casting them (autocast recasts every weight on every call), and each MLP's
    first matmul applies its GELU (``fuse_gelu_epilogue``); on the CPU the model runs in float32
    as published. LayerScale is folded into the weights on every device (``fold_layer_scale``).
    ``compile`` (True or a mode) wraps the forward pass in ``torch.compile``.
    """

    def __init__(self, model: LoadedModel, device: str, dtype: str, compile: bool | str = False):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        self.backend = model.spec.backend
        self.size = model.spec.input_size
        low = self.device.type == "cuda" and self.dtype != torch.float32
        self.compute_dtype = self.dtype if low else torch.float32
        fold_layer_scale(model.net)
        if low:
            fuse_gelu_epilogue(model.net)
        self.net = model.net.to(self.device, self.compute_dtype).eval()
        # Letterbox padding is the model's mean colour: zero after normalisation.
        self.mean = torch.tensor(model.mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(model.std, device=self.device).view(1, 3, 1, 1) * 255
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        mode = compile if isinstance(compile, str) and compile != "default" else None
        self._forward = torch.compile(self._net_forward, mode=mode) if compile else self._net_forward

    def decode(self, plates: list) -> list:
        """``plates`` with each EncodedPlate decoded on this device (nvJPEG on a GPU), all in
        one call; other items pass through. If the batch fails, its plates go to Pillow one by
        one, which decodes each or says what is wrong with it: a bad plate fails alone."""
        from torchvision.io import ImageReadMode, decode_jpeg

        todo = [k for k, p in enumerate(plates) if isinstance(p, EncodedPlate)]
        if not todo:
            return plates
        out = list(plates)
        try:
            with warnings.catch_warnings():  # torchvision >= 0.29 points to TorchCodec's decoders
                warnings.simplefilter("ignore", DeprecationWarning)
                images = decode_jpeg([plates[k].data for k in todo], mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError as exc:
            log.warning("decoding %d working copies on %s failed (%s): decoding them one by one with Pillow",
                        len(todo), self.device, str(exc).splitlines()[0][:200])
            for k in todo:
                out[k] = read_plate(plates[k].job, self.size, pin_memory=self.device.type == "cuda")
            return out
        for k, image in zip(todo, images):
            out[k] = _decoded(plates[k].job, image.permute(1, 2, 0))
        return out

    def extract(self, plates: list[DecodedPlate]):
        """Every plate's views, (sum K, 3, S, S) float in 0..255 on the device, in order.

        Each view is sampled from a mip level of its plate (2x2 box averages, repeated) chosen so
        that one output pixel spans 1-2 level pixels; ``roi_align`` then averages 2x2 bilinear
        samples per output pixel. Area-style reduction, free of aliasing at any scale, at ~4
        samples per output value. Each plate's views depend on that plate alone, so a batch
        gives exactly what one plate at a time gives.
        """
        torch = self.torch
        import torch.nn.functional as F
        from torchvision.ops import roi_align

        S = self.size
        regions, windows, levels, order, base = [], [], [], [], 0
        for plate in plates:
            region, window = letterbox_geometry(plate.boxes, S)
            level = 2 ** np.floor(np.log2(np.maximum(1.0, (region[:, 2] - region[:, 0]) / S)))
            regions.append(region / level[:, None])
            windows.append(window)
            levels.append(level)
            order.append(base + np.argsort(level, kind="stable"))  # grouped by mip level
            base += len(level)
        order = np.concatenate(order)
        inverse = np.argsort(order)
        host = [torch.from_numpy(np.concatenate(regions)[order]).float(),
                torch.from_numpy(np.concatenate(windows)).float(), torch.from_numpy(inverse)]
        if self.device.type == "cuda":
            host = [t.pin_memory() for t in host]
        rois, windows, inverse = (t.to(self.device, non_blocking=True) for t in host)
        outs, start = [], 0
        with torch.inference_mode():
            for plate, level in zip(plates, levels):
                mip = {1: plate.pixels.to(self.device, non_blocking=True).permute(2, 0, 1)[None].float()}
                for f in np.unique(level).astype(int):  # ascending, as ``order`` groups them
                    g = 1
                    while g < f:
                        if 2 * g not in mip:
                            mip[2 * g] = F.avg_pool2d(mip[g], 2)
                        g *= 2
                    n = int((level == f).sum())
                    outs.append(roi_align(mip[f], [rois[start:start + n]], output_size=S,
                                          spatial_scale=1.0, sampling_ratio=0, aligned=True))
                    start += n
            views = torch.cat(outs).index_select(0, inverse)
            grid = torch.arange(S, device=self.device, dtype=torch.float32)
            x, y, w, h = (windows[:, i].view(-1, 1) for i in range(4))
            inside_x = (grid >= x) & (grid < x + w)
            inside_y = (grid >= y) & (grid < y + h)
            inside = (inside_y[:, :, None] & inside_x[:, None, :])[:, None]
            return torch.where(inside, views, self.mean)

    def _net_forward(self, x):
        return self.net(x) if self.backend == "timm" else self.net(pixel_values=x).image_embeds

    def launch(self, views):
        """views: (N, 3, S, S) float in 0..255 (from ``extract``) -> (N, dim) float32 on the
        device, queued: nothing waits for the device here (``to_host`` fetches them)."""
        torch = self.torch
        with torch.inference_mode():
            x = ((views.to(self.device) - self.mean) / self.std).to(self.compute_dtype)
            return torch.nn.functional.normalize(self._forward(x).float(), dim=-1)

    def __call__(self, views):
        """``launch``, then wait for the vectors on the CPU."""
        return self.launch(views).cpu()


def fold_layer_scale(net) -> None:
    """Fold each transformer block's LayerScale (DINOv2's per-channel gains after the attention
    and MLP outputs) into the linear layer before it: gamma * (x W^T + b) = x (gamma W)^T +
    gamma b. The same function with two elementwise passes over the activations fewer per block
    (7% more images/s for dinov2_base on an H100). In place, and a no-op when done already or
    for models without LayerScale."""
    import torch

    with torch.no_grad():
        for block in getattr(net, "blocks", ()):
            for scale, linear in (("ls1", getattr(block, "attn", None) and block.attn.proj),
                                  ("ls2", getattr(block, "mlp", None) and block.mlp.fc2)):
                gamma = getattr(getattr(block, scale, None), "gamma", None)
                if gamma is None or not isinstance(linear, torch.nn.Linear):
                    continue
                linear.weight.mul_(gamma[:, None].to(linear.weight.dtype))
                if linear.bias is not None:
                    linear.bias.mul_(gamma.to(linear.bias.dtype))
                setattr(block, scale, torch.nn.Identity())


def fuse_gelu_epilogue(net) -> None:
    """Give each timm transformer block's MLP (fc1, GELU, fc2) a forward pass whose fc1 applies
    the GELU in the matrix product's epilogue (cuBLASLt, through ``torch._addmm_activation``):
    the 4x-wide hidden activations are written once instead of written, read and written again.
    9% more images/s for dinov2_base in bf16 on an H200. cuBLASLt's GELU is the tanh form,
    within 5e-4 of the exact one the models were trained with, under bf16's resolution: the
    vectors' cosine to the exact model's was >= 0.9999998 there (on the CPU torch applies the
    exact GELU). In place; the Embedder uses it for GPU classes in reduced precision only."""
    import torch
    from timm.layers import Mlp

    for block in getattr(net, "blocks", ()):
        mlp = getattr(block, "mlp", None)
        if (type(mlp) is Mlp and type(mlp.act) is torch.nn.GELU and isinstance(mlp.norm, torch.nn.Identity)
                and mlp.fc1.bias is not None):
            block.mlp = _gelu_epilogue_mlp()(mlp.fc1, mlp.fc2)


@functools.cache
def _gelu_epilogue_mlp():
    import torch

    class GeluEpilogueMlp(torch.nn.Module):
        """fc2(gelu(fc1(x))), the GELU in fc1's matrix product (inference only: no dropout)."""

        def __init__(self, fc1, fc2):
            super().__init__()
            self.fc1, self.fc2 = fc1, fc2

        def forward(self, x):
            flat = x.reshape(-1, x.shape[-1])
            hidden = torch._addmm_activation(self.fc1.bias, flat, self.fc1.weight.t(), use_gelu=True)
            return self.fc2(hidden.view(*x.shape[:-1], -1))

    return GeluEpilogueMlp


def to_host(vectors) -> tuple["object", "object"]:
    """Start copying a batch's vectors to pinned host memory behind the work queued for them:
    (host tensor, CUDA event to wait on before reading it; None off the GPU)."""
    import torch

    if vectors.device.type != "cuda":
        return vectors, None
    host = torch.empty(vectors.shape, dtype=vectors.dtype, pin_memory=True)
    host.copy_(vectors, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done


def forward_with_backoff(embed, views, micro: int) -> tuple["object", int]:
    """Embed ``views`` in micro-batches; on out-of-memory halve the micro-batch and redo that part.

    Returns (vectors in input order on the device, queued; the micro-batch size that worked).
    Nothing is emitted twice: a failed micro-batch produces no output. (Out of memory is raised
    when a launch allocates, so it is caught here although nothing waits for the device.)
    """
    import torch

    out, i = [], 0
    while i < views.shape[0]:
        try:
            out.append(embed.launch(views[i:i + micro]))
            i += micro
        except torch.OutOfMemoryError:
            if micro == 1:
                raise GpuOutOfMemoryError("CUDA out of memory even at batch size 1") from None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            micro = max(1, micro // 2)
            log.warning("out of memory: batch size halved to %d", micro)
    return torch.cat(out), micro


READER_KINDS = ("threads", "device")


def prefetch_batches(dataset: ViewsDataset, plates_per_batch: int, workers: int):
    """Batches of plates read ahead by reader threads, in order: (ok, failed), each a list of
    (index, DecodedPlate or EncodedPlate, or error message).

    On the CPU the threads decode with Pillow (the forward pass needs the cores anyway).
    Feeding a GPU they only read each working copy's bytes (``dataset.encoded``), and the GPU
    decodes a batch at once. Pillow decoding in 15 threads held the GIL that the thread
    launching the GPU's kernels needs (a small torch op took 1.7 ms instead of 7 us) and held an
    H100 host to 257 plates/s (436 decoding on the device); reader processes, which avoided the
    GIL but moved every decoded plate through shared memory, reached 328 on an H200 (422 there
    decoding on the device), and were removed.
    """
    batch = []
    for item in _read_threads(dataset, workers, _lookahead(plates_per_batch, workers)):
        batch.append(item)
        if len(batch) == plates_per_batch:
            yield _split(batch)
            batch = []
    if batch:
        yield _split(batch)


def _lookahead(plates_per_batch: int, workers: int) -> int:
    """Plates read ahead of the device: two batches."""
    return max(2 * workers, 2 * plates_per_batch)


def _split(items):
    return ([(i, v) for i, v in items if not isinstance(v, str)],
            [(i, v) for i, v in items if isinstance(v, str)])


def _read_threads(dataset: ViewsDataset, workers: int, lookahead: int):
    n = len(dataset)
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="plateflow-reader") as pool:
        pending = deque(pool.submit(dataset.__getitem__, i) for i in range(min(n, lookahead)))
        submitted = len(pending)
        while pending:
            item = pending.popleft().result()
            if submitted < n:
                pending.append(pool.submit(dataset.__getitem__, submitted))
                submitted += 1
            yield item


def embed_jobs(embed, jobs: list[PlateJob], model: LoadedModel, batch_size: int,
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
    dataset = ViewsDataset(jobs, model.spec.input_size, pin_memory=pin_memory, encoded=readers == "device")
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
            decoded = embed.decode([plate for _, plate in ok])
            failed = failed + [(i, p) for (i, _), p in zip(ok, decoded) if isinstance(p, str)]
            ok = [(i, p) for (i, _), p in zip(ok, decoded) if not isinstance(p, str)]
        for i, error in failed:
            yield jobs[i], None, error
        queued = None
        if ok:
            views = embed.extract([plate for _, plate in ok])
            vectors, micro = forward_with_backoff(embed, views, micro)
            queued = (ok, *to_host(vectors))
            on_device += time.perf_counter() - t1
        if in_flight is not None:
            yield from results(*in_flight)
        in_flight = queued
    if in_flight is not None:
        yield from results(*in_flight)
    log.info("%s: %.2f s waiting for the readers (%s), %.2f s cutting views and embedding on %s",
             model.spec.name, waited, readers, on_device,
             getattr(embed, "device", "?"))
    if stats is not None:
        stats.update(waited_s=waited, device_s=on_device)


# ---------------------------------------------------------------------------------------------
# Writer: content-addressed store ROOT/.plateflow/embeddings/<model>/<sha256>-<key>.npy


def embedding_key(spec: ModelSpec, params: CropParams) -> str:
    data = f"{spec.model_dump_json()}|{params.fingerprint()}|{CODE_VERSION}"
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def store_path(root: Path, spec: ModelSpec, sha256: str, params: CropParams) -> Path:
    return Path(root) / ".plateflow" / "embeddings" / spec.name / f"{sha256}-{embedding_key(spec, params)}.npy"


def load_vectors(path: Path, views: int, dim: int | None = None) -> np.ndarray:
    """A plate's cached vectors, checked: a whole .npy file of float32, ``views`` rows (of
    ``dim`` floats when given), every value finite. Anything else raises ``CacheEntryError``
    naming the file (truncated, garbage, another shape): the caller recomputes it."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise CacheEntryError(f"cached vectors {path} are missing") from None
    fh = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(fh)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(fh)
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise CacheEntryError(f"cached vectors {path} are not a .npy file ({exc})") from None
    expected = (views, dim) if dim is not None else (views,)
    if dtype != np.dtype("<f4") or fortran or shape[:len(expected)] != expected or len(shape) != 2:
        raise CacheEntryError(f"cached vectors {path} hold {dtype} {shape}, expected float32 "
                              f"({views}, {dim if dim is not None else 'dim'})")
    body = len(data) - fh.tell()
    if body != int(np.prod(shape)) * 4:
        raise CacheEntryError(f"cached vectors {path} are {'truncated' if body < np.prod(shape) * 4 else 'too long'}: "
                              f"{body} bytes of data for shape {shape}")
    vectors = np.frombuffer(data, "<f4", offset=fh.tell()).reshape(shape)
    if not np.isfinite(vectors).all():
        raise CacheEntryError(f"cached vectors {path} hold values that are not finite")
    return vectors


def vectors_problem(path: Path, views: int, dim: int) -> str | None:
    """None if ``path`` holds usable vectors (see ``load_vectors``), else what is wrong with it."""
    try:
        load_vectors(path, views, dim)
    except CacheEntryError as exc:
        return str(exc)
    return None


def save_vectors(path: Path, vectors: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, vectors.astype(np.float32))
    write_bytes(Path(path), buf.getvalue())


def run_embedding(jobs: list[PlateJob], spec: ModelSpec, batch_size: int, dtype: str,
                  device: str | None = None, num_workers: int | None = None,
                  weights_root: Path | None = None, model: LoadedModel | None = None,
                  readers: str | None = None) -> dict[str, str | None]:
    """Embed ``jobs``; write each plate's vectors to its cache file. ``readers``: see
    ``embed_jobs`` (None: "device" on a GPU, "threads" on the CPU).

    Returns plate_id -> None when done, or the error message of a plate that failed alone.
    """
    import torch

    if not jobs:
        return {}
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if readers is None:
        readers = "device" if torch.device(device).type == "cuda" else "threads"
    model, embed = embedder(spec, device, dtype, weights_root, model)
    workers = num_workers if num_workers is not None else reader_threads()
    outcome: dict[str, str | None] = {}
    # A writer thread stores vectors while the main thread feeds the next batch to the device.
    with ThreadPoolExecutor(2, thread_name_prefix="plateflow-writer") as writer:
        writes = []
        cuda = embed.device.type == "cuda"
        for job, vectors, error in embed_jobs(embed, jobs, model, batch_size, workers, pin_memory=cuda,
                                              readers=readers):
            if error is None:
                writes.append(writer.submit(save_vectors, Path(job.cache_file), vectors))
            outcome[job.plate_id] = error
        for w in writes:
            w.result()  # an I/O error surfaces here (and is retried as transient)
    return outcome


_last_embedder: list = []  # [(key, model given or None, LoadedModel, Embedder)]: at most one
_embedder_lock = threading.Lock()


def embedder(spec: ModelSpec, device: str, dtype: str, weights_root: Path | None = None,
             model: LoadedModel | None = None) -> tuple[LoadedModel, Embedder]:
    """The model (loaded unless given) and its Embedder on ``device`` in ``dtype``.

    The last one is kept for the process: a flow embeds a model's plates chunk by chunk, and
    loading the weights for every chunk (seconds) would cost more than embedding the chunk.
    Only one is kept, so a second model never shares the device's memory with the first. A
    local weights folder whose files change is loaded again.
    """
    local = weights_dir(spec, weights_root)
    stamp = None if local is None else sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns)
                                              for f in local.iterdir() if f.is_file())
    key = (spec.model_dump_json(), device, dtype, str(local), stamp)
    with _embedder_lock:
        if _last_embedder and _last_embedder[0][0] == key and _last_embedder[0][1] is model:
            return _last_embedder[0][2], _last_embedder[0][3]
        if _last_embedder:
            _last_embedder.clear()
            _release_device_memory(device)
        loaded = model or load_model(spec, weights_root)
        embed = Embedder(loaded, device, dtype)
        _last_embedder.append((key, model, loaded, embed))
        return loaded, embed


def _release_device_memory(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def reader_threads() -> int:
    """Reader threads: every core but the one that drives the device."""
    return max(1, (os.cpu_count() or 2) - 1)


@task(name="embed-chunk", task_run_name="embed-{spec.name}-{chunk_name}", retries=2,
      retry_delay_seconds=[5, 30], retry_jitter_factor=0.5, retry_condition_fn=retry_transient)
def embed_chunk(jobs: list[PlateJob], spec: ModelSpec, batch_size: int, dtype: str,
                chunk_name: str = "0", weights_root: str | None = None,
                readers: str = "device") -> dict[str, str | None]:
    """A chunk of plates through one model; only GpuOutOfMemoryError/I/O failures are retried.
    ``readers``: the GPU class's reader kind (see ``embed_jobs``)."""
    return run_embedding(jobs, spec, batch_size, dtype, weights_root=Path(weights_root) if weights_root else None,
                         readers=readers)
