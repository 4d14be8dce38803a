"""How one text-generation job's params become requests of the continuous batching engine.

:func:`plan_request` builds the job's generation config as the pipeline and
``generate`` build it in-process (the call's params over the pipeline's
defaults over the model's generation config), so a param the job leaves out
takes the same default on the static and the continuous path, and refuses by
name what the engine cannot honour per request.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, replace
from typing import Any

from producers.errors import InvalidParams
from worker.cb_sampling import SamplingSpec
from worker.logprobs import pop_logprobs
from worker.penalties import penalties_of, pop_penalties
from worker.transformers_internals import (logits_processors, resolved_generation_config, sanitize_call_params,
                                           with_token_tensors)

SAMPLING_PARAMS = ("do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff",
                   "eta_cutoff", "repetition_penalty", "no_repeat_ngram_size", "sequence_bias", "bad_words_ids",
                   "suppress_tokens", "begin_suppress_tokens", "min_new_tokens")
"""Generate params each request takes for itself (through :mod:`worker.cb_sampling`): each one becomes a logits
processor of ``generate``'s own list, run over the request's prompt and generated tokens."""

HANDLED_GENERATE_PARAMS = frozenset({"max_new_tokens", "num_return_sequences", "stop_strings", "pad_token_id",
                                     *SAMPLING_PARAMS})
"""Generate params continuous batching honours; any other one is refused by name."""


@dataclass(frozen=True)
class RequestPlan:
    """How one job's params become engine requests (shared by every job with the same params: read only)."""

    preprocess: dict[str, Any]
    postprocess: dict[str, Any]
    max_new_tokens: int
    num_return_sequences: int
    generation_config: Any = None
    """The job's generation config as ``generate`` would build it; None when it decodes greedily, unprocessed."""
    processor_config: Any = None
    """``generation_config`` with the token tensors ``generate`` sets before building its processors."""
    do_sample: bool = False
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()
    eos_token_id: Any = None
    penalties: tuple[float, float] = (0.0, 0.0)
    """OpenAI's ``(frequency_penalty, presence_penalty)`` (:mod:`worker.penalties`)."""
    logprobs: int | None = None
    """Alternatives to list per generated token (:mod:`worker.logprobs`); None: no log probabilities."""

    def spec(self, prompt_length: int, j: int, seed: int) -> SamplingSpec | None:
        """Sequence ``j``'s sampling spec, or None for plain greedy decoding (the engine's argmax) with no logprobs."""
        if self.generation_config is None and self.logprobs is None:
            return None
        # Sequence 0 draws what ``set_seed(seed); generate(...)`` draws; the others get seeds of their own.
        seed = seed if j == 0 else (seed * 1_000_003 + j) % 2**63
        return SamplingSpec(self.processor_config, prompt_length, self.do_sample, seed, penalties=self.penalties,
                            logprobs=self.logprobs)



