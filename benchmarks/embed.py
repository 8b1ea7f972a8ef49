"""Embedding benchmark: model throughput, %-of-peak, end-to-end plates/s, and crop saving.

Models are the real architectures with random weights built from their configs (no download);
on a CPU-only machine it runs tiny models as a smoke test. Reported per model:

  model-only   images/s at several batch sizes and dtypes; forward FLOPs per image (counted by
               torch.utils.flop_counter) and the fraction of the GPU class's peak FLOP/s and of
               a large matrix product's FLOP/s measured in the same run (what the card reaches)
  stage        plates/s for the embedding stage: read cached working copies, build the 15 + 1
               candidate views, embed, choose the best crop, write vectors and smart_crop.json;
               with reader threads decoding (Pillow) and with the device decoding (nvJPEG on a
               GPU), with and without the forward pass, and how long the device loop waited for
               the readers; then embed_and_store chunk by chunk, as the refresh flow runs it
  crop save    cutting + encoding the full-resolution best crop vs plain decoding of the sources
  device loop  microseconds per small torch op (a kernel launch's GIL round trip) in the thread
               that drives the device, with no readers and with each kind of reader

    uv run python benchmarks/embed.py                      # CPU smoke test (tiny models)
    uv run python benchmarks/embed.py --models dinov2_base # on a CUDA machine: real figures
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from results import write_result  # noqa: E402 - benchmarks/results.py

# Vision-tower shapes of the CLIP checkpoints, for random-weight models of the same size.
CLIP_CONFIGS = {
    "clip_vit_b32": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=32, projection_dim=512),
    "clip_vit_l14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14, projection_dim=768),
    "clip_vit_h14": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, patch_size=14, projection_dim=1024),
    "tiny_clip": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=8, projection_dim=16),
}


def random_model(spec):
    """A LoadedModel of the spec's architecture with random weights (no download)."""

    from plateflow.embed.models import LoadedModel

    if spec.backend == "timm":
        import timm
        from timm.data import resolve_model_data_config

        net = timm.create_model(spec.architecture, pretrained=False, num_classes=0, img_size=spec.input_size,
                                **spec.model_kwargs)
        cfg = resolve_model_data_config(net)
        return LoadedModel(spec, net.eval().requires_grad_(False), tuple(cfg["mean"]), tuple(cfg["std"]))
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(image_size=spec.input_size, **CLIP_CONFIGS[spec.name])
    proc = CLIPImageProcessor()
    return LoadedModel(spec, CLIPVisionModelWithProjection(cfg).eval().requires_grad_(False), tuple(proc.image_mean),
                       tuple(proc.image_std))


def flops_per_image(embed, size: int) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(2, 3, size, size) * 255
    with FlopCounterMode(display=False) as counter:
        embed(x)
    return counter.get_total_flops() / 2


def model_only(embed, size: int, batch: int, device: str, seconds: float = 2.0) -> float:
    import torch

    x = torch.rand(batch, 3, size, size, device=device) * 255  # views as ViewEncoder.cut_views leaves them
    embed(x)  # warm-up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        embed.launch(x)  # queued back to back, as the stage queues them
        n += batch
    if device == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def matmul_tflops(device: str, dtype: str, seconds: float = 2.0) -> float:
    """The same run's reference for the model's FLOP/s: a large square matrix product in ``dtype``
    (8192 on CUDA, 1024 on a CPU), TFLOP/s. What the card reaches in practice, beside the spec."""
    import torch

    n = 8192 if device == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device).to(getattr(torch, dtype)) for _ in range(2))
    torch.matmul(a, b)
    if device == "cuda":
        torch.cuda.synchronize()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.matmul(a, b)
        count += 1
        if device == "cuda" and count % 10 == 0:
            torch.cuda.synchronize()
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e12


