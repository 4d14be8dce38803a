"""Celery task definitions: the ``infer`` task, chunk chords and their assembly."""

from tasks.app import app, configure_app

__all__ = ["app", "configure_app"]
