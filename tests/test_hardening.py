"""Bad input, faults and escapes, tried as an attacker would: each fails only its own plate
(or file) with a message, loses nothing, and never reaches outside the corpus."""

import io
import os
import socket
import stat
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from plateflow.atomic import write_bytes
from app.cli import app
from plateflow.corpus import PlateProblem, PlateRef, discover_plates, ingest, plate_folders
from plateflow.errors import UnsafePathError

from conftest import make_plate, paper_plate

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width``x``height`` pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def skimage_tiff() -> Path:
    import skimage.data

    return Path(skimage.data.__file__).parent / "multipage_rgb.tif"


# --- Ingest -----------------------------------------------------------------------------------

def test_ingest_skips_a_decompression_bomb_with_its_reason_and_goes_on(tmp_path):
    src = tmp_path / "scans"
    src.mkdir()
    (src / "a-bomb.png").write_bytes(png_header_only(60000, 60000))
    paper_plate().save(src / "b-plate.png")
    result = runner.invoke(app, ["ingest", str(src), "--root", str(tmp_path / "corpus")], terminal_width=300)
    assert result.exit_code == 0, result.output
    assert result.exception is None and "Traceback" not in result.output
    assert "a-bomb.png: 60000x60000 = 3600.0 MP exceeds the limit of 250.0 MP" in result.output
    assert "added plate-001 <- " in result.output and "b-plate.png" in result.output
    # The limit is the refresh's, and ingest takes the same option.
    small = runner.invoke(app, ["ingest", str(src), "--root", str(tmp_path / "c2"), "--max-megapixels", "0.01"],
                          terminal_width=300)
    assert "b-plate.png: 320x240 = 0.1 MP exceeds the limit of 0.0 MP" in small.output


def test_new_plate_ids_are_unique_among_the_manifests(tmp_path):
    make_plate(tmp_path, "plate-001", paper_plate(seed=1), manifest={"plate_id": "plate-002",
                                                                      "source_image": "source/scan.jpg"})
    src = tmp_path / "new.png"
    paper_plate(seed=2).save(src)
    report = ingest([src], tmp_path)
    assert report.added == [(src, "plate-003")]
    found = discover_plates(tmp_path)
    assert all(isinstance(p, PlateRef) for p in found), found
    assert sorted(p.plate_id for p in found) == ["plate-002", "plate-003"]


def test_ingest_lists_fifos_sockets_and_symlink_loops_as_skipped_and_never_blocks(tmp_path):
    src = tmp_path / "scans"
    (src / "sub").mkdir(parents=True)
    paper_plate().save(src / "good.png")
    os.mkfifo(src / "pipe")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(src / "sock"))
    (src / "loop").symlink_to("loop")
    (src / "dangling").symlink_to("nowhere.png")
    (src / "sub" / "up").symlink_to("..")  # a folder loop
    done = {}
    worker = threading.Thread(target=lambda: done.setdefault("report", ingest([src], tmp_path / "corpus")))
    worker.start()
    worker.join(60)
    sock.close()
    assert not worker.is_alive(), "ingest blocked (on the FIFO?)"
    report = done["report"]
    assert [p.name for p, _ in report.added] == ["good.png"]
    reasons = {p.name: r for p, r in report.skipped}
    assert reasons == {
        "dangling": "broken symlink (its target does not exist)",
        "loop": "symlink loop",
        "pipe": "a FIFO (named pipe), not a regular file: not read",
        "sock": "a socket, not a regular file: not read",
        "up": "symlink loop (this folder is already being ingested)",
    }


def test_a_tiff_only_tifffile_reads_is_ingested_and_decoded_by_the_documented_rule(tmp_path):
    import tifffile

    from tasks.image import decode_image

    path = skimage_tiff()
    with pytest.raises(Exception):
        Image.open(path)  # Pillow refuses it: float, planar-separate RGB
    report = ingest([path], tmp_path / "corpus")
    assert report.skipped == [] and [pid for _, pid in report.added] == ["plate-001"]
    decoded = decode_image(path, max_pixels=10**6)
    first = tifffile.imread(path)[0]  # (3, 10, 10) floats in [0, 1]
    expected = np.rint(np.moveaxis(first, 0, -1) * 255).astype(np.uint8)
    assert decoded.image.mode == "RGB" and np.array_equal(np.asarray(decoded.image), expected)
    assert (decoded.frames, decoded.mode, decoded.bit_depth, decoded.image_format) == (2, "RGB;float64", 64, "TIFF")


