"""Store a job's final result only if none is stored yet: a second run never replaces the first result.

A job can run twice (at-least-once): its worker was paused past its lease and
another worker ran it meanwhile, or a worker died between storing a result and
acking the message. Celery's Redis backend reads the current state and then
writes, so two runs that finish together can both write. Here one script on
the result store writes ``celery-task-meta-<id>`` (and publishes it, as
Celery's backend does) only while the stored state is not final, atomically:
the first final result of a job is the one every reader sees, for good.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import states

from producers.celery_internals import finished_task_meta
from producers.constants import WRITE_RETRY_S
from producers.errors import WriteFailed
from producers.redis_clients import NO_WAIT, ReplicaWait
from worker.retrying import pipeline_until_done

logger = logging.getLogger(__name__)

STORE_FIRST_SCRIPT = """
-- KEYS[1] the job's result key; ARGV[1] encoded meta, ARGV[2] expiry in seconds (0: none)
local current = redis.call('GET', KEYS[1])
if current then
  local ok, meta = pcall(cjson.decode, current)
  if ok and type(meta) == 'table' and (meta.status == 'SUCCESS' or meta.status == 'FAILURE'
                                       or meta.status == 'REVOKED') then
    return 0
  end
end
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""
"""Write and publish a final result unless the key already holds one (1 if written)."""


def encoded_meta(backend: Any, job_id: str, state: str, value: Any, request: Any) -> str:
    """What Celery's Redis backend stores for a job that ended in ``state`` with ``value``."""
    result = backend.encode_result(value, state)
    return backend.encode(finished_task_meta(backend, job_id, result=result, state=state, request=request))


class FirstResultStore:
    """Writes final results through :data:`STORE_FIRST_SCRIPT`, many per pipeline."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def expiry_s(self, state: str) -> int:
        """Seconds a result in ``state`` is kept, as Celery's backend keeps it (0: for ever)."""
        expires = getattr(self.backend, "failure_expires", None) if state == states.FAILURE else None
        return int(expires or self.backend.expires or 0)

    def queue(self, pipe: Any, job_id: str, state: str, encoded: str) -> None:
        """Queue one conditional write on ``pipe`` (a pipeline of the backend's client).

        ``EVAL`` with the script's text, not a registered script's ``EVALSHA``: a pipeline holding a
        registered script first sends ``SCRIPT EXISTS`` (one more round trip per commit round), and
        ``EVALSHA`` met ``NOSCRIPT`` on a master that had just taken over in a Sentinel failover.
        """
        pipe.eval(STORE_FIRST_SCRIPT, 1, self.backend.get_key_for_task(job_id), encoded, self.expiry_s(state))

    def store(self, results: list[tuple[str, str, str]], *, wait: ReplicaWait = NO_WAIT,
              bound_s: float = WRITE_RETRY_S) -> list[Any]:
        """Write ``(job_id, state, encoded)`` results in one pipeline, retried for up to ``bound_s``.

        Returns one reply per result: true when it was stored, false when another run's final result was
        already there. Raises :class:`WriteFailed` when Redis refused the pipeline past ``bound_s``. When the
        pipeline cannot be sent whole for another reason, each result is written alone, and a result that
        still cannot be stored gets the error that kept it out as its reply (:class:`WriteFailed` included).
        """
        try:
            return pipeline_until_done(self.backend.client,
                                       lambda pipe: [self.queue(pipe, job_id, state, encoded)
                                                     for job_id, state, encoded in results],
                                       f"the results of {len(results)} jobs", wait=wait, bound_s=bound_s)
        except WriteFailed:
            raise
        except Exception:
            logger.exception("could not store the results of %d jobs together; storing them one by one",
                             len(results))
        replies: list[Any] = []
        for job_id, state, encoded in results:
            try:
                [written] = pipeline_until_done(self.backend.client,
                                                lambda pipe: self.queue(pipe, job_id, state, encoded),
                                                f"the result of job {job_id}", wait=wait, bound_s=bound_s)
                replies.append(written)
            except WriteFailed as error:
                replies.append(error)
            except Exception as error:
                logger.exception("job %s: its result could not be stored", job_id)
                replies.append(error)
        return replies
