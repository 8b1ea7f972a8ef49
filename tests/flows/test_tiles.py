"""Model-input tiles (flows/tiles.py, plateflow/tiles.py): the two modes, the split, the shards."""

import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flows.tiles import make_tiles
from plateflow.tiles import TileParams, cut_tiles, split_of

from fixtures.plates import make_plate, paper_plate

SHA = "ab" * 32


def test_classic_cuts_whole_tiles_and_a_test_plate_becomes_one_reduced_tile():
    im = Image.new("RGB", (250, 130), (200, 10, 10))
    params = TileParams(width=64, height=64)
    train = cut_tiles(im, SHA, "train", params)
    assert [t.box for t in train] == [(x, y, x + 64, y + 64) for y in (0, 64) for x in (0, 64, 128)]  # remainders dropped
    assert all(t.image.size == (64, 64) for t in train)
    (test,) = cut_tiles(im, SHA, "test", params)
    assert test.box == (0, 0, 250, 130) and test.image.size == (64, 33)  # the whole plate, reduced to fit
    assert cut_tiles(Image.new("RGB", (63, 500)), SHA, "train", params) == "63x500 is smaller than the 64x64 tile"


def test_noise_framed_frames_remainders_and_small_plates_reproducibly():
    params = TileParams(width=64, height=64, mode="noise-framed", noise_mean=100, noise_std=20)
    im = Image.new("RGB", (100, 70), (255, 255, 255))
    tiles = cut_tiles(im, SHA, "train", params)
    assert [t.box for t in tiles] == [(0, 0, 64, 64), (64, 0, 100, 64), (0, 64, 64, 70), (64, 64, 100, 70)]
    corner = np.asarray(tiles[3].image)
    assert corner.shape == (64, 64, 3)
    assert (corner[29:35, 14:50] == 255).all()  # the 36x6 remainder, centred
    frame = corner[:20].astype(float)
    assert abs(frame.mean() - 100) < 3 and abs(frame.std() - 20) < 3  # Gaussian noise around it
    again = cut_tiles(im, SHA, "train", params)
    assert all(a.image.tobytes() == b.image.tobytes() for a, b in zip(tiles, again))  # seeded: byte-identical
    other = cut_tiles(im, "cd" * 32, "train", params)
    assert other[3].image.tobytes() != tiles[3].image.tobytes()  # seeded by the plate's hash
    (small,) = cut_tiles(Image.new("L", (20, 10), 0), SHA, "train", params.model_copy(update={"grayscale": True}))
    assert small.image.mode == "L" and small.image.size == (64, 64)


def test_the_split_comes_from_the_content_hash_alone():
    import hashlib

    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(2000)]
    every = TileParams(width=8, height=8, test_every=5)
    fraction = TileParams(width=8, height=8, test_fraction=0.2)
    for params in (every, fraction):
        test = {s for s in shas if split_of(s, params) == "test"}
        assert 300 < len(test) < 500  # about a fifth
    assert {s for s in shas if split_of(s, every) == "test"} != {s for s in shas if split_of(s, fraction) == "test"}
    with pytest.raises(ValueError, match="not both"):
        TileParams(width=8, height=8, test_every=5, test_fraction=0.2)


