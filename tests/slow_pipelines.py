"""Pipelines that take their time, so tests can act while a batch is in flight.

Point a deployment at one with
``pipeline_kwargs = {pipeline_class = "tests.slow_pipelines.SlowTextClassificationPipeline"}``.
"""

from __future__ import annotations

import os
import time

from transformers import TextClassificationPipeline

FORWARD_SLEEP_ENV = "PIPEFLEET_TEST_FORWARD_SLEEP_S"
"""Seconds each forward pass sleeps (default 0.5)."""


class SlowTextClassificationPipeline(TextClassificationPipeline):
    """A text-classification pipeline whose every forward pass sleeps first."""

    def _forward(self, model_inputs, **kwargs):
        time.sleep(float(os.environ.get(FORWARD_SLEEP_ENV, "0.5")))
        return super()._forward(model_inputs, **kwargs)
