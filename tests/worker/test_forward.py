"""The batch call (worker/forward.py), with a stand-in pipeline."""

from __future__ import annotations

import pytest

from worker.forward import BatchHooks, ForwardPass


class Pipe:
    """Records each call; fails the batched one with ``error`` when set."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.calls: list[int] = []

    def __call__(self, inputs, batch_size, **params):
        self.calls.append(batch_size)
        if self.error is not None and batch_size > 1:
            raise self.error
        return [{"label": text.upper(), **params} for text in inputs]


def test_one_output_per_payload_in_order():
    pipe = Pipe()
    outputs = ForwardPass("d", "text-classification", pipe)(["a", "b"], {"top_k": 1})
    assert outputs == [{"label": "A", "top_k": 1}, {"label": "B", "top_k": 1}] and pipe.calls == [2]


def test_a_batch_of_mismatched_shapes_runs_item_by_item():
    pipe = Pipe(RuntimeError("stack expects each tensor to be equal size"))
    assert ForwardPass("d", "text-classification", pipe)(["a", "b"], {}) == [{"label": "A"}, {"label": "B"}]
    assert pipe.calls == [2, 1]


def test_out_of_memory_goes_to_the_batcher_which_halves_the_batch():
    pipe = Pipe(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
    with pytest.raises(RuntimeError, match="out of memory"):
        ForwardPass("d", "text-classification", pipe)(["a", "b"], {})
    assert pipe.calls == [2]


def test_default_hooks_see_no_queue_and_nothing_cancelled():
    hooks = BatchHooks()
    assert hooks.queue_has_ready("d") is False and hooks.find_cancelled([]) == set()
