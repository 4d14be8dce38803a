"""Start a worker process: load deployments, wire Celery signals, consume their queues."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import time
from typing import Any, Callable

import redis as redis_lib
from celery import signals
from celery.worker import state as worker_state

from config import FleetConfig, load_config
from producers.constants import CANCEL_KEY_PREFIX, PRIORITY_STEPS, QUEUE_PREFIX, private_queue_name, queue_name
from producers.errors import ConfigError
from producers.redis_clients import redis_client
from producers.schemas import Construction, DeploymentAd, DeploymentTerms
from worker.advertise import Advertiser, register, registration_of
from worker.allocator import keep_large_allocations
from producers.webhook_delivery import WebhookCollector, start_dispatcher
from worker.construction import construction_facts
from worker.consumer import BulkConsumer, bulk_consumer_step
from worker.hotpath import HotPath
from worker.strategy import serve_hot_path
from worker.batcher import PendingItem
from worker.forward import BatchHooks
from worker.kombu_layout import priority_queue_keys
from worker.logs import configure_logging, log_job_outcomes
from worker.runtime import Runtime, set_runtime
from worker.supervision import Supervisor

logger = logging.getLogger(__name__)

GIL_SWITCH_INTERVAL_S = 0.0005
"""How long a job thread may hold the GIL before the inference thread gets it back.

Eager PyTorch releases the GIL around every op; with CPython's default 5 ms
interval, dozens of busy job threads stall the device thread between ops.
"""

CANCEL_RECHECK_AGE_S = 0.2
"""Items that waited in a batcher this long have their cancel flags read again before their forward pass."""

MAX_DEFAULT_CONCURRENCY = 512
"""Upper bound of the default job-thread count."""


BATCHES_IN_HAND = 2
"""Default batches a worker holds per deployment: one runs while the next fills. Jobs held are not run by a
worker that scales up later, so this stays small where one batch may take seconds (generation)."""

BATCHES_IN_HAND_BY_LENGTH = 8
"""The same for a deployment whose batcher picks each batch by length: among more jobs it pads less
(``benchmarks.throughput --concurrency 64,256``, 512 single MiniLM jobs, 2026-12-01 cpu-2x: 183 items/s
holding two batches, 229 holding four, 269 holding eight)."""


def default_concurrency(runtime: Runtime) -> int:
    """Jobs held and job threads: per deployment, ``max_batch_size`` times the batches it holds (4 to 512)."""
    total = sum(served.config.max_batch_size
                * (BATCHES_IN_HAND_BY_LENGTH if served.groups_by_length else BATCHES_IN_HAND)
                for served in runtime.deployments.values())
    return max(4, min(MAX_DEFAULT_CONCURRENCY, total))


def _deployment_of(request) -> str | None:
    routing_key = (getattr(request, "delivery_info", None) or {}).get("routing_key") or ""
    return routing_key[len(QUEUE_PREFIX):] if routing_key.startswith(QUEUE_PREFIX) else None


def _wire_signals(runtime: Runtime, advertiser: Advertiser, supervisor: Supervisor) -> None:
    @signals.task_received.connect(weak=False)
    def _received(request=None, **_):
        deployment = _deployment_of(request)
        if deployment in runtime.deployments:
            runtime.tracker.received(deployment, request.id)

    def _gone(request=None, **_):
        deployment = _deployment_of(request)
        if deployment is not None and request is not None:
            runtime.handed_over(deployment, request.id)

    for signal in (signals.task_revoked, signals.task_rejected, signals.task_unknown):
        signal.connect(_gone, weak=False)
    log_job_outcomes(_deployment_of)

    @signals.worker_ready.connect(weak=False)
    def _ready(**_):
        advertiser.start()
        logger.info("worker %s ready: serving %s", runtime.worker_name, ", ".join(runtime.deployments))

    @signals.worker_shutting_down.connect(weak=False)
    def _shutting_down(**_):
        supervisor.stop()
        advertiser.stop()
        _exit_after(runtime.config.shutdown_timeout_s)


def deployment_terms(config: FleetConfig, name: str, construction: Construction | None = None) -> DeploymentTerms:
    """What deployment ``name`` of ``config`` serves and the limits it accepts jobs under."""
    d = config.deployment(name)
    return DeploymentTerms(
        name=name, task=d.task, model=d.model, revision=d.revision, queue=queue_name(name),
        max_batch_size=d.max_batch_size, chunk_size=d.chunk_size,
        max_inputs_per_job=config.limits.max_inputs_per_job, max_payload_bytes=config.limits.max_payload_bytes,
        claim_check_bytes=config.limits.claim_check_bytes, payload_ttl_s=config.limits.payload_ttl_s,
        construction=construction)


def register_only(config: FleetConfig, names: list[str]) -> int:
    """``pipefleet worker --register-only``: register ``names`` from the config alone and exit.

    No model is loaded, so the registrations carry no construction facts
    (``construction = None``) until a worker serving them starts and rewrites them.
    """
    try:
        register(redis_client(config.broker_url, config.redis_options()),
                 [registration_of(deployment_terms(config, name), "config") for name in names])
    except redis_lib.RedisError as error:
        print(f"pipefleet worker: cannot register in Redis: {error}", file=sys.stderr)
        return 1
    print(f"registered: {', '.join(names)}")
    return 0


def _exit_after(timeout_s: float) -> None:
    """Bound a warm shutdown: exit once ``timeout_s`` passed, whatever still runs.

    A pod's grace period ends in SIGKILL; exiting first, with a log line, says why.
    Jobs still running stay claimed and are redelivered like a dead worker's.
    """
    def give_up() -> None:
        logger.error("running jobs did not finish within shutdown_timeout_s = %.0f s; exiting now (they will be "
                     "redelivered)", timeout_s)
        logging.shutdown()
        os._exit(1)

    timer = threading.Timer(timeout_s, give_up)
    timer.daemon = True
    timer.start()


def _make_ads(runtime: Runtime, supervisor: Supervisor):
    pid = os.getpid()
    started = time.time()
    built: dict[str, Construction] = {}  # a loaded deployment never changes how it was built

    def make() -> list[DeploymentAd]:
        ads = []
        stalled = supervisor.stalled()
        for name, served in runtime.deployments.items():
            if name not in built:
                built[name] = construction_facts(served.config, served.pipeline)
            terms = deployment_terms(runtime.config, name, built[name])
            ads.append(DeploymentAd(
                **terms.model_dump(exclude={"construction"}), construction=built[name],
                worker=runtime.worker_name, device=served.device, pid=pid, started_at=started,
                in_flight=len(runtime.tracker.waiting.get(name, ())) + served.batcher.pending_count(),
                pending_items=served.batcher.pending_count(),
                healthy=not stalled, stalled=stalled,
            ))
        return ads

    return make


def load_deployments(config: FleetConfig, names: list[str], runtime: Runtime) -> None:
    """Load every selected deployment; raises ConfigError on the first failure."""
    from worker.loading import load_pipeline

    for name in names:
        deployment = config.deployment(name)
        started = time.perf_counter()
        pipe = load_pipeline(deployment)
        runtime.add(deployment, pipe, load_s=time.perf_counter() - started)


def warm_up_deployments(runtime: Runtime) -> None:
    """One forward pass per deployment, on its device's inference thread, before consuming."""
    from worker.warmup import warm_up

    for name, served in runtime.deployments.items():
        if not served.config.warmup:
            continue
        started = time.perf_counter()
        if hasattr(served.batcher, "warm_up"):  # continuous batching: through its own engine
            served.batcher.warm_up()
            served.metrics.model_load_s += time.perf_counter() - started
            continue
        runner = runtime.runners[served.device]
        runner.call(lambda s=served: warm_up(name, s.config.task, s.pipeline)).result()
        served.metrics.model_load_s += time.perf_counter() - started


