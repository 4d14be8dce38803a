"""OpenAI's ``frequency_penalty`` and ``presence_penalty``, as one logits processor both generation paths run.

transformers has no such processor (its ``repetition_penalty`` divides a logit, and counts the prompt too), so
the fleet brings its own, written as OpenAI defines the two penalties and as vLLM applies them: for each token
``j`` already generated ``c[j]`` times in this sequence's output (the prompt does not count),

    logit[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty

They are fleet params of text-generation jobs, each in [-2, 2]. The static path hands the processor to
``generate`` (``logits_processor``), which runs it after its own penalties and before temperature, top-k and
top-p; continuous batching puts it at the same place of the request's processors (:mod:`worker.cb_sampling`).
"""

from __future__ import annotations

from typing import Any

from producers.errors import InvalidParams

PENALTY_PARAMS = ("frequency_penalty", "presence_penalty")
"""The fleet params this module reads."""

PENALTY_TASKS = frozenset({"text-generation"})
"""Tasks whose jobs may set them."""


def check_penalties(task: str, params: dict[str, Any]) -> None:
    """Raise :class:`InvalidParams` naming a penalty that is not a number in [-2, 2], or that the task cannot take."""
    for name in PENALTY_PARAMS:
        value = params.get(name)
        if value is None:
            continue
        if task not in PENALTY_TASKS:
            raise InvalidParams(f"param {name!r} applies to text-generation deployments only, not {task}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -2 <= value <= 2:
            raise InvalidParams(f"param {name!r} must be a number from -2 to 2, got {value!r}")


def pop_penalties(params: dict[str, Any]) -> dict[str, Any]:
    """Remove the penalties from ``params`` (which go on to ``generate``); returns them."""
    return {name: params.pop(name) for name in PENALTY_PARAMS if name in params}


def penalties_of(params: dict[str, Any]) -> tuple[float, float]:
    """``(frequency, presence)`` of a job's params, 0 for one left out."""
    return float(params.get("frequency_penalty") or 0), float(params.get("presence_penalty") or 0)


class OutputTokenPenalty:
    """The logits processor of the two penalties (see the module docstring).

    With ``prompt_length`` the output starts there in every ``input_ids`` it is given (continuous batching: one
    request's own tokens). Without, it learns the start from ``generate``'s first call, and starts afresh when a
    call's tokens do not continue the previous call's by one token: one pipeline call may run several
    ``generate`` calls (items one at a time), each with a prompt of its own.
    """

    def __init__(self, frequency: float, presence: float, *, prompt_length: int | None = None) -> None:
        self.frequency = frequency
        self.presence = presence
        self._fixed_start = prompt_length
        self._start = prompt_length
        self._previous: Any = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if self._fixed_start is None:
            previous = self._previous
            continues = (previous is not None and input_ids.shape[0] == previous.shape[0]
                         and input_ids.shape[1] == previous.shape[1] + 1
                         and torch.equal(input_ids[:, :-1], previous))
            if not continues:
                self._start = input_ids.shape[1]
            self._previous = input_ids
        output = input_ids[:, self._start:]
        if output.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, output, torch.ones_like(output, dtype=scores.dtype))
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence


def penalty_processor(params: dict[str, Any], *, prompt_length: int | None = None) -> OutputTokenPenalty | None:
    """The processor of a job's penalties, or None when both are 0 or unset."""
    frequency, presence = penalties_of(params)
    if not frequency and not presence:
        return None
    return OutputTokenPenalty(frequency, presence, prompt_length=prompt_length)
