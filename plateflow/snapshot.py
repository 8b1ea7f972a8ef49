"""The corpus snapshot (ROOT/.plateflow/snapshot.parquet): plateflow's index of its corpus, as
git's index is of a work tree.

For each plate folder it holds the stat signatures (size, mtime, inode, ctime) of the folder, its
manifest, its source and its outputs as they were when the plate's row in plates.parquet was
last made (with models: its crop candidates and the run folder of its smart crop too), with the
plate's id and source. A refresh whose settings match the snapshot's (``snapshot_key``: the
characterization's and, with models, the embeddings' and the crop's) settles a plate whose
signatures are unchanged with a stat per file and no read: its rows in plates.parquet, the
embeddings tables and the feature stores stand as they are. Anything else (a new or changed
file, a removed output, other settings, a table the snapshot did not see written) sends the
plate, or every plate, through the refresh's reading path, which writes the snapshot again.

As in git, an entry taken within ``RACY_NS`` of a file's last change is not trusted: a write in
the same clock tick would leave the stat unchanged. Only plates whose outcome does not depend on
chance are settled: ok plates and plates whose manifest or image is bad; a source that could not
be read is tried again by every refresh.
"""

from __future__ import annotations

import os
import time
from array import array
from typing import NamedTuple
from pathlib import Path

import pyarrow as pa

from plateflow.caching import code_version, fingerprint
from plateflow.keyedtable import KeyedTable, OtherColumns
from plateflow.layout import (CANDIDATES, HISTOGRAMS, INPUT_IMAGE, MANIFEST, PLATES, RUNS, SEGMENTATION, VIZ,
                              WORKING_COPY, CorpusLayout)

RACY_NS = 2_000_000_000
_MISSING = (-1, -1, -1, -1)
_INO = (1 << 63) - 1
SCHEMA = pa.schema([
    ("folder", pa.string()),
    ("plate_id", pa.string()),
    ("source_path", pa.string()),  # relative to ROOT
    ("signature", pa.binary()),
    ("trusted", pa.bool_()),
    ("run", pa.string()),  # the run folder of the plate's smart crop (runs/<run>), with models
])
CODE = code_version("plateflow.snapshot")


def snapshot_key(characterize_version: str, viz: bool, working_copy: bool, models_version: str = "") -> str:
    """What a snapshot's rows were made with: the characterization's key version (parameters,
    profile, code), which outputs a plate has and, for a refresh with models, the version of
    their steps' keys (embeddings and smart crop). A snapshot made with another key is ignored."""
    return fingerprint(characterize_version, str(viz), str(working_copy), models_version, CODE)


def outputs(viz: bool, working_copy: bool, models: bool = False, masks: bool = False) -> tuple[str, ...]:
    """The plate folder's entries whose stat is in its signature besides manifest and source
    (with ``models``: the crop candidates and the runs folder; with ``masks``, a crop guided by
    them: the segmentation folder)."""
    return ((INPUT_IMAGE, HISTOGRAMS) + ((VIZ,) if viz else ()) + ((WORKING_COPY,) if working_copy else ())
            + ((CANDIDATES, RUNS) if models else ()) + ((SEGMENTATION,) if masks else ()))


def signature(folder: str, source: str | None, root: str, names: tuple[str, ...],
              run: str | None = None) -> tuple[bytes, int]:
    """The packed stat signatures of ``folder`` (a path), its manifest, its ``source`` (relative
    to ``root``), ``names`` in it and its ``run`` folder (runs/<run>, when given), and the latest
    ctime among them (a missing file has signature -1s)."""
    sig = array("q")
    latest = 0
    paths = ([folder, f"{folder}/{MANIFEST}"] + ([f"{root}/{source}"] if source else [])
             + [f"{folder}/{n}" for n in names] + ([f"{folder}/{RUNS}/{run}"] if run else []))
    for path in paths:
        try:
            st = os.stat(path)
        except (OSError, ValueError):
            sig.extend(_MISSING)
            continue
        sig.extend((st.st_size, st.st_mtime_ns, st.st_ino & _INO, st.st_ctime_ns))
        latest = max(latest, st.st_ctime_ns, st.st_mtime_ns)
    return sig.tobytes(), latest


class Entry(NamedTuple):  # a tuple: the snapshot's columns after the folder
    plate_id: str
    source: str | None
    signature: bytes
    trusted: bool
    run: str | None = None


