"""The one error hierarchy of pipefleet.

::

    PipefleetError                 root of everything pipefleet raises
    ├── ConfigError                the fleet config file or environment is invalid
    ├── FleetUnavailable           Redis cannot be reached, or refuses our credentials
    │   └── WriteFailed            a worker's result or ack write was refused past redis_write_retry_s
    ├── JobRejected                the job was refused before it ran
    │   ├── UnknownDeployment      no live deployment serves this task/model/name
    │   ├── InvalidInput           inputs have the wrong shape, type or content
    │   ├── InvalidParams          call params the pipeline or the limits refuse
    │   ├── PayloadTooLarge        too many inputs, or too many bytes
    │   ├── MediaError             an image/audio input could not be fetched or decoded
    │   └── UnsafeURL              a URL the allowlist or the SSRF rules refuse (webhooks)
    ├── JobError                   the job ran on a worker and failed there
    │   ├── OutOfMemory            failed even at batch size 1 after OOM back-off
    │   ├── ChunkFailed            one chunk of a chunked job failed
    │   └── DeadLettered           its message could not be run (poison) and was dead-lettered
    ├── JobTimeout                 the job did not finish within its deadline
    └── JobCancelled               the job was cancelled before it finished

Errors raised on a worker travel to the client by class name and message,
and the client raises the same class with the same message.
"""

from __future__ import annotations


class PipefleetError(Exception):
    """Root of every error pipefleet raises."""


class ConfigError(PipefleetError):
    """The fleet config file or the ``PIPEFLEET_*`` environment is invalid."""


class FleetUnavailable(PipefleetError):
    """Redis cannot be reached, or it refused the credentials."""


class WriteFailed(FleetUnavailable):
    """Redis refused a result or ack write for longer than ``redis_write_retry_s``; the message names it."""


class JobRejected(PipefleetError):
    """The job was refused before it ran: fix the request and resubmit."""


class UnknownDeployment(JobRejected):
    """No live deployment serves the requested task, model or name."""


class InvalidInput(JobRejected):
    """The inputs have the wrong shape, type or content."""


class InvalidParams(JobRejected):
    """The call params are refused by the pipeline or by the fleet's limits."""


class PayloadTooLarge(JobRejected):
    """The job carries more inputs or more bytes than the limits allow."""


class MediaError(JobRejected):
    """An image or audio input could not be fetched or decoded."""


class UnsafeURL(JobRejected):
    """A URL the allowlist or the SSRF rules refuse (a webhook to a private address, a host not listed)."""


class JobError(PipefleetError):
    """The job ran on a worker and failed there; the message is the worker's."""


class OutOfMemory(JobError):
    """The job ran out of memory even at batch size 1."""


class ChunkFailed(JobError):
    """One chunk of a chunked job failed; the message names the chunk and item."""


class DeadLettered(JobError):
    """The job's message could not be run (unknown task, malformed, undecodable) and was dead-lettered."""


class JobTimeout(PipefleetError):
    """The job did not finish within its deadline."""


class JobCancelled(PipefleetError):
    """The job was cancelled before it finished."""


#: Class name -> class, used to rebuild a worker's error on the client.
ERRORS_BY_NAME: dict[str, type[PipefleetError]] = {
    cls.__name__: cls
    for cls in (
        PipefleetError, ConfigError, FleetUnavailable, WriteFailed, JobRejected, UnknownDeployment,
        InvalidInput, InvalidParams, PayloadTooLarge, MediaError, UnsafeURL, JobError, OutOfMemory,
        ChunkFailed, DeadLettered, JobTimeout, JobCancelled,
    )
}