def plan_request(pipe: Any, params: dict[str, Any], default_max_new_tokens: int) -> RequestPlan:
    """Validate a job's params for the engine; raises InvalidParams naming the first one it cannot honour.

    The job's generation config is built as the pipeline and ``generate`` build it in-process (the call's
    params over the pipeline's defaults over the model's generation config), so a param the job leaves out
    takes the same default on both paths.
    """
    params = dict(params)
    seed = params.pop("seed", None)
    penalties = penalties_of(pop_penalties(params))
    logprobs = pop_logprobs(params)
    preprocess, forward, postprocess = sanitize_call_params(pipe, params)
    generate = {**forward.pop("generate_kwargs", {}), **forward}
    generate.pop("tokenizer", None)  # the pipeline adds it for stop strings
    unknown = sorted(set(generate) - HANDLED_GENERATE_PARAMS)
    if unknown:
        raise InvalidParams(f"param {unknown[0]!r} is not supported with continuous batching (it takes "
                            f"{', '.join(sorted(HANDLED_GENERATE_PARAMS - {'pad_token_id', 'stop_strings'}))}, "
                            "stop_sequence and seed)")
    stops = generate.pop("stop_strings", None) or []
    stops = tuple(stop for stop in ([stops] if isinstance(stops, str) else stops) if stop)
    try:
        config = resolved_generation_config(pipe, generate)
    except (TypeError, ValueError) as error:
        raise InvalidParams(f"invalid generation params: {error}") from error
    n = int(config.num_return_sequences or 1)
    if n > 1 and not config.do_sample:
        raise InvalidParams("param 'num_return_sequences' > 1 needs sampling (do_sample=True): greedy search "
                            "returns one sequence per prompt")
    max_new_tokens = int(generate.get("max_new_tokens") or config.max_new_tokens or default_max_new_tokens)
    for name in list(preprocess):
        if name in HANDLED_GENERATE_PARAMS:
            preprocess.pop(name)
    processor_config = with_token_tensors(pipe.model, config)
    # On the model's device, as the engine's step runs them (the token tensors are there too).
    processors = logits_processors(pipe.model, processor_config, input_ids_seq_length=1, device=pipe.model.device)
    if processors:
        _try_processors(pipe.model, processors)
    processed = config.do_sample or len(processors) > 0 or any(penalties)
    return RequestPlan(preprocess, postprocess, max_new_tokens, n, generation_config=config if processed else None,
                       processor_config=processor_config if processed else None, do_sample=bool(config.do_sample),
                       seed=seed, stop_strings=stops, eos_token_id=config.eos_token_id, penalties=penalties,
                       logprobs=logprobs)


def _try_processors(model: Any, processors: Any) -> None:
    """Run ``processors`` once on a one-token history; raises InvalidParams with what they refuse.

    On the engine thread a processor that raises would fail every request of the running batch, so what a
    processor checks on its first call (a biased or banned token outside the vocabulary, say) is checked here,
    on the job's own time.
    """
    import torch

    width = getattr(model.get_output_embeddings(), "out_features", None)
    if width is None:
        return
    try:
        processors(torch.zeros((1, 1), dtype=torch.long, device=model.device),
                   torch.zeros((1, width), device=model.device))
    except (TypeError, ValueError, IndexError, RuntimeError) as error:
        raise InvalidParams(f"invalid generation params: {error}") from error


PLAN_CACHE_SIZE = 256
"""Distinct params sets whose plans a deployment keeps (most recently used first)."""


class RequestPlans:
    """:func:`plan_request` for one pipeline, remembered per params set (``functools.lru_cache``).

    Building a plan resolves the job's generation config the way ``generate`` does, which deep-copies the
    model's config several times: about 0.7 ms of Python per job on the claim thread, while the engine steps
    beside it (``python -m benchmarks.cb_plan_cost``). Jobs of one deployment mostly repeat a few params sets,
    and a plan depends only on the params and the pipeline, so each set is planned once. The seed is not part
    of the set (clients often send a new one per request): it is set on the remembered plan's copy. Params
    that are not JSON are planned every time; refusals are not remembered.
    """

    def __init__(self, pipe: Any, default_max_new_tokens: int, *, size: int = PLAN_CACHE_SIZE) -> None:
        self.pipe = pipe
        self.default_max_new_tokens = default_max_new_tokens
        self._planned = functools.lru_cache(maxsize=size)(self._plan_of_key)

    def __len__(self) -> int:
        """Params sets remembered."""
        return self._planned.cache_info().currsize

    def plan(self, params: dict[str, Any]) -> RequestPlan:
        """The plan of ``params``; raises InvalidParams as :func:`plan_request` does."""
        unseeded = {name: value for name, value in params.items() if name != "seed"}
        try:
            key = json.dumps(unseeded, sort_keys=True, separators=(",", ":"))
        except (TypeError, ValueError):
            return plan_request(self.pipe, params, self.default_max_new_tokens)
        plan = self._planned(key)
        seed = params.get("seed")
        return plan if seed is None else replace(plan, seed=seed)

    def _plan_of_key(self, key: str) -> RequestPlan:
        return plan_request(self.pipe, json.loads(key), self.default_max_new_tokens)
