"""What a refresh run shows in the Prefect UI: a progress artifact updated as plates finish, a
table of plates, and a markdown summary that links to the corpus report."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote
from typing import TYPE_CHECKING, Callable

from plateflow.layout import PLATES, PREVIEW, REPORTS, VIZ, CorpusLayout
from plateflow.status import Status

if TYPE_CHECKING:
    import pyarrow as pa



def artifact_key(root: Path, what: str) -> str:
    """Keys are lowercase letters, digits and dashes; one key per corpus, so the UI keeps each
    corpus's history of tables and summaries."""
    slug = re.sub(r"[^a-z0-9]+", "-", Path(root).name.lower()).strip("-") or "corpus"
    return f"plateflow-{slug}-{what}"[:100]


# Called as listener(stage, done, total, failed) whenever a stage advances: the CLI draws its
# progress bars from these; the flow knows nothing of them.
listeners: list[Callable[[str, int, int, int], None]] = []


class Progress:
    """A refresh's progress, stage by stage (hash, characterize, candidates, embed <model>, smart
    crop), counted in plates: one progress artifact over all stages (updated at most every
    ``every_s``) and the listeners' bars."""

    def __init__(self, root: Path, every_s: float = 0.5):
        from prefect.artifacts import create_progress_artifact

        self.stages: dict[str, list[int]] = {}  # name -> [done, total, failed]
        self.every_s, self.last = every_s, 0.0
        self.id = create_progress_artifact(progress=0.0, key=artifact_key(root, "progress"),
                                           description=f"Plates of {Path(root).name} processed")

    def stage(self, name: str, total: int) -> None:
        """Open a stage of ``total`` plates."""
        self.stages[name] = [0, total, 0]
        self._tell(name)

    def advance(self, name: str, plates: int = 1, failed: int = 0) -> None:
        entry = self.stages[name]
        entry[0] = min(entry[1], entry[0] + plates)
        entry[2] += failed
        self._tell(name)
        now = time.monotonic()
        if entry[0] == entry[1] or now - self.last >= self.every_s:
            self.publish()
            self.last = now

    def publish(self) -> None:
        from prefect.artifacts import update_progress_artifact

        done = sum(e[0] for e in self.stages.values())
        total = sum(e[1] for e in self.stages.values())
        update_progress_artifact(self.id, 100.0 * done / total if total else 100.0)

    def _tell(self, name: str) -> None:
        done, total, failed = self.stages[name]
        for listener in listeners:
            listener(name, done, total, failed)


# The corpus table's columns the table artifact shows (``plate_table``).
TABLE_COLUMNS = ["plate_dir", "status", "megapixels", "quality_flags", "similarity", "characterize_status",
                 "embed_status", "error"]


def plate_table(rows: list[dict]) -> list[dict]:
    return [{
        "plate": r["plate_dir"],
        "status": r["status"],
        "megapixels": round(r["megapixels"], 1) if r.get("megapixels") is not None else None,
        "flags": ", ".join(r.get("quality_flags") or ()),
        "best crop similarity": round(r["similarity"], 4) if r.get("similarity") is not None else None,
        "characterization": r.get("characterize_status"),
        "embeddings": r.get("embed_status"),
        "error": r.get("error") or "",
    } for r in rows]


# The steps whose failure means a plate was never characterized, or never embedded.
CHARACTERIZE_STEPS = ("manifest", "hash", "characterize")
EMBED_STEPS = ("candidates", "embed")


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


