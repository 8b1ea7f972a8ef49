import json
import os

import pytest

from plateflow.corpus import PlateProblem, PlateRef, discover_plates, read_manifest
from plateflow.hashindex import sha256_file
from plateflow.ingest import ingest
from plateflow.errors import DuplicatePlateError, ManifestError, UnsafePathError

from fixtures.plates import make_plate, paper_plate


def test_notebook_manifest_with_extra_keys_is_read_as_is(tmp_path):
    d = make_plate(tmp_path, "plate-007", paper_plate(), manifest={
        "plate_id": "plate-007", "source_image": "source/scan.jpg", "collection": "Herbarium", "page": 12})
    ref = read_manifest(d)
    assert ref.plate_id == "plate-007" and ref.source_path == (d / "source" / "scan.jpg").resolve()
    assert ref.manifest["collection"] == "Herbarium"


@pytest.mark.parametrize(
    "manifest, error, message",
    [
        (False, ManifestError, "missing manifest.json"),
        ("{not json", ManifestError, "not valid JSON"),
        ("[1, 2]", ManifestError, "must hold a JSON object"),
        ({"source_image": "source/scan.jpg"}, ManifestError, "non-empty string 'plate_id'"),
        ({"plate_id": "p"}, ManifestError, "needs a string 'source_image'"),
        ({"plate_id": "p", "source_image": "source/nope.jpg"}, ManifestError, "does not exist"),
        ({"plate_id": "p", "source_image": "../../outside.png"}, UnsafePathError, "outside the plate folder"),
        ({"plate_id": "p", "source_image": "/etc/passwd"}, UnsafePathError, "outside the plate folder"),
    ],
    ids=["missing", "malformed", "not-object", "no-id", "no-source", "absent-file", "dotdot", "absolute"],
)
def test_bad_manifests_say_what_is_wrong(tmp_path, manifest, error, message):
    (tmp_path / "outside.png").write_bytes(b"secret")
    d = make_plate(tmp_path / "root", "plate-001", paper_plate(), manifest=manifest)
    with pytest.raises(error, match=message):
        read_manifest(d)


def test_symlink_leaving_the_plate_folder_is_refused(tmp_path):
    secret = tmp_path / "secret.png"
    paper_plate().save(secret)
    d = make_plate(tmp_path / "root", "plate-001", None, filename="link.png")
    os.symlink(secret, d / "source" / "link.png")
    with pytest.raises(UnsafePathError):
        read_manifest(d)


def test_duplicate_plate_ids_fail_every_claimant(tmp_path):
    make_plate(tmp_path, "plate-001", paper_plate(), manifest={"plate_id": "A", "source_image": "source/scan.jpg"})
    make_plate(tmp_path, "plate-002", paper_plate(), manifest={"plate_id": "A", "source_image": "source/scan.jpg"})
    make_plate(tmp_path, "plate-003", paper_plate())
    found = discover_plates(tmp_path)
    assert [type(f) for f in found] == [PlateProblem, PlateProblem, PlateRef]
    assert isinstance(found[0].error, DuplicatePlateError) and "plate-002" in str(found[0].error)


def test_ingest_copies_into_the_layout_and_never_touches_sources(tmp_path):
    src = tmp_path / "scans"
    (src / "box1").mkdir(parents=True)
    paper_plate(seed=1).save(src / "a.jpg")
    paper_plate(seed=2).save(src / "box1" / "b.tif")
    (src / "box1" / "notes.txt").write_text("not an image")
    before = {p: (sha256_file(p), p.stat().st_mtime_ns) for p in src.rglob("*") if p.is_file()}
    root = tmp_path / "corpus"
    report = ingest([src], root)
    assert [pid for _, pid in report.added] == ["plate-001", "plate-002"]
    assert [(p.name, r) for p, r in report.skipped] == [("notes.txt", "not an image, or a corrupt one: no decoder recognises the contents of notes.txt")]
    after = {p: (sha256_file(p), p.stat().st_mtime_ns) for p in src.rglob("*") if p.is_file()}
    assert before == after
    manifest = json.loads((root / "plates_structured" / "plate-002" / "manifest.json").read_text())
    assert manifest["plate_id"] == "plate-002" and manifest["source_image"] == "source/b.tif"
    assert sha256_file(root / "plates_structured" / "plate-002" / "source" / "b.tif") == before[src / "box1" / "b.tif"][0]
    # Same bytes again, even under another name: nothing added.
    (tmp_path / "copy.jpg").write_bytes((src / "a.jpg").read_bytes())
    again = ingest([src, tmp_path / "copy.jpg"], root)
    assert again.added == []
    assert sum("already ingested as plate-001" in r for _, r in again.skipped) == 2
    assert not [p for p in (root / "plates_structured").iterdir() if p.name.startswith(".")]


def test_ingest_continues_numbering_of_a_notebook_corpus(tmp_path):
    make_plate(tmp_path, "plate-041", paper_plate(seed=5))
    src = tmp_path / "new.png"
    paper_plate(seed=6).save(src)
    assert ingest([src], tmp_path).added == [(src, "plate-042")]
