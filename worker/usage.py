"""Token counts a job reports with its result (``ResultEnvelope.usage``), for OpenAI-style ``usage``.

Only what the worker knows exactly is reported. Feature-extraction outputs
hold one vector per real token (batching's padding is trimmed before), so the
count is read off the outputs without tokenizing again.
"""

from __future__ import annotations

from typing import Any


def token_usage(task: str, outputs: list[Any]) -> dict[str, int] | None:
    """``{"prompt_tokens", "total_tokens"}`` of a job's unpooled outputs; None where not counted."""
    if task != "feature-extraction":
        return None
    tokens = 0
    for output in outputs:
        if isinstance(output, dict):  # a partial job's failed item
            continue
        tokens += len(output[0])
    return {"prompt_tokens": tokens, "total_tokens": tokens}


def add_usage(parts: list[dict[str, int] | None]) -> dict[str, int] | None:
    """The usage of a chunked job: the sum of its chunks' (None if a chunk reported none)."""
    if not parts or any(part is None for part in parts):
        return None
    total: dict[str, int] = {}
    for part in parts:
        for name, count in part.items():
            total[name] = total.get(name, 0) + count
    return total
