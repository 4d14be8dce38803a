"""The worker process's state: served deployments, their batchers and device runners."""

from __future__ import annotations

import copy
import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from config.models import Deployment, FleetConfig
from producers.errors import UnknownDeployment
from worker.batcher import Batcher, DeviceRunner
from worker.forward import BatchHooks, ForwardPass
from worker.metrics import DeploymentMetrics

logger = logging.getLogger(__name__)


@dataclass
class ServedDeployment:
    """One loaded deployment on this worker."""

    config: Deployment
    pipeline: Any
    batcher: Batcher
    device: str
    metrics: DeploymentMetrics
    sampling_rate: int | None = None
    streams: Any = None
    """The deployment's :class:`~worker.streaming.TextStreams` (text-generation only)."""

    @property
    def groups_by_length(self) -> bool:
        """Whether its batcher picks each batch by input length when more is pending than one batch holds."""
        return getattr(self.batcher, "length_of", None) is not None


@dataclass
class JobTracker:
    """Which jobs this worker holds that have not handed their items to a batcher yet."""

    waiting: dict[str, set[str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def received(self, deployment: str, job_id: str) -> None:
        """A message for ``deployment`` arrived (it will hand items over soon)."""
        with self.lock:
            self.waiting.setdefault(deployment, set()).add(job_id)

    def handed_over(self, deployment: str, job_id: str) -> None:
        """The job's items are in the batcher, or it ended without reaching it."""
        with self.lock:
            self.waiting.get(deployment, set()).discard(job_id)

    def any_waiting(self, deployment: str) -> bool:
        """True while some received job of ``deployment`` has not handed over."""
        return bool(self.waiting.get(deployment))


GENERATIVE_TASKS = frozenset({"text-generation", "text2text-generation", "summarization", "translation",
                              "image-text-to-text"})
"""Tasks whose batches are never regrouped by length (decoding is sensitive to the padding it sees)."""

STREAMED_TASKS = frozenset({"text-generation", "image-text-to-text"})
"""Tasks whose jobs stream their generated text as it comes, and report token usage."""


def text_lengths(pipe: Any, task: str, *, tokens: bool) -> Any:
    """``length_of`` for a batcher, or None where lengths do not apply (no tokenizer, generative tasks).

    Lengths are characters, free to measure, unless ``tokens`` (a ``max_batch_tokens`` budget is set): then
    the tokenizer counts them, once per job, on the thread that hands the job over.
    """
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is None or task in GENERATIVE_TASKS:
        return None

    def length_of(payloads: list[Any]) -> list[int]:
        if not all(isinstance(payload, str) for payload in payloads):
            return [0] * len(payloads)
        if not tokens:
            return [len(payload) for payload in payloads]
        return [len(ids) for ids in tokenizer(payloads, add_special_tokens=True)["input_ids"]]

    return length_of


def device_label(pipe: Any, deployment: Deployment) -> str:
    """A stable name for the device a pipeline runs on (one inference thread each)."""
    if deployment.device_map is not None:
        return "device_map"
    return str(getattr(pipe, "device", "cpu"))


class Runtime:
    """Everything a job thread needs: deployments by name, limits, media policy."""

    def __init__(self, config: FleetConfig, worker_name: str, *, hooks: BatchHooks | None = None) -> None:
        self.config = config
        self.worker_name = worker_name
        self.hooks = hooks or BatchHooks()
        """What the batchers ask the worker: is more queued, which items were cancelled."""
        self.deployments: dict[str, ServedDeployment] = {}
        self.runners: dict[str, DeviceRunner] = {}
        self.tracker = JobTracker()
        from worker.events import EventWriter

        self.events = EventWriter(None, ttl_s=config.result_ttl_s)
        self._media_policies: dict[str, Any] = {}
        self.supervisor: Any = None
        """The worker's :class:`~worker.supervision.Supervisor` (thread liveness), once started."""
        self.consumer: Any = None
        """The worker's bulk consumer (its lease and dead letters), once Celery started it."""

    @property
    def redis(self) -> Any:
        """The worker's Redis client (broker database); job events go through it too."""
        return self.events.redis

    @redis.setter
    def redis(self, client: Any) -> None:
        self.events.redis = client

    def media_policy(self, deployment: Deployment) -> Any:
        """The media policy of one deployment: fleet settings plus its own allowed hosts."""
        policy = self._media_policies.get(deployment.name)
        if policy is None:
            from worker.media import MediaPolicy

            media = self.config.media
            policy = MediaPolicy(
                allowed_hosts=frozenset(media.allowed_hosts) | frozenset(deployment.allowed_hosts),
                allow_private_hosts=frozenset(media.allow_private_hosts), data_root=media.data_root,
                max_bytes=media.max_bytes, timeout_s=media.timeout_s, max_image_pixels=media.max_image_pixels,
                max_audio_seconds=media.max_audio_seconds,
            )
            self._media_policies[deployment.name] = policy
        return policy

    def add(self, deployment: Deployment, pipe: Any, load_s: float) -> ServedDeployment:
        """Serve a loaded pipeline: create its batcher (calling its :class:`ForwardPass`) on its device's runner."""
        device = device_label(pipe, deployment)
        metrics = DeploymentMetrics(deployment.name)
        metrics.model_load_s = load_s
        name, task = deployment.name, deployment.task
        streams = None
        if task in STREAMED_TASKS and getattr(pipe, "tokenizer", None) is not None:
            from worker.streaming import TextStreams, eos_token_ids

            # Its own copy: the Rust tokenizer refuses a decode while another thread encodes ("Already borrowed").
            streams = TextStreams(copy.deepcopy(pipe.tokenizer), self.events, eos_token_ids=eos_token_ids(pipe))
        if deployment.continuous_batching:
            from worker.continuous import ContinuousBatcher

            batcher = ContinuousBatcher(deployment, pipe, streams, metrics=metrics, limits=self.config.limits,
                                        find_cancelled=self.hooks.find_cancelled)
            return self._serve(deployment, pipe, batcher, device, metrics, streams)

        forward = ForwardPass(name, task, pipe, streams=streams, metrics=metrics)

        def more_coming() -> bool:
            return self.tracker.any_waiting(name) or self.hooks.queue_has_ready(name)

        batcher = Batcher(name, forward, max_batch_size=deployment.max_batch_size,
                          max_batch_wait_ms=deployment.max_batch_wait_ms, more_coming=more_coming,
                          find_cancelled=self.hooks.find_cancelled, metrics=metrics,
                          length_of=(text_lengths(pipe, task, tokens=deployment.max_batch_tokens is not None)
                                     if deployment.length_aware else None),
                          max_batch_tokens=deployment.max_batch_tokens)
        return self._serve(deployment, pipe, batcher, device, metrics, streams)

    def _serve(self, deployment: Deployment, pipe: Any, batcher: Any, device: str, metrics: DeploymentMetrics,
               streams: Any) -> ServedDeployment:
        runner = self.runners.get(device)
        if runner is None:
            runner = self.runners[device] = DeviceRunner(device)
        if isinstance(batcher, Batcher):
            runner.add(batcher)
        extractor = getattr(pipe, "feature_extractor", None)
        served = ServedDeployment(deployment, pipe, batcher, device, metrics,
                                  sampling_rate=getattr(extractor, "sampling_rate", None), streams=streams)
        self.deployments[deployment.name] = served
        return served

    def start(self) -> None:
        """Start one inference thread per device (continuous batching engines run their own)."""
        for runner in self.runners.values():
            runner.start()
        for served in self.deployments.values():
            if not isinstance(served.batcher, Batcher):
                served.batcher.start()

    def stop(self) -> None:
        """Stop the inference threads after their batch in flight."""
        for runner in self.runners.values():
            runner.stop()
        for served in self.deployments.values():
            if not isinstance(served.batcher, Batcher):
                served.batcher.stop()
        self.events.flush()

    def served(self, name: str) -> ServedDeployment:
        """The deployment called ``name``; raises :class:`UnknownDeployment` otherwise."""
        try:
            return self.deployments[name]
        except KeyError:
            raise UnknownDeployment(
                f"worker {self.worker_name} does not serve deployment {name!r}; "
                f"it serves: {', '.join(sorted(self.deployments)) or 'nothing'}"
            ) from None

    def handed_over(self, deployment: str, job_id: str) -> None:
        """The job's items are in the batcher, or it ended without reaching it: its batcher may flush now."""
        self.tracker.handed_over(deployment, job_id)
        self.wake(deployment)

    @contextmanager
    def holding_runners(self) -> Iterator[None]:
        """Hold every device's flush decisions while the caller hands over a claim's jobs (see
        :meth:`DeviceRunner.hold`), then let each decide once."""
        runners = list(self.runners.values())
        for runner in runners:
            runner.hold()
        try:
            yield
        finally:
            for runner in runners:
                runner.release()

    def wake(self, deployment: str) -> None:
        """Let the deployment's runner re-check its flush rule."""
        served = self.deployments.get(deployment)
        if served is not None:
            self.runners[served.device].wake()


_runtime: Runtime | None = None


def set_runtime(runtime: Runtime | None) -> None:
    """Install the process-wide runtime (the worker does this once at start-up)."""
    global _runtime
    _runtime = runtime


def get_runtime() -> Runtime:
    """The process-wide runtime; only set inside a ``pipefleet worker`` process."""
    if _runtime is None:
        raise RuntimeError("no pipefleet runtime: this code runs inside 'pipefleet worker'")
    return _runtime
