"""The batch call (worker/forward.py), with a stand-in pipeline."""

from __future__ import annotations

import pytest

from producers.errors import OutOfMemory
from worker.batcher import PendingItem
from worker.forward import BatchHooks, ForwardPass, is_out_of_memory


class Pipe:
    """Records each call; fails a call of more than ``fits`` inputs with ``error`` when set."""

    def __init__(self, error: Exception | None = None, *, fits: int = 1) -> None:
        self.error = error
        self.fits = fits
        self.calls: list[int] = []

    def __call__(self, inputs, batch_size, **params):
        self.calls.append(batch_size)
        if self.error is not None and batch_size > self.fits:
            raise self.error
        return [{"label": text.upper(), **params} for text in inputs]


def items(*payloads):
    return [PendingItem(f"j{i}", 0, payload) for i, payload in enumerate(payloads)]


def test_one_output_per_payload_in_order():
    pipe = Pipe()
    outputs = ForwardPass("d", "text-classification", pipe)(items("a", "b"), {"top_k": 1})
    assert outputs == [{"label": "A", "top_k": 1}, {"label": "B", "top_k": 1}] and pipe.calls == [2]


def test_a_batch_of_mismatched_shapes_runs_item_by_item():
    pipe = Pipe(RuntimeError("stack expects each tensor to be equal size"))
    assert ForwardPass("d", "text-classification", pipe)(items("a", "b"), {}) == [{"label": "A"}, {"label": "B"}]
    assert pipe.calls == [2, 1]


def test_out_of_memory_halves_the_batch_down_to_what_fits():
    pipe = Pipe(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"), fits=2)
    forward = ForwardPass("d", "text-classification", pipe)
    texts = [chr(ord("a") + i) for i in range(8)]
    assert forward(items(*texts), {}) == [{"label": text.upper()} for text in texts]
    assert pipe.calls == [8, 4, 2, 2, 4, 2, 2]
    assert forward.metrics.oom_splits == 3


def test_an_item_that_does_not_fit_even_alone_gets_a_clear_error_and_the_rest_succeed():
    pipe = Pipe(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"), fits=0)
    outputs = ForwardPass("d", "text-classification", pipe)(items("a", "b"), {})
    assert all(isinstance(output, OutOfMemory) for output in outputs)
    assert "batch size 1 (back-off started at batch size 2)" in str(outputs[0])


def test_out_of_memory_detection():
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(ValueError("out of memory"))


def test_default_hooks_see_no_queue_and_nothing_cancelled():
    hooks = BatchHooks()
    assert hooks.queue_has_ready("d") is False and hooks.find_cancelled([]) == set()
