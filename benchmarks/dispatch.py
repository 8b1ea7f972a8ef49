"""Dispatch benchmark: the GPU step through a work pool, as refresh sends it.

Starts what `plateflow server` starts (a local Prefect server on a free port, the pools, the
deployments from prefect.yaml, a worker for a GPU class simulated on this machine and one for the
CPU), then embeds the same plates through that pool twice, in the same run:

  one run per chunk   every ``--chunk`` plates a flow run of their own (how refresh dispatched
                      before), so every chunk pays a run's start: a new process, imports, the
                      model's weights
  one run per worker  refresh's dispatch now (flows/routing.py:split_runs): one run per
                      online worker, its chunks embed-chunk tasks inside it

and reports seconds, plates/s, the ratio, and the start-up a run costs on this machine
((one-run-per-chunk seconds - one-run-per-worker seconds) / the extra runs). Tiny random-weight
models (no download); the reference that matters is that start-up against the seconds a GPU
spends on a chunk of plates.

    uv run python benchmarks/dispatch.py --plates 96 --chunk 16
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests"), str(HERE)]

from results import write_result  # noqa: E402 - benchmarks/results.py


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plates", type=int, default=96)
    ap.add_argument("--chunk", type=int, default=16, help="plates per chunk (refresh's --chunk-size)")
    ap.add_argument("--gpu-class", default="T4_16GB", help="class the worker simulates (its reader kind included)")
    args = ap.parse_args()

    from fixtures.processes import free_port
    from fixtures.tiny_models import build_tiny_models

    base = Path(tempfile.mkdtemp(prefix="plateflow-dispatch-"))
    profiles, weights = build_tiny_models(base)
    port = free_port()
    extra = {"PREFECT_HOME": str(base / "prefect-home"), "PREFECT_SERVER_UI_ENABLED": "false",
             "PLATEFLOW_PROFILES": str(profiles), "PLATEFLOW_WEIGHTS": str(weights), "HF_HUB_OFFLINE": "1"}
    os.environ.update(extra, PREFECT_API_URL=f"http://127.0.0.1:{port}/api")

    from embed import make_stage_inputs
    from flows.routing import GpuRoute, online_workers, run_on_pool
    from plateflow.pools import EMBED_DEPLOYMENT, work_pool
    from app.server import start

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log = logging.getLogger("dispatch")

    class SentRuns(logging.Handler):
        """Counts the runs run_on_pool sends (a completed run's files are removed, so they cannot say)."""
        sent = 0

        def emit(self, record: logging.LogRecord) -> None:
            SentRuns.sent += "plate(s)): flow run" in record.getMessage()

    log.addHandler(SentRuns())
    jobs, _ = make_stage_inputs(base / "plates", args.plates)
    pool = work_pool()
    queue = pool.queue(args.gpu_class)
    route = GpuRoute(args.gpu_class, pool.name, queue.name, EMBED_DEPLOYMENT)
    stack = start(base / "corpus", port, gpu_class=args.gpu_class, log_dir=base, say=log.info, env=extra,
                  report_port=free_port())
    try:
        from prefect import get_client

        deadline = time.monotonic() + 120
        with get_client(sync_client=True) as client:
            while not online_workers(client, pool.name, queue):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no worker came online on {pool.name}/{queue.name}")
                time.sleep(1)
        report = {"plates": args.plates, "chunk": args.chunk, "gpu_class": args.gpu_class}
        for label, max_run in (("one run per chunk", args.chunk), ("one run per worker", None)):
            for job in jobs:
                Path(job.cache_file).unlink(missing_ok=True)
            start_t, SentRuns.sent = time.perf_counter(), 0
            outcome = run_on_pool(route, "tiny_dinov2", jobs, args.chunk, None, base / "reports" / label.replace(" ", "-"),
                                  log, poll_s=0.5, **({"max_run_plates": max_run} if max_run else {}))
            seconds = time.perf_counter() - start_t
            failed = {k: v for k, v in outcome.items() if v is not None}
            if failed or len(outcome) != len(jobs):
                raise RuntimeError(f"{label}: {len(outcome)} outcomes, failed: {list(failed.items())[:3]}")
            runs = SentRuns.sent
            report[label] = {"runs": runs, "seconds": round(seconds, 1), "plates_per_s": round(args.plates / seconds, 1)}
            print(f"{label:20s}: {runs:3d} runs, {seconds:6.1f} s, {args.plates / seconds:6.1f} plates/s", flush=True)
        old, new = report["one run per chunk"], report["one run per worker"]
        report["speed-up"] = round(old["seconds"] / new["seconds"], 2)
        report["run_start_s"] = round((old["seconds"] - new["seconds"]) / max(1, old["runs"] - new["runs"]), 1)
        print(f"one run per worker is {report['speed-up']}x one run per chunk; a run's start costs about "
              f"{report['run_start_s']} s here")
        write_result("dispatch", report, sys.argv[1:])
    finally:
        stack.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
