import math

import numpy as np
import pytest
from PIL import Image

from plateflow.config import CharacterizeParams
from plateflow.characterize.step import characterize_image
from plateflow.characterize.histograms import compute_histograms, hist_entropy, histogram_record, rebin


def test_solid_colour_has_exact_statistics(tmp_path):
    path = tmp_path / "solid.png"
    Image.new("RGB", (30, 20), (200, 100, 50)).save(path)
    meta = characterize_image(path, CharacterizeParams()).metadata
    assert meta["mean_rgb"] == [200.0, 100.0, 50.0]
    assert meta["std_rgb"] == [0.0, 0.0, 0.0]
    assert meta["min_rgb"] == [200, 100, 50] and meta["max_rgb"] == [200, 100, 50]
    # Rec. 709: 0.2126*200 + 0.7152*100 + 0.0722*50 = 117.66 -> 118
    assert meta["luminance_mean"] == 118.0 and meta["luminance_std"] == 0.0
    assert meta["entropy"] == 0.0
    assert meta["grayscale_like"] is False
    assert meta["background_ratio"] == 0.0


def test_solid_colour_histograms_and_entropy():
    h = compute_histograms(Image.new("RGB", (10, 10), (250, 250, 250)), background_threshold=245)
    assert h.rgb[0, 250] == 100 and h.rgb.sum() == 300
    assert h.luminance[250] == 100
    assert h.background_pixels == 100 and h.foreground.sum() == 0
    rec = histogram_record(h, 256)
    assert rec["background_ratio"] == 1.0
    assert rec["entropy"] == {"r": 0.0, "g": 0.0, "b": 0.0, "luminance": 0.0}


def test_two_equal_halves_have_one_bit_of_entropy_and_known_std():
    a = np.zeros((10, 10, 3), np.uint8)
    a[:5] = (0, 0, 0)
    a[5:] = (255, 255, 255)
    h = compute_histograms(Image.fromarray(a))
    assert hist_entropy(h.luminance) == pytest.approx(1.0)
    meta_std = math.sqrt(((0 - 127.5) ** 2 + (255 - 127.5) ** 2) / 2)
    from plateflow.characterize.histograms import hist_mean_std
    assert hist_mean_std(h.rgb[1]) == pytest.approx((127.5, meta_std))
    assert h.grayscale_like is True


def test_histograms_equal_pillow_on_random_pixels():
    rng = np.random.default_rng(1)
    im = Image.fromarray(rng.integers(0, 256, (123, 77, 3), dtype=np.uint8))
    h = compute_histograms(im, background_threshold=200)
    assert h.rgb.reshape(-1).tolist() == im.histogram()
    # Foreground = pixels whose luminance is below the threshold; Pillow's masked histogram agrees.
    a = np.asarray(im)
    lum = (a.astype(np.int64) @ [13933, 46871, 4732] + 32768) >> 16
    fg_mask = Image.fromarray(((lum < 200) * 255).astype(np.uint8))
    assert h.foreground.reshape(-1).tolist() == im.histogram(mask=fg_mask)


def test_luminance_is_rec709_in_fixed_point_and_close_to_float():
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    h = compute_histograms(Image.fromarray(a))
    fixed = (a.astype(np.int64) @ [13933, 46871, 4732] + 32768) >> 16
    assert h.luminance.tolist() == np.bincount(fixed.ravel(), minlength=256).tolist()
    exact = a.astype(np.float64) @ [0.2126, 0.7152, 0.0722]
    assert np.abs(fixed - exact).max() <= 0.5 + 1 / 256


def test_rgb_file_with_equal_channels_is_grayscale_like(tmp_path):
    path = tmp_path / "grey.jpg"
    Image.new("L", (40, 30), 90).convert("RGB").save(path, quality=95)
    assert characterize_image(path, CharacterizeParams()).metadata["grayscale_like"] is True


def test_rebin_sums_adjacent_bins():
    hist = np.arange(256)
    assert rebin(hist, 4).tolist() == [hist[i * 64:(i + 1) * 64].sum() for i in range(4)]


def test_histogram_output_is_byte_identical_across_runs(tmp_path):
    from plateflow.atomic import dumps_json

    path = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (50, 60, 3), dtype=np.uint8)).save(path)
    a = characterize_image(path, CharacterizeParams())
    b = characterize_image(path, CharacterizeParams())
    assert dumps_json(a.histograms) == dumps_json(b.histograms)
    assert dumps_json(a.metadata) == dumps_json(b.metadata)
