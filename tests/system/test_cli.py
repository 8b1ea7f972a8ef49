import json
import os

import numpy as np
import pytest
from typer.testing import CliRunner

from app.cli import app
from plateflow.tables import write_corpus_table, write_embeddings_table

from fixtures.plates import paper_plate, read_image

runner = CliRunner()


def test_every_command_has_help():
    for cmd in ([], *([c] for c in _commands())):
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
    (tmp_path / "plates_structured").mkdir()
    write_corpus_table(tmp_path, [
        {"plate_dir": "plate-001", "plate_id": "plate-001", "status": "ok", "characterize_status": "cached",
         "quality_flags": ["dark", "odd_size"]},
        {"plate_dir": "plate-002", "plate_id": "plate-002", "status": "failed", "failed_step": "characterize",
         "error": "ImageDecodeError: empty file (0 bytes)", "characterize_status": "failed"},
    ])
    result = runner.invoke(app, ["status", "--root", str(tmp_path)], terminal_width=200)
    assert result.exit_code == 0
    assert "2 plates: 1 ok, 1 failed" in result.output and "empty file (0 bytes)" in result.output
    assert "embeddings:" not in result.output  # no models asked for
    assert "quality flags: dark 1, odd_size 1" in result.output
    assert runner.invoke(app, ["status", "--root", str(tmp_path)]).exit_code == 0


def test_status_counts_embeddings_and_smart_crops_per_model(tmp_path):
    (tmp_path / "plates_structured").mkdir()
    write_corpus_table(tmp_path, [
        {"plate_dir": "plate-001", "plate_id": "plate-001", "status": "ok", "embed_status": "computed",
         "crop_status": "computed", "characterize_status": "computed"},
        {"plate_dir": "plate-002", "plate_id": "plate-002", "status": "ok", "embed_status": "cached",
         "crop_status": "cached", "characterize_status": "cached"},
        {"plate_dir": "plate-003", "plate_id": "plate-003", "status": "failed", "failed_step": "embed",
         "error": "RuntimeError: tiny: out of memory", "embed_status": "failed", "characterize_status": "cached"},
        {"plate_dir": "plate-004", "plate_id": "plate-004", "status": "failed", "failed_step": "smart_crop",
         "error": "OSError: disk", "embed_status": "cached", "characterize_status": "cached"},
    ])
    boxes = [[0, 0, 8, 8], [2, 2, 6, 6]]
    write_embeddings_table(tmp_path, "tiny", [("plate-001", "a" * 64, boxes, np.ones((2, 5))),
                                              ("plate-002", "b" * 64, boxes, np.ones((2, 5)))], dim=5)
    result = runner.invoke(app, ["status", "--root", str(tmp_path)], terminal_width=200)
    assert result.exit_code == 0, result.output
    # Each count is a partition of the plates that reached its step: they add up.
    assert ("4 plates: 2 ok, 2 failed; as each row was made when it last changed: characterization: 1 computed, "
            "3 cached, 0 failed; "
            "embeddings: 1 computed, 2 cached, 1 failed; smart crop: 1 failed") in result.output
    assert "embeddings/tiny.parquet: 2 plates, 4 vectors of 5 floats" in result.output


def test_hardware_prints_class_batch_sizes_and_dtypes(monkeypatch):
    monkeypatch.setenv("PLATEFLOW_GPU_CLASS", "T4_16GB")
    result = runner.invoke(app, ["hardware"])
    report = json.loads(result.output)
    assert report["gpu_class"] == "T4_16GB" and report["overridden"] is True
    assert report["embedding"] == {"readers": "device", "compile": None}
    assert report["models"]["dinov2_base"] == {"batch_size": 256, "dtype": "float16"}
    assert "use dinov2_large" in report["models"]["dinov2_giant"]["refused"]


