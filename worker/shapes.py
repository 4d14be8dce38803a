"""Give batched per-item outputs the exact shape ``pipe(inputs)`` returns in-process.

The fleet always runs a *list* of items through the pipeline, because items
of many jobs share one call. A few pipelines reshape their result in
``__call__`` depending on how they were called; this module undoes and redoes
those quirks so the fleet's result equals the in-process one.
"""

from __future__ import annotations

from typing import Any

#: ``pipe([x])`` returns ``pipe([x])[0]`` for these tasks (a list of one is unwrapped).
UNWRAP_LIST_OF_ONE = frozenset({"fill-mask", "keypoint-matching", "table-question-answering"})

#: ``pipe("text")`` returns ``[output]`` unless ``top_k`` is passed.
WRAP_SINGLE_TEXT = frozenset({"text-classification", "sentiment-analysis"})

#: pipefleet's v4 seq2seq pipelines (``translation_xx_to_yy`` aliases too, see :func:`is_seq2seq`).
SEQ2SEQ_TASKS = frozenset({"summarization", "translation", "text2text-generation"})


def is_seq2seq(task: str) -> bool:
    """Tasks whose ``pipe(text)`` gives a list of records, unwrapped for a list of texts if each has one."""
    return task in SEQ2SEQ_TASKS or task.startswith("translation_")


def batch_outputs(task: str, payloads: list[Any], raw: Any) -> list[Any]:
    """Turn the result of ``pipe(payloads)`` into one output per payload."""
    if task in UNWRAP_LIST_OF_ONE and len(payloads) == 1:
        return [raw]
    if not isinstance(raw, list):
        raw = list(raw)
    if is_seq2seq(task):
        # Per item, always what pipe(text) returns; job_result unwraps again as the job's own call would.
        return [output if isinstance(output, list) else [output] for output in raw]
    return raw


def padding_free_groups(task: str, pipe: Any, payloads: list[Any]) -> list[list[int]]:
    """Indices of the payloads that may share one forward pass, in groups.

    A CTC speech model decodes its padding frames too, so a short clip batched
    with a long one gets extra text; such clips batch only with clips of the
    same length. Everything else is one group.
    """
    everything = [list(range(len(payloads)))]
    if task != "automatic-speech-recognition" or getattr(pipe, "type", None) not in ("ctc", "ctc_with_lm"):
        return everything
    groups: dict[int, list[int]] = {}
    for index, payload in enumerate(payloads):
        raw = payload.get("raw") if isinstance(payload, dict) else None
        groups.setdefault(-1 if raw is None else len(raw), []).append(index)
    return list(groups.values())


def _token_count(pipe: Any, text: Any, params: dict[str, Any]) -> int:
    tokenize_kwargs = dict(params.get("tokenize_kwargs") or {})
    if "truncation" in params:
        tokenize_kwargs["truncation"] = params["truncation"]
    return len(pipe.tokenizer(text, **tokenize_kwargs)["input_ids"])


def _trim(output: Any, length: int, left: bool) -> Any:
    # Feature-extraction output is [tokens x hidden] inside a batch dimension of one.
    rows = output[0]
    trimmed = rows[len(rows) - length:] if left else rows[:length]
    if hasattr(output, "shape"):
        return trimmed.unsqueeze(0) if hasattr(trimmed, "unsqueeze") else trimmed[None]
    return [trimmed]


def trim_padding(task: str, pipe: Any, payloads: list[Any], outputs: list[Any], params: dict[str, Any]) -> list[Any]:
    """Drop the padding positions batching added to feature-extraction outputs.

    Unbatched, ``pipe(text)`` returns one vector per real token; in a padded
    batch every item gets the longest item's length. The fleet returns what
    the unbatched call does.
    """
    if task != "feature-extraction" or len(payloads) < 2 or getattr(pipe, "tokenizer", None) is None:
        return outputs
    left = getattr(pipe.tokenizer, "padding_side", "right") == "left"
    return [_trim(output, _token_count(pipe, payload, params), left) for payload, output in zip(payloads, outputs)]


def job_result(task: str, inputs: list[Any], outputs: list[Any], *, single: bool,
               params: dict[str, Any]) -> Any:
    """The job's result as the in-process call would shape it."""
    if single:
        output = outputs[0]
        if task in WRAP_SINGLE_TEXT and "top_k" not in params and isinstance(inputs[0], str):
            return [output]
        return output
    if task in UNWRAP_LIST_OF_ONE and len(outputs) == 1:
        return outputs[0]
    if is_seq2seq(task) and all(isinstance(i, str) for i in inputs) and all(
            isinstance(o, list) and len(o) == 1 for o in outputs):
        return [output[0] for output in outputs]
    return outputs