def broker_hooks(redis: Callable[[], Any], consumer: Callable[[], Any],
                 queue_keys: dict[str, list[str]]) -> BatchHooks:
    """The batchers' hooks of a worker: its deployments' queues and cancel flags in Redis, Celery's revoked ids.

    ``redis()`` gives the worker's Redis client (set once the deployments are loaded); ``consumer()`` its bulk
    consumer (None until Celery starts it), which knows from its last claim which queue lists hold jobs;
    ``queue_keys`` maps each deployment to its priority sub-queue lists.
    """

    def queue_has_ready(name: str) -> bool:
        bulk = consumer()
        return bulk is not None and bulk.has_ready(queue_keys[name])

    def find_cancelled(items: list[PendingItem]) -> set[str]:
        # Revoked ids are in memory. Cancel flags in Redis are read once per batch, and only for items that
        # have waited here a while: a job's flag was already read when it was claimed (worker.consumer), and
        # a round trip on the inference thread delays every forward pass of an idle worker.
        gone = {item.job_id for item in items if item.job_id in worker_state.revoked}
        now = time.monotonic()
        parents = list(dict.fromkeys(item.cancel_id or item.job_id for item in items
                                     if now - item.enqueued_at >= CANCEL_RECHECK_AGE_S))
        if not parents:
            return gone
        try:
            flags = redis().mget([f"{CANCEL_KEY_PREFIX}{parent}" for parent in parents])
        except redis_lib.RedisError as error:
            logger.warning("cannot read cancel flags (%s); running the batch", error)
            return gone
        flagged = {parent for parent, flag in zip(parents, flags) if flag}
        return gone | {item.job_id for item in items if (item.cancel_id or item.job_id) in flagged}

    return BatchHooks(queue_has_ready=queue_has_ready, find_cancelled=find_cancelled)


