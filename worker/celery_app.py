"""The Celery app of the fleet, configured from the fleet config; ``tasks/`` registers its tasks on it.

The worker never imports ``tasks/``: Celery imports the task modules named in
:data:`TASK_MODULES` when its worker starts (its ``imports`` setting), so the
layers stay ``worker`` below ``tasks``.
"""

from __future__ import annotations

from celery import Celery

from config.models import FleetConfig
from producers.celery_app import celery_settings, worker_backend_url

TASK_MODULES = ("tasks.infer", "tasks.split", "tasks.assemble")
"""The modules that define the fleet's Celery tasks, imported by Celery at worker start."""

app = Celery("pipefleet", set_as_current=True)
"""The worker-side Celery app; tasks register on it, :func:`configure_app` sets it up."""


def configure_app(config: FleetConfig) -> Celery:
    """Apply the fleet's broker, result and reliability settings to :data:`app`."""
    app.conf.update(celery_settings(
        broker_url=config.broker_url,
        result_backend=worker_backend_url(config.result_backend),
        result_ttl_s=config.result_ttl_s,
        visibility_timeout_s=config.visibility_timeout_s,
        redis_options=config.redis_options(),
    ))
    app.conf.update(
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        task_track_started=False,
        worker_send_task_events=config.task_events,
        task_send_sent_event=config.task_events,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    app.conf.imports = TASK_MODULES
    return app
