import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from plateflow.config import CropParams
from plateflow.errors import ConfigError, GpuOutOfMemoryError, is_transient
from plateflow.profiles import load_profiles
from plateflow.embed.candidates import candidate_boxes
from plateflow.smart_crop import choose_best_crop
from plateflow.characterize.working_copy import make_working_copy
from plateflow.embed.mapper import ViewEncoder, forward_with_backoff
from plateflow.embed.models import ModelUnavailableError, load_model, require_weights
from plateflow.embed.reader import PlateJob
from plateflow.embed.runner import embed_and_store, encode_plates

from fixtures import DEVICE
from fixtures.plates import paper_plate, read_image



def make_jobs(tmp_path, n, params=CropParams(), colours=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    jobs = []
    for i in range(n):
        plate = paper_plate(300, 200, seed=i, photo_colour=(30 * i % 255, 90, 160)) if colours is None \
            else Image.new("RGB", (300, 200), colours[i])
        work = tmp_path / f"work-{i}.jpg"
        make_working_copy(plate, 100).save(work, quality=95)
        boxes = candidate_boxes(300, 200, params)
        jobs.append(PlateJob(f"plate-{i}", str(work), (300, 200), tuple(map(tuple, boxes)),
                             str(tmp_path / f"vec-{i}.npy")))
    return jobs


@pytest.fixture
def dino(tiny_env):
    profiles = load_profiles()
    spec = profiles.model("tiny_dinov2")
    model = load_model(spec)
    torch.manual_seed(1)
    with torch.no_grad():  # larger random weights: features that depend on the input
        for p in model.net.parameters():
            p.normal_(0, 0.3)
    return spec, model


def all_vectors(embed, jobs, model, batch):
    return {job.name: vec for job, vec, err in encode_plates(embed, jobs, model, batch, num_workers=2)}


def test_batch_gives_the_same_vectors_as_one_plate_at_a_time(dino, tmp_path):
    spec, model = dino
    embed = ViewEncoder(model, DEVICE, "float32")
    jobs = make_jobs(tmp_path, 5)
    batched = all_vectors(embed, jobs, model, batch=64)  # four plates share a forward pass
    for job in jobs:
        single = all_vectors(embed, [job], model, batch=16)[job.name]
        np.testing.assert_allclose(batched[job.name], single, atol=1e-5)
        assert batched[job.name].shape == (16, spec.embed_dim)
        np.testing.assert_allclose(np.linalg.norm(single, axis=1), 1.0, atol=1e-5)


def test_injected_out_of_memory_shrinks_the_batch_and_keeps_every_plate_once(dino, tmp_path):
    spec, model = dino
    real = ViewEncoder(model, DEVICE, "float32")
    calls = []

    class Flaky(ViewEncoder):
        def launch(self, views):
            calls.append(views.shape[0])
            if views.shape[0] > 12:
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            return super().launch(views)

    flaky = Flaky(model, DEVICE, "float32")

    jobs = make_jobs(tmp_path, 6)
    seen = [job.name for job, _, _ in encode_plates(flaky, jobs, model, 64, num_workers=2)]
    assert sorted(seen) == sorted(j.name for j in jobs) and len(seen) == len(set(seen))
    assert calls[:3] == [64, 32, 16] and max(calls[3:]) <= 8
    reference = all_vectors(real, jobs, model, 16)
    for job, vec, _ in encode_plates(flaky, jobs, model, 64, num_workers=2):
        np.testing.assert_allclose(vec, reference[job.name], atol=1e-5)


def test_device_readers_decode_each_batch_on_the_device_and_a_bad_plate_fails_alone(dino, tmp_path, caplog):
    """Reader threads read JPEG bytes; the embedder decodes a batch of them at once (nvJPEG on a
    GPU, libjpeg-turbo through torchvision here). A file that is not a whole JPEG goes to Pillow,
    and a batch the device cannot decode goes to Pillow plate by plate: the others are kept."""
    import plateflow.embed.reader as emb

    spec, model = dino
    embed = ViewEncoder(model, DEVICE, "float32")
    jobs = make_jobs(tmp_path, 8)
    png = Path(jobs[2].working_copy).with_suffix(".png")
    read_image(jobs[2].working_copy).save(png)  # not a JPEG: decoded by Pillow
    jobs[2] = dataclasses.replace(jobs[2], working_copy=str(png))
    whole = Path(jobs[4].working_copy).read_bytes()
    Path(jobs[4].working_copy).write_bytes(whole[: len(whole) // 2])  # truncated: no end marker
    Path(jobs[6].working_copy).write_bytes(whole[:3] + b"\0" * 200 + whole[-2:])  # markers, no image
    assert isinstance(emb.read_encoded(jobs[0], spec.input_size), emb.EncodedPlate)
    assert isinstance(emb.read_encoded(jobs[2], spec.input_size), emb.DecodedPlate)
    by_threads = {job.name: (vec, err) for job, vec, err in encode_plates(embed, jobs, model, 64, num_workers=2)}
    caplog.set_level("INFO", logger="plateflow.embed.runner")
    seen = []
    for job, vec, err in encode_plates(embed, jobs, model, 64, num_workers=2, readers="device",
                                    pin_memory=DEVICE == "cuda"):  # 4 plates a batch
        seen.append(job.name)
        ref_vec, ref_err = by_threads[job.name]
        assert (err is None) == (ref_err is None), (job.name, err, ref_err)
        if err is None:
            assert vec.shape == (16, spec.embed_dim)
            np.testing.assert_allclose(vec, ref_vec, atol=0.05)  # two JPEG decoders, a few levels apart
    assert sorted(seen) == sorted(j.name for j in jobs) and len(seen) == len(set(seen))
    assert "cannot read working copy" in by_threads["plate-4"][1] and "cannot read working copy" in by_threads["plate-6"][1]
    assert "waiting for the readers (device)" in caplog.text
    assert "decoding 3 working copies" in caplog.text  # plate-6 with plates 5 and 7 (4 failed in its reader)
    # A batch decoded on the device gives the same vectors as its plates decoded one at a time
    # (nvJPEG's batched decode can put a few pixels a level away from its decode of one image).
    good = [jobs[k] for k in (0, 1, 3, 5, 7)]
    batched = {job.name: vec for job, vec, err in encode_plates(embed, good, model, 80, readers="device")}
    for job in good:
        single = {j.name: v for j, v, e in encode_plates(embed, [job], model, 16, readers="device")}
        np.testing.assert_allclose(batched[job.name], single[job.name], atol=1e-5 if DEVICE == "cpu" else 2e-3)


def test_the_next_batch_is_queued_on_the_device_before_a_batch_is_handed_out(dino, tmp_path):
    """One batch in flight: the device gets batch k+1 before this thread waits for batch k."""
    spec, model = dino
    events = []

    class Recording(ViewEncoder):
        def launch(self, views):
            events.append(f"launch {views.shape[0] // 16} plates")
            return super().launch(views)

    jobs = make_jobs(tmp_path, 5)
    embed = Recording(model, DEVICE, "float32")
    for job, vec, err in encode_plates(embed, jobs, model, 32, num_workers=2):  # 2 plates a batch
        events.append(job.name)
    assert events == ["launch 2 plates", "launch 2 plates", "plate-0", "plate-1", "launch 1 plates",
                      "plate-2", "plate-3", "plate-4"]


def test_out_of_memory_at_batch_one_is_a_transient_error():
    def always_oom(views):
        raise torch.OutOfMemoryError("CUDA out of memory")

    from types import SimpleNamespace

    with pytest.raises(GpuOutOfMemoryError) as info:
        forward_with_backoff(SimpleNamespace(launch=always_oom), torch.zeros(4, 3, 8, 8, dtype=torch.uint8), 4)
    assert is_transient(info.value)


def test_a_plate_whose_working_copy_cannot_be_read_fails_alone(dino, tmp_path):
    spec, model = dino
    jobs = make_jobs(tmp_path, 3)
    Path(jobs[1].working_copy).write_bytes(b"not a jpeg")
    outcome = embed_and_store(jobs, spec, 32, "float32", device=DEVICE, model=model)
    assert outcome["plate-0"] is None and outcome["plate-2"] is None
    assert "cannot read working copy" in outcome["plate-1"]
    assert np.load(jobs[0].cache_file).shape == (16, spec.embed_dim)


def test_both_backends_load_from_a_weights_folder_and_embed(tiny_env, tmp_path):
    profiles = load_profiles()
    for name, backend in (("tiny_dinov2", "timm"), ("tiny_clip", "transformers")):
        spec = profiles.model(name)
        model = load_model(spec)
        assert spec.backend == backend and len(model.mean) == 3
        out = embed_and_store(make_jobs(tmp_path / name, 2), spec, 16, "float32", device=DEVICE, model=model)
        assert out == {"plate-0": None, "plate-1": None}
        assert np.load(tmp_path / name / "vec-0.npy").shape == (16, spec.embed_dim)


def test_the_chunks_of_one_model_load_its_weights_once(tiny_env, tmp_path, monkeypatch):
    import os

    import plateflow.embed.mapper as mapper

    loads = []
    real_load = mapper.load_model
    monkeypatch.setattr(mapper, "load_model", lambda spec, root=None: loads.append(spec.name) or real_load(spec, root))
    monkeypatch.setattr(mapper, "_last_encoder", [])
    profiles = load_profiles()
    dino, clip = profiles.model("tiny_dinov2"), profiles.model("tiny_clip")
    jobs = make_jobs(tmp_path, 4)

    def embed(spec, chunk):
        assert embed_and_store(chunk, spec, 16, "float32", device=DEVICE) == {j.name: None for j in chunk}

    embed(dino, jobs[:2])
    first = np.load(jobs[0].cache_file)
    embed(dino, jobs[2:])
    assert loads == ["tiny_dinov2"]  # the second chunk reused the loaded model
    embed(clip, jobs[:1])
    embed(dino, jobs[:1])
    assert loads == ["tiny_dinov2", "tiny_clip", "tiny_dinov2"]  # one model kept at a time
    np.testing.assert_allclose(np.load(jobs[0].cache_file), first, atol=1e-6)

    weights = next(f for f in (tiny_env[1] / "tiny_dinov2").iterdir() if f.is_file())
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the weights were replaced
    embed(dino, jobs[:1])
    assert loads == ["tiny_dinov2", "tiny_clip", "tiny_dinov2", "tiny_dinov2"]


def test_weights_whose_dimension_disagrees_with_the_table_are_refused(tiny_env):
    spec = load_profiles().model("tiny_dinov2")
    assert load_model(spec).net.num_features == spec.embed_dim == 32
    with pytest.raises(ConfigError, match=r"tiny_dinov2: its weights give 32-dimensional vectors.*embed_dim = 48"):
        load_model(spec.model_copy(update={"embed_dim": 48}))


def test_normalisation_comes_from_the_model_config(tiny_env):
    profiles = load_profiles()
    assert load_model(profiles.model("tiny_dinov2")).mean == pytest.approx((0.485, 0.456, 0.406))
    assert load_model(profiles.model("tiny_clip")).mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))


def test_missing_weights_name_the_model_and_how_to_provide_them(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    monkeypatch.delenv("PLATEFLOW_WEIGHTS", raising=False)
    monkeypatch.delenv("PLATEFLOW_PROFILES", raising=False)
    spec = load_profiles().model("dinov2_base")
    with pytest.raises(ModelUnavailableError, match=r"dinov2_base.*huggingface-cli download timm/vit_base_patch14_dinov2"):
        load_model(spec)


def test_weights_are_found_in_a_local_folder_or_the_hugging_face_cache_without_loading_them(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("PLATEFLOW_WEIGHTS", raising=False)
    monkeypatch.delenv("PLATEFLOW_PROFILES", raising=False)
    spec = load_profiles().model("dinov2_small")
    with pytest.raises(ModelUnavailableError, match=r"dinov2_small.*not in the Hugging Face cache.*huggingface-cli download"):
        require_weights(spec)
    # The hub cache's own layout: refs/main names the snapshot that holds the files.
    repo = tmp_path / "hub" / "models--timm--vit_small_patch14_dinov2.lvd142m"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "model.safetensors").write_bytes(b"not read")
    require_weights(spec)
    # A local folder is used instead of the cache; one with no weight file is refused.
    (tmp_path / "weights" / "dinov2_small").mkdir(parents=True)
    with pytest.raises(ModelUnavailableError, match=r"dinov2_small/? has no model.safetensors"):
        require_weights(spec, tmp_path / "weights")
    (tmp_path / "weights" / "dinov2_small" / "model.safetensors").write_bytes(b"not read")
    require_weights(spec, tmp_path / "weights")


def test_model_too_big_for_the_class_is_refused_naming_a_smaller_one():
    profiles = load_profiles()
    with pytest.raises(ConfigError, match="dinov2_giant does not fit GPU class LOW_VRAM.*use dinov2_large"):
        profiles.plan("dinov2_giant", "LOW_VRAM")
    assert profiles.plan("dinov2_base", "H100_80GB") == (1024, "bfloat16")
    assert profiles.plan("dinov2_base", "T4_16GB")[1] == "float16"
    assert profiles.plan("dinov2_base", "CPU")[1] == "float32"


def test_every_model_and_class_in_the_table_is_complete():
    profiles = load_profiles()
    assert set(profiles.models) == {"dinov2_small", "dinov2_base", "dinov2_large", "dinov2_giant",
                                    "dinov3_small", "dinov3_base", "dinov3_large", "siglip_base", "siglip_so400m",
                                    "clip_vit_b32", "clip_vit_l14", "clip_vit_h14"}
    assert {"CPU", "LOW_VRAM", "T4_16GB", "L4_24GB", "A100_40GB", "A100_80GB", "H100_80GB",
            "H200_141GB"} <= set(profiles.classes)
    assert {m.backend for m in profiles.models.values()} == {"timm", "transformers"}


def views_of(model, image: Image.Image, boxes, pin=False):
    from plateflow.embed.reader import DecodedPlate

    plate = DecodedPlate(torch.from_numpy(np.asarray(image.convert("RGB")).copy()), np.asarray(boxes, np.float64))
    return ViewEncoder(model, DEVICE, "float32").cut_views([plate]).cpu().numpy()


def test_whole_plate_is_letterboxed_not_centre_cropped(dino):
    spec, model = dino
    S, fill = spec.input_size, np.array(model.mean)[:, None, None] * 255
    wide = Image.new("RGB", (200, 100), (255, 0, 0))
    view = views_of(model, wide, [[0, 0, 200, 100]])[0]  # (3, S, S)
    top = (S - S // 2) // 2
    np.testing.assert_allclose(view[:, :top], np.broadcast_to(fill, (3, top, S)), atol=1e-4)  # padding above
    np.testing.assert_allclose(view[:, top + S // 2:], np.broadcast_to(fill, (3, S - top - S // 2, S)), atol=1e-4)
    red = np.array([255, 0, 0.])[:, None, None]
    np.testing.assert_allclose(view[:, top:top + S // 2], np.broadcast_to(red, (3, S // 2, S)), atol=1e-3)
    # ... and the whole width of the plate is in the view, edge to edge


def test_views_are_cut_from_their_box_at_any_scale(dino):
    """Left half black, right half white: a box on either half gives a uniform view, a box across
    the edge gives both, split where the edge falls. Area sampling: only the output pixels on a
    box's border may take in a little of what lies across it (bilinear taps, under 1/8 of a pixel)."""
    spec, model = dino
    im = np.zeros((400, 800, 3), np.uint8)
    im[:, 400:] = 255
    views = views_of(model, Image.fromarray(im), [[0, 0, 400, 400], [400, 0, 800, 400], [200, 0, 600, 400],
                                                  [300, 100, 332, 132]])
    half = spec.input_size // 2
    assert views[0][:, :, :-1].max() < 1 and views[1][:, :, 1:].min() > 254
    assert views[0].max() < 32 and views[1].min() > 255 - 32
    np.testing.assert_allclose(views[2][:, :, :half - 1], 0, atol=1)
    np.testing.assert_allclose(views[2][:, :, half + 1:], 255, atol=1)
    assert views[2][:, :, half - 1].max() < 32 and views[2][:, :, half].min() > 255 - 32
    assert views[3].max() < 1  # a small box (upsampled) stays inside its own pixels


def test_candidates_are_deterministic_in_bounds_and_whole_first():
    params = CropParams()
    boxes = candidate_boxes(6000, 4000, params)
    assert boxes == candidate_boxes(6000, 4000, params)
    assert len(boxes) == 16 and boxes[0] == [0, 0, 6000, 4000]
    assert all(0 <= x0 < x1 <= 6000 and 0 <= y0 < y1 <= 4000 for x0, y0, x1, y1 in boxes)
    assert len({(b[2] - b[0]) * 1000 // (b[3] - b[1]) for b in boxes}) >= 3  # several aspect ratios
    assert len(candidate_boxes(6000, 4000, CropParams(n_candidates=5))) == 6


def test_choice_follows_similarity_and_constraints():
    boxes = [[0, 0, 100, 100], [0, 0, 90, 90], [0, 0, 50, 50], [0, 0, 100, 30]]
    v = np.array([[1, 0, 0], [0.6, 0.8, 0], [0.99, 0.141, 0], [1, 0, 0]], np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    assert choose_best_crop(v, boxes, CropParams())[0] == 3
    assert choose_best_crop(v, boxes, CropParams(aspect_range=(0.5, 2.0)))[0] == 2
    assert choose_best_crop(v, boxes, CropParams(aspect_range=(0.5, 2.0), min_area_fraction=0.5))[0] == 1
    assert choose_best_crop(v, boxes, CropParams(min_area_fraction=0.95))[0] == 0  # none fits: whole


def test_known_crop_is_chosen_on_a_constructed_plate(dino, tmp_path):
    """On a uniform plate some candidates see exactly the pixels of the whole plate (same
    letterbox), so their embedding equals the whole plate's: the first of them must win, with
    cosine 1, and every candidate whose view differs must score lower."""
    from plateflow.embed.reader import PlateReader

    spec, model = dino
    params = CropParams()
    jobs = make_jobs(tmp_path, 1, params, colours=[(200, 40, 40)])
    views = ViewEncoder(model, DEVICE, "float32").cut_views([PlateReader(jobs, spec.input_size)[0][1]]).cpu().numpy()
    identical = [i for i in range(1, len(views)) if np.abs(views[i] - views[0]).max() < 1e-3]
    different = [i for i in range(1, len(views)) if i not in identical]
    assert identical and different  # the construction gives both kinds

    vec = all_vectors(ViewEncoder(model, DEVICE, "float32"), jobs, model, 32)["plate-0"]
    best, sim = choose_best_crop(vec, [list(b) for b in jobs[0].boxes], params)
    assert best == identical[0] and sim == pytest.approx(1.0, abs=1e-5)
    assert max(vec[i] @ vec[0] for i in different) < 0.9999


def test_smart_crop_writes_a_run_once_per_key(tmp_path):
    from plateflow.corpus import PlateRef
    from plateflow.smart_crop import smart_crop_plate

    plate_dir = tmp_path / "plate-001"
    (plate_dir / "source").mkdir(parents=True)
    paper_plate(300, 200).save(plate_dir / "source" / "scan.png")
    ref = PlateRef("plate-001", plate_dir, "plate-001", plate_dir / "source" / "scan.png", "source/scan.png")
    boxes = candidate_boxes(300, 200, CropParams())
    vec = np.random.default_rng(0).normal(size=(len(boxes), 8)).astype(np.float32)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    np.save(tmp_path / "v.npy", vec)
    args = (boxes, "m", CropParams(crop_format="png"), (300, 200))
    first = smart_crop_plate(ref, "run-a", "key-1", {"m": str(tmp_path / "v.npy")}, *args)
    again = smart_crop_plate(ref, "run-b", "key-1", {"m": str(tmp_path / "v.npy")}, *args)
    other = smart_crop_plate(ref, "run-c", "key-2", {"m": str(tmp_path / "v.npy")}, *args)
    assert (first["crop_status"], again["crop_status"], other["crop_status"]) == ("computed", "cached", "computed")
    assert again["run_id"] == "run-a" and not (plate_dir / "runs" / "run-b").exists()
    expected = int(np.argmax(vec[1:] @ vec[0])) + 1
    assert first["best_crop_idx"] == expected and first["crop_box"] == boxes[expected]
    saved = json.loads((plate_dir / "runs" / "run-a" / "smart_crop.json").read_text())
    assert saved["best_crop_idx"] == expected and saved["similarity"] == pytest.approx(float(vec[expected] @ vec[0]))


def test_layer_scale_is_folded_into_the_linear_before_it_without_changing_the_output(dino):
    import copy

    from timm.layers import LayerScale

    from plateflow.embed.surgery import fold_layer_scale

    spec, model = dino
    net = copy.deepcopy(model.net).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, LayerScale):
                m.gamma.uniform_(0.1, 2.0)  # DINOv2's trained gains are far from the 1e-5 init
    assert sum(isinstance(m, LayerScale) for m in net.modules()) == 2 * len(net.blocks)
    x = torch.rand(3, 3, spec.input_size, spec.input_size)
    with torch.no_grad():
        before = net(x)
        fold_layer_scale(net)
        fold_layer_scale(net)  # a second call changes nothing
        after = net(x)
    assert not any(isinstance(m, LayerScale) for m in net.modules())
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_the_gelu_epilogue_mlp_computes_fc1_gelu_fc2_and_only_reduced_precision_gpus_use_it(dino):
    """On the CPU torch applies the exact GELU after the product; cuBLASLt's epilogue on a GPU is
    the tanh form, within bf16's resolution of it."""
    import copy

    from timm.layers import Mlp

    from plateflow.embed.surgery import fuse_gelu_epilogue

    spec, model = dino
    net = copy.deepcopy(model.net).eval().to(DEVICE)
    x = torch.rand(2, 3, spec.input_size, spec.input_size, device=DEVICE)
    with torch.no_grad():
        exact = net(x)
        fuse_gelu_epilogue(net)
        fused = net(x)
    assert not any(type(m) is Mlp for m in net.modules()) and len(net.blocks) > 0
    if DEVICE == "cpu":
        torch.testing.assert_close(fused, exact, rtol=1e-5, atol=1e-5)
    assert torch.nn.functional.cosine_similarity(fused, exact).min() > 0.9999
    cpu = ViewEncoder(copy.deepcopy(model), "cpu", "bfloat16")  # the CPU runs float32, the published model
    assert sum(type(m) is Mlp for m in cpu.net.modules()) == len(cpu.net.blocks)


def test_a_corpus_model_is_its_base_with_the_corpus_weights_and_its_own_cache_key(tiny_env, tmp_path):
    """ROOT/experiments/models.json (a fine-tune registers its encoder there): the model loads
    its folder's weights whatever PLATEFLOW_WEIGHTS says, keys its vectors apart from its base,
    and a profiles model's key does not depend on the field corpus models add."""
    from safetensors.torch import save_file

    from plateflow.embed.writer import embedding_key
    from plateflow.profiles import register_model

    root = tmp_path / "corpus"
    base = load_profiles().model("tiny_dinov2")
    net = load_model(base).net
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05)  # other weights than the base's: what a fine-tune leaves
    (root / "experiments" / "x" / "encoder").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, root / "experiments/x/encoder/model.safetensors")

    spec = register_model(root, "tiny-ft", "tiny_dinov2", root / "experiments/x/encoder")
    assert json.loads((root / "experiments/models.json").read_text()) == {
        "tiny-ft": {"base": "tiny_dinov2", "weights": "experiments/x/encoder"}}
    assert load_profiles().models.keys() == load_profiles(root=tmp_path).models.keys()  # another corpus: not there
    assert load_profiles(root=root).model("tiny-ft") == spec
    assert (spec.architecture, spec.embed_dim, spec.hub_id) == (base.architecture, base.embed_dim, "corpus:experiments/x/encoder")
    require_weights(spec)
    pixels = torch.rand(2, 3, base.input_size, base.input_size)
    with torch.no_grad():
        tuned = load_model(spec).net(pixels)
        np.testing.assert_allclose(tuned, net(pixels), atol=1e-5)
        assert not np.allclose(tuned, load_model(base).net(pixels), atol=1e-3)
    assert embedding_key(spec, CropParams()) != embedding_key(base, CropParams())
    assert '"weights"' not in base.identity() and json.loads(base.identity()) == base.model_dump(exclude={"weights"})
    assert register_model(root, "tiny-ft2", "tiny-ft", root / "experiments/x/encoder").architecture == base.architecture
    assert json.loads((root / "experiments/models.json").read_text())["tiny-ft2"]["base"] == "tiny_dinov2"

    (root / "experiments/x/encoder/model.safetensors").unlink()
    with pytest.raises(ModelUnavailableError, match=r"tiny-ft, the corpus's fine-tuned .*experiments/models.json"):
        require_weights(spec)
    for bad, problem in ((["a", "list"], "not a JSON object"),
                         ({"tiny_dinov2": {"base": "tiny_dinov2", "weights": "w"}}, "profiles/models.toml does not use"),
                         ({"../x": {"base": "tiny_dinov2", "weights": "w"}}, "letters, digits"),
                         ({"out": {"base": "tiny_dinov2", "weights": "../../elsewhere"}}, "outside the corpus"),
                         ({"nobase": {"base": "no_such_model", "weights": "w"}}, "unknown model 'no_such_model'"),
                         ({"half": {"base": "tiny_dinov2"}}, "needs a base model and a weights folder")):
        (root / "experiments/models.json").write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match=problem):
            load_profiles(root=root)
    (root / "experiments/models.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read the corpus's models"):
        register_model(root, "tiny-ft3", "tiny_dinov2", root / "experiments/x/encoder")
    assert (root / "experiments/models.json").read_text() == "{not json"  # said, not overwritten
    with pytest.raises(ConfigError, match="cannot name a fine-tuned model 'a b'"):
        register_model(root, "a b", "tiny_dinov2", root / "experiments/x/encoder")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["tiny_dinov2", "tiny_dinov3", "tiny_siglip", "tiny_clip"])
def test_the_gpu_gives_the_cpus_vectors(tiny_env, tmp_path, name):
    """On CUDA, each backend and architecture embeds the plates as the CPU does: in float32 (TF32
    matrix products) to 2e-3, and in the GPU classes' bfloat16 (weights held in bf16, GELU fused
    into the first matmul of each MLP) to a cosine of 0.99 per view, reading from the device's
    nvJPEG as from Pillow's threads."""
    spec = load_profiles().model(name)
    jobs = {k: make_jobs(tmp_path / k, 6) for k in ("cpu", "cuda", "bf16")}
    runs = {"cpu": ("cpu", "float32", "threads"), "cuda": ("cuda", "float32", "device"),
            "bf16": ("cuda", "bfloat16", "device")}
    for key, (device, dtype, readers) in runs.items():
        model = load_model(spec)  # each run its own: a ViewEncoder moves and folds the model it gets
        outcome = embed_and_store(jobs[key], spec, 4, dtype, device=device, model=model, readers=readers)
        assert outcome == {j.name: None for j in jobs[key]}, outcome
    for i in range(6):
        cpu, cuda, bf16 = (np.load(jobs[k][i].cache_file).astype(np.float32) for k in ("cpu", "cuda", "bf16"))
        np.testing.assert_allclose(cuda, cpu, atol=2e-3)
        cosine = (bf16 * cpu).sum(1) / np.linalg.norm(bf16, axis=1) / np.linalg.norm(cpu, axis=1)
        assert cosine.min() >= 0.99, (name, i, cosine.min())
    assert torch.cuda.max_memory_allocated() > 0


def test_a_compiled_encoder_gives_the_same_vectors_and_compiles_once(tiny_env, tmp_path, monkeypatch):
    """A GPU class with ``compile`` set: the encoder's forward pass compiled for one batch shape,
    the short last batch padded to it (so no second compilation), the same vectors as eager."""
    import plateflow.embed.mapper as mapper
    from torch._dynamo.utils import counters

    monkeypatch.setattr(mapper, "_last_encoder", [])  # the compiled encoder is not kept for other tests
    spec = load_profiles().model("tiny_dinov2")
    jobs = {k: make_jobs(tmp_path / k, 5) for k in ("eager", "compiled")}
    assert embed_and_store(jobs["eager"], spec, 48, "float32", device=DEVICE, model=load_model(spec)) \
        == {j.name: None for j in jobs["eager"]}
    torch._dynamo.reset()
    counters.clear()
    outcome = embed_and_store(jobs["compiled"], spec, 48, "float32", device=DEVICE, model=load_model(spec),
                              compile="default")  # 48 views a batch: 3 plates, then 2 (32 views)
    assert outcome == {j.name: None for j in jobs["compiled"]}
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    for a, b in zip(jobs["eager"], jobs["compiled"]):
        np.testing.assert_allclose(np.load(b.cache_file), np.load(a.cache_file), atol=1e-4 if DEVICE == "cpu" else 2e-3)
    torch._dynamo.reset()
