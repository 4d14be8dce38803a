"""Names shared by producers, tasks and workers: Redis keys, queues, task names, defaults."""

from __future__ import annotations

KEY_PREFIX = "pipefleet"
"""Prefix of every Redis key pipefleet writes itself (Celery's own keys keep theirs)."""

AD_KEY_PREFIX = f"{KEY_PREFIX}:ad:"
"""``pipefleet:ad:<deployment>:<worker>``: one deployment advertisement, with a TTL."""

REGISTRY_KEY = f"{KEY_PREFIX}:deployments"
"""``pipefleet:deployments``: hash of deployment name -> its registration (JSON), kept after workers stop."""

PROGRESS_KEY_PREFIX = f"{KEY_PREFIX}:progress:"
"""``pipefleet:progress:<job_id>``: items done so far (INCRBY), for chunked jobs."""

JOB_KEY_PREFIX = f"{KEY_PREFIX}:job:"
"""``pipefleet:job:<job_id>``: the record of a chunked job (total, chunk ids)."""

CANCEL_KEY_PREFIX = f"{KEY_PREFIX}:cancel:"
"""``pipefleet:cancel:<job_id>``: set when a job is cancelled; workers skip it."""

PAYLOAD_KEY_PREFIX = f"{KEY_PREFIX}:payload:"
"""``pipefleet:payload:<uuid>``: a large input stored once (claim check)."""

REPLICATION_BARRIER_KEY = f"{KEY_PREFIX}:replication-barrier"
"""A throwaway key written to learn when a replica caught up with every earlier write (``WAIT``)."""

QUEUE_PREFIX = "pipefleet."
"""Each deployment consumes the Celery queue ``pipefleet.<deployment>``."""

INFER_TASK = "pipefleet.infer"
"""Celery name of the task that runs one job (or one chunk) on a deployment."""

ASSEMBLE_TASK = "pipefleet.assemble"
"""Celery name of the chord callback that puts a chunked job's result together."""

SPLIT_TASK = "pipefleet.split"
"""Celery name of the task that splits one long input (audio) into windows."""

FORWARD_TASK = "pipefleet.forward"
"""Celery name of the task that runs one window's forward pass of a distributed chunk pipeline."""

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
"""Broker used when neither config nor environment name one."""

DEFAULT_RESULT_BACKEND = "redis://127.0.0.1:6379/1"
"""Result backend used when neither config nor environment name one."""

HEARTBEAT_INTERVAL_S = 5.0
"""How often a worker refreshes its advertisements."""

HEARTBEAT_TTL_S = 15
"""Advertisements expire this long after the last heartbeat (dead workers vanish)."""

LEASE_KEY_PREFIX = f"{KEY_PREFIX}:lease:"
"""``pipefleet:lease:<worker>``: present while the worker lives (a short TTL its lease thread renews)."""

CLAIMS_KEY_PREFIX = f"{KEY_PREFIX}:claims:"
"""``pipefleet:claims:<worker>``: hash of the delivery tags a worker holds -> where each came from."""

LEASE_HOLDERS_KEY = f"{KEY_PREFIX}:lease-holders"
"""Set of the workers that may hold claims; every worker's reaper checks their leases."""

REDELIVERED_KEY = f"{KEY_PREFIX}:redelivered"
"""Set of the delivery tags the reap put back from a dead worker, until a claim takes them again: a claimed job
marked so is checked for a result its dead holder stored before its ack, and is then acked, not run again."""

DEAD_LETTER_KEY = f"{KEY_PREFIX}:dead-letter"
"""List of poison messages (JSON records: reason, tag, job id, the raw message), newest first."""

LEASE_TTL_S = 5.0
"""A worker's lease lapses this long after its last renewal; its jobs then go back to their queues."""

WRITE_RETRY_S = 30.0
"""Default of ``redis_write_retry_s``: how long a worker retries a result or ack write before WriteFailed."""

DISCOVERY_TTL_S = 2.0
"""How long a client routes by the deployments it last read before reading them again."""

PRIORITY_STEPS = (0, 3, 6, 9)
"""Redis priority sub-queues; 0 is the most urgent, as in Celery's Redis transport."""

DEFAULT_PRIORITY = 6
"""Priority of a job that does not ask for one; interactive jobs can overtake it."""


PRIVATE_QUEUE_PREFIX = "pipefleet-worker."
"""``pipefleet-worker.<worker>``: the queue Celery's own consumer listens on (jobs never go there)."""


EVENTS_KEY_PREFIX = f"{KEY_PREFIX}:events:"
"""``pipefleet:events:<job_id>``: a job's event stream (Redis Stream: text pieces, progress, restart, done, error)."""

EVENTS_MAXLEN = 10_000
"""Approximate cap on entries per event stream (``XADD MAXLEN ~``); a piece is one generation step, not a token."""

EVENTS_POLL_S = 1.0
"""How long a reader blocks on an idle event stream before it checks whether the job ended without a final event."""

EVENTS_FINAL_GRACE_S = 2.0
"""How long a reader waits for a worker's own final event after the job's result says it ended."""


def queue_name(deployment: str) -> str:
    """The Celery queue a deployment consumes."""
    return f"{QUEUE_PREFIX}{deployment}"


def private_queue_name(worker: str) -> str:
    """The private queue of one worker's Celery consumer."""
    return f"{PRIVATE_QUEUE_PREFIX}{worker}"


WEBHOOK_KEY_PREFIX = f"{KEY_PREFIX}:webhooks:"
"""Prefix of the webhook outbox: ``…delivery:<id>`` records, the ``…due`` sorted set, ``…job:<id>`` targets."""

WEBHOOK_DUE_KEY = f"{WEBHOOK_KEY_PREFIX}due"
"""``pipefleet:webhooks:due``: delivery ids scored by when they are next due (a claim pushes the score on)."""

WEBHOOK_WATCH_KEY = f"{WEBHOOK_KEY_PREFIX}watch"
"""``pipefleet:webhooks:watch``: ids of unfinished jobs that have a webhook, scored by when to look next."""

FILE_KEY_PREFIX = f"{KEY_PREFIX}:file:"
"""``pipefleet:file:<file_id>`` (metadata) and ``…:<file_id>:bytes``: an uploaded or output file."""

FILES_INDEX_KEY = f"{KEY_PREFIX}:files"
"""``pipefleet:files``: file ids scored by creation time (``GET /v1/files``)."""

BATCH_KEY_PREFIX = f"{KEY_PREFIX}:batch:"
"""``pipefleet:batch:<batch_id>`` (the batch object) and its ``…:lines``, ``…:out``, ``…:err``, ``…:lease`` keys."""

BATCHES_INDEX_KEY = f"{KEY_PREFIX}:batches"
"""``pipefleet:batches``: batch ids scored by creation time (``GET /v1/batches``)."""

ACTIVE_BATCHES_KEY = f"{KEY_PREFIX}:batches:active"
"""``pipefleet:batches:active``: ids of batches not yet in a final state, which every gateway advances."""
