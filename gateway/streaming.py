"""OpenAI streams of a generation job: its text events as SSE chunks, closed by ``data: [DONE]``.

The job's events (``job.aevents()``) carry text pieces per output sequence;
sequence ``i`` is choice ``i``. Each piece becomes one chunk of that choice,
a stop sequence ends the choice (its text is held back until it cannot be the
start of one), and the ``done`` event gives every choice its finish reason and,
with ``stream_options.include_usage``, a last chunk with the usage. A job that
fails mid-stream ends the stream with an OpenAI error object.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Callable

from gateway.errors import describe, error_response_parts
from gateway.generation import Outcome, StopScanner, finish_reason, outcome_from_done
from gateway.logprobs import kept_entries
from gateway.protocol import Usage
from producers.errors import PipefleetError
from producers.job import Job

DONE_LINE = "[DONE]"
"""The data of the last SSE event of an OpenAI stream."""

#: make_chunk(index, text, finish_reason, usage[, logprob entries]) -> a chunk model (None index: the usage-only
#: chunk).
MakeChunk = Callable[..., Any]


def _data(chunk: Any) -> str:
    return chunk.model_dump_json(exclude_none=False)


async def openai_stream(job: Job, *, path: str, n_choices: int, stops: list[str], make_chunk: MakeChunk,
                        include_usage: bool, whole_texts: Callable[[Any], list[str]],
                        first: Callable[[int], Any] | None = None,
                        records: Callable[[Any], list[dict]] | None = None,
                        max_wait_s: float | None = None) -> AsyncIterator[str]:
    """SSE ``data`` strings of the OpenAI stream of ``job``.

    ``whole_texts(output)`` gives each choice's text from the job's output: a
    job whose worker streamed no text at all (one that predates streaming)
    still answers, with each whole text in one chunk. With ``records`` (the
    caller asked for log probabilities), each choice's last chunk carries the
    logprobs of all its tokens, read from the job's result records.
    """
    from producers.events import TextFollower
    from producers.schemas import EventKind

    scanners = [StopScanner(stops) for _ in range(n_choices)]
    sent = [""] * n_choices
    streamed = False
    output: Any = None
    choice_records: list[dict] | None = None
    follower = TextFollower(None)
    outcome = Outcome(0, 0, None)
    if first is not None:
        for index in range(n_choices):
            yield _data(first(index))
    completed = False
    try:
        async for event in job.aevents(timeout_s=max_wait_s):
            pieces = follower.feed(event)
            if event.kind is EventKind.TEXT:
                index = int(event.data.get("index", 0))
                if not 0 <= index < n_choices:
                    continue
                for piece in pieces:
                    streamed = True
                    text = scanners[index].feed(piece)
                    if text:
                        sent[index] += text
                        yield _data(make_chunk(index, text, None, None))
            elif event.kind is EventKind.DONE:
                outcome = outcome_from_done(event.data)
        if not streamed or records is not None:
            output = await job.aresult(timeout=max_wait_s)
        if not streamed:
            for index, text in enumerate(whole_texts(output)):
                text = scanners[index].feed(text)
                if text:
                    sent[index] += text
                    yield _data(make_chunk(index, text, None, None))
        choice_records = records(output) if records is not None else None
        completed = True
    except PipefleetError as error:  # the job failed, was cancelled or timed out: say so, then end the stream
        status, error_type, message, param = describe(error)
        yield json.dumps(error_response_parts(path, status, error_type, message, param)[1])
        yield DONE_LINE
        return
    finally:
        if not completed:
            # The client went away, or the wait ran out: nobody will read the rest, so stop generating it.
            asyncio.get_running_loop().create_task(job.acancel())
    for index, scanner in enumerate(scanners):
        rest = scanner.flush()
        reason = finish_reason(index, scanner.stopped, outcome)
        if choice_records is None:
            yield _data(make_chunk(index, rest, reason, None))
        else:
            entries = kept_entries(choice_records[index], sent[index] + rest, scanner.stopped)
            yield _data(make_chunk(index, rest, reason, None, entries))
    if include_usage:
        yield _data(make_chunk(None, None, None, outcome.usage()))
    yield DONE_LINE
