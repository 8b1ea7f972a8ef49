"""The event `plateflow ingest` emits, which refresh-corpus's deployment trigger (prefect.yaml)
turns into a refresh of just the new plates."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

PLATES_INGESTED = "plateflow.plates.ingested"
# The trigger passes the event's plates to the refresh as a flow-run parameter, which the server
# refuses past 512 KiB (and an event past 1.5 MB). A longer list is sent as none: the refresh
# then takes the whole corpus, where each unchanged plate costs a few stats.
MAX_LISTED_BYTES = 256 * 1024


def corpus_resource_id(root: Path) -> str:
    return f"plateflow.corpus.{Path(root).expanduser().resolve()}"


def plates_ingested(root: Path, plates: list[str]):
    """The event for ``plates`` added to the corpus at ``root``; its payload's ``plates`` is None
    (refresh every plate) when the list is longer than a flow-run parameter may be."""
    from prefect.events import Event

    root = Path(root).expanduser().resolve()
    listed = plates if len(json.dumps(plates)) <= MAX_LISTED_BYTES else None
    return Event(event=PLATES_INGESTED,
                 resource={"prefect.resource.id": corpus_resource_id(root), "prefect.resource.name": root.name},
                 payload={"root": str(root), "plates": listed, "added": len(plates)})


def emit_plates_ingested(root: Path, plates: list[str]):
    """Send the event to the configured Prefect server and wait until it is sent."""
    from prefect.events.clients import get_events_client

    event = plates_ingested(root, plates)

    async def send():
        async with get_events_client() as client:
            await client.emit(event)

    asyncio.run(send())
    return event
