"""Tiny models with random weights, built from a config and saved where plateflow loads weights
from (PLATEFLOW_WEIGHTS/<model>/), plus a profiles directory that lists them."""

from __future__ import annotations

import shutil
from pathlib import Path

from plateflow.profiles import DEFAULT_PROFILES

TINY_MODELS = """
[tiny_dinov2]
backend = "timm"
hub_id = "plateflow-tests/tiny-dinov2"
architecture = "vit_small_patch14_dinov2"
family = "dinov2"
input_size = 28
embed_dim = 32
min_vram_gb = 0
batch = { CPU = 16, T4_16GB = 64, L4_24GB = 64 }
model_kwargs = { depth = 2, embed_dim = 32, num_heads = 2 }

# dinov2's LayerScale starts at 1e-5: with random weights its output barely depends on the image.
# This one starts at 1, so its features see the pixels (the heads' tests train on them).
[tiny_vit]
backend = "timm"
hub_id = "plateflow-tests/tiny-vit"
architecture = "vit_small_patch14_dinov2"
family = "dinov2"
input_size = 28
embed_dim = 32
min_vram_gb = 0
batch = { CPU = 16 }
model_kwargs = { depth = 2, embed_dim = 32, num_heads = 2, init_values = 1.0 }

[tiny_clip]
backend = "transformers"
hub_id = "plateflow-tests/tiny-clip"
family = "clip"
input_size = 32
embed_dim = 16
min_vram_gb = 0
batch = { CPU = 16 }

[huge_dinov2]
backend = "timm"
hub_id = "plateflow-tests/huge"
architecture = "vit_small_patch14_dinov2"
family = "dinov2"
input_size = 28
embed_dim = 32
min_vram_gb = 40
batch = { A100_80GB = 8 }
"""


def build_tiny_models(base: Path) -> tuple[Path, Path]:
    """(profiles dir, weights dir) for the tiny models."""
    import timm
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    profiles = base / "profiles"
    profiles.mkdir(parents=True)
    for name in ("gpu_classes.toml", "dispatch.toml", "quality.toml"):
        shutil.copy(DEFAULT_PROFILES / name, profiles)
    (profiles / "models.toml").write_text(TINY_MODELS)
    weights = base / "weights"
    (weights / "tiny_dinov2").mkdir(parents=True)
    net = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=28,
                            depth=2, embed_dim=32, num_heads=2)
    save_file(net.state_dict(), weights / "tiny_dinov2" / "model.safetensors")
    (weights / "tiny_vit").mkdir(parents=True)
    torch.manual_seed(1)
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=28,
                            depth=2, embed_dim=32, num_heads=2, init_values=1.0)
    save_file(vit.state_dict(), weights / "tiny_vit" / "model.safetensors")
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16)
    CLIPVisionModelWithProjection(cfg).save_pretrained(weights / "tiny_clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        weights / "tiny_clip")
    return profiles, weights
