import io

import numpy as np
import pytest
from PIL import Image

from plateflow.config import CharacterizeParams
from plateflow.errors import ImageDecodeError, TooManyPixelsError
from plateflow.characterize.step import characterize_image
from plateflow.image import decode_image

from fixtures.plates import paper_plate, read_image

MODES = ["RGB", "L", "LA", "RGBA", "P", "CMYK", "1", "I;16", "I", "F"]


@pytest.mark.parametrize("mode", MODES)
def test_every_scan_mode_decodes_to_rgb(tmp_path, mode):
    src = paper_plate(64, 48)
    im = src.convert(mode) if mode not in ("I;16", "I", "F") else src.convert("L").convert(mode)
    fmt = {"CMYK": "JPEG", "F": "TIFF", "I;16": "PNG", "I": "TIFF"}.get(mode, "PNG")
    if mode == "I;16":
        im = Image.fromarray(np.asarray(src.convert("L")).astype(np.uint16) * 257)
    path = tmp_path / f"img.{fmt.lower()}"
    im.save(path, fmt)
    d = decode_image(path, max_pixels=10**6)
    assert d.image.mode == "RGB" and d.image.size == (64, 48)
    assert d.image_format == fmt
    meta = characterize_image(path, CharacterizeParams()).metadata
    assert meta["mode"] == read_image(path).mode
    assert 0 <= meta["luminance_mean"] <= 255
    if mode in ("L", "LA", "1", "I;16", "I", "F"):
        assert meta["grayscale_like"] is True


def test_sixteen_bit_keeps_the_high_byte(tmp_path):
    a = np.full((8, 8), 0xAB12, np.uint16)
    path = tmp_path / "sixteen.png"
    Image.fromarray(a).save(path)
    meta = characterize_image(path, CharacterizeParams()).metadata
    assert meta["bit_depth"] == 16 and meta["mean_rgb"] == [0xAB] * 3


@pytest.mark.parametrize("fmt,byteorder", [("PNG", None), ("TIFF", "<"), ("TIFF", ">")])
def test_sixteen_bit_grey_keeps_each_pixels_high_byte_in_either_byte_order(tmp_path, fmt, byteorder):
    import tifffile

    a = np.random.default_rng(3).integers(0, 65536, (37, 53), dtype=np.uint16)
    path = tmp_path / f"grey.{fmt.lower()}"
    if fmt == "PNG":
        Image.fromarray(a).save(path)
    else:
        tifffile.imwrite(path, a, byteorder=byteorder)
    with Image.open(path) as im:
        assert im.mode == {"PNG": "I;16", "<": "I;16", ">": "I;16B"}[byteorder or fmt]
    rgb = np.asarray(decode_image(path, 10**6).image)
    assert np.array_equal(rgb, np.repeat((a >> 8).astype(np.uint8)[..., None], 3, axis=2))


def test_sixteen_bit_rgb_tiff_is_read_with_its_bit_depth(tmp_path):
    import tifffile

    a = np.full((6, 9, 3), (0x1234, 0x8000, 0xFFFF), np.uint16)
    path = tmp_path / "archival.tif"
    tifffile.imwrite(path, a, photometric="rgb", compression="zlib")
    meta = characterize_image(path, CharacterizeParams()).metadata
    assert meta["bit_depth"] == 16 and meta["image_format"] == "TIFF"
    assert meta["mean_rgb"] == [0x12, 0x80, 0xFF]


def test_alpha_is_composited_on_white(tmp_path):
    path = tmp_path / "clear.png"
    Image.new("RGBA", (10, 10), (0, 0, 0, 0)).save(path)
    meta = characterize_image(path, CharacterizeParams()).metadata
    assert meta["has_alpha"] is True and meta["mean_rgb"] == [255.0, 255.0, 255.0]


def test_multiframe_tiff_uses_first_frame_and_counts_frames(tmp_path):
    path = tmp_path / "pages.tif"
    first = Image.new("RGB", (20, 10), (10, 20, 30))
    first.save(path, save_all=True, append_images=[Image.new("RGB", (20, 10), (200, 200, 200))] * 2)
    meta = characterize_image(path, CharacterizeParams()).metadata
    assert meta["frames"] == 3 and meta["mean_rgb"] == [10.0, 20.0, 30.0]
    assert meta["image_format"] == "TIFF"


def test_format_is_detected_not_taken_from_the_extension(tmp_path):
    path = tmp_path / "really_a_png.jpg"
    paper_plate(32, 32).save(path, "PNG")
    assert decode_image(path, 10**6).image_format == "PNG"