def make_stage_inputs(folder: Path, plates: int, short_side: int = 1024):
    """Working copies (as the CPU stage leaves them) and candidate boxes for ``plates`` plates."""
    from PIL import Image
    from skimage import data

    from plateflow.config import CropParams
    from plateflow.embed.candidates import candidate_boxes
    from plateflow.embed.reader import PlateJob

    folder.mkdir(parents=True, exist_ok=True)
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    size = (6000, 4500)
    boxes = candidate_boxes(*size, CropParams())

    def make(i):
        work = folder / f"work-{i}.jpg"
        if not work.exists():
            im = Image.new("RGB", (short_side * 4 // 3, short_side), (246, 242, 232))
            ph = Image.fromarray(photos[i % 4]).resize((short_side, short_side * 3 // 4))
            im.paste(ph, ((im.width - ph.width) // 2, (im.height - ph.height) // 2))
            im.save(work, quality=95)
        return PlateJob(f"p{i}", str(work), size, tuple(map(tuple, boxes)), str(folder / f"vec-{i}.npy"))

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # Pillow's resize and encode release the GIL
        jobs = list(pool.map(make, range(plates)))
    return jobs, boxes


class NullEmbed:
    """Stands in for the model: the stage's reading, view cutting, choosing and writing without
    the forward pass (views are still cut on the device by the real ViewEncoder.cut_views)."""

    def __init__(self, encoder):
        self.encoder, self.device = encoder, encoder.device

    def decode(self, plates):
        return self.encoder.decode(plates)

    def cut_views(self, plates):
        return self.encoder.cut_views(plates)

    def launch(self, views):
        import torch

        out = torch.zeros(views.shape[0], 8, device=views.device)
        out[:, 0] = 1
        return out

    def __call__(self, views):
        return self.launch(views).cpu()


def stage(jobs, boxes, spec, model, embed, batch: int, workers: int, readers: str) -> tuple[float, dict]:
    """The embedding stage as embed_and_store runs it, plus choosing the crop: plates/s, and the
    seconds the device loop spent waiting for the readers and on the device."""

    from plateflow.atomic import write_json
    from plateflow.config import CropParams
    from plateflow.smart_crop import choose_best_crop
    from plateflow.embed.runner import encode_plates
    from plateflow.embed.writer import save_vectors

    params = CropParams()

    def write(job, vectors):
        best, sim = choose_best_crop(vectors, boxes, params)
        save_vectors(Path(job.cache_file), vectors)
        write_json(Path(job.cache_file).with_suffix(".json"), {"best_crop_idx": best, "similarity": sim})

    stats = {}
    start = time.perf_counter()
    with ThreadPoolExecutor(2) as writer:
        done = [writer.submit(write, job, vectors)
                for job, vectors, error in encode_plates(embed, jobs, model, batch, num_workers=workers,
                                                      pin_memory=embed.device.type == "cuda",
                                                      readers=readers, stats=stats)]
        for d in done:
            d.result()
    return len(jobs) / (time.perf_counter() - start), {k: round(v, 2) for k, v in stats.items()}


def launch_latency(jobs, size: int, workers: int, readers: str | None, ops: int = 20000) -> float:
    """Microseconds per small torch op (each releases and retakes the GIL, as a kernel launch
    does) in this thread while the readers read ``jobs`` flat out (``readers`` None: no
    readers). Reader threads that hold the GIL show up here as a slower device loop."""
    import threading

    import torch

    from plateflow.embed.reader import PlateReader, prefetch_batches

    x, stop = torch.zeros(64), threading.Event()

    def drain():
        while not stop.is_set():
            for _ in prefetch_batches(PlateReader(jobs, size, encoded=readers == "device"), 16, workers):
                if stop.is_set():
                    break

    reader = threading.Thread(target=drain, daemon=True) if readers is not None else None
    if reader:
        reader.start()
        time.sleep(1.0)  # readers running
    start = time.perf_counter()
    for _ in range(ops):
        torch.add(x, 1)
    us = (time.perf_counter() - start) / ops * 1e6
    stop.set()
    if reader:
        reader.join()
    return us


def pipeline(jobs, boxes, spec, model, batch: int, dtype: str, device: str, workers: int, chunk: int,
             readers: str | None = None, compile: str = "") -> float:
    """embed-plates as the refresh flow runs it in-process: ``embed_and_store`` per chunk of plates
    (the model kept between chunks; compiled in the ``compile`` mode, as a GPU class may set),
    then each plate's crop chosen from its stored vectors: plates/s."""
    import numpy as np

    from plateflow.embed.runner import embed_and_store
    from plateflow.atomic import write_json
    from plateflow.config import CropParams
    from plateflow.smart_crop import choose_best_crop

    params = CropParams()
    start = time.perf_counter()
    for i in range(0, len(jobs), chunk):
        embed_and_store(jobs[i:i + chunk], spec, batch, dtype, device=device, num_workers=workers,
                          model=model, readers=readers, compile=compile)
    for job in jobs:
        best, sim = choose_best_crop(np.load(job.cache_file), boxes, params)
        write_json(Path(job.cache_file).with_suffix(".json"), {"best_crop_idx": best, "similarity": sim})
    return len(jobs) / (time.perf_counter() - start)


def crop_save_ratio(sources: list[Path]) -> tuple[float, float]:
    from PIL import Image

    from plateflow.config import CropParams
    from plateflow.embed.candidates import candidate_boxes
    from plateflow.smart_crop import cut_crop

    def decode():
        for p in sources:
            with Image.open(p) as im:
                im.load()

    def crops():
        for p in sources:
            w, h = Image.open(p).size
            cut_crop(p, candidate_boxes(w, h, CropParams())[1], "jpeg")

    t_dec = min(_timed(decode) for _ in range(2))
    t_crop = min(_timed(crops) for _ in range(2))
    return t_dec / len(sources), t_crop / t_dec


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    import torch

    from plateflow.hardware import classify, detect_device
    from plateflow.profiles import load_profiles
    from plateflow.embed.mapper import ViewEncoder
    from plateflow.embed.reader import reader_threads

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None, help="comma-separated; default: dinov2_base,clip_vit_b32 on CUDA, tiny models on CPU")
    ap.add_argument("--plates", type=int, default=None)
    ap.add_argument("--workers", type=int, default=None, help="reader threads (default: all cores)")
    ap.add_argument("--readers", default=None,
                    help="reader kinds to time the stage with (threads, device; comma-separated; "
                         "default: both on CUDA, threads on a CPU; none: time the model alone)")
    ap.add_argument("--chunk", type=int, default=512, help="plates per embed-chunk task (refresh's --chunk-size)")
    ap.add_argument("--compile", nargs="*", default=None, metavar="MODE",
                    help="also time the model under torch.compile (modes: default, max-autotune-no-cudagraphs, ...)")
    ap.add_argument("--sources", type=Path, default=HERE / "out" / "cpu_plates", help="large JPEGs for the crop-save ratio")
    args = ap.parse_args()

    device = detect_device()
    cuda = device.cuda
    if not cuda:
        sys.path.insert(0, str(HERE.parent / "tests"))
        from fixtures.tiny_models import build_tiny_models

        scratch = Path(tempfile.mkdtemp(prefix="plateflow-embed-"))
        atexit.register(shutil.rmtree, scratch, True)  # the tiny models: gone when the benchmark ends
        profiles_dir, _ = build_tiny_models(scratch)
        os.environ["PLATEFLOW_PROFILES"] = str(profiles_dir)
    profiles = load_profiles()
    cls = classify(device, profiles)
    names = (args.models or ("dinov2_base,clip_vit_b32" if cuda else "tiny_dinov2,tiny_clip")).split(",")
    plates = args.plates or (2048 if cuda else 32)
    workers = args.workers or reader_threads()
    peak = profiles.gpu_class(cls).peak_tflops
    print(f"device: {device.name} ({cls}), torch {torch.__version__}, reader threads {workers}")
    jobs, boxes = make_stage_inputs(HERE / "out" / "embed_stage", plates)
    dev = "cuda" if cuda else "cpu"

    compile_modes = [] if args.compile is None else (args.compile or ["default"])
    reader_kinds = (args.readers or ("threads,device" if cuda else "threads")).split(",")
    reader_kinds = [] if reader_kinds == ["none"] else reader_kinds
    report = {"device": device.name, "gpu_class": cls, "models": {}}
    idle = launch_latency(jobs, 224, workers, None)
    latency = {"no readers": round(idle, 2)}
    for readers in reader_kinds:
        latency[readers] = round(launch_latency(jobs, 224, workers, readers), 2)
    report["device_loop_us_per_op"] = latency
    print("device loop, us per small torch op while the readers decode: "
          + ", ".join(f"{k} {v}" for k, v in latency.items()), flush=True)
    matmul = report["matmul_tflops"] = {}  # dtype -> the same run's matrix-product TFLOP/s

    def row(name, dtype, batch, ips, flops, mode=None):
        """A model-only row: images/s, and its FLOP/s as a fraction of the spec peak (on CUDA) and
        of the matrix product measured in this run."""
        if dtype not in matmul:
            matmul[dtype] = matmul_tflops(dev, dtype)
            print(f"reference: {dtype} matrix product {matmul[dtype]:.3g} TFLOP/s"
                  + (f" ({100 * matmul[dtype] / peak:.0f}% of the {peak} TFLOP/s spec)" if cuda and peak else ""))
        tflops = ips * flops / 1e12
        spec_pct = round(100 * tflops / peak, 1) if (cuda and peak) else None
        ref_pct = round(100 * tflops / matmul[dtype], 1)
        print(f"{name:14s} {dtype:9s} batch {batch:5d}: {ips:9.1f} img/s" + (f" compiled ({mode})" if mode else "")
              + (f"  {spec_pct:5.1f}% of {peak} TFLOP/s" if spec_pct is not None else "")
              + f"  {ref_pct:5.1f}% of the measured matrix product", flush=True)
        return {"dtype": dtype, "batch": batch, **({"compiled": mode} if mode else {}), "images_per_s": round(ips, 1),
                "pct_of_peak": spec_pct, "pct_of_measured_matmul": ref_pct}

    for name in names:
        spec = profiles.model(name)
        model = random_model(spec)
        batch_cls, dtype_cls = profiles.plan(name, cls) if name in profiles.models and cls in spec.batch else (16, "float32")
        dtypes = ["float32"] + ([dtype_cls] if dtype_cls != "float32" else [])
        flops = flops_per_image(ViewEncoder(model, "cpu", "float32"), spec.input_size)
        rows = []
        for dtype in dtypes:
            embed = ViewEncoder(model, dev, dtype)
            for batch in sorted({max(1, batch_cls // 4), batch_cls // 2 or 1, batch_cls}):
                rows.append(row(name, dtype, batch, model_only(embed, spec.input_size, batch, dev), flops))
        for mode in compile_modes:
            embed = ViewEncoder(model, dev, dtype_cls, compile=mode)
            ips = model_only(embed, spec.input_size, batch_cls, dev, seconds=4.0)
            rows.append(row(name, dtype_cls, batch_cls, ips, flops, mode))
        stages = {}
        if reader_kinds:  # --readers none: the model alone
            null = NullEmbed(ViewEncoder(model, "cuda" if cuda else "cpu", dtype_cls))
            embed = ViewEncoder(model, "cuda" if cuda else "cpu", dtype_cls)
            for readers in reader_kinds:
                for label, e in (("without the forward pass", null), ("", embed)):
                    stage(jobs[: min(2 * workers, len(jobs))], boxes, spec, model, e, batch_cls, workers, readers)  # warm-up
                    pps, split = stage(jobs, boxes, spec, model, e, batch_cls, workers, readers)
                    stages[f"{readers} {label}".strip()] = {"plates_per_s": round(pps, 1), **split}
                    print(f"{name:14s} stage {label or f'({len(boxes)} views/plate, {dtype_cls}, batch {batch_cls})'}, "
                          f"reader {readers}: {pps:.1f} plates/s  [waiting for readers {split['waited_s']} s, "
                          f"on the device {split['device_s']} s]", flush=True)
            pipeline(jobs[: min(2 * workers, len(jobs))], boxes, spec, model, batch_cls, dtype_cls, dev, workers, args.chunk)
            pps = pipeline(jobs, boxes, spec, model, batch_cls, dtype_cls, dev, workers, args.chunk)
            stages[f"embed_and_store in chunks of {args.chunk}"] = {"plates_per_s": round(pps, 1)}
            print(f"{name:14s} embed-plates as the flow runs it (embed_and_store per {args.chunk} plates, then the "
                  f"crop choice): {pps:.1f} plates/s", flush=True)
            for mode in compile_modes:  # a GPU class's `compile`: its cost is the warm-up's, once per worker
                torch._dynamo.reset()  # compiled from scratch, as in a new worker
                t = time.perf_counter()
                pipeline(jobs[: min(2 * workers, len(jobs))], boxes, spec, model, batch_cls, dtype_cls, dev, workers,
                         args.chunk, compile=mode)
                warm = time.perf_counter() - t
                pps = pipeline(jobs, boxes, spec, model, batch_cls, dtype_cls, dev, workers, args.chunk, compile=mode)
                stages[f"embed_and_store in chunks of {args.chunk}, compiled ({mode})"] = {
                    "plates_per_s": round(pps, 1), "warm_up_s": round(warm, 1)}
                print(f"{name:14s} embed-plates, the encoder compiled ({mode}; warm-up {warm:.1f} s): "
                      f"{pps:.1f} plates/s", flush=True)
        report["models"][name] = {"gflops_per_image": round(flops / 1e9, 3), "model_only": rows, "stage": stages}
    sources = sorted(args.sources.glob("*.jpg"))[:4]
    if sources:
        per_decode, ratio = crop_save_ratio(sources)
        print(f"best-crop save (JPEG, full resolution) vs plain decode: {ratio:.2f}x ({per_decode:.3f} s/decode)")
        report["crop_save_vs_decode"] = round(ratio, 2)
    else:
        print(f"no sources in {args.sources} (run benchmarks/cpu_stage.py first) for the crop-save ratio")
    write_result("embed", report, sys.argv[1:])


if __name__ == "__main__":
    main()
