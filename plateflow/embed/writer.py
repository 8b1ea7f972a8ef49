"""The writer: the content-addressed vector store, ROOT/.plateflow/embeddings/<model>/<sha256>-<key>.npy
(float32, one row per view). ``VectorWriter`` stores a chunk's vectors on threads while the
device works on the next batch."""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from plateflow.atomic import write_bytes, write_json
from plateflow.caching import StepKey, cache_key
from plateflow.config import CropParams
from plateflow.errors import CacheEntryError
from plateflow.layout import CorpusLayout
from plateflow.profiles import ModelSpec

def step_key(spec: ModelSpec, params: CropParams) -> StepKey:
    """The vectors' key: the model's entry in the capability table, the crop parameters (the
    candidates' boxes) and the code of the models, readers, mapper, writer and candidates."""
    return cache_key("embed", spec.identity(), params.fingerprint())


def embedding_key(spec: ModelSpec, params: CropParams) -> str:
    """The part of a vector file's name after the plate's sha256 (``store_path``)."""
    return step_key(spec, params).version


def store_path(root: Path, spec: ModelSpec, sha256: str, params: CropParams) -> Path:
    return CorpusLayout(Path(root)).vector_store(spec.name) / f"{sha256}-{embedding_key(spec, params)}.npy"


def load_vectors(path: Path, views: int, dim: int | None = None) -> np.ndarray:
    """A plate's cached vectors, checked: a whole .npy file of float32, ``views`` rows (of
    ``dim`` floats when given), every value finite. Anything else raises ``CacheEntryError``
    naming the file (truncated, garbage, another shape): the caller recomputes it."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise CacheEntryError(f"cached vectors {path} are missing") from None
    fh = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(fh)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(fh)
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise CacheEntryError(f"cached vectors {path} are not a .npy file ({exc})") from None
    expected = (views, dim) if dim is not None else (views,)
    if dtype != np.dtype("<f4") or fortran or shape[:len(expected)] != expected or len(shape) != 2:
        raise CacheEntryError(f"cached vectors {path} hold {dtype} {shape}, expected float32 "
                              f"({views}, {dim if dim is not None else 'dim'})")
    body = len(data) - fh.tell()
    if body != int(np.prod(shape)) * 4:
        raise CacheEntryError(f"cached vectors {path} are {'truncated' if body < np.prod(shape) * 4 else 'too long'}: "
                              f"{body} bytes of data for shape {shape}")
    vectors = np.frombuffer(data, "<f4", offset=fh.tell()).reshape(shape)
    if not np.isfinite(vectors).all():
        raise CacheEntryError(f"cached vectors {path} hold values that are not finite")
    return vectors


def vectors_problem(path: Path, views: int, dim: int) -> str | None:
    """None if ``path`` holds usable vectors (see ``load_vectors``), else what is wrong with it."""
    try:
        load_vectors(path, views, dim)
    except CacheEntryError as exc:
        return str(exc)
    return None


def save_vectors(path: Path, vectors: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, vectors.astype(np.float32))
    write_bytes(Path(path), buf.getvalue())


class VectorWriter:
    """One writer interface for the store: ``write(path, vectors)`` returns at once (two
    threads write), ``close()`` waits for every write and raises the first error (an I/O error
    is transient: the chunk is retried). ``seconds``: time spent writing."""

    def __init__(self, threads: int = 2):
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="plateflow-writer")
        self._writes: list[Future] = []
        self._lock = threading.Lock()
        self.seconds = 0.0

    def write(self, path: str | Path, vectors: np.ndarray) -> None:
        self._writes.append(self._pool.submit(self._save, Path(path), vectors))

    def _save(self, path: Path, vectors: np.ndarray) -> None:
        t = time.perf_counter()
        save_vectors(path, vectors)
        with self._lock:
            self.seconds += time.perf_counter() - t

    def close(self) -> None:
        try:
            for w in self._writes:
                w.result()
        finally:
            self._pool.shutdown()

    def __enter__(self) -> "VectorWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:  # the error that stopped the chunk is the one to see; finish what was handed over
            self._pool.shutdown()


class ChunkLedger:
    """The record of finished embed-chunks (a folder of ``<key>.json``): a chunk's completion is
    written when it completes, not inferred from which vector files exist."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    @staticmethod
    def key(model: str, chunk: list) -> str:
        """A chunk's name: its model and its plates' vector files (which carry the embedding key)."""
        h = hashlib.sha256(model.encode())
        for job in chunk:
            h.update(b"\0" + str(job.cache_file).encode())
        return h.hexdigest()[:20]

    def finished(self, key: str, chunk: list) -> bool:
        """Recorded complete with every plate embedded, and every vector file still in place."""
        try:
            record = json.loads((self.folder / f"{key}.json").read_bytes())
        except (OSError, ValueError):
            return False
        return (not any(record.get("outcome", {"?": "unknown"}).values())
                and all(Path(job.cache_file).is_file() for job in chunk))

    def record(self, key: str, chunk: list, outcome: dict[str, str | None]) -> None:
        from datetime import datetime, timezone

        write_json(self.folder / f"{key}.json", {"plates": [j.name for j in chunk], "outcome": outcome,
                                                 "finished": datetime.now(timezone.utc).isoformat()})
