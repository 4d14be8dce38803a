"""Per-request sampling inside transformers' continuous batching engine.

The engine has one sampling mode for all its requests (``do_sample`` of its
generation config) and per-request values only for temperature, top-k and
top-p, and only when the engine was created with them; it has no per-request
seed and no repetition penalty. The fleet keeps the engine greedy (argmax, no
processors of its own) and appends one :class:`FleetSampler` to the engine's
logits processors. Through the engine's own extension point
(``ContinuousBatchingLogitsProcessor``) it sees, every step, the requests that
get a new token and their rows of the logits:

- a request with no sampling spec (greedy with nothing to process) is left as
  it is: the engine's argmax picks its token, at no cost;
- a request with a :class:`SamplingSpec` runs ``generate``'s own processor
  list (``model._get_logits_processor`` on the request's generation config:
  repetition penalty, temperature, top-k, top-p, … in ``generate``'s order,
  with OpenAI's penalties where ``generate`` puts a caller's processors)
  over its full token history, then, when it samples, draws its token with
  ``torch.multinomial`` from its own ``torch.Generator`` and leaves only that
  token finite, so the engine's argmax takes it.

A request that asks for ``logprobs`` (:mod:`worker.logprobs`) gets a spec even
when it decodes greedily: each step records the log probabilities of its raw
row, before any processor, and the token it takes.

A request seeded with ``seed`` draws from a generator seeded with ``seed``,
which is what ``set_seed(seed); generate(...)`` draws from for one sequence:
the same probabilities give the same token, whichever requests share the step.

This is the one module that reaches into the engine's internals (the
processor list of a ``ContinuousBatchingManager``, ``RequestState``'s token
lists and ``logit_processor_kwargs``); ``tests/worker/test_cb_sampling.py``
pins them. The sampler keeps Python state per step, so the engine runs it with
CUDA graphs and async batching off (see :func:`engine_overrides`).
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass
from typing import Any

from worker.logprobs import Entry, step_entry
from worker.penalties import OutputTokenPenalty
from worker.transformers_internals import logits_processors

KWARG = "fleet_sampling"
"""The per-request engine kwarg (``add_request(**{KWARG: spec})``) that carries a :class:`SamplingSpec`."""


@dataclass(frozen=True)
class SamplingSpec:
    """How one engine request picks its tokens: ``generate``'s processors for its config, and its seed."""

    generation_config: Any
    """None: no processors (a greedy request that only asks for ``logprobs``)."""
    prompt_length: int
    do_sample: bool
    seed: int
    penalties: tuple[float, float] = (0.0, 0.0)
    """OpenAI's ``(frequency_penalty, presence_penalty)``, run where ``generate`` runs a custom processor."""
    logprobs: int | None = None
    """Alternatives to record per step with each token's log probability; None: record nothing."""


def engine_overrides() -> dict[str, Any]:
    """``ContinuousBatchingConfig`` fields the sampler needs: it runs Python on every step, before the argmax."""
    return {"use_cuda_graph": False, "use_async_batching": False}


def install(manager: Any, model: Any) -> "FleetSampler":
    """Append a :class:`FleetSampler` to ``manager``'s processors; call before ``manager.start()``."""
    from transformers.generation.logits_process import LogitsProcessorList

    sampler = _sampler_class()(model)
    processors = manager.logit_processor
    processors.logits_processor = LogitsProcessorList([*processors.logits_processor, sampler])
    processors.tensors_required += 1
    processors.supported_keys = {**processors.supported_keys, KWARG: SamplingSpec}
    processors.do_processing = True
    return sampler


_CLASS: Any = None


def _sampler_class() -> Any:
    """:class:`FleetSampler`'s base is transformers' class, imported only when a worker starts an engine."""
    global _CLASS
    if _CLASS is None:
        from transformers.generation.continuous_batching.cb_logits_processors import (
            ContinuousBatchingLogitsProcessor)

        _CLASS = type("FleetSampler", (_FleetSamplerBody, ContinuousBatchingLogitsProcessor), {})
    return _CLASS


class _Live:
    """A request's processors, random generator and recorded log probabilities, made on its first step."""

    __slots__ = ("processors", "generator", "logprobs")

    def __init__(self, processors: Any, generator: Any) -> None:
        self.processors = processors
        self.generator = generator
        self.logprobs: list[Entry] = []


class _FleetSamplerBody:
    """The per-request sampler (see the module docstring); ``FleetSampler`` adds transformers' base class."""

    supported_kwargs: dict[str, type] = {KWARG: SamplingSpec}
    ignored_kwargs: tuple[str, ...] = ()

    def __init__(self, model: Any) -> None:
        self.model = model
        self._step: list[tuple[int, Any, SamplingSpec]] = []
        self._live: dict[str, _Live] = {}
        self._lock = threading.Lock()
        self._no_args: Any = None

    def forget(self, request_id: str) -> None:
        """Drop a finished or cancelled request's generator and processors."""
        with self._lock:
            self._live.pop(request_id, None)

    def logprobs(self, request_id: str) -> list[Entry]:
        """The entries a request recorded so far, one per generated token (empty if it asked for none)."""
        with self._lock:
            live = self._live.get(request_id)
        return list(live.logprobs) if live is not None else []

    def live_count(self) -> int:
        """Requests whose sampling state is held."""
        return len(self._live)

    def fill_defaults(self, int32_tensor: Any) -> None:
        int32_tensor.fill_(0)

    def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> Any:
        import torch

        # Row i of this step's logits is requests_with_new_token[i]; runs on the engine thread before the forward.
        self._step = [(row, future.state, spec) for row, future in enumerate(requests_with_new_token)
                      if (spec := future.state.logit_processor_kwargs.get(KWARG)) is not None]
        if self._no_args is None:  # the engine stores it as this processor's args; the sampler reads self._step
            self._no_args = torch.zeros(0, dtype=torch.int32)
        return self._no_args

    def __call__(self, scores: Any, tensor_arg: Any) -> Any:
        if not self._step:
            return scores
        import torch

        for row, state, spec in self._step:
            live = self._live_state(state.request_id, spec, scores.device)
            raw = scores[row].clone() if spec.logprobs is not None else None  # processors may write in place
            processed = scores[row:row + 1]
            if live.processors:
                history = torch.tensor([state.initial_tokens + state.generated_tokens], dtype=torch.long,
                                       device=scores.device)
                processed = live.processors(history, processed)
            if spec.do_sample:
                probs = torch.nn.functional.softmax(processed, dim=-1)
                token = torch.multinomial(probs, num_samples=1, generator=live.generator)[0, 0]
                processed = torch.full_like(processed, float("-inf"))
                processed[0, token] = 0.0
            if raw is not None:  # the engine's argmax takes the first best token of the row, as this does
                live.logprobs.append(step_entry(raw, processed[0].argmax(), spec.logprobs))
            scores[row] = processed[0]
        return scores

    def _live_state(self, request_id: str, spec: SamplingSpec, device: Any) -> _Live:
        live = self._live.get(request_id)
        if live is None:
            import torch

            penalty = [OutputTokenPenalty(*spec.penalties, prompt_length=spec.prompt_length)] \
                if any(spec.penalties) else None
            processors = [] if spec.generation_config is None else logits_processors(
                self.model, spec.generation_config, input_ids_seq_length=spec.prompt_length, device=device,
                logits_processor=penalty)
            generator = torch.Generator(device=device)
            generator.manual_seed(spec.seed)
            live = _Live(processors, generator)
            with self._lock:
                self._live[request_id] = live
        return live


def random_seed() -> int:
    """A seed for a request that did not ask for one."""
    return secrets.randbits(63)
