"""A small Server-Sent Events reader over httpx, for the tests (the spec's field rules, nothing more)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import httpx


@dataclass
class SSEvent:
    """One dispatched event: its id, type and data lines joined."""

    id: str | None = None
    event: str = "message"
    data: str = ""
    lines: list[str] = field(default_factory=list)


def read_events(response: httpx.Response) -> Iterator[SSEvent]:
    """Events of a streamed response, as an EventSource dispatches them (comments skipped)."""
    current = SSEvent()
    for line in response.iter_lines():
        if line == "":
            if current.lines:
                current.data = "\n".join(current.lines)
                yield current
            current = SSEvent()
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            current.lines.append(value)
        elif name == "id":
            current.id = value
        elif name == "event":
            current.event = value
    if current.lines:
        current.data = "\n".join(current.lines)
        yield current
