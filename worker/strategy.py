"""The ``infer`` task's Celery strategy: plain jobs take the hot path, everything else Celery's default strategy.

Celery turns each task message into work through its task's ``Strategy`` (``Task.start_strategy`` builds one
handler per task when the consumer starts; celery-batches uses the same seam). ``infer`` names
:func:`infer_strategy`, so the hot path is reached through Celery's own seam: the bulk consumer hands every
claimed message to ``consumer.strategies[task]`` as Celery's consumer does, and for ``infer`` that handler
offers the message to the hot path first (:meth:`worker.hotpath.HotPath.offer`); what it refuses (chunks of
chords, ETAs, expired or revoked messages, callbacks) runs through Celery's default strategy, with Celery's
full request semantics. A consumer with no hot path (a stock ``celery worker``) gets the default strategy.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Callable

from celery.worker.strategy import default

logger = logging.getLogger(__name__)

_hot_paths: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


def serve_hot_path(celery_consumer: Any, hot_path: Any) -> None:
    """Route the plain ``infer`` jobs that ``celery_consumer`` hands to its strategies into ``hot_path``."""
    _hot_paths[celery_consumer] = hot_path


def infer_strategy(task: Any, app: Any, consumer: Any, **options: Any) -> Callable[..., Any]:
    """Celery's strategy for ``infer``: the consumer's hot path first, Celery's default for what it refuses."""
    celery_handler = default(task, app, consumer, **options)

    def handle(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kwargs: Any) -> Any:
        hot_path = _hot_paths.get(consumer)
        if hot_path is not None:
            try:
                if hot_path.offer(message):
                    return None
            except Exception:  # raised before the hot path took the job: Celery runs it
                logger.exception("hot path refused message %s; handing it to Celery", message.delivery_tag)
        return celery_handler(message, body, ack, reject, callbacks, **kwargs)

    return handle
