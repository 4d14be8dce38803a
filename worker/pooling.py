"""Sentence embeddings from feature-extraction: the ``pool`` and ``normalize`` fleet params.

``transformers``' feature-extraction pipeline returns one vector per token, which
is large as JSON. A job may ask the worker to pool them (``pool="mean"`` or
``"cls"``, optionally ``normalize=True``) so one vector per input travels back,
equal to pooling the in-process output the same way.
"""

from __future__ import annotations

from typing import Any

from producers.errors import InvalidParams

POOLING_MODES = ("mean", "cls")


def check_pooling(task: str, params: dict[str, Any]) -> None:
    """Refuse pooling params on other tasks or with unknown modes."""
    pool = params.get("pool")
    if pool is None and "normalize" not in params:
        return
    if task not in ("feature-extraction", "image-feature-extraction"):
        raise InvalidParams(f"params 'pool'/'normalize' only apply to feature-extraction, not {task}")
    if pool is not None and pool not in POOLING_MODES:
        raise InvalidParams(f"param 'pool' must be one of {', '.join(POOLING_MODES)}, got {pool!r}")
    if not isinstance(params.get("normalize", False), bool):
        raise InvalidParams("param 'normalize' must be true or false")


def pool_output(output: Any, *, pool: str | None, normalize: bool) -> Any:
    """Pool one item's ``[1][tokens][hidden]`` output into ``[hidden]`` (then L2-normalise)."""
    import numpy

    if pool is None and not normalize:
        return output
    array = numpy.asarray(output.detach().cpu() if hasattr(output, "detach") else output, dtype=numpy.float32)
    tokens = array[0]
    vector = tokens[0] if pool == "cls" else tokens.mean(axis=0) if pool == "mean" else tokens
    if normalize:
        vector = vector / numpy.maximum(numpy.linalg.norm(vector, axis=-1, keepdims=True), 1e-12)
    return vector.tolist() if pool is not None else [vector.tolist()]
