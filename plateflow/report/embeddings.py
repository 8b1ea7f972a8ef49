"""Near-duplicate pairs and outliers from the whole-plate vectors of a model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from plateflow.layout import CorpusLayout
from plateflow.profiles import quality_profile
from plateflow.report.plates import _esc

SHOWN = 1000  # near-duplicate pairs and outliers listed in the report


def whole_plate_vectors(root: Path, model: str) -> tuple[list[str], np.ndarray]:
    """plate_ids and the L2-normalised whole-plate vector (candidate 0) of each, for ``model``."""
    path = CorpusLayout(Path(root)).embeddings_table(model)
    table = pq.read_table(path, filters=[("candidate_index", "=", 0)], columns=["plate_id", "vector"])
    if table.num_rows == 0:
        return [], np.zeros((0, 0), np.float32)
    vectors = np.asarray(table.column("vector").combine_chunks().flatten(), np.float32).reshape(table.num_rows, -1)
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return table.column("plate_id").to_pylist(), vectors


def near_duplicates(ids: list[str], vectors: np.ndarray, threshold: float, limit: int = SHOWN,
                    cells: int = 1 << 22) -> tuple[list[tuple[str, str, float]], int]:
    """The ``limit`` pairs of highest whole-plate cosine similarity at or above ``threshold``,
    most similar first, and how many such pairs there are. Rows go in blocks of at most
    ``cells`` similarities and only the best ``limit`` pairs are kept between blocks, so memory
    stays bounded however many plates look alike (a corpus of blank pages has n²/2 pairs)."""
    n = len(ids)
    block = max(1, cells // max(n, 1))
    best_s, best_i, best_j, total = np.empty(0, np.float32), np.empty(0, np.int64), np.empty(0, np.int64), 0
    columns = np.arange(n)
    for start in range(0, n, block):
        rows = np.arange(start, min(start + block, n))
        sim = vectors[rows] @ vectors.T
        i, j = np.nonzero((sim >= threshold) & (columns[None, :] > rows[:, None]))  # each pair once
        total += len(i)
        best_s = np.concatenate([best_s, sim[i, j].astype(np.float32)])
        best_i, best_j = np.concatenate([best_i, i + start]), np.concatenate([best_j, j])
        if len(best_s) > limit:
            keep = np.argpartition(-best_s, limit)[:limit]
            best_s, best_i, best_j = best_s[keep], best_i[keep], best_j[keep]
    order = np.lexsort((best_j, best_i, -best_s))
    return [(ids[a], ids[b], float(s)) for a, b, s in zip(best_i[order], best_j[order], best_s[order])], total


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
    dups, total = near_duplicates(ids, vectors, thresholds.embedding_duplicate_cosine)
    odd = outliers(ids, vectors, thresholds.embedding_outlier_z)
    dup_rows = "".join(f"<tr><td>{_esc(a)}</td><td>{_esc(b)}</td><td>{s:.4f}</td></tr>" for a, b, s in dups)
    odd_rows = "".join(f"<tr><td>{_esc(p)}</td><td>{s:.4f}</td></tr>" for p, s in odd[:SHOWN])
    more = f"<p>{total:,} pairs; the {len(dups):,} most alike are listed.</p>" if total > len(dups) else ""
    return (f"<h2>Embeddings: {_esc(model)} ({len(ids)} plates)</h2>"
            f"<h3>Near-duplicate pairs (cosine ≥ {thresholds.embedding_duplicate_cosine})</h3>"
            + (f"{more}<table class='duplicates'><tr><th>plate</th><th>plate</th><th>cosine</th></tr>{dup_rows}</table>"
               if dups else "<p>none</p>")
            + f"<h3>Outliers (mean similarity to the others over {thresholds.embedding_outlier_z:g} SD "
              f"below the corpus mean)</h3>"
            + (f"<table class='outliers'><tr><th>plate</th><th>mean cosine</th></tr>{odd_rows}</table>"
               if odd else "<p>none</p>"))
