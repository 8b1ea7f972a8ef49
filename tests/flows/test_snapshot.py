"""The corpus snapshot through the refresh flow: an unchanged plate is settled by the stat of its
folder, manifest, source and outputs, with no file read and nothing written; every kind of change
sends its plate, and only it, through the reading path."""

import json
import logging
import os
import shutil
import time

import pyarrow.parquet as pq
import pytest

from flows.refresh import refresh_corpus
from plateflow.config import CharacterizeParams, RefreshConfig
from plateflow.snapshot import RACY_NS

from fixtures import subflow_runs
from fixtures.plates import make_plate, paper_plate

pytestmark = pytest.mark.usefixtures("prefect_harness")


def run(root, caplog, **kw):
    caplog.clear()
    state = refresh_corpus(str(root), RefreshConfig(**kw), return_state=True)
    table = {r["plate_dir"]: r for r in pq.read_table(root / "plates.parquet").to_pylist()}
    return state, table


def files(root):
    """(inode, mtime_ns) of every file under ROOT but the lock (it names the run holding it)."""
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and p.name != "refresh.lock"}


def settled(caplog) -> int:
    [line] = [r.getMessage() for r in caplog.records if "unchanged since the last refresh" in r.getMessage()]
    return int(line.split(": ")[1].split(" unchanged")[0])


def trusted_corpus(root, caplog, **kw):
    """A corpus refreshed, then refreshed again once its files are older than the racy window,
    so that every entry of its snapshot is trusted."""
    for i in range(1, 5):
        make_plate(root, f"plate-{i:03d}", paper_plate(seed=i))
    make_plate(root, "plate-005", b"\xff\xd8\xff\xe0garbage", filename="bad.jpg")
    run(root, caplog, **kw)
    time.sleep(RACY_NS / 1e9 + 0.2)
    run(root, caplog, **kw)  # reads every plate (its entries were racy) and trusts them now
    return run(root, caplog, **kw)


