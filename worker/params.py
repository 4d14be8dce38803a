"""Check a job's call params against the fleet's limits before they reach a pipeline."""

from __future__ import annotations

import math
from typing import Any

from config.models import Limits
from producers.errors import InvalidParams
from worker.logprobs import LOGPROBS_PARAM
from worker.penalties import PENALTY_PARAMS

#: Params a job may never pass: they would load code or models, or reach the device.
DENIED_PARAMS = frozenset({
    "model", "tokenizer", "feature_extractor", "image_processor", "processor", "config",
    "trust_remote_code", "custom_generate", "assistant_model", "assistant_tokenizer", "streamer",
    "device", "device_map", "revision", "token", "use_auth_token", "cache_dir", "local_files_only",
    "model_kwargs", "pipeline_class", "prefix_allowed_tokens_fn", "logits_processor",
    "stopping_criteria", "synced_gpus", "num_workers",
})

#: Params pipefleet itself understands, removed before the pipeline call.
FLEET_PARAMS = frozenset({"seed", "batch_size", "pool", "normalize", LOGPROBS_PARAM, *PENALTY_PARAMS})

#: Fleet params that travel with a job's items into its batch (the forward pass reads them).
BATCH_FLEET_PARAMS = ("seed", LOGPROBS_PARAM, *PENALTY_PARAMS)

_CAPPED = {
    "max_new_tokens": "max_new_tokens",
    "max_length": "max_new_tokens",
    "num_return_sequences": "max_num_return_sequences",
    "num_beams": "max_num_return_sequences",
    "top_k": "max_top_k",
}


def _walk_numbers(value: Any, path: str):
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _walk_numbers(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk_numbers(item, f"{path}[{index}]")


def _check_capped(name: str, value: Any, limits: Limits, where: str) -> None:
    cap_field = _CAPPED.get(name)
    if cap_field is None or value is None:
        return
    if name == "top_k" and isinstance(value, int) and not isinstance(value, bool) and value <= 0:
        raise InvalidParams(f"{where} must be a positive integer, got {value!r}")
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidParams(f"{where} must be an integer, got {value!r}")
    cap = getattr(limits, cap_field)
    if name == "max_length":
        cap = max(cap, limits.max_new_tokens * 2)
    if value < 1 or value > cap:
        raise InvalidParams(f"{where} must be between 1 and {cap}, got {value}")


def validate_params(params: Any, limits: Limits) -> dict[str, Any]:
    """Return the params if the fleet allows them; raises :class:`InvalidParams` naming the field."""
    if not isinstance(params, dict):
        raise InvalidParams(f"params must be a JSON object, got {type(params).__name__}")
    for name, value in params.items():
        if name in DENIED_PARAMS:
            raise InvalidParams(f"param {name!r} is not allowed in a job; it is fixed by the deployment")
        for path, number in _walk_numbers(value, name):
            if isinstance(number, float) and not math.isfinite(number):
                raise InvalidParams(f"param {path} must be a finite number, got {number}")
        _check_capped(name, value, limits, f"param {name!r}")
    generate_kwargs = params.get("generate_kwargs")
    if generate_kwargs is not None:
        if not isinstance(generate_kwargs, dict):
            raise InvalidParams("param 'generate_kwargs' must be a JSON object")
        for name, value in generate_kwargs.items():
            if name in DENIED_PARAMS:
                raise InvalidParams(f"generate_kwargs.{name} is not allowed in a job")
            _check_capped(name, value, limits, f"generate_kwargs.{name}")
    seed = params.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32):
        raise InvalidParams(f"param 'seed' must be an integer in [0, 2**32), got {seed!r}")
    return params


def pipeline_call_params(params: dict[str, Any]) -> dict[str, Any]:
    """The params handed to the pipeline: fleet-level ones removed."""
    return {k: v for k, v in params.items() if k not in FLEET_PARAMS}
