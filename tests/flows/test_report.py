"""The corpus report and the artifacts a refresh publishes."""

import json
import re

import numpy as np
import pytest

from flows.refresh import refresh_corpus
from plateflow.config import RefreshConfig
from plateflow.artifacts import artifact_key
from plateflow.report import near_duplicates, outliers

from PIL import Image

from fixtures import REPO
from fixtures.plates import make_plate, paper_plate


def test_near_duplicates_and_outliers_from_whole_plate_vectors():
    rng = np.random.default_rng(0)
    base = rng.normal(size=16)
    vecs = np.stack([base + rng.normal(scale=0.3, size=16) for _ in range(8)])
    vecs[3] = vecs[1] + 1e-4          # a near-copy of plate 1
    vecs[6] = -base                   # unlike every other plate
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = [f"p{i}" for i in range(8)]
    pairs, total = near_duplicates(ids, vecs, 0.999)
    assert [(a, b) for a, b, _ in pairs] == [("p1", "p3")] and pairs[0][2] > 0.999 and total == 1
    assert [p for p, _ in outliers(ids, vecs, 2.0)] == ["p6"]


def test_near_duplicate_pairs_of_a_corpus_of_lookalikes_are_counted_and_the_best_kept_in_bounded_memory():
    import tracemalloc

    rng = np.random.default_rng(1)
    n = 3000  # 4.5 million pairs above the threshold: as tuples, gigabytes
    vecs = np.ones((n, 8), np.float32) + rng.normal(scale=1e-3, size=(n, 8)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = [f"p{i}" for i in range(n)]
    tracemalloc.start()
    pairs, total = near_duplicates(ids, vecs, 0.99, limit=50, cells=1 << 16)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert total == n * (n - 1) // 2 and len(pairs) == 50
    assert peak < 8 * 2**20, peak  # the blocks, not the pairs
    every = (vecs @ vecs.T)[np.triu_indices(n, 1)]  # each pair once
    assert [s for _, _, s in pairs] == pytest.approx(np.sort(every)[::-1][:50].tolist(), abs=1e-6)
    assert all(a != b for a, b, _ in pairs) and [s for *_, s in pairs] == sorted([s for *_, s in pairs], reverse=True)


@pytest.mark.usefixtures("prefect_harness")
def test_refresh_writes_the_report_and_publishes_progress_table_and_summary(corpus, tiny_env):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    make_plate(corpus, "plate-004", b"\x89PNG\r\n\x1a\n broken")
    make_plate(corpus, "plate-005", paper_plate(seed=0, photo_colour=(0, 90, 160)))  # = plate-001's pixels
    state = refresh_corpus(str(corpus), RefreshConfig(models=["tiny_dinov2"], gpu_class="CPU"), return_state=True)
    assert state.is_failed() and "plate-004" in state.message

    reports = corpus / "reports"
    page = (reports / "index.html").read_text()
    plots = re.findall(r'<img src="(plots/[^"]+\.png)"', page)  # megapixels, luminance x entropy, background, flags
    assert len(plots) == 4
    for plot in plots:
        with Image.open(reports / plot) as im:
            assert im.format == "PNG" and im.size == (480, 340)
    assert re.findall(r'<area shape="circle"[^>]*title="(plate-00\d)', page) == ["plate-005", "plate-001", "plate-002",
                                                                               "plate-003"]  # flagged first
    assert re.search(r'<area [^>]*href="plate.html#0/plate-005"', page)  # each point opens its plate's page
    assert page.index("Failed plates: 1") < page.index("<h2>Plots")  # the failed plates first
    sheet = (reports / "sheet-0001.html").read_text()
    assert len(re.findall(r'<figure class="plate ok', sheet)) == 4 and 'class="plate failed' in sheet
    assert sheet.index("plate-004") < sheet.index('id="plate-005"') < sheet.index('id="plate-001"')  # failed, flagged
    assert len(re.findall(r'<span class="crop"', sheet)) == 4  # each embedded plate's best crop outlined
    assert "best crop outlined in red" in sheet
    assert "../plates_structured/plate-001/viz/input_preview.png" in sheet
    assert "exact_duplicates: 1 plate" in page and '<div class="pair">' in page  # beside the plate it duplicates
    assert "Near-duplicate pairs" in page and "<td>plate-001</td><td>plate-005</td>" in page
    chunk = (reports / "data" / "plates-0000.js").read_text()
    data = json.loads(chunk[chunk.index(",") + 1:chunk.rindex(")")])
    two = data["plate_dir"].index("plate-002")
    boxes = data["candidates"][two]
    assert len(boxes) > 8 and len(boxes) % 4 == 0  # its crop candidates, for its page
    assert boxes[:4] == [0, 0, data["width"][two], data["height"][two]]  # the whole plate first
    assert data["candidates"][data["plate_dir"].index("plate-004")] is None  # failed: none

    import shutil

    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium")
        tab = browser.new_page()
        tab.goto((reports / "plate.html").as_uri() + "#0/plate-002")
        tab.wait_for_selector("table.facts")
        drawn = tab.eval_on_selector_all(".hero .candidate", "c => c.length"), tab.eval_on_selector_all(".hero .crop", "c => c.length")
        text = tab.text_content("#plate")
        browser.close()
    assert drawn == (len(boxes) // 4 - 1, 1)  # every candidate but the whole plate, and the best in red
    assert "Best crop" in text and "similarity" in text

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
    assert "4 of 5 plates ok, 1 failed (1 new, 0 known)" in summary and "| plate-004 | characterize |" in summary and "reports/index.html" in summary
    assert "| characterization |" in summary and "| smart crop |" in summary


@pytest.mark.usefixtures("prefect_harness")
def test_the_summary_links_to_the_report_over_http_where_chromium_shows_its_plots(corpus, monkeypatch, tmp_path):
    """The summary artifact's link and its flagged plates' previews, fetched over HTTP from the
    report server, and the report in headless Chromium with every plot drawn."""
    import shutil

    import httpx
    from playwright.sync_api import sync_playwright
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from app.reports import ReportServer

    make_plate(corpus, "plate-004", paper_plate(seed=0, photo_colour=(0, 90, 160)))  # = plate-001
    server = ReportServer([corpus]).start()
    try:
        monkeypatch.setenv("PLATEFLOW_REPORT_URL", server.url)
        state = refresh_corpus(str(corpus), RefreshConfig(), return_state=True)
        assert state.is_completed(), state.message
        with get_client(sync_client=True) as client:
            found = client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[artifact_key(corpus, "summary")])))
        summary = sorted(found, key=lambda a: a.created)[-1].data
        url = re.search(r"Corpus report: \[(http://[^\]]+)\]", summary).group(1)
        assert url == server.report_url(corpus)
        page = httpx.get(url)
        assert page.status_code == 200 and "plateflow report" in page.text
        previews = re.findall(r"!\[(plate-\d+)[^\]]*\]\((http://[^)]+)\)", summary)
        assert [p for p, _ in previews] == ["plate-004"]
        assert "**plate-004: exact_duplicates (of plate-001)**" in summary  # each preview captioned
        assert httpx.get(previews[0][1]).headers["content-type"] == "image/png"
        assert httpx.get(url.replace("reports/index.html", "plates_structured/plate-001/manifest.json")).status_code == 404
        chromium = shutil.which("chromium") or "/usr/bin/chromium"
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium)
            tab = browser.new_page()
            tab.goto(url)
            tab.wait_for_load_state("load")
            widths = tab.evaluate("[...document.querySelectorAll('.plots img')].map(i => [i.complete, i.naturalWidth])")
            tab.screenshot(path=str(tmp_path / "report.png"))
            tab.click("text=Contact sheet")
            tab.wait_for_function("[...document.querySelectorAll('.sheet img')].every(i => i.complete)", timeout=20_000)
            thumbs = tab.evaluate("[...document.querySelectorAll('.sheet img')].map(i => i.naturalWidth > 0)")
            browser.close()
        assert widths == [[True, 480]] * 4
        assert thumbs == [True] * 4
    finally:
        server.stop()


