"""Every cached step's key carries the code of every module its work runs (plateflow/caching.py),
so an edit to that code recomputes what it made: the smart crop's key once lacked its own."""

import ast
import importlib.util
from pathlib import Path

import pytest

from plateflow.caching import StepKey, code_version, fingerprint

# A stage's module -> modules it imports that make none of its outputs, and why.
PLUMBING = {
    "tasks.batch": "per-plate isolation and outcomes",
    "tasks.save": "the characterization's files (in the characterization's key)",
    "tasks.embed.writer": "reads stored vectors, whose key carries the embedding code",
}
STAGES = {  # the module whose code_version(...) call makes the stage's key, and the stage's entry
    "characterize": "tasks.characterize",
    "smart crop": "tasks.smart_crop",
    "tiles": "tasks.tiles",
    "embeddings": "tasks.embed.writer",
}


def _source(module: str) -> ast.Module:
    return ast.parse(Path(importlib.util.find_spec(module).origin).read_text())


def key_modules(module: str) -> set[str]:
    """The module names passed to code_version in ``module`` (directly, or via a tuple constant)."""
    tree = _source(module)
    constants = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign)
                 for t in node.targets if isinstance(t, ast.Name)}
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "code_version":
            for arg in node.args:
                value = constants.get(arg.value.id) if isinstance(arg, ast.Starred) else arg
                names |= {e.value for e in getattr(value, "elts", [value]) if isinstance(e, ast.Constant)}
    return names


def runs(module: str, seen: set[str] | None = None) -> set[str]:
    """``module`` and the tasks.* modules it imports, at any depth (imports inside functions too)."""
    seen = set() if seen is None else seen
    seen.add(module)
    for node in ast.walk(_source(module)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tasks."):
            if node.module not in seen and node.module not in PLUMBING:
                runs(node.module, seen)
    return seen


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_stages_key_carries_the_code_of_every_module_its_work_runs(stage):
    module = STAGES[stage]
    missing = runs(module) - key_modules(module)
    assert not missing, f"{stage}: {sorted(missing)} run but are not in its key"


def test_editing_a_module_changes_its_code_version(tmp_path, monkeypatch):
    (tmp_path / "stage_mod.py").write_text("def work():\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = code_version("stage_mod")
    (tmp_path / "stage_mod.py").write_text("def work():\n    return 2\n")
    assert code_version("stage_mod") != before


def test_a_step_key_names_its_step_content_and_version():
    key = StepKey("crop", fingerprint("model", "{}", "code"))
    assert key("ab" * 32) == f"crop-{'ab' * 32}-{fingerprint('model', '{}', 'code')}"
    assert key("ab" * 32) != StepKey("crop", fingerprint("model", "{}", "other code"))("ab" * 32)
