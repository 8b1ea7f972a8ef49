import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flows.refresh import refresh_corpus
from plateflow.config import CropParams, RefreshConfig

from fixtures import DEVICE, subflow_runs
from fixtures.plates import paper_plate, read_image


pytestmark = pytest.mark.usefixtures("prefect_harness")
MODELS = ["tiny_dinov2", "tiny_clip"]


def run(root, **kw):
    state = refresh_corpus(str(root), RefreshConfig(models=MODELS, gpu_class="CPU", **kw), return_state=True)
    table = {r["plate_dir"]: r for r in pq.read_table(root / "plates.parquet").to_pylist()}
    return state, table


def test_full_pipeline_with_both_backends(corpus, tiny_env):
    state, table = run(corpus, crop=CropParams(crop_format="png"))
    assert state.is_completed(), state.message
    row = table["plate-002"]
    assert row["embed_status"] == "computed" and row["crop_status"] == "computed"
    d = corpus / "plates_structured" / "plate-002"
    run_dir = d / "runs" / row["run_id"]
    assert np.load(run_dir / "embeddings" / "tiny_dinov2.npy").shape == (16, 32)
    assert np.load(run_dir / "embeddings" / "tiny_clip.npy").shape == (16, 16)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"run_id", "plate_id", "timestamp", "models", "outputs", "notes"} <= set(metrics)
    assert metrics["models"] == MODELS and all((run_dir / o).is_file() for o in metrics["outputs"])
    crop = json.loads((run_dir / "smart_crop.json").read_text())
    assert crop["plate_id"] == "plate-002" and crop["original_size"] == [320, 240]
    assert crop["crop_box"] == row["crop_box"] and crop["best_crop_idx"] == row["best_crop_idx"] >= 1
    x0, y0, x1, y1 = crop["crop_box"]
    saved = read_image(run_dir / "best_crop.png")
    assert saved.size == (x1 - x0, y1 - y0)  # cut from the full-resolution source
    source = read_image(d / "source" / "scan.jpg").convert("RGB")
    assert np.array_equal(np.asarray(saved), np.asarray(source.crop((x0, y0, x1, y1))))
    cands = json.loads((d / "crop_candidates.json").read_text())
    assert len(cands["boxes"]) == 16 and read_image(d / "working_copy.jpg").size[1] <= 1024
    emb = pq.read_table(corpus / "embeddings" / "tiny_clip.parquet")
    assert emb.num_rows == 3 * 16 and str(emb.schema.field("vector").type) == "fixed_size_list<element: float>[16]"
    vec = np.asarray(emb.column("vector").to_pylist(), np.float32)
    np.testing.assert_allclose(np.linalg.norm(vec, axis=1), 1.0, atol=1e-5)
    # The GPU subflow got its plates as a file, not as parameters (the server refuses more than
    # 512 KiB of those: about a thousand plates); the file is gone once read.
    runs = {r.parameters["model"]: r.parameters for r in subflow_runs(state)}
    assert sorted(runs) == sorted(MODELS)
    for parameters in runs.values():
        assert parameters.get("jobs") is None and parameters["jobs_file"].startswith(str(corpus / ".plateflow"))
        assert len(json.dumps(parameters)) < 1024
    assert not (corpus / ".plateflow" / "dispatch").exists() or not any((corpus / ".plateflow" / "dispatch").iterdir())


