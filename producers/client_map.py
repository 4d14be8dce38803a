"""``client.map``: stream an iterable through a deployment with bounded work in flight.

Inputs are cut into chunk jobs of ``chunk_size``. At most ``max_in_flight``
chunk jobs are outstanding (sent, and their results not yet handed to the
caller): the next chunk is read from the iterable only after the oldest one
has been yielded and its result removed from Redis. Outputs come back in
input order, one per input, exactly as ``for out in pipe(generator)`` yields
them in-process.
"""

from __future__ import annotations

import collections
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from producers.codec import decode_output, encode_input
from producers.constants import DEFAULT_PRIORITY, INFER_TASK
from producers.errors import InvalidInput, InvalidParams, JobCancelled, JobError, JobTimeout, PayloadTooLarge
from producers.job import error_from_meta
from producers.payloads import store_payload
from producers.publishing import Publisher, TaskMessage
from producers.redis_access import RedisAccess
from producers.result_waiter import ResultWaiter
from producers.schemas import DeploymentInfo, JobSpec

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 64
"""Inputs per chunk job of ``client.map`` when the caller does not say."""


@dataclass
class _Chunk:
    task_id: str
    n_items: int


def _items(iterable: Any, column: str | None) -> Iterable[Any]:
    # A datasets.Dataset with column= is the KeyDataset pattern: each row's value in that column.
    return iterable if column is None else (row[column] for row in iterable)


def _length(iterable: Any) -> int | None:
    try:
        return len(iterable)
    except TypeError:
        return None


class _Stream:
    """One ``map`` call: sends chunks, waits on the oldest, yields its outputs."""

    def __init__(self, publisher: Publisher, waiter: ResultWaiter, info: DeploymentInfo, *, params: dict[str, Any],
                 chunk_size: int, max_in_flight: int, timeout_s: float | None, priority: int | None,
                 model: str | None, revision: str | None) -> None:
        self.publisher = publisher
        self.waiter = waiter
        self.info = info
        self.params = params
        self.chunk_size = chunk_size
        self.max_in_flight = max_in_flight
        self.timeout_s = timeout_s
        self.priority = DEFAULT_PRIORITY if priority is None else priority
        self.model = model
        self.revision = revision
        self.stream_id = f"map-{uuid.uuid4()}"
        self.outstanding: "collections.deque[_Chunk]" = collections.deque()
        self.sent = 0

    def message(self, items: list[Any], offset: int) -> TaskMessage:
        """The message of the next chunk (its inputs stored aside first if they are large)."""
        try:
            encoded = [encode_input(item) for item in items]
        except (TypeError, ValueError) as error:
            raise InvalidInput(f"input {offset}..{offset + len(items) - 1}: {error}") from error
        spec = JobSpec(deployment=self.info.name, inputs=encoded, params=self.params, job_id=self.stream_id,
                       chunk_index=self.sent, offset=offset, model=self.model, revision=self.revision)
        size = len(spec.model_dump_json())
        if self.info.max_payload_bytes is not None and size > self.info.max_payload_bytes:
            raise PayloadTooLarge(f"a chunk of {len(items)} inputs is {size} bytes; deployment {self.info.name!r} "
                                  f"accepts at most {self.info.max_payload_bytes}; lower chunk_size")
        if self.info.claim_check_bytes is not None and size > self.info.claim_check_bytes:
            spec.inputs = store_payload(self.publisher.redis, encoded, ttl_s=self.info.payload_ttl_s)
        task_id = str(uuid.uuid4())
        message = self.publisher.message(INFER_TASK, task_id=task_id,
                                         kwargs={"spec": spec.model_dump(exclude_defaults=True)},
                                         queue=self.info.queue, priority=self.priority,
                                         shadow=f"map:{self.info.name}:{self.sent}")
        self.outstanding.append(_Chunk(task_id, len(items)))
        self.waiter.track(task_id, self)
        self.sent += 1
        return message

    def collect_oldest(self) -> list[Any]:
        chunk = self.outstanding[0]
        meta = self.waiter.wait([chunk.task_id], self.timeout_s).get(chunk.task_id)
        if meta is None:
            raise JobTimeout(f"a chunk of client.map did not finish within {self.timeout_s} s")
        # Forget first: a chunk whose result was read no longer counts as in flight, in Redis or here.
        self.publisher.app.backend.forget(chunk.task_id)
        self.outstanding.popleft()
        state, value = meta.get("status"), meta.get("result")
        if state == "REVOKED":
            raise JobCancelled(f"chunk {self.sent - len(self.outstanding) - 1} of client.map was cancelled")
        if state != "SUCCESS":
            raise error_from_meta(value)
        outputs = value["outputs"]
        if len(outputs) != chunk.n_items:
            raise JobError(f"a chunk returned {len(outputs)} outputs for {chunk.n_items} inputs")
        return [decode_output(output) for output in outputs]

    def abandon(self) -> None:
        """Revoke and forget what is still in flight (the caller stopped iterating)."""
        ids = [chunk.task_id for chunk in self.outstanding]
        if not ids:
            return
        try:
            self.publisher.app.control.revoke(ids)
            for task_id in ids:
                self.publisher.app.backend.forget(task_id)
        except Exception:  # best effort: results expire with their TTL
            logger.warning("could not revoke %d chunks of stream %s", len(ids), self.stream_id, exc_info=True)
        self.outstanding.clear()


def check_window(chunk_size: int | None, max_in_flight: int) -> int:
    """The chunk size ``map`` will use; raises InvalidParams for a bad chunk size or window."""
    chunk_size = chunk_size or DEFAULT_CHUNK_SIZE
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise InvalidParams(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if not isinstance(max_in_flight, int) or max_in_flight < 1:
        raise InvalidParams(f"max_in_flight must be a positive integer, got {max_in_flight!r}")
    return chunk_size


def _progress_bar(enabled: bool, total: int | None, name: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="items", desc=name, dynamic_ncols=True)


def stream(publisher: Publisher, waiter: ResultWaiter, access: RedisAccess, info: DeploymentInfo, iterable: Any, *,
           params: dict[str, Any], chunk_size: int, max_in_flight: int, progress: bool, timeout_s: float | None,
           column: str | None, priority: int | None, model: str | None, revision: str | None) -> Iterator[Any]:
    """Implementation of :meth:`producers.client.FleetClient.map`, once its arguments are checked."""
    run = _Stream(publisher, waiter, info, params=params, chunk_size=chunk_size, max_in_flight=max_in_flight,
                  timeout_s=timeout_s, priority=priority, model=model, revision=revision)
    bar = _progress_bar(progress, _length(iterable), info.name)
    source = iter(_items(iterable, column))
    offset = 0
    exhausted = False
    started = time.monotonic()
    try:
        while True:
            messages = []
            while not exhausted and len(run.outstanding) < max_in_flight:
                items = []
                for item in source:
                    items.append(item)
                    if len(items) == chunk_size:
                        break
                if len(items) < chunk_size:
                    exhausted = True
                if items:
                    messages.append(access.call(run.message, items, offset))
                    offset += len(items)
            # Every chunk that can go out now goes in one round trip.
            access.call(publisher.publish, messages)
            if not run.outstanding:
                break
            outputs = access.call(run.collect_oldest)
            if bar is not None:
                bar.update(len(outputs))
            yield from outputs
    finally:
        run.abandon()
        if bar is not None:
            bar.close()
        logger.debug("stream %s: %d inputs in %.2f s", run.stream_id, offset, time.monotonic() - started)