@pytest.mark.usefixtures("prefect_harness")
def test_the_paper_share_is_measured_at_the_detected_paper_level_not_at_pure_white(tmp_path):
    """Off-white paper (luminance ~231, as real scans have) round a picture of about half the
    plate: its paper share is about half, where a count of near-white pixels finds none."""
    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    from flows.refresh import refresh_corpus

    root = tmp_path / "corpus"
    rng = np.random.default_rng(0)
    a = np.clip(rng.normal(0, 2, (300, 400, 3)) + [235, 231, 222], 0, 255).astype(np.uint8)
    a[50:250, 60:340] = rng.integers(20, 200, (200, 280, 3), dtype=np.uint8)  # 47% of the plate
    make_plate(root, "plate-001", Image.fromarray(a), filename="scan.png")
    photo = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    make_plate(root, "plate-002", Image.fromarray(photo), filename="photo.png")
    assert refresh_corpus(str(root), return_state=True).is_completed()
    rows = {r["plate_dir"]: r for r in pq.read_table(root / "plates.parquet").to_pylist()}
    assert rows["plate-001"]["background_ratio"] < 0.01  # the notebooks' measure: pixels at >= 245
    assert 0.45 < rows["plate-001"]["paper_share"] < 0.6
    assert rows["plate-002"]["paper_share"] == 0.0  # a photograph has no paper


