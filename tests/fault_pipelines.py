"""Pipelines that misbehave on purpose, for fault tests (``pipeline_kwargs.pipeline_class``).

A deployment names one by its dotted path::

    pipeline_kwargs = {pipeline_class = "tests.fault_pipelines.SlowTextClassification"}

Their outputs equal the plain ``text-classification`` pipeline's, so the
oracle still applies; only timing and process death differ.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import Any

from transformers import (AutomaticSpeechRecognitionPipeline, TextClassificationPipeline,
                          ZeroShotClassificationPipeline)

logger = logging.getLogger(__name__)

SLOW_MARKER = "SLOW"
"""A batch holding an input that contains this text sleeps before its forward pass."""

SLOW_S_ENV = "PIPEFLEET_TEST_SLOW_S"
"""Seconds a slow batch sleeps (default 2)."""

DIE_ON_LOAD_ENV = "PIPEFLEET_TEST_DIE_ON_LOAD"
"""When set to 1, constructing the pipeline kills its own process with SIGKILL."""

BATCH_LOG_PREFIX = "fault-pipeline batch"
"""Printed to stderr (with pid and size) when a slow batch starts, so tests can time a kill."""


def _texts(inputs: Any) -> list[str]:
    items = inputs if isinstance(inputs, list) else [inputs]
    return [item if isinstance(item, str) else str(item) for item in items]


class SlowTextClassification(TextClassificationPipeline):
    """Text classification whose batches sleep when an input contains ``SLOW``."""

    def __call__(self, inputs: Any, **kwargs: Any) -> Any:
        texts = _texts(inputs)
        if any(SLOW_MARKER in text for text in texts):
            print(f"{BATCH_LOG_PREFIX} pid={os.getpid()} n={len(texts)}", file=sys.stderr, flush=True)
            time.sleep(float(os.environ.get(SLOW_S_ENV, "2")))
        return super().__call__(inputs, **kwargs)


class DieOnLoadTextClassification(SlowTextClassification):
    """Kills its own process while the model loads when ``PIPEFLEET_TEST_DIE_ON_LOAD=1``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if os.environ.get(DIE_ON_LOAD_ENV) == "1":
            os.kill(os.getpid(), signal.SIGKILL)
        super().__init__(*args, **kwargs)


POISON_MARKER = "POISON"
"""An input containing this text makes the whole batch it is in raise ValueError."""

OOM_ABOVE_BATCH_ENV = "PIPEFLEET_TEST_OOM_ABOVE_BATCH"
"""Forward passes with more rows than this raise an out-of-memory error (default 2)."""

OOM_ABOVE_TOKENS = 40
"""Forward passes over sequences longer than this always raise out-of-memory."""


class FaultyTextClassification(TextClassificationPipeline):
    """Text classification that fails like a real model can: bad input and out of memory.

    A batch containing ``POISON`` raises ``ValueError``; a forward pass of more
    than ``$PIPEFLEET_TEST_OOM_ABOVE_BATCH`` rows, or over a sequence longer
    than ``OOM_ABOVE_TOKENS`` tokens, raises the error CUDA raises when it runs
    out of memory. Nothing is really allocated.
    """

    def preprocess(self, inputs: Any, **kwargs: Any) -> Any:
        if POISON_MARKER in _texts(inputs)[0]:
            raise ValueError(f"input contains {POISON_MARKER}")
        return super().preprocess(inputs, **kwargs)

    def _forward(self, model_inputs: Any, **kwargs: Any) -> Any:
        rows, tokens = model_inputs["input_ids"].shape
        if rows > int(os.environ.get(OOM_ABOVE_BATCH_ENV, "2")) or tokens > OOM_ABOVE_TOKENS:
            raise RuntimeError(f"CUDA out of memory. Tried to allocate 2.00 GiB (batch of {rows} x {tokens})")
        return super()._forward(model_inputs, **kwargs)


STAGE_LOG_PREFIX = "fault-pipeline stage"
"""Printed to stderr (with the stage name and pid) when a slow stage of a chunk pipeline starts."""

SLOW_STAGE_ENV = "PIPEFLEET_TEST_SLOW_STAGE_S"
"""Seconds a slow stage sleeps; unset means no sleep (the survivor of a kill test runs at full speed)."""


def _slow_stage(stage: str) -> None:
    seconds = os.environ.get(SLOW_STAGE_ENV)
    if seconds:
        print(f"{STAGE_LOG_PREFIX} {stage} pid={os.getpid()}", file=sys.stderr, flush=True)
        time.sleep(float(seconds))


class SlowPostprocessZeroShot(ZeroShotClassificationPipeline):
    """Zero-shot classification whose postprocess (a chord's assemble) sleeps when the env asks."""

    def postprocess(self, model_outputs: Any, **kwargs: Any) -> Any:
        _slow_stage("postprocess")
        return super().postprocess(model_outputs, **kwargs)


class SlowForwardSpeechRecognition(AutomaticSpeechRecognitionPipeline):
    """Speech recognition whose window forward passes (a split job's chunks) sleep when the env asks."""

    def _forward(self, model_inputs: Any, **kwargs: Any) -> Any:
        _slow_stage("forward")
        return super()._forward(model_inputs, **kwargs)
