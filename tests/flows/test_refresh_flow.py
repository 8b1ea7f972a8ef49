import io
import json
import re
import shutil
import time

import pyarrow.parquet as pq
import pytest
from PIL import Image

from flows.refresh import refresh_corpus
from plateflow.config import CharacterizeParams, RefreshConfig

from fixtures import subflow_runs
from fixtures.plates import copy_corpus, make_plate, paper_plate, read_image
from fixtures.processes import wait_until

pytestmark = pytest.mark.usefixtures("prefect_harness")


def run(root, **params):
    state = refresh_corpus(str(root), RefreshConfig(characterize=CharacterizeParams(**params)), return_state=True)
    table = {r["plate_dir"]: r for r in pq.read_table(root / "plates.parquet").to_pylist()}
    return state, table


def statuses(table):
    return {k: r["characterize_status"] for k, r in table.items()}


def test_refresh_writes_the_notebook_outputs(corpus):
    state, table = run(corpus)
    assert state.is_completed(), state.message
    assert set(statuses(table).values()) == {"computed"}
    d = corpus / "plates_structured" / "plate-002"
    meta = json.loads((d / "input_image.json").read_text())
    assert meta["plate_id"] == "plate-002" and meta["loadable"] is True
    assert meta["path"] == "plates_structured/plate-002/source/scan.jpg"
    assert meta["image_format"] == "JPEG" and (meta["width"], meta["height"]) == (320, 240)
    hist = json.loads((d / "input_color_histograms.json").read_text())
    assert sum(hist["rgb_hist_full"]["r"]) == 320 * 240
    assert 0.5 < hist["background_ratio"] < 0.9
    for name in ("input_preview.png", "histogram_rgb.png", "histogram_rgb_foreground.png", "histogram_luminance.png"):
        assert read_image(d / "viz" / name).format == "PNG"
    assert max(read_image(d / "viz" / "input_preview.png").size) <= 512
    assert table["plate-002"]["width"] == 320 and table["plate-002"]["status"] == "ok"
    schema = pq.read_schema(corpus / "plates.parquet")
    assert str(schema.field("width").type) == "int32" and str(schema.field("grayscale_like").type) == "bool"


def test_second_refresh_of_unchanged_corpus_recomputes_nothing(corpus):
    run(corpus)
    before = {p: p.stat().st_mtime_ns for p in corpus.rglob("*") if p.is_file() and ".plateflow" not in p.parts}
    state, table = run(corpus)
    assert state.is_completed() and "0 computed, 3 cached" in state.message
    assert "plates.parquet (unchanged)" in state.message
    assert set(statuses(table).values()) == {"computed"}  # each row as the run that made it left it
    after = {p: p.stat().st_mtime_ns for p in corpus.rglob("*") if p.is_file() and ".plateflow" not in p.parts}
    assert before == after  # no output rewritten, nor the table or the report


def test_changed_image_recomputes_only_its_plate(corpus):
    _, first = run(corpus)
    paper_plate(seed=99, photo_colour=(200, 10, 10)).save(
        corpus / "plates_structured" / "plate-002" / "source" / "scan.jpg")
    state, table = run(corpus)
    assert "1 computed, 2 cached" in state.message
    assert table["plate-001"] == first["plate-001"] and table["plate-003"] == first["plate-003"]  # rows as they were
    assert table["plate-002"]["sha256"] != first["plate-002"]["sha256"]
    meta = json.loads((corpus / "plates_structured" / "plate-002" / "input_image.json").read_text())
    assert meta["mean_rgb"][0] > meta["mean_rgb"][2]  # now the red plate


def test_deleted_output_is_regenerated_from_the_cache(corpus):
    run(corpus)
    d = corpus / "plates_structured" / "plate-001"
    original = (d / "viz" / "histogram_rgb.png").read_bytes()
    (d / "viz" / "histogram_rgb.png").unlink()
    (d / "input_color_histograms.json").unlink()
    state, table = run(corpus)
    assert "0 computed, 3 cached" in state.message and "plates.parquet (unchanged)" in state.message
    assert (d / "viz" / "histogram_rgb.png").read_bytes() == original
    assert (d / "input_color_histograms.json").is_file()


def test_same_corpus_at_another_path_hits_the_cache(corpus, tmp_path):
    run(corpus)
    moved = copy_corpus(corpus, tmp_path / "elsewhere" / "corpus")
    shutil.rmtree(corpus)
    state, table = run(moved)
    assert state.is_completed() and "0 computed, 3 cached" in state.message