def run_worker(args: argparse.Namespace) -> int:
    """Load the deployments, then run a Celery worker (threads pool) on their queues."""
    configure_logging(args.loglevel, json_lines=args.log_json)
    sys.setswitchinterval(float(os.environ.get("PIPEFLEET_SWITCH_INTERVAL_S", GIL_SWITCH_INTERVAL_S)))
    try:
        config = load_config(args.config)
        names = args.deployment or [d.name for d in config.deployments]
        for name in names:
            config.deployment(name)
    except (ConfigError, KeyError) as error:
        print(f"pipefleet worker: {error}", file=sys.stderr)
        return 2
    if not names:
        print("pipefleet worker: the config has no deployments", file=sys.stderr)
        return 2
    if config.log_json and not args.log_json:
        configure_logging(args.loglevel, json_lines=True)
    keep_large_allocations()
    if args.check:
        from worker.health import check

        return check(config, names, args.name)
    if args.register_only:
        return register_only(config, names)
    worker_name = args.name or f"pipefleet-{socket.gethostname()}-{os.getpid()}"
    queue_keys = {name: priority_queue_keys([queue_name(name)], PRIORITY_STEPS) for name in names}
    runtime = Runtime(config, worker_name,
                      hooks=broker_hooks(lambda: runtime.redis, lambda: runtime.consumer, queue_keys))
    try:
        load_deployments(config, names, runtime)
    except ConfigError as error:
        print(f"pipefleet worker: {error}", file=sys.stderr)
        return 3
    runtime.redis = redis_client(config.broker_url, config.redis_options())
    set_runtime(runtime)
    runtime.start()
    supervisor = Supervisor()
    runtime.supervisor = supervisor
    for device, runner in runtime.runners.items():
        supervisor.watch(f"device-{device}", runner.thread, ticks=False)
    warm_up_deployments(runtime)

    from worker.celery_app import configure_app

    app = configure_app(config)
    import worker.control  # noqa: F401  (registers the remote-control commands)
    advertiser = Advertiser(runtime.redis, _make_ads(runtime, supervisor), interval_s=config.heartbeat_interval_s,
                            ttl_s=config.heartbeat_ttl_s)
    _wire_signals(runtime, advertiser, supervisor)
    # Job webhooks: events come from stored results, so nothing on the job's own path waits on them.
    webhooks = start_dispatcher(config.webhooks, runtime.redis, backend=app.backend, result_ttl_s=config.result_ttl_s,
                                name=f"{worker_name}-webhooks")
    metrics_port = args.metrics_port if args.metrics_port is not None else config.worker_metrics_port
    if metrics_port:
        from worker.prometheus import serve_metrics

        serve_metrics(runtime, metrics_port, extra=(WebhookCollector(webhooks, [("worker", worker_name)]),)
                      if webhooks else ())
    concurrency = args.concurrency or default_concurrency(runtime)
    consumers: list[BulkConsumer] = []
    hostname = f"{worker_name}@{socket.gethostname()}"

    def hot_path(celery_consumer, on_finished, dead_letter, ack):
        path = HotPath(runtime, backend=celery_consumer.app.backend, hostname=hostname,
                       events=lambda: celery_consumer.event_dispatcher, on_finished=on_finished,
                       supervisor=supervisor, dead_letter=dead_letter, ack=ack,
                       write_retry_s=config.redis_write_retry_s)
        serve_hot_path(celery_consumer, path)  # the infer task's Celery strategy offers it plain jobs
        return path

    def created(consumer: BulkConsumer) -> None:
        consumers.append(consumer)
        runtime.consumer = consumer

    app.steps["consumer"].add(bulk_consumer_step(
        broker_url=config.broker_url, queues=[queue_name(n) for n in names], priority_steps=PRIORITY_STEPS,
        concurrency=concurrency, on_create=created, hot_path=hot_path, holding=runtime.holding_runners,
        worker=worker_name,
        supervisor=supervisor, quanta=[config.deployment(n).max_batch_size for n in names],
        lease_ttl_s=config.lease_ttl_s, visibility_timeout_s=config.visibility_timeout_s,
        redis_options=config.redis_options(), write_retry_s=config.redis_write_retry_s))
    # Celery's own consumer keeps only a private queue (remote control and the unacked sweep run on
    # its connection); the deployment queues are claimed in bulk by worker.consumer.
    worker = app.Worker(
        pool="threads", concurrency=concurrency, queues=[private_queue_name(worker_name)],
        hostname=hostname, prefetch_multiplier=1, without_gossip=True,
        loglevel=args.loglevel, optimization="fair",
    )
    try:
        worker.start()
    finally:
        for consumer in consumers:
            consumer.close()
        if webhooks is not None:
            webhooks.stop()
        runtime.stop()
    return worker.exitcode or 0
