"""Pipelines that transformers 5 removed, re-registered with their v4 output formats.

Each module registers one task through ``transformers.pipelines.PIPELINE_REGISTRY``;
:func:`register_all` is called by the worker (and by tests) before any
``transformers.pipeline(...)`` call.
"""

from __future__ import annotations

import importlib

_MODULES = ("summarization", "question_answering", "visual_question_answering")
_registered = False


def register_all() -> None:
    """Register every custom pipeline once; safe to call repeatedly."""
    global _registered
    if _registered:
        return
    for name in _MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        module.register()
    _registered = True
