"""Cached float16 features (plateflow/features.py), resumable embed chunks (the chunk ledger), and
light heads trained on the features (plateflow/heads.py, flows/heads.py): real refreshes with a tiny
random-weight model, real training, a real SQLite ledger."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from app.cli import app
from flows.refresh import refresh_corpus
from plateflow.config import RefreshConfig
from plateflow.features import open_store

from fixtures import DEVICE, REPO
from fixtures.plates import make_plate, paper_plate
from fixtures.processes import wait_until

runner = CliRunner()
MODEL = "tiny_vit"  # a tiny random ViT whose features see the pixels (tests/fixtures/tiny_models.py)


def labelled_corpus(root: Path, n: int, size=(160, 120)) -> dict[str, str]:
    """Plates whose label is something the features can see: a reddish block or a bluish one,
    each of its own shade, on paper of its own grain."""
    kinds = {}
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = f"plate-{i + 1:03d}"
        kind = "red" if i % 2 else "blue"
        warm, cool, other = (int(x) for x in rng.integers((150, 10, 10), (235, 90, 90)))
        colour = (warm, other, cool) if kind == "red" else (cool, other, warm)
        make_plate(root, folder, paper_plate(*size, seed=i, photo_colour=colour),
                   manifest={"plate_id": folder, "source_image": "source/scan.jpg", "kind": kind})
        kinds[folder] = kind
    return kinds


def refresh(root: Path):
    state = refresh_corpus(str(root), RefreshConfig(models=[MODEL], gpu_class="CPU"), return_state=True)
    assert state.is_completed(), state.message
    return state


@pytest.mark.usefixtures("prefect_harness")
def test_features_heads_experiments_and_predictions(tmp_path, tiny_env, caplog):
    root = tmp_path / "corpus"
    kinds = labelled_corpus(root, 60)
    refresh(root)

    # the store: float16, one row per plate, built from the refresh's vectors
    store = open_store(root / "features" / MODEL)
    assert store.vectors.dtype == np.float16 and isinstance(store.vectors, np.memmap)
    assert store.vectors.shape[0] == 60 and store.vectors.shape[2] == 32
    table = pq.read_table(root / "embeddings" / f"{MODEL}.parquet").to_pylist()
    first = [r["vector"] for r in table if r["plate_id"] == "plate-001"]
    np.testing.assert_allclose(store.vectors[0, :len(first)].astype(np.float32), np.array(first), atol=2e-3)
    size = sum(p.stat().st_size for p in (root / "features" / MODEL).iterdir())
    assert size / 60 < 0.5 * 2**20
    version = store.meta["version"]
    refresh(root)  # unchanged: the store is not rewritten
    assert open_store(root / "features" / MODEL).meta["version"] == version
    # `plateflow features` builds the same store from the embeddings table alone
    (root / "features" / MODEL / "meta.json").unlink()
    assert runner.invoke(app, ["features", "--root", str(root), "--model", MODEL]).exit_code == 0
    rebuilt = open_store(root / "features" / MODEL)
    np.testing.assert_array_equal(rebuilt.vectors, store.vectors)

    # heads: an ablation of two heads, each its own experiment
    result = runner.invoke(app, ["train-head", "--root", str(root), "--model", MODEL, "--label", "kind",
                                 "--head", "linear,mlp", "--lr", "1e-2", "--epochs", "60", "--test-fraction", "0.35"],
                           terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "train: " in result.output and "test: " in result.output  # the class balance
    with sqlite3.connect(root / "experiments" / "experiments.db") as db:
        db.row_factory = sqlite3.Row
        rows = [dict(r) for r in db.execute("SELECT * FROM experiments ORDER BY head")]
    assert [r["head"] for r in rows] == ["linear", "mlp"]
    for r in rows:
        assert r["model"] == MODEL and r["label"] == "kind" and r["code_version"] and r["duration_s"] > 0
        assert r["device"] == DEVICE
        assert json.loads(r["hyperparameters"])["lr"] == 1e-2
        assert r["train_size"] + r["validation_size"] + r["test_size"] == 60 and r["test_size"] >= 10
        assert r["accuracy"] >= 0.9, r  # chance is 0.5
        per_class = json.loads(r["per_class"])
        assert set(per_class) == {"blue", "red"} and all({"precision", "recall"} <= set(m) for m in per_class.values())
        assert (root / r["checkpoint"]).is_file() and r["checkpoint"].endswith("checkpoints/best_head.pt")
        with Image.open(root / r["confusion_png"]) as png:
            assert png.format == "PNG" and png.width > 100
    # the flow published the metrics as artifacts (the UI's Artifacts tab)
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from plateflow.artifacts import artifact_key

    with get_client(sync_client=True) as client:
        published = {a.key: str(a.data) for a in client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[artifact_key(root, "head-experiments"), artifact_key(root, "experiment-metrics")])))
            if all(r["id"] in str(a.data) for r in rows)}
    assert set(published) == {artifact_key(root, "head-experiments"), artifact_key(root, "experiment-metrics")}
    assert "macro_f1" in published[artifact_key(root, "head-experiments")]
    assert "| blue |" in published[artifact_key(root, "experiment-metrics")]
    listed = runner.invoke(app, ["experiments", "--root", str(root)], terminal_width=200)
    assert all(r["id"] in listed.output for r in rows)

    # predictions into plates.parquet; kept, and extended to a new plate, by the next refresh
    linear = rows[0]["id"]
    assert runner.invoke(app, ["predict", "--root", str(root), "--experiment", linear]).exit_code == 0
    plates = {r["plate_dir"]: r for r in pq.read_table(root / "plates.parquet").to_pylist()}
    odd = {f: (plates[f].get("pred_kind"), plates[f].get("pred_kind_p")) for f in kinds
           if plates[f].get("pred_kind") not in ("red", "blue") or not 0.5 <= plates[f]["pred_kind_p"] <= 1.0 + 1e-6}
    assert not odd, odd
    assert sum(plates[f]["pred_kind"] == k for f, k in kinds.items()) >= 0.9 * 60
    new = paper_plate(160, 120, seed=99, photo_colour=(200, 40, 30))
    make_plate(root, "plate-061", new, manifest={"plate_id": "plate-061", "source_image": "source/scan.jpg"})
    import shutil

    shutil.rmtree(root / "plates_structured" / "plate-002")  # a removed plate leaves the store
    refresh(root)
    store = open_store(root / "features" / MODEL)
    assert store.rows == 60 and "plate-061" in store.column("plate_dir") and "plate-002" not in store.column("plate_dir")
    plates = {r["plate_dir"]: r for r in pq.read_table(root / "plates.parquet").to_pylist()}
    assert plates["plate-061"]["pred_kind"] in ("red", "blue")  # predicted from its cached features
    assert plates["plate-003"]["pred_kind"] is not None  # the others' columns are kept
    bad = runner.invoke(app, ["predict", "--root", str(root), "--experiment", "no-such"])
    assert bad.exit_code != 0 and "plateflow experiments" in bad.output

    # Damaged state: each store, ledger, registry or checkpoint named in one line with its fix.
    def one_line(args: list[str], *said: str) -> str:
        result = runner.invoke(app, args, terminal_width=400)
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert all(text in result.output for text in said), result.output
        return result.output

    features = root / "features" / MODEL
    vectors = next(features.glob("vectors-*.npy"))
    vectors.write_bytes(vectors.read_bytes()[:200])  # truncated
    one_line(["train-head", "--root", str(root), "--model", MODEL, "--label", "kind"],
             f"the feature store {features} is damaged", f"plateflow features --root {root} --model {MODEL}")
    refresh(root)  # a damaged store never blocks a refresh: it is written anew
    assert open_store(features).rows == 60
    (features / "meta.json").write_text("{garbage")
    one_line(["predict", "--root", str(root), "--experiment", linear], "meta.json cannot be read")
    assert runner.invoke(app, ["features", "--root", str(root), "--model", MODEL]).exit_code == 0  # the rebuild
    assert open_store(features).rows == 60

    checkpoint = root / rows[0]["checkpoint"]
    good = checkpoint.read_bytes()
    checkpoint.write_bytes(b"garbage" * 100)
    out = one_line(["predict", "--root", str(root), "--experiment", linear], f"the checkpoint {checkpoint}",
                   "is damaged", "plateflow train-head")
    assert "weights_only" not in out
    checkpoint.unlink()
    one_line(["predict", "--root", str(root), "--experiment", linear], "is missing")
    checkpoint.write_bytes(good)

    registry = root / "experiments" / "predictors.json"
    registry.write_text("[1, 2")
    caplog.clear()
    refresh(root)  # the plates are done; the registry's damage is one warning with its fix
    assert "the head registry" in caplog.text and "is damaged" in caplog.text and "Traceback" not in caplog.text
    registry.unlink()

    db = root / "experiments" / "experiments.db"
    db.write_bytes(b"this is not a database" * 100)
    before = sorted(p.name for p in (root / "experiments").iterdir())
    one_line(["experiments", "--root", str(root)], f"the experiment ledger {db} is damaged", "mv ")
    one_line(["train-head", "--root", str(root), "--model", MODEL, "--label", "kind"], "is damaged")
    assert sorted(p.name for p in (root / "experiments").iterdir()) == before  # nothing trained, nothing orphaned


@pytest.mark.usefixtures("prefect_harness")
def test_a_killed_embed_job_resumes_at_the_next_unfinished_chunk(tmp_path, tiny_env):
    from prefect.settings import PREFECT_API_URL

    from plateflow.atomic import write_json
    from plateflow.embed.reader import PlateJob

    jobs = []
    store = tmp_path / "store"
    for i in range(40):
        work = tmp_path / f"work-{i}.jpg"
        paper_plate(seed=i).save(work)
        jobs.append(PlateJob(f"plate-{i}", str(work), (320, 240), ((0, 0, 320, 240), (80, 60, 240, 180)),
                             str(store / f"v{i}.npy")))
    write_json(tmp_path / "jobs.json", [asdict(j) for j in jobs])
    script = ("import sys; from flows.embed import embed_plates; "
              "embed_plates('tiny_dinov2', 'CPU', jobs_file=sys.argv[1], chunk_size=2)")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    ledger = store / ".chunks"
    with open(tmp_path / "log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "jobs.json")], env=env, stdout=log,
                                stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    try:
        wait_until(lambda: (ledger.is_dir() and any(ledger.glob("*.json"))) or proc.poll() is not None, 180,
                   "the first finished chunk", every=0.02)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "log").read_text()
    recorded = {p.name: json.loads(p.read_text()) for p in ledger.glob("*.json")}
    assert 1 <= len(recorded) < 20
    for record in recorded.values():  # each record: its plates, their outcomes, when
        assert len(record["plates"]) == 2 and record["outcome"] == {p: None for p in record["plates"]}
        assert record["finished"]
    done = {p for r in recorded.values() for p in r["plates"]}
    before = {j.name: os.stat(j.cache_file).st_mtime_ns for j in jobs if j.name in done}

    from flows.embed import embed_plates

    outcome = embed_plates("tiny_dinov2", "CPU", jobs_file=str(tmp_path / "jobs.json"), chunk_size=2)
    assert outcome == {j.name: None for j in jobs}
    assert len(list(ledger.glob("*.json"))) == 20
    assert {p: os.stat(jobs[int(p.split("-")[1])].cache_file).st_mtime_ns for p in before} == before  # not redone


@pytest.mark.usefixtures("prefect_harness")
def test_tiles_are_embedded_once_into_their_own_store_and_a_head_trains_per_tile(tmp_path, tiny_env):
    from flows.tiles import make_tiles
    from plateflow.tiles import TileParams

    root = tmp_path / "corpus"
    kinds = labelled_corpus(root, 40, size=(320, 240))
    labels = tmp_path / "labels.csv"  # labels from a file this time; two plates left without one
    labels.write_text("plate_id,label\n" + "".join(f"{p},{k}\n" for p, k in list(kinds.items())[2:]))
    dest = tmp_path / "tiles"  # train plates: 4 tiles, the quarters; test plates: the whole plate, reduced
    assert make_tiles(str(root), TileParams(width=160, height=120, test_fraction=0.3), str(dest),
                      return_state=True).is_completed()
    tiles = pq.read_table(dest / "tiles.parquet").to_pylist()
    result = runner.invoke(app, ["features", "--root", str(root), "--model", MODEL, "--tiles", str(dest)])
    assert result.exit_code == 0, result.output
    store = open_store(root / "features" / f"{MODEL}-tiles")
    assert store.meta["kind"] == "tiles" and store.rows == len(tiles) and store.vectors.shape[1:] == (1, 32)
    assert sorted(store.column("key")) == sorted(t["key"] for t in tiles)
    assert not (root / ".plateflow" / "tile-views").exists()  # the taken-out tiles are gone
    cached = sorted((root / ".plateflow" / "embeddings" / MODEL / "tiles").glob("*.npy"))
    assert len(cached) == len(tiles)
    before = [p.stat().st_mtime_ns for p in cached]
    assert runner.invoke(app, ["features", "--root", str(root), "--model", MODEL, "--tiles", str(dest)]).exit_code == 0
    assert [p.stat().st_mtime_ns for p in cached] == before  # each tile embedded once

    result = runner.invoke(app, ["train-head", "--root", str(root), "--model", MODEL, "--label", "kind", "--features",
                                 "tiles", "--labels", str(labels), "--lr", "1e-2", "--epochs", "60",
                                 "--test-fraction", "0.3"], terminal_width=200)
    assert result.exit_code == 0, result.output
    with sqlite3.connect(root / "experiments" / "experiments.db") as db:
        features, test_size, accuracy = db.execute("SELECT feature_kind, test_size, accuracy FROM experiments").fetchone()
    test_tiles = sum(t["split"] == "test" and t["plate_id"] not in ("plate-001", "plate-002") for t in tiles)
    assert features == "tiles" and test_size == test_tiles and accuracy >= 0.9  # the tiles' split, per tile


def test_unusable_labels_files_are_one_line_naming_the_file_and_line(tmp_path):
    from plateflow.features import write_store

    root = tmp_path / "corpus"
    (root / "plates_structured").mkdir(parents=True)
    ids = [f"plate-{i:03d}" for i in range(1, 5)]
    write_store(root / "features" / MODEL, [{"plate_dir": p, "plate_id": p, "sha256": f"{i:064x}"} for i, p in enumerate(ids)],
                [np.ones((2, 8), np.float32) * i for i in range(4)],
                {"model": MODEL, "dim": 8, "kind": "plates", "embedding_key": "k"})
    cases = {
        "latin1.csv": ("plate_id,label\nplate-001,caf\xe9\n".encode("latin-1"), "line 2: not UTF-8 text"),
        "long.csv": (f"plate-001,{'x' * 200_000}\nplate-002,b\n".encode(), "line 1: a label of 200,000 characters"),
        "unknown.csv": (b"nobody,a\nnothing,b\n", "no plate with features has a label from"),
        "empty.csv": (b"", "holds no labels"),
        "one-class.csv": (b"plate-001,a\nplate-002,a\n", "every labelled plate from"),
        "short.csv": (b"plate-001,a\nplate-002\n", "line 2: every line needs plate_id,label"),
    }
    for name, (data, said) in cases.items():
        (tmp_path / name).write_bytes(data)
        result = runner.invoke(app, ["train-head", "--root", str(root), "--model", MODEL, "--label", "kind",
                                     "--labels", str(tmp_path / name)], terminal_width=400)
        assert result.exit_code == 2 and "Traceback" not in result.output, (name, result.output)
        assert said in result.output and str(tmp_path / name) in result.output, (name, result.output)
    assert not (root / "experiments").exists()  # nothing trained
