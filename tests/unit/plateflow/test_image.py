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
