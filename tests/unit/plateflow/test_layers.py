"""Floors point down: application (app/) -> flows/ -> tasks/ -> library (plateflow/). A module
never imports one from a floor above its own."""

import ast
from pathlib import Path

from fixtures import REPO

FLOORS = {"plateflow": 0, "tasks": 1, "flows": 2, "app": 3}


def imported_packages(path: Path) -> set[str]:
    """Top-level names of the packages a module imports, at any depth of the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_module_imports_from_a_floor_above_its_own():
    upward = []
    for package, floor in FLOORS.items():
        for path in sorted((REPO / package).rglob("*.py")):
            for name in imported_packages(path) & FLOORS.keys():
                if FLOORS[name] > floor:
                    upward.append(f"{path.relative_to(REPO)} imports {name}")
    assert upward == []


def test_the_check_sees_an_upward_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from flows.refresh import refresh_corpus\n")
    assert "flows" in imported_packages(module)


def test_the_corpus_layout_is_spelled_only_in_its_own_module():
    """Every corpus path comes from plateflow/layout.py: no other module holds one of its names
    as a string of its own (names inside f-strings and docstrings, and dict keys, are not counted)."""
    from plateflow import layout

    names = {v for k, v in vars(layout).items() if k.isupper() and isinstance(v, str)} | set(layout.VIZ_FILES)
    names |= {"refresh.lock", "sweep-needed", "source-index.parquet", "snapshot.parquet", "config.json", "index.html"}
    spelled = []
    for package in FLOORS:
        for path in sorted((REPO / package).rglob("*.py")):
            if path == REPO / "plateflow" / "layout.py":
                continue
            tree = ast.parse(path.read_text(), str(path))
            labels = {id(k) for d in ast.walk(tree) if isinstance(d, ast.Dict) for k in d.keys}  # not paths
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and node.value in names and id(node) not in labels:
                    spelled.append(f"{path.relative_to(REPO)}:{node.lineno} {node.value!r}")
    assert spelled == []


def test_the_corpus_table_takes_the_characterization_columns_from_one_schema():
    from plateflow.tables import CHARACTERIZATION_COLUMNS, PLATES_SCHEMA

    assert set(CHARACTERIZATION_COLUMNS) <= set(PLATES_SCHEMA.names)


def _tasks_defined(path: Path) -> list[str]:
    """The functions a module decorates with Prefect's ``@task``."""
    return [node.name for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, ast.FunctionDef)
            and any(getattr(getattr(d, "func", d), "id", None) == "task" for d in node.decorator_list)]


def test_tasks_holds_the_task_wrappers_and_only_they_are_tasks():
    """tasks/ is the floor of @task wrappers around the library's per-plate functions: each of
    its modules defines one, and no other floor does."""
    for path in sorted((REPO / "tasks").glob("*.py")):
        if path.name != "__init__.py":
            assert _tasks_defined(path), f"{path.relative_to(REPO)} defines no @task"
    for package in ("plateflow", "flows", "app"):
        for path in sorted((REPO / package).rglob("*.py")):
            assert not _tasks_defined(path), f"{path.relative_to(REPO)} defines a @task: it belongs in tasks/"
