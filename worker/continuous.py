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
- every request samples on its own (``do_sample``, ``temperature``, ``top_k``,
  ``top_p``, ``min_p``, ``typical_p``, ``repetition_penalty``, ``seed``) in one
  running batch, through :mod:`worker.cb_sampling`; ``stop_sequence`` ends a
  request at the token that completes a stop string, as ``generate`` does;
- a job with the fleet param ``logprobs`` gets each token's log probability
  in its records (:mod:`worker.logprobs`);
- the engine reports every step only of the requests whose caller streams
  (the job's ``stream`` flag) or that have stop strings; the others report once,
  when they end, which keeps the engine at its ``streaming=False`` speed;
- one collector thread reads the engine's outputs, hands token ids to
  :class:`~worker.streaming.TextStreams`, resolves futures when requests
  finish, and every ``SWEEP_INTERVAL_S`` cancels requests whose job was
  cancelled or passed its deadline (``cancel_request`` removes them from the
  running batch).

Params the engine cannot honour per request raise
:class:`~producers.errors.InvalidParams` naming the param; see :func:`worker.cb_plan.plan_request`
(each params set is planned once per deployment: :class:`worker.cb_plan.RequestPlans`).
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from config.models import Deployment, Limits
from producers.errors import JobCancelled, JobError, JobTimeout, OutOfMemory
from worker import cb_sampling
from worker.batcher import PendingItem
from worker.cb_plan import RequestPlan, RequestPlans
from worker.logprobs import Entry, render
from worker.metrics import DeploymentMetrics
from worker.outcome import cancel_error
from worker.transformers_internals import generation_defaults, postprocess_defaults, preprocess_defaults

logger = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 0.2
"""How often the collector checks cancel flags and deadlines of the requests in flight."""

CPU_DEFAULT_NUM_BLOCKS = 64
"""KV-cache pages on the CPU when the config names none (the engine would size it from all free RAM)."""

MAX_OUTPUTS_PER_PASS = 4096
"""Engine outputs the collector takes in one pass at most."""

STOP_WINDOW_TOKENS_PER_CHAR = 4
"""Tokens of a sequence's tail decoded per character of its longest stop string (a byte token holds 1/4 of one)."""


@dataclass(eq=False)
class _Prompt:
    item: PendingItem
    plan: RequestPlan
    model_inputs: dict[str, Any]
    request_ids: list[str]
    active: bool = False
    """The job's text stream is open (every job but a chunk of a list): its sequences' tokens go to it."""
    streamed: bool = False
    """Its caller reads the text as it comes: the engine reports every step, not just the last."""
    outputs: dict[int, list[int]] = field(default_factory=dict)
    logprobs: dict[int, list[Entry]] = field(default_factory=dict)
    seen_tokens: dict[int, int] = field(default_factory=dict)
    stop_checked: dict[int, int] = field(default_factory=dict)


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
        self.sampler: Any = None
        # Seeds of the requests that send none; reproducible from the deployment's seed when it sets one.
        self._seeds = random.Random(self.options.seed) if self.options.seed is not None else None
        # Engine request ids must be unique while they run: a job id can be in hand twice at once (a client that
        # submits one job id twice), and the engine mixes up two requests of one id.
        self._submissions = itertools.count()
        self._defaults = {name: getattr(self.options, name) for name in ("do_sample", "temperature", "top_k", "top_p")
                          if getattr(self.options, name) is not None}
        self._requests: dict[str, tuple[_Prompt, int]] = {}
        self._lock = threading.Lock()
        # Job threads tokenize their prompts; the Rust tokenizer takes one caller at a time.
        self._tokenizer_lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._collect, name=f"pipefleet-cb-{self.name}", daemon=True)
        defaults = generation_defaults(pipe)
        configured = getattr(pipe.model.generation_config, "max_new_tokens", None)
        self.default_max_new_tokens = int(configured or defaults.get("max_new_tokens") or 256)
        self.plans = RequestPlans(pipe, self.default_max_new_tokens)

    def start(self) -> None:
        """Create the engine on the pipeline's model, add the fleet's sampler, start it and the collector thread."""
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        model = self.pipe.model
        options = self.options
        # The engine decodes greedily with no processors of its own; every request's sampling runs in the sampler.
        model_config = model.generation_config
        pad = model_config.pad_token_id if model_config.pad_token_id is not None else self.pipe.tokenizer.pad_token_id
        generation_config = GenerationConfig(do_sample=False, num_return_sequences=1,
                                             max_new_tokens=self.default_max_new_tokens,
                                             eos_token_id=model_config.eos_token_id,
                                             bos_token_id=model_config.bos_token_id, pad_token_id=pad)
        engine: dict[str, Any] = {
            "max_batch_tokens": options.max_batch_tokens, "num_blocks": options.num_blocks,
            "page_size": options.page_size, "max_memory_percent": options.max_memory_percent,
            "max_requests_per_batch": options.max_requests_per_batch, "scheduler_type": options.scheduler,
            "allow_block_sharing": options.allow_block_sharing,
        }
        engine = {key: value for key, value in engine.items() if value is not None}
        if model.device.type == "cpu" and options.num_blocks is None and options.max_memory_percent is None:
            engine["num_blocks"] = CPU_DEFAULT_NUM_BLOCKS
        config = ContinuousBatchingConfig(**engine, **cb_sampling.engine_overrides())
        self.manager = model.init_continuous_batching(generation_config=generation_config,
                                                      continuous_batching_config=config)
        self.sampler = cb_sampling.install(self.manager, model)
        self.manager.start()
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
        plan = self.plans.plan({**self._defaults, **params})
        active = self.streams is not None and self.streams.streaming(job_id)
        streamed = active and self.streams.pieces(job_id)
        prompts = []
        submission = next(self._submissions)
        for index, payload in enumerate(payloads):
            is_chat = isinstance(payload, list) and payload and isinstance(payload[0], dict)
            with self._tokenizer_lock:
                model_inputs = self.pipe.preprocess(Chat(payload) if is_chat else payload,
                                                    **{**preprocess_defaults(self.pipe), **plan.preprocess})
            item = PendingItem(job_id, index, payload, deadline=deadline, partial=partial, cancel_id=cancel_id)
            ids = [f"{job_id}/{index}/{j}/{submission}" for j in range(plan.num_return_sequences)]
            prompts.append(_Prompt(item, plan, model_inputs, ids, active=active, streamed=streamed))
        with self._lock:
            for prompt in prompts:
                for j, request_id in enumerate(prompt.request_ids):
                    self._requests[request_id] = (prompt, j)
        # The engine reports every step of a request only when someone reads them: a stream, or a stop string.
        per_step = streamed or bool(plan.stop_strings)
        for prompt in prompts:
            input_ids = prompt.model_inputs["input_ids"][0].tolist()
            if active:
                n = plan.num_return_sequences
                self.streams.reset([(job_id, prompt.item.index * n + j) for j in range(n)], [len(input_ids)] * n)
            seed = plan.seed if plan.seed is not None else self._new_seed()
            for j, request_id in enumerate(prompt.request_ids):
                spec = plan.spec(len(input_ids), j, seed)
                sampling = {} if spec is None else {cb_sampling.KWARG: spec}
                added = self.manager.add_request(input_ids, request_id=request_id, max_new_tokens=plan.max_new_tokens,
                                                 streaming=per_step, eos_token_id=plan.eos_token_id, **sampling)
                if added is None:
                    self._finish(prompt, error=JobError("the continuous batching engine refused the request "
                                                        "(it is stopping)"))
                    break
        return [prompt.item.future for prompt in prompts]

    def _new_seed(self) -> int:
        return self._seeds.getrandbits(63) if self._seeds is not None else cb_sampling.random_seed()

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
                continue  # a cancelled or stopped request's last outputs
            prompt, j = entry
            tokens = output.generated_tokens  # the engine's own copy for this output
            done = output.is_finished()
            if prompt.plan.stop_strings and output.error is None:
                stop_at = self._stop_position(prompt, j, tokens)
                if stop_at is not None:
                    tokens, done = tokens[:stop_at], True
                    self.manager.cancel_request(request_id)
            new_tokens += max(0, len(tokens) - prompt.seen_tokens.get(j, 0))
            prompt.seen_tokens[j] = len(tokens)
            if prompt.streamed or (done and prompt.active):  # the usage and finish reason need the last tokens
                updates.append(((prompt.item.job_id, prompt.item.index * prompt.plan.num_return_sequences + j),
                                tokens))
            if done:
                finished.append((request_id, output, prompt, j, tokens))
        if new_tokens:
            self.metrics.observe_tokens(new_tokens)
        if updates:
            self.streams.replace(updates)
        for request_id, output, prompt, j, tokens in finished:
            with self._lock:
                self._requests.pop(request_id, None)
            if prompt.plan.logprobs is not None:  # one entry per token the sampler saw; a stop string cuts both
                prompt.logprobs[j] = self.sampler.logprobs(request_id)[:len(tokens)]
            self.sampler.forget(request_id)
            if output.error is not None:
                self._finish(prompt, error=_engine_error(str(output.error)))
                continue
            prompt.outputs[j] = tokens
            if len(prompt.outputs) == prompt.plan.num_return_sequences:
                try:
                    self._finish(prompt, result=self._postprocess(prompt))
                except Exception as error:
                    self._finish(prompt, error=error)

    def _stop_position(self, prompt: _Prompt, j: int, tokens: list[int]) -> int | None:
        """How many of ``tokens`` to keep when a stop string appeared in them (generation ends there), else None.

        Only the tail past what the last check covered is decoded: ``generate``'s ``StopStringCriteria`` ends a
        sequence at the token that completes a stop string, and so does this, at the same token.
        """
        stops = prompt.plan.stop_strings
        window = STOP_WINDOW_TOKENS_PER_CHAR * max(len(stop) for stop in stops) + 1
        checked = prompt.stop_checked.get(j, 0)
        prompt.stop_checked[j] = len(tokens)
        decode = self.pipe.tokenizer.decode
        with self._tokenizer_lock:
            tail = decode(tokens[max(0, checked - window):], skip_special_tokens=True)
            if not any(stop in tail for stop in stops):
                return None
            for end in range(max(1, checked), len(tokens) + 1):  # the first token that completes one
                piece = decode(tokens[max(0, end - window):end], skip_special_tokens=True)
                if any(stop in piece for stop in stops):
                    return end
        return len(tokens)

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
            records = self.pipe.postprocess(model_outputs,
                                            **{**postprocess_defaults(self.pipe), **prompt.plan.postprocess})
            if prompt.plan.logprobs is not None:
                for j, record in enumerate(records):
                    record["logprobs"] = render(self.pipe.tokenizer, prompt.logprobs.get(j, []))
            return records

    def _finish(self, prompt: _Prompt, *, result: Any = None, error: BaseException | None = None) -> None:
        with self._lock:
            leftover = [rid for rid in prompt.request_ids if rid in self._requests]
            for request_id in leftover:
                del self._requests[request_id]
        for request_id in leftover:
            self.manager.cancel_request(request_id)
            self.sampler.forget(request_id)
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
                self._finish(prompt, error=cancel_error(item.cancel_id or item.job_id))
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
