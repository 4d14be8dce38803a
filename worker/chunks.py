"""The error a failed chunk raises, naming the chunk and the item within its job.

A chunk is an ``infer`` task whose :class:`~producers.schemas.JobSpec` has a
``chunk_index``; its ``job_id`` names the parent job (a chord, or a stream
of ``client.map``). Its progress is counted by :meth:`worker.events.EventWriter.progress`.
"""

from __future__ import annotations

import re

from producers.errors import ChunkFailed, JobCancelled, JobTimeout, PipefleetError
from producers.schemas import JobSpec

_INPUT_INDEX = re.compile(r"^input (\d+)\b")


def chunk_failed(job: JobSpec, error: BaseException, *, item: int | None = None) -> BaseException:
    """The error a failed chunk raises: :class:`ChunkFailed` naming the chunk and the item.

    ``item`` is the failing item's index within the chunk when known. Cancels
    and timeouts keep their own types.
    """
    if isinstance(error, (JobCancelled, JobTimeout, ChunkFailed)) or job.chunk_index is None:
        return error
    kind = type(error).__name__
    where = f"chunk {job.chunk_index}"
    if item is not None:
        where += f" failed at item {job.offset + item}"
    else:
        # Validation names the item within the chunk ("input 3 has ..."); report it within the job.
        match = _INPUT_INDEX.match(str(error))
        where += f" failed at item {job.offset + int(match.group(1))}" if match else " failed"
    message = str(error) if isinstance(error, PipefleetError) else f"{error}"
    return ChunkFailed(f"{where}: {kind}: {message}")