class Snapshot:
    """The snapshot of one corpus for one refresh's settings (``key``). ``settle`` says which
    folders are unchanged; ``record`` and ``forget`` update it; ``save`` writes it when changed,
    naming the plates.parquet (and the ``tables``: the embeddings tables and feature stores of a
    refresh with models) it goes with. A refresh with ``models`` keeps a snapshot of its own."""

    def __init__(self, root: Path, key: str, names: tuple[str, ...], tables: tuple[Path, ...] = (),
                 models: bool = False):
        self.root = os.fspath(root)
        self.corpus = CorpusLayout(Path(root))
        self.key, self.names, self.tables = key, names, tables
        self.path = self.corpus.models_snapshot if models else self.corpus.snapshot
        self.entries: dict[str, Entry] = {}
        self.changed = False
        self.problem: str | None = None  # why a snapshot on disk could not be used, when it was damaged
        self._dirty: set[str] = set()  # folders recorded or forgotten since the load
        self._table = KeyedTable(self.path, SCHEMA, Entry._make)
        self._token = self._table_token()  # the plates.parquet the loaded entries go with
        self._load()

    def _table_token(self) -> str | None:
        """The stat of plates.parquet and of each of ``tables`` (``-`` where missing); None
        without plates.parquet."""
        parts = []
        for path in (self.corpus.table, *self.tables):
            try:
                st = os.stat(path)
            except OSError:
                if not parts:
                    return None
                parts.append("-")
                continue
            parts.append(f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}")
        return " ".join(parts)

    def _load(self) -> None:
        try:
            entries, meta = self._table.load()
        except FileNotFoundError:
            return
        except OtherColumns:  # an earlier version's: no snapshot, written whole
            self.changed = True
            return
        except (OSError, KeyError, pa.ArrowException) as exc:
            self.changed = True  # a damaged snapshot is no snapshot: every plate is read, and it is rewritten
            self.problem = (f"{self.path} cannot be read ({type(exc).__name__}: {exc}); every plate "
                            f"is read this time and the snapshot is written again")
            return
        if (meta.get(b"key", b"").decode() != self.key or self._token is None
                or meta.get(b"table", b"").decode() != self._token):
            self._table.discard()  # made with other settings, or for another plates.parquet: written whole
            self.changed = True
            return
        self.entries = entries

    def drop(self, problem: str) -> None:
        """Use no entry this time (``problem`` says why) and write the snapshot whole at the end."""
        self.entries, self.changed, self.problem = {}, True, problem
        self._table.discard()

    def settle(self, folders: list[str]) -> set[str]:
        """The folders whose entry is trusted and whose signature is what it was."""
        top = f"{self.root}/{PLATES}"
        settled = set()
        for folder in folders:
            entry = self.entries.get(folder)
            if entry is not None and entry.trusted and signature(
                    f"{top}/{folder}", entry.source, self.root, self.names, entry.run)[0] == entry.signature:
                settled.add(folder)
        return settled

    def record(self, folder: str, plate_id: str, source: str | None, settleable: bool,
               run: str | None = None) -> None:
        """The folder as it is now, after its row was made; ``settleable``: its outcome may be
        kept while nothing changes (otherwise the next refresh does the plate again); ``run``:
        the run folder of its smart crop."""
        sig, latest = signature(f"{self.root}/{PLATES}/{folder}", source, self.root, self.names, run)
        trusted = settleable and time.time_ns() - latest > RACY_NS
        entry = Entry(plate_id, source, sig, trusted, run)
        if self.entries.get(folder) != entry:
            self.entries[folder] = entry
            self._dirty.add(folder)
            self.changed = True

    def forget(self, folders: set[str]) -> None:
        for folder in folders:
            if self.entries.pop(folder, None) is not None:
                self._dirty.add(folder)
                self.changed = True

    def save(self) -> None:
        """Write the snapshot if it changed or plates.parquet did (after plates.parquet): the
        folders recorded or forgotten since the load, as a delta (``KeyedTable``)."""
        token = self._table_token()
        if token is None or (not self.changed and token == self._token):
            return
        self._table.save(self.entries, self._dirty, {b"key": self.key.encode(), b"table": token.encode()})
        self.changed, self._token, self._dirty = False, token, set()
