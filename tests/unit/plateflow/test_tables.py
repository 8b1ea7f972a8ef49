"""Damaged caches and tables: named with the fix, recomputed or kept aside, never trusted."""

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from app.cli import app

from fixtures.plates import make_plate, paper_plate

runner = CliRunner()


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


@pytest.mark.parametrize("damage, words", [
    (lambda good: good[:-7], "truncated"),
    (lambda good: b"\x00garbage" * 40, "not a .npy file"),
    (lambda good: _npy(np.ones((3, 8), np.float32)), r"expected float32 \(4, 8\)"),
    (lambda good: _npy(np.ones((4, 8), np.float64)), "float64"),
    (lambda good: _npy(np.full((4, 8), np.nan, np.float32)), "not finite"),
    (lambda good: good + b"\x00" * 8, "too long"),
])
def test_damaged_cached_vectors_are_refused_with_the_file_named(tmp_path, damage, words):
    from plateflow.errors import CacheEntryError
    from plateflow.embed.writer import load_vectors, vectors_problem

    path = tmp_path / "v.npy"
    good = _npy(np.arange(32, dtype=np.float32).reshape(4, 8))
    path.write_bytes(good)
    assert np.array_equal(load_vectors(path, 4, 8), np.arange(32, dtype=np.float32).reshape(4, 8))
    path.write_bytes(damage(good))
    with pytest.raises(CacheEntryError, match=words) as err:
        load_vectors(path, 4, 8)
    assert str(path) in str(err.value) and vectors_problem(path, 4, 8) == str(err.value)


def test_unreadable_tables_are_named_with_how_to_recover_and_exit_non_zero(tmp_path):
    from plateflow.tables import write_corpus_table

    make_plate(tmp_path, "plate-001", paper_plate())
    (tmp_path / "plates.parquet").write_bytes(b"PAR1 this is not a table PAR1")
    for args in (["status"], ["refresh", "--failed-only"]):
        result = runner.invoke(app, [*args, "--root", str(tmp_path)], terminal_width=400)
        assert result.exit_code == 2, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
        assert f"{tmp_path / 'plates.parquet'} is not a readable corpus table" in result.output
        assert f"a plain `plateflow refresh --root {tmp_path}` rebuilds it" in result.output
    write_corpus_table(tmp_path, [{"plate_dir": "plate-001", "plate_id": "plate-001", "status": "ok"}])
    (tmp_path / "embeddings").mkdir()
    (tmp_path / "embeddings" / "tiny.parquet").write_bytes(b"garbage")
    result = runner.invoke(app, ["status", "--root", str(tmp_path)], terminal_width=400)
    assert result.exit_code == 2 and "1 plates: 1 ok" in result.output
    assert "embeddings/tiny.parquet: unreadable" in result.output and "--models tiny rebuilds it" in result.output


def test_a_full_refresh_keeps_an_unreadable_table_aside_and_carries_columns_by_plate_folder(tmp_path):
    import pyarrow as pa

    from plateflow.tables import write_corpus_table

    (tmp_path / "plates.parquet").write_bytes(b"garbage")
    write_corpus_table(tmp_path, [{"plate_dir": "plate-001", "plate_id": "x", "status": "ok"}])
    assert (tmp_path / "plates.parquet.unreadable").read_bytes() == b"garbage"
    # Two folders with one plate_id (both fail as duplicates): each keeps its own note.
    rows = [{"plate_dir": d, "plate_id": "dup", "status": "failed"} for d in ("plate-001", "plate-002")]
    write_corpus_table(tmp_path, rows + [{"plate_dir": "plate-003", "plate_id": "c", "status": "ok"}])
    table = pq.read_table(tmp_path / "plates.parquet")
    notes = {"plate-001": "torn corner", "plate-002": "water stain", "plate-003": None}
    table = table.append_column("note", pa.array([notes[d] for d in table.column("plate_dir").to_pylist()]))
    pq.write_table(table, tmp_path / "plates.parquet")
    write_corpus_table(tmp_path, list(reversed(rows)))
    after = {r["plate_dir"]: r["note"] for r in pq.read_table(tmp_path / "plates.parquet").to_pylist()}
    assert after == {"plate-001": "torn corner", "plate-002": "water stain"}


def test_an_unchanged_table_is_not_written_nor_flagged_again(tmp_path):
    from plateflow.tables import write_corpus_table

    rows = [{"plate_dir": f"plate-{i:03d}", "plate_id": f"p{i}", "status": "ok", "width": 10 + i} for i in range(5)]
    calls = []

    def finalize(table, changed=None, before=None):
        calls.append(table.num_rows if changed is None else (list(changed), before.column("width").to_pylist()))
        return table

    assert write_corpus_table(tmp_path, rows, finalize=finalize, finalize_version="v1") is True
    path = tmp_path / "plates.parquet"
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    # The same rows (one of them made again: other statuses) keep the file; the flags are not decided again.
    again = [dict(r, characterize_status="cached") for r in rows]
    assert write_corpus_table(tmp_path, again, finalize=finalize, finalize_version="v1") is False
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before and calls == [5]
    # Another version of what decides the flags: decided again, and written once to record it.
    assert write_corpus_table(tmp_path, again, finalize=finalize, finalize_version="v2") is True
    assert write_corpus_table(tmp_path, again, finalize=finalize, finalize_version="v2") is False
    # One changed row: only it gets a new updated_at; a plate gone is dropped; the others stay.
    first = {r["plate_dir"]: r for r in pq.read_table(path).to_pylist()}
    changed = [dict(r, width=99) if r["plate_dir"] == "plate-002" else r for r in rows[:4]]
    assert write_corpus_table(tmp_path, changed, finalize=finalize, finalize_version="v2") is True
    after = {r["plate_dir"]: r for r in pq.read_table(path).to_pylist()}
    assert list(after) == ["plate-000", "plate-001", "plate-002", "plate-003"]
    assert after["plate-002"]["width"] == 99 and after["plate-000"] == first["plate-000"]
    # Rows changed in place (no plate added or gone): the flags are decided knowing which, and how they were.
    changed = [dict(r, width=7) if r["plate_dir"] == "plate-001" else dict(r, width=99) if r["plate_dir"] == "plate-002"
               else r for r in rows[:4]]
    assert write_corpus_table(tmp_path, changed, finalize=finalize, finalize_version="v2") is True
    assert calls[-2:] == [4, ([1], [11])]


