"""Segmentation flows: ``patch-features`` (every plate's patch tokens and the patch index),
``train-segmentation`` (a head from a folder of masks, an experiment) and
``predict-segmentation`` (an experiment's masks, overlays and area shares for the corpus).
The work is in plateflow/segment/."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pyarrow as pa
from prefect import flow, get_run_logger
from prefect.states import Completed, Failed
from prefect.task_runners import ThreadPoolTaskRunner

from flows.batches import Batching, BatchStage, hash_plates, plates_state, run_batches
from plateflow.artifacts import plural
from plateflow.atomic import write_bytes_if_changed
from plateflow.config import corpus_root
from plateflow.corpus import corpus_lock
from plateflow.devices import compute_device
from plateflow.errors import ConfigError
from plateflow.layout import CorpusLayout
from plateflow.outcomes import file_size
from plateflow.profiles import dispatch_policy, load_profiles
from plateflow.runlog import quiet_returned_failures
from plateflow.segment.patches import (PatchJob, PatchParams, index_rows, patches_of_plates, step_key,
                                       stored_record, tokens_path)
from plateflow.segment.train import SegConfig
from plateflow.tables import PATCHES_SCHEMA, parquet_bytes
from tasks.patches import patches_batch

PATCH_BATCH_PLATES = 8  # plates per patches-batch task: each loads the model once


@flow(name="patch-features", validate_parameters=True)
def patch_features(root: str, model: str, params: PatchParams = PatchParams(),  # noqa: B008
                   weights_root: str | None = None):
    """Cut every plate of ROOT into overlapping patches at full resolution and keep each patch's
    encoder tokens (float16) and the patch index, ROOT/features/MODEL-patches/patches.parquet.
    Plates whose tokens are stored for their content, the model and the patch parameters are
    not read again. Ends Failed, naming them, if any plate failed.

    Args:
        root: The corpus root: the folder that holds plates_structured/.
        model: The encoder, a name from profiles/models.toml.
        params: The patches' side and overlap in source pixels, and the pixel limit.
        weights_root: A folder with one folder of weights per model, named as the model (empty: the Hugging Face cache).
    """
    quiet_returned_failures()
    logger = get_run_logger()
    try:
        root_path = corpus_root(root)
        spec = load_profiles(root=root_path).model(model)
        from plateflow.embed.models import require_weights

        require_weights(spec, Path(weights_root) if weights_root else None)
    except (ConfigError, KeyError) as exc:
        logger.error("configuration error: %s", exc)
        return Failed(message=str(exc), data=exc)
    corpus = CorpusLayout(root_path)
    version = step_key(spec, params).version
    holder = f"patch-features on {socket.gethostname()}, pid {os.getpid()}"
    with corpus_lock(root_path, holder):
        plates, failed = hash_plates(root_path, logger)
        files = {p.folder: tokens_path(root_path, spec, params, sha) for p, sha in plates}
        todo = [PatchJob(p, sha, str(files[p.folder])) for p, sha in plates if stored_record(files[p.folder]) is None]
        logger.info("%s: %d with stored patch tokens, %d to encode", plural(len(plates), "plate"),
                    len(plates) - len(todo), len(todo))

        def apply(job: PatchJob, outcome) -> None:
            if outcome.failed:
                failed[outcome.folder] = outcome.error
                logger.warning("%s failed at patches: %s", outcome.folder, outcome.error)

        stage = BatchStage("patches", "patches", patches_batch, patches_of_plates,
                           {"spec": spec, "params": params, "weights_root": weights_root}, apply,
                           cost=lambda job: file_size(job.plate.source_path), items_arg="jobs")
        workers = 1  # one model in memory; the forward pass uses the cores
        with ThreadPoolTaskRunner(max_workers=workers) as runner:
            run_batches(stage, todo, lambda: runner,
                        Batching(PATCH_BATCH_PLATES, int(dispatch_policy().cpu.batch_megabytes * 2**20), workers),
                        logger)
        rows = []
        for plate, sha in plates:
            record = stored_record(files[plate.folder]) if plate.folder not in failed else None
            if record is not None:
                rows += index_rows(root_path, plate, sha, files[plate.folder], record, version)
        written = write_bytes_if_changed(corpus.patch_index(model),
                                         parquet_bytes(pa.Table.from_pylist(rows, schema=PATCHES_SCHEMA)))
    message = (f"{len(rows)} {'patch' if len(rows) == 1 else 'patches'} of {plural(len(plates) - len(failed), 'plate')} in "
               f"{corpus.patch_index(model)}{'' if written else ' (unchanged)'}; {len(failed)} failed")
    return plates_state(message, failed, logger)


@flow(name="train-segmentation", validate_parameters=True)
def train_segmentation(root: str, model: str, masks: str, params: PatchParams = PatchParams(),  # noqa: B008
                       config: SegConfig = SegConfig()) -> str:  # noqa: B008
    """Train a segmentation head on the patch tokens of the plates that have a mask in ``masks``
    and score it on held-out plates; returns the experiment id.

    Args:
        root: The corpus root: the folder that holds plates_structured/.
        model: The encoder whose patch tokens (from patch-features) the head reads.
        masks: A folder of indexed PNGs named by plate id or folder (255: unlabelled), and
            optionally classes.txt (a class name a line).
        params: The patch parameters the tokens were made with.
        config: The head and its training (linear or conv, epochs, learning rate, split).
    """
    from plateflow.segment.masks import mask_set
    from plateflow.segment.patches import load_tokens
    from plateflow.segment.train import labelled_plates, train_segmentation as train

    quiet_returned_failures()
    logger = get_run_logger()
    try:
        root_path = corpus_root(root)
        spec = load_profiles(root=root_path).model(model)
        index = _patch_index(root_path, model)
        version = step_key(spec, params).version
        plates = {}
        for d, i, s, f, v in zip(*(index.column(c).to_pylist()
                                   for c in ("plate_dir", "plate_id", "sha256", "tokens_file", "version"))):
            if v == version:
                plates[d] = (i, s, root_path / f)
        masks_found = mask_set(Path(masks), {i: d for d, (i, _, _) in plates.items()})
        entries = []
        for folder, mask_file in sorted(masks_found.files.items()):
            plate_id, sha, tokens_file = plates[folder]
            record = stored_record(tokens_file)
            if record is not None:
                entries.append((folder, sha, load_tokens(tokens_file, record), record, mask_file))
        labelled = labelled_plates(entries, len(masks_found.classes))
        row = train(root_path, model, version, labelled, masks_found.classes, Path(masks).name or "masks", config,
                    params.model_dump(), logger, device=compute_device())
    except (ConfigError, KeyError) as exc:
        logger.error("configuration error: %s", exc)
        return Failed(message=str(exc), data=exc)
    return Completed(message=f"experiment {row['id']}: test mIoU {row['miou']:.3f} on {row['test_size']} "
                             f"held-out plates", data=row["id"])


@flow(name="predict-segmentation", validate_parameters=True)
def predict_segmentation(root: str, experiment: str):
    """Write the masks of a segmentation experiment for every plate with its patch tokens: the
    full-resolution mask in the plate's segmentation/ folder, an overlay in viz/, and per-class
    area shares (seg_CLASS) in plates.parquet.

    Args:
        root: The corpus root: the folder that holds plates_structured/.
        experiment: The experiment's id (`plateflow experiments` lists them).
    """
    from plateflow.segment.predict import predict_segmentation as predict

    quiet_returned_failures()
    logger = get_run_logger()
    try:
        root_path = corpus_root(root)
        with corpus_lock(root_path, f"predict-segmentation on {socket.gethostname()}, pid {os.getpid()}"):
            result = predict(root_path, experiment, logger)
            from plateflow.report import build_report

            report = build_report(root_path)  # the masks on each plate's page
    except ConfigError as exc:
        logger.error("configuration error: %s", exc)
        return Failed(message=str(exc), data=exc)
    message = (f"{plural(result['plates'], 'mask')} of experiment {experiment}; {len(result['failed'])} failed; "
               f"stitching peaked at {result['peak_bytes'] / 2**20:.1f} MB" + (f"; report: {report}" if report else ""))
    return plates_state(message, result["failed"], logger)


def _patch_index(root: Path, model: str) -> pa.Table:
    import pyarrow.parquet as pq

    path = CorpusLayout(root).patch_index(model)
    try:
        return pq.read_table(path)
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist: run `plateflow patches --root {root} --model {model}` first") from None
    except (OSError, pa.ArrowException) as exc:
        raise ConfigError(f"{path} cannot be read ({exc}); run `plateflow patches --root {root} --model {model}` "
                          f"again") from None
