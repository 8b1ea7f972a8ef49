"""The corpus report and the artifacts a refresh publishes."""

import json
import re

import numpy as np
import pytest

from flows.refresh import refresh_corpus
from plateflow.config import RefreshConfig
from plateflow.artifacts import artifact_key
from tasks.report import near_duplicates, outliers

from conftest import make_plate, paper_plate


def test_near_duplicates_and_outliers_from_whole_plate_vectors():
    rng = np.random.default_rng(0)
    base = rng.normal(size=16)
    vecs = np.stack([base + rng.normal(scale=0.3, size=16) for _ in range(8)])
    vecs[3] = vecs[1] + 1e-4          # a near-copy of plate 1
    vecs[6] = -base                   # unlike every other plate
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = [f"p{i}" for i in range(8)]
    pairs = near_duplicates(ids, vecs, 0.999)
    assert [(a, b) for a, b, _ in pairs] == [("p1", "p3")] and pairs[0][2] > 0.999
    assert [p for p, _ in outliers(ids, vecs, 2.0)] == ["p6"]


@pytest.mark.usefixtures("prefect_harness")
def test_refresh_writes_the_report_and_publishes_progress_table_and_summary(corpus, tiny_env):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    make_plate(corpus, "plate-004", b"\x89PNG\r\n\x1a\n broken")
    make_plate(corpus, "plate-005", paper_plate(seed=0, photo_colour=(0, 90, 160)))  # = plate-001's pixels
    state = refresh_corpus(str(corpus), RefreshConfig(models=["tiny_dinov2"], gpu_class="CPU"), return_state=True)
    assert state.is_failed() and "plate-004" in state.message

    page = (corpus / "reports" / "index.html").read_text()
    assert page.count("<svg") == 4  # megapixels, luminance x entropy, background ratio, flags
    assert len(re.findall(r'<figure class="plate ok">', page)) == 4 and 'class="plate failed"' in page
    assert len(re.findall(r'<div class="crop"', page)) == 4  # each embedded plate's best crop outlined
    assert "../plates_structured/plate-001/viz/input_preview.png" in page
    assert "Near-duplicate pairs" in page and "<td>plate-001</td><td>plate-005</td>" in page

    def artifact(what):
        with get_client(sync_client=True) as client:
            found = client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[artifact_key(corpus, what)])))
        return sorted(found, key=lambda a: a.created)[-1]

    assert artifact("progress").data == pytest.approx(100.0)
    table = artifact("plates").data
    table = json.loads(table) if isinstance(table, str) else table
    rows = {r["plate"]: r for r in table}
    assert rows["plate-004"]["status"] == "failed"
    assert rows["plate-004"]["error"] and rows["plate-002"]["best crop similarity"] is not None
    summary = artifact("summary").data
    assert "4 of 5 plates done" in summary and "plate-004" in summary and "reports/index.html" in summary
    assert "| characterisation |" in summary and "| smart crop |" in summary
