"""``/v1/batches``: create, read, list and cancel batches; :mod:`gateway.batch_runner` does the work."""

from __future__ import annotations

import asyncio

from gateway.batch_protocol import (FINAL_STATUSES, Batch, BatchCreateRequest, BatchRecord, BatchStatus,
                                    FilePurpose, ListPage)
from gateway.batch_store import new_batch_id, now_s
from gateway.errors import ApiError
from gateway.state import GatewayState

LIST_MAX = 100
"""The largest ``limit`` of ``GET /v1/batches``, as OpenAI's."""


def _not_found(batch_id: str) -> ApiError:
    return ApiError(404, "NotFound", f"no batch {batch_id!r}", param="batch_id")


def _present(state: GatewayState, record: BatchRecord) -> Batch:
    """The object as clients see it now: live counts while it runs, ``cancelling`` once a cancel was asked."""
    if record.status not in FINAL_STATUSES:
        record.request_counts = state.batches.counts(record)
        asked = state.batches.cancel_requested(record.id)
        if asked and record.status in (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS):
            record.status, record.cancelling_at = BatchStatus.CANCELLING, asked
    return record.public()


async def create(state: GatewayState, request: BatchCreateRequest) -> Batch:
    """Accept a batch over an uploaded file; it starts ``validating`` and a runner takes it from there."""
    meta = await asyncio.to_thread(state.files.get, request.input_file_id)
    if meta is None:
        raise ApiError(404, "NotFound", f"no file {request.input_file_id!r}", param="input_file_id")
    if meta.purpose is not FilePurpose.BATCH:
        raise ApiError(400, "InvalidInput", f"file {meta.id!r} has purpose {meta.purpose.value!r}, not 'batch'",
                       param="input_file_id")
    now = now_s()
    record = BatchRecord(id=new_batch_id(), endpoint=request.endpoint, input_file_id=request.input_file_id,
                         completion_window=request.completion_window, created_at=now,
                         expires_at=now + int(state.config.batches.completion_window_s), metadata=request.metadata)
    await asyncio.to_thread(state.batches.create, record)
    return record.public()


async def retrieve(state: GatewayState, batch_id: str) -> Batch:
    """The batch now."""
    record = await asyncio.to_thread(state.batches.get, batch_id)
    if record is None:
        raise _not_found(batch_id)
    return await asyncio.to_thread(_present, state, record)


async def cancel(state: GatewayState, batch_id: str) -> Batch:
    """Ask for the batch to stop: unstarted lines never run, finished ones stay in the output file."""
    record = await asyncio.to_thread(state.batches.get, batch_id)
    if record is None:
        raise _not_found(batch_id)
    if record.status in (BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED, BatchStatus.FINALIZING):
        raise ApiError(409, "Conflict", f"batch {batch_id!r} is {record.status.value}; it cannot be cancelled")
    if record.status not in (BatchStatus.CANCELLED, BatchStatus.CANCELLING):
        await asyncio.to_thread(state.batches.request_cancel, batch_id)
    return await asyncio.to_thread(_present, state, record)


async def list_batches(state: GatewayState, after: str | None, limit: int) -> ListPage:
    """Batches newest first, ``limit`` at a time after the batch ``after``."""
    if not 1 <= limit <= LIST_MAX:
        raise ApiError(400, "InvalidInput", f"limit must be from 1 to {LIST_MAX}", param="limit")

    def page() -> ListPage:
        records, more = state.batches.page(after, limit)
        data = [_present(state, record) for record in records]
        return ListPage(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None,
                        has_more=more)

    return await asyncio.to_thread(page)
