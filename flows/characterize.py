"""The refresh's CPU stage: hash every source (the index where its stat is unchanged), settle
the plates whose outputs are in place for their key, characterize the rest in batch tasks."""

from __future__ import annotations

from pathlib import Path


from plateflow.artifacts import plural
from plateflow.config import CharacterizeParams
from plateflow.hashindex import SourceIndex
from plateflow.status import Status, Step
from flows.run import CHARACTERISE, HASH, PlateRecord, PlateRunner, Refresh, batching
from flows.batches import BatchStage, run_batches
from plateflow.outcomes import PlateOutcome
from plateflow.characterize.step import characterize_plates, step_key
from tasks.characterize import characterize_batch
from plateflow.characterize.save import current_record


def characterize_stage(run: Refresh, records: list[PlateRecord], runner: PlateRunner) -> None:
    with run.timed("hashing"):
        stamps = hash_sources(run, records)
    with run.timed("characterization"):
        todo = settle_current(records, run.root, run.params)
        run.progress.advance(CHARACTERISE, len(records) - len(todo), sum(not r.ok for r in records))
        run.logger.info("%s current, %d to characterize", plural(len(records) - len(todo), "plate"), len(todo))

        def apply(rec: PlateRecord, outcome: PlateOutcome) -> None:
            if outcome.failed:
                rec.fail(outcome.failed_step, outcome.error,
                         characterize_status=Status.FAILED if outcome.failed_step == Step.CHARACTERIZE else Status.COMPUTED)
            else:
                rec.settle(outcome.status, outcome.value)

        stage = BatchStage(CHARACTERISE, "characterize", characterize_batch, characterize_plates,
                           {"params": run.params, "root": str(run.root)}, apply,
                           item=lambda r: (r.plate, r.sha256, stamps.get(r.plate.folder)),
                           cost=PlateRecord.source_bytes)
        if todo:
            run_batches(stage, todo, runner.get, batching(run, runner, CHARACTERISE), run.logger)


def hash_sources(run: Refresh, records: list[PlateRecord]) -> dict[str, bytes]:
    """Each source's sha256, from ROOT/.plateflow/source-index.parquet where its stat is unchanged
    (all read again with ``verify``); a source that cannot be read fails its plate. A refresh of
    the whole corpus drops the entries of sources that are gone. Returns, by plate folder, the
    stat each trusted hash holds at (``SourceIndex.stamp``): the characterization reads a source
    whose stat is still that without hashing it again."""
    if not records and run.snapshot is not None and len(run.settled) == len(run.snapshot.entries):
        return {}  # every plate the snapshot knows is settled: no source to hash, none gone
    index = SourceIndex(run.root)
    hashes = index.hash_all([r.plate.source_path for r in records], run.config.workers, run.config.verify,
                            lambda done, failed: run.progress.advance(HASH, done, failed))
    stamps = {}
    for rec, value in zip(records, hashes):
        if isinstance(value, OSError):
            rec.fail("hash", f"{type(value).__name__}: {value}")
        else:
            rec.sha256 = value
            stamp = index.stamp(rec.plate.source_path)
            if stamp is not None:
                stamps[rec.plate.folder] = stamp
    if not run.partial:
        settled = run.snapshot.entries if run.snapshot is not None else {}
        index.forget_missing({index.key(r.plate.source_path) for r in records}
                             | {settled[f].source for f in run.settled})
    try:
        index.save()
    except OSError as exc:  # a full disk: the next refresh hashes these sources again, nothing is lost
        run.logger.warning("could not write the source index: %s", exc)
    return stamps


def settle_current(records: list[PlateRecord], root: Path, params: CharacterizeParams) -> list[PlateRecord]:
    """Settle, without a task, every plate whose outputs (or failure record) are in place for
    its cache key; return the plates that have work to do."""
    todo, keys = [], [step_key(params)]
    if not params.working_copy:  # what a refresh with models made (the same and a working copy) will do
        keys.append(step_key(params.model_copy(update={"working_copy": True})))
    for rec in records:
        if not rec.ok:
            continue
        record = current_record(rec.plate, root, tuple(k(rec.sha256) for k in keys), params.viz, params.working_copy)
        if record is None:
            todo.append(rec)
        elif record.get("loadable") is False:  # bad input, already found bad with these bytes and code
            rec.fail("characterize", record.get("plateflow_error") or record.get("error", ""),
                     characterize_status=Status.FAILED)
        else:
            rec.settle(Status.CACHED, record)
    return todo
