"""The plateflow command line: a thin layer over the functions the flows call. The commands
live in corpus.py, serving.py, training.py, segment.py and finetuning.py; this module holds what they share."""

from __future__ import annotations

import atexit
import gc
import os
import sys
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer
from rich.console import Console


# Offline-friendly defaults for Prefect's embedded server; a user's own settings win.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

def _last_collection() -> None:
    """At exit the objects left are frozen, so the interpreter's last garbage collection does
    not walk the millions that Prefect, numba and matplotlib made: a refresh ends half a second
    sooner. Exit handlers still run (Prefect's flush its logs and events, logging closes its
    files); plateflow closes every file it writes where it writes it. triton (loaded with torch)
    reports the objects of its bindings still alive at exit as leaks, so with it loaded every
    object is collected as usual."""
    if "triton" in sys.modules:
        gc.unfreeze()
    else:
        gc.freeze()


atexit.register(_last_collection)

app = typer.Typer(help="Characterize, embed and smart-crop collections of plates with Prefect.",
                  no_args_is_help=True, add_completion=False, rich_markup_mode=None)
console = Console(soft_wrap=True)  # paths stay on one line, easy to copy

RootOpt = Annotated[Path, typer.Option("--root", "-r", metavar="DIR", help="Corpus root (holds plates_structured/).")]


CropFormat = Literal["jpeg", "png"]
Dispatch = Literal["auto", "local", "pool"]
TileMode = Literal["classic", "noise-framed"]


def _profile_facts() -> tuple[object | None, str, str]:
    """(dispatch policy, model names, GPU class names) for the help texts; a broken profile
    still lets --help print (the command then says what is wrong)."""
    from plateflow.errors import ConfigError
    from plateflow.profiles import dispatch_policy, load_profiles

    try:
        profiles = load_profiles()
        return dispatch_policy(), ", ".join(profiles.models), ", ".join(profiles.classes)
    except ConfigError:
        return None, "see profiles/models.toml", "see profiles/gpu_classes.toml"


POLICY, MODEL_NAMES, CLASS_NAMES = _profile_facts()


def _policy(section: str, key: str, unit: str = "") -> str:
    value = getattr(getattr(POLICY, section), key) if POLICY is not None else None
    return f"default: {value:g}{unit}, from profiles/dispatch.toml" if value is not None else "default: profiles/dispatch.toml"


def described(model: type, field: str, extra: str = "") -> str:
    """An option's help from its configuration field's description: written once, in the model,
    which the Prefect UI's form shows too; ``extra``: what only the command line adds."""
    text = (model.model_fields[field].description or "").rstrip(".")
    if not extra:
        return f"{text}."
    return f"{text[:-1]}; {extra})." if text.endswith(")") else f"{text} ({extra})."


CredentialsOpt = Annotated[Optional[str], typer.Option(
    help="Prefect block with the bucket's credentials, as <block-type>/<name> (s3-bucket/scans, aws-credentials/lab, "
         "gcs-bucket/scans, gcp-credentials/lab); without it, the environment's credentials.")]


# The commands register themselves on ``app`` (imported last: they import the names above).
from app.cli import corpus, finetuning, segment, serving, training  # noqa: E402,F401  (registers the commands)


def main() -> None:  # pragma: no cover - console entry point
    """The console command: a configuration error no command reported itself (a broken
    capability table, say) ends it with its message, exit status 2, not a traceback."""
    from rich.markup import escape

    from plateflow.errors import ConfigError

    try:
        app()
    except ConfigError as exc:
        console.print(f"[red]{escape(str(exc))}[/]")
        raise SystemExit(2) from None
