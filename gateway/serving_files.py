"""``/v1/files``: upload, list, read and delete the files batches read and write (stored by :mod:`gateway.files`)."""

from __future__ import annotations

import asyncio

from fastapi import UploadFile

from gateway.batch_protocol import FileDeleted, FileObject, FilePurpose, ListPage
from gateway.errors import ApiError
from gateway.files import LIST_LIMIT
from gateway.state import GatewayState
from producers.errors import PayloadTooLarge

READ_CHUNK_BYTES = 1 << 20
"""Bytes read from an upload at a time, so a file over the cap is refused without reading it all."""


def _not_found(file_id: str) -> ApiError:
    return ApiError(404, "NotFound", f"no file {file_id!r}", param="file_id")


async def upload(state: GatewayState, file: UploadFile, purpose: str) -> FileObject:
    """Store an uploaded JSONL file (``purpose="batch"``), up to ``[batches] max_file_bytes``."""
    if purpose != FilePurpose.BATCH.value:
        raise ApiError(400, "InvalidInput", f"purpose must be 'batch', not {purpose!r}", param="purpose")
    limit = state.config.batches.max_file_bytes
    parts, size = [], 0
    while chunk := await file.read(READ_CHUNK_BYTES):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the file passed {limit} bytes, the most this gateway takes "
                                  "([batches] max_file_bytes)")
        parts.append(chunk)
    return await asyncio.to_thread(state.files.put, b"".join(parts), filename=file.filename or "upload.jsonl",
                                   purpose=FilePurpose.BATCH)


async def retrieve(state: GatewayState, file_id: str) -> FileObject:
    """A file's metadata."""
    meta = await asyncio.to_thread(state.files.get, file_id)
    if meta is None:
        raise _not_found(file_id)
    return meta


async def content(state: GatewayState, file_id: str) -> bytes:
    """A file's bytes."""
    data = await asyncio.to_thread(state.files.content, file_id)
    if data is None:
        raise _not_found(file_id)
    return data


async def delete(state: GatewayState, file_id: str) -> FileDeleted:
    """Remove a file."""
    if not await asyncio.to_thread(state.files.delete, file_id):
        raise _not_found(file_id)
    return FileDeleted(id=file_id)


async def list_files(state: GatewayState, purpose: str | None, after: str | None, limit: int,
                     order: str) -> ListPage:
    """A page of files, newest first unless ``order="asc"``."""
    files, more = await asyncio.to_thread(state.files.list, purpose=purpose, after=after,
                                          limit=min(limit, LIST_LIMIT), newest_first=order != "asc")
    return ListPage(data=files, first_id=files[0].id if files else None, last_id=files[-1].id if files else None,
                    has_more=more)
