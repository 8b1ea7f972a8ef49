"""The contract every per-plate batch stage keeps, run on each stage's own work function (what a
batch task runs): a re-run over unchanged plates does no work and changes no byte; a bad plate
fails alone, with its step and error, and the others complete; the stage's key changes with its
parameters and with its code version."""

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from fixtures.plates import make_plate, paper_plate
from plateflow.config import CharacterizeParams, CropParams
from plateflow.corpus import PlateRef, discover_plates

GOOD = ("plate-001", "plate-002", "plate-003")
BAD = "plate-bad"


def corpus(root: Path) -> list[PlateRef]:
    for i, folder in enumerate(GOOD):
        make_plate(root, folder, paper_plate(320 + 40 * i, 240, seed=i), filename="scan.png")
    make_plate(root, BAD, b"\x89PNG\r\n\x1a\n not a whole image", filename="scan.png")
    return [p for p in discover_plates(root) if isinstance(p, PlateRef)]


def sha(plate: PlateRef) -> str:
    return hashlib.sha256(plate.source_path.read_bytes()).hexdigest()


def files(root: Path) -> dict[str, bytes]:
    """Every file a stage may write: the plates' outputs and plateflow's stores."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "source" not in p.parts and p.name != "manifest.json"}


@dataclass
class Stage:
    """How the contract drives one stage: its work over plates, and its key for given params."""

    run: Callable[[Path, list[PlateRef], object], list]  # (root, plates, params) -> outcomes
    params: object
    other_params: object  # params that must change the key
    key: Callable[[object, str], str]  # (params, sha256) -> key
    step: str  # its name in plateflow/caching.py:STEP_CODE: the code in its key
    bad_fails_at: str | None  # the step a corrupt source fails at; None: the stage never reads pixels


def _characterize(root, plates, params):
    from plateflow.characterize.step import characterize_plates

    return characterize_plates([(p, sha(p), None) for p in plates], params, root)


def _candidates(root, plates, params):
    from plateflow.embed.candidates import candidates_of_plates

    return candidates_of_plates([(p, (320, 240)) for p in plates if p.folder != BAD]
                                + [(p, (0, -1)) for p in plates if p.folder == BAD], params)


def _tiles(root, plates, params):
    from plateflow.tiles import TileJob, tiles_of_plates

    store = root / ".plateflow" / "tiles"
    return tiles_of_plates([TileJob(p, sha(p)) for p in plates], params, store)


def _crop_jobs(root, plates, params):
    """Each plate's candidates and stored vectors (random, unit length: the real files a model
    would leave), as the refresh hands them to the smart crop."""
    import numpy as np

    from plateflow.embed.candidates import candidate_boxes
    from plateflow.smart_crop import CropJob

    jobs = []
    for i, p in enumerate(plates):
        boxes = candidate_boxes(320, 240, params)
        vectors = np.random.default_rng(i).normal(size=(len(boxes), 8)).astype("<f4")
        path = root / ".plateflow" / "vectors" / f"{p.folder}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
        digest = sha(p)
        jobs.append(CropJob(p, _crop_key(params, digest), {"m": str(path)}, boxes, (320, 240), digest))
    return jobs


def _smart_crop(root, plates, params):
    from plateflow.smart_crop import smart_crop_plates

    return smart_crop_plates(_crop_jobs(root, plates, params), "run-1", "m", params)


def _crop_key(params, digest):
    from plateflow.smart_crop import crop_key

    return crop_key("m", params, ["m:embedding-key"])(digest)


def _tile_params(**kw):
    from plateflow.tiles import TileParams

    return TileParams(width=64, height=64, **kw)


def _tile_key(params, digest):
    return params.key(digest)


def _characterize_key(params, digest):
    from plateflow.characterize.step import plate_key

    return plate_key(digest, params)


def _candidates_key(params, digest):
    from plateflow.embed.writer import embedding_key
    from plateflow.profiles import load_profiles

    return embedding_key(load_profiles().model("dinov2_small"), params)  # the boxes are in every vector's key


TINY = {"depth": 2, "embed_dim": 32, "num_heads": 2, "init_values": 1.0}


def _tiny_encoder(root):
    """A tiny random-weight ViT, saved where the patches stage loads weights from."""
    import timm
    import torch
    from safetensors.torch import save_file

    weights = root.parent / f"{root.name}-weights"
    if not (weights / "tiny" / "model.safetensors").is_file():
        torch.manual_seed(0)
        net = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=28, **TINY)
        (weights / "tiny").mkdir(parents=True)
        save_file(net.state_dict(), weights / "tiny" / "model.safetensors")
    return _tiny_encoder_spec(), weights


def _patches(root, plates, params):
    from plateflow.segment.patches import PatchJob, patches_of_plates, tokens_path

    spec, weights = _tiny_encoder(root)
    jobs = [PatchJob(p, sha(p), str(tokens_path(root, spec, params, sha(p)))) for p in plates]
    return patches_of_plates(jobs, spec, params, weights_root=str(weights))


def _patch_params(**kw):
    from plateflow.segment.patches import PatchParams

    return PatchParams(patch_size=128, overlap=32, **kw)


def _patches_key(params, digest):
    from plateflow.segment.patches import step_key

    return step_key(_tiny_encoder_spec(), params)(digest)


def _tiny_encoder_spec():
    from plateflow.profiles import ModelSpec

    return ModelSpec(name="tiny", backend="timm", hub_id="-", architecture="vit_small_patch14_dinov2", family="dinov2",
                     input_size=28, embed_dim=32, min_vram_gb=0, batch={"CPU": 16}, model_kwargs=TINY)


STAGES = {
    "characterize": Stage(_characterize, CharacterizeParams(), CharacterizeParams(preview_size=256),
                          _characterize_key, "characterize", "characterize"),
    "candidates": Stage(_candidates, CropParams(), CropParams(n_candidates=8), _candidates_key,
                        "embed", "candidates"),
    "smart crop": Stage(_smart_crop, CropParams(), CropParams(crop_format="png"), _crop_key, "crop",
                        "smart_crop"),
    "tiles": Stage(_tiles, _tile_params(), _tile_params(grayscale=True), _tile_key, "tiles", "tiles"),
    "patches": Stage(_patches, _patch_params(), _patch_params(max_pixels=10**8), _patches_key, "patches", "patches"),
}


@pytest.mark.parametrize("name", list(STAGES))
def test_a_stage_reruns_for_free_isolates_a_bad_plate_and_keys_on_params_and_code(name, tmp_path, monkeypatch):
    stage = STAGES[name]
    plates = corpus(tmp_path)
    first = {o.folder: o for o in stage.run(tmp_path, plates, stage.params)}
    assert set(first) == set(GOOD) | {BAD}
    assert all(not first[f].failed for f in GOOD), {f: first[f].error for f in GOOD}
    assert first[BAD].failed and first[BAD].failed_step == stage.bad_fails_at and first[BAD].error
    written = files(tmp_path)
    assert written, f"{name} wrote nothing"

    again = {o.folder: o for o in stage.run(tmp_path, [p for p in plates if p.folder in GOOD], stage.params)}
    assert all(not o.failed for o in again.values())
    assert files(tmp_path) == written  # an unchanged re-run changes no byte
    if name == "characterize":
        assert {o.status for o in again.values()} == {"cached"}  # and decodes nothing
    if name == "smart crop":  # an earlier run's outputs: said as cached, in the task's log too
        assert {o.status for o in again.values()} == {"cached"} and {o.status for f, o in first.items()
                                                                    if f in GOOD} == {"computed"}

    digest = sha(plates[0])
    assert stage.key(stage.params, digest) != stage.key(stage.other_params, digest)
    from plateflow import caching

    before = stage.key(stage.params, digest)
    edited = tmp_path / "edited_stage_code.py"  # one more function in the stage's code
    edited.write_text("def probe():\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(caching.STEP_CODE, stage.step, caching.STEP_CODE[stage.step] + ("edited_stage_code",))
    caching.step_version.cache_clear()
    try:
        assert stage.key(stage.params, digest) != before  # an edit to the stage's code is a new key
    finally:
        monkeypatch.undo()
        caching.step_version.cache_clear()
    assert stage.key(stage.params, digest) == before


def test_tiles_stored_under_the_earlier_spelling_of_their_key_are_adopted_not_cut_again(tmp_path):
    from plateflow.tiles import stored_tiles

    plates = [p for p in corpus(tmp_path) if p.folder in GOOD]
    params = _tile_params()
    store = tmp_path / ".plateflow" / "tiles"
    _tiles(tmp_path, plates, params)
    digest = sha(plates[0])
    record = stored_tiles(store, params, digest)
    for suffix in (".tar", ".json"):  # as an earlier version left them
        (store / f"{params.key(digest)}{suffix}").rename(store / f"{params.earlier_key(digest)}{suffix}")
    archive = (store / f"{params.earlier_key(digest)}.tar").read_bytes()

    assert stored_tiles(store, params, digest) == record
    assert (store / f"{params.key(digest)}.tar").read_bytes() == archive
    assert not list(store.glob(f"{params.earlier_key(digest)}.*"))
    assert stored_tiles(store, params.model_copy(update={"grayscale": True}), digest) is None
