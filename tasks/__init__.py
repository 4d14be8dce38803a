"""Celery task definitions: the ``infer`` task, chunk chords and their assembly (on :data:`worker.celery_app.app`)."""