def test_the_summary_shows_a_few_captioned_previews_with_most_to_look_at_never_grayscale_alone(tmp_path,
                                                                                            monkeypatch):
    from plateflow.artifacts import RunCounts, summary_markdown

    root = tmp_path / "corpus"
    flags = {"plate-001": ["grayscale"], "plate-002": ["dark"], "plate-003": ["grayscale"],
             "plate-004": ["dark", "blurry"], "plate-005": ["odd_size"], "plate-006": ["light"], "plate-007": []}
    rows = []
    for folder, f in flags.items():
        viz = root / "plates_structured" / folder / "viz"
        viz.mkdir(parents=True)
        (viz / "input_preview.png").write_bytes(b"png")
        rows.append({"plate_dir": folder, "plate_id": folder, "status": "ok", "quality_flags": f})
    monkeypatch.setenv("PLATEFLOW_REPORT_URL", "http://reports.invalid")
    text = summary_markdown(root, rows, RunCounts.of(rows, set(), []), set(), {}, root / "reports" / "index.html", [])
    shown = re.findall(r"!\[([^\]]+)\]\(", text)
    assert shown == ["plate-004: dark, blurry", "plate-002: dark", "plate-005: odd_size"]
    assert all(f"**{caption}**" in text for caption in shown)


@pytest.mark.browser
@pytest.mark.usefixtures("prefect_harness")
def test_the_report_is_a_worklist_in_chromium(tmp_path):
    """Designed plates with known answers (a 5 px cut of the rocket, a panorama, a 102 px image,
    motion blur, a corrupt file), the report opened from disk in headless Chromium, and the
    curator's path through it clicked: failed plates first, filters, pairs, plate pages. The
    screenshots it takes on the way (test-output/report/) are the docs' pictures of the report."""
    import shutil
    from pathlib import Path

    import skimage
    from playwright.sync_api import sync_playwright
    from skimage import data

    root = tmp_path / "corpus"
    rocket = Image.fromarray(data.rocket())
    make_plate(root, "plate-001", rocket, filename="rocket.jpg",
               manifest={"plate_id": "plate-001", "source_image": "source/rocket.jpg",
                         "original_path": "/scans/launch/Rocket <1>.jpg"})
    make_plate(root, "plate-002", rocket.crop((5, 5, rocket.width - 5, rocket.height - 5)), filename="rocket cut.png")
    coffee = np.asarray(Image.fromarray(data.coffee()).resize((600, 400)))
    make_plate(root, "plate-003", Image.fromarray(np.hstack([coffee] * 6)).resize((3600, 400)), filename="pano.jpg")
    make_plate(root, "plate-004", Image.fromarray(data.camera()).resize((102, 102)), filename="tiny.png")
    make_plate(root, "plate-005", b"\x89PNG\r\n\x1a\n broken", filename="broken.png")
    make_plate(root, "plate-006", Image.open(Path(skimage.data.__file__).parent / "clock_motion.png"), filename="clock.png")
    make_plate(root, "plate-007", Image.fromarray((data.astronaut() * 0.2).astype(np.uint8)), filename="dark.png")
    make_plate(root, "plate-008", Image.fromarray((200 + data.chelsea() * 0.2).astype(np.uint8)), filename="washed.png")
    blank = np.random.default_rng(0).normal(0, 2, (700, 500, 3)) + [247, 245, 238]
    make_plate(root, "plate-009", Image.fromarray(blank.clip(0, 255).astype(np.uint8)), filename="blank.png")
    state = refresh_corpus(str(root), RefreshConfig(), return_state=True)
    assert state.is_failed() and "plate-005" in state.message
    reports = root / "reports"
    for page in ("index.html", "sheet-0001.html"):
        assert "best crop" not in (reports / page).read_text()  # no model ran: no crop claimed

    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium")
        tab = browser.new_page(viewport={"width": 1280, "height": 900})
        tab.on("pageerror", lambda exc: errors.append(str(exc)))
        tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        shots = REPO / "test-output" / "report"
        shots.mkdir(parents=True, exist_ok=True)
        tab.goto((reports / "index.html").as_uri())
        tab.screenshot(path=str(shots / "1-index.png"))
        filters = tab.eval_on_selector_all("nav.filters a", "links => links.map(a => a.getAttribute('href'))")
        assert all((reports / f).is_file() for f in filters) and "failed-0001.html" in filters
        headings = tab.eval_on_selector_all("h2", "hs => hs.map(h => h.textContent)")
        assert headings[:2] == ["Failed plates: 1", "Plots"]

        tab.click("table.failed >> text=plate-005")  # the failed plate's own page
        tab.wait_for_selector("h2.error")
        assert tab.text_content("h1") == "plate-005"
        assert "ImageDecodeError" in tab.text_content("#plate") and "broken.png" in tab.text_content("table.facts")

        tab.goto((reports / "index.html").as_uri())
        tab.click("nav.filters >> text=near_duplicates (1)")  # a static filter page
        pair = tab.eval_on_selector_all(".pair figure", "fs => fs.map(f => f.id)")
        tab.screenshot(path=str(shots / "2-near-duplicates-side-by-side.png"))
        assert pair == ["plate-002", "plate-001"]  # side by side: the copy and its original
        tab.click("#plate-002 a.frame")  # a thumbnail opens its plate's page
        tab.wait_for_selector("table.scores")
        facts = tab.text_content("table.facts")
        assert "rocket cut.png" in facts and "630 × 417 px" in facts
        assert "within 4 bits of plate-001" in tab.text_content("ul.why")
        rows = tab.eval_on_selector_all("table.scores tr", "rs => rs.map(r => r.innerText)")
        assert any("edge width" in r and "> 1.6" in r for r in rows)
        tab.screenshot(path=str(shots / "3-a-plate-page.png"), full_page=True)
        tab.click("ul.why a")  # the original's page: its name from the manifest, as text
        tab.wait_for_function("document.querySelector('h1').textContent === 'plate-001'")
        assert "/scans/launch/Rocket <1>.jpg" in tab.text_content("table.facts")
        assert "Duplicated by plate-002" in tab.text_content("#plate")

        tab.goto((reports / "flag-odd_size-0001.html").as_uri())
        assert "102×102" in tab.text_content("#plate-004 figcaption")  # odd sizes shown with their sizes
        tab.goto((reports / "flag-blurry-0001.html").as_uri())
        assert tab.eval_on_selector_all(".sheet figure", "fs => fs.map(f => f.id)") == ["plate-006"]
        for flag in ("dark", "light", "low_information", "blurry", "odd_aspect_ratio", "odd_size"):
            page = reports / f"flag-{flag}-0001.html"  # what each flag catches, for the docs
            assert page.is_file(), f"no plate flagged {flag}"
            tab.goto(page.as_uri())
            tab.wait_for_function("[...document.querySelectorAll('.sheet img')].every(i => i.complete)")
            tab.screenshot(path=str(shots / f"4-flag-{flag}.png"))
        tab.goto((reports / "sheet-0001.html").as_uri())
        tab.wait_for_function("[...document.querySelectorAll('.sheet img')].every(i => i.complete)")
        pano = tab.eval_on_selector("#plate-003 img", "i => i.getBoundingClientRect().width")
        cell = tab.eval_on_selector("#plate-006", "f => f.getBoundingClientRect().width")
        assert pano > 1.8 * cell  # a panorama takes two cells: readable, not a strip
        browser.close()
    assert errors == []


