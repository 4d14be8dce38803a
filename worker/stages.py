"""Stage items: one step of a distributed chunk pipeline, run by the deployment's batcher.

A distributed ChunkPipeline job is the loop of ``ChunkPipeline.run_single``
spread over the fleet: ``preprocess`` cuts the input into windows on one
worker, each window's ``forward`` runs on any worker, and ``postprocess``
merges all window outputs. Each step is handed to the deployment's batcher
as an item whose batch params are ``{STAGE_KEY: stage, "params": call_params}``,
so stages form their own params groups, keep the batcher's flush rule,
cancellation and isolation, and run on the device thread like every other
use of the pipeline (fast tokenizers are not safe to share across threads).
"""

from __future__ import annotations

import logging
from typing import Any

from worker.transformers_internals import step_params

logger = logging.getLogger(__name__)

STAGE_KEY = "__stage__"
"""Batch-params key that marks a group of stage items, and names the stage."""

STAGES = ("preprocess", "forward", "postprocess")
"""The steps of ``ChunkPipeline.run_single``, in order."""


def stage_params(stage: str, call_params: dict[str, Any]) -> dict[str, Any]:
    """Batch params for items of ``stage`` called with the job's ``call_params``."""
    if stage not in STAGES:
        raise ValueError(f"unknown pipeline stage {stage!r}")
    return {STAGE_KEY: stage, "params": call_params}


def is_stage_batch(params: dict[str, Any]) -> bool:
    """True when a batch's params mark its items as pipeline stage items."""
    return STAGE_KEY in params


def stage_call_params(pipe: Any, call_params: dict[str, Any]) -> tuple[dict, dict, dict]:
    """``(preprocess, forward, postprocess)`` params exactly as ``Pipeline.__call__`` builds them."""
    return step_params(pipe, call_params)


def run_stage(pipe: Any, payloads: list[Any], params: dict[str, Any]) -> list[Any]:
    """Run one stage for each payload; returns one result per payload.

    ``preprocess`` returns the list of windows of one input, ``forward`` the
    model outputs of one window, ``postprocess`` the final output of one list
    of window outputs. Windows run one by one rather than padded together:
    padding changes the outputs of models without an attention mask, and the
    result must equal the in-process chunked call.
    """
    preprocess, forward, postprocess = stage_call_params(pipe, params["params"])
    stage = params[STAGE_KEY]
    if stage == "preprocess":
        return [list(pipe.preprocess(payload, **preprocess)) for payload in payloads]
    if stage == "forward":
        return [pipe.forward(payload, **forward) for payload in payloads]
    return [pipe.postprocess(payload, **postprocess) for payload in payloads]
