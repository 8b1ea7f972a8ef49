"""plateflow's keyed state as a base and a delta: what is loaded is what was saved, a save of k
changes writes k rows, and a delta that does not go with the base on disk is not applied."""

import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from plateflow.keyedtable import DELTA_ROWS, KeyedTable

SCHEMA = pa.schema([("key", pa.string()), ("n", pa.int64()), ("s", pa.string())])


def opened(path):
    table = KeyedTable(path, SCHEMA)
    try:
        entries, meta = table.load()
    except FileNotFoundError:
        entries, meta = {}, {}
    return table, entries, meta


def test_random_changes_load_back_as_saved_and_only_the_changes_are_written(tmp_path):
    path = tmp_path / "state.parquet"
    rng = random.Random(7)
    model = {f"k{i:05d}": (i, f"v{i}") for i in range(5000)}
    table, _, _ = opened(path)
    table.save(model, set(model), {b"m": b"0"})
    assert not table.delta_path.exists() and pq.read_metadata(path).num_rows == 5000
    base_mtime = path.stat().st_mtime_ns
    for step in range(1, 30):
        table, entries, meta = opened(path)
        assert entries == model and meta[b"m"] == str(step - 1).encode()
        dirty = set()
        for _ in range(rng.randint(1, 12)):
            key = f"k{rng.randrange(6000):05d}"
            if key in entries and rng.random() < 0.3:
                del entries[key]
            else:
                entries[key] = (rng.randrange(10**6), None if rng.random() < 0.2 else "x")
            dirty.add(key)
        model = dict(entries)
        table.save(entries, dirty, {b"m": str(step).encode()})
        assert path.stat().st_mtime_ns == base_mtime  # the base is not written for a few changes
        assert pq.read_metadata(table.delta_path).num_rows == len(table._in_delta) <= 12 * step
    assert opened(path)[1] == model


def test_a_delta_past_its_bound_writes_the_base_again_and_removes_the_delta(tmp_path):
    path = tmp_path / "state.parquet"
    table, _, _ = opened(path)
    model = {f"k{i}": (i, "a") for i in range(100)}
    table.save(model, set(model), {})
    table, entries, _ = opened(path)
    entries.update({f"n{i}": (i, "b") for i in range(DELTA_ROWS + 1)})
    table.save(entries, {f"n{i}" for i in range(DELTA_ROWS + 1)}, {})
    assert not table.delta_path.exists() and pq.read_metadata(path).num_rows == 100 + DELTA_ROWS + 1
    assert opened(path)[1] == entries


def test_a_delta_left_from_an_earlier_base_is_not_applied(tmp_path):
    """A writer that stopped after writing a new base and before removing the old delta."""
    path = tmp_path / "state.parquet"
    table, _, _ = opened(path)
    table.save({"a": (1, "old")}, {"a"}, {})
    table, entries, _ = opened(path)
    table.save({"a": (2, "delta")}, {"a"}, {})  # a delta on the first base
    stale = table.delta_path.read_bytes()
    table.discard()
    table.save({"a": (3, "new base")}, set(), {})  # a new base; its delta removed...
    table.delta_path.write_bytes(stale)  # ...and back, as if the writer had stopped before
    assert opened(path)[1] == {"a": (3, "new base")}


def test_damage_is_raised_and_the_next_save_writes_a_whole_base(tmp_path):
    path = tmp_path / "state.parquet"
    table, _, _ = opened(path)
    table.save({"a": (1, "x"), "b": (2, "y")}, {"a", "b"}, {})
    table, entries, _ = opened(path)
    table.save({**entries, "a": (5, "z")}, {"a"}, {})
    table.delta_path.write_bytes(b"PAR1 damaged")
    again = KeyedTable(path, SCHEMA)
    with pytest.raises(pa.ArrowException, match="state.delta.parquet: "):
        again.load()
    again.save({"c": (3, "w")}, {"c"}, {})  # what the caller rebuilt: written whole, the damage gone
    assert opened(path)[1] == {"c": (3, "w")} and not again.delta_path.exists()
