"""The smart crop: a source changed under it fails its plate and writes nothing."""

import io

import numpy as np
import pytest

from fixtures.plates import make_plate, paper_plate


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def test_a_source_changed_before_its_crop_is_cut_fails_that_plate_and_writes_nothing(tmp_path):
    import hashlib

    from plateflow.config import CropParams
    from plateflow.corpus import read_manifest
    from plateflow.errors import SourceChangedError
    from plateflow.smart_crop import smart_crop_plate

    d = make_plate(tmp_path, "plate-001", paper_plate(seed=1))
    plate = read_manifest(d)
    old_sha = hashlib.sha256(plate.source_path.read_bytes()).hexdigest()
    boxes = [[0, 0, 320, 240], [80, 60, 240, 180]]
    vec = tmp_path / "v.npy"
    vec.write_bytes(_npy(np.eye(2, 8, dtype=np.float32)))
    paper_plate(seed=9, photo_colour=(0, 0, 0)).save(plate.source_path)  # replaced mid-refresh
    with pytest.raises(SourceChangedError, match="source changed during the refresh"):
        smart_crop_plate(plate, "run-1", "key", {"m": str(vec)}, boxes, "m", CropParams(), (320, 240), old_sha)
    assert not (d / "runs").exists()
    new_sha = hashlib.sha256(plate.source_path.read_bytes()).hexdigest()
    out = smart_crop_plate(plate, "run-1", "key", {"m": str(vec)}, boxes, "m", CropParams(), (320, 240), new_sha)
    assert out["crop_status"] == "computed" and (d / "runs" / "run-1" / "best_crop.jpg").is_file()


def test_an_earlier_run_is_named_by_its_folder_and_its_outputs_must_lie_inside_it(tmp_path):
    import json

    from plateflow.smart_crop import find_run

    plate = tmp_path / "plate-001"
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(b"not the plate's")
    good = plate / "runs" / "20261201T000000Z-aaaaaa"
    good.mkdir(parents=True)
    (good / "best_crop.jpg").write_bytes(b"jpeg")
    (good / "metrics.json").write_text(json.dumps(
        {"plateflow_key": "k", "run_id": "../../elsewhere", "outputs": ["best_crop.jpg"]}))
    assert find_run(plate, "k") == good.name  # never the file's words
    stray = plate / "runs" / "20261202T000000Z-bbbbbb"  # newer, so looked at first
    stray.mkdir()
    (stray / "metrics.json").write_text(json.dumps(
        {"plateflow_key": "k", "run_id": stray.name, "outputs": ["../../../outside.jpg"]}))
    assert find_run(plate, "k") == good.name
    (stray / "metrics.json").write_text(json.dumps({"plateflow_key": "k", "outputs": [["a"], 3]}))
    assert find_run(plate, "k") == good.name
    assert find_run(plate, "other key") is None
