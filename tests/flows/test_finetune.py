"""Fine-tuning an encoder's last blocks in resumable micro-jobs (plateflow/finetune.py,
flows/finetune.py): on a task the frozen tiny random encoder cannot solve (are the stripes
horizontal or vertical?), the fine-tuned one does, and a run killed with SIGKILL continues."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from flows.finetune import finetune
from flows.refresh import refresh_corpus
from plateflow.config import HeadConfig, RefreshConfig
from plateflow.experiments import experiments
from plateflow.features import open_store
from plateflow.finetune import FinetuneConfig, FinetuneRun, labelled_items
from plateflow.heads import train_experiment
from plateflow.layout import CorpusLayout

from fixtures import DEVICE, REPO
from fixtures.plates import make_plate
from fixtures.processes import wait_until

MODEL = "tiny_seg"  # 112 px, 8 x 8 patches (tests/fixtures/tiny_models.py)


def stripes(seed: int, horizontal: bool, size: int = 112) -> Image.Image:
    rng = np.random.default_rng(seed)
    period = int(rng.integers(4, 9))
    band = ((np.arange(size) + int(rng.integers(0, period))) // (period // 2)) % 2
    pattern = np.broadcast_to(band[:, None] if horizontal else band[None, :], (size, size))
    a, b = rng.integers(0, 100, 3), rng.integers(156, 256, 3)  # dark and light stripes of any hue
    return Image.fromarray(np.where(pattern[..., None] == 1, a, b).astype(np.uint8))


def striped_corpus(root, n: int = 160) -> dict[str, str]:
    labels = {}
    for i in range(n):
        folder, kind = f"plate-{i + 1:03d}", "horizontal" if i % 2 else "vertical"
        make_plate(root, folder, stripes(i, i % 2 == 1), filename="scan.png",
                   manifest={"plate_id": folder, "source_image": "source/scan.png", "stripes": kind})
        labels[folder] = kind
    return labels


@pytest.mark.usefixtures("prefect_harness")
def test_fine_tuning_the_last_blocks_learns_what_the_frozen_encoder_cannot_and_survives_a_kill(tmp_path, tiny_env):
    root = tmp_path / "corpus"
    labels = striped_corpus(root)
    state = refresh_corpus(str(root), RefreshConfig(), return_state=True)  # the previews
    assert state.is_completed(), state.message

    frozen = FinetuneConfig(blocks=0, epochs=50, batch_size=24, head_lr=3e-3, steps_per_job=100)
    state = finetune(str(root), MODEL, "stripes", config=frozen, return_state=True)
    assert state.is_completed(), state.message
    frozen_row = experiments(root, state.result())[0]

    # Fine-tuned: the first jobs in a process killed with SIGKILL once one job is done, the
    # rest by the flow, which continues where the killed process stopped.
    tuned = FinetuneConfig(blocks=2, epochs=50, batch_size=24, lr=1e-3, head_lr=1e-3, steps_per_job=25)
    items, classes = labelled_items(root, labels, tuned)
    run = FinetuneRun(root, MODEL, "stripes", items, classes, tuned)
    script = (f"from pathlib import Path; from plateflow.finetune import *; from plateflow.profiles import load_profiles; "
              f"import json; labels = json.loads(Path({str(tmp_path / 'labels.json')!r}).read_text()); "
              f"train_all(Path({str(root)!r}), {MODEL!r}, 'stripes', labels, FinetuneConfig(**{tuned.model_dump()!r}), "
              f"load_profiles().model({MODEL!r}))")
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env={**os.environ}, start_new_session=True)
    try:
        wait_until(lambda: run.done() >= 1, 120, "the first fine-tuning job")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = run.done()
    assert 1 <= killed_at < run.jobs
    state = finetune(str(root), MODEL, "stripes", config=tuned, return_state=True)
    assert state.is_completed(), state.message
    assert run.done() == run.jobs
    jobs = [r["job"] for r in run.records()]
    assert sorted(jobs) == list(range(run.jobs)) or len(set(range(run.jobs)) - set(jobs)) <= 1  # at most one lost
    peak = "cuda allocated" if DEVICE == "cuda" else "process peak RSS"
    assert all(r["peak"] == peak and r["peak_bytes"] > 0 for r in run.records())
    row = experiments(root, state.result())[0]
    assert row["feature_kind"] == "finetune" and row["test_size"] == frozen_row["test_size"] > 10
    assert frozen_row["accuracy"] <= 0.7 and row["accuracy"] >= 0.9, (frozen_row["accuracy"], row["accuracy"])
    assert (root / row["checkpoint"]).is_file()
    assert (root / row["checkpoint"]).parent.parent.joinpath("encoder", "model.safetensors").is_file()

    # The fine-tuned encoder is a model of the corpus: a refresh embeds with it, its features
    # are cached like any model's, and a light head on them learns what the frozen one cannot.
    name = row["registered_model"]
    assert name == f"{MODEL}-ft-{row['id']}" and name in state.message
    state = refresh_corpus(str(root), RefreshConfig(models=[MODEL, name], gpu_class="CPU"), return_state=True)
    assert state.is_completed(), state.message
    corpus = CorpusLayout(root)
    stores = {m: open_store(corpus.features(m)) for m in (MODEL, name)}
    assert all(s.rows == len(labels) for s in stores.values())
    assert not np.allclose(np.asarray(stores[MODEL].vectors, np.float32), np.asarray(stores[name].vectors, np.float32),
                           atol=1e-2)
    heads = {m: train_experiment(root, m, "stripes", HeadConfig(epochs=60, test_fraction=0.25), labels)
             for m in (MODEL, name)}
    assert heads[MODEL]["accuracy"] <= 0.7 and heads[name]["accuracy"] >= 0.9, \
        {m: h["accuracy"] for m, h in heads.items()}
    vectors = sorted(corpus.vector_store(name).glob("*.npy"))
    stamps = [v.stat().st_mtime_ns for v in vectors]
    state = refresh_corpus(str(root), RefreshConfig(models=[MODEL, name], gpu_class="CPU"), return_state=True)
    assert state.is_completed(), state.message
    assert f"embeddings: 0 computed, {len(labels)} cached" in state.message
    assert len(vectors) == len(labels) and [v.stat().st_mtime_ns for v in vectors] == stamps  # cached


@pytest.mark.gpu
@pytest.mark.usefixtures("prefect_harness")
def test_the_vram_budget_holds_for_dinov2_base(tmp_path, monkeypatch):
    """On a GPU: dinov2_base (its real architecture, random weights from its config) fine-tunes its
    last 4 blocks within --vram-gb 4 and within 1.5: the micro-batch is chosen to fit, gradients
    accumulate to the batch, and every job's peak of allocated memory (CUDA's counter, the
    optimizer's moments included) stays within the budget."""
    import timm
    import torch
    from safetensors.torch import save_file

    weights = tmp_path / "weights" / "dinov2_base"
    weights.mkdir(parents=True)
    net = timm.create_model("vit_base_patch14_dinov2.lvd142m", pretrained=False, num_classes=0, img_size=224)
    save_file(net.state_dict(), weights / "model.safetensors")
    del net
    monkeypatch.delenv("PLATEFLOW_PROFILES", raising=False)  # the shipped capability table
    monkeypatch.setenv("PLATEFLOW_WEIGHTS", str(weights.parent))
    root = tmp_path / "corpus"
    labels = {}
    for i in range(24):
        folder, kind = f"plate-{i + 1:03d}", "horizontal" if i % 2 else "vertical"
        make_plate(root, folder, stripes(i, i % 2 == 1, size=224), filename="scan.png",
                   manifest={"plate_id": folder, "source_image": "source/scan.png", "stripes": kind})
        labels[folder] = kind
    assert refresh_corpus(str(root), RefreshConfig(), return_state=True).is_completed()
    for budget in (4.0, 1.5):
        # a seed of its own: vram_gb does not name a run, so the same settings would resume the first
        config = FinetuneConfig(blocks=4, vram_gb=budget, epochs=8, batch_size=64, steps_per_job=1, seed=int(budget))
        state = finetune(str(root), "dinov2_base", "stripes", config=config, return_state=True)
        assert state.is_completed(), state.message
        items, classes = labelled_items(root, labels, config)
        records = FinetuneRun(root, "dinov2_base", "stripes", items, classes, config).records()
        assert len(records) >= 2 and {r["peak"] for r in records} == {"cuda allocated"}
        assert all(0 < r["peak_bytes"] <= budget * 2**30 for r in records), [r["peak_bytes"] / 2**30 for r in records]
        if budget < 2:  # 64 plates' activations do not fit: micro-batches, their gradients accumulated
            assert all(1 <= r["micro_batch"] < config.batch_size for r in records), records
        row = experiments(root, state.result())[0]
        assert row["device"].startswith("cuda") and row["registered_model"]
    torch.cuda.empty_cache()
