"""The naive baseline: one Celery task per sentence calling an already-loaded pipeline.

    celery -A benchmarks.naive_celery worker --pool solo      (or --pool prefork -c 2)

Broker and backend come from ``NAIVE_BROKER_URL`` / ``NAIVE_RESULT_BACKEND``;
the model from ``NAIVE_MODEL``.
"""

from __future__ import annotations

import os

from celery import Celery, signals

app = Celery("naive", broker=os.environ.get("NAIVE_BROKER_URL"), backend=os.environ.get("NAIVE_RESULT_BACKEND"))
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                worker_prefetch_multiplier=4, task_acks_late=False)

_pipeline = None


@signals.worker_process_init.connect
@signals.worker_init.connect
def _load(**_):
    global _pipeline
    if _pipeline is None:
        from transformers import pipeline

        _pipeline = pipeline("text-classification", model=os.environ["NAIVE_MODEL"])
        _pipeline("warm up")


@app.task(name="naive.classify")
def classify(text: str):
    """Classify one sentence with the pipeline loaded at start-up."""
    if _pipeline is None:
        _load()
    return _pipeline(text)
