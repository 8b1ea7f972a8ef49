"""Cache keys: a step's content hash, its parameters and the version of its code, made one way
for every cached step (``cache_key``).

A step's code version is a hash of what its modules *do* (``STEP_CODE``): their definitions'
tokens, without docstrings, comments, imports or the order of definitions, so editing a
docstring or moving a function between the step's modules keeps every corpus's outputs, and
any change to code recomputes them. A refactor that changes tokens but not behaviour (a rename,
a move to a new module) is recorded in ``KEPT_VERSIONS``: the step's new version -> the one
its outputs were keyed with. ``python -m plateflow.caching`` prints each step's versions.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import io
import tokenize
from dataclasses import dataclass
from pathlib import Path

from plateflow.errors import is_transient

# The modules whose code makes each cached step's outputs (read, never imported: a flow that
# only needs keys skips their imports). tests/unit/plateflow/test_caching.py checks that every
# module a step's work imports is here.
STEP_CODE: dict[str, tuple[str, ...]] = {
    "characterize": ("plateflow.image", "plateflow.imagefile", "plateflow.characterize.params",
                     "plateflow.characterize.histograms", "plateflow.characterize.metadata",
                     "plateflow.characterize.viz", "plateflow.characterize.working_copy",
                     "plateflow.characterize.quality", "plateflow.characterize.step", "plateflow.characterize.save"),
    "embed": ("plateflow.embed.models", "plateflow.embed.surgery", "plateflow.embed.reader",
              "plateflow.embed.mapper", "plateflow.embed.writer", "plateflow.embed.candidates"),
    "crop": ("plateflow.smart_crop", "plateflow.image", "plateflow.imagefile", "plateflow.characterize.working_copy"),
    "tiles": ("plateflow.tiles", "plateflow.image", "plateflow.imagefile"),
    "patches": ("plateflow.segment.patches", "plateflow.embed.models", "plateflow.image", "plateflow.imagefile"),
}

# step -> {its code's version now: the version its outputs were keyed with}. An entry states that
# the code behaves exactly as the code of that version did; it stops applying at the next edit
# (the version moves on), and a test then asks for it to be removed.
KEPT_VERSIONS: dict[str, dict[str, str]] = {
    # moved to plateflow/embed; PlateJob.plate_id -> name; a corpus's own models (their weights
    # folder, left out of the keys of the others); a GPU class may compile the encoder (off, the
    # forward pass is the one it was); crop_candidates.json written only when its boxes change
    "embed": {"171b26f221f6": "a96d9e0ddc82"},
    # moved to plateflow/tiles.py; keys made by cache_key; 16-bit by rawmode; the 16-bit high byte read in place
    "tiles": {"ac65696bdd0f": "9ae7a008ef61"},
    # The corpus-wide flags left plateflow/characterize/quality.py for plateflow/corpus_flags.py
    # (decided when the table is written, not part of a plate's characterization); the step's
    # key made once per batch; input_color_histograms.json on one line (the same numbers); 16-bit
    # grey to 8 bits by Pillow's raw unpacker (the same high byte, tests/unit/plateflow/test_image.py);
    # a blur tile shared by several cells read once (the same sums, added as often); a plate
    # without colour decoded to one channel, everything made from it as of its RGB, and a source
    # decoded from its open file, not from a copy (the same results, field for field:
    # tests/unit/plateflow/test_image.py); a refresh without models takes as current a record made
    # with a working copy (by one with models).
    "characterize": {"807ac831cb2e": "1cb5b3541b5a"},
    # a corpus's own models (as embed); 16-bit as characterize; the 16-bit high byte read in place;
    # the device chosen by plateflow.devices.compute_device (the same rule)
    "patches": {"eb6eb3a0872d": "4e49928ad1f9"},
    # a crop found from an earlier run is counted cached in the logs; the 16-bit high byte read in place;
    # an earlier run named by its folder, its outputs inside it (what plateflow writes)
    "crop": {"c6ea99f83b20": "8f22da1def10"},
}


def _source(module: str) -> str:
    return Path(importlib.util.find_spec(module).origin).read_text(encoding="utf-8")


def _docstrings(tree: ast.Module) -> set[tuple[int, int]]:
    """Where each docstring starts: the first statement of a module, class or function body
    when it is a string."""
    starts = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                starts.add((first.lineno, first.col_offset))
    return starts


def definitions(source: str) -> list[str]:
    """The module's top-level statements but its imports and docstring, each as its tokens
    without comments, blank lines or docstrings: what the code does, not how it reads."""
    tree = ast.parse(source)
    docstrings = _docstrings(tree)
    statements = [(min([d.lineno for d in getattr(node, "decorator_list", [])] + [node.lineno]), node.end_lineno)
                  for node in tree.body
                  if not isinstance(node, (ast.Import, ast.ImportFrom))
                  and (node.lineno, node.col_offset) not in docstrings]
    parts: list[list[str]] = [[] for _ in statements]
    skip_newline = False
    index = 0
    inside: int | None = None
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.COMMENT, tokenize.NL, tokenize.ENCODING, tokenize.ENDMARKER):
            continue
        if tok.type == tokenize.STRING and tok.start in docstrings:
            skip_newline = True
            continue
        if tok.type == tokenize.NEWLINE and skip_newline:
            skip_newline = False
            continue
        skip_newline = False
        if tok.type == tokenize.DEDENT:  # closes a block of the statement before, wherever it stands
            if inside is not None:
                parts[inside].append("dedent")
            continue
        line = tok.start[0]
        while index < len(statements) and line > statements[index][1]:
            index += 1
        inside = index if index < len(statements) and statements[index][0] <= line else None
        if inside is not None:
            parts[inside].append(f"{tok.type}:{tok.string}")
    return ["\x00".join(p) for p in parts]


def semantic_version(sources: list[str]) -> str:
    """A short hash of the definitions of ``sources``, in any order and any of the modules."""
    digest = hashlib.sha256()
    for definition in sorted(d for source in sources for d in definitions(source)):
        digest.update(definition.encode())
        digest.update(b"\x01")
    return digest.hexdigest()[:12]


def code_version(*module_names: str) -> str:
    """The semantic version of the code in ``module_names``."""
    return semantic_version([_source(name) for name in module_names])


@functools.cache
def step_version(step: str) -> str:
    """The version of ``step``'s code, as its outputs are keyed: its modules' semantic version,
    or the version a recorded behaviour-neutral refactor kept."""
    current = code_version(*STEP_CODE[step])
    return KEPT_VERSIONS.get(step, {}).get(current, current)


def fingerprint(*parts: str, length: int = 16) -> str:
    """A short hash of ``parts`` (parameters as JSON, other keys, code versions)."""
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:length]


@dataclass(frozen=True)
class StepKey:
    """A cached step's key for every plate of a run: ``<step>-<content sha256>-<version>``.
    Made once per run (``cache_key``); called once per plate."""

    step: str
    version: str

    def __call__(self, sha256: str) -> str:
        return f"{self.step}-{sha256}-{self.version}"


def cache_key(step: str, *parameters: str) -> StepKey:
    """The one way a cached step is keyed: ``version`` hashes the step's parameters (each a
    string: a fingerprint or JSON) and its code version (``step_version``)."""
    return StepKey(step, fingerprint(*parameters, step_version(step)))


def retry_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry I/O trouble, never bad input."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as raised:  # noqa: BLE001 - we only classify it
            exc = raised
    return exc is not None and is_transient(exc)


if __name__ == "__main__":
    for name in STEP_CODE:
        print(f"{name}: code {code_version(*STEP_CODE[name])}, keyed as {step_version(name)}")
