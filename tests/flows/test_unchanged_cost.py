"""A refresh costs what changed: unchanged sources are not read, current plates create no task
run, and the plates with work go in batches, each plate isolated inside."""

import json
import os
import time

import pyarrow.parquet as pq
import pytest

from flows.refresh import PlateRecord, refresh_corpus
from plateflow.outcomes import batches
from plateflow.config import RefreshConfig
from plateflow.corpus import read_manifest
from plateflow.hashindex import SourceIndex, sha256_file

from fixtures.plates import make_plate, paper_plate


def age(path, seconds=3600):
    os.utime(path, (time.time() - seconds, time.time() - seconds))


def test_an_unchanged_source_is_taken_from_the_index_without_reading_it(tmp_path):
    src = tmp_path / "plates_structured" / "plate-001" / "source" / "scan.png"
    src.parent.mkdir(parents=True)
    paper_plate().save(src)
    age(src)
    index = SourceIndex(tmp_path)
    real = index.sha256(src)
    assert real == sha256_file(src)
    # What the index holds for this exact stat is what it answers: it did not read the file.
    index.record(src, "f" * 64, hashed_ns=time.time_ns())
    assert index.sha256(src) == "f" * 64
    index.save()
    assert SourceIndex(tmp_path).sha256(src) == "f" * 64  # kept across processes
    assert SourceIndex(tmp_path).rehash(src) == real  # --verify reads it
    os.utime(src)  # any change to the stat (here mtime and ctime): read again
    assert SourceIndex(tmp_path).sha256(src) == real


def test_a_source_hashed_in_the_same_moment_it_was_written_is_read_again(tmp_path):
    src = tmp_path / "scan.png"
    paper_plate().save(src)  # modified just now: a write in the same clock tick would not show
    index = SourceIndex(tmp_path)
    index.record(src, "f" * 64, hashed_ns=src.stat().st_mtime_ns + 1000)
    assert index.sha256(src) == sha256_file(src)


def test_a_source_is_read_again_without_hashing_only_while_its_stat_is_the_one_its_hash_holds_at(tmp_path):
    from plateflow.hashindex import open_source

    src = tmp_path / "scan.png"
    paper_plate().save(src)
    age(src)
    real = sha256_file(src)
    index = SourceIndex(tmp_path)
    index.record(src, "f" * 64)  # hashed an hour after the last write: trusted
    stamp = index.stamp(src)
    # The open file comes with the hash given for that stat: it is not hashed again.
    with open_source(src, "f" * 64, stamp) as (data, sha):
        assert sha == "f" * 64 and data.read() == src.read_bytes()
    with open_source(src, "f" * 64, None) as (data, sha):  # no stat given: read whole, hashed
        assert (data, sha) == (src.read_bytes(), real)
    with pytest.raises(OSError, match="changed while it was being read"):
        with open_source(src, "f" * 64, stamp):
            os.utime(src)  # touched while it is read: retried
    paper_plate(seed=1).save(src)  # changed since: its stat is another, so it is hashed
    with open_source(src, "f" * 64, stamp) as (data, sha):
        assert sha == sha256_file(src) != real
    fresh = SourceIndex(tmp_path)
    fresh.record(src, "f" * 64)  # hashed in the moment it was written: no stat is trusted
    assert fresh.stamp(src) is None


@pytest.mark.usefixtures("prefect_harness")
def test_a_refresh_hashes_each_source_once(tmp_path):
    """The characterization reads a source at the stat its hash was found at without hashing it
    again: here the index's (made-up) hash of the unchanged file is what the plate records."""
    d = make_plate(tmp_path, "plate-001", paper_plate(), "scan.png")
    src = d / "source" / "scan.png"
    age(src)
    index = SourceIndex(tmp_path)
    index.record(src, "f" * 64)
    index.save()
    refresh_corpus(str(tmp_path), RefreshConfig(workers=1))
    assert json.loads((d / "input_image.json").read_text())["sha256"] == "f" * 64
    refresh_corpus(str(tmp_path), RefreshConfig(workers=1, verify=True))  # every source hashed: the real hash
    assert json.loads((d / "input_image.json").read_text())["sha256"] == sha256_file(src)


def test_an_unreadable_index_is_a_cold_one(tmp_path):
    src = tmp_path / "scan.png"
    paper_plate().save(src)
    (tmp_path / ".plateflow").mkdir()
    (tmp_path / ".plateflow" / "source-index.parquet").write_bytes(b"garbage")
    assert SourceIndex(tmp_path).sha256(src) == sha256_file(src)


def test_hashing_many_sources_holds_a_window_of_reads_not_one_per_file(tmp_path):
    """A first refresh reads every source: the reads in flight are a window, so what hashing
    10^5 files holds beyond its answers does not grow with their number."""
    import tracemalloc

    files = []
    for i in range(6000):
        f = tmp_path / f"s{i}.bin"
        f.write_bytes(i.to_bytes(4, "little"))
        files.append(f)
    index = SourceIndex(tmp_path)
    tracemalloc.start()
    try:
        out = index.hash_all(files, workers=2)
        answers, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out == [sha256_file(f) for f in files]
    # A future per file (as Executor.map makes them) is ~2 KB: 12 MB here above the answers.
    assert peak - answers < 4 * 2**20, (peak - answers) / 2**20