def test_the_report_renders_again_only_what_shows_a_changed_plate_and_equals_a_fresh_build(tmp_path):
    """A corpus of 1,200 plates (3 sheet pages, 3 data files): one plate's luminance changes, and
    only the index, its data file and the scatter are written again (its sheet page is rendered but
    shows no luminance: the same bytes are not written); a flag changes, and every page is. Either way the folder is byte for byte what a build from scratch writes."""
    import shutil

    from plateflow.report import build_report
    from plateflow.tables import write_corpus_table

    def rows(lum: dict[int, float], flags: dict[int, list[str]]):
        return [{"plate_dir": f"plate-{i:04d}", "plate_id": f"p{i}", "status": "ok", "width": 640, "height": 480,
                 "megapixels": 0.3, "luminance_mean": lum.get(i, 100.0 + i % 50), "entropy": 5.0 + i % 7 / 10,
                 "quality_flags": flags.get(i, ["dark"] if i % 100 == 3 else [])} for i in range(1200)]

    def files(root):
        return {p.relative_to(root): (p.stat().st_mtime_ns, p.read_bytes()) for p in (root / "reports").rglob("*")
                if p.is_file()}

    def fresh(root):
        other = tmp_path / "fresh" / root.name  # the index's title names the folder
        shutil.rmtree(other, ignore_errors=True)
        (other / "plates_structured").mkdir(parents=True)
        shutil.copy(root / "plates.parquet", other / "plates.parquet")
        build_report(other)
        return {k: v[1] for k, v in files(other).items()}

    root = tmp_path / "corpus"
    (root / "plates_structured").mkdir(parents=True)
    write_corpus_table(root, rows({}, {}))
    build_report(root)
    before = files(root)
    write_corpus_table(root, rows({700: 240.0}, {}))
    build_report(root)
    after = files(root)
    rewritten = {str(k) for k in after if after[k][0] != before.get(k, (None,))[0]}
    assert rewritten == {"reports/index.html", "reports/data/plates-0001.js",
                         "reports/plots/luminance-entropy.png", "reports/plots/.luminance-entropy.png.key",
                         "reports/plots/.luminance-entropy.png.transform", "reports/.rows.npy"}
    assert {k: v[1] for k, v in after.items()} == fresh(root)
    write_corpus_table(root, rows({700: 240.0}, {5: ["dark"]}))  # a flag: the sheets' order, the counts
    build_report(root)
    assert {k: v[1] for k, v in files(root).items()} == fresh(root)