def shard_members(dest):
    out = {}
    for shard in sorted(dest.glob("*.tar")):
        with tarfile.open(shard) as tar:
            out[shard.name] = [m.name for m in tar.getmembers()]
    return out


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # webdataset 1.0 leaves shards open
def test_make_tiles_writes_shards_webdataset_reads_and_reruns_rewrite_only_what_changed(tmp_path):
    import webdataset as wds

    root = tmp_path / "corpus"
    for i in range(6):
        make_plate(root, f"plate-{i + 1:03d}", paper_plate(320, 240, seed=i))
    make_plate(root, "plate-007", paper_plate(40, 30, seed=9))  # smaller than the tile: skipped
    make_plate(root, "plate-008", b"not an image", filename="broken.jpg")
    dest = tmp_path / "tiles"
    params = TileParams(width=128, height=96, test_every=3, shard_groups=4)
    state = make_tiles(str(root), params, str(dest), return_state=True)
    assert state.is_failed() and "plate-008" in state.message and "ImageDecodeError" in state.message
    plates = {r["plate_dir"]: r for r in pq.read_table(dest / "tile-plates.parquet").to_pylist()}
    assert plates["plate-007"]["status"] == "skipped" and "smaller than the 128x96 tile" in plates["plate-007"]["reason"]
    assert plates["plate-008"]["status"] == "failed"
    tiles = pq.read_table(dest / "tiles.parquet").to_pylist()
    for r in tiles:
        assert r["shard"].startswith(r["split"] + "-") and (dest / r["shard"]).is_file()
        assert plates[r["plate_id"]]["split"] == r["split"]  # every tile of a plate in its plate's split
        assert len([t for t in tiles if t["plate_id"] == r["plate_id"]]) == (1 if r["split"] == "test" else 4)
    # webdataset and tar read the shards: __key__ is the plate id and tile index, a .png and a .json each
    samples = list(wds.WebDataset([str(p) for p in sorted(dest.glob("*.tar"))], shardshuffle=False))
    assert sorted(s["__key__"] for s in samples) == sorted(r["key"] for r in tiles)
    for s in samples:
        meta = json.loads(s["json"])
        assert s["__key__"] == f"{meta['plate_id']}-{meta['index']:05d}"
        assert set(meta) >= {"plate_id", "sha256", "box", "split", "mode"}
        assert Image.open(io.BytesIO(s["png"])).size == (128, 96)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in dest.iterdir()}
    make_tiles(str(root), params, str(dest), return_state=True)  # unchanged: nothing written
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in dest.iterdir()} == before
    members = shard_members(dest)
    make_plate(root, "plate-002", paper_plate(320, 240, seed=42))  # one changed plate
    make_tiles(str(root), params, str(dest), return_state=True)
    after = {p.name: p.stat().st_mtime_ns for p in dest.glob("*.tar")}
    touched = {n for n in set(after) | set(members) if n not in before or after.get(n) != before[n][0]}
    holders = {n for n, m in shard_members(dest).items() if any(x.startswith("plate-002-") for x in m)}
    old_holders = {n for n, m in members.items() if any(x.startswith("plate-002-") for x in m)}
    assert touched <= holders | old_holders and holders


@pytest.mark.parametrize("level", [0, 1, 3, 6])
def test_tile_pngs_decode_to_exactly_the_tile_pixels(level):
    from plateflow.tiles import encode_png

    rng = np.random.default_rng(level)
    smooth = np.cumsum(rng.integers(0, 3, (37, 53, 3)), axis=1).astype(np.uint8)  # odd sizes, wrapping differences
    for im in (Image.fromarray(smooth), Image.fromarray(smooth[..., 0]), Image.new("RGB", (1, 1), (255, 0, 7))):
        back = Image.open(io.BytesIO(encode_png(im, level)))
        assert back.mode == im.mode and np.array_equal(np.asarray(back), np.asarray(im))
    with pytest.raises(ValueError, match="8-bit RGB or L"):
        encode_png(Image.new("RGBA", (4, 4)), level)


@pytest.mark.usefixtures("prefect_harness")
def test_destinations_are_checked_before_any_work_and_a_killed_runs_temp_files_go(tmp_path):
    from typer.testing import CliRunner

    from app.cli import app

    runner = CliRunner()
    root, other = tmp_path / "corpus", tmp_path / "other"
    make_plate(root, "plate-001", paper_plate(256, 128))
    make_plate(other, "plate-001", paper_plate(256, 128, seed=3))

    def tiles(corpus, out, *extra) -> object:
        return runner.invoke(app, ["tiles", "--root", str(corpus), "--size", "128x128", "--out", str(out), *extra],
                             terminal_width=400)

    def refused(result, said: str) -> None:
        assert result.exit_code == 2 and "Traceback" not in result.output and said in result.output, result.output

    refused(tiles(root, root / "plates_structured" / "tiles"), "is inside a corpus's plates_structured/")
    assert not (root / "plates_structured" / "tiles").exists()
    (tmp_path / "a-file").write_text("x")
    refused(tiles(root, tmp_path / "a-file"), "is a file, not a folder")
    dest = tmp_path / "dest"
    assert tiles(root, dest).exit_code == 0
    refused(tiles(other, dest), f"holds the tiles of another corpus, {root}")
    mine = sorted(p.name for p in dest.glob("*.tar"))
    assert mine and json.loads((dest / ".plateflow-tiles.json").read_text())["corpus"] == str(root)  # untouched
    stale = dest / f".{mine[0]}.k1ll3d00.tmp"  # what a kill -9 mid-shard leaves
    stale.write_bytes(b"half a shard")
    assert tiles(root, dest).exit_code == 0 and not stale.exists()
    assert tiles(other, dest, "--force").exit_code == 0  # replaced, as asked
    assert json.loads((dest / ".plateflow-tiles.json").read_text())["corpus"] == str(other)