def test_an_unchanged_corpus_is_settled_by_stat_and_nothing_is_written(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    root = tmp_path / "corpus"
    trusted_corpus(root, caplog)
    before = files(root)
    state, table = run(root, caplog)
    assert settled(caplog) == 5 and "0 to process" in caplog.text
    assert state.is_completed(), state.message  # plate-005's failure is known: its bytes did not change
    assert "4 of 5 plates ok, 1 failed (0 new, 1 known)" in state.message
    assert "characterization: 0 computed, 4 cached, 1 failed" in state.message
    assert "plates.parquet (unchanged)" in state.message and "plate-005: " in state.message
    assert files(root) == before  # the table, the report, the snapshot, every plate's files
    assert table["plate-005"]["status"] == "failed" and table["plate-002"]["width"] == 320


def test_each_change_is_seen_and_only_its_plate_is_read(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    root = tmp_path / "corpus"
    _, first = trusted_corpus(root, caplog)
    plates = root / "plates_structured"
    paper_plate(seed=99, photo_colour=(200, 10, 10)).save(plates / "plate-001" / "source" / "scan.jpg")  # new bytes
    manifest = json.loads((plates / "plate-002" / "manifest.json").read_text())
    (plates / "plate-002" / "manifest.json").write_text(json.dumps({**manifest, "original_path": "box 7/scan.jpg"}))
    (plates / "plate-003" / "viz" / "histogram_rgb.png").unlink()  # an output removed
    make_plate(root, "plate-006", paper_plate(seed=6))  # a new plate
    shutil.rmtree(plates / "plate-004")  # a plate gone
    state_dir = root / ".plateflow"
    bases = {name: files(state_dir)[state_dir / name] for name in ("snapshot.parquet", "source-index.parquet")}
    state, table = run(root, caplog)
    assert settled(caplog) == 1  # plate-005 alone is unchanged
    assert "characterization: 2 computed, 2 cached, 1 failed" in state.message  # plate-001 and the new plate
    assert set(table) == {"plate-001", "plate-002", "plate-003", "plate-005", "plate-006"}
    assert table["plate-001"]["sha256"] != first["plate-001"]["sha256"]
    assert table["plate-002"]["original_path"] == "box 7/scan.jpg"
    assert (plates / "plate-003" / "viz" / "histogram_rgb.png").is_file()
    assert table["plate-003"] == first["plate-003"] and table["plate-005"] == first["plate-005"]
    # The snapshot and the source index wrote what changed beside their bases, not the bases again.
    assert {name: files(state_dir)[state_dir / name] for name in bases} == bases
    snap = pq.read_table(state_dir / "snapshot.delta.parquet").to_pydict()
    assert dict(zip(snap["folder"], snap["deleted"])).items() >= {  # with the earlier runs' changes
        "plate-001": False, "plate-002": False, "plate-003": False, "plate-004": True, "plate-006": False}.items()
    index = pq.read_table(state_dir / "source-index.delta.parquet").to_pydict()
    assert set(index["path"]) >= {f"plates_structured/plate-00{i}/source/scan.jpg" for i in (1, 4, 6)}
    from plateflow.snapshot import Snapshot
    entries = Snapshot(root, *_snapshot_settings()).entries
    assert sorted(entries) == ["plate-001", "plate-002", "plate-003", "plate-005", "plate-006"]


def _snapshot_settings():
    from plateflow.characterize.step import step_key
    from plateflow.snapshot import outputs, snapshot_key

    params = RefreshConfig().characterize
    return snapshot_key(step_key(params).version, params.viz, params.working_copy), outputs(params.viz, params.working_copy)


def test_a_new_plate_with_a_settled_plates_id_makes_both_duplicates(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    root = tmp_path / "corpus"
    trusted_corpus(root, caplog)
    make_plate(root, "plate-009", paper_plate(seed=9), manifest={"plate_id": "plate-002", "source_image": "source/scan.jpg"})
    state, table = run(root, caplog)
    assert table["plate-002"]["status"] == table["plate-009"]["status"] == "failed"
    assert "plate_id 'plate-002' is also used by plate-009" in table["plate-002"]["error"]


def test_verify_settings_and_a_replaced_table_read_every_plate(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    root = tmp_path / "corpus"
    _, first = trusted_corpus(root, caplog)
    run(root, caplog, verify=True)
    assert "every plate read" in caplog.text
    state, _ = run(root, caplog, characterize=CharacterizeParams(bins=64))  # other settings: another key
    assert settled(caplog) == 0 and "4 computed" in state.message
    (root / "plates.parquet").unlink()  # the snapshot goes with the table it was written with
    state, table = run(root, caplog, characterize=CharacterizeParams(bins=64))
    assert settled(caplog) == 0 and set(table) == set(first)


def test_a_damaged_snapshot_is_rebuilt_and_every_plate_read(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    root = tmp_path / "corpus"
    trusted_corpus(root, caplog)
    (root / ".plateflow" / "snapshot.parquet").write_bytes(b"PAR1 not a table")
    state, _ = run(root, caplog)
    assert state.is_completed() and settled(caplog) == 0 and "0 computed, 4 cached" in state.message
    assert "snapshot.parquet cannot be read" in caplog.text and "written again" in caplog.text
    state, _ = run(root, caplog)
    assert settled(caplog) == 5  # written again: the next refresh settles every plate


MODELS = {"models": ["tiny_dinov2"], "gpu_class": "CPU"}


def embeddings(root) -> list[dict]:
    rows = pq.read_table(root / "embeddings" / "tiny_dinov2.parquet").to_pylist()
    return sorted(rows, key=lambda r: (r["plate_id"], r["candidate_index"]))


def test_a_refresh_with_models_settles_unchanged_plates_and_keeps_their_rows_in_every_table(tmp_path, caplog,
                                                                                          tiny_env):
    import numpy as np

    from plateflow.features import open_store

    caplog.set_level(logging.INFO)
    root = tmp_path / "corpus"
    _, first = trusted_corpus(root, caplog, **MODELS)
    before = files(root)
    state, table = run(root, caplog, **MODELS)
    assert settled(caplog) == 5 and "embeddings: 0 computed, 4 cached" in state.message
    assert files(root) == before  # plates.parquet, the embeddings table, the feature store, every plate's files
    assert table == first and subflow_runs(state) == []  # no GPU flow started

    plates = root / "plates_structured"
    paper_plate(seed=99, photo_colour=(200, 10, 10)).save(plates / "plate-001" / "source" / "scan.jpg")  # new bytes
    (plates / "plate-003" / "runs" / first["plate-003"]["run_id"] / "best_crop.jpg").unlink()  # a crop removed
    shutil.rmtree(plates / "plate-004")  # a plate gone
    state, table = run(root, caplog, **MODELS)
    assert settled(caplog) == 2  # plate-002 and plate-005
    assert "characterization: 1 computed, 2 cached, 1 failed; embeddings: 1 computed, 2 cached" in state.message
    assert (plates / "plate-003" / "runs" / table["plate-003"]["run_id"] / "best_crop.jpg").is_file()
    assert table["plate-002"] == first["plate-002"] and set(table) == {"plate-001", "plate-002", "plate-003",
                                                                        "plate-005"}
    merged = embeddings(root)
    assert {r["plate_id"] for r in merged} == {"plate-001", "plate-002", "plate-003"} and len(merged) == 3 * 16
    store = open_store(root / "features" / "tiny_dinov2")
    assert store.column("plate_dir") == ["plate-001", "plate-002", "plate-003"]
    # What was kept and merged is what a refresh that reads every plate writes.
    run(root, caplog, verify=True, **MODELS)
    assert embeddings(root) == merged
    again = open_store(root / "features" / "tiny_dinov2")
    assert again.meta["version"] == store.meta["version"]
    np.testing.assert_array_equal(np.asarray(again.vectors), np.asarray(store.vectors))

    # An embeddings table damaged under an unchanged stat: no settled plate's rows can be kept from
    # it, so every plate is read and the table written anew.
    run(root, caplog, **MODELS)
    path = root / "embeddings" / "tiny_dinov2.parquet"
    st = path.stat()
    path.write_bytes(b"\0" * st.st_size)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    state, _ = run(root, caplog, **MODELS)
    assert state.is_completed(), state.message
    assert settled(caplog) == 0 and "tiny_dinov2.parquet cannot be read" in caplog.text
    assert embeddings(root) == merged


def test_a_refresh_without_models_keeps_what_one_with_models_found_and_rewrites_no_plate(tmp_path, caplog, tiny_env):
    caplog.set_level(logging.INFO)
    root = tmp_path / "corpus"
    _, first = trusted_corpus(root, caplog, **MODELS)
    plate_files = {p: v for p, v in files(root).items() if "plates_structured" in p.parts}
    state, table = run(root, caplog)  # the nightly refresh, after a custom run with models
    assert "characterization: 0 computed, 4 cached, 1 failed" in state.message
    assert {p: v for p, v in files(root).items() if "plates_structured" in p.parts} == plate_files
    assert table == first  # the smart crops and how the vectors were got stand
    assert table["plate-002"]["run_id"] is not None and table["plate-002"]["crop_box"]
    # Each kind of refresh keeps its own snapshot: going back and forth reads no plate.
    time.sleep(RACY_NS / 1e9 + 0.2)
    run(root, caplog)
    for kw in (MODELS, {}):
        state, table = run(root, caplog, **kw)
        assert settled(caplog) == 5 and table == first
    paper_plate(seed=98).save(root / "plates_structured" / "plate-002" / "source" / "scan.jpg")
    _, table = run(root, caplog)
    assert table["plate-002"]["run_id"] is None and table["plate-002"]["crop_box"] is None  # of other bytes
    assert table["plate-001"] == first["plate-001"]
