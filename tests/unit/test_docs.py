"""The docs cannot drift from the command line: every `plateflow …` command in README.md and
docs/ parses against the application (its command exists, every option it gives exists and
takes what it is given, nothing required is missing), without running it."""

import re
import shlex

import click
import pytest
import typer

from app.cli import app
from fixtures import REPO

FENCE = re.compile(r"```(?:bash|sh|console)\n(.*?)```", re.S)


def documented_commands() -> list[tuple[str, list[str]]]:
    found = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]:
        for block in FENCE.findall(page.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                while words and words[0] in ("uv", "run", "python3", "-m", "--locked"):
                    words = words[1:]
                if words[:1] == ["plateflow"] and len(words) > 1:
                    found.append((f"{page.relative_to(REPO)}: {line.strip()}", words[1:]))
    return found


COMMANDS = documented_commands()


def test_the_docs_show_commands_at_all():
    assert len(COMMANDS) >= 10 and {args[0] for _, args in COMMANDS} >= {"ingest", "refresh", "tiles", "server"}


@pytest.mark.parametrize("where, args", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_a_documented_command_parses(where, args):
    group = typer.main.get_command(app)
    if args == ["--help"]:
        return
    command = group.get_command(click.Context(group), args[0])
    assert command is not None, f"{where}: no command {args[0]!r}"
    if "--help" in args:
        return
    try:
        command.make_context(f"plateflow {args[0]}", list(args[1:]))
    except click.UsageError as exc:
        pytest.fail(f"{where}: {exc.format_message()}")
