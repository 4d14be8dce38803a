"""``pipefleet deployments remove NAME``: forget a deployment and fail the jobs still queued for it.

A registration (see :mod:`worker.advertise`) keeps a deployment accepting jobs
while no worker runs. Removing it makes new submissions fail at once with
UnknownDeployment, and every job left in the deployment's queue lists (each
priority step) fails with an UnknownDeployment error that says the deployment
was removed, so no caller waits for a worker that will never come.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from typing import Any

from pydantic import BaseModel

from producers.constants import DISCOVERY_TTL_S, REGISTRY_KEY, queue_name
from producers.discovery import read_ads
from producers.errors import ConfigError, UnknownDeployment
from producers.fleet import queue_keys

logger = logging.getLogger(__name__)

DRAIN_SCRIPT = """
local taken = {}
for _, key in ipairs(KEYS) do
  local raws = redis.call('LRANGE', key, 0, -1)
  redis.call('DEL', key)
  for _, raw in ipairs(raws) do taken[#taken + 1] = raw end
end
return taken
"""
"""Take every message of the given lists at once (atomically: a message is either still queued or returned)."""


class Removal(BaseModel):
    """What ``remove_deployment`` did."""

    name: str
    registered: bool
    """Whether a registration existed (False: only queued jobs, if any, were failed)."""
    failed_jobs: list[str]
    """Ids of the jobs (and chunked jobs' parents) failed because they were still queued."""


def message_task_ids(raw: bytes | str) -> list[str]:
    """The Celery task id of a queued message and, for a chunk, its parent job's id."""
    envelope = json.loads(raw)
    ids = [envelope["headers"]["id"]]
    try:
        body = json.loads(base64.b64decode(envelope["body"]))
        spec = body[1].get("spec") or {}
        if spec.get("job_id") and spec["job_id"] not in ids:
            ids.append(spec["job_id"])
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        pass  # not a pipefleet infer message: its own id is enough
    return ids


def remove_deployment(client: Any, name: str, *, force: bool = False, settle_s: float | None = None) -> Removal:
    """Delete ``name``'s registration, then fail every job still queued for it.

    Refuses (ConfigError) while a live worker serves it, unless ``force``: a
    worker would re-register it and run its jobs. A producer that resolved the
    deployment just before the removal may still publish; the queue is drained
    a second time after ``settle_s`` (default: a client's discovery cache age, plus margin)
    to fail those too.
    """
    redis = client.redis
    serving = sorted(ad.worker for ad in client.access.call(read_ads, redis) if ad.name == name)
    if serving and not force:
        raise ConfigError(f"deployment {name!r} is served by live worker(s) {', '.join(serving)}; stop them "
                          "first (or pass --force: they would register it again)")
    registered = bool(client.access.call(redis.hdel, REGISTRY_KEY, name))
    failed = _fail_queued(client, name)
    time.sleep(DISCOVERY_TTL_S + 0.5 if settle_s is None else settle_s)
    failed += _fail_queued(client, name)
    if not registered and not failed:
        raise UnknownDeployment(f"no deployment {name!r} is registered, and none of its jobs is queued")
    logger.info("removed deployment %s; failed %d queued job(s)", name, len(failed))
    return Removal(name=name, registered=registered, failed_jobs=failed)


def _fail_queued(client: Any, name: str) -> list[str]:
    raws = client.access.call(client.redis.eval, DRAIN_SCRIPT, len(queue_keys(queue_name(name))),
                              *queue_keys(queue_name(name)))
    ids: list[str] = []
    for raw in raws:
        try:
            ids.extend(i for i in message_task_ids(raw) if i not in ids)
        except (ValueError, KeyError, TypeError):
            logger.warning("dropping a malformed message of removed deployment %s: %.200r", name, raw)
    backend = client.celery.backend
    error = UnknownDeployment(f"deployment {name!r} was removed (pipefleet deployments remove) while this job "
                              "was queued; no worker will run it")
    for task_id in ids:
        client.access.call(backend.mark_as_failure, task_id, error, call_errbacks=False)
    return ids
