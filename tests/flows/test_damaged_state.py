"""The refresh under faults and hostile corpora, end to end: through the flow on the test
server, and through `plateflow refresh` as a user runs it (its own temporary server)."""

import json
import logging
import os
import stat
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from flows.refresh import refresh_corpus
from plateflow.config import RefreshConfig
from app.cli import app

from fixtures.plates import make_plate, paper_plate

runner = CliRunner()


def run(root, **kw):
    state = refresh_corpus(str(root), RefreshConfig(**kw), return_state=True)
    table = {r["plate_dir"]: r for r in pq.read_table(root / "plates.parquet").to_pylist()}
    return state, table


def snapshot(root: Path) -> dict[Path, tuple[int, int]]:
    """(inode, mtime_ns) of every file under ROOT but the lock (which names the run that holds
    the corpus) and the corpus snapshot (written again while its entries are younger than
    plateflow.snapshot.RACY_NS: tests/flows/test_snapshot.py)."""
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and p.name not in ("snapshot.parquet", "snapshot.delta.parquet", "refresh.lock")}


@pytest.mark.usefixtures("prefect_harness")
def test_every_file_and_folder_a_refresh_writes_has_the_umask_mode(corpus, tiny_env):
    old = os.umask(0o022)
    try:
        state, _ = run(corpus, models=["tiny_dinov2"], gpu_class="CPU")
    finally:
        os.umask(old)
    assert state.is_completed(), state.message
    made = [p for p in corpus.rglob("*") if "source" not in p.relative_to(corpus).parts]
    assert len(made) > 30
    wrong = {str(p.relative_to(corpus)): oct(stat.S_IMODE(p.stat().st_mode)) for p in made
             if stat.S_IMODE(p.stat().st_mode) != (0o755 if p.is_dir() else 0o644)}
    assert wrong == {}


@pytest.mark.usefixtures("prefect_harness")
def test_a_plate_folder_symlinked_outside_the_corpus_is_refused_and_nothing_is_written_there(tmp_path):
    root = tmp_path / "corpus"
    make_plate(root, "plate-001", paper_plate(seed=1))
    outside = make_plate(tmp_path / "elsewhere", "victim", paper_plate(seed=2))
    (root / "plates_structured" / "plate-002").symlink_to(outside)
    before = {p.name for p in outside.rglob("*")}
    state, table = run(root)
    assert state.is_failed() and table["plate-001"]["status"] == "ok"
    assert table["plate-002"]["failed_step"] == "manifest"
    assert "is a symlink to" in table["plate-002"]["error"] and "outside plates_structured/" in table["plate-002"]["error"]
    assert {p.name for p in outside.rglob("*")} == before


@pytest.mark.usefixtures("prefect_harness")
def test_an_unchanged_corpus_with_failed_plates_rewrites_nothing(tmp_path):
    root = tmp_path / "corpus"
    make_plate(root, "plate-001", paper_plate(seed=1))
    make_plate(root, "plate-002", b"\xff\xd8\xff\xe0garbage", filename="corrupt.jpg")
    make_plate(root, "plate-003", b"", filename="empty.jpg")
    for source in root.glob("plates_structured/*/source/*"):  # scans made an hour ago, as most are
        os.utime(source, (time.time() - 3600, time.time() - 3600))
    run(root)
    before = snapshot(root)
    state, table = run(root)
    # Known failures (the same bytes failed the same way before) do not fail the run again.
    assert state.is_completed() and table["plate-002"]["status"] == "failed"
    assert "2 failed (0 new, 2 known)" in state.message and "Known failures" in state.message
    assert snapshot(root) == before


@pytest.mark.usefixtures("prefect_harness")
def test_damaged_cache_entries_are_recomputed_and_the_log_names_them(corpus, tiny_env, caplog):
    caplog.set_level(logging.WARNING)
    state, table = run(corpus, models=["tiny_dinov2"], gpu_class="CPU")
    assert state.is_completed(), state.message
    vectors = sorted((corpus / ".plateflow" / "embeddings" / "tiny_dinov2").glob("*.npy"))
    results = sorted((corpus / ".plateflow" / "results").iterdir())
    assert len(vectors) == 3 and len(results) == 3
    vectors[0].write_bytes(vectors[0].read_bytes()[:100])  # truncated
    vectors[1].write_bytes(b"\x93NUMPY garbage" * 20)
    np.save(vectors[2], np.ones((3, 32), np.float32))  # another shape
    results[0].write_bytes(b"{not a result")
    # A result is read when an output is missing: this plate's must come from a recomputation.
    [damaged] = [d for d in (corpus / "plates_structured").iterdir()
                 if json.loads((d / "input_image.json").read_text())["sha256"] in results[0].name]
    (damaged / "input_color_histograms.json").unlink()
    state, table = run(corpus, models=["tiny_dinov2"], gpu_class="CPU")
    assert state.is_completed(), state.message
    assert "characterization: 1 computed, 2 cached" in state.message
    assert "embeddings: 3 computed, 0 cached" in state.message
    for path in vectors + results[:1]:
        assert str(path) in caplog.text
    assert "recomputed" in caplog.text
    # And what was recomputed is whole again: the next run trusts it.
    caplog.clear()
    state, table = run(corpus, models=["tiny_dinov2"], gpu_class="CPU")
    assert "embeddings: 0 computed, 3 cached" in state.message and "damaged" not in caplog.text
    for path in vectors:
        assert np.load(path).shape == (16, 32)


