"""The batch call: one forward pass over the items the batcher flushed.

This is the heart of a worker, and the only code that touches the device for a static batch. It runs what
``pipe(inputs, batch_size=n)`` runs in-process (``preprocess → _forward → postprocess``) and returns one
output per input, as the unbatched call would:

- a stage item of a distributed chunk pipeline runs its one step (:mod:`worker.stages`);
- seeded items run one at a time after ``set_seed`` (:func:`run_seeded`);
- OpenAI's frequency and presence penalties become one more logits processor (:mod:`worker.penalties`);
- a batch whose jobs ask for ``logprobs`` keeps generate's raw logits, reduced to each token's entry before
  the pipeline's ``postprocess`` (:mod:`worker.logprobs`);
- items that must not share padding run in padding-free groups (:func:`worker.shapes.padding_free_groups`);
- a batch that raises a non-memory ``RuntimeError`` (tensors of different shapes) runs again item by item;
- a batch that runs out of memory is halved and each half runs again, down to one item, whose output is then
  an :class:`~producers.errors.OutOfMemory` error (the rest of the batch still succeeds).

:class:`BatchHooks` is what a batcher asks the worker around it (is more coming, which items were cancelled).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from producers.errors import OutOfMemory
from worker.batcher import PendingItem
from worker.logprobs import LOGPROBS_PARAM, OUTPUT_LOGITS, pop_logprobs, reduced_logits
from worker.metrics import DeploymentMetrics
from worker.penalties import penalty_processor, pop_penalties
from worker.shapes import batch_outputs, padding_free_groups, trim_padding
from worker.stages import is_stage_batch, run_stage
from worker.streaming import eos_token_ids, with_streamer
from worker.transformers_internals import run_one_item_lists_directly, step_params

logger = logging.getLogger(__name__)


def is_out_of_memory(error: BaseException) -> bool:
    """True for CUDA/CPU out-of-memory errors, whatever wraps them."""
    if isinstance(error, MemoryError):
        return True
    if type(error).__name__ == "OutOfMemoryError":
        return True
    message = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


def release_cached_memory() -> None:
    """Hand the CUDA caching allocator's free blocks back before a smaller batch tries again."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _no_queue(deployment: str) -> bool:
    return False


def _none_cancelled(items: list[PendingItem]) -> set[str]:
    return set()


@dataclass(frozen=True)
class BatchHooks:
    """The worker's answers to the two questions a batcher asks before each forward pass.

    ``queue_has_ready(deployment)`` is true while the deployment's broker queue holds a ready job (flush rule 2
    waits for it); ``find_cancelled(items)`` gives the job ids among ``items`` that were revoked or cancelled
    (their items are dropped). The defaults, no queue and nothing cancelled, suit a runtime without a broker.
    """

    queue_has_ready: Callable[[str], bool] = _no_queue
    find_cancelled: Callable[[list[PendingItem]], set[str]] = _none_cancelled


def as_one_input(pipe: Any, payload: Any) -> Any:
    """``payload`` as ``pipe(payload)`` hands it on: a chat (a list of messages) wrapped in ``Chat``."""
    from transformers.pipelines.image_text_to_text import ImageTextToTextPipeline
    from transformers.pipelines.text_generation import Chat, TextGenerationPipeline

    if isinstance(pipe, (TextGenerationPipeline, ImageTextToTextPipeline)) and isinstance(payload, list) \
            and payload and isinstance(payload[0], dict):
        return Chat(payload)
    return payload


def batch_call(pipe: Any) -> Callable[..., Any]:
    """What runs a list of payloads, each one input, as one batched call of ``pipe``.

    ``ImageTextToTextPipeline.__call__`` reads a list whose first item is a dict as one chat, so a batch of
    ``{"images", "text"}`` items (or of chats) would be misread; the base ``Pipeline.__call__`` runs each
    item as ``pipe(item)`` does once that dispatch has wrapped it (:func:`as_one_input`).
    """
    from transformers import Pipeline
    from transformers.pipelines.image_text_to_text import ImageTextToTextPipeline

    if isinstance(pipe, ImageTextToTextPipeline):
        return lambda payloads, **kwargs: Pipeline.__call__(pipe, [as_one_input(pipe, p) for p in payloads],
                                                            **kwargs)
    return pipe