def test_a_plates_record_keeps_what_it_needs_of_the_manifest_and_lets_it_go(tmp_path):
    """A refresh holds a record per plate (10^5): the manifest is read once for the row."""
    import json

    d = make_plate(tmp_path, "plate-001", paper_plate())
    manifest = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**manifest, "original_path": "scans/a b.tif", "notes": "x" * 500}))
    plate = read_manifest(d)
    rec = PlateRecord(plate)
    assert plate.manifest["notes"] == "x" * 500  # the plate as discovered is unchanged
    assert rec.plate.manifest == {} and rec.plate == plate  # same plate (the manifest is not its identity)
    assert rec.row["original_path"] == "scans/a b.tif" and rec.row["plate_id"] == plate.plate_id


def test_batches_are_bounded_by_plate_count_and_source_bytes(tmp_path):
    recs = []
    for i, size in enumerate([10, 10, 10, 50, 10, 10, 10, 10]):
        d = make_plate(tmp_path, f"plate-{i}", b"x" * size, filename="s.bin")
        recs.append(PlateRecord(read_manifest(d)))
    cost = PlateRecord.source_bytes
    sizes = [[r.source_bytes() for r in b] for b in batches(recs, cost, max_plates=3, max_cost=40)]
    assert sizes == [[10, 10, 10], [50], [10, 10, 10], [10]]
    assert sum(len(b) for b in batches(recs, cost, 100, 10**9)) == 8 and len(batches(recs, cost, 100, 10**9)) == 1
    # Two workers: about four batches each, so eight plates go one to a batch, not three and three.
    assert [len(b) for b in batches(recs, cost, 3, 10**9, places=2)] == [1] * 8
    assert [len(b) for b in batches(recs * 4, cost, 3, 10**9, places=2)] == [3] * 10 + [2]


def task_runs(flow_run_id):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


@pytest.mark.usefixtures("prefect_harness")
def test_current_plates_create_no_task_run_and_changed_ones_go_in_batches(tmp_path):
    for i in range(7):
        make_plate(tmp_path, f"plate-{i + 1:03d}", paper_plate(seed=i))
    make_plate(tmp_path, "plate-008", b"", filename="empty.jpg")
    for src in tmp_path.glob("plates_structured/*/source/*"):
        age(src)
    first = refresh_corpus(str(tmp_path), RefreshConfig(batch_plates=3, workers=1), return_state=True)
    assert len(task_runs(first.state_details.flow_run_id)) == 3  # 8 plates in batches of 3

    unchanged = refresh_corpus(str(tmp_path), RefreshConfig(batch_plates=3, workers=1), return_state=True)
    assert task_runs(unchanged.state_details.flow_run_id) == []  # the bad plate too: its failure is its result
    assert "characterization: 0 computed, 7 cached, 1 failed" in unchanged.message
    table = {r["plate_dir"]: r for r in pq.read_table(tmp_path / "plates.parquet").to_pylist()}
    assert table["plate-008"]["status"] == "failed" and "empty file" in table["plate-008"]["error"]
    assert table["plate-003"]["width"] == 320  # its row from its input_image.json

    paper_plate(seed=99).save(tmp_path / "plates_structured" / "plate-005" / "source" / "scan.jpg")
    (tmp_path / "plates_structured" / "plate-002" / "input_color_histograms.json").unlink()
    changed = refresh_corpus(str(tmp_path), RefreshConfig(batch_plates=3, workers=1), return_state=True)
    [batch] = task_runs(changed.state_details.flow_run_id)
    assert batch.name.startswith("characterize-")
    # plate-005 decoded again; plate-002's histograms from its stored result; the others unread
    assert "characterization: 1 computed, 6 cached, 1 failed" in changed.message
    assert (tmp_path / "plates_structured" / "plate-002" / "input_color_histograms.json").is_file()
    after = {r["plate_dir"]: r for r in pq.read_table(tmp_path / "plates.parquet").to_pylist()}
    assert {d for d in after if after[d] != table[d]} == {"plate-005"}  # only its row changed


def test_the_table_artifact_holds_the_failures_and_a_bounded_sample():
    from plateflow.artifacts import table_rows

    rows = [{"plate_dir": f"plate-{i}", "status": "failed" if i % 1000 == 7 else "ok"} for i in range(20_000)]
    shown = table_rows(rows, sample=100)
    assert [r["plate_dir"] for r in shown[:20]] == [f"plate-{i}" for i in range(7, 20_000, 1000)]
    others = shown[20:]
    assert len(others) == 100 and all(r["status"] == "ok" for r in others)
    assert others[0]["plate_dir"] == "plate-0" and int(others[-1]["plate_dir"].split("-")[1]) > 19_000
    assert len(table_rows(rows[:50])) == 50  # a small corpus: every plate
