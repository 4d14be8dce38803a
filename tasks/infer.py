"""The ``infer`` task: one job (or one chunk of a job) on one deployment, through Celery's own machinery.

Standalone jobs normally take the worker's hot path (:mod:`worker.hotpath`), which the task's Celery
strategy (:mod:`worker.strategy`) offers them to, and which runs the same steps (:mod:`worker.jobs`) for
many jobs at once. This task runs a
job that needs Celery's full request handling, such as a chunk of a chord, or a
message a stock Celery consumer hands over. It validates the job, hands its inputs
to the deployment's batcher and waits for its own outputs, so the job keeps its own
ack, result, revoke and Flower entry.
"""

from __future__ import annotations

import logging

from celery import states

from producers.constants import INFER_TASK
from worker.celery_app import app
from worker.chunks import chunk_failed
from worker.deadlines import wait_for_items
from worker.jobs import collect_outputs, finish_job, prepare_job
from worker.outcome import end_job, final_state, metric_state, revoked
from worker.runtime import get_runtime

logger = logging.getLogger(__name__)


@app.task(name=INFER_TASK, bind=True, acks_late=True, reject_on_worker_lost=True,
          Strategy="worker.strategy:infer_strategy")
def infer(self, spec: dict) -> dict:
    """Run one job's inputs through its deployment and return a :class:`ResultEnvelope`."""
    runtime = get_runtime()
    job_id = self.request.id
    deployment_name = spec.get("deployment") if isinstance(spec, dict) else None
    served = prepared = None
    try:
        try:
            prepared = prepare_job(runtime, spec, job_id)
            served = prepared.served
            futures = prepared.submit()
        finally:
            if isinstance(deployment_name, str):
                runtime.handed_over(deployment_name, job_id)
        wait_for_items(futures, prepared.deadline_mono)
        envelope = finish_job(prepared, collect_outputs(prepared, futures), runtime.worker_name)
    except Exception as error:
        state = final_state(error)
        if served is not None:
            served.metrics.observe_job(metric_state(state))
        if state == states.FAILURE and prepared is not None and prepared.job.chunk_index is not None:
            raise chunk_failed(prepared.job, error) from None
        error = end_job(prepared, error, describe=f"job {job_id} on {deployment_name}")
        if state == states.REVOKED:
            raise revoked(self.backend, job_id, self.request)
        raise error from None
    served.metrics.observe_job(metric_state(states.SUCCESS))
    job = prepared.job
    if job.chunk_index is not None:
        runtime.events.progress(job.job_id or job_id, job.chunk_index, envelope["n_items"])
    return envelope