def test_a_gpu_class_decodes_on_the_device_in_the_flow_and_gets_the_thread_readers_vectors(corpus, tiny_env, tmp_path,
                                                                                             caplog):
    import logging

    from fixtures.plates import copy_corpus
    from plateflow.profiles import load_profiles

    assert load_profiles().gpu_class("T4_16GB").readers == "device"
    assert load_profiles().gpu_class("CPU").readers == "threads"
    other = copy_corpus(corpus, tmp_path / "other")
    vectors = {}
    caplog.set_level(logging.INFO, logger="plateflow.embed.runner")
    for root, cls in ((corpus, "CPU"), (other, "T4_16GB")):  # T4's plan on this CPU: device decoding, batch 64
        caplog.clear()
        state = refresh_corpus(str(root), RefreshConfig(models=["tiny_dinov2"], gpu_class=cls), return_state=True)
        assert f"waiting for the readers ({'threads' if cls == 'CPU' else 'device'})" in caplog.text
        assert state.is_completed(), state.message
        table = {r["plate_dir"]: r for r in pq.read_table(root / "plates.parquet").to_pylist()}
        assert {r["embed_status"] for r in table.values()} == {"computed"}
        vectors[cls] = {k: np.load(root / "plates_structured" / k / "runs" / r["run_id"] / "embeddings" / "tiny_dinov2.npy")
                        for k, r in table.items()}
    assert set(vectors["CPU"]) == set(vectors["T4_16GB"]) == {"plate-001", "plate-002", "plate-003"}
    for k in vectors["CPU"]:
        np.testing.assert_allclose(vectors["T4_16GB"][k], vectors["CPU"][k], atol=1e-5 if DEVICE == "cpu" else 2e-3)


def test_rerun_skips_done_plates_and_a_changed_plate_is_redone(corpus, tiny_env):
    run(corpus)
    runs_before = sorted(p.name for p in (corpus / "plates_structured" / "plate-001" / "runs").iterdir())
    _, first = run(corpus)
    state, table = run(corpus)
    assert state.is_completed() and "embeddings: 0 computed, 3 cached" in state.message
    assert table == first  # every row as it was: crops and vectors too
    assert sorted(p.name for p in (corpus / "plates_structured" / "plate-001" / "runs").iterdir()) == runs_before

    paper_plate(seed=42, photo_colour=(250, 0, 0)).save(corpus / "plates_structured" / "plate-003" / "source" / "scan.jpg")
    state, table = run(corpus)
    assert "embeddings: 1 computed, 2 cached" in state.message
    assert {k for k in table if table[k] != first[k]} == {"plate-003"}


def test_a_plate_that_fails_to_decode_fails_alone_in_the_full_pipeline(corpus, tiny_env):
    (corpus / "plates_structured" / "plate-002" / "source" / "scan.jpg").write_bytes(b"\xff\xd8 broken")
    state, table = run(corpus)
    assert state.is_failed() and "plate-002" in state.message
    assert table["plate-002"]["status"] == "failed" and table["plate-002"]["failed_step"] == "characterize"
    assert table["plate-001"]["crop_status"] == "computed" and table["plate-003"]["status"] == "ok"


def test_bad_model_configuration_fails_before_any_work(corpus, tiny_env):
    state = refresh_corpus(str(corpus), RefreshConfig(models=["huge_dinov2"], gpu_class="T4_16GB"), return_state=True)
    assert state.is_failed() and "does not fit GPU class T4_16GB" in state.message
    state = refresh_corpus(str(corpus), RefreshConfig(models=["nope"], gpu_class="CPU"), return_state=True)
    assert state.is_failed() and "unknown model 'nope'" in state.message
    assert not (corpus / "plates.parquet").exists()
    assert not (corpus / "plates_structured" / "plate-001" / "input_image.json").exists()


