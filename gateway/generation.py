"""What completions and chat completions share: sampling params, stop sequences, finish reasons, usage.

Only the fields the caller sent become call params (pydantic's
``model_fields_set``); a field left out takes the deployment's default, the
model's generation config, as ``pipe(prompt)`` does in-process (vLLM's rule).
OpenAI's fields map onto the text-generation pipeline's call params:
``max_tokens`` → ``max_new_tokens``; ``temperature`` 0 → greedy
(``do_sample=False``), any other ``temperature`` or a ``top_p`` →
``do_sample=True`` with them; ``seed`` → the fleet's ``seed``; ``stop`` →
``stop_sequence`` (generation stops there, and the stop text is cut from the
answer, as OpenAI does); ``logit_bias`` → ``sequence_bias`` (each token id
a one-token sequence: ``generate`` adds its bias to that token's logit);
``frequency_penalty`` and ``presence_penalty`` pass as they are (the fleet's
own processor, ``worker.penalties``). ``n`` > 1 samples become
``num_return_sequences``; under greedy decoding ``n`` repeats the prompt,
since greedy gives one answer. vLLM's extra sampling params are taken too:
``top_k`` and ``min_p`` (sampling, as ``top_p``), ``repetition_penalty`` and
``min_tokens`` (→ ``min_new_tokens``). Log probabilities (chat's ``logprobs`` and
``top_logprobs``, completions' ``logprobs``) become the fleet's ``logprobs``
(:mod:`gateway.logprobs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.protocol import GenerationFields, Usage
from producers.errors import InvalidParams
from producers.job import Job


def is_greedy(request: GenerationFields) -> bool:
    """True when the caller asked for greedy decoding (``temperature=0``)."""
    return request.temperature == 0


def sampling_params(request: GenerationFields, max_tokens: int) -> dict[str, Any]:
    """The pipeline call params of an OpenAI generation request: the fields the caller set, mapped."""
    sent = {name for name in request.model_fields_set if getattr(request, name) is not None}
    params: dict[str, Any] = {"max_new_tokens": max_tokens, "return_full_text": False}
    if is_greedy(request):
        params["do_sample"] = False
    else:
        if "temperature" in sent:
            params.update(do_sample=True, temperature=request.temperature)
        for name in ("top_p", "top_k", "min_p"):
            if name in sent:
                params.update(do_sample=True, **{name: getattr(request, name)})
        if request.n > 1:  # several choices of one prompt only differ when sampled
            params.update(do_sample=True, num_return_sequences=request.n)
    if request.seed is not None:
        params["seed"] = request.seed
    stops = request.stops()
    if len(stops) > 4:
        raise InvalidParams("'stop' takes at most 4 sequences")
    if stops:
        params["stop_sequence"] = stops
    if request.logit_bias:
        params["sequence_bias"] = [[[int(token)], bias] for token, bias in request.logit_bias.items()]
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(request, name):
            params[name] = getattr(request, name)
    if request.repetition_penalty is not None:
        params["repetition_penalty"] = request.repetition_penalty
    if request.min_tokens:
        params["min_new_tokens"] = request.min_tokens
    top_logprobs = request.top_logprobs_count()
    if top_logprobs is not None:
        params["logprobs"] = top_logprobs
    return params


GENERATE_KWARGS = ("do_sample", "temperature", "top_p", "top_k", "min_p", "num_return_sequences", "sequence_bias",
                   "repetition_penalty", "min_new_tokens")
"""Sampling params the image-text-to-text pipeline takes only inside ``generate_kwargs``."""


def vision_params(params: dict[str, Any]) -> dict[str, Any]:
    """:func:`sampling_params` for an image-text-to-text pipeline: its sampling goes in ``generate_kwargs``
    (passed as call params, it would reach the processor, which ignores them)."""
    kept = {name: value for name, value in params.items() if name not in GENERATE_KWARGS}
    moved = {name: value for name, value in params.items() if name in GENERATE_KWARGS}
    return {**kept, "generate_kwargs": moved} if moved else kept


def expand_inputs(request: GenerationFields, prompts: list[Any]) -> list[Any]:
    """The job's inputs: each prompt once, or ``n`` times under greedy decoding."""
    copies = request.n if is_greedy(request) else 1
    return [prompt for prompt in prompts for _ in range(copies)]


def flat_records(outputs: Any, n_prompts: int, n: int) -> list[dict[str, Any]]:
    """The output records of a job's result in choice order (choice ``i * n + j`` is prompt ``i``'s ``j``-th)."""
    if not isinstance(outputs, list):
        outputs = [outputs]
    records: list[dict[str, Any]] = []
    for output in outputs:
        records += output if isinstance(output, list) else [output]
    if len(records) != n_prompts * n:
        raise InvalidParams(f"the deployment returned {len(records)} texts for {n_prompts} prompt(s) x n={n}")
    return records


def flat_texts(outputs: Any, n_prompts: int, n: int) -> list[str]:
    """The generated texts in choice order."""
    return [str(record["generated_text"]) for record in flat_records(outputs, n_prompts, n)]


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` up to its first stop sequence, and whether one was found."""
    cut = min((index for index in (text.find(stop) for stop in stops) if index >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


class StopScanner:
    """Hands out a stream's text, holding back what may still turn into a stop sequence."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.hold = max((len(stop) for stop in stops), default=1) - 1
        self.buffer = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """The text safe to send after ``piece`` arrives ('' once a stop sequence was seen)."""
        if self.stopped:
            return ""
        self.buffer += piece
        text, found = cut_at_stop(self.buffer, self.stops)
        if found:
            self.stopped = True
            self.buffer = ""
            return text
        ready = self.buffer[:len(self.buffer) - self.hold] if self.hold else self.buffer
        self.buffer = self.buffer[len(ready):]
        return ready

    def flush(self) -> str:
        """What is left when the stream ends."""
        text, self.buffer = ("" if self.stopped else self.buffer), ""
        return text


@dataclass
class Outcome:
    """Token counts and finish reasons of a finished generation job (one reason per sequence)."""

    prompt_tokens: int
    completion_tokens: int
    finish_reasons: list[str] | None

    def usage(self) -> Usage:
        """As OpenAI's ``usage``."""
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                     total_tokens=self.prompt_tokens + self.completion_tokens)


def outcome_from_done(data: dict[str, Any]) -> Outcome:
    """The :class:`Outcome` a text-generation job's ``done`` event carries (workers count the tokens)."""
    usage = data.get("usage") or {}
    reasons = data.get("finish_reasons")
    return Outcome(prompt_tokens=int(usage.get("prompt_tokens", 0)),
                   completion_tokens=int(usage.get("completion_tokens", 0)),
                   finish_reasons=[str(r) for r in reasons] if isinstance(reasons, list) else None)


async def job_outcome(job: Job) -> Outcome:
    """The token counts and finish reasons a finished generation job's worker reported in its ``done`` event.

    Zero counts and no reasons when its worker wrote no events.
    """
    from producers.constants import EVENTS_FINAL_GRACE_S
    from producers.schemas import EventKind

    event = await job.afinal_event(grace_s=EVENTS_FINAL_GRACE_S)
    if event is not None and event.kind is EventKind.DONE:
        return outcome_from_done(event.data)
    return Outcome(0, 0, None)


def finish_reason(index: int, stopped: bool, outcome: Outcome) -> str:
    """``stop`` or ``length`` for sequence ``index``: a stop sequence, else what the worker saw."""
    if stopped:
        return "stop"
    reasons = outcome.finish_reasons
    if reasons and index < len(reasons) and reasons[index] in ("stop", "length"):
        return reasons[index]
    return "stop"
