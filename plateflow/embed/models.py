"""Embedding models: the capability table's entry (profiles/models.toml) with its weights, from
a local folder, the Hugging Face cache or the hub, or a ModelUnavailableError that says how to
provide them. Normalisation comes from the model's own config."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from plateflow.errors import ConfigError
from plateflow.profiles import ModelSpec


class ModelUnavailableError(ConfigError):
    """No weights for a model: the message names the model and how to provide them."""


@dataclass
class LoadedModel:
    spec: ModelSpec
    net: "object"  # torch.nn.Module
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def weights_dir(spec: ModelSpec, weights_root: Path | None) -> Path | None:
    if spec.weights is not None:  # a corpus's own model: its folder in the corpus, nothing else
        return Path(spec.weights)
    root = weights_root or (Path(os.environ["PLATEFLOW_WEIGHTS"]) if os.environ.get("PLATEFLOW_WEIGHTS") else None)
    if root and (Path(root) / spec.name).is_dir():
        return Path(root) / spec.name
    return None


def load_model(spec: ModelSpec, weights_root: Path | None = None) -> LoadedModel:
    """Weights from PLATEFLOW_WEIGHTS/<model>/ (or ``weights_root``), else the Hugging Face cache,
    else the hub when online. Normalisation comes from the model's own config. The vectors'
    dimension must be the table's ``embed_dim`` (the corpus tables are typed by it)."""
    local = weights_dir(spec, weights_root)
    try:
        loaded = _load_timm(spec, local) if spec.backend == "timm" else _load_transformers(spec, local)
    except (OSError, ValueError, RuntimeError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise _unavailable(spec, f"{type(exc).__name__}: {str(exc)[:300]}") from exc
    dim = loaded.net.num_features if spec.backend == "timm" else loaded.net.config.projection_dim
    if dim != spec.embed_dim:
        raise ConfigError(f"model {spec.name}: its weights give {dim}-dimensional vectors, but the "
                          f"capability table (profiles/models.toml) says embed_dim = {spec.embed_dim}; "
                          f"correct the table or the weights")
    return loaded


def _unavailable(spec: ModelSpec, why: str) -> ModelUnavailableError:
    if spec.weights is not None:
        return ModelUnavailableError(
            f"no weights for model {spec.name}, the corpus's fine-tuned {spec.architecture}: {why}. Its "
            f"folder {spec.weights} is named in the corpus's experiments/models.json; fine-tune again, "
            f"or remove the entry")
    return ModelUnavailableError(
        f"no weights for model {spec.name} ({spec.hub_id}): {why}. "
        f"Provide them by running `huggingface-cli download {spec.hub_id}` on a machine with "
        f"internet and copying the Hugging Face cache (~/.cache/huggingface) here, or by putting "
        f"the weights in $PLATEFLOW_WEIGHTS/{spec.name}/"
        + (" (model.safetensors)" if spec.backend == "timm" else " (save_pretrained layout)"))


# One of these, in a weights folder or a hub repository, holds (or indexes the shards of) a
# model; timm loads a folder's weights from one file, so only the first two there.
SINGLE_FILE_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
WEIGHT_FILES = (*SINGLE_FILE_WEIGHTS, "model.safetensors.index.json", "pytorch_model.bin.index.json")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it (1, on, yes, true), read now, not at import."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


HUB_PROBE_TIMEOUT_S = 10.0


def require_weights(spec: ModelSpec, weights_root: Path | None = None) -> None:
    """Raise ModelUnavailableError, before any work, when this machine cannot have the model's
    weights: none in the local folder or the Hugging Face cache, and the hub is off
    (HF_HUB_OFFLINE) or does not answer for the model within ``HUB_PROBE_TIMEOUT_S`` (no
    network: said once here, not after every plate's download has timed out). Reads no weights:
    only which files exist, and the hub's one answer about the model."""
    import huggingface_hub

    local = weights_dir(spec, weights_root)
    if local is not None:
        loadable = SINGLE_FILE_WEIGHTS if spec.backend == "timm" else WEIGHT_FILES
        if not any((local / f).is_file() for f in loadable):
            raise _unavailable(spec, f"{local} has no {' or '.join(loadable)}")
        return
    if any(isinstance(huggingface_hub.try_to_load_from_cache(spec.hub_id, f), str) for f in WEIGHT_FILES):
        return
    if hub_offline():
        raise _unavailable(spec, "not in the Hugging Face cache, and the hub is off (HF_HUB_OFFLINE)")
    try:
        huggingface_hub.HfApi().model_info(spec.hub_id, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - no network, a proxy, an unknown repo: the weights cannot come
        why = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise _unavailable(spec, f"not in the Hugging Face cache, and the hub did not provide them "
                                 f"({type(exc).__name__}: {why})") from None


def _load_timm(spec: ModelSpec, local: Path | None) -> LoadedModel:
    import timm
    from timm.data import resolve_model_data_config

    kwargs = dict(num_classes=0, img_size=spec.input_size, **spec.model_kwargs)
    if local is not None:
        files = [local / f for f in SINGLE_FILE_WEIGHTS if (local / f).is_file()]
        if not files:
            raise FileNotFoundError(f"{local} has no {' or '.join(SINGLE_FILE_WEIGHTS)}")
        net = timm.create_model(spec.architecture, pretrained=True,
                                pretrained_cfg_overlay={"file": str(files[0])}, **kwargs)
    else:
        net = timm.create_model(f"hf-hub:{spec.hub_id}", pretrained=True, **kwargs)
    cfg = resolve_model_data_config(net)
    return LoadedModel(spec, net.eval(), tuple(cfg["mean"]), tuple(cfg["std"]))


def _load_transformers(spec: ModelSpec, local: Path | None) -> LoadedModel:
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    source = str(local) if local is not None else spec.hub_id
    offline = hub_offline()
    net = CLIPVisionModelWithProjection.from_pretrained(source, local_files_only=offline)
    try:
        proc = CLIPImageProcessor.from_pretrained(source, local_files_only=offline)
    except OSError:
        proc = CLIPImageProcessor()  # CLIP's own defaults (OpenAI mean/std)
    return LoadedModel(spec, net.eval(), tuple(proc.image_mean), tuple(proc.image_std))
