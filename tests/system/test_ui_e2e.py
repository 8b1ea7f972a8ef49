"""End to end in a real browser: `plateflow server`, then the Prefect UI in headless Chromium
(Debian's `chromium`, driven by Playwright for Python): a refresh started from the Custom run
form with a corpus path, its outputs and artifacts, and a failed run retried from the UI.

Run alone with `uv run pytest -m browser`. Screenshots go to test-output/e2e/ (or
$PLATEFLOW_E2E_SHOTS).
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fixtures import REPO
from fixtures.plates import make_plate, paper_plate
from fixtures.processes import assert_none_left, free_port, wait_until

pytestmark = [pytest.mark.browser, pytest.mark.server]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = Path(os.environ.get("PLATEFLOW_E2E_SHOTS", REPO / "test-output" / "e2e"))


READY = "plateflow server ready: "  # the line `plateflow server` prints once everything is up


def plateflow(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).with_name("plateflow")), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """`plateflow server` on a free port (its own PREFECT_HOME), started as an operator meets it:
    the next port taken (by an earlier `plateflow report --serve`, say), and a local server left
    running on that PREFECT_HOME by an earlier refresh. Stopped with SIGTERM, and nothing it
    started may outlive it."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"Chromium not found at {CHROMIUM}: `apt-get install chromium` (.ci/run does)")
    base = tmp_path_factory.mktemp("ui")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(base / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    env.pop("PREFECT_API_URL", None)
    local = subprocess.run([sys.executable, "-c", "from app.local_server import start_local_server; "
                            "print(start_local_server()['pid'])"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=180)
    assert local.returncode == 0, local.stderr
    local_pid = int(local.stdout.split()[-1])
    taken = socket.socket()
    log = open(base / "server.log", "w")
    proc = None
    try:
        try:
            taken.bind(("127.0.0.1", port + 1))
            taken.listen()
        except OSError:  # another process has it: taken all the same
            pass
        proc = subprocess.Popen([str(Path(sys.executable).with_name("plateflow")), "server", "--root",
                                 str(base / "default"), "--port", str(port), "--gpu-class", "CPU"],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        def ready():
            if proc.poll() is not None:
                pytest.fail("plateflow server exited:\n" + (base / "server.log").read_text()[-3000:])
            return any(line.startswith(READY) for line in (base / "server.log").read_text().splitlines())

        wait_until(ready, 240, "plateflow server")
        yield f"http://127.0.0.1:{port}", base, env, local_pid
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        taken.close()
    assert proc.returncode == 0, (base / "server.log").read_text()[-3000:]
    # No traceback through plateflow's code (Prefect's server may log its own SQLite contention
    # under load: "database is locked" in a heartbeat, which it retries).
    ours = [line for line in (base / "server.log").read_text().splitlines()
            if line.strip().startswith(f'File "{REPO}/') and "/.venv/" not in line]
    assert not ours, ours
    assert_none_left(str(base / "home"))  # the Prefect server, the workers, their flow runs, the local server


def test_the_server_takes_over_the_homes_local_server_and_a_free_report_port_and_is_the_only_one(ui):
    url, base, env, local_pid = ui
    log = (base / "server.log").read_text()
    assert f"stopped the local server (pid {local_pid})" in log and not Path(f"/proc/{local_pid}").exists()
    port = int(url.rsplit(":", 1)[1])
    moved = re.search(rf"reports: port {port + 1} is not free \(.*\), so they are served on port (\d+)", log)
    assert moved, log
    report_port = int(moved.group(1))
    import httpx

    assert httpx.get(f"http://127.0.0.1:{report_port}/", timeout=10).status_code == 200
    # A second server on the same PREFECT_HOME, and one on a busy port: one line each, nothing started.
    again = plateflow("server", "--root", str(base / "x"), "--port", str(free_port()), env=env)
    assert again.returncode == 2 and "another plateflow server" in again.stdout and "Traceback" not in again.stdout
    other = {**env, "PREFECT_HOME": str(base / "other-home")}
    busy = plateflow("server", "--root", str(base / "x"), "--port", str(port), env=other)
    assert busy.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in busy.stdout, busy.stdout
    assert len(busy.stdout.strip().splitlines()) == 1 and "Traceback" not in busy.stdout + busy.stderr
    # Other commands on this PREFECT_HOME use this server: the refresh appears in its UI.
    root = corpus(base, "from-cli")
    done = plateflow("refresh", "--root", str(root), env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    run_name = re.search(r"Beginning flow run '([^']+)'", done.stdout + done.stderr).group(1)
    assert flow_runs_named(url, run_name)
    assert not (base / "home" / "plateflow-local-server.json").exists()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def shot(page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def custom_run(page, url: str, root: Path) -> str:
    """refresh-corpus's page -> Run -> Custom run -> root -> Submit; returns the run's URL. The
    deployments list pages its rows (ten a page: the embed-plates ones come first), so the
    deployment's page is opened by its id, as a link to it would."""
    import httpx
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    deployment = httpx.get(f"{url}/api/deployments/name/refresh-corpus/refresh-corpus", timeout=10).json()
    page.goto(f"{url}/deployments/deployment/{deployment['id']}", wait_until="networkidle")
    page.get_by_text("refresh-corpus", exact=True).first.wait_for()
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run", exact=True).click()
    page.wait_for_url("**/run?**")
    page.get_by_text("root", exact=True).wait_for()
    page.wait_for_load_state("networkidle")  # the form is filled in once the deployment has loaded
    field = page.locator("textarea").first  # the form's first field: root (str)
    field.fill(str(root))
    shot(page, f"{root.name}-1-custom-run-form")
    name = page.locator("input").first.input_value()  # the form's first field: Run Name
    assert name, "the Run Name field is empty"
    assert field.input_value() == str(root), f"the root field says {field.input_value()!r}"
    # The UI's own request says the run was created (not the toast, which a busy machine can miss,
    # nor the Run Name, which the form may draw again before it submits).
    try:
        with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/create_flow_run"),
                                  timeout=90_000) as created:
            page.get_by_role("button", name="Submit").click()
    except PlaywrightTimeout:
        shot(page, f"{root.name}-1c-not-submitted")
        raise AssertionError(f"Submit sent no create_flow_run request in 90 s (run name {name!r}); the page is in "
                             f"{SHOTS}/{root.name}-1c-not-submitted.png") from None
    reply = created.value
    assert reply.ok, f"create_flow_run answered {reply.status}: {reply.text()}"
    run = reply.json()
    assert run["parameters"]["root"] == str(root), run["parameters"]
    shot(page, f"{root.name}-1b-submitted")
    page.goto(f"{url}/runs/flow-run/{run['id']}", wait_until="networkidle")
    return page.url


def flow_runs_named(url: str, name: str) -> list[dict]:
    import httpx

    reply = httpx.post(f"{url}/api/flow_runs/filter", json={"flow_runs": {"name": {"any_": [name]}}}, timeout=10)
    reply.raise_for_status()
    return reply.json()


def wait_for_state(page, state: str, name: str, timeout_s: float = 240) -> None:
    """Wait until the flow run page shows ``state`` (the page updates itself)."""
    page.get_by_text(state, exact=True).first.wait_for(timeout=timeout_s * 1000)
    shot(page, name)


def corpus(base: Path, name: str, broken: str | None = None) -> Path:
    root = base / name
    for i in range(3):
        make_plate(root, f"plate-{i + 1:03d}", paper_plate(seed=i, photo_colour=(60 * i, 90, 160)))
    if broken:
        (root / "plates_structured" / broken / "source" / "scan.jpg").write_bytes(b"")
    return root


def rows(root: Path) -> dict[str, dict]:
    return {r["plate_dir"]: r for r in pq.read_table(root / "plates.parquet").to_pylist()}


def test_custom_run_from_the_ui_then_retry_a_failed_run_from_the_ui(ui, browser):
    url, base, _, _ = ui
    page = browser.new_page(viewport={"width": 1400, "height": 900})

    # 0. The deployments page: every deployment on the first page, none "Not Ready" on a machine
    #    without a GPU (each GPU class is a queue, not a deployment of its own).
    def all_ready():
        page.goto(f"{url}/deployments", wait_until="networkidle")
        page.get_by_text("refresh-corpus", exact=True).first.wait_for()
        return page.get_by_text("Not Ready").count() == 0
    wait_until(all_ready, 120, "every deployment to be Ready in the UI", every=5)
    for name in ("refresh-corpus", "retry-failed-plates", "make-tiles", "embed-plates"):
        assert page.get_by_text(name, exact=True).count(), name
    shot(page, "0-deployments")

    # 1. A refresh started from the Custom run form completes; outputs and artifacts are there.
    good = corpus(base, "good")
    run_url = custom_run(page, url, good)
    wait_for_state(page, "Completed", "good-2-completed")
    table = rows(good)
    assert {r["status"] for r in table.values()} == {"ok"} and len(table) == 3
    for plate in table:
        assert (good / "plates_structured" / plate / "input_image.json").is_file()
        assert (good / "plates_structured" / plate / "input_color_histograms.json").is_file()
    assert (good / "reports" / "index.html").is_file()
    page.get_by_text("Artifacts", exact=True).click()
    for key in ("plateflow-good-summary", "plateflow-good-plates", "plateflow-good-progress"):
        page.get_by_text(key).first.wait_for(timeout=30000)
    shot(page, "good-3-artifacts")
    page.get_by_text("plateflow-good-summary").first.click()  # the markdown summary, rendered
    page.get_by_text("3 of 3 plates ok").first.wait_for(timeout=30000)
    shot(page, "good-4-summary-artifact")

    # 2. A run with a broken plate fails; once the file is fixed, Retry in the UI re-runs it,
    #    and only the failed plate is computed again.
    flaky = corpus(base, "flaky", broken="plate-002")
    run_url = custom_run(page, url, flaky)
    wait_for_state(page, "Failed", "flaky-2-failed")
    assert rows(flaky)["plate-002"]["status"] == "failed"
    before = rows(flaky)
    failed_url = run_url
    # The nightly case: the same bad scan again is a known failure, and the run stays green.
    custom_run(page, url, flaky)
    wait_for_state(page, "Completed", "flaky-2b-known-failure-completed")
    assert rows(flaky)["plate-002"]["status"] == "failed"
    run_url = failed_url
    make_plate(flaky, "plate-002", paper_plate(seed=1, photo_colour=(60, 90, 160)))
    page.goto(run_url, wait_until="networkidle")
    page.get_by_role("button", name="Retry", exact=True).click()
    confirm = page.get_by_role("dialog").get_by_role("button", name="Retry")
    if confirm.count():
        confirm.click()
    wait_for_state(page, "Completed", "flaky-3-retried-completed")
    after = rows(flaky)
    assert after["plate-002"]["status"] == "ok" and after["plate-002"]["characterize_status"] == "computed"
    for plate in ("plate-001", "plate-003"):  # not made again: the same row, the same updated_at
        assert after[plate] == before[plate] and before[plate]["characterize_status"] == "computed"
    page.close()
