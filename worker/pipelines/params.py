"""The parameter rules the custom pipelines' ``_sanitize_parameters`` share, as transformers 4.x wrote them."""

from __future__ import annotations

from typing import Any


def given(**params: Any) -> dict[str, Any]:
    """The parameters the caller set (those not None), in order: one step's kwargs of ``_sanitize_parameters``."""
    return {name: value for name, value in params.items() if value is not None}


def at_least_one(name: str, value: int | None) -> int | None:
    """``value`` as it is; raises ValueError, in transformers' words, when it is set and below 1."""
    if value is not None and value < 1:
        raise ValueError(f"{name} parameter should be >= 1 (got {value})")
    return value
