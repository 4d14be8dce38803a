"""Continuous batching of a text-generation deployment through transformers' own engine.

``model.init_continuous_batching(...)`` returns a ``ContinuousBatchingManager``
whose background thread runs one forward step at a time over every request in
flight; a request added now joins at the next step, whatever the others'
``max_new_tokens``. :class:`ContinuousBatcher` has the same ``submit`` as the
static :class:`~worker.batcher.Batcher`, so the ``infer`` task is unchanged:

- each prompt goes through the pipeline's own ``preprocess`` (chat template
  included) and its output through the pipeline's own ``postprocess``, so the
  result has the shape and text of ``pipe(prompt, **params)``;
- ``num_return_sequences = n`` adds ``n`` requests per prompt;
- one collector thread reads the engine's per-step outputs, hands their token
  ids to :class:`~worker.streaming.TextStreams`, resolves futures when
  requests finish, and every ``SWEEP_INTERVAL_S`` cancels requests whose job
  was cancelled or passed its deadline (``cancel_request`` removes them from
  the running batch).

Params the engine cannot honour per request raise
:class:`~producers.errors.InvalidParams` naming the param; see :func:`plan_request`.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from config.models import Deployment, Limits
from producers.errors import InvalidParams, JobCancelled, JobError, JobTimeout, OutOfMemory
from worker.batcher import PendingItem
from worker.metrics import DeploymentMetrics
from worker.transformers_internals import (generation_defaults, postprocess_defaults, preprocess_defaults,
                                          sanitize_call_params)

logger = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 0.2
"""How often the collector checks cancel flags and deadlines of the requests in flight."""

CPU_DEFAULT_NUM_BLOCKS = 64
"""KV-cache pages on the CPU when the config names none (the engine would size it from all free RAM)."""

MAX_OUTPUTS_PER_PASS = 4096
"""Engine outputs the collector takes in one pass at most."""

SAMPLING_PARAMS = ("temperature", "top_k", "top_p")
"""Sampling params the engine takes per request (``per_request_processors``) when it samples."""

HANDLED_GENERATE_PARAMS = frozenset({"max_new_tokens", "do_sample", "num_return_sequences", *SAMPLING_PARAMS,
                                     "pad_token_id"})
"""Generate params continuous batching honours; any other one is refused by name."""


@dataclass
class RequestPlan:
    """How one job's params become engine requests."""

    preprocess: dict[str, Any]
    postprocess: dict[str, Any]
    max_new_tokens: int
    num_return_sequences: int
    sampling: dict[str, Any]


@dataclass(eq=False)
class _Prompt:
    item: PendingItem
    plan: RequestPlan
    model_inputs: dict[str, Any]
    request_ids: list[str]
    outputs: dict[int, list[int]] = field(default_factory=dict)
    seen_tokens: dict[int, int] = field(default_factory=dict)


def plan_request(pipe: Any, params: dict[str, Any], options: Any, default_max_new_tokens: int,
                 supported_sampling: set[str]) -> RequestPlan:
    """Validate a job's params for the engine; raises InvalidParams naming the first one it cannot honour."""
    params = dict(params)
    if "seed" in params:
        raise InvalidParams("param 'seed' is not supported with continuous batching: every request of the engine "
                            "samples from one random stream, so a per-request seed cannot be honoured")
    preprocess, forward, postprocess = sanitize_call_params(pipe, params)
    generate = {**forward.pop("generate_kwargs", {}), **forward}
    unknown = sorted(set(generate) - HANDLED_GENERATE_PARAMS)
    if unknown:
        raise InvalidParams(f"param {unknown[0]!r} is not supported with continuous batching (transformers' engine "
                            f"takes only {', '.join(sorted(HANDLED_GENERATE_PARAMS - {'pad_token_id'}))})")
    do_sample = generate.get("do_sample")
    if do_sample is not None and bool(do_sample) != options.do_sample:
        mode = "samples" if options.do_sample else "decodes greedily"
        raise InvalidParams(f"param 'do_sample'={do_sample!r}: this deployment's continuous batching engine {mode} "
                            "for every request (continuous_batching_options.do_sample)")
    sampling = {}
    for name in SAMPLING_PARAMS:
        if name not in generate:
            continue
        if not options.do_sample:
            if do_sample is None:
                raise InvalidParams(f"param {name!r} asks for sampling, but this deployment's continuous batching "
                                    "engine decodes greedily; pass do_sample=False to accept greedy output")
            continue  # greedy, as in-process with do_sample=False
        if name not in supported_sampling:
            raise InvalidParams(f"param {name!r} cannot be set per request on this engine; set it in "
                                f"continuous_batching_options.{name}")
        sampling[name] = int(generate[name]) if name == "top_k" else float(generate[name])
    n = generate.get("num_return_sequences") or 1
    if n > 1 and not options.do_sample:
        raise InvalidParams("param 'num_return_sequences' > 1 needs sampling; this deployment's continuous "
                            "batching engine decodes greedily (greedy search returns one sequence per prompt)")
    max_new_tokens = generate.get("max_new_tokens") or default_max_new_tokens
    for name in list(preprocess):
        if name in HANDLED_GENERATE_PARAMS:
            preprocess.pop(name)
    return RequestPlan(preprocess, postprocess, int(max_new_tokens), int(n), sampling)


