"""One forward pass per deployment at start-up, so the first job pays no lazy init."""

from __future__ import annotations

import logging
from typing import Any

from worker.inputs import AUDIO_TASKS, IMAGE_TASKS

logger = logging.getLogger(__name__)

_WARMUP_TEXT = "pipefleet warm-up"


def _warmup_call(task: str, pipe: Any) -> tuple[Any, dict[str, Any]]:
    if task in IMAGE_TASKS or task in ("visual-question-answering", "document-question-answering"):
        from PIL import Image

        image = Image.new("RGB", (32, 32), color=(128, 64, 32))
        if task in ("visual-question-answering", "document-question-answering"):
            return {"image": image, "question": "what?"}, {}
        if task in ("zero-shot-image-classification",):
            return image, {"candidate_labels": ["a", "b"]}
        return image, {}
    if task in AUDIO_TASKS:
        import numpy

        rate = getattr(getattr(pipe, "feature_extractor", None), "sampling_rate", 16_000)
        params = {"candidate_labels": ["a", "b"]} if task.startswith("zero-shot") else {}
        return numpy.zeros(rate, dtype=numpy.float32), params
    if task == "zero-shot-classification":
        return _WARMUP_TEXT, {"candidate_labels": ["a", "b"]}
    if task == "question-answering":
        return {"question": "what?", "context": _WARMUP_TEXT}, {}
    if task == "fill-mask":
        mask = getattr(pipe.tokenizer, "mask_token", None) or "[MASK]"
        return f"{_WARMUP_TEXT} {mask}", {}
    if task in ("text-generation", "summarization", "translation", "text2text-generation"):
        return _WARMUP_TEXT, {"max_new_tokens": 2}
    return _WARMUP_TEXT, {}


def warm_up(name: str, task: str, pipe: Any) -> None:
    """Run one small call through ``pipe``; failures are logged, not fatal."""
    try:
        inputs, params = _warmup_call(task, pipe)
        pipe(inputs, **params)
    except Exception as error:  # a model that loads but cannot take the sample still serves jobs
        logger.warning("deployment %s: warm-up call failed (%s: %s); serving anyway", name,
                       type(error).__name__, error)