def test_exif_orientation_is_recorded_and_applied(tmp_path):
    im = paper_plate(60, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    path = tmp_path / "rotated.jpg"
    im.save(path, exif=exif.tobytes())
    meta = characterize_image(path, CharacterizeParams()).metadata
    assert meta["exif_orientation"] == 6
    assert (meta["width"], meta["height"]) == (20, 60)


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"", "empty file"),
        (b"this is a text file, not a scan\n", "not an image"),
        (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8, "not an image, or a corrupt one"),
    ],
    ids=["empty", "not-an-image", "garbage-after-jpeg-signature"],
)
def test_bad_files_fail_with_a_clear_message(tmp_path, payload, message):
    path = tmp_path / "bad.jpg"
    path.write_bytes(payload)
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(path, 10**6)


def test_corrupt_png_data_fails_with_a_clear_message(tmp_path):
    buf = io.BytesIO()
    paper_plate(200, 150).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    start = data.find(b"IDAT") + 40
    data[start:start + 200] = bytes(range(200))
    path = tmp_path / "corrupt.png"
    path.write_bytes(bytes(data))
    with pytest.raises(ImageDecodeError, match="corrupt or truncated PNG data"):
        decode_image(path, 10**6)


def test_truncated_jpeg_fails_with_a_clear_message(tmp_path):
    buf = io.BytesIO()
    paper_plate(200, 150).save(buf, "JPEG")
    path = tmp_path / "truncated.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(path, 10**6)


def test_too_many_pixels_fails_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (200, 100)).save(path)
    with pytest.raises(TooManyPixelsError, match=r"200x100 = 0.0 MP exceeds the limit.*max_pixels"):
        decode_image(path, max_pixels=10_000)


def test_hash_mismatch_is_a_transient_error(tmp_path):
    from plateflow.errors import is_transient

    path = tmp_path / "x.png"
    paper_plate(16, 16).save(path)
    with pytest.raises(OSError, match="changed while it was being read") as info:
        decode_image(path, 10**6, expected_sha256="0" * 64)
    assert is_transient(info.value)


def test_flags_for_large_and_extreme_plates(tmp_path):
    path = tmp_path / "strip.png"
    Image.new("RGB", (400, 100), "white").save(path)
    meta = characterize_image(path, CharacterizeParams(very_large_megapixels=0.01)).metadata
    assert meta["extreme_aspect"] is True and meta["very_large"] is True
    assert meta["aspect_ratio"] == 4.0 and meta["megapixels"] == 0.04


def _grey_sources(tmp_path):
    """A plate without colour in each way a scan comes without it, at a size where every
    quality score is measured (blur tiles, content box, perceptual hashes)."""
    rng = np.random.default_rng(5)
    grey = np.asarray(paper_plate(900, 700, photo_colour=(90, 90, 90)).convert("L"))
    grey = np.clip(grey.astype(np.int16) + rng.integers(-40, 40, grey.shape), 0, 255).astype(np.uint8)
    wide = grey.astype(np.uint16) * 256 + rng.integers(0, 256, grey.shape, dtype=np.uint16)
    alpha = np.where(np.arange(900)[None, :] < 120, 60, 255).astype(np.uint8) * np.ones((700, 1), np.uint8)
    images = {
        "L.png": Image.fromarray(grey, "L"),
        "I16.png": Image.fromarray(wide),
        "LA.png": Image.merge("LA", [Image.fromarray(grey, "L"), Image.fromarray(alpha, "L")]),
        "1.png": Image.fromarray(grey, "L").convert("1"),
        "I.tif": Image.fromarray(wide.astype(np.int32), "I"),
        "F.tif": Image.fromarray(grey.astype(np.float32) / 255, "F"),
    }
    for name, im in images.items():
        im.save(tmp_path / name)
    return [tmp_path / name for name in images]


def test_a_plate_without_colour_is_decoded_to_one_channel_and_characterized_as_its_rgb(tmp_path):
    """Grey sources stay "L" through the characterization (a third of the pixels to count and
    reduce); everything made from them is what their RGB makes: an RGB PNG of the very pixels the
    RGB decode gives has the same histograms, scores, pixel hash, preview and working copy."""
    from plateflow.image import decode_bytes, to_rgb

    params = CharacterizeParams(working_copy=True, working_short_side=300)
    for path in _grey_sources(tmp_path):
        data = path.read_bytes()
        grey, rgb = decode_bytes(data, path.name, 10**7, grey=True), decode_bytes(data, path.name, 10**7)
        assert grey.image.mode == "L" and rgb.image.mode == "RGB", path.name
        assert np.array_equal(np.asarray(grey.image.convert("RGB")), np.asarray(rgb.image)), path.name
        if path.name == "LA.png":  # composited on white paper as RGBA is
            with Image.open(path) as im:
                rgba = im.convert("RGBA")
                paper = Image.new("RGB", im.size, (255, 255, 255))
                paper.paste(rgba, mask=rgba.getchannel("A"))
            assert np.array_equal(np.asarray(paper), np.asarray(to_rgb(Image.open(path))))
        twin = tmp_path / f"twin-{path.stem}.png"
        rgb.image.save(twin)
        ours, theirs = characterize_image(path, params), characterize_image(twin, params)
        assert ours.histograms == theirs.histograms, path.name
        assert ours.metadata["quality"] == theirs.metadata["quality"], path.name
        assert ours.metadata["quality"]["phash"] and ours.metadata["quality"]["edge_width"], path.name
        assert ours.preview_png == theirs.preview_png and ours.working_jpeg == theirs.working_jpeg, path.name
        same = {"file_size_bytes", "sha256", "image_format", "mode", "bit_depth", "has_alpha"}
        assert {k: v for k, v in ours.metadata.items() if k not in same} == \
               {k: v for k, v in theirs.metadata.items() if k not in same}, path.name