def test_a_scatter_of_more_plates_than_markers_can_show_draws_their_densities_and_names_a_sample():
    """Past DENSE_POINTS plates the luminance/entropy scatter is two densities (plates blue,
    flagged red), each where its plates are, and the image map still names MAX_AREAS plates at
    their places (flagged first)."""
    import io
    import re

    from plateflow.report.plates import MAX_AREAS
    from plateflow.report.plots import DENSE_POINTS, density, scatter_areas, scatter_png

    rng = np.random.default_rng(5)
    n = DENSE_POINTS + 5000
    flagged = np.arange(n) < 1000
    x = np.where(flagged, rng.normal(220, 3, n), rng.normal(120, 3, n))  # flagged on the right
    y = rng.normal(5, 0.2, n)
    png, transform = scatter_png(x, y, flagged, "t", "luminance", "entropy", cells=density(x, y, flagged))
    areas = scatter_areas(x, y, flagged, [f"p{i}" for i in range(n)], [None] * n, transform)
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    red = (rgb[..., 0] > rgb[..., 2] + 60) & (rgb[..., 1] < 200)
    blue = (rgb[..., 2] > rgb[..., 0] + 60) & (rgb[..., 2] > 120)
    _, xr = np.nonzero(red[40:-60])  # the plot area, not the legend's patches at the top
    _, xb = np.nonzero(blue[40:-60])
    assert len(xr) > 200 and len(xb) > 200 and np.median(xr) > np.median(xb) + 100
    named = re.findall(r'coords="(\d+),(\d+),5" title="p(\d+):', areas)
    assert len(named) == MAX_AREAS
    order = [int(i) for _, _, i in named]
    assert sorted(order[:1000]) == list(range(1000)) and min(order[1000:]) >= 1000  # the flagged first, then a sample
    cx = {int(i): int(c) for c, _, i in named}
    assert min(cx[i] for i in order[:1000]) > max(cx[i] for i in order[1000:])  # each where its plate is
    # The map is where matplotlib drew each point: the plot's own transform, applied by hand.
    fig_px = {int(i): (int(c), int(r)) for c, r, i in named}
    for i in order[:5] + order[-5:]:
        assert fig_px[i] == (round(float(x[i]) * transform.matrix[0][0] + transform.matrix[0][2]),
                             round(transform.height - float(y[i]) * transform.matrix[1][1] - transform.matrix[1][2]))


