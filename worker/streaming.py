"""Token streaming of text-generation and image-text-to-text jobs: generated ids in, text events out.

Generation loops (a static batch's ``generate``, or the continuous batching
engine) hand token ids to :class:`TextStreams` and return at once; decoding
and the Redis writes happen on the :class:`~worker.events.EventWriter`
thread, in order. Each step yields at most one ``text`` event per sequence,
with everything that step made readable.

A piece is decoded the way the text-generation pipeline decodes the final
result (``skip_special_tokens=True`` over the generated ids), and a trailing
U+FFFD (an incomplete UTF-8 byte sequence) is held back until the next token
completes it. When the job ends, :meth:`TextStreams.finish` compares what was
sent with the job's final ``generated_text`` and sends the rest, so the pieces
of a sequence always add up to its generated text with
``return_full_text=False``. A sequence that runs again in the same job (a
failed batch rerun job by job, an out-of-memory split) only sends text past
what it already sent.

Sequence ``index`` of a job is ``item * num_return_sequences + j``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable

from producers.schemas import EventKind
from worker.events import EventWriter

logger = logging.getLogger(__name__)

Key = tuple[str, int]
"""(job id, sequence index) of one generated sequence."""


@dataclass
class _Sequence:
    tokens: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    emitted: str = ""
    finish_reason: str | None = None
    scanned: int = 0


def new_text(payload: Any, record: Any, params: dict[str, Any]) -> str:
    """The text a sequence generated, from its pipeline output record (either ``return_full_text``)."""
    generated = record.get("generated_text") if isinstance(record, dict) else None
    if isinstance(generated, list) and generated and isinstance(generated[-1], dict):
        content = str(generated[-1].get("content", ""))
        prefill = payload[-1].get("content", "") if (isinstance(payload, list) and payload and
                                                     payload[-1].get("role") == "assistant") else ""
        return content[len(prefill):] if prefill and content.startswith(prefill) else content
    if not isinstance(generated, str):
        return ""
    prompt = payload.get("text") if isinstance(payload, dict) else payload  # image-text-to-text: {"images", "text"}
    if params.get("return_full_text", True) and isinstance(prompt, str) and generated.startswith(prompt):
        return generated[len(prompt):]
    return generated


class TextStreams:
    """The text streams of one text-generation deployment's jobs; see the module docstring."""

    def __init__(self, tokenizer: Any, writer: EventWriter, *, eos_token_ids: Iterable[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.writer = writer
        self.eos_token_ids = frozenset(eos_token_ids)
        self._active: set[str] = set()
        self._pieces: set[str] = set()
        self._lock = threading.Lock()
        # Touched only on the writer thread.
        self._sequences: dict[Key, _Sequence] = {}

    def begin(self, job_id: str, *, pieces: bool = True) -> None:
        """A text-generation job starts on this worker; its events follow a ``restart`` if it ran before.

        ``pieces``: its caller reads the text as it comes (the job's ``stream`` flag); a continuous batching
        engine reports such a job's every step, and any other job's sequences once, when they end.
        """
        with self._lock:
            self._active.add(job_id)
            if pieces:
                self._pieces.add(job_id)
        self.writer.begin(job_id)

    def streaming(self, job_id: str) -> bool:
        """True while ``job_id`` began and has not ended (chunks of a list job never stream)."""
        return job_id in self._active

    def pieces(self, job_id: str) -> bool:
        """True while ``job_id`` streams and its caller asked for the text as it comes."""
        return job_id in self._pieces

    def reset(self, keys: list[Key], prompt_tokens: list[int]) -> None:
        """These sequences (re)start generating from their prompts."""
        self.writer.call(lambda: self._reset(keys, prompt_tokens))

    def extend(self, updates: list[tuple[Key, list[int]]]) -> None:
        """New token ids of some sequences, one generation step's worth."""
        loud = self._loud(updates)
        self.writer.call(lambda: self._apply(updates, cumulative=False, loud=loud))

    def replace(self, updates: list[tuple[Key, list[int]]]) -> None:
        """All generated token ids so far of some sequences (the engine reports them so)."""
        loud = self._loud(updates)
        self.writer.call(lambda: self._apply(updates, cumulative=True, loud=loud))

    def _loud(self, updates: list[tuple[Key, list[int]]]) -> frozenset[str]:
        """The jobs among ``updates`` whose callers read the text as it comes, as of now."""
        with self._lock:
            return frozenset(key[0] for key, _ in updates if key[0] in self._pieces)

    def finish(self, job_id: str, payloads: list[Any], outputs: list[Any], params: dict[str, Any]) -> None:
        """The job succeeded: send each sequence's missing text, then ``done`` with usage and finish reasons."""
        finals: list[str] = []
        for payload, output in zip(payloads, outputs):
            records = output if isinstance(output, list) else [output]
            finals.extend(new_text(payload, record, params) for record in records)
        max_new_tokens = params.get("max_new_tokens")
        self._end(job_id)
        self.writer.call(lambda: self._finish(job_id, finals, len(payloads), max_new_tokens))

    def fail(self, job_id: str, error: BaseException) -> None:
        """The job failed or was cancelled: its stream ends with an ``error`` event."""
        self._end(job_id)
        data = {"type": type(error).__name__, "message": str(error)}
        self.writer.call(lambda: self._drop(job_id) + [(job_id, EventKind.ERROR, data)])

    def _end(self, job_id: str) -> None:
        with self._lock:
            self._active.discard(job_id)
            self._pieces.discard(job_id)

    # Writer thread from here on.

    def _reset(self, keys: list[Key], prompt_tokens: list[int]) -> list:
        for key, prompt in zip(keys, prompt_tokens):
            sequence = self._sequences.setdefault(key, _Sequence())
            sequence.tokens = []
            sequence.prompt_tokens = prompt
            sequence.finish_reason = None
            sequence.scanned = 0
        return []

    def _apply(self, updates: list[tuple[Key, list[int]]], *, cumulative: bool, loud: frozenset[str]) -> list:
        # Every sequence's tokens are kept (usage, finish reason); only those of ``loud`` jobs are decoded here.
        # A quiet job's text goes out whole in ``_finish``: decoding every sequence at every step would hold the
        # GIL the generation loop needs, for text nobody reads until the end.
        events = []
        for key, tokens in updates:
            sequence = self._sequences.setdefault(key, _Sequence())
            if sequence.finish_reason is not None and not cumulative:
                continue  # padding a static batch adds after this row's end of sequence
            if cumulative:
                sequence.tokens = list(tokens)
            else:
                sequence.tokens.extend(tokens)
            if sequence.finish_reason is None:
                for position in range(sequence.scanned, len(sequence.tokens)):
                    if sequence.tokens[position] in self.eos_token_ids:
                        del sequence.tokens[position + 1:]
                        sequence.finish_reason = "stop"
                        break
                sequence.scanned = len(sequence.tokens)
            else:
                del sequence.tokens[sequence.scanned:]
            if key[0] not in loud:
                continue
            text = self.tokenizer.decode(sequence.tokens, skip_special_tokens=True).rstrip("\ufffd")
            if len(text) > len(sequence.emitted) and text.startswith(sequence.emitted):
                piece = text[len(sequence.emitted):]
                sequence.emitted = text
                events.append((key[0], EventKind.TEXT, {"text": piece, "index": key[1]}))
        return events

    def _drop(self, job_id: str) -> list:
        for key in [key for key in self._sequences if key[0] == job_id]:
            del self._sequences[key]
        return []

    def _finish(self, job_id: str, finals: list[str], n_prompts: int, max_new_tokens: Any) -> list:
        events = []
        finish_reasons = []
        prompt_tokens: dict[int, int] = {}
        completion_tokens = 0
        per_prompt = max(1, len(finals) // max(1, n_prompts))
        for index, final in enumerate(finals):
            sequence = self._sequences.get((job_id, index)) or _Sequence()
            if final.startswith(sequence.emitted):
                if len(final) > len(sequence.emitted):
                    events.append((job_id, EventKind.TEXT, {"text": final[len(sequence.emitted):], "index": index}))
            else:
                logger.warning("job %s sequence %d: streamed text is not a prefix of the result", job_id, index)
            count = len(sequence.tokens) if sequence.tokens else len(self.tokenizer(final, add_special_tokens=False)
                                                                      ["input_ids"])
            completion_tokens += count
            prompt_tokens[index // per_prompt] = sequence.prompt_tokens
            reason = sequence.finish_reason
            if reason is None:
                reason = "length" if isinstance(max_new_tokens, int) and count >= max_new_tokens else "stop"
            finish_reasons.append(reason)
        self._drop(job_id)
        usage = {"prompt_tokens": sum(prompt_tokens.values()), "completion_tokens": completion_tokens}
        events.append((job_id, EventKind.DONE, {"state": "SUCCESS", "usage": usage,
                                                "finish_reasons": finish_reasons}))
        return events


def static_streamer(streams: TextStreams, targets: list[tuple[str, int] | None], *, num_return_sequences: int,
                    pad_token_id: int | None) -> Any:
    """A ``generate(streamer=...)`` for one static batch; ``targets[i]`` is payload i's (job id, item index).

    ``generate`` puts the (expanded) prompt ids first, then one tensor of new ids
    per step, and calls ``end()``; a batch that runs as several ``generate``
    calls (seeded items, items run singly) goes through the payloads in order.
    """
    from transformers.generation.streamers import BaseStreamer

    class BatchStreamer(BaseStreamer):
        """Batch-aware: each row of a step goes to its own job's sequence."""

        def __init__(self) -> None:
            self.rows: list[Key | None] | None = None
            self.next_payload = 0

        def put(self, value: Any) -> None:
            if self.rows is None:
                self._start(value)
                return
            if not any(self.rows):
                return
            tokens = value.tolist()
            updates = [(key, row if isinstance(row, list) else [row])
                       for key, row in zip(self.rows, tokens) if key is not None]
            streams.extend(updates)

        def _start(self, prompt: Any) -> None:
            n_rows = int(prompt.shape[0])
            per_payload = max(1, num_return_sequences)
            count = max(1, n_rows // per_payload)
            rows: list[Key | None] = []
            for target in targets[self.next_payload:self.next_payload + count]:
                for j in range(per_payload):
                    live = target is not None and streams.streaming(target[0])
                    rows.append((target[0], target[1] * per_payload + j) if live else None)
            self.next_payload += count
            self.rows = rows
            live_rows = [(key, i) for i, key in enumerate(rows) if key is not None]
            if live_rows:
                real = (prompt != pad_token_id).sum(dim=1).tolist() if pad_token_id is not None else \
                    [int(prompt.shape[1])] * n_rows
                streams.reset([key for key, _ in live_rows], [int(real[i]) for _, i in live_rows])

        def end(self) -> None:
            self.rows = None

    return BatchStreamer()


def eos_token_ids(pipe: Any) -> list[int]:
    """The ids that end a sequence for ``pipe``'s model (generation config, else config)."""
    for source in (getattr(pipe.model, "generation_config", None), pipe.model.config):
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    return []


def with_streamer(streams: TextStreams, pipe: Any, items: list[Any], payloads: list[Any],
                  params: dict[str, Any]) -> dict[str, Any]:
    """``params`` plus a streamer for this static batch, when its jobs stream and ``generate`` can stream."""
    generate_kwargs = params.get("generate_kwargs") or {}
    # The model's own generation config may ask for beams when the call does not.
    config = getattr(pipe, "generation_config", None) or getattr(getattr(pipe, "model", None), "generation_config", None)
    beams = params.get("num_beams", generate_kwargs.get("num_beams", getattr(config, "num_beams", 1))) or 1
    if beams > 1 or len(items) != len(payloads):  # beam search refuses streamers; finish() sends its text
        return params
    targets = [(item.job_id, item.index) if streams.streaming(item.job_id) else None for item in items]
    if not any(targets):
        return params
    per_payload = params.get("num_return_sequences", generate_kwargs.get("num_return_sequences", 1)) or 1
    pad = getattr(pipe.tokenizer, "pad_token_id", None)
    streamer = static_streamer(streams, targets, num_return_sequences=per_payload, pad_token_id=pad)
    from transformers.pipelines.image_text_to_text import ImageTextToTextPipeline

    if isinstance(pipe, ImageTextToTextPipeline):  # its call params go to the processor; generate's, here
        return {**params, "generate_kwargs": {**generate_kwargs, "streamer": streamer}}
    return {**params, "streamer": streamer}
