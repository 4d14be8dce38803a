"""pipefleet's client library: what web backends import. Never imports torch or transformers."""

from producers.client import FleetClient
from producers.errors import (ChunkFailed, ConfigError, DeadLettered, FleetUnavailable, InvalidInput, InvalidParams,
                              JobCancelled, JobError, JobRejected, JobTimeout, MediaError, OutOfMemory,
                              PayloadTooLarge, PipefleetError, UnknownDeployment, UnsafeURL)
from producers.job import Job
from producers.pipeline import FleetPipeline, pipeline
from producers.redis_clients import RedisOptions
from producers.requests import JobRequest
from producers.schemas import DeploymentInfo, EventKind, JobEvent, JobState, JobStatus

__all__ = [
    "ChunkFailed",
    "ConfigError",
    "DeadLettered",
    "DeploymentInfo",
    "EventKind",
    "FleetClient",
    "FleetPipeline",
    "FleetUnavailable",
    "InvalidInput",
    "InvalidParams",
    "Job",
    "JobCancelled",
    "JobError",
    "JobEvent",
    "JobRejected",
    "JobRequest",
    "JobState",
    "JobStatus",
    "JobTimeout",
    "MediaError",
    "OutOfMemory",
    "PayloadTooLarge",
    "PipefleetError",
    "RedisOptions",
    "UnknownDeployment",
    "UnsafeURL",
    "pipeline",
]