def test_a_dense_scatter_is_drawn_again_only_when_its_cells_change_and_its_map_follows_the_plates(tmp_path):
    """Past DENSE_POINTS plates: a plate that moves within its cell leaves the picture as it is
    (not drawn again) while the image map names it with its new values; a plate that moves into
    an empty cell is drawn again. Either way the report equals a build from scratch."""
    import shutil

    from plateflow.report import build_report
    from plateflow.report.plots import DENSE_POINTS
    from plateflow.tables import write_corpus_table

    n = DENSE_POINTS + 100
    lum = {i: 100.0 + (i * 7) % 90 for i in range(n)}  # lum in [100, 190), entropy in [4, 7.5]: the corner
    ent = {i: 4.0 + (i * 13) % 35 / 10 for i in range(n)}  # above 190 and 7.5 is empty but for plate 0
    lum[0], ent[0] = 200.0, 8.0

    def write():
        write_corpus_table(root, [{"plate_dir": f"plate-{i:05d}", "plate_id": f"p{i}", "status": "ok", "width": 640,
                                   "height": 480, "megapixels": 0.3, "luminance_mean": lum[i], "entropy": ent[i],
                                   "quality_flags": []} for i in range(n)])
        build_report(root)
        return (root / "reports/plots/luminance-entropy.png").stat().st_mtime_ns, (root / "reports/index.html").read_text()

    def fresh() -> bytes:
        other = tmp_path / "fresh" / root.name
        shutil.rmtree(other, ignore_errors=True)
        (other / "plates_structured").mkdir(parents=True)
        shutil.copy(root / "plates.parquet", other / "plates.parquet")
        build_report(other)
        return (other / "reports/index.html").read_bytes()

    root = tmp_path / "corpus"
    (root / "plates_structured").mkdir(parents=True)
    drawn, index = write()
    named = re.findall(r'title="p(\d+): ([\d.]+), ([\d.]+)"', index)
    k = int(next(i for i, _, e in named if i != "0" and ent[int(i)] == 5.5))  # a plate the map names
    assert f'title="p{k}: {lum[k]:.3g}, 5.5"' in index
    ent[k] = 5.52  # within its cell (entropy cells are 4/64 = 0.0625 high, from 5.5 on)
    again, index = write()
    assert again == drawn  # the picture shows the same cells: not drawn again
    assert f'title="p{k}: {lum[k]:.3g}, 5.52"' in index  # but the map says where the plate is now
    assert (root / "reports/index.html").read_bytes() == fresh()
    (root / "reports/plots/.luminance-entropy.png.transform").unlink()  # lost: drawn again, for the map
    ent[k] = 5.53
    _, index = write()  # (the same picture: the same bytes, not written)
    assert (root / "reports/plots/.luminance-entropy.png.transform").is_file()
    assert f'title="p{k}: {lum[k]:.3g}, 5.53"' in index
    assert (root / "reports/index.html").read_bytes() == fresh()
    lum[k], ent[k] = 195.0, 7.9  # into the empty corner
    moved, index = write()
    assert moved != drawn and 'title="p%d: 195, 7.9"' % k in index
    assert (root / "reports/index.html").read_bytes() == fresh()
    assert (root / "reports/plots/luminance-entropy.png").read_bytes() == (
        tmp_path / "fresh/corpus/reports/plots/luminance-entropy.png").read_bytes()