def test_changed_parameters_recompute(corpus):
    run(corpus)
    _, table = run(corpus, bins=64)
    assert set(statuses(table).values()) == {"computed"}
    hist = json.loads((corpus / "plates_structured" / "plate-001" / "input_color_histograms.json").read_text())
    assert hist["bins"] == 64 and len(hist["luminance_hist"]) == 64


def test_each_bad_input_fails_alone_with_its_reason(tmp_path):
    root = tmp_path / "corpus"
    make_plate(root, "plate-001", paper_plate(seed=1))
    make_plate(root, "plate-002", b"\xff\xd8\xff\xe0garbage", filename="corrupt.jpg")
    buf = io.BytesIO()
    paper_plate(400, 300).save(buf, "JPEG")
    make_plate(root, "plate-003", buf.getvalue()[:1500], filename="truncated.jpg")
    make_plate(root, "plate-004", b"", filename="empty.jpg")
    make_plate(root, "plate-005", b"just some notes", filename="notes.txt")
    make_plate(root, "plate-006", Image.new("RGB", (3000, 2000), "white"), filename="huge.png")
    make_plate(root, "plate-007", paper_plate(), manifest="{oops")
    make_plate(root, "plate-008", None, manifest=False)
    (tmp_path / "secret.png").write_bytes(b"not yours")
    make_plate(root, "plate-009", paper_plate(), manifest={"plate_id": "plate-009", "source_image": "../../../secret.png"})
    make_plate(root, "plate-010", paper_plate(seed=3), manifest={"plate_id": "dup", "source_image": "source/scan.jpg"})
    make_plate(root, "plate-011", paper_plate(seed=4), manifest={"plate_id": "dup", "source_image": "source/scan.jpg"})
    make_plate(root, "plate-012", paper_plate(seed=2))

    state, table = run(root, max_pixels=5_000_000)
    assert state.is_failed()
    assert "2 of 12 plates ok" in state.message and "10 failed" in state.message
    expected = {
        "plate-002": ("characterize", "corrupt or truncated image header"),
        "plate-003": ("characterize", "truncated"),
        "plate-004": ("characterize", "empty file"),
        "plate-005": ("characterize", "not an image"),
        "plate-006": ("characterize", "6.0 MP exceeds the limit"),
        "plate-007": ("manifest", "not valid JSON"),
        "plate-008": ("manifest", "missing manifest.json"),
        "plate-009": ("manifest", "outside the plate folder"),
        "plate-010": ("manifest", "also used by plate-011"),
        "plate-011": ("manifest", "also used by plate-010"),
    }
    for folder, (step, message) in expected.items():
        row = table[folder]
        assert row["status"] == "failed" and row["failed_step"] == step, row
        assert message in row["error"], row["error"]
        assert folder in state.message
    for folder in ("plate-001", "plate-012"):
        assert table[folder]["status"] == "ok"
        assert (root / "plates_structured" / folder / "viz" / "input_preview.png").is_file()
    assert f"plate-002: {table['plate-002']['error']}" in state.message  # each plate with its own reason
    unloadable = json.loads((root / "plates_structured" / "plate-003" / "input_image.json").read_text())
    assert unloadable["loadable"] is False and "truncated" in unloadable["error"]
    assert not (root / "plates_structured" / "plate-009" / "input_image.json").exists()


def test_bad_input_is_not_retried_but_io_errors_are():
    from prefect.states import Failed

    from plateflow.caching import retry_transient
    from plateflow.errors import ImageDecodeError

    assert retry_transient(None, None, Failed(data=ImageDecodeError("corrupt"))) is False
    assert retry_transient(None, None, Failed(data=OSError("NFS hiccup"))) is True


def test_existing_corpus_table_columns_are_kept(corpus):
    import pyarrow as pa

    pq.write_table(pa.table({"plate_id": ["plate-001", "plate-002"], "curator_note": ["faded", None]}),
                   corpus / "plates.parquet")
    _, table = run(corpus)
    assert table["plate-001"]["curator_note"] == "faded" and table["plate-003"]["curator_note"] is None


