"""Every private part of Celery pipefleet uses, in one place.

The hot path (:mod:`worker.hotpath`) commits many results in one Redis round
trip, and the client records cancelled jobs as REVOKED the same way, so they
write the ``celery-task-meta-<id>`` value themselves instead of through
``backend.store_result`` (one round trip per task, plus a read). The value must
be byte-for-byte what Celery's Redis backend would write, so that
``AsyncResult``, Flower and a stock worker read it. Celery builds that value in
a private method, ``Backend._get_result_meta``; this module is the only caller.

``tests/producers/test_celery_internals.py`` pins it against the installed
Celery: the meta built here equals what ``store_result`` stores.
"""

from __future__ import annotations

from typing import Any


def finished_task_meta(backend: Any, task_id: str, *, result: Any, state: str, request: Any = None) -> dict[str, Any]:
    """The dict Celery's backend stores under ``celery-task-meta-<task_id>`` for a task that ended in ``state``.

    ``result`` is what ``backend.encode_result`` would make of the task's return
    value or exception (``backend.prepare_exception`` for an exception);
    ``request`` the task's request, for its group, parent and, with
    ``result_extended``, its name, arguments and queue. Serialise the dict with
    ``backend.encode``.
    """
    # encode=False, as the Redis backend's _store_result: encode=True (the database backend's) would store the
    # arguments as JSON strings inside the JSON value.
    meta = backend._get_result_meta(result=result, state=state, traceback=None, request=request)
    meta["task_id"] = task_id
    return meta
