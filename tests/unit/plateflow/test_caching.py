"""Every cached step's key carries the code of every module its work runs (plateflow/caching.py),
so an edit to that code recomputes what it made, and an edit that only changes how the code
reads (a docstring, a comment, the order of definitions) recomputes nothing."""

import ast
import importlib.util
import re
from pathlib import Path

import pytest

from plateflow.caching import (KEPT_VERSIONS, STEP_CODE, StepKey, cache_key, code_version, fingerprint,
                               semantic_version, step_version)

# The packages and modules that make outputs; plateflow's other modules are plumbing (paths,
# atomic writes, configuration), which every step shares and none of whose code is a result.
STAGE_CODE = ("plateflow.image", "plateflow.imagefile", "plateflow.characterize", "plateflow.embed",
              "plateflow.smart_crop", "plateflow.tiles", "plateflow.segment")


def is_stage_code(module: str) -> bool:
    return any(module == name or module.startswith(name + ".") for name in STAGE_CODE)
# A stage's module -> why it is not in a step's key although the step's work imports it.
PLUMBING = {
    "plateflow.characterize.save": "the characterization's files (in the characterization's key)",
    "plateflow.embed.writer": "reads stored vectors, whose key carries the embedding code",
    "plateflow.embed.runner": "composes reader, mapper and writer and times them",
}
ENTRIES = {  # the module that does each step's work
    "characterize": "plateflow.characterize.step",
    "crop": "plateflow.smart_crop",
    "tiles": "plateflow.tiles",
    "embed": "plateflow.embed.runner",
    "patches": "plateflow.segment.patches",
}


def _path(module: str) -> Path:
    return Path(importlib.util.find_spec(module).origin)


def runs(module: str, seen: set[str] | None = None) -> set[str]:
    """``module`` and the stage modules it imports, at any depth (imports inside functions too)."""
    seen = set() if seen is None else seen
    seen.add(module)
    for node in ast.walk(ast.parse(_path(module).read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and is_stage_code(node.module):
            if node.module not in seen and node.module not in PLUMBING:
                runs(node.module, seen)
    return seen


def test_every_cached_step_has_an_entry_here():
    assert set(ENTRIES) == set(STEP_CODE)


@pytest.mark.parametrize("step", list(ENTRIES))
def test_a_steps_key_carries_the_code_of_every_module_its_work_runs(step):
    missing = runs(ENTRIES[step]) - set(STEP_CODE[step]) - set(PLUMBING)
    assert not missing, f"{step}: {sorted(missing)} run but are not in its key"


@pytest.mark.parametrize("step", list(STEP_CODE))
def test_any_code_added_to_any_module_of_a_step_changes_its_version(step):
    sources = [_path(m).read_text() for m in STEP_CODE[step]]
    before = semantic_version(sources)
    for i in range(len(sources)):
        edited = sources[:i] + [sources[i] + "\n\ndef probe():\n    return 1\n"] + sources[i + 1:]
        assert semantic_version(edited) != before, STEP_CODE[step][i]
        changed = sources[:i] + [re.sub(r"(\n\s+)return ", r"\1return None or ", sources[i], count=1)] + sources[i + 1:]
        if changed[i] != sources[i]:  # a statement changed
            assert semantic_version(changed) != before, STEP_CODE[step][i]


MODULE = '''"""A stage."""
import os

LIMIT = 3  # pixels


def work(x):
    """Do the work."""
    if x > LIMIT:
        y = os.sep
    return x


class Box:
    """A box."""

    def area(self):
        return 1
'''


def test_docstrings_comments_imports_and_order_do_not_change_a_version():
    reread = '''from pathlib import Path


class Box:
    def area(self):
        # one
        return 1


LIMIT = 3
def work(x):
    if x > LIMIT:
        y = os.sep

    return x
'''
    assert semantic_version([MODULE]) == semantic_version([reread])


def test_moving_a_definition_between_a_steps_modules_keeps_its_version():
    first, second = MODULE.split("\n\nclass Box:")
    assert semantic_version([MODULE]) == semantic_version([first, "class Box:" + second])


@pytest.mark.parametrize("edit", [
    ("LIMIT = 3", "LIMIT = 4"),
    ("        y = os.sep\n    return x", "        y = os.sep\n        return x"),  # indentation is code
    ("return 1", "return 2"),
    ("def area(self):", "def size(self):"),
])
def test_a_change_to_code_changes_a_version(edit):
    assert MODULE.count(edit[0]) == 1
    assert semantic_version([MODULE]) != semantic_version([MODULE.replace(*edit)])


def test_code_version_reads_a_modules_file(tmp_path, monkeypatch):
    (tmp_path / "stage_mod.py").write_text("def work():\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = code_version("stage_mod")
    (tmp_path / "stage_mod.py").write_text('def work():\n    """Now documented."""\n    return 1\n')
    assert code_version("stage_mod") == before
    (tmp_path / "stage_mod.py").write_text("def work():\n    return 2\n")
    assert code_version("stage_mod") != before


@pytest.mark.parametrize("step", list(KEPT_VERSIONS))
def test_a_kept_version_is_for_the_code_as_it_is(step):
    """An entry in KEPT_VERSIONS applies to one version of a step's code; after an edit it is
    dead weight and says something no longer true: remove it."""
    current = code_version(*STEP_CODE[step])
    for version, kept in KEPT_VERSIONS[step].items():
        assert version == current, f"KEPT_VERSIONS[{step!r}][{version!r}] no longer applies: remove it"
        assert step_version(step) == kept != current


def test_one_key_for_every_step():
    key = cache_key("crop", "model", "{}")
    assert key == StepKey("crop", fingerprint("model", "{}", step_version("crop")))
    assert key("ab" * 32) == f"crop-{'ab' * 32}-{key.version}"
    assert key != cache_key("crop", "model", '{"n": 1}')
    assert cache_key("tiles", "p").version != cache_key("crop", "p").version  # each step's own code
