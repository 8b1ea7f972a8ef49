"""The tables in profiles/: models, GPU classes and the rules that detect a class (capability),
and the dispatch policy (how work is handed out)."""

from __future__ import annotations

import os
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from plateflow.errors import ConfigError, problem

DEFAULT_PROFILES = Path(__file__).resolve().parents[1] / "profiles"


class ModelSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    backend: Literal["timm", "transformers"]
    hub_id: str
    architecture: str | None = None  # timm model name
    family: str
    input_size: int = Field(gt=0)
    embed_dim: int = Field(gt=0)
    min_vram_gb: float = Field(ge=0)
    batch: dict[str, int]
    model_kwargs: dict = Field(default_factory=dict)  # extra constructor arguments (tiny test models)
    weights: str | None = None  # a corpus's own model (a fine-tuned encoder): its weights folder

    def identity(self) -> str:
        """The entry as cache keys name it. The weights folder is left out: where a corpus is
        mounted changes no vector (a corpus model's ``hub_id`` names its folder in the corpus)."""
        return self.model_dump_json(exclude={"weights"})


class GpuClass(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    description: str = ""
    vram_gb: float
    dtype: Literal["float32", "float16", "bfloat16"]
    peak_tflops: float | None = None
    readers: Literal["threads", "device"] = "device"  # what decodes the working copies
    compile: Literal["", "default", "max-autotune-no-cudagraphs"] = ""  # torch.compile the encoder: a mode, or off


class DetectionRule(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    name: str | None = None
    min_memory_gb: float = 0
    min_capability: float = 0
    gpu_class: str = Field(alias="class")


class Profiles(BaseModel):
    model_config = ConfigDict(frozen=True)

    models: dict[str, ModelSpec]
    classes: dict[str, GpuClass]
    rules: list[DetectionRule]

    def model(self, name: str) -> ModelSpec:
        if name not in self.models:
            raise ConfigError(f"unknown model {name!r}; known models: {', '.join(self.models)}")
        return self.models[name]

    def gpu_class(self, name: str) -> GpuClass:
        if name not in self.classes:
            raise ConfigError(f"unknown GPU class {name!r}; known classes: {', '.join(self.classes)}")
        return self.classes[name]

    def plan(self, model_name: str, class_name: str) -> tuple[int, str]:
        """(batch size, dtype) for a model on a GPU class; refuses a model that does not fit."""
        spec, cls = self.model(model_name), self.gpu_class(class_name)
        if class_name not in spec.batch or (cls.vram_gb and spec.min_vram_gb > cls.vram_gb):
            fits = [m.name for m in self.models.values()
                    if m.family == spec.family and class_name in m.batch
                    and (not cls.vram_gb or m.min_vram_gb <= cls.vram_gb)]
            hint = f"use {fits[-1]}" if fits else "no model of that family fits this class"
            raise ConfigError(
                f"{model_name} does not fit GPU class {class_name} ({cls.vram_gb:g} GB, needs "
                f"{spec.min_vram_gb:g} GB): {hint}"
            )
        return spec.batch[class_name], cls.dtype


def profiles_dir() -> Path:
    return Path(os.environ.get("PLATEFLOW_PROFILES", DEFAULT_PROFILES))


def load_profiles(directory: Path | None = None, root: Path | str | None = None) -> Profiles:
    """Read models.toml and gpu_classes.toml (once per directory; PLATEFLOW_PROFILES overrides);
    with a corpus ``root``, its own models too (``corpus_models``: the fine-tuned encoders)."""
    directory = Path(directory or profiles_dir()).resolve()
    profiles = _load(directory)
    if root is None:
        return profiles
    own = corpus_models(Path(root), directory)
    return profiles.model_copy(update={"models": {**profiles.models, **own}}) if own else profiles


def corpus_models(root: Path, directory: Path) -> dict[str, ModelSpec]:
    """A corpus's own models, from ROOT/experiments/models.json (``register_model`` writes it):
    each is its base model's entry with another name and the weights of the corpus's folder.
    Read again only when the file changed."""
    from plateflow.layout import CorpusLayout

    path = CorpusLayout(Path(root)).models
    try:
        st = path.stat()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read the corpus's models {path}: {exc}") from None
    return _corpus_models(path.resolve(), (st.st_size, st.st_mtime_ns, st.st_ino), directory)


@lru_cache(maxsize=16)
def _corpus_models(path: Path, _stamp: tuple, directory: Path) -> dict[str, ModelSpec]:
    import json

    try:
        entries = json.loads(path.read_text())
        if not isinstance(entries, dict):
            raise ValueError("not a JSON object of models")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the corpus's models {path}: {exc}; remove the broken entry "
                          f"(or the file: its models' experiments stay)") from None
    root, profiles = path.parent.parent, _load(directory)
    models = {}
    for name, entry in entries.items():
        where = f"model {name!r} of {path}"
        if not isinstance(entry, dict) or not isinstance(entry.get("base"), str) or not isinstance(entry.get("weights"), str):
            raise ConfigError(f"{where}: needs a base model and a weights folder")
        if not _free_name(name, profiles.models):
            raise ConfigError(f"{where}: a corpus's model needs a name of letters, digits, _ and - that "
                              f"profiles/models.toml does not use")
        folder = (root / entry["weights"]).resolve()
        if not folder.is_relative_to(root.resolve()):
            raise ConfigError(f"{where}: its weights folder {entry['weights']!r} is outside the corpus")
        base = profiles.model(entry["base"])
        models[name] = base.model_copy(update={"name": name, "hub_id": f"corpus:{entry['weights']}",
                                               "weights": str(folder)})
    return models


def _free_name(name: str, known: dict) -> bool:
    """``name`` is a safe key (the one sanitiser leaves it as it is) that no profiles model uses."""
    from plateflow.layout import safe_key

    return safe_key(name) == name and name not in known


def check_model_name(name: str) -> None:
    """``ConfigError`` unless ``name`` can name a corpus's model: letters, digits, ``_`` and
    ``-``, and not a model of profiles/models.toml."""
    known = _load(profiles_dir().resolve()).models
    if not _free_name(name, known):
        raise ConfigError(f"cannot name a fine-tuned model {name!r}: use letters, digits, _ and - and a name "
                          f"profiles/models.toml does not use ({', '.join(known)})")


def register_model(root: Path, name: str, base: str, weights: Path) -> ModelSpec:
    """Record ``weights`` (a folder in the corpus holding ``model.safetensors`` of ``base``'s
    architecture) as the corpus's model ``name``, replacing one of that name; its spec. A
    ``base`` that is itself a corpus model gives its own base."""
    import json

    from plateflow.atomic import write_json
    from plateflow.layout import CorpusLayout

    root = Path(root)
    check_model_name(name)
    own = corpus_models(root, profiles_dir().resolve())  # a broken file is said, not overwritten
    path = CorpusLayout(root).models
    entries = json.loads(path.read_text()) if own else {}
    base = entries[base]["base"] if base in entries else base
    load_profiles().model(base)
    entries[name] = {"base": base, "weights": Path(weights).resolve().relative_to(root.resolve()).as_posix()}
    write_json(path, entries)
    return load_profiles(root=root).model(name)


@lru_cache(maxsize=8)
def _load(directory: Path) -> Profiles:
    try:
        models = tomllib.loads((directory / "models.toml").read_text())
        gpus = tomllib.loads((directory / "gpu_classes.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read the capability tables in {directory}: {exc}") from None
    if not isinstance(gpus.get("classes"), dict):
        raise ConfigError(f"{directory / 'gpu_classes.toml'} has no [classes] table")

    def entry(kind: type[BaseModel], where: str, **values) -> BaseModel:
        try:
            return kind(**values)
        except (TypeError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
            raise ConfigError(f"{where}: {problem(exc)}") from None

    return Profiles(
        models={k: entry(ModelSpec, f"{directory / 'models.toml'} [{k}]", name=k, **v) for k, v in models.items()},
        classes={k: entry(GpuClass, f"{directory / 'gpu_classes.toml'} [classes.{k}]", name=k, **v)
                 for k, v in gpus["classes"].items()},
        rules=[entry(DetectionRule, f"{directory / 'gpu_classes.toml'} [[rules]] {i + 1}", **r)
               for i, r in enumerate(gpus.get("rules", []))],
    )


class CpuPolicy(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_workers: int = Field(ge=1)
    batch_plates: int = Field(ge=1)
    batch_megabytes: float = Field(gt=0)


class GpuPolicy(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    chunk_size: int = Field(ge=1)
    worker_wait_minutes: float = Field(gt=0)
    max_run_plates: int = Field(ge=1)
    crash_retries: int = Field(ge=0)
    poll_seconds: float = Field(gt=0)


class DispatchPolicy(BaseModel):
    """profiles/dispatch.toml: defaults for handing out work; none of it changes a result."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cpu: CpuPolicy
    gpu: GpuPolicy


def dispatch_policy(directory: Path | None = None) -> DispatchPolicy:
    """profiles/dispatch.toml, read once per directory (PLATEFLOW_PROFILES overrides)."""
    return _load_table(Path(directory or profiles_dir()).resolve(), "dispatch.toml", DispatchPolicy,
                       "the dispatch policy")


@lru_cache(maxsize=16)
def _load_table(directory: Path, name: str, model: type[BaseModel], what: str) -> BaseModel:
    """One TOML table of profiles/, validated by ``model``; ``ConfigError`` naming the file."""
    path = directory / name
    try:
        return model(**tomllib.loads(path.read_text()))
    except (OSError, tomllib.TOMLDecodeError, ValueError) as exc:
        raise ConfigError(f"cannot read {what} {path}: {problem(exc)}") from None


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ScaleSection(_Section):
    long_side: int = Field(ge=16)


class PaperSection(_Section):
    min_luminance: int = Field(ge=0, le=255)
    width: int = Field(ge=0, le=64)
    min_share: float = Field(ge=0, le=1)
    margin: int = Field(ge=0, le=255)


class DarkSection(_Section):
    percentile: float = Field(ge=0, le=100)
    max_luminance: int = Field(ge=0, le=255)


class LightSection(_Section):
    percentile: float = Field(ge=0, le=100)
    min_luminance: int = Field(ge=0, le=255)
    min_foreground: float = Field(ge=0, le=1)


class LowInformationSection(_Section):
    min_foreground: float = Field(ge=0, le=1)
    min_entropy: float = Field(ge=0, le=8)


class BlurrySection(_Section):
    cell: int = Field(ge=2)
    tiles: int = Field(ge=1)
    tile: int = Field(ge=8)
    min_gradient: float = Field(ge=0)
    max_edge_width: float = Field(gt=0)


class AspectSection(_Section):
    max_ratio: float = Field(ge=1)


class GrayscaleSection(_Section):
    reduce: int = Field(ge=1, le=16)
    min_level: int = Field(ge=0, le=255)
    offset: float = Field(gt=0)
    percentile: float = Field(ge=0, le=100)
    max_tint_spread: float = Field(ge=0)


class OddSizeSection(_Section):
    min_side: float = Field(ge=0)
    max_factor: float = Field(gt=1)
    min_plates: int = Field(ge=2)


class NearDuplicatesSection(_Section):
    max_distance: int = Field(ge=0, le=16)
    crops: tuple[float, ...] = Field(max_length=4)
    min_line_share: float = Field(gt=0, le=1)


class ReportThresholds(_Section):
    embedding_duplicate_cosine: float = Field(gt=0, le=1)
    embedding_outlier_z: float = Field(gt=0)


class QualityProfile(BaseModel):
    """profiles/quality.toml: the plates' quality flags and what the corpus report flags."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scale: ScaleSection
    paper: PaperSection
    dark: DarkSection
    light: LightSection
    low_information: LowInformationSection
    blurry: BlurrySection
    odd_aspect_ratio: AspectSection
    grayscale: GrayscaleSection
    odd_size: OddSizeSection
    near_duplicates: NearDuplicatesSection
    report: ReportThresholds

    def fingerprint(self) -> str:
        """Of the sections a plate's own flags depend on (the per-plate cache key's part)."""
        import hashlib
        import json

        data = self.model_dump(exclude={"odd_size", "report"})
        data["near_duplicates"].pop("max_distance")  # the hashes are per plate; the distance is the corpus's
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def quality_profile(directory: Path | None = None) -> QualityProfile:
    """profiles/quality.toml, read once per directory (PLATEFLOW_PROFILES overrides)."""
    return _load_table(Path(directory or profiles_dir()).resolve(), "quality.toml", QualityProfile,
                       "the quality profile")
