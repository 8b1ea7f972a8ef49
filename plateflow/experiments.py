"""The experiment ledger, ROOT/experiments/experiments.db (SQLite): one row per head training,
with what it was trained on, how, and how well it did on the held-out plates."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

from plateflow.errors import ConfigError
from plateflow.layout import CorpusLayout

COLUMNS = {
    "id": "TEXT PRIMARY KEY",
    "created": "TEXT NOT NULL",       # ISO 8601, UTC
    "model": "TEXT NOT NULL",         # the feature store's model
    "feature_kind": "TEXT NOT NULL",  # plates, tiles or patches
    "label": "TEXT NOT NULL",
    "head": "TEXT NOT NULL",          # linear or mlp; seg-linear or seg-conv
    "hyperparameters": "TEXT NOT NULL",  # JSON: lr, epochs, seed, weight decay, hidden, batch, split rule
    "code_version": "TEXT NOT NULL",
    "features_version": "TEXT NOT NULL",
    "device": "TEXT NOT NULL",
    "train_size": "INTEGER NOT NULL",
    "validation_size": "INTEGER NOT NULL",
    "test_size": "INTEGER NOT NULL",
    "classes": "TEXT NOT NULL",       # JSON list
    "class_balance": "TEXT NOT NULL",  # JSON: {split: {class: count}}
    "accuracy": "REAL",
    "macro_f1": "REAL",
    "miou": "REAL",                   # segmentation heads: the test plates' mean IoU
    "per_class": "TEXT NOT NULL",     # JSON: {class: {precision, recall, f1, support}}
    "best_epoch": "INTEGER",
    "duration_s": "REAL NOT NULL",
    "checkpoint": "TEXT NOT NULL",    # relative to ROOT
    "confusion_png": "TEXT NOT NULL",
    "registered_model": "TEXT",       # a fine-tune: the corpus's model its encoder is, by name
}
JSON_COLUMNS = {"hyperparameters", "classes", "class_balance", "per_class"}


class DamagedLedgerError(ConfigError):
    """experiments.db cannot be read; the message names it and what to do."""


def _damaged(path: Path, exc: Exception) -> DamagedLedgerError:
    return DamagedLedgerError(
        f"the experiment ledger {path} is damaged ({exc}); move it aside (`mv {path} {path}.damaged`): the "
        f"next `plateflow train-head` starts a new one, and the checkpoints in {path.parent} stay")


def _connect(root: Path) -> sqlite3.Connection:
    path = CorpusLayout(Path(root)).experiments_db
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=60)
    try:
        db.execute(f"CREATE TABLE IF NOT EXISTS experiments ({', '.join(f'{k} {v}' for k, v in COLUMNS.items())})")
        db.execute("SELECT count(*) FROM experiments").fetchone()
        have = {r[1] for r in db.execute("PRAGMA table_info(experiments)")}
        for name in COLUMNS.keys() - have:  # a ledger from before the column was added: nullable ones only
            with db:
                db.execute(f"ALTER TABLE experiments ADD COLUMN {name} {COLUMNS[name].replace(' NOT NULL', '')}")
    except sqlite3.DatabaseError as exc:
        db.close()
        raise _damaged(path, exc) from None
    return db


def check(root: Path) -> None:
    """``DamagedLedgerError`` now, before a head is trained, if the ledger cannot take its row."""
    if CorpusLayout(Path(root)).experiments_db.exists():
        _connect(root).close()


def record(root: Path, row: dict[str, Any]) -> None:
    """Add one experiment (every column of ``COLUMNS``)."""
    values = [json.dumps(row[k], sort_keys=True) if k in JSON_COLUMNS else row.get(k) for k in COLUMNS]
    with closing(_connect(root)) as db, db:
        db.execute(f"INSERT INTO experiments ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})", values)


def experiments(root: Path, experiment_id: str | None = None) -> list[dict[str, Any]]:
    """Every experiment, oldest first (or the one named)."""
    if not CorpusLayout(Path(root)).experiments_db.is_file():
        return []
    with closing(_connect(root)) as db:
        db.row_factory = sqlite3.Row
        where, args = ("WHERE id = ?", (experiment_id,)) if experiment_id else ("", ())
        try:
            rows = db.execute(f"SELECT * FROM experiments {where} ORDER BY created, id", args).fetchall()
        except sqlite3.DatabaseError as exc:
            raise _damaged(CorpusLayout(Path(root)).experiments_db, exc) from None
    return [{k: json.loads(r[k]) if k in JSON_COLUMNS and r[k] is not None else r[k] for k in r.keys()} for r in rows]
