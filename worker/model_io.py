"""JSON for what a pipeline's ``preprocess``/``_forward`` hand each other.

Windows of a distributed chunk pipeline cross worker boundaries between
``preprocess``, ``forward`` and ``postprocess``. Messages are JSON only, so
tensors travel as nested lists tagged with dtype and shape, tuples as tagged
lists (ASR strides must stay tuples), and dict subclasses such as
``BatchFeature`` or ``ModelOutput`` as plain dicts. Lists of floats are exact:
a float32 widened to a Python float and printed by ``json`` reads back to the
same float32.
"""

from __future__ import annotations

import logging
from typing import Any

from producers.errors import JobError

logger = logging.getLogger(__name__)

TENSOR_TAG = "__tensor__"
NDARRAY_TAG = "__ndarray__"
TUPLE_TAG = "__tuple__"


def encode_model_io(value: Any) -> Any:
    """Model inputs or outputs (tensors, arrays, tuples, dicts) as JSON-safe data."""
    import numpy
    import torch

    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        if tensor.dtype in (torch.bfloat16, torch.float16):
            # JSON cannot tell half precisions apart from float32 lists; keep the dtype name to restore it.
            listed = tensor.to(torch.float32).tolist()
        else:
            listed = tensor.tolist()
        return {TENSOR_TAG: listed, "dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape)}
    if isinstance(value, numpy.ndarray):
        return {NDARRAY_TAG: value.tolist(), "dtype": str(value.dtype), "shape": list(value.shape)}
    if isinstance(value, numpy.generic):
        return value.item()
    if isinstance(value, tuple):
        return {TUPLE_TAG: [encode_model_io(v) for v in value]}
    if isinstance(value, list):
        return [encode_model_io(v) for v in value]
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): encode_model_io(v) for k, v in value.items()}
    raise JobError(f"cannot send a model input/output of type {type(value).__module__}.{type(value).__name__} "
                   "between workers")


def decode_model_io(value: Any) -> Any:
    """Inverse of :func:`encode_model_io`: tensors come back with their dtype and shape."""
    if isinstance(value, list):
        return [decode_model_io(v) for v in value]
    if not isinstance(value, dict):
        return value
    if TENSOR_TAG in value:
        import torch

        dtype = getattr(torch, value["dtype"])
        return torch.tensor(value[TENSOR_TAG], dtype=dtype).reshape(value["shape"])
    if NDARRAY_TAG in value:
        import numpy

        return numpy.asarray(value[NDARRAY_TAG], dtype=value["dtype"]).reshape(value["shape"])
    if TUPLE_TAG in value and len(value) == 1:
        return tuple(decode_model_io(v) for v in value[TUPLE_TAG])
    return {k: decode_model_io(v) for k, v in value.items()}
