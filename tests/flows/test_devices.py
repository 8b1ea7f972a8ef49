"""Every device of a host in the in-process GPU step (plateflow/devices.py, flows/embed.py): two
simulated devices on this CPU machine are two worker processes, each running its share of the
chunks, and every plate's vectors are the same bytes as on one device."""

import logging
import os
from pathlib import Path

import pytest

from fixtures.plates import paper_plate


def jobs_in(folder, n: int):
    from plateflow.embed.reader import PlateJob

    folder.mkdir(parents=True)
    jobs = []
    for i in range(n):
        work = folder.parent / f"work-{i}.jpg"
        if not work.exists():
            paper_plate(seed=i, photo_colour=(30 * i % 255, 90, 160)).save(work)
        jobs.append(PlateJob(f"plate-{i}", str(work), (320, 240), ((0, 0, 320, 240), (80, 60, 240, 180)),
                             str(folder / f"v{i}.npy")))
    return jobs


@pytest.mark.usefixtures("prefect_harness")
def test_two_devices_share_the_chunks_and_make_the_same_bytes_as_one(tmp_path, tiny_env, monkeypatch, caplog):
    from flows.embed import embed_plates

    monkeypatch.setenv("PLATEFLOW_DEVICES", "1")
    one = jobs_in(tmp_path / "one", 8)
    assert embed_plates("tiny_vit", "CPU", jobs=one, chunk_size=2) == {j.name: None for j in one}

    monkeypatch.setenv("PLATEFLOW_DEVICES", "2")
    two = jobs_in(tmp_path / "two", 8)
    runs = logging.getLogger("prefect.flow_runs")  # Prefect's loggers do not propagate to the root
    runs.addHandler(caplog.handler)
    try:
        assert embed_plates("tiny_vit", "CPU", jobs=two, chunk_size=2) == {j.name: None for j in two}
    finally:
        runs.removeHandler(caplog.handler)
    assert "4 chunks on 2 devices (device 0: 2, device 1: 2)" in caplog.text
    for a, b in zip(one, two):
        assert Path(a.cache_file).read_bytes() == Path(b.cache_file).read_bytes(), a.name
    assert not [p for p in os.listdir(tmp_path / "two") if p.endswith(".tmp")]


def test_a_device_process_is_pinned_to_the_gpu_its_parent_calls_that():
    """Process i gets this process's GPU i: the i-th entry of its own CUDA_VISIBLE_DEVICES where
    that is set (a scheduler's "2,3" or GPU UUIDs)."""
    from plateflow.devices import pin_values

    assert pin_values(2, None) == pin_values(2, "") == ["0", "1"]
    assert pin_values(2, "2,3") == ["2", "3"]
    assert pin_values(1, "GPU-5c1f, GPU-77aa") == ["GPU-5c1f"]  # torch saw one of them
    assert pin_values(0, None) == []
