"""OpenAI's ``logprobs`` of a choice, from the per-token entries a worker put in the job's records.

A text-generation worker, static or continuous, lists for each generated
token its text, its raw log probability and the most likely alternatives of
its step (the fleet param ``logprobs``, :mod:`worker.logprobs`). Chat choices take them as
``{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}``, completion
choices as ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``.
When the gateway cuts a choice's text at a stop sequence, the tokens that
start past the cut are left out, as OpenAI leaves out the stop sequence.
"""

from __future__ import annotations

from typing import Any

from gateway.protocol import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob


def kept_entries(record: Any, text: str, stopped: bool) -> list[dict[str, Any]]:
    """The entries of the tokens a choice keeps: all of them, or those that start before a stop sequence's cut."""
    entries = (record.get("logprobs") or []) if isinstance(record, dict) else []
    if not stopped:
        return list(entries)
    kept, offset = [], 0
    for entry in entries:
        if offset >= len(text):
            break
        kept.append(entry)
        offset += len(entry["token"])
    return kept


def _token(entry: dict[str, Any]) -> dict[str, Any]:
    return {"token": entry["token"], "logprob": entry["logprob"], "bytes": list(entry["token"].encode("utf-8"))}


def chat_logprobs(entries: list[dict[str, Any]]) -> ChatLogprobs:
    """A chat choice's ``logprobs``."""
    return ChatLogprobs(content=[
        TokenLogprob(**_token(entry), top_logprobs=[TopLogprob(**_token(alt)) for alt in entry["top_logprobs"]])
        for entry in entries])


def completion_logprobs(entries: list[dict[str, Any]]) -> CompletionLogprobs:
    """A completion choice's ``logprobs``; ``text_offset`` counts from the start of the choice's text."""
    offsets, offset = [], 0
    for entry in entries:
        offsets.append(offset)
        offset += len(entry["token"])
    # Two alternatives that decode to the same text (byte pieces) share a key, as in OpenAI's format.
    return CompletionLogprobs(tokens=[entry["token"] for entry in entries],
                              token_logprobs=[entry["logprob"] for entry in entries],
                              top_logprobs=[{alt["token"]: alt["logprob"] for alt in entry["top_logprobs"]}
                                            for entry in entries],
                              text_offset=offsets)
