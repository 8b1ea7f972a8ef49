"""Ingest: bad files are skipped with their reason, never block, never leave the corpus."""

import os
import socket
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from app.cli import app
from plateflow.corpus import PlateRef, discover_plates
from plateflow.ingest import ingest

from fixtures.plates import make_plate, paper_plate

runner = CliRunner()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width``x``height`` pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def skimage_tiff() -> Path:
    import skimage.data

    return Path(skimage.data.__file__).parent / "multipage_rgb.tif"


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

    from plateflow.image import decode_image

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


def test_the_ingest_event_lists_the_new_plates_unless_a_flow_run_parameter_cannot_hold_them(tmp_path):
    import json

    from plateflow.events import MAX_LISTED_BYTES, plates_ingested

    few = plates_ingested(tmp_path, ["plate-001", "plate-002"])
    assert few.payload == {"root": str(tmp_path.resolve()), "plates": ["plate-001", "plate-002"], "added": 2}
    many = [f"plate-{i:06d}" for i in range(MAX_LISTED_BYTES // 10)]
    assert len(json.dumps(many)) > MAX_LISTED_BYTES
    event = plates_ingested(tmp_path, many)
    assert event.payload["plates"] is None and event.payload["added"] == len(many)
    assert len(event.model_dump_json()) < 1024  # the server takes events up to 1.5 MB
