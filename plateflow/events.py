"""The event `plateflow ingest` emits, which refresh-corpus's deployment trigger (prefect.yaml)
turns into a refresh of just the new plates."""

from __future__ import annotations

import asyncio
from pathlib import Path

PLATES_INGESTED = "plateflow.plates.ingested"


def corpus_resource_id(root: Path) -> str:
    return f"plateflow.corpus.{Path(root).expanduser().resolve()}"


def emit_plates_ingested(root: Path, plates: list[str]):
    """Send the event to the configured Prefect server and wait until it is sent."""
    from prefect.events import Event
    from prefect.events.clients import get_events_client

    root = Path(root).expanduser().resolve()
    event = Event(event=PLATES_INGESTED,
                  resource={"prefect.resource.id": corpus_resource_id(root), "prefect.resource.name": root.name},
                  payload={"root": str(root), "plates": plates})

    async def send():
        async with get_events_client() as client:
            await client.emit(event)

    asyncio.run(send())
    return event
