"""The mapper: ``ViewEncoder``, the only code that touches the device. It decodes a batch of
working copies (nvJPEG on a GPU), cuts and letterboxes every view, and runs one forward pass for
them all; ``encoder_for`` keeps the last one built for the process."""

from __future__ import annotations

import logging
import threading
import warnings
from pathlib import Path

import numpy as np

from plateflow.errors import GpuOutOfMemoryError
from plateflow.profiles import ModelSpec
from plateflow.embed.models import LoadedModel, load_model, weights_dir
from plateflow.embed.reader import DecodedPlate, EncodedPlate, decoded_plate, read_plate
from plateflow.embed.surgery import fold_layer_scale, fuse_gelu_epilogue

log = logging.getLogger(__name__)


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


class ViewEncoder:
    """Cuts, letterboxes and normalises views on the device; returns L2-normalised float32 vectors.

    On a GPU with a reduced-precision dtype the weights are held in that dtype, so no forward
    pass spends time casting them (autocast recasts every weight on every call), and each MLP's
    first matmul applies its GELU (``fuse_gelu_epilogue``); on the CPU the model runs in float32
    as published. LayerScale is folded into the weights on every device (``fold_layer_scale``).
    ``compile`` (True or a mode) wraps the forward pass in ``torch.compile`` for one batch shape:
    a batch shorter than the longest so far is padded to it, so the model compiles once.
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
        self.compiled = bool(compile)
        self._forward = torch.compile(self._net_forward, mode=mode, dynamic=False) if compile else self._net_forward
        self._rows = 0  # compiled: the batch shape every batch is padded to

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
            out[k] = decoded_plate(plates[k].job, image.permute(1, 2, 0))
        return out

    def cut_views(self, plates: list[DecodedPlate]):
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
        """views: (N, 3, S, S) float in 0..255 (from ``cut_views``) -> (N, dim) float32 on the
        device, queued: nothing waits for the device here (``to_host`` fetches them)."""
        torch = self.torch
        with torch.inference_mode():
            x = ((views.to(self.device) - self.mean) / self.std).to(self.compute_dtype)
            n = len(x)
            if self.compiled:
                self._rows = max(self._rows, n)
                if n < self._rows:  # one batch shape: the graph compiled for it serves
                    x = torch.cat([x, x.new_zeros((self._rows - n, *x.shape[1:]))])
            return torch.nn.functional.normalize(self._forward(x)[:n].float(), dim=-1)

    def __call__(self, views):
        """``launch``, then wait for the vectors on the CPU."""
        return self.launch(views).cpu()


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


_last_encoder: list = []  # [(key, model given or None, LoadedModel, ViewEncoder)]: at most one
_encoder_lock = threading.Lock()


def encoder_for(spec: ModelSpec, device: str, dtype: str, weights_root: Path | None = None,
                model: LoadedModel | None = None, compile: str = "") -> tuple[LoadedModel, ViewEncoder]:
    """The model (loaded unless given) and its ViewEncoder on ``device`` in ``dtype``, its forward
    pass compiled in the ``compile`` mode (empty: not compiled).

    The last one is kept for the process: a flow embeds a model's plates chunk by chunk, and
    loading the weights for every chunk (seconds) would cost more than embedding the chunk.
    Only one is kept, so a second model never shares the device's memory with the first. A
    local weights folder whose files change is loaded again.
    """
    local = weights_dir(spec, weights_root)
    stamp = None if local is None else sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns)
                                              for f in local.iterdir() if f.is_file())
    key = (spec.model_dump_json(), device, dtype, str(local), stamp, compile)
    with _encoder_lock:
        if _last_encoder and _last_encoder[0][0] == key and _last_encoder[0][1] is model:
            return _last_encoder[0][2], _last_encoder[0][3]
        if _last_encoder:
            _last_encoder.clear()
            _release_device_memory(device)
        loaded = model or load_model(spec, weights_root)
        embed = ViewEncoder(loaded, device, dtype, compile=compile or False)
        _last_encoder.append((key, model, loaded, embed))
        return loaded, embed


def _release_device_memory(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