def test_retry_failed_plates_reruns_only_the_failed_ones(corpus):
    from flows.retry import retry_failed_plates

    scan = corpus / "plates_structured" / "plate-002" / "source" / "scan.jpg"
    good = scan.read_bytes()
    scan.write_bytes(good[:200])
    state, before = run(corpus)
    assert state.is_failed() and before["plate-002"]["status"] == "failed"
    untouched = corpus / "plates_structured" / "plate-001" / "input_image.json"
    mtime = untouched.stat().st_mtime_ns

    scan.write_bytes(good)  # the user fixes the file
    state = retry_failed_plates(str(corpus), return_state=True)
    assert state.is_completed(), state.message
    assert "1 of 1 plate ok" in state.message  # only the failed plate was in the run
    # The refresh found them itself: a list of 10^4 names passes the server's limit on parameters.
    [refresh] = subflow_runs(state)
    assert refresh.parameters["failed_only"] is True and refresh.parameters.get("plates") is None
    after = {r["plate_dir"]: r for r in pq.read_table(corpus / "plates.parquet").to_pylist()}
    assert set(after) == {"plate-001", "plate-002", "plate-003"}
    assert after["plate-002"]["status"] == "ok" and after["plate-002"]["characterize_status"] == "computed"
    assert after["plate-001"] == before["plate-001"]  # row kept as it was, timestamp included
    assert untouched.stat().st_mtime_ns == mtime

    state = retry_failed_plates(str(corpus), return_state=True)
    assert state.is_completed() and state.message == "no failed plates"


def test_plates_that_failed_alike_share_one_line_of_the_run_message():
    from flows.refresh import _failures

    failed = [{"plate_dir": "plate-001", "error": "ModelUnavailableError: no weights"},
              {"plate_dir": "plate-002", "error": "ImageDecodeError: empty file"},
              {"plate_dir": "plate-003", "error": "ModelUnavailableError: no weights"}]
    assert _failures(failed) == ("plate-001, plate-003: ModelUnavailableError: no weights; "
                                 "plate-002: ImageDecodeError: empty file")


def test_a_refresh_waits_while_another_refresh_holds_the_corpus(corpus, caplog):
    """A scheduled refresh and one started by an ingest event may overlap: each writes the
    whole corpus table, so the second starts only when the first lets go of the corpus."""
    import contextvars
    import logging
    import threading

    from plateflow.corpus import corpus_lock

    caplog.set_level(logging.WARNING)
    states, spans = [], []

    def second_refresh():
        start = time.perf_counter()
        states.append(refresh_corpus(str(corpus), return_state=True))
        spans.append(time.perf_counter() - start)

    refresh = threading.Thread(target=contextvars.copy_context().run, args=(second_refresh,))
    with corpus_lock(corpus, "flow run nightly (test) on this host"):
        refresh.start()
        wait_until(lambda: "another refresh holds this corpus (flow run nightly (test) on this host)" in caplog.text,
                   60, "the second refresh to wait", every=0.2)
        time.sleep(3)
        assert not (corpus / "plates.parquet").exists() and refresh.is_alive()  # nothing done meanwhile
    refresh.join(120)
    assert states and states[0].is_completed(), states
    assert len(pq.read_table(corpus / "plates.parquet")) == 3
    assert (corpus / ".plateflow" / "refresh.lock").read_text() == ""  # let go: nobody holds it
    # The run's summary shows the wait as its own step, and times the work without it.
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    from plateflow.artifacts import artifact_key

    with get_client(sync_client=True) as client:  # this run's summary: other tests' corpora share the key
        [summary] = [a.data for a in client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[artifact_key(corpus, "summary")]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[states[0].state_details.flow_run_id])))]
    waited = float(re.search(r"\| waiting for the corpus \| ([\d.]+) \|", summary).group(1))
    worked = float(re.search(r" in ([\d.]+) s;", states[0].message).group(1))
    assert waited >= 3 and waited + worked <= spans[0] + 0.5  # the wait is not counted twice


def test_the_corpus_lock_names_its_holder_to_whoever_waits(tmp_path):
    import threading

    from plateflow.corpus import corpus_lock

    lock_file = tmp_path / ".plateflow" / "refresh.lock"
    waited, order = [], []

    def second():
        with corpus_lock(tmp_path, "second", on_wait=waited.append):
            order.append(("second", lock_file.read_text()))

    with corpus_lock(tmp_path, "first"):
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.5)
        order.append(("first done", lock_file.read_text()))
    thread.join(10)
    assert waited == ["first"] and order == [("first done", "first"), ("second", "second")]
    assert lock_file.read_text() == ""
