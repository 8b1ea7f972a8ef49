"""Names taken from data (plate ids, file names, shard state) never escape: every one becomes a
path, a URL part or an archive member through plateflow/layout.py's two sanitisers, and one bad
manifest or source path fails its own plate only."""

import json
import os
import tarfile

import pyarrow.parquet as pq
import pytest

from fixtures.plates import make_plate, paper_plate
from plateflow.layout import safe_file_name, safe_key

HOSTILE_IDS = ["../../../x", "BM.2001.34", "A" * 120, "q?x=1#h%41", "a/b", "..", "x\x00y"]


@pytest.mark.parametrize("text", HOSTILE_IDS + ["plate-001", "é" * 200])
def test_a_key_is_ascii_with_no_dot_or_separator_and_distinct_names_stay_distinct(text):
    key = safe_key(text)
    assert key and len(key) <= 80 and "." not in key and "/" not in key and "\x00" not in key
    assert all(c.isascii() and (c.isalnum() or c in "_-~") for c in key)
    assert safe_key(text) == key  # stable
    assert safe_key(text + "!") != key


def test_file_names_keep_their_extension_and_fit_a_temp_name_under_255_bytes():
    assert safe_file_name("scan 01.tif") == "scan 01.tif"  # an ordinary name is kept as it is
    for name in ["b" * 250 + ".tif", "../x.png", ".hidden.png", "x\x00y.jpg", "é" * 200 + ".jpg"]:
        safe = safe_file_name(name)
        assert len(f".{safe}.abcdefgh.tmp".encode()) <= 255 and "/" not in safe and not safe.startswith(".")
        assert "\x00" not in safe and safe.endswith(os.path.splitext(name)[1])


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # webdataset 1.0 leaves shards open
@pytest.mark.usefixtures("prefect_harness")
def test_hostile_plate_ids_give_shards_that_extract_inside_and_read_as_one_sample_per_tile(tmp_path):
    import webdataset as wds

    from flows.tiles import make_tiles
    from plateflow.tiles import TileParams

    root = tmp_path / "work" / "corpus"
    ids = [i for i in HOSTILE_IDS if "\x00" not in i]
    for n, plate_id in enumerate(ids):
        make_plate(root, f"plate-{n + 1:03d}", paper_plate(256, 128, seed=n),
                   manifest={"plate_id": plate_id, "source_image": "source/scan.jpg"})
    dest = tmp_path / "work" / "tiles"
    state = make_tiles(str(root), TileParams(width=128, height=128, test_every=1000), str(dest), return_state=True)
    assert state.is_completed(), state.message
    shards = sorted(dest.glob("*.tar"))
    out = tmp_path / "work" / "extracted"
    out.mkdir()
    before = {p for p in tmp_path.rglob("*") if not p.is_relative_to(out)}
    for shard in shards:
        with tarfile.open(shard) as tar:  # as a user would, with no filter: ".." would escape
            names = tar.getnames()
            assert all("/" not in n and not n.startswith(".") for n in names)
            tar.extractall(out)  # noqa: S202 - the test: nothing may land outside ``out``
    assert {p for p in tmp_path.rglob("*") if not p.is_relative_to(out)} == before
    samples = list(wds.WebDataset([str(p) for p in shards], shardshuffle=False))
    tiles = pq.read_table(dest / "tiles.parquet").to_pylist()
    assert len(samples) == len(tiles) == 2 * len(ids)
    assert all({"png", "json"} <= set(s) for s in samples)
    assert sorted(s["__key__"] for s in samples) == sorted(t["key"] for t in tiles)
    assert {json.loads(s["json"])["plate_id"] for s in samples} == set(ids)  # the originals are kept
    assert {t["plate_id"] for t in tiles} == set(ids)


@pytest.mark.usefixtures("prefect_harness")
def test_a_tampered_shard_state_never_makes_tiles_touch_a_file_outside_dest(tmp_path, caplog):
    from flows.tiles import make_tiles
    from plateflow.tiles import TileParams

    root = tmp_path / "corpus"
    make_plate(root, "plate-001", paper_plate(256, 128))
    dest = tmp_path / "dest"
    params = TileParams(width=128, height=128)
    assert make_tiles(str(root), params, str(dest), return_state=True).is_completed()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    state = json.loads((dest / ".shards.json").read_text())
    state.update({"../victim.txt": ["x"], "/etc/passwd": ["y"], "train-000001.tar": "not a list"})
    (dest / ".shards.json").write_text(json.dumps(state))
    assert make_tiles(str(root), params, str(dest), return_state=True).is_completed()
    assert victim.read_text() == "keep me"
    assert "ignored 3 entries that are not make-tiles shards" in caplog.text
    assert set(json.loads((dest / ".shards.json").read_text())) == {p.name for p in dest.glob("*.tar")}


