"""Labels for heads: per plate, from a CSV (plate_id,label) or the manifests' own key, checked
before any training (not UTF-8, not two fields, too long, no matching plate, one class: one
line each)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from plateflow.errors import ConfigError
from plateflow.features import FeatureStore


def read_labels(root: Path, label: str, labels_file: str | Path | None = None) -> dict[str, str]:
    """plate_id -> label, from ``labels_file`` (CSV: plate_id,label; a header line is allowed)
    or from the manifests' ``label`` key. Empty labels are left out."""
    if labels_file is not None:
        return _labels_csv(Path(labels_file))
    from plateflow.corpus import PlateRef, discover_plates

    out = {}
    for plate in discover_plates(root):
        if isinstance(plate, PlateRef):
            value = plate.manifest.get(label)
            if value is not None and str(value).strip():
                out[plate.plate_id] = str(value).strip()
    return out


MAX_LABEL = 200  # characters of a class name: it is a table value, a plot's tick and a metric's key


def _labels_csv(path: Path) -> dict[str, str]:
    """plate_id -> label from a CSV (a header line is allowed); ``ConfigError`` naming the file
    and the line for text that is not UTF-8, a line that is not two fields, an oversized label."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the labels file {path}: {exc.strerror or exc}") from None
    for number, raw in enumerate(data.splitlines(), start=1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}, line {number}: not UTF-8 text ({exc.reason} at byte {exc.start}); save the "
                              f"file as UTF-8") from None
    reader = csv.reader(io.StringIO(data.decode("utf-8-sig"), newline=""))
    csv.field_size_limit(max(csv.field_size_limit(), len(data) + 1))  # a long field is judged below, by us
    rows = []
    try:
        for row in reader:
            if row:
                rows.append((reader.line_num, row))
    except csv.Error as exc:
        raise ConfigError(f"{path}, line {reader.line_num}: not CSV ({exc})") from None
    if rows and [c.strip().lower() for c in rows[0][1][:2]] == ["plate_id", "label"]:
        rows = rows[1:]
    out = {}
    for number, row in rows:
        if len(row) < 2:
            raise ConfigError(f"{path}, line {number}: every line needs plate_id,label; found {row!r:.100}")
        label = row[1].strip()
        if len(label) > MAX_LABEL:
            raise ConfigError(f"{path}, line {number}: a label of {len(label):,} characters; at most {MAX_LABEL}")
        if label:
            out[row[0].strip()] = label
    if not out:
        raise ConfigError(f"{path} holds no labels (lines of plate_id,label)")
    return out


def check_labels(store: FeatureStore, labels: dict[str, str], where: str) -> None:
    """``ConfigError`` unless ``labels`` (from ``where``) give a classifier something to learn on
    ``store``: labelled plates with features, and two classes or more among them."""
    ids = set(store.column("plate_id"))
    named = {labels[i] for i in ids & set(labels)}
    if not named:
        example = next(iter(labels), None)
        raise ConfigError(f"no plate with features has a label from {where} ({len(labels)} labels, {store.rows} "
                          f"plates with features" + (f"; e.g. {example!r} is no plate id with features" if example
                                                    else "") + ")")
    if len(named) < 2:
        raise ConfigError(f"a classifier needs two classes or more; every labelled plate from {where} is "
                          f"{next(iter(named))!r}")