@dataclass
class RunCounts:
    """What a run did with its plates, each count a partition of the one before it: plates are
    ok or failed (a failure is known when the plate failed the same way, with the same inputs, in
    the table before this run); characterization computed, cached or failed; of the characterized
    plates, embeddings computed, cached or failed, and smart crops failed."""

    plates: int
    failed: int
    known: int
    characterization: dict[str, int]
    embeddings: dict[str, int] | None

    @classmethod
    def of(cls, rows: list[dict], known: set[str], models: list[str], settled_ok: int = 0) -> "RunCounts":
        """The counts of ``rows``, and of ``settled_ok`` more plates found ok and current
        without a row of this run (unchanged since the last refresh: characterization and, with
        models, embeddings cached)."""
        failed = [r for r in rows if r["status"] == Status.FAILED]
        char_failed = {r["plate_dir"] for r in failed if r.get("failed_step") in CHARACTERIZE_STEPS}
        characterized = [r for r in rows if r["plate_dir"] not in char_failed]
        char = {s: sum(r.get("characterize_status") == s for r in characterized) for s in ("computed", "cached")}
        char["cached"] += settled_ok
        char["failed"] = len(char_failed)
        emb = None
        if models:
            emb_failed = {r["plate_dir"] for r in characterized if r.get("failed_step") in EMBED_STEPS}
            emb = {s: sum(r.get("embed_status") == s for r in characterized if r["plate_dir"] not in emb_failed)
                   for s in ("computed", "cached")}
            emb["cached"] += settled_ok
            emb["failed"] = len(emb_failed)
            emb["smart crop failed"] = sum(r.get("failed_step") == "smart_crop" for r in rows)
        return cls(len(rows) + settled_ok, len(failed), sum(r["plate_dir"] in known for r in failed), char, emb)

    @classmethod
    def of_table(cls, table) -> "RunCounts":
        """``of`` a corpus table (no failure known), on its columns: 10^5 rows are not made dicts."""
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        def where(column: str, values: tuple[str, ...]) -> np.ndarray:
            return pc.fill_null(pc.is_in(table.column(column), value_set=pa.array(values, pa.string())),
                                False).to_numpy(zero_copy_only=False)

        failed = where("status", (Status.FAILED,))
        char_failed = failed & where("failed_step", CHARACTERIZE_STEPS)
        char = {s: int((~char_failed & where("characterize_status", (s,))).sum()) for s in ("computed", "cached")}
        char["failed"] = int(char_failed.sum())
        emb = None
        if table.column("embed_status").null_count < table.num_rows:
            emb_failed = ~char_failed & failed & where("failed_step", EMBED_STEPS)
            emb = {s: int((~char_failed & ~emb_failed & where("embed_status", (s,))).sum()) for s in ("computed", "cached")}
            emb["failed"] = int(emb_failed.sum())
            emb["smart crop failed"] = int(where("failed_step", ("smart_crop",)).sum())
        return cls(table.num_rows, int(failed.sum()), 0, char, emb)

    @property
    def new_failures(self) -> int:
        return self.failed - self.known

    def headline(self) -> str:
        """``44 of 46 plates ok, 2 failed (1 new, 1 known)``."""
        text = f"{self.plates - self.failed} of {plural(self.plates, 'plate')} ok"
        if self.failed:
            text += f", {self.failed} failed ({self.new_failures} new, {self.known} known)"
        return text

    def steps(self) -> list[str]:
        parts = [f"characterization: {_counts(self.characterization)}"]
        if self.embeddings is not None:
            emb = dict(self.embeddings)
            crop = emb.pop("smart crop failed")
            parts.append(f"embeddings: {_counts(emb)}" + (f"; smart crop: {crop} failed" if crop else ""))
        return parts


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {what}" for what, n in counts.items())


def summary_markdown(root: Path, rows: list[dict], counts: RunCounts, known: set[str], timings: dict[str, float],
                     report: Path | None, models: list[str], corpus_rows: int | None = None) -> str:
    """The run's summary: ``rows`` are this run's plates (``corpus_rows``: the table's, when
    the run covered only some)."""
    failed = [r for r in rows if r["status"] == Status.FAILED]
    lines = [f"# Refresh of `{root}`", "", f"- **{counts.headline()}**"]
    if corpus_rows is not None:
        lines.append(f"- this run refreshed {plural(len(rows), 'plate')}; plates.parquet holds {corpus_rows}")
    lines += [f"- {step}" for step in counts.steps()]
    if models:
        lines.append(f"- models: {', '.join(models)}")
    lines += ["", "| step | seconds |", "|---|---|"]
    lines += [f"| {step} | {seconds:.1f} |" for step, seconds in timings.items()]
    if failed:
        lines += ["", "## Failed plates", "",
                  "Known: failed the same way, with the same inputs, before this run.", "",
                  "| plate | step | error | |", "|---|---|---|---|"]
        lines += [f"| {r['plate_dir']} | {r.get('failed_step') or ''} | "
                  f"{(r.get('error') or '').replace('|', '/')} | {'known' if r['plate_dir'] in known else 'new'} |"
                  for r in failed]
    lines += _report_lines(root, rows, report)
    return "\n".join(lines)


THUMBS = 3  # flagged plates' previews shown in the summary, each captioned


def report_url(root: Path) -> str | None:
    """The corpus report's URL on the report server named by PLATEFLOW_REPORT_URL (`plateflow
    server` sets it for its workers), or None."""
    base = os.environ.get("PLATEFLOW_REPORT_URL")
    return f"{base.rstrip('/')}/{CorpusLayout(Path(root)).report_url_path}" if base else None