def test_missing_weights_fail_an_in_process_refresh_before_any_work_with_one_message(corpus, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.delenv("PLATEFLOW_WEIGHTS", raising=False)
    monkeypatch.delenv("PLATEFLOW_PROFILES", raising=False)
    state = refresh_corpus(str(corpus), RefreshConfig(models=["dinov2_small"], gpu_class="CPU", gpu_dispatch="local"),
                           return_state=True)
    assert state.is_failed()
    assert state.message.count("no weights for model dinov2_small") == 1  # said once, not per plate
    assert "huggingface-cli download timm/vit_small_patch14_dinov2.lvd142m" in state.message
    assert not (corpus / "plates.parquet").exists()
    assert not (corpus / "plates_structured" / "plate-001" / "input_image.json").exists()


def test_odd_but_valid_plates_go_through_the_whole_pipeline(tmp_path, tiny_env):
    from fixtures.plates import make_plate

    root = tmp_path / "corpus"
    make_plate(root, "plate-001", Image.new("RGB", (1, 1), (10, 20, 30)), filename="dot.png")
    make_plate(root, "plate-002", Image.new("L", (4, 3000), 128), filename="strip.png")
    make_plate(root, "plate-003", paper_plate(), filename="normal.jpg")
    state, table = run(root)
    assert state.is_completed(), state.message
    assert table["plate-001"]["best_crop_idx"] == 0  # no candidate fits inside one pixel: the whole plate
    assert table["plate-002"]["extreme_aspect"] is True and table["plate-002"]["crop_status"] == "computed"
    run_dir = root / "plates_structured" / "plate-001" / "runs" / table["plate-001"]["run_id"]
    assert read_image(run_dir / "best_crop.jpg").size == (1, 1)


def test_retry_with_models_keeps_the_other_plates_embeddings(corpus, tiny_env):
    from flows.retry import retry_failed_plates

    scan = corpus / "plates_structured" / "plate-003" / "source" / "scan.jpg"
    good = scan.read_bytes()
    scan.write_bytes(b"")
    state, _ = run(corpus)
    assert state.is_failed()
    assert set(pq.read_table(corpus / "embeddings" / "tiny_clip.parquet").column("plate_id").to_pylist()) == {
        "plate-001", "plate-002"}
    scan.write_bytes(good)
    state = retry_failed_plates(str(corpus), RefreshConfig(models=MODELS, gpu_class="CPU"), return_state=True)
    assert state.is_completed(), state.message
    emb = pq.read_table(corpus / "embeddings" / "tiny_clip.parquet")
    assert sorted(set(emb.column("plate_id").to_pylist())) == ["plate-001", "plate-002", "plate-003"]
    assert emb.num_rows == 3 * 16


def test_embed_plates_reads_its_plates_from_a_jobs_file_and_skips_stored_vectors(tiny_env, tmp_path):
    """How a pool run gets its plates; a run sent again after a lost worker does only the rest."""
    from dataclasses import asdict

    from flows.embed import embed_plates
    from plateflow.atomic import write_json
    from plateflow.embed.reader import PlateJob

    jobs = []
    for i in range(3):
        work = tmp_path / f"work-{i}.jpg"
        paper_plate(seed=i).save(work)
        jobs.append(PlateJob(f"plate-{i}", str(work), (320, 240), ((0, 0, 320, 240), (80, 60, 240, 180)),
                             str(tmp_path / "store" / f"v{i}.npy")))
    stored = np.full((2, 32), 0.5, np.float32)
    (tmp_path / "store").mkdir()
    np.save(jobs[1].cache_file, stored)  # what a lost run had finished
    write_json(tmp_path / "jobs.json", [asdict(j) for j in jobs])
    outcome = embed_plates("tiny_dinov2", "CPU", jobs_file=str(tmp_path / "jobs.json"), chunk_size=1,
                           report=str(tmp_path / "report.json"))
    assert outcome == {"plate-0": None, "plate-1": None, "plate-2": None}
    assert json.loads((tmp_path / "report.json").read_text()) == outcome
    np.testing.assert_array_equal(np.load(jobs[1].cache_file), stored)  # not embedded again
    for job in (jobs[0], jobs[2]):
        vectors = np.load(job.cache_file)
        assert vectors.shape == (2, 32)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    with pytest.raises(Exception, match="exactly one of jobs and jobs_file"):
        embed_plates("tiny_dinov2", "CPU")
    with pytest.raises(Exception, match="not on this machine .* need the corpus at the same path"):
        embed_plates("tiny_dinov2", "CPU", jobs_file=str(tmp_path / "elsewhere" / "jobs.json"))
