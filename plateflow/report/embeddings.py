"""Near-duplicate pairs and outliers from the whole-plate vectors of a model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from plateflow.layout import CorpusLayout
from plateflow.profiles import quality_profile
from plateflow.report.plates import _esc


def whole_plate_vectors(root: Path, model: str) -> tuple[list[str], np.ndarray]:
    """plate_ids and the L2-normalised whole-plate vector (candidate 0) of each, for ``model``."""
    path = CorpusLayout(Path(root)).embeddings_table(model)
    table = pq.read_table(path, filters=[("candidate_index", "=", 0)], columns=["plate_id", "vector"])
    if table.num_rows == 0:
        return [], np.zeros((0, 0), np.float32)
    vectors = np.asarray(table.column("vector").combine_chunks().flatten(), np.float32).reshape(table.num_rows, -1)
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return table.column("plate_id").to_pylist(), vectors


def near_duplicates(ids: list[str], vectors: np.ndarray, threshold: float,
                    block: int = 2048) -> list[tuple[str, str, float]]:
    """Pairs whose whole-plate cosine similarity is >= threshold, most similar first (in blocks
    of rows: never the whole n x n matrix)."""
    pairs = []
    for start in range(0, len(ids), block):
        sim = vectors[start:start + block] @ vectors.T
        i, j = np.nonzero(sim >= threshold)
        keep = j > i + start
        pairs += [(int(a) + start, int(b), float(sim[a, b])) for a, b in zip(i[keep], j[keep])]
    pairs.sort(key=lambda p: -p[2])
    return [(ids[a], ids[b], s) for a, b, s in pairs]


def outliers(ids: list[str], vectors: np.ndarray, z: float) -> list[tuple[str, float]]:
    """Plates whose mean similarity to the others lies more than ``z`` deviations below the mean
    (from the vectors' sum: O(n), not the n x n similarities)."""
    n = len(ids)
    if n < 4:
        return []
    total = vectors.sum(axis=0)
    mean_sim = (vectors @ total - np.einsum("ij,ij->i", vectors, vectors)) / (n - 1)
    mu, sd = mean_sim.mean(), mean_sim.std()
    if sd < 1e-9:
        return []
    return sorted(((ids[k], float(mean_sim[k])) for k in np.flatnonzero(mean_sim < mu - z * sd)), key=lambda p: p[1])


def _embeddings_section(root: Path, model: str) -> str:
    thresholds = quality_profile().report
    try:
        ids, vectors = whole_plate_vectors(root, model)
    except (OSError, pa.ArrowException) as exc:
        return (f"<h2>Embeddings: {_esc(model)}</h2><p>embeddings/{_esc(model)}.parquet is not "
                f"readable ({_esc(exc)}); a refresh with --models {_esc(model)} rebuilds it.</p>")
    dups = near_duplicates(ids, vectors, thresholds.embedding_duplicate_cosine)
    odd = outliers(ids, vectors, thresholds.embedding_outlier_z)
    dup_rows = "".join(f"<tr><td>{_esc(a)}</td><td>{_esc(b)}</td><td>{s:.4f}</td></tr>" for a, b, s in dups[:1000])
    odd_rows = "".join(f"<tr><td>{_esc(p)}</td><td>{s:.4f}</td></tr>" for p, s in odd[:1000])
    return (f"<h2>Embeddings: {_esc(model)} ({len(ids)} plates)</h2>"
            f"<h3>Near-duplicate pairs (cosine ≥ {thresholds.embedding_duplicate_cosine})</h3>"
            + (f"<table class='duplicates'><tr><th>plate</th><th>plate</th><th>cosine</th></tr>{dup_rows}</table>"
               if dups else "<p>none</p>")
            + f"<h3>Outliers (mean similarity to the others over {thresholds.embedding_outlier_z:g} SD "
              f"below the corpus mean)</h3>"
            + (f"<table class='outliers'><tr><th>plate</th><th>mean cosine</th></tr>{odd_rows}</table>"
               if odd else "<p>none</p>"))
