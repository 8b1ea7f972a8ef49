"""The saved best crop: cut from the full-resolution source, the same pixels on every path."""

import io

import numpy as np
import pytest
from PIL import Image

from plateflow.errors import PlateError
from plateflow.smart_crop import _cut_crop_streaming, cut_crop
from plateflow.image import decode_image
from plateflow.tables import write_embeddings_table

BOX = [100, 50, 500, 400]


@pytest.fixture(scope="module")
def picture():
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((300, 400, 3)) * 255).astype(np.uint8)).resize((800, 600))


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.int16)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_streamed_jpeg_crop_is_pixel_exact_for_every_exif_orientation(tmp_path, picture, orientation):
    exif = Image.Exif()
    exif[274] = orientation
    src = tmp_path / "plate.jpg"
    picture.save(src, quality=95, exif=exif.tobytes())
    expected = np.asarray(decode_image(src, 10**9).image.crop(tuple(BOX)), np.int16)

    streamed = _cut_crop_streaming(src, BOX, "png")
    assert streamed is not None  # an 8-bit RGB JPEG takes the libvips path
    assert np.array_equal(pixels(streamed), expected)
    jpeg = Image.open(io.BytesIO(cut_crop(src, BOX, "jpeg")))
    assert jpeg.format == "JPEG" and jpeg.size == (400, 350)
    assert jpeg.getexif().get(274) in (None, 1)  # no orientation left to apply twice


def test_grayscale_jpeg_crop_comes_out_rgb(tmp_path, picture):
    src = tmp_path / "gray.jpg"
    picture.convert("L").save(src, quality=95)
    out = Image.open(io.BytesIO(cut_crop(src, BOX, "png")))
    assert out.mode == "RGB"
    assert np.array_equal(np.asarray(out, np.int16),
                          np.asarray(decode_image(src, 10**9).image.crop(tuple(BOX)), np.int16))


@pytest.mark.parametrize("name, save", [
    ("plate.png", lambda im, p: im.save(p)),
    ("plate16.tif", lambda im, p: Image.fromarray(np.asarray(im.convert("L"), np.uint16) * 257).save(p)),
    ("cmyk.jpg", lambda im, p: im.convert("CMYK").save(p, quality=95)),
])
def test_other_sources_are_cut_by_pillow_as_the_cpu_stage_decoded_them(tmp_path, picture, name, save):
    src = tmp_path / name
    save(picture, src)
    assert _cut_crop_streaming(src, BOX, "png") is None
    out = cut_crop(src, BOX, "png")
    assert np.array_equal(pixels(out), np.asarray(decode_image(src, 10**9).image.crop(tuple(BOX)), np.int16))


def test_a_truncated_source_fails_with_the_decoders_message(tmp_path, picture):
    src = tmp_path / "cut.jpg"
    buf = io.BytesIO()
    picture.save(buf, "JPEG", quality=95)
    src.write_bytes(buf.getvalue()[:3000])
    with pytest.raises(PlateError, match="truncated"):
        cut_crop(src, BOX, "jpeg")


def test_the_embeddings_table_keeps_its_vector_type_with_no_rows_and_refuses_wrong_shapes(tmp_path):
    import pyarrow.parquet as pq

    boxes = [[0, 0, 8, 8], [2, 2, 6, 6]]
    path = write_embeddings_table(tmp_path, "m", [], dim=7)  # every plate failed this time
    table = pq.read_table(path)
    assert table.num_rows == 0 and table.schema.field("vector").type.list_size == 7
    path = write_embeddings_table(tmp_path, "m", [("p1", "a" * 64, boxes, np.full((2, 7), 0.5))], dim=7)
    assert pq.read_table(path).column("vector").to_pylist() == [[0.5] * 7, [0.5] * 7]
    with pytest.raises(ValueError, match=r"m vectors of p2: shape \(2, 6\), expected \(2, 7\)"):
        write_embeddings_table(tmp_path, "m", [("p2", "b" * 64, boxes, np.zeros((2, 6)))], dim=7)
    assert pq.read_table(path).num_rows == 2  # the table on disk is untouched