def _report_lines(root: Path, rows: list[dict], report: Path | None) -> list[str]:
    """The report's link: over HTTP when a report server serves it, with the previews of a few
    flagged plates; else its path, and how to serve it."""
    if report is None:
        return []
    url = report_url(root)
    if url is None:
        return ["", f"Corpus report: `{report}` (serve it to open it from here: "
                    f"`plateflow report --root {root} --serve`)"]
    lines = ["", f"Corpus report: [{url}]({url})"]
    corpus, base = CorpusLayout(Path(root)), url.rsplit(f"/{REPORTS}/", 1)[0]

    def weight(r: dict) -> int:  # the plates with most to look at first; grayscale alone is common and benign
        return -len([f for f in r["quality_flags"] if f != "grayscale"])

    flagged = [r for r in sorted((r for r in rows if r.get("quality_flags")), key=weight)
               if weight(r) < 0 and corpus.plate(r["plate_dir"]).viz(PREVIEW).is_file()][:THUMBS]
    if flagged:
        lines += ["", "A few flagged plates (every one is in the report):"]
        for r in flagged:
            caption = f"{r['plate_id']}: {', '.join(r['quality_flags'])}"
            if r.get("duplicate_of"):
                caption += f" (of {r['duplicate_of']})"
            lines += ["", f"**{caption}**", "",
                      f"![{caption}]({base}/{PLATES}/{quote(r['plate_dir'])}/{VIZ}/{PREVIEW})"]
    return lines


TABLE_FAILED = 1000  # failed plates in the table artifact, at most
TABLE_SAMPLE = 100  # other plates in it, evenly spread over the corpus


def table_rows(rows: list[dict], failed_max: int = TABLE_FAILED, sample: int = TABLE_SAMPLE) -> list[dict]:
    """The rows the table artifact holds: the failed plates (up to ``failed_max``), then an even
    sample of ``sample`` of the others. Every row again on every refresh would grow Prefect's
    database by megabytes per nightly run of a large corpus; plates.parquet has them all."""
    failed = [r for r in rows if r["status"] == Status.FAILED][:failed_max]
    others = [r for r in rows if r["status"] != Status.FAILED]
    step = max(1, -(-len(others) // sample)) if sample else len(others) + 1
    return failed + others[::step][:sample]


def publish(root: Path, rows: list[dict], counts: RunCounts, known: set[str], timings: dict[str, float],
            report: Path | None, models: list[str], corpus: pa.Table | None = None) -> None:
    """The table artifact (of the whole corpus: the ``corpus`` table, when the run did not make
    every row: a retry, or a refresh that found plates unchanged) and the run's summary."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    if corpus is None:
        shown, total = table_rows(rows), len(rows)
        failed = sum(r["status"] == Status.FAILED for r in rows)
    else:
        shown, total, failed = sampled_rows(corpus), corpus.num_rows, _failed_count(corpus)
    create_table_artifact(plate_table(shown), key=artifact_key(root, "plates"),
                          description=(f"Plates of {root}: {total} in all, {failed} failed; shown: "
                                       f"{sum(r['status'] == 'failed' for r in shown)} failed and a sample of "
                                       f"{sum(r['status'] != 'failed' for r in shown)} others. Every plate: "
                                       f"{CorpusLayout(Path(root)).table}"))
    create_markdown_artifact(summary_markdown(root, rows, counts, known, timings, report, models,
                                              None if corpus is None else total),
                             key=artifact_key(root, "summary"), description=f"Refresh of {root}")


def _failed_count(table: pa.Table) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(pc.equal(table.column("status"), Status.FAILED.value)).as_py() or 0)


def sampled_rows(table: pa.Table, failed_max: int = TABLE_FAILED, sample: int = TABLE_SAMPLE) -> list[dict]:
    """``table_rows`` of a corpus table, taken in Arrow: only the rows shown become Python values."""
    import pyarrow as pa
    import pyarrow.compute as pc

    failed = pc.fill_null(pc.equal(table.column("status"), Status.FAILED.value), False)
    failed_idx = pc.indices_nonzero(failed).to_pylist()
    other_idx = pc.indices_nonzero(pc.invert(failed)).to_pylist()
    step = max(1, -(-len(other_idx) // sample)) if sample else len(other_idx) + 1
    return table.take(pa.array(failed_idx[:failed_max] + other_idx[::step][:sample], pa.int64())).to_pylist()