def test_a_histogram_is_keyed_on_its_bars_as_drawn():
    """Bar heights to a thousandth of the tallest bar (a quarter of a pixel): one plate more in a
    bar of 10 beside one of 50,000 draws the same picture; beside one of 500 it does not."""
    from plateflow.report.plots import Histogram

    edges = np.linspace(0, 1, 4)

    def key(*counts):
        return Histogram(np.array(counts), edges).key()

    assert key(50_000, 10, 10) == key(50_000, 11, 9)
    assert key(50_000, 10, 10) != key(50_000, 200, 10)
    assert key(500, 10, 10) != key(500, 11, 9)


def test_a_plot_key_tells_its_parts_apart():
    from plateflow.report.plots import plot_key

    assert plot_key("ab\x1f", "c") != plot_key("ab", "\x1fc")
    assert plot_key(np.array([1, 2]), np.array([3])) != plot_key(np.array([1]), np.array([2, 3]))

def test_a_report_column_converts_the_blocks_of_rows_it_is_asked_for():
    """The report's view of a column of 10^5 values: any row (negative too) as the list would
    give it, an IndexError past the end, and only the asked rows' blocks made Python objects
    (a report that renders one changed plate's page does not convert 10^5 values a column)."""
    import tracemalloc

    import pyarrow as pa

    from plateflow.report.plates import Column

    values = [f"plate-{i:06d}" for i in range(100_000)]
    column = Column(pa.chunked_array([values[:40_000], values[40_000:]]))
    tracemalloc.start()
    page = [column[i] for i in range(2_000)]  # a sheet page's 500 plates ask a few columns each
    picked = [column[i] for i in (0, 1, 1023, 1024, 39_999, 40_000, 99_999, -1, -100_000)]
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert page == values[:2_000]
    assert picked == [values[i] for i in (0, 1, 1023, 1024, 39_999, 40_000, 99_999, -1, -100_000)]
    assert held < 2_000_000  # a few blocks of 1,024 strings; the whole column is ~7 MB of str objects
    with pytest.raises(IndexError):
        column[100_000]
    assert column[10:13] == values[10:13] and list(column) == values


def test_count_plots_of_a_large_corpus_keep_their_numbers_inside_the_picture():
    """At 10^5 plates the flag counts' longest bar keeps its number inside the image, and the
    histograms' count axis reads 100k, not six digits that push its label out of the image."""
    import io

    from plateflow.report.plots import bars_png, histogram, histogram_png

    def ink(png: bytes) -> np.ndarray:  # dark pixels (text, axes)
        return np.asarray(Image.open(io.BytesIO(png)).convert("L")) < 128

    bars = ink(bars_png({"dark": 3, "odd_size": 100_000, "failed": 0}, "Quality flags"))
    assert not bars[:, -6:].any()  # nothing cut at the right edge
    hist = ink(histogram_png(histogram(np.r_[np.full(100_000, 0.004), 0.5]), "Plate size", "megapixels"))
    assert hist[:, :30].any() and not hist[:, :4].any()  # the "plates" label whole, not pushed past the left edge



@pytest.mark.parametrize("counts", [[4, 3, 1], [100_000, 7, 0]])
def test_count_axes_tick_whole_plates(counts):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from plateflow.report.plots import _counts_axis

    fig = Figure()
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(range(len(counts)), counts)
    _counts_axis(ax.yaxis)
    fig.canvas.draw()
    ticks = [t for t in ax.get_yticks() if 0 <= t <= max(counts)]
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks)
