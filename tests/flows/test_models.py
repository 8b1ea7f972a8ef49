"""DINOv3 and SigLIP beside DINOv2 and CLIP (profiles/models.toml): each table entry matches the
architecture timm builds from its config, normalisation comes from the model's own config, and
tiny random-weight models of both architectures run the real refresh, smart crop and heads."""

import tomllib

import numpy as np
import pyarrow.parquet as pq
import pytest

from flows.refresh import refresh_corpus
from plateflow.config import HeadConfig, RefreshConfig
from plateflow.features import open_store
from plateflow.heads import train_experiment
from plateflow.layout import CorpusLayout
from plateflow.profiles import DEFAULT_PROFILES

from fixtures.plates import make_plate, paper_plate

NEW = ("dinov3_small", "dinov3_base", "dinov3_large", "siglip_base", "siglip_so400m")


@pytest.mark.parametrize("name", NEW)
def test_a_table_entry_is_the_model_timm_builds(name):
    import timm
    import torch

    entry = tomllib.loads((DEFAULT_PROFILES / "models.toml").read_text())[name]
    arch, tag = entry["architecture"].split(".")
    assert entry["hub_id"] == f"timm/{entry['architecture']}"
    with torch.device("meta"):  # the architecture only: no memory for its weights
        net = timm.create_model(arch, pretrained=False, num_classes=0, img_size=entry["input_size"])
    assert net.num_features == entry["embed_dim"]
    mean = timm.get_pretrained_cfg(entry["architecture"]).mean
    assert mean == ((0.5, 0.5, 0.5) if entry["family"] == "siglip" else (0.485, 0.456, 0.406))
    assert {"CPU", "T4_16GB", "H100_80GB"} <= set(entry["batch"])


@pytest.mark.usefixtures("prefect_harness")
def test_dinov3_and_siglip_embed_crop_and_train_heads(tmp_path, tiny_env):
    from plateflow.embed.models import load_model
    from plateflow.profiles import load_profiles

    profiles = load_profiles()
    assert load_model(profiles.model("tiny_siglip")).mean == (0.5, 0.5, 0.5)  # from the model's config
    assert load_model(profiles.model("tiny_dinov3")).mean == pytest.approx((0.485, 0.456, 0.406))

    root = tmp_path / "corpus"
    rng = np.random.default_rng(0)
    labels = {}
    for i in range(24):
        kind = "red" if i % 2 else "blue"
        warm, other = int(rng.integers(150, 235)), int(rng.integers(10, 90))
        colour = (warm, other, other // 2) if kind == "red" else (other // 2, other, warm)
        folder = f"plate-{i + 1:03d}"
        make_plate(root, folder, paper_plate(160, 120, seed=i, photo_colour=colour),
                   manifest={"plate_id": folder, "source_image": "source/scan.jpg", "kind": kind})
        labels[folder] = kind
    models = ["tiny_dinov3", "tiny_siglip"]
    state = refresh_corpus(str(root), RefreshConfig(models=models, crop_model="tiny_siglip", gpu_class="CPU"),
                           return_state=True)
    assert state.is_completed(), state.message
    corpus = CorpusLayout(root)
    table = pq.read_table(corpus.table).to_pylist()
    assert all(r["status"] == "ok" and r["crop_box"] and r["similarity"] is not None for r in table)
    for model in models:
        store = open_store(corpus.features(model))
        assert store.rows == 24 and store.vectors.shape[2] == 32
        assert np.isfinite(np.asarray(store.vectors, np.float32)).all()
        row = train_experiment(root, model, "kind", HeadConfig(epochs=20, test_fraction=0.25), labels)
        assert row["test_size"] > 0 and row["accuracy"] is not None