def test_a_tables_counts_on_its_columns_are_those_of_its_rows():
    """``plateflow refresh`` and ``status`` count plates.parquet on its columns (RunCounts.of_table);
    the counts are RunCounts.of over its rows as dicts, with and without embeddings."""
    import random

    import pyarrow as pa

    from plateflow.artifacts import RunCounts
    from plateflow.tables import PLATES_SCHEMA

    rng = random.Random(3)
    steps = [None, "manifest", "hash", "characterize", "candidates", "embed", "smart_crop"]
    for embedded in (False, True):
        rows = []
        for i in range(300):
            step = rng.choice(steps)
            rows.append({"plate_dir": f"plate-{i}", "status": "failed" if step else "ok", "failed_step": step,
                         "characterize_status": rng.choice(["computed", "cached", "failed", "not_run", None]),
                         "embed_status": rng.choice(["computed", "cached", "failed", None]) if embedded else None})
        table = pa.Table.from_pylist([{k: r.get(k) for k in PLATES_SCHEMA.names} for r in rows], schema=PLATES_SCHEMA)
        expected = RunCounts.of(rows, set(), ["any"] if embedded else [])
        assert RunCounts.of_table(table) == expected
        assert expected.failed > 0 and expected.characterization["computed"] > 0
        assert (expected.embeddings is not None) == embedded


def test_many_refreshed_rows_are_compared_with_their_old_ones_a_slice_at_a_time(tmp_path):
    """A refresh that read every plate again (new code, ``--verify``) hands 10^5 rows to
    ``write_corpus_table``: they are compared with the old rows as dicts a slice at a time, so
    what that holds does not grow with the corpus (the whole of both was 400 MB at 10^5)."""
    import tracemalloc

    from plateflow.tables import write_corpus_table

    rows = [{"plate_dir": f"plate-{i:05d}", "plate_id": f"p{i}", "status": "ok", "width": i, "height": 7,
             "mean_rgb": [1.0, 2.0, float(i)], "quality_flags": ["odd_size"]} for i in range(20_000)]
    assert write_corpus_table(tmp_path, rows) is True
    path = tmp_path / "plates.parquet"
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    again = [dict(r, characterize_status="cached") for r in rows]
    again[123]["height"] = 8
    tracemalloc.start()
    try:
        written = write_corpus_table(tmp_path, again)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert written is True and path.read_bytes() != before[0]
    after = pq.read_table(path).to_pylist()
    assert [r["height"] for r in after].count(8) == 1 and after[123]["height"] == 8
    # Both sides as dicts at once: ~60 MB here; a slice of each: ~12 MB.
    assert peak < 30 * 2**20, peak / 2**20


def test_rows_in_any_order_are_written_in_natural_folder_order(tmp_path):
    """A refresh hands its rows sorted (no copy of the table then); any other order is sorted."""
    from plateflow.tables import write_corpus_table

    order = ["plate-2", "plate-10", "plate-101", "plate-1000"]
    for given in (order, ["plate-1000", "plate-101", "plate-2", "plate-10"]):
        path = tmp_path / "plates.parquet"
        path.unlink(missing_ok=True)
        write_corpus_table(tmp_path, [{"plate_dir": f, "plate_id": f, "status": "ok"} for f in given])
        assert pq.read_table(path).column("plate_dir").to_pylist() == order


def test_a_corpus_table_read_for_some_columns_has_those_it_holds(tmp_path):
    """The end of a refresh and ``status`` read only the columns they show (10^5 rows); a table
    without one of them (a notebook's) is read for those it has; a damaged one is named."""
    import pyarrow as pa

    from plateflow.artifacts import TABLE_COLUMNS, plate_table
    from plateflow.errors import CorpusTableError
    from plateflow.tables import read_corpus_table, write_corpus_table

    assert read_corpus_table(tmp_path, ["status"]) is None
    write_corpus_table(tmp_path, [{"plate_dir": "plate-1", "plate_id": "a", "status": "failed", "error": "bad",
                                   "megapixels": 1.25, "quality_flags": ["blurry"], "width": 9}])
    table = read_corpus_table(tmp_path, TABLE_COLUMNS)
    assert table.column_names == TABLE_COLUMNS
    assert plate_table(table.to_pylist()) == plate_table(read_corpus_table(tmp_path).to_pylist())
    pq.write_table(pa.table({"plate_id": ["a"], "note": ["x"]}), tmp_path / "plates.parquet")
    assert read_corpus_table(tmp_path, ["plate_dir", "note"]).column_names == ["note"]
    (tmp_path / "plates.parquet").write_bytes(b"PAR1 garbage PAR1")
    with pytest.raises(CorpusTableError, match="is not a readable corpus table"):
        read_corpus_table(tmp_path, ["status"])