@pytest.mark.parametrize("hidden, driver, imports_torch", [
    ("", True, False),  # CUDA_VISIBLE_DEVICES hides every GPU
    (None, False, False),  # no GPU driver on this Linux machine
    (None, True, True),  # a driver: torch says what it sees
])
def test_the_device_is_known_without_torch_where_no_gpu_can_be(tmp_path, hidden, driver, imports_torch):
    import subprocess
    import sys

    marker = tmp_path / "driver"
    if driver:
        marker.write_text("")
    code = ("import sys, plateflow.hardware as h; h.DRIVER_PATHS = (sys.argv[1],); "
            "print(h.detect_devices()[0].name, 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    if hidden is not None:
        env["CUDA_VISIBLE_DEVICES"] = hidden
    out = subprocess.run([sys.executable, "-c", code, str(marker)], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out[1] == str(imports_torch)
    if not imports_torch:
        assert out[0] == "cpu"


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


def test_worker_polls_the_queue_of_the_local_class_under_a_name_refresh_counts(monkeypatch):
    monkeypatch.setenv("PLATEFLOW_GPU_CLASS", "H100_80GB")
    result = runner.invoke(app, ["worker", "--dry-run"], terminal_width=300)
    assert result.exit_code == 0
    assert "--pool plates --work-queue h100-80gb --type process --limit 1 --name plateflow-h100-80gb-" in result.output
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
    assert f"report: {tmp_path / 'demo' / 'reports' / 'index.html'}" in result.output  # where to look next


def _commands() -> list[str]:
    import typer.main

    return sorted(typer.main.get_command(app).commands)


def test_help_fits_80_columns_and_shows_real_defaults_choices_and_model_names():
    from plateflow.profiles import dispatch_policy, load_profiles

    for cmd in _commands():
        result = runner.invoke(app, [cmd, "--help"], terminal_width=80, env={"COLUMNS": "80"})
        assert result.exit_code == 0, result.output
        assert [line for line in result.output.splitlines() if len(line) > 80] == [], cmd
        assert "…" not in result.output and "<bool>" not in result.output, cmd
    text = " ".join(runner.invoke(app, ["refresh", "--help"], terminal_width=80).output.split())
    policy = dispatch_policy()
    assert f"default: {policy.gpu.chunk_size}, from profiles/dispatch.toml" in text
    assert f"default: {policy.cpu.batch_plates}, from profiles/dispatch.toml" in text
    assert all(name in text for name in load_profiles().models)
    assert "[jpeg|png]" in text.replace("<", "[").replace(">", "]") and "auto|local|pool" in text
    text = " ".join(runner.invoke(app, ["train-head", "--help"], terminal_width=80).output.split())
    assert "dinov2_small" in text


def test_cli_mistakes_are_one_line_with_the_fix_and_no_traceback(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    corpus = tmp_path / "corpus"
    (corpus / "plates_structured").mkdir(parents=True)

    def fails(args: list[str], code: int, *said: str) -> str:
        result = runner.invoke(app, args, terminal_width=300)
        assert result.exit_code == code, result.output
        assert "Traceback" not in result.output and not isinstance(result.exception, (KeyError, AttributeError))
        for text in said:
            assert text in result.output, result.output
        return result.output

    fails(["status", "--root", str(tmp_path / "typo")], 2, "is not a plate corpus", "plateflow ingest")
    fails(["ingest", str(tmp_path / "nonexistent"), "--root", str(corpus)], 2, "no such file or folder",
          "nothing was ingested")
    assert not list((corpus / "plates_structured").iterdir())
    fails(["tiles", "--root", str(corpus), "--size", "512", "--out", str(tmp_path / "t")], 2,
          "'512': give the tile size as WIDTHxHEIGHT in pixels, e.g. 512x512")
    fails(["tiles", "--root", str(corpus), "--size", "512x512", "--mode", "clasic", "--out", str(tmp_path / "t")],
          2, "'clasic' is not one of 'classic', 'noise-framed'")
    fails(["train-head", "--root", str(corpus), "--model", "dinov2_small", "--label", "x"], 2,
          "holds no features: run `plateflow refresh", "--models dinov2_small")
    fails(["refresh", "--root", str(corpus), "--models", "dinov2_smal"], 2,
          "configuration error: unknown model 'dinov2_smal'; known models: dinov2_small")
    fails(["report", "--root", str(corpus), "--serve", "--port", "99999"], 2, "65535")
    fails(["patches", "--root", str(corpus), "--model", "dinov2_small", "--overlap", "128"], 2,
          "overlap 128 must be under half the patch size 256")
    fails(["train-seg", "--root", str(corpus), "--model", "dinov2_small", "--masks", str(tmp_path / "masks")], 2,
          "is not a folder of mask PNGs")
    fails(["predict-seg", "--root", str(corpus), "--experiment", "nope"], 2, "no experiment 'nope'",
          "`plateflow experiments --root")
    fails(["finetune", "--root", str(corpus), "--model", "clip_vit_b32", "--label", "kind"], 2,
          "fine-tuning takes a timm ViT")
    fails(["finetune", "--root", str(corpus), "--model", "dinov2_small", "--label", "kind"], 2,
          "no plate has a label in the manifests' 'kind'")
    assert not (corpus / "plates.parquet").exists() and not (corpus / "experiments").exists()


def test_missing_weights_online_without_a_network_are_said_once_within_seconds_and_nothing_is_written(
        tmp_path, monkeypatch, corpus):
    """HF_HUB_OFFLINE unset, and the hub unreachable (a closed port on this machine)."""
    import time

    from huggingface_hub import constants

    from fixtures.processes import free_port

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PLATEFLOW_WEIGHTS", raising=False)
    monkeypatch.delenv("PLATEFLOW_PROFILES", raising=False)
    started = time.monotonic()
    result = runner.invoke(app, ["refresh", "--root", str(corpus), "--models", "dinov2_small"], terminal_width=300)
    assert time.monotonic() - started < 30
    assert result.exit_code == 2, result.output
    assert result.output.count("no weights for model dinov2_small") == 1
    assert "the hub did not provide them" in result.output and "Traceback" not in result.output
    assert not (corpus / "plates.parquet").exists() and not (corpus / ".plateflow" / "embeddings").exists()
    assert not (corpus / "features").exists()
    assert not (corpus / "plates_structured" / "plate-001" / "input_image.json").exists()


def test_ingest_without_a_server_says_that_nothing_will_refresh_the_new_plates(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    paper_plate().save(tmp_path / "a.png")
    result = runner.invoke(app, ["ingest", str(tmp_path / "a.png"), "--root", str(tmp_path / "corpus")],
                           terminal_width=300)
    assert result.exit_code == 0, result.output
    assert "PREFECT_API_URL is unset, so no deployment was told: run `plateflow refresh --root" in result.output


def test_a_broken_capability_table_is_one_line_naming_its_file_entry_and_field(tmp_path):
    """The console command itself: a wrong value in profiles/gpu_classes.toml ends any command
    with what is wrong and where (exit 2), never a traceback."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from plateflow.profiles import DEFAULT_PROFILES

    for table in DEFAULT_PROFILES.glob("*.toml"):
        shutil.copy(table, tmp_path)
    gpus = tmp_path / "gpu_classes.toml"
    gpus.write_text(gpus.read_text().replace('readers = "threads"', 'readers = "threads"\ncompile = "fast"', 1))
    exe = Path(sys.executable).with_name("plateflow")
    done = subprocess.run([str(exe), "hardware"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PLATEFLOW_PROFILES": str(tmp_path), "COLUMNS": "200"})
    assert done.returncode == 2 and "Traceback" not in done.stdout + done.stderr
    assert f"{gpus} [classes.CPU]: compile: Input should be" in done.stdout, done.stdout
