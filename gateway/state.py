"""What every request handler shares: the fleet client and the gateway's settings."""

from __future__ import annotations

from dataclasses import dataclass

from typing import Any

from config.models import Deployment, FleetConfig, GatewaySettings
from gateway.batch_store import BatchStore
from gateway.files import FileStore
from gateway.metrics import GatewayMetrics
from producers.client import FleetClient
from producers.errors import JobTimeout
from producers.job import Job


@dataclass(frozen=True)
class JobPlan:
    """What one OpenAI request asks of the fleet: the deployment, and the job's inputs and call params.

    Each ``serving_*`` module builds it (``plan``) and turns the job's result into
    the response (``respond``); the online route and the batch runner share both.
    """

    deployment: str
    inputs: list[Any]
    params: dict[str, Any]
    stream: bool = False
    """Whether the caller reads the text as it is generated (an SSE response)."""


@dataclass
class GatewayState:
    """The fleet client, the settings and metrics of one gateway app (no per-request state)."""

    client: FleetClient
    config: FleetConfig
    metrics: GatewayMetrics
    files: FileStore | None = None
    """Uploaded and batch output files (``/v1/files``)."""
    batches: BatchStore | None = None
    """Batch records and their lines (``/v1/batches``)."""

    @property
    def settings(self) -> GatewaySettings:
        """The ``[gateway]`` table."""
        return self.config.gateway

    @property
    def max_body_bytes(self) -> int:
        """The request body cap: ``[gateway].max_body_bytes`` or ``[limits].max_payload_bytes``."""
        return self.settings.max_body_bytes or self.config.limits.max_payload_bytes

    @property
    def max_inputs(self) -> int:
        """Most inputs per request: ``[gateway].max_inputs_per_request`` or ``[limits].max_inputs_per_job``."""
        return self.settings.max_inputs_per_request or self.config.limits.max_inputs_per_job

    def clamp_wait(self, wait_s: float | None) -> float:
        """A requested wait, within ``[0, max_wait_s]``."""
        return min(max(0.0, wait_s or 0.0), self.settings.max_wait_s)

    def deployment_config(self, name: str) -> Deployment | None:
        """This config's deployment ``name``, if the gateway's config lists it (for its gateway options)."""
        for deployment in self.config.deployments:
            if deployment.name == name:
                return deployment
        return None

    async def submit(self, plan: JobPlan) -> Job:
        """Enqueue ``plan`` as an interactive job."""
        return await self.client.asubmit(deployment=plan.deployment, inputs=plan.inputs, params=plan.params,
                                         stream=plan.stream)

    async def output_within_max_wait(self, job: Job) -> Any:
        """The job's output; past ``max_wait_s`` the job is cancelled (nobody waits for it) and JobTimeout raised."""
        try:
            return await job.aresult(timeout=self.settings.max_wait_s)
        except JobTimeout:
            status = await job.astatus()
            if status.state.value in ("PENDING", "RUNNING"):
                await job.acancel()
                raise JobTimeout(f"job {job.id} did not finish within the gateway's max_wait_s "
                                 f"({self.settings.max_wait_s:g} s); it was cancelled") from None
            raise
