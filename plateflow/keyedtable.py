"""plateflow's own keyed state (the corpus snapshot, the source index) as a base Parquet file and
a small delta beside it, so a refresh that changed k entries writes O(k) rows, not the table.

``<name>.parquet`` holds every entry as it was when it was last written whole, with an ``id`` in
its metadata; ``<name>.delta.parquet`` holds the entries changed since (a ``deleted`` column marks
those removed) and names the base it applies to. A delta that does not name the base on disk (a
writer stopped between writing a new base and removing the old delta) is ignored. When the
delta grows past ``max(DELTA_ROWS, entries / DELTA_SHARE)`` the base is written whole again and
the delta removed. Both are written atomically; the newest file's metadata is the table's.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from plateflow.atomic import write_parquet

DELTA_ROWS = 2048
DELTA_SHARE = 16


class OtherColumns(KeyError):
    """A base or delta with other columns than the schema: written by another version of its
    owner, not damaged."""


class KeyedTable:
    """Entries ``key -> tuple of the other columns`` of ``schema`` (its first column is the key,
    a string), loaded from ``path`` and its delta. ``load`` raises what reading a damaged file
    raises (``OSError``, ``pyarrow.ArrowException``, ``KeyError``; ``OtherColumns``, a
    ``KeyError``, for a file of other columns); ``save`` writes the entries
    named ``dirty`` (changed or removed since the load) as a delta, or everything when the
    delta would be too big or there is no base."""

    def __init__(self, path: Path, schema: pa.Schema, row=tuple):
        self.path = Path(path)
        self.row = row  # what an entry is made as from the other columns' values (a NamedTuple's _make)
        self.delta_path = self.path.with_name(self.path.name.removesuffix(".parquet") + ".delta.parquet")
        self.schema = schema
        self.delta_schema = schema.append(pa.field("deleted", pa.bool_()))
        self._base_id: str | None = None  # the base on disk, when one was loaded
        self._in_delta: set[str] = set()  # keys the delta on disk holds

    def load(self) -> tuple[dict[str, tuple], dict[bytes, bytes]]:
        """(entries, metadata). Raises ``FileNotFoundError`` when there is no table, and what
        reading a damaged base or delta raises; after a failed load, ``save`` writes a new base."""
        self.discard()
        base = pq.read_table(self.path)
        if not base.schema.equals(self.schema, check_metadata=False):
            raise OtherColumns(f"{self.path.name} has columns {base.schema.names}, not {self.schema.names}")
        meta = dict(base.schema.metadata or {})
        base_id = meta.get(b"id", b"").decode() or None
        values = zip(*(base.column(i).to_pylist() for i in range(1, base.num_columns)))
        entries = dict(zip(base.column(0).to_pylist(), values if self.row is tuple else map(self.row, values)))
        in_delta: list[str] = []
        try:
            delta = pq.read_table(self.delta_path)
        except FileNotFoundError:
            delta = None
        except pa.ArrowException as exc:  # said with the file's name: the base's would mislead
            raise pa.ArrowInvalid(f"{self.delta_path.name}: {exc}") from None
        if delta is not None and base_id is not None and (delta.schema.metadata or {}).get(b"base") == base_id.encode():
            if not delta.schema.equals(self.delta_schema, check_metadata=False):
                raise OtherColumns(f"{self.delta_path.name} has columns {delta.schema.names}, not "
                                   f"{self.delta_schema.names}")
            cols = [delta.column(i).to_pylist() for i in range(delta.num_columns)]
            for key, *rest, deleted in zip(*cols):
                if deleted:
                    entries.pop(key, None)
                else:
                    entries[key] = self.row(rest)
            in_delta = cols[0]
            meta.update(delta.schema.metadata)
        # else a delta of another base (its writer stopped before removing it): the base is the table
        self._base_id, self._in_delta = base_id, set(in_delta)
        return entries, meta

    def discard(self) -> None:
        """Forget what was loaded: the next ``save`` writes the whole table as a new base."""
        self._base_id, self._in_delta = None, set()

    def save(self, entries: dict[str, tuple], dirty: set[str], metadata: dict[bytes, bytes]) -> None:
        """Write ``dirty``'s entries (with those the delta already holds) as the delta, or the
        whole table as a new base when there is none or the delta would be too big."""
        keys = self._in_delta | dirty
        if self._base_id is None or len(keys) > max(DELTA_ROWS, len(entries) // DELTA_SHARE):
            self._write_base(entries, metadata)
            return
        keys = sorted(keys)
        present = [k in entries for k in keys]
        blank = (None,) * (len(self.schema) - 1)
        rows = [entries.get(k, blank) for k in keys]
        columns = [keys, *(list(c) for c in zip(*rows))] if rows else [[] for _ in self.schema]
        table = pa.Table.from_arrays([*columns, [not p for p in present]], schema=self.delta_schema.with_metadata(
            {**metadata, b"base": self._base_id.encode()}))
        write_parquet(self.delta_path, table)
        self._in_delta = set(keys)

    def _write_base(self, entries: dict[str, tuple], metadata: dict[bytes, bytes]) -> None:
        items = sorted(entries.items())
        columns = [[k for k, _ in items], *([v[i] for _, v in items] for i in range(len(self.schema) - 1))]
        base_id = uuid.uuid4().hex
        write_parquet(self.path, pa.Table.from_arrays(columns, schema=self.schema.with_metadata(
            {**metadata, b"id": base_id.encode()})))
        try:
            os.unlink(self.delta_path)
        except FileNotFoundError:
            pass
        self._base_id, self._in_delta = base_id, set()
