"""File storage shared by every gateway replica: the bytes and the metadata live in Redis, with a TTL.

- ``pipefleet:file:<id>``: the :class:`FileObject` as JSON;
- ``pipefleet:file:<id>:bytes``: the content, one Redis string (Redis takes up to 512 MB in one
  string, its ``proto-max-bulk-len``; ``[batches] max_file_bytes`` is 200 MB by default, as OpenAI's);
- ``pipefleet:files``: ids scored by creation time, for listing.

Both keys expire after ``[batches] file_ttl_s``; a listed id whose keys expired is
dropped from the index when a listing meets it. Redis holds every byte in memory:
size ``maxmemory`` for the files in flight (inputs, plus outputs about as large).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from gateway.batch_protocol import FileObject, FilePurpose
from producers.constants import FILE_KEY_PREFIX, FILES_INDEX_KEY

LIST_LIMIT = 10_000
"""The most files one ``GET /v1/files`` lists, as OpenAI's ``limit`` allows."""


def new_file_id() -> str:
    """A fresh, unguessable file id."""
    return f"file-{uuid.uuid4().hex}"


def _meta_key(file_id: str) -> str:
    return f"{FILE_KEY_PREFIX}{file_id}"


def _bytes_key(file_id: str) -> str:
    return f"{FILE_KEY_PREFIX}{file_id}:bytes"


class FileStore:
    """Files in one Redis (the broker's), each kept ``ttl_s``."""

    def __init__(self, redis: Any, ttl_s: int) -> None:
        self.redis = redis
        self.ttl_s = ttl_s

    def put(self, content: bytes, *, filename: str, purpose: FilePurpose, file_id: str | None = None) -> FileObject:
        """Store ``content``; the same ``file_id`` again overwrites (how finalising twice stays one file)."""
        now = int(time.time())
        meta = FileObject(id=file_id or new_file_id(), bytes=len(content), created_at=now,
                          expires_at=now + self.ttl_s, filename=filename, purpose=purpose)
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(_bytes_key(meta.id), content, ex=self.ttl_s)
            pipe.set(_meta_key(meta.id), meta.model_dump_json(), ex=self.ttl_s)
            pipe.zadd(FILES_INDEX_KEY, {meta.id: time.time()})
            pipe.execute()
        return meta

    def get(self, file_id: str) -> FileObject | None:
        """The file's metadata, or None."""
        raw = self.redis.get(_meta_key(file_id))
        return FileObject.model_validate_json(raw) if raw else None

    def content(self, file_id: str) -> bytes | None:
        """The file's bytes, or None."""
        return self.redis.get(_bytes_key(file_id))

    def delete(self, file_id: str) -> bool:
        """Remove the file; True if it existed."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(_meta_key(file_id), _bytes_key(file_id))
            pipe.zrem(FILES_INDEX_KEY, file_id)
            removed, _ = pipe.execute()
        return bool(removed)

    def list(self, *, purpose: str | None, after: str | None, limit: int,
             newest_first: bool = True) -> tuple[list[FileObject], bool]:
        """One page of files (and whether more follow), after the file ``after``."""
        ids = [i.decode() for i in (self.redis.zrevrange(FILES_INDEX_KEY, 0, -1) if newest_first
                                    else self.redis.zrange(FILES_INDEX_KEY, 0, -1))]
        if after is not None and after in ids:
            ids = ids[ids.index(after) + 1:]
        page: list[FileObject] = []
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            for file_id, raw in zip(chunk, self.redis.mget([_meta_key(i) for i in chunk])):
                if raw is None:
                    self.redis.zrem(FILES_INDEX_KEY, file_id)
                    continue
                meta = FileObject.model_validate_json(raw)
                if purpose is None or meta.purpose.value == purpose:
                    page.append(meta)
                if len(page) > limit:
                    return page[:limit], True
        return page, False
