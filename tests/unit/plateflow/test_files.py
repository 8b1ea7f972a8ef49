"""Files on disk: the umask's mode, the corpus's bounds, temp files of dead writers."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from plateflow.atomic import write_bytes
from plateflow.corpus import PlateProblem, PlateRef, discover_plates
from plateflow.ingest import ingest
from plateflow.errors import UnsafePathError

from fixtures import REPO
from fixtures.plates import make_plate, paper_plate


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
