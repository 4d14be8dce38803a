"""Advances batches: every gateway runs one :class:`BatchRunner`, and whoever holds a batch's lease moves it on.

The lines run on the fleet, as ordinary jobs at ``[batches] priority`` (9: any
interactive request overtakes them), at most ``max_in_flight`` per batch at once
(by default one batch of the deployment), so a batch never sits in front of
online traffic by more than that. The gateway
only submits lines, reads results and writes files; it runs no model.

One step of the holder (``advance``):

1. ``validating``: read the input file, store its valid lines, write the invalid
   ones to the error file (``…:err``), move to ``in_progress``; or fail the batch;
2. ``in_progress``: submit the next lines as earlier ones end, recording them as
   pending together with the cursor *before* publishing, each under a job id derived
   from the batch id and position; then answer the lines whose job has a stored
   result, through the online route's own ``respond`` (so each body is what the
   route returns);
3. once every line is answered: write the output and error files and the final
   status, queue the webhook event, retire the batch.

Every write is idempotent (answers by line number, files and events under
derived ids), so a gateway killed anywhere leaves nothing another cannot redo.
A new holder first resubmits pending lines that have no result (same job ids:
a line may run twice, it is answered once), since the dead one may have
recorded them without publishing them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import socket
import uuid
from typing import Any

from config.models import BatchSettings, WebhookSettings
from gateway import serving_chat, serving_completion, serving_embedding
from gateway.batch_lines import (FileInvalid, error_line, output_line, parse_file, request_for,
                                 response_error_line)
from gateway.batch_protocol import (FINAL_STATUSES, BatchError, BatchErrors, BatchRecord, BatchStatus,
                                    FilePurpose)
from gateway.batch_store import BatchStore, LeaseLost, line_job_id, now_s
from gateway.errors import describe, error_response_parts
from gateway.files import FileStore
from gateway.state import GatewayState
from producers.requests import JobRequest
from producers.webhooks import BatchEventType, enqueue, event_body, event_id_for

logger = logging.getLogger(__name__)

SERVING = {"/v1/completions": serving_completion, "/v1/chat/completions": serving_chat,
           "/v1/embeddings": serving_embedding}
"""Each batch endpoint's online serving module: its ``plan`` and ``respond`` build every line's job and answer."""

ANSWER_CONCURRENCY = 64
"""Lines answered at once in one step (each reads its result, usage and final event)."""

FIRST_WINDOW = 8
"""Lines submitted before the batch's deployment (and so its default window) is known."""

LINES_PAGE = 1000
"""Lines read or written per Redis call when storing or draining a batch."""

_EVENTS = {BatchStatus.COMPLETED: BatchEventType.COMPLETED, BatchStatus.FAILED: BatchEventType.FAILED,
           BatchStatus.CANCELLED: BatchEventType.CANCELLED, BatchStatus.EXPIRED: BatchEventType.EXPIRED}


def _derived_file_id(batch_id: str, part: str) -> str:
    return "file-" + hashlib.sha256(f"{batch_id}/{part}".encode()).hexdigest()[:32]


