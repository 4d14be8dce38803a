"""The client's public surface is deliberate, and importing it stays light."""

from __future__ import annotations

import subprocess
import sys

import producers
from tests.fleet import REPO_ROOT

PUBLIC_NAMES = [
    "ChunkFailed", "ConfigError", "DeadLettered", "DeploymentInfo", "EventKind", "FleetClient", "FleetPipeline", "FleetUnavailable",
    "InvalidInput", "InvalidParams", "Job", "JobCancelled", "JobError", "JobEvent", "JobRejected", "JobRequest",
    "JobState", "JobStatus",
    "JobTimeout", "MediaError", "OutOfMemory", "PayloadTooLarge", "PipefleetError", "RedisOptions",
    "UnknownDeployment", "UnsafeURL",
    "pipeline",
]


def test_all_is_exactly_the_public_api():
    assert producers.__all__ == PUBLIC_NAMES
    assert sorted(producers.__all__) == producers.__all__


def test_every_error_derives_from_one_root():
    for name in producers.__all__:
        value = getattr(producers, name)
        if isinstance(value, type) and issubclass(value, Exception):
            assert issubclass(value, producers.PipefleetError)


def test_import_producers_does_not_load_torch_or_the_server_side():
    code = ("import sys, producers, producers.cli; "
            "print(sorted(m for m in ('torch', 'transformers', 'worker', 'tasks', 'config', 'numpy') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