@pytest.mark.usefixtures("prefect_harness")
def test_each_bad_manifest_or_source_path_fails_its_own_plate_with_what_is_wrong(tmp_path):
    from flows.refresh import refresh_corpus

    root = tmp_path / "corpus"
    make_plate(root, "plate-001", paper_plate(seed=1))
    make_plate(root, "plate-002", paper_plate(seed=2), manifest='{"plate_id": ' + "[" * 100_000 + "]" * 100_000 + "}")
    make_plate(root, "plate-003", paper_plate(seed=3), manifest={"plate_id": "p3", "source_image": "source/a\x00b.jpg"})
    make_plate(root, "plate-004", paper_plate(seed=4), manifest={"plate_id": "p4", "source_image": "source"})
    fifo = make_plate(root, "plate-005", paper_plate(seed=5), manifest={"plate_id": "p5", "source_image": "source/pipe"})
    os.mkfifo(fifo / "source" / "pipe")
    make_plate(root, "plate-006", paper_plate(seed=6), manifest={"plate_id": "p6", "source_image": "viz/input_preview.png"})
    make_plate(root, "plate-007", paper_plate(seed=7), manifest={"plate_id": "p7", "source_image": "input_image.json"})
    make_plate(root, "plate-008", paper_plate(seed=8))
    state = refresh_corpus(str(root), return_state=True)
    rows = {r["plate_dir"]: r for r in pq.read_table(root / "plates.parquet").to_pylist()}
    assert rows["plate-001"]["status"] == rows["plate-008"]["status"] == "ok"  # the good plates are done
    expected = {"plate-002": "nested too deep", "plate-003": "holds a NUL byte", "plate-004": "is a folder, not a file",
                "plate-005": "is a FIFO (named pipe), not a file", "plate-006": "in viz/, which plateflow writes",
                "plate-007": "input_image.json, which plateflow writes"}
    for plate, why in expected.items():
        assert rows[plate]["status"] == "failed" and rows[plate]["failed_step"] == "manifest", plate
        assert why in rows[plate]["error"], (plate, rows[plate]["error"])
    assert state.is_failed() and "6 failed (6 new, 0 known)" in state.message
    assert (root / "plates_structured" / "plate-006" / "source" / "scan.jpg").is_file()


def test_ingest_copies_a_long_name_safely_and_never_ingests_its_own_corpus(tmp_path):
    from plateflow.ingest import ingest

    scans = tmp_path / "scans"
    scans.mkdir()
    long_name = "b" * 250 + ".png"
    paper_plate(seed=1).save(scans / long_name)
    paper_plate(seed=2).save(scans / "zz-after.png")
    root = scans / "corpus"
    first = ingest([scans], root)
    assert [p for _, p in first.added] == ["plate-001", "plate-002"]
    manifest = json.loads((root / "plates_structured" / "plate-001" / "manifest.json").read_text())
    assert manifest["original_path"].endswith(long_name)  # the original name is kept
    assert (root / "plates_structured" / "plate-001" / manifest["source_image"]).is_file()
    (root / "plates_structured" / "plate-001" / "viz").mkdir()
    paper_plate(seed=3).save(root / "plates_structured" / "plate-001" / "viz" / "input_preview.png")
    again = ingest([scans], root)
    assert again.added == []
    assert any(str(p) == str(root) and "the corpus being ingested into" in why for p, why in again.skipped)


@pytest.mark.usefixtures("prefect_harness")
def test_the_report_server_serves_only_plateflows_own_files_answers_bad_urls_and_escapes_links(tmp_path):
    import http.client
    import re
    import urllib.parse
    import urllib.request

    from app.reports import ReportServer
    from flows.refresh import refresh_corpus

    root = tmp_path / "corpus"
    for n, folder in enumerate(["hash#1", "q?x=1", "pct%41", "plate-004"]):
        make_plate(root, folder, paper_plate(seed=n))
    assert refresh_corpus(str(root), return_state=True).is_completed()
    viz = root / "plates_structured" / "plate-004" / "viz"
    (viz / "manifest.png").symlink_to(root / "plates_structured" / "plate-004" / "manifest.json")
    (viz / "state.png").symlink_to(root / ".plateflow" / "config.json")
    (viz / "scan.png").symlink_to(root / "plates_structured" / "plate-004" / "source" / "scan.jpg")
    (root / "reports" / "leak.html").symlink_to(root / "plates_structured" / "plate-004" / "manifest.json")
    server = ReportServer([root]).start()
    try:
        base = server.report_url(root).rsplit("/reports/", 1)[0]

        def get(url: str) -> int:
            try:
                return urllib.request.urlopen(url, timeout=10).status
            except urllib.error.HTTPError as exc:
                return exc.code

        for name in ("manifest.png", "state.png", "scan.png"):
            assert get(f"{base}/plates_structured/plate-004/viz/{name}") == 404, name
        assert get(f"{base}/reports/leak.html") == 404
        assert get(f"{base}/plates_structured/plate-004/viz/input_preview.png") == 200
        host, port = server.httpd.server_address[:2]
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("GET", "/x/reports/%00index.html")
        assert conn.getresponse().status == 400
        conn.close()
        assert get(server.report_url(root)) == 200  # the server is still up
        sheet = urllib.request.urlopen(f"{base}/reports/sheet-0001.html", timeout=10).read().decode()
        thumbs = re.findall(r'<img src="([^"]+)"', sheet)
        assert len(thumbs) == 4 and all("#" not in t and "?" not in t for t in thumbs)
        for src in thumbs:  # every thumbnail loads, however odd its plate folder's name (as a browser joins it)
            assert get(urllib.parse.urljoin(f"{base}/reports/sheet-0001.html", src.replace("&amp;", "&"))) == 200, src
    finally:
        server.stop()
