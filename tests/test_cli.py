import json

import numpy as np
import pytest
from typer.testing import CliRunner

from app.cli import app
from plateflow.tables import write_corpus_table, write_embeddings_table

from conftest import paper_plate, read_image

runner = CliRunner()


def test_every_command_has_help():
    for cmd in ([], ["ingest"], ["refresh"], ["status"], ["hardware"], ["demo"], ["pools"], ["worker"], ["local-server"]):
        result = runner.invoke(app, [*cmd, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output


def test_ingest_reports_added_and_skipped_files(tmp_path):
    src = tmp_path / "scans"
    src.mkdir()
    paper_plate().save(src / "a.png")
    (src / "readme.md").write_text("# notes")
    result = runner.invoke(app, ["ingest", str(src), "--root", str(tmp_path / "corpus")])
    assert result.exit_code == 0, result.output
    assert "added plate-001" in result.output and "readme.md: not an image" in result.output
    assert "1 added, 1 skipped" in result.output


def test_status_lists_failures_with_reasons(tmp_path):
    write_corpus_table(tmp_path, [
        {"plate_dir": "plate-001", "plate_id": "plate-001", "status": "ok", "characterize_status": "cached"},
        {"plate_dir": "plate-002", "plate_id": "plate-002", "status": "failed", "failed_step": "characterize",
         "error": "ImageDecodeError: empty file (0 bytes)", "characterize_status": "failed"},
    ])
    result = runner.invoke(app, ["status", "--root", str(tmp_path)], terminal_width=200)
    assert result.exit_code == 0
    assert "2 plates: 1 ok, 1 failed" in result.output and "empty file (0 bytes)" in result.output
    assert "embeddings:" not in result.output  # no models asked for
    assert runner.invoke(app, ["status", "--root", str(tmp_path / "none")]).exit_code == 1


def test_status_counts_embeddings_and_smart_crops_per_model(tmp_path):
    write_corpus_table(tmp_path, [
        {"plate_dir": "plate-001", "plate_id": "plate-001", "status": "ok", "embed_status": "computed",
         "crop_status": "computed"},
        {"plate_dir": "plate-002", "plate_id": "plate-002", "status": "ok", "embed_status": "cached",
         "crop_status": "cached"},
        {"plate_dir": "plate-003", "plate_id": "plate-003", "status": "failed", "failed_step": "embed",
         "error": "RuntimeError: tiny: out of memory", "embed_status": "failed"},
    ])
    boxes = [[0, 0, 8, 8], [2, 2, 6, 6]]
    write_embeddings_table(tmp_path, "tiny", [("plate-001", "a" * 64, boxes, np.ones((2, 5))),
                                              ("plate-002", "b" * 64, boxes, np.ones((2, 5)))], dim=5)
    result = runner.invoke(app, ["status", "--root", str(tmp_path)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "embeddings: cached 1, computed 1, failed 1; smart crop: - 1, cached 1, computed 1" in result.output
    assert "embeddings/tiny.parquet: 2 plates, 4 vectors of 5 floats" in result.output


def test_hardware_prints_class_batch_sizes_and_dtypes(monkeypatch):
    monkeypatch.setenv("PLATEFLOW_GPU_CLASS", "T4_16GB")
    result = runner.invoke(app, ["hardware"])
    report = json.loads(result.output)
    assert report["gpu_class"] == "T4_16GB" and report["overridden"] is True
    assert report["models"]["dinov2_base"] == {"batch_size": 256, "dtype": "float16"}
    assert "use dinov2_large" in report["models"]["dinov2_giant"]["refused"]


def test_refresh_rejects_a_root_that_is_not_a_corpus(tmp_path):
    result = runner.invoke(app, ["refresh", "--root", str(tmp_path)])
    assert result.exit_code != 0 and "plates_structured" in result.output


@pytest.mark.usefixtures("prefect_harness")
def test_refresh_without_the_models_weights_is_a_configuration_error_that_touches_nothing(corpus, monkeypatch,
                                                                                        tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.delenv("PLATEFLOW_WEIGHTS", raising=False)
    result = runner.invoke(app, ["refresh", "--root", str(corpus), "--models", "dinov2_small",
                                 "--gpu-dispatch", "local"], terminal_width=400)
    assert result.exit_code == 2, result.output
    assert "configuration error: no weights for model dinov2_small" in result.output
    assert "huggingface-cli download timm/vit_small_patch14_dinov2.lvd142m" in result.output
    assert not (corpus / "plates.parquet").exists()
    # The same through --failed-only (the retry flow runs refresh as a subflow).
    write_corpus_table(corpus, [{"plate_dir": "plate-001", "plate_id": "plate-001", "status": "failed"}])
    result = runner.invoke(app, ["refresh", "--root", str(corpus), "--models", "dinov2_small",
                                 "--gpu-dispatch", "local", "--failed-only"], terminal_width=400)
    assert result.exit_code == 2, result.output
    assert "configuration error: no weights for model dinov2_small" in result.output
    assert not (corpus / "plates_structured" / "plate-001" / "input_image.json").exists()


def test_every_gpu_class_has_exactly_one_pool():
    from plateflow.pools import pool_definitions
    from plateflow.profiles import load_profiles

    pools = pool_definitions()
    assert set(pools) == set(load_profiles().classes)
    assert len({p.name for p in pools.values()}) == len(pools)
    assert all(p.worker_limit == 1 for c, p in pools.items() if c != "CPU")


def test_worker_serves_the_pool_of_the_local_class(monkeypatch):
    monkeypatch.setenv("PLATEFLOW_GPU_CLASS", "H100_80GB")
    result = runner.invoke(app, ["worker", "--dry-run"], terminal_width=300)
    assert result.exit_code == 0
    assert "--pool plates-gpu-h100-80gb --type process --limit 1" in result.output
    monkeypatch.setenv("PLATEFLOW_GPU_CLASS", "NOT_A_CLASS")
    result = runner.invoke(app, ["worker", "--dry-run"])
    assert result.exit_code != 0 and "unknown GPU class 'NOT_A_CLASS'" in str(result.exception)


@pytest.mark.usefixtures("prefect_harness")
def test_demo_builds_the_corpus_and_runs_the_whole_pipeline_on_it(tmp_path, tiny_env):
    import pyarrow.parquet as pq

    from app.demo import DEMO_PLATES

    result = runner.invoke(app, ["demo", "--root", str(tmp_path / "demo"), "--models", "tiny_dinov2"],
                           terminal_width=200)
    assert result.exit_code == 0, result.output
    rows = pq.read_table(tmp_path / "demo" / "plates.parquet").to_pylist()
    assert len(rows) == len(DEMO_PLATES) and {r["status"] for r in rows} == {"ok"}
    assert {r["mode"] for r in rows} >= {"RGB", "L", "RGBA", "I;16"}  # the odd modes a corpus has
    for r in rows:
        run_dir = tmp_path / "demo" / "plates_structured" / r["plate_dir"] / "runs" / r["run_id"]
        assert read_image(run_dir / "best_crop.jpg").size == (r["crop_box"][2] - r["crop_box"][0],
                                                              r["crop_box"][3] - r["crop_box"][1])
    assert f"{len(DEMO_PLATES)} plates: {len(DEMO_PLATES)} ok, 0 failed" in result.output