def _engine_error(message: str) -> Exception:
    if "memory" in message.lower():
        return OutOfMemory(f"the continuous batching engine could not fit the request: {message}")
    return JobError(f"generation failed in the continuous batching engine: {message}")


class ContinuousBatcher:
    """Jobs of one text-generation deployment as requests of one continuous batching engine."""

    def __init__(self, deployment: Deployment, pipe: Any, streams: Any, *, metrics: DeploymentMetrics,
                 limits: Limits, find_cancelled: Callable[[list[PendingItem]], set[str]]) -> None:
        self.name = deployment.name
        self.deployment = deployment
        self.options = deployment.continuous_batching_options
        self.pipe = pipe
        self.streams = streams
        self.metrics = metrics
        self.limits = limits
        self.find_cancelled = find_cancelled
        self.manager: Any = None
        self.supported_sampling: set[str] = set()
        self._requests: dict[str, tuple[_Prompt, int]] = {}
        self._lock = threading.Lock()
        # Job threads tokenize their prompts; the Rust tokenizer takes one caller at a time.
        self._tokenizer_lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._collect, name=f"pipefleet-cb-{self.name}", daemon=True)
        defaults = generation_defaults(pipe)
        configured = getattr(pipe.model.generation_config, "max_new_tokens", None)
        self.default_max_new_tokens = int(configured or defaults.get("max_new_tokens") or 256)

    def start(self) -> None:
        """Create the engine on the pipeline's model and start it and the collector thread."""
        import copy

        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        model = self.pipe.model
        options = self.options
        generation_config = copy.deepcopy(model.generation_config)
        generation_config.do_sample = options.do_sample
        generation_config.num_return_sequences = 1
        generation_config.max_new_tokens = self.default_max_new_tokens
        if options.do_sample:
            # The pipeline's own sampling defaults, unless the deployment sets the engine's.
            defaults = generation_defaults(self.pipe)
            generation_config.temperature = options.temperature or defaults.get("temperature", 1.0)
            generation_config.top_k = options.top_k if options.top_k is not None else generation_config.top_k
            generation_config.top_p = options.top_p if options.top_p is not None else generation_config.top_p
        if generation_config.pad_token_id is None:
            generation_config.pad_token_id = self.pipe.tokenizer.pad_token_id
        engine: dict[str, Any] = {
            "max_batch_tokens": options.max_batch_tokens, "num_blocks": options.num_blocks,
            "page_size": options.page_size, "max_memory_percent": options.max_memory_percent,
            "max_requests_per_batch": options.max_requests_per_batch, "scheduler_type": options.scheduler,
            "allow_block_sharing": options.allow_block_sharing, "seed": options.seed,
        }
        engine = {key: value for key, value in engine.items() if value is not None}
        if model.device.type == "cpu" and options.num_blocks is None and options.max_memory_percent is None:
            engine["num_blocks"] = CPU_DEFAULT_NUM_BLOCKS
        config = ContinuousBatchingConfig(per_request_processors=options.do_sample, **engine)
        self.manager = model.init_continuous_batching(generation_config=generation_config,
                                                      continuous_batching_config=config)
        self.manager.start()
        self.supported_sampling = set(getattr(self.manager.logit_processor, "supported_keys", {}) or {})
        self._thread.start()
        logger.info("deployment %s: continuous batching engine started (%s)", self.name, engine)

    def stop(self) -> None:
        """Stop the engine; requests still in flight fail as cancelled (their jobs are redelivered)."""
        self._stopping.set()
        if self.manager is not None:
            try:
                self.manager.stop(block=True, timeout=5.0)
            except Exception:  # shutting down anyway
                logger.warning("deployment %s: the engine did not stop cleanly", self.name, exc_info=True)
        self._fail_all(JobCancelled("the worker is shutting down"))

    def warm_up(self) -> None:
        """One short request through the engine (a static forward pass would not touch the paged cache)."""
        try:
            [future] = self.submit("warm-up", ["hello"], {"max_new_tokens": 2})
            future.result(timeout=120)
        except Exception as error:  # a model that loads but cannot take the sample still serves jobs
            logger.warning("deployment %s: warm-up failed (%s: %s); serving anyway", self.name,
                           type(error).__name__, error)

    def withdraw(self, job_ids: set[str]) -> set[str]:
        """Nothing to hand back: a job's prompts join the engine as soon as they are submitted."""
        return set()

    def pending_count(self) -> int:
        """Prompts waiting or generating in the engine."""
        with self._lock:
            return len({id(prompt) for prompt, _ in self._requests.values()})

    def submit(self, job_id: str, payloads: list[Any], params: dict[str, Any], *, deadline: float | None = None,
               partial: bool = False, cancel_id: str | None = None) -> list[Future]:
        """Add a job's prompts to the running batch; returns one future per prompt (its pipeline output)."""
        from transformers.pipelines.text_generation import Chat

        if self.manager is None:
            raise RuntimeError(f"deployment {self.name}: the continuous batching engine is not started")
        plan = plan_request(self.pipe, params, self.options, self.default_max_new_tokens, self.supported_sampling)
        prompts = []
        for index, payload in enumerate(payloads):
            is_chat = isinstance(payload, list) and payload and isinstance(payload[0], dict)
            with self._tokenizer_lock:
                model_inputs = self.pipe.preprocess(Chat(payload) if is_chat else payload,
                                                    **{**preprocess_defaults(self.pipe), **plan.preprocess})
            item = PendingItem(job_id, index, payload, deadline=deadline, partial=partial, cancel_id=cancel_id)
            ids = [f"{job_id}/{index}/{j}" for j in range(plan.num_return_sequences)]
            prompts.append(_Prompt(item, plan, model_inputs, ids))
        streaming = self.streams is not None and self.streams.streaming(job_id)
        with self._lock:
            for prompt in prompts:
                for j, request_id in enumerate(prompt.request_ids):
                    self._requests[request_id] = (prompt, j)
        for prompt in prompts:
            input_ids = prompt.model_inputs["input_ids"][0].tolist()
            if streaming:
                n = plan.num_return_sequences
                self.streams.reset([(job_id, prompt.item.index * n + j) for j in range(n)], [len(input_ids)] * n)
            for request_id in prompt.request_ids:
                added = self.manager.add_request(input_ids, request_id=request_id, max_new_tokens=plan.max_new_tokens,
                                                 streaming=True, **plan.sampling)
                if added is None:
                    self._finish(prompt, error=JobError("the continuous batching engine refused the request "
                                                        "(it is stopping)"))
                    break
        return [prompt.item.future for prompt in prompts]

    def _collect(self) -> None:
        last_sweep = time.monotonic()
        while not self._stopping.is_set():
            try:
                output = self.manager.get_result(timeout=SWEEP_INTERVAL_S)
                outputs = [output] if output is not None else []
                # Drain what else is ready: a lagging collector then does one pass per request, not per token.
                while output is not None and len(outputs) < MAX_OUTPUTS_PER_PASS:
                    output = self.manager.get_result(timeout=0)
                    if output is not None:
                        outputs.append(output)
                if outputs:
                    self._deliver(outputs)
                if time.monotonic() - last_sweep >= SWEEP_INTERVAL_S:
                    last_sweep = time.monotonic()
                    self._sweep()
                    if not self.manager.is_running() and not self._stopping.is_set():
                        self._fail_all(JobError(f"deployment {self.name}: the continuous batching engine stopped: "
                                                f"{self.manager.background_thread_status.fatal_error}"))
            except Exception:  # the collector must outlive any one bad output
                logger.exception("deployment %s: continuous batching collector error", self.name)

    def _deliver(self, outputs: list[Any]) -> None:
        latest: dict[str, Any] = {}
        for output in outputs:  # each output holds all tokens so far: the last one per request says it all
            if output.request_id not in latest or output.is_finished():
                latest[output.request_id] = output
            elif not latest[output.request_id].is_finished():
                latest[output.request_id] = output
        with self._lock:
            entries = {rid: self._requests.get(rid) for rid in latest}
        updates, finished, new_tokens = [], [], 0
        for request_id, output in latest.items():
            entry = entries[request_id]
            if entry is None:
                continue  # a cancelled request's last outputs
            prompt, j = entry
            tokens = list(output.generated_tokens)
            new_tokens += max(0, len(tokens) - prompt.seen_tokens.get(j, 0))
            prompt.seen_tokens[j] = len(tokens)
            if self.streams is not None and self.streams.streaming(prompt.item.job_id):
                updates.append(((prompt.item.job_id, prompt.item.index * prompt.plan.num_return_sequences + j),
                                tokens))
            if output.is_finished():
                finished.append((request_id, output, prompt, j, tokens))
        if new_tokens:
            self.metrics.observe_tokens(new_tokens)
        if updates:
            self.streams.replace(updates)
        for request_id, output, prompt, j, tokens in finished:
            with self._lock:
                self._requests.pop(request_id, None)
            if output.error is not None:
                self._finish(prompt, error=_engine_error(str(output.error)))
                continue
            prompt.outputs[j] = tokens
            if len(prompt.outputs) == prompt.plan.num_return_sequences:
                try:
                    self._finish(prompt, result=self._postprocess(prompt))
                except Exception as error:
                    self._finish(prompt, error=error)

    def _postprocess(self, prompt: _Prompt) -> Any:
        import torch

        input_ids = prompt.model_inputs["input_ids"]
        prompt_ids = input_ids[0].tolist()
        sequences = [prompt_ids + prompt.outputs[j] for j in range(prompt.plan.num_return_sequences)]
        pad = self.pipe.tokenizer.pad_token_id
        pad = pad if pad is not None else self.pipe.model.generation_config.eos_token_id
        width = max(len(sequence) for sequence in sequences)
        padded = [sequence + [pad] * (width - len(sequence)) for sequence in sequences]
        model_outputs = {"generated_sequence": torch.tensor([padded]), "input_ids": input_ids,
                         "prompt_text": prompt.model_inputs["prompt_text"]}
        with self._tokenizer_lock:
            return self.pipe.postprocess(model_outputs,
                                         **{**postprocess_defaults(self.pipe), **prompt.plan.postprocess})

    def _finish(self, prompt: _Prompt, *, result: Any = None, error: BaseException | None = None) -> None:
        with self._lock:
            leftover = [rid for rid in prompt.request_ids if rid in self._requests]
            for request_id in leftover:
                del self._requests[request_id]
        for request_id in leftover:
            self.manager.cancel_request(request_id)
        future = prompt.item.future
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def _sweep(self) -> None:
        with self._lock:
            prompts = list({id(p): p for p, _ in self._requests.values()}.values())
        self.metrics.set_generation_state(running_requests=len(prompts), kv_cache_usage=self._kv_cache_usage())
        if not prompts:
            return
        now = time.monotonic()
        cancelled = self.find_cancelled([prompt.item for prompt in prompts])
        for prompt in prompts:
            item = prompt.item
            if item.future.done():  # its job stopped waiting (deadline in the job thread)
                self._finish(prompt)
            elif item.job_id in cancelled:
                self._finish(prompt, error=JobCancelled(f"job {item.cancel_id or item.job_id} was cancelled"))
            elif item.deadline is not None and now > item.deadline:
                self._finish(prompt, error=JobTimeout(f"job {item.job_id} passed its deadline while generating"))

    def _kv_cache_usage(self) -> float:
        processor = getattr(self.manager, "batch_processor", None)
        cache = getattr(processor, "cache", None)
        if cache is None:
            return 0.0
        try:
            return max(0.0, min(1.0, 1.0 - float(cache.compute_free_capacity(relative=True))))
        except Exception:  # the engine's internals moved: report nothing rather than fail
            return 0.0

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            prompts = list({id(p): p for p, _ in self._requests.values()}.values())
        for prompt in prompts:
            self._finish(prompt, error=error)