class BatchRunner:
    """One gateway's share of the batch work (see the module docstring)."""

    def __init__(self, state: GatewayState, store: BatchStore, files: FileStore, settings: BatchSettings,
                 webhooks: WebhookSettings) -> None:
        self.state = state
        self.store = store
        self.files = files
        self.settings = settings
        self.webhooks = webhooks
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
        """This runner's lease token: host and pid first, so an operator can tell who holds a batch."""
        self._unsure: set[str] = set()  # batches whose last submission may not have reached the broker
        self._windows: dict[str, int] = {}  # batch id -> lines in flight at most

    async def run(self) -> None:
        """Advance held batches until cancelled; survives any error of one step."""
        while True:
            waited = False
            try:
                waited = await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("batch runner step failed; retrying")
            if not waited:
                await asyncio.sleep(self.settings.poll_interval_s)

    async def tick(self) -> bool:
        """One pass over the active batches; True if it already waited for a result."""
        waited = False
        for batch_id in await asyncio.to_thread(self.store.active):
            held = await asyncio.to_thread(self.store.hold, batch_id, self.token, self.settings.lease_s)
            if not held:
                continue
            renewal = asyncio.create_task(self._renew(batch_id))
            try:
                waited = await self.advance(batch_id, taken=held == 2 or batch_id in self._unsure) or waited
            except LeaseLost:
                logger.warning("lost the lease on batch %s mid-step; its new holder carries on", batch_id)
            except Exception:
                self._unsure.add(batch_id)
                raise
            finally:
                renewal.cancel()
        return waited

    async def _renew(self, batch_id: str) -> None:
        """Keep the lease through a long step (validating or finalising a large file)."""
        while True:
            await asyncio.sleep(self.settings.lease_s / 3)
            await asyncio.to_thread(self.store.hold, batch_id, self.token, self.settings.lease_s)

    async def advance(self, batch_id: str, *, taken: bool = False) -> bool:
        """One step of a batch this gateway holds; True if it waited for a line's result."""
        record = await asyncio.to_thread(self.store.get, batch_id)
        if record is None or record.status in FINAL_STATUSES:
            if record is not None:
                await asyncio.to_thread(self.store.retire, record)
            else:
                await asyncio.to_thread(self.store.forget, batch_id)
            return False
        now = now_s()
        if record.status in (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS):
            if await asyncio.to_thread(self.store.cancel_requested, batch_id):
                record.status, record.cancelling_at = BatchStatus.CANCELLING, now
                await asyncio.to_thread(self._save, record)
            elif record.expires_at is not None and now >= record.expires_at:
                await self.stop(record, BatchStatus.EXPIRED)
                return False
        if record.status is BatchStatus.CANCELLING:
            await self.stop(record, BatchStatus.CANCELLED)
            return False
        if record.status is BatchStatus.VALIDATING:
            await self.validate(record)
            return False
        if record.status is BatchStatus.FINALIZING:
            await self.finalize(record, BatchStatus.COMPLETED)
            return False
        if taken:
            await self.resubmit_unpublished(record)
            self._unsure.discard(batch_id)
        # Refill first, counting lines whose job has ended as free, so the fleet gets the next lines one
        # MGET after a forward pass; answering the finished ones (reading results, events) comes after.
        seen = await self.finished(record)
        await self.refill(record, in_flight=len(seen[0]) - len(seen[2]))
        await self.collect(record, seen=seen)
        pending = await asyncio.to_thread(self.store.pending, batch_id)
        if not pending and record.cursor >= record.lines:
            record.status, record.finalizing_at = BatchStatus.FINALIZING, now_s()
            await asyncio.to_thread(self._save, record)
            await self.finalize(record, BatchStatus.COMPLETED)
            return False
        if not pending:  # every line just read was answered at once (refused): read on next step
            return False
        # Sleep until the oldest pending line has its result (pub/sub), or one poll.
        first = line_job_id(batch_id, min(pending))
        await self.state.client.waiter.wait_async([first], self.settings.poll_interval_s)
        return True

    async def validate(self, record: BatchRecord) -> None:
        """Read the input file: store the valid lines, answer the invalid ones, or fail the batch."""
        content = await asyncio.to_thread(self.files.content, record.input_file_id)
        if content is None:
            await self.fail(record, [BatchError(code="file_not_found", param="input_file_id", message=(
                f"input file {record.input_file_id!r} no longer exists"))])
            return
        try:
            parsed = await asyncio.to_thread(parse_file, record.id, content, record.endpoint,
                                             max_lines=self.settings.max_lines)
        except FileInvalid as invalid:
            await self.fail(record, invalid.errors)
            return

        def store() -> None:
            redis, lines_key = self.store.redis, self.store.key(record.id, "lines")
            redis.delete(lines_key)  # a holder that died mid-way may have left part of it
            for start in range(0, len(parsed.valid), LINES_PAGE):
                redis.rpush(lines_key, *[json.dumps(line) for line in parsed.valid[start:start + LINES_PAGE]])
            redis.expire(lines_key, self.store.ttl_s)
            if parsed.errors:
                redis.hset(self.store.key(record.id, "err"), mapping=parsed.errors)

        await asyncio.to_thread(store)
        record.lines, record.cursor = len(parsed.valid), 0
        record.request_counts.total = parsed.total
        record.status, record.in_progress_at = BatchStatus.IN_PROGRESS, now_s()
        await asyncio.to_thread(self._save, record)

    async def refill(self, record: BatchRecord, *, in_flight: int) -> None:
        """Submit the next lines, up to the batch's window of lines in flight."""
        room = self._window(record.id) - in_flight
        if room <= 0 or record.cursor >= record.lines:
            return
        raws = await asyncio.to_thread(self.store.redis.lrange, self.store.key(record.id, "lines"),
                                       record.cursor, record.cursor + room - 1)
        lines = {record.cursor + offset: json.loads(raw) for offset, raw in enumerate(raws)}
        jobs, errors = await self._plan(record, lines)

        def mark(pipe: Any) -> None:
            # Pending and the cursor move together, before publishing: a holder that dies after this
            # knows every line it may have sent; the next one resubmits those without a result.
            if jobs:
                pipe.hset(self.store.key(record.id, "pending"),
                          mapping={position: json.dumps(lines[position]) for position, _ in jobs})
            if errors:
                pipe.hset(self.store.key(record.id, "err"), mapping=errors)
            pipe.set(self.store.key(record.id), record.model_copy(update={"cursor": record.cursor + len(lines)})
                     .model_dump_json(), ex=self.store.ttl_s)

        await asyncio.to_thread(self.store.guarded, record.id, self.token, mark)
        record.cursor += len(lines)
        await self._publish(record, jobs)
        if jobs and record.id not in self._windows and self.settings.max_in_flight is None:
            info = await asyncio.to_thread(self.state.client.resolve, deployment=jobs[0][1].deployment)
            self._windows[record.id] = info.max_batch_size

    def _save(self, record: BatchRecord) -> None:
        """Write the record, only while this gateway holds the batch."""
        self.store.guarded(record.id, self.token, lambda pipe: pipe.set(
            self.store.key(record.id), record.model_dump_json(), ex=self.store.ttl_s))

    def _window(self, batch_id: str) -> int:
        return self.settings.max_in_flight or self._windows.get(batch_id, FIRST_WINDOW)

    async def _plan(self, record: BatchRecord, lines: dict[int, dict[str, Any]]) -> tuple[list, dict[int, str]]:
        serving = SERVING[record.endpoint]
        jobs, errors = [], {}
        for position, line in lines.items():
            try:
                plan = await serving.plan(self.state, request_for(record.endpoint, line["body"]))
            except Exception as error:  # the online route would answer this error; so does the line
                errors[line["line"]] = self._refusal(record, line, error, None)
                continue
            jobs.append((position, plan))
        return jobs, errors

    async def _publish(self, record: BatchRecord, jobs: list) -> None:
        requests = [JobRequest(deployment=plan.deployment, inputs=plan.inputs, params=plan.params,
                               priority=self.settings.priority, job_id=line_job_id(record.id, position))
                    for position, plan in jobs]
        if requests:
            await self.state.client.asubmit_many(requests)

    async def resubmit_unpublished(self, record: BatchRecord) -> None:
        """Submit again the pending lines that have no result yet (a dead holder may not have sent them)."""
        pending = await asyncio.to_thread(self.store.pending, record.id)
        metas = await self._metas(record.id, list(pending))
        missing = {position: line for position, line in pending.items() if metas.get(position) is None}
        jobs, errors = await self._plan(record, missing)
        if errors:
            await asyncio.to_thread(self._answer_errors, record, errors,
                                    [position for position in missing if position not in dict(jobs)])
        await self._publish(record, jobs)

    def _answer_errors(self, record: BatchRecord, errors: dict[int, str], positions: list[int]) -> None:
        with self.store.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.store.key(record.id, "err"), mapping=errors)
            if positions:
                pipe.hdel(self.store.key(record.id, "pending"), *positions)
            pipe.execute()

    async def _metas(self, batch_id: str, positions: list[int]) -> dict[int, dict[str, Any] | None]:
        backend = self.state.client.celery.backend

        def read() -> dict[int, dict[str, Any] | None]:
            raws = backend.client.mget([backend.get_key_for_task(line_job_id(batch_id, p)) for p in positions])
            return {p: backend.decode(raw) if raw is not None else None for p, raw in zip(positions, raws)}

        return await asyncio.to_thread(read) if positions else {}

    async def finished(self, record: BatchRecord) -> tuple[dict[int, dict], dict[int, Any], list[int]]:
        """The pending lines, their stored results, and the positions whose job has ended."""
        pending = await asyncio.to_thread(self.store.pending, record.id)
        metas = await self._metas(record.id, list(pending))
        done = [position for position, meta in metas.items()
                if meta is not None and meta.get("status") in ("SUCCESS", "FAILURE", "REVOKED")]
        return pending, metas, done

    async def collect(self, record: BatchRecord, *, stopping: str | None = None,
                      seen: tuple[dict[int, dict], dict[int, Any], list[int]] | None = None) -> int:
        """Answer every pending line whose job has a result; with ``stopping``, every pending line.

        ``stopping`` is the error code of lines that did not succeed before a cancel
        or an expiry (``batch_cancelled``, ``batch_expired``); ``seen`` is what
        :meth:`finished` just read.
        """
        pending, metas, done = seen or await self.finished(record)
        out: dict[int, str] = {}
        err: dict[int, str] = {}
        limit = asyncio.Semaphore(ANSWER_CONCURRENCY)

        async def answer(position: int) -> None:
            line = pending[position]
            if stopping and metas[position].get("status") != "SUCCESS":
                err[line["line"]] = error_line(record.id, line["line"], line["custom_id"], stopping,
                                               f"the batch was {stopping.removeprefix('batch_')} before this "
                                               "request finished")
                return
            async with limit:
                await self._answer(record, position, line, out, err)

        await asyncio.gather(*(answer(position) for position in done))
        if stopping:
            for position in set(pending) - set(done):
                line = pending[position]
                err[line["line"]] = error_line(record.id, line["line"], line["custom_id"], stopping,
                                               f"the batch was {stopping.removeprefix('batch_')} before this "
                                               "request ran")
            done = list(pending)
        if done:
            def store() -> None:
                with self.store.redis.pipeline(transaction=True) as pipe:
                    if out:
                        pipe.hset(self.store.key(record.id, "out"), mapping=out)
                    if err:
                        pipe.hset(self.store.key(record.id, "err"), mapping=err)
                    pipe.hdel(self.store.key(record.id, "pending"), *done)
                    pipe.execute()

            await asyncio.to_thread(store)
        return len(done)

    async def _answer(self, record: BatchRecord, position: int, line: dict[str, Any], out: dict[int, str],
                      err: dict[int, str]) -> None:
        job_id = line_job_id(record.id, position)
        try:
            request = request_for(record.endpoint, line["body"])
            response = await SERVING[record.endpoint].respond(self.state, request, self.state.client.job(job_id))
        except Exception as error:  # the route's error answer, as the online route would send it
            err[line["line"]] = self._refusal(record, line, error, job_id)
            return
        out[line["line"]] = output_line(record.id, line["line"], line["custom_id"], response.model_dump(mode="json"),
                                        job_id)

    def _refusal(self, record: BatchRecord, line: dict[str, Any], error: Exception, job_id: str | None) -> str:
        status, error_type, message, param = describe(error)
        status, body = error_response_parts(record.endpoint, status, error_type, message, param)
        return response_error_line(record.id, line["line"], line["custom_id"], status, body, job_id)

    async def stop(self, record: BatchRecord, final: BatchStatus) -> None:
        """Cancel or expire: unstarted lines never run, finished ones are kept, the rest go to the error file."""
        code = "batch_cancelled" if final is BatchStatus.CANCELLED else "batch_expired"
        pending = await asyncio.to_thread(self.store.pending, record.id)
        if pending:
            await asyncio.to_thread(self.state.client.cancel_many,
                                    [line_job_id(record.id, position) for position in pending])
        await self.collect(record, stopping=code)

        def drain() -> None:
            lines_key = self.store.key(record.id, "lines")
            while record.cursor < record.lines:
                raws = self.store.redis.lrange(lines_key, record.cursor, record.cursor + LINES_PAGE - 1)
                if not raws:
                    break
                errors = {}
                for raw in raws:
                    line = json.loads(raw)
                    errors[line["line"]] = error_line(record.id, line["line"], line["custom_id"], code,
                                                      f"the batch was {code.removeprefix('batch_')} before this "
                                                      "request ran")
                self.store.redis.hset(self.store.key(record.id, "err"), mapping=errors)
                record.cursor += len(raws)
                self._save(record)

        await asyncio.to_thread(drain)
        await self.finalize(record, final)

    async def fail(self, record: BatchRecord, errors: list[BatchError]) -> None:
        """The file cannot run: ``failed``, with ``errors`` naming the line."""
        record.status, record.failed_at = BatchStatus.FAILED, now_s()
        record.errors = BatchErrors(data=errors)
        await asyncio.to_thread(self._final, record)

    async def finalize(self, record: BatchRecord, final: BatchStatus) -> None:
        """Write the output and error files, the final status, and the webhook event (all idempotent)."""
        await asyncio.to_thread(self._write_files, record)
        now = now_s()
        record.status = final
        if final is BatchStatus.COMPLETED:
            record.completed_at = now
        elif final is BatchStatus.CANCELLED:
            record.cancelled_at = now
        elif final is BatchStatus.EXPIRED:
            record.expired_at = now
        await asyncio.to_thread(self._final, record)

    def _write_files(self, record: BatchRecord) -> None:
        record.request_counts = self.store.counts(record)
        for part, attribute in (("out", "output_file_id"), ("err", "error_file_id")):
            answers = self.store.answers(record.id, part)
            if not answers and part == "err":
                continue
            content = b"".join(value + b"\n" for _, value in answers)
            suffix = "output" if part == "out" else "error"
            meta = self.files.put(content, filename=f"{record.id}_{suffix}.jsonl", purpose=FilePurpose.BATCH_OUTPUT,
                                  file_id=_derived_file_id(record.id, part))
            setattr(record, attribute, meta.id)

    def _final(self, record: BatchRecord) -> None:
        self._save(record)
        if self.webhooks.secret:
            event_type = _EVENTS[record.status].value
            event_id = event_id_for("batch", record.id, event_type)
            body = event_body(event_id, event_type, {"id": record.id})
            for url in self.webhooks.endpoints:
                enqueue(self.store.redis, url, event_id, body, keep_s=self.webhooks.max_retry_s + 86_400)
        self.store.retire(record)
        self._windows.pop(record.id, None)
        logger.info("batch %s %s: %s", record.id, record.status.value, record.request_counts.model_dump())