def test_float_samples_outside_zero_to_one_are_clipped_to_8_bits():
    from plateflow.imagefile import float_to_uint8

    assert float_to_uint8(np.array([0.0, 0.5, 1.0])).tolist() == [0, 128, 255]
    assert float_to_uint8(np.array([-3.0, 12.4, 300.0, np.nan])).tolist() == [0, 12, 255, 0]


def test_ingest_deduplicates_on_the_current_sources_not_on_the_manifests_record(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    paper_plate(seed=1).save(a)
    paper_plate(seed=2).save(b)
    root = tmp_path / "corpus"
    assert ingest([a], root).added == [(a, "plate-001")]
    # The plate's source is replaced by other bytes; the manifest still records a's sha256.
    (root / "plates_structured" / "plate-001" / "source" / "a.png").write_bytes(b.read_bytes())
    report = ingest([a, b], root)
    assert report.added == [(a, "plate-002")]
    assert report.skipped == [(b, "same bytes already ingested as plate-001")]


# --- Files on disk ----------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_written_files_and_folders_get_the_mode_the_umask_gives(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_bytes(tmp_path / "out" / "file.json", b"{}")
        src = tmp_path / "scan.png"
        paper_plate().save(src)
        os.chmod(src, 0o600)  # a private source still gives a shared copy
        ingest([src], tmp_path / "corpus")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out" / "file.json").stat().st_mode) == 0o666 & ~umask
    plate = tmp_path / "corpus" / "plates_structured" / "plate-001"
    for path in [plate, plate / "source"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~umask, path
    for path in [plate / "manifest.json", plate / "source" / "scan.png"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    assert (plate / "source" / "scan.png").stat().st_mtime_ns == src.stat().st_mtime_ns


def test_plate_folders_and_output_folders_that_lead_outside_the_corpus_are_refused(tmp_path):
    outside = tmp_path / "outside"
    make_plate(outside, "elsewhere", paper_plate())
    make_plate(tmp_path / "corpus", "plate-001", paper_plate())
    top = tmp_path / "corpus" / "plates_structured"
    (top / "plate-002").symlink_to(outside / "plates_structured" / "elsewhere")
    d = make_plate(tmp_path / "corpus", "plate-003", paper_plate())
    (d / "viz").symlink_to(outside)
    d4 = make_plate(tmp_path / "corpus", "plate-004", paper_plate(), manifest=False)
    (d4 / "manifest.json").symlink_to(outside / "plates_structured" / "elsewhere" / "manifest.json")
    found = {p.folder: p for p in discover_plates(tmp_path / "corpus")}
    assert isinstance(found["plate-001"], PlateRef)
    for folder, words in [("plate-002", "plate folder plate-002/ is a symlink to"),
                          ("plate-003", "plate-003/viz is a symlink to"),
                          ("plate-004", "manifest.json of plate-004/ is a symlink to")]:
        assert isinstance(found[folder], PlateProblem) and isinstance(found[folder].error, UnsafePathError)
        assert words in str(found[folder].error) and "refused" in str(found[folder].error)


def test_stale_temp_files_are_removed_and_live_ones_kept(tmp_path):
    from plateflow.atomic import remove_stale_temps, temp_file

    plate = tmp_path / "plates_structured" / "plate-001"
    (plate / "source").mkdir(parents=True)
    stale = [plate / ".input_image.json.k3j_x9a2.tmp", tmp_path / ".plateflow" / ".config.json.abcdefgh.tmp"]
    for p in stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half")
    stale_dir = tmp_path / "plates_structured" / ".plate-002.zz9_0000.tmp"
    (stale_dir / "source").mkdir(parents=True)
    mine = plate / "source" / ".scan.jpg.aaaaaaaa.tmp"  # in a source folder: never touched
    mine.write_bytes(b"user's")
    other = plate / "notes.tmp"  # not plateflow's naming
    other.write_bytes(b"user's")
    with temp_file(plate / "input_color_histograms.json") as (_, live):
        removed = remove_stale_temps(tmp_path, skip=("source",))
        assert live.exists()
    assert sorted(removed) == sorted(stale + [stale_dir])
    assert not any(p.exists() for p in removed) and mine.exists() and other.exists()


def test_a_writer_killed_mid_write_leaves_a_temp_file_the_next_sweep_removes(tmp_path):
    from plateflow.atomic import remove_stale_temps

    target = tmp_path / "plates_structured" / "plate-001" / "input_image.json"
    code = ("import sys, time; from pathlib import Path; from plateflow.atomic import temp_file\n"
            "with temp_file(Path(sys.argv[1])) as (fd, tmp):\n"
            "    print(tmp, flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    tmp = Path(proc.stdout.readline().strip())
    assert tmp.exists() and remove_stale_temps(tmp_path) == []  # its writer is alive
    proc.kill()
    proc.wait()
    proc.stdout.close()
    assert tmp.exists() and remove_stale_temps(tmp_path) == [tmp] and not tmp.exists()


# --- Caches and tables ------------------------------------------------------------------------

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
    from tasks.embed.writer import load_vectors, vectors_problem

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


# --- Consistency ------------------------------------------------------------------------------

def test_a_source_changed_before_its_crop_is_cut_fails_that_plate_and_writes_nothing(tmp_path):
    import hashlib

    from plateflow.config import CropParams
    from plateflow.corpus import read_manifest
    from plateflow.errors import SourceChangedError
    from tasks.smart_crop import smart_crop_plate

    d = make_plate(tmp_path, "plate-001", paper_plate(seed=1))
    plate = read_manifest(d)
    old_sha = hashlib.sha256(plate.source_path.read_bytes()).hexdigest()
    boxes = [[0, 0, 320, 240], [80, 60, 240, 180]]
    vec = tmp_path / "v.npy"
    vec.write_bytes(_npy(np.eye(2, 8, dtype=np.float32)))
    paper_plate(seed=9, photo_colour=(0, 0, 0)).save(plate.source_path)  # replaced mid-refresh
    with pytest.raises(SourceChangedError, match="source changed during the refresh"):
        smart_crop_plate(plate, "run-1", "key", {"m": str(vec)}, boxes, "m", CropParams(), (320, 240), old_sha)
    assert not (d / "runs").exists()
    new_sha = hashlib.sha256(plate.source_path.read_bytes()).hexdigest()
    out = smart_crop_plate(plate, "run-1", "key", {"m": str(vec)}, boxes, "m", CropParams(), (320, 240), new_sha)
    assert out["crop_status"] == "computed" and (d / "runs" / "run-1" / "best_crop.jpg").is_file()


# --- Output -----------------------------------------------------------------------------------

def test_plate_folders_sort_naturally(tmp_path):
    from plateflow.layout import natural_key

    for name in ("plate-1000", "plate-101", "plate-2", "plate-10"):
        make_plate(tmp_path, name, paper_plate())
    assert [p.name for p in plate_folders(tmp_path)] == ["plate-2", "plate-10", "plate-101", "plate-1000"]
    assert sorted(["b10", "b9", "a100"], key=natural_key) == ["a100", "b9", "b10"]


def test_server_stop_ends_the_workers_before_the_server(tmp_path):
    from app.server import Stack

    log = tmp_path / "order.log"

    def spawn(name: str, linger: float) -> subprocess.Popen:
        script = (f"trap 'sleep {linger}; echo {name} >> {log}; exit 0' TERM; "
                  f"echo ready > {tmp_path / name}; while :; do sleep 0.05; done")
        return subprocess.Popen(["bash", "-c", script], start_new_session=True)

    procs = [spawn("server", 0), spawn("worker-a", 0.5), spawn("worker-b", 0.3)]
    from conftest import wait_until

    wait_until(lambda: all((tmp_path / n).exists() for n in ("server", "worker-a", "worker-b")), 10, "ready")
    Stack(procs).stop()
    assert all(p.poll() is not None for p in procs)
    assert log.read_text().split() == ["worker-b", "worker-a", "server"]