@pytest.mark.usefixtures("prefect_harness")
def test_plates_sort_naturally_in_the_table_and_the_status(tmp_path):
    for name in ("plate-1000", "plate-101", "plate-2", "plate-10"):
        make_plate(tmp_path, name, b"", filename="empty.jpg")  # failing: listed by status
    state = refresh_corpus(str(tmp_path), return_state=True)
    order = ["plate-2", "plate-10", "plate-101", "plate-1000"]
    assert pq.read_table(tmp_path / "plates.parquet").column("plate_dir").to_pylist() == order
    assert state.message.index("plate-2,") < state.message.index("plate-10,") < state.message.index("plate-1000")
    out = runner.invoke(app, ["status", "--root", str(tmp_path)], terminal_width=300).output
    assert [out.index(f"{name} ") for name in order] == sorted(out.index(f"{name} ") for name in order)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs (as root, as CI runs), unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"this test needs to mount a small tmpfs (as root): {done.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as fh:  # unbuffered: nothing left to flush (and fail) at close
        try:
            while True:
                fh.write(b"\0" * 65536)
        except OSError:
            pass
    return filler


@pytest.mark.usefixtures("prefect_harness")
def test_a_full_disk_names_the_path_and_never_reports_the_old_table_as_this_run(small_disk):
    root = small_disk / "corpus"
    for i in range(3):
        make_plate(root, f"plate-{i + 1:03d}", paper_plate(seed=i))
    first = runner.invoke(app, ["refresh", "--root", str(root), "--no-viz"], terminal_width=400)
    assert first.exit_code == 0, first.output
    old_table = (root / "plates.parquet").read_bytes()
    make_plate(root, "plate-004", paper_plate(seed=7))
    filler = fill(small_disk)
    result = runner.invoke(app, ["refresh", "--root", str(root), "--no-viz"], terminal_width=400)
    assert result.exit_code == 1, result.output
    assert "No space left on device" in result.output
    assert "could not write the corpus table: [Errno 28]" in result.output
    assert f"No space left on device: '{root / 'plates.parquet'}'" in result.output
    assert "This run: 3 of 4 plates ok, 1 failed (1 new, 0 known): plate-004" in result.output
    assert "was not written by this run" in result.output and "4 plates:" not in result.output
    assert "3 plates: 3 ok" not in result.output  # the old table's counts are not shown as this run's
    assert (root / "plates.parquet").read_bytes() == old_table  # nothing corrupted
    assert not [p for p in root.rglob("*.tmp")]
    filler.unlink()
    again = runner.invoke(app, ["refresh", "--root", str(root), "--no-viz"], terminal_width=400)
    assert again.exit_code == 0, again.output
    assert "4 plates: 4 ok, 0 failed" in again.output


def test_a_feature_store_on_a_full_disk_is_an_error_with_no_temp_file_never_a_signal(small_disk):
    """A store larger than the disk's room: written through plain writes, so the full disk is
    an OSError naming the file (through a memory map it would be SIGBUS, killing the process)."""
    import numpy as np

    from plateflow.features import write_store

    folder = small_disk / "corpus" / "features" / "m"
    vectors = [np.ones((16, 768), np.float32) for _ in range(400)]  # 9.8 MB of float16 on a 4 MB disk
    rows = [{"plate_dir": f"plate-{i:03d}", "plate_id": f"p{i}", "sha256": "a" * 64} for i in range(400)]
    with pytest.raises(OSError, match="No space left on device"):
        write_store(folder, rows, vectors, {"model": "m", "dim": 768, "kind": "plates", "embedding_key": "k"})
    assert [p.name for p in folder.iterdir()] == []  # no temp file, no half store


@pytest.mark.usefixtures("prefect_harness")
def test_tiles_to_a_full_disk_fail_in_one_message_with_no_temp_file_left(small_disk, tmp_path):
    import numpy as np
    from PIL import Image

    from flows.tiles import make_tiles
    from plateflow.tiles import TileParams

    root = tmp_path / "corpus"
    noise = np.random.default_rng(0).integers(0, 256, (1280, 1536, 3), dtype=np.uint8)  # PNG cannot shrink it
    make_plate(root, "plate-001", Image.fromarray(noise), filename="scan.png")
    dest = small_disk / "tiles"
    state = make_tiles(str(root), TileParams(width=256, height=256, png_compress_level=0), str(dest),
                       return_state=True)
    assert state.is_failed() and f"could not write to {dest}" in state.message
    assert "No space left on device" in state.message and "the cut tiles are kept" in state.message
    assert not [p for p in dest.rglob("*") if p.name.endswith(".tmp")]
