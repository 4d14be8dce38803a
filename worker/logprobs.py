"""Per-token log probabilities of generated text (OpenAI's ``logprobs``), on both generation paths.

``logprobs`` is a fleet param of text-generation jobs: ``logprobs=k`` (0 to
:data:`MAX_TOP_LOGPROBS`) adds to each output record a ``logprobs`` list with one
entry per generated token: the token, its log probability, and the ``k`` most
likely tokens of that step with theirs. As vLLM does by default
(``logprobs_mode="raw_logprobs"``), they are log-softmax of the model's raw
logits, before any penalty, temperature, top-k or top-p; the token is the one
the request actually took (sampled or greedy), so the list follows the text.

On continuous batching the engine's step hands every request's row of raw
logits to the fleet's sampler (:mod:`worker.cb_sampling`), which records an
entry per step with :func:`step_entry`. On the static path ``generate`` keeps
its raw logits (``output_logits=True``) and the text-generation pipeline
would return them whole, a vocabulary-sized list per token; for the call,
:func:`reduced_logits` puts a step before the pipeline's ``postprocess`` that
takes them out and keeps the entries. Either way :func:`render` writes the
entries into the records.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from producers.errors import InvalidParams
from worker.transformers_internals import take_generated_logits

LOGPROBS_PARAM = "logprobs"
"""The fleet param: how many of each step's most likely tokens to list (0: only the chosen one's)."""

MAX_TOP_LOGPROBS = 20
"""The most alternatives a job may ask for per token (OpenAI's ``top_logprobs`` limit)."""

Entry = tuple[Any, Any, Any, Any]
"""One generated token as tensors on the model's device: its id, its log probability, and the top ids with
theirs. Kept as tensors so that a step records it without waiting for the device; :func:`render` reads them."""


def check_logprobs(task: str, params: dict[str, Any]) -> None:
    """Raise :class:`InvalidParams` when ``logprobs`` is not 0..20, or the task cannot report them."""
    value = params.get(LOGPROBS_PARAM)
    if value is None:
        return
    if task != "text-generation":
        raise InvalidParams(f"param {LOGPROBS_PARAM!r} applies to text-generation deployments only, not {task}")
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOP_LOGPROBS:
        raise InvalidParams(f"param {LOGPROBS_PARAM!r} must be an integer from 0 to {MAX_TOP_LOGPROBS} "
                            f"(alternatives listed per token), got {value!r}")


def pop_logprobs(params: dict[str, Any]) -> int | None:
    """Remove ``logprobs`` from ``params`` (which go on to ``generate``); returns it."""
    return params.pop(LOGPROBS_PARAM, None)


def step_entry(raw_scores: Any, token: Any, top: int) -> Entry:
    """The entry of one step: ``token``'s log probability under ``raw_scores`` (one row of raw logits), and the
    ``top`` best; ``token`` is an int or a 0-d tensor on the row's device."""
    import torch

    logprobs = torch.log_softmax(raw_scores.float(), dim=-1)
    values, ids = torch.topk(logprobs, top)
    return torch.as_tensor(token, device=logprobs.device), logprobs[token], ids, values


def render(tokenizer: Any, entries: list[Entry]) -> list[dict[str, Any]]:
    """A sequence's entries as the result carries them: token text (special tokens kept), id and log probability.

    ``[{"token", "token_id", "logprob", "top_logprobs": [{"token", "token_id", "logprob"}, ...]}, ...]``
    """
    import torch

    if not entries:
        return []
    tokens = torch.stack([entry[0] for entry in entries]).tolist()  # one transfer from the device each
    logprobs = torch.stack([entry[1] for entry in entries]).tolist()
    top_ids = torch.stack([entry[2] for entry in entries]).tolist()
    top_values = torch.stack([entry[3] for entry in entries]).tolist()

    def text(token_id: int) -> str:
        return tokenizer.decode([token_id], skip_special_tokens=False)

    return [{"token": text(token), "token_id": token, "logprob": logprob,
             "top_logprobs": [{"token": text(i), "token_id": i, "logprob": v} for i, v in zip(ids, values)]}
            for token, logprob, ids, values in zip(tokens, logprobs, top_ids, top_values)]


OUTPUT_LOGITS = {"output_logits": True, "return_dict_in_generate": True}
"""The generate params that make ``generate`` keep every step's raw logits (static path)."""


@contextmanager
def reduced_logits(pipe: Any, top: int, eos_token_ids: frozenset[int]) -> Iterator[None]:
    """For the pipeline calls inside: each record gets its tokens' entries, and the raw logits stay behind.

    Called with :data:`OUTPUT_LOGITS` among the call's params. The pipeline's ``_forward`` hands ``postprocess``
    the logits as ``[1, sequences, steps, vocabulary]``; the entries follow each sequence's new tokens up to
    its first end-of-sequence token (a finished row of a batch goes on with padding). Only the device thread
    calls a pipeline, so the instance's ``postprocess`` is swapped for the calls and put back after.
    """
    original = pipe.postprocess

    def postprocess(model_outputs: dict[str, Any], **params: Any) -> Any:
        taken = take_generated_logits(model_outputs)
        records = original(model_outputs, **params)
        if taken is None:
            return records
        logits, sequences, start = taken
        for index, record in enumerate(records if isinstance(records, list) else [records]):
            tokens = sequences[index, start:].tolist()[:int(logits.shape[2])]
            ends = [position for position, token in enumerate(tokens) if token in eos_token_ids]
            tokens = tokens[:ends[0] + 1] if ends else tokens
            rows = logits[0, index]
            record["logprobs"] = render(pipe.tokenizer, [step_entry(rows[step], token, top)
                                                         for step, token in enumerate(tokens)])
        return records

    pipe.postprocess = postprocess
    try:
        yield
    finally:
        del pipe.postprocess