def test_each_plates_decode_reuses_the_memory_of_the_plate_before(tmp_path):
    """A large decoded image is a mapping of its own: freed, the next plate's decode would fault
    new pages in. The characterization keeps each plate's image (``recycle``) and the next
    decode gets its block from Pillow's cache of freed blocks, whatever smaller images were
    made in between."""
    import pyarrow as pa

    from plateflow.image import decode_bytes, recycle, release_recycled

    def address(im):
        return pa.array(im).values.buffers()[1].address

    first, second = (tmp_path / "first.png", tmp_path / "second.jpg")
    paper_plate(900, 700, seed=1).save(first)
    paper_plate(880, 690, seed=2).save(second)
    a = decode_bytes(first.read_bytes(), first.name, 10**7).image
    where = address(a)
    recycle(a)
    del a
    smalls = [Image.new("RGB", (90 + i, 60)) for i in range(8)]  # previews, plots: from the cache too
    del smalls
    before = Image.core.get_stats()
    b = decode_bytes(second.read_bytes(), second.name, 10**7).image
    after = Image.core.get_stats()
    assert address(b) == where
    assert after["allocated_blocks"] == before["allocated_blocks"] and after["reused_blocks"] > before["reused_blocks"]
    recycle(b)
    release_recycled()  # a batch's end: nothing is held
    from plateflow.image import _RECYCLED

    assert _RECYCLED.image is None


def _every_kind_of_source(tmp_path):
    """Sources of every mode and reader, and bad ones."""
    import tifffile
    import skimage
    from pathlib import Path

    paths = []
    src = paper_plate(64, 48)
    for mode in MODES:
        im = src.convert(mode) if mode not in ("I;16", "I", "F") else src.convert("L").convert(mode)
        fmt = {"CMYK": "JPEG", "F": "TIFF", "I;16": "PNG", "I": "TIFF"}.get(mode, "PNG")
        if mode == "I;16":
            im = Image.fromarray(np.asarray(src.convert("L")).astype(np.uint16) * 257)
        paths.append(tmp_path / f"{mode.replace(';', '')}.{fmt.lower()}")
        im.save(paths[-1], fmt)
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    src.save(rotated, exif=exif.tobytes())
    big_endian = tmp_path / "sixteen-be.tif"
    tifffile.imwrite(big_endian, np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 13, byteorder=">")
    lzw = tmp_path / "lzw.tif"
    src.save(lzw, compression="tiff_lzw")
    frames = tmp_path / "frames.tif"
    src.save(frames, save_all=True, append_images=[src.rotate(90, expand=True)])
    planar = tmp_path / "planar-float.tif"  # Pillow refuses it: tifffile reads it
    planar.write_bytes((Path(skimage.data.__file__).parent / "multipage_rgb.tif").read_bytes())
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(rotated.read_bytes()[:600])
    empty, text = tmp_path / "empty.png", tmp_path / "notes.png"
    empty.write_bytes(b"")
    text.write_bytes(b"not an image at all")
    return paths + [rotated, big_endian, lzw, frames, planar, truncated, empty, text]


def test_a_source_decoded_from_its_open_file_is_the_one_decoded_from_its_bytes(tmp_path):
    """A refresh hands the characterization each source's hash and the stat it holds at; the
    file is then decoded as Pillow (or libtiff) reads it, not from a copy of it in memory. What
    comes of it is what the bytes give, every field, for every kind of source; bad ones fail
    alike."""
    import os
    import time

    from plateflow.hashindex import SourceIndex, sha256_file

    params = CharacterizeParams(working_copy=True)
    for path in _every_kind_of_source(tmp_path):
        os.utime(path, (time.time() - 3600,) * 2)
        index = SourceIndex(tmp_path)
        index.record(path, sha256_file(path))
        hashed = (sha256_file(path), index.stamp(path))
        assert hashed[1] is not None
        outcomes = []
        for how in (None, hashed):
            try:
                outcomes.append(characterize_image(path, params, hashed=how))
            except Exception as exc:  # noqa: BLE001 - a bad source must fail alike both ways
                outcomes.append((type(exc), str(exc)))
        assert outcomes[0] == outcomes[1], path.name
        if path.stem in ("truncated", "empty", "notes"):
            assert isinstance(outcomes[0], tuple) and issubclass(outcomes[0][0], ImageDecodeError), path.name
        else:
            assert outcomes[0].metadata["loadable"] is True, path.name
