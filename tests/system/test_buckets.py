"""Buckets through fsspec (plateflow/buckets.py): ingest from, and tiles to, a real S3 API
(moto in server mode on 127.0.0.1, reached through s3fs)."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from app.cli import app
from flows.tiles import make_tiles
from plateflow.corpus import discover_plates
from plateflow.ingest import ingest
from plateflow.tiles import TileParams

from fixtures import REPO
from fixtures.plates import make_plate, paper_plate
from fixtures.processes import wait_until

runner = CliRunner()


def png(seed: int, size=(24, 16)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", compress_level=0)
    return buf.getvalue()


def bucket(fs) -> str:
    name = f"plates-{uuid.uuid4().hex[:12]}"
    fs.mkdir(name)
    return name


def objects(fs, prefix: str) -> dict[str, str]:
    """Every object under the prefix with its ETag (what changes when an object is rewritten)."""
    fs.invalidate_cache()
    return {p: info["ETag"] for p, info in fs.find(prefix, detail=True).items()}


def test_ingest_lists_thousands_of_keys_dedupes_and_never_changes_the_bucket(s3, tmp_path):
    name = bucket(s3)
    data = {f"{name}/scans/box-{i // 500}/plate {i}.png": png(i) for i in range(2400)}
    data[f"{name}/scans/box-9/planche é 日本 (copie).png"] = png(7)  # the same bytes as plate 7
    data[f"{name}/scans/box-9/planche é 日本.png"] = png(99_999)
    data[f"{name}/scans/notes.txt"] = b"inventory, not an image"
    data[f"{name}/scans/.DS_Store/x.png"] = png(5)  # hidden: left out
    s3.pipe(data)
    before = objects(s3, name)
    root = tmp_path / "corpus"

    report = ingest([f"s3://{name}/scans"], root)

    assert len(report.added) == 2401
    assert report.added[0] == (f"s3://{name}/scans/box-0/plate 0.png", "plate-001")
    assert report.added[10] == (f"s3://{name}/scans/box-0/plate 10.png", "plate-011")  # natural order
    unicode_key = f"s3://{name}/scans/box-9/planche é 日本.png"
    plate_id = dict(report.added)[unicode_key]
    skipped = dict(report.skipped)
    assert skipped[f"s3://{name}/scans/box-9/planche é 日本 (copie).png"] == "same bytes already ingested as plate-008"
    assert "not an image" in skipped[f"s3://{name}/scans/notes.txt"]
    assert not any(".DS_Store" in str(s) for s, _ in report.added + report.skipped)
    # the plate holds the object's bytes under its own name, and the manifest says where it came from
    manifest = json.loads((root / "plates_structured" / plate_id / "manifest.json").read_text("utf-8"))
    assert manifest["original_path"] == unicode_key and manifest["source_image"] == "source/planche é 日本.png"
    assert (root / "plates_structured" / plate_id / "source" / "planche é 日本.png").read_bytes() == png(99_999)
    assert len([p for p in discover_plates(root) if not hasattr(p, "error")]) == 2401
    assert objects(s3, name) == before  # nothing in the bucket was deleted or changed
    # again: everything is already there, the bucket is only read
    again = ingest([f"s3://{name}/scans/box-9/"], root)
    assert again.added == [] and all("already ingested" in r for _, r in again.skipped)


def test_an_object_deleted_between_listing_and_reading_fails_alone(s3, tmp_path):
    name = bucket(s3)
    s3.pipe({f"{name}/p{i:02d}.png": png(i) for i in range(12)})
    doomed = f"{name}/p10.png"

    def progress(shown):  # the listing is complete before the first object is read
        if shown.endswith("p00.png"):
            s3.rm_file(doomed)

    report = ingest([f"s3://{name}"], tmp_path / "corpus", progress=progress)
    assert report.skipped == [(f"s3://{doomed}", "disappeared between listing and reading")]
    assert len(report.added) == 11


def test_a_missing_bucket_is_reported_and_the_other_sources_go_on(s3, tmp_path):
    src = tmp_path / "local.png"
    src.write_bytes(png(1))
    result = runner.invoke(app, ["ingest", "s3://no-such-bucket-here/scans", str(src),
                                 "--root", str(tmp_path / "corpus")], terminal_width=300)
    assert result.exit_code == 0, result.output
    assert "skipped s3://no-such-bucket-here/scans: cannot be listed" in result.output
    assert "added plate-001 <- " in result.output and "Traceback" not in result.output


@pytest.mark.usefixtures("prefect_harness")
def test_credentials_come_from_a_prefect_block_and_never_reach_the_logs(s3, s3_server, tmp_path, monkeypatch, caplog):
    from prefect_aws import AwsClientParameters, AwsCredentials, S3Bucket

    name = bucket(s3)
    s3.pipe({f"{name}/in/a.png": png(1)})
    block = f"plateflow-{uuid.uuid4().hex[:8]}"
    creds = AwsCredentials(aws_access_key_id="plateflow-test", aws_secret_access_key="block-secret-9f2c",
                           region_name="us-east-1", aws_client_parameters=AwsClientParameters(endpoint_url=s3_server))
    S3Bucket(bucket_name=name, credentials=creds).save(block)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var)  # nothing in the environment: the block's credentials or nothing
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    root = tmp_path / "corpus"
    without = ingest([f"s3://{name}/in"], root)
    assert without.added == [] and "cannot be listed" in without.skipped[0][1]

    result = runner.invoke(app, ["ingest", f"s3://{name}/in", "--root", str(root), "--credentials-block",
                                 f"s3-bucket/{block}"], terminal_width=300)
    assert result.exit_code == 0 and "added plate-001" in result.output, result.output
    make_plate(root, "plate-002", paper_plate(64, 48, seed=3))
    state = make_tiles(str(root), TileParams(width=32, height=32), f"s3://{name}/tiles", f"s3-bucket/{block}",
                       return_state=True)
    assert state.is_completed(), state.message
    assert s3.exists(f"{name}/tiles/tiles.parquet")
    logged = result.output + caplog.text + json.dumps(state.message)
    assert "block-secret-9f2c" not in logged
    wrong = runner.invoke(app, ["ingest", f"s3://{name}/in", "--root", str(root), "--credentials-block", "nonsense"])
    assert wrong.exit_code != 0 and "<block-type>/<name>" in wrong.output


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # webdataset 1.0 leaves shards open
def test_tiles_to_a_bucket_match_tiles_to_a_folder_and_an_unchanged_rerun_uploads_nothing(s3, tmp_path):
    import webdataset as wds

    root = tmp_path / "corpus"
    for i in range(5):
        make_plate(root, f"plate-{i + 1:03d}", paper_plate(300, 200, seed=i))
    params = TileParams(width=96, height=96, mode="noise-framed", test_every=2, shard_groups=3)
    name = bucket(s3)
    assert make_tiles(str(root), params, str(tmp_path / "local"), return_state=True).is_completed()
    assert make_tiles(str(root), params, f"s3://{name}/tiles", return_state=True).is_completed()
    local = {p.name: p.read_bytes() for p in (tmp_path / "local").iterdir()}
    remote = {p.rsplit("/", 1)[-1]: s3.cat_file(p) for p in objects(s3, f"{name}/tiles")}
    assert remote == local  # the same bytes, shards and tables
    shards = sorted(p for p in local if p.endswith(".tar"))
    # webdataset reads the shards straight from the bucket (through a pipe, as its docs show)
    urls = [f"pipe:{sys.executable} -c \"import fsspec,sys; sys.stdout.buffer.write(fsspec.open('s3://{name}/tiles/{s}').open().read())\""
            for s in shards]
    keys = sorted(s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False))
    assert keys == sorted(pq.read_table(tmp_path / "local" / "tiles.parquet").column("key").to_pylist())
    before = objects(s3, f"{name}/tiles")
    assert make_tiles(str(root), params, f"s3://{name}/tiles", return_state=True).is_completed()
    assert objects(s3, f"{name}/tiles") == before  # nothing uploaded again


def _shard_ok(data: bytes) -> bool:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar.getmembers():
            body = tar.extractfile(m).read()
            if m.name.endswith(".png"):
                Image.open(io.BytesIO(body)).load()
    return True


@pytest.mark.usefixtures("prefect_harness")
def test_an_interrupted_upload_leaves_no_partial_object_and_a_rerun_finishes(s3, tmp_path):
    from prefect.settings import PREFECT_API_URL

    root = tmp_path / "corpus"
    for i in range(24):
        make_plate(root, f"plate-{i + 1:03d}", paper_plate(640, 480, seed=i))
    name = bucket(s3)
    dest = f"s3://{name}/tiles"
    # What a process killed during a multipart upload leaves: an upload begun, a part sent, never completed.
    upload = s3.call_s3("create_multipart_upload", Bucket=name, Key="tiles/train-000000.tar")
    s3.call_s3("upload_part", Bucket=name, Key="tiles/train-000000.tar", PartNumber=1,
               UploadId=upload["UploadId"], Body=b"x" * (5 * 2**20))
    assert objects(s3, name) == {}  # an unfinished upload is no object

    cmd = [str(Path(sys.executable).with_name("plateflow")), "tiles", "--root", str(root), "--size", "64x64", "--out", dest,
           "--test-every", "4", "--shard-megabytes", "0.05"]
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    log = tmp_path / "interrupted.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: any(p.endswith(".tar") for p in objects(s3, name)) or proc.poll() is not None,
                   120, "the first shard upload", every=0.02)
        os.killpg(proc.pid, signal.SIGKILL)  # in the middle of the uploads
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, log.read_text()
    interrupted = objects(s3, name)
    assert f"{name}/tiles/tiles.parquet" not in interrupted  # it did not finish
    for path in interrupted:
        if path.endswith(".tar"):
            assert _shard_ok(s3.cat_file(path))  # every shard that is visible is whole

    finished = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=300)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "Traceback" not in finished.stdout + finished.stderr
    s3.invalidate_cache()
    uploads = s3.call_s3("list_multipart_uploads", Bucket=name).get("Uploads", [])
    assert uploads == []  # the unfinished upload was aborted
    tiles = pq.read_table(io.BytesIO(s3.cat_file(f"{name}/tiles/tiles.parquet"))).to_pylist()
    assert len({t["plate_id"] for t in tiles}) == 24
    listed = objects(s3, name)
    for shard in {t["shard"] for t in tiles}:
        assert _shard_ok(s3.cat_file(f"{name}/tiles/{shard}"))
    assert {p.rsplit("/", 1)[-1] for p in listed if p.endswith(".tar")} == {t["shard"] for t in tiles}
    assert 0 < sum(p.endswith(".tar") for p in interrupted) < len({t["shard"] for t in tiles})  # killed mid-way


@pytest.mark.usefixtures("prefect_harness")
def test_an_unreachable_bucket_is_one_line_before_any_work(s3, tmp_path, monkeypatch):
    from fixtures.processes import free_port

    root = tmp_path / "corpus"
    make_plate(root, "plate-001", paper_plate(256, 128))
    missing = runner.invoke(app, ["tiles", "--root", str(root), "--size", "128x128", "--out", "s3://no-such-bucket/t"],
                            terminal_width=400)
    assert missing.exit_code == 2 and "Traceback" not in missing.output, missing.output
    assert "its bucket no-such-bucket cannot be reached" in missing.output
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # a dead endpoint
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    dead = runner.invoke(app, ["tiles", "--root", str(root), "--size", "128x128", "--out", "s3://any/t"],
                         terminal_width=400)
    assert dead.exit_code == 2 and "cannot be reached" in dead.output and "Traceback" not in dead.output
    assert not (root / ".plateflow" / "tiles").exists()  # nothing was cut


def test_an_s3_server_that_dies_mid_ingest_stops_it_within_a_bounded_time_saying_how_far_it_got(tmp_path, monkeypatch):
    """A moto_server of this test's own, killed after the first object is read."""
    import time
    import urllib.request

    import s3fs

    from fixtures.processes import free_port

    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def up():
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1).status == 200
            except OSError:
                return False

        wait_until(up, 60, "moto_server", every=0.2)
        for k, v in {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b", "AWS_DEFAULT_REGION": "us-east-1",
                     "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
            monkeypatch.setenv(k, v)
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("dying")
        fs.pipe({f"dying/p{i:02d}.png": png(i) for i in range(20)})
        s3fs.S3FileSystem.clear_instance_cache()

        def kill_after_first(_):
            if proc.poll() is None:
                proc.kill()
                proc.wait()

        started = time.monotonic()
        report = ingest(["s3://dying"], tmp_path / "corpus", progress=kill_after_first)
        assert time.monotonic() - started < 120
        assert report.stopped and "stopped answering" in report.stopped and "run it again" in report.stopped
        assert 1 <= len(report.added) < 20 and len(report.added) + len(report.skipped) < 20
        assert len({p for p in (tmp_path / "corpus" / "plates_structured").iterdir()}) == len(report.added)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        s3fs.S3FileSystem.clear_instance_cache()