def run_seeded(pipe: Any, payloads: list[Any], params: dict[str, Any], seed: int) -> list[Any]:
    """Run each payload as ``set_seed(seed); pipe(payload, **params)`` does in-process.

    Sampling consumes the global RNG, so a batched call cannot reproduce the
    unbatched one; seeded items run one at a time and their output does not
    depend on which other jobs shared the batch.
    """
    from transformers import set_seed
    from transformers.pipelines.base import ChunkPipeline

    outputs = []
    for payload in payloads:
        set_seed(seed)
        payload = as_one_input(pipe, payload)
        if isinstance(pipe, ChunkPipeline):
            outputs.extend(pipe([payload], batch_size=1, **params))
            continue
        # pipe(payload) minus the per-task reshaping of __call__, which worker.shapes redoes per job.
        outputs.append(pipe.run_single(payload, *step_params(pipe, params)))
    return outputs


class ForwardPass:
    """The batch call of one deployment: ``forward(items, params)`` gives one output per item, in order.

    ``streams`` (text-generation only) lets generated tokens stream to the jobs that asked for them;
    ``metrics`` counts out-of-memory halvings. See the module docstring for the steps.
    """

    def __init__(self, name: str, task: str, pipe: Any, *, streams: Any = None,
                 metrics: DeploymentMetrics | None = None) -> None:
        import torch

        self.name = name
        self.task = task
        self.pipe = pipe
        self.call = batch_call(pipe)
        run_one_item_lists_directly(pipe)
        self.streams = streams
        self.metrics = metrics or DeploymentMetrics(name)
        self.inference_mode = torch.inference_mode

    def __call__(self, items: list[PendingItem], params: dict[str, Any]) -> list[Any]:
        """Run ``items`` with the call ``params``; returns their outputs in order (an error for one that
        does not fit in memory even alone); raises when the batch failed otherwise."""
        return self._halving(items, params, first_size=len(items))

    def _halving(self, items: list[PendingItem], params: dict[str, Any], *, first_size: int) -> list[Any]:
        try:
            return self._run(items, [item.payload for item in items], params)
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            self.metrics.oom_splits += 1
            release_cached_memory()
            if len(items) == 1:
                return [OutOfMemory(f"out of memory on deployment {self.name} even at batch size 1 "
                                    f"(back-off started at batch size {first_size}): {error}")]
            half = len(items) // 2
            logger.warning("deployment %s: out of memory at batch size %d; retrying as %d + %d",
                           self.name, len(items), half, len(items) - half)
            return (self._halving(items[:half], params, first_size=first_size)
                    + self._halving(items[half:], params, first_size=first_size))

    def _run(self, items: list[PendingItem], payloads: list[Any], params: dict[str, Any]) -> list[Any]:
        pipe = self.pipe
        if LOGPROBS_PARAM in params:
            params = dict(params)
            top_logprobs = pop_logprobs(params)
            if top_logprobs is not None:  # the same call keeping generate's raw logits, reduced to the entries
                with reduced_logits(pipe, top_logprobs, frozenset(eos_token_ids(pipe))):
                    return self._run(items, payloads, {**params, **OUTPUT_LOGITS})
        if self.streams is not None and not is_stage_batch(params):
            params = with_streamer(self.streams, pipe, items, payloads, params)
        if is_stage_batch(params):
            with self.inference_mode():
                return run_stage(pipe, payloads, params)
        params = dict(params)
        seed = params.pop("seed", None)
        penalty = penalty_processor(pop_penalties(params))
        if penalty is not None:
            params["logits_processor"] = [penalty]
        if seed is not None:
            with self.inference_mode():
                return run_seeded(pipe, payloads, params, seed)
        groups = padding_free_groups(self.task, pipe, payloads)
        if len(groups) > 1:
            outputs: list[Any] = [None] * len(payloads)
            for group in groups:
                for index, output in zip(group, self._run([items[i] for i in group],
                                                          [payloads[i] for i in group], params)):
                    outputs[index] = output
            return outputs

        def fresh() -> list[Any]:
            # Some pipelines pop keys from dict inputs (ASR), and a failed batch runs again.
            return [dict(p) if isinstance(p, dict) else p for p in payloads]

        with self.inference_mode():
            try:
                raw = self.call(fresh(), batch_size=len(payloads), **params)
            except RuntimeError as error:
                if len(payloads) < 2 or is_out_of_memory(error):
                    raise
                # Items whose tensors differ in shape (images a processor does not resize to one size)
                # cannot share a forward pass; run them one by one, as in-process batch_size=1 does.
                logger.debug("deployment %s: batch of %d failed (%s); running items singly",
                             self.name, len(payloads), error)
                raw = self.call(fresh(), batch_size=1, **params)
        return trim_padding(self.task, pipe, payloads, batch_outputs(self.task, payloads, raw), params)
