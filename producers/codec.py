"""The one serialize/deserialize pair for what jobs carry: inputs out, outputs back.

Jobs travel as JSON, so values JSON cannot hold are tagged on the way and
restored on the other side:

- tuples (ASR timestamps) become ``{"__tuple__": [...]}`` and come back as tuples;
- numpy arrays and torch tensors become ``{"__ndarray__": [...], "dtype": ...}``
  and come back as numpy arrays (as lists where numpy is missing);
- numpy scalars become plain numbers;
- PIL images become ``{"__image__": "<base64 png>"}``; as inputs they become
  ``{"b64": ..., "mime": "image/png"}``;
- bytes inputs become ``{"b64": ...}``.

This module never imports numpy, PIL or torch unless a value of theirs is
already in hand, so ``import producers`` stays light.
"""

from __future__ import annotations

import base64
import io
import math
from typing import Any

TUPLE_TAG = "__tuple__"
ARRAY_TAG = "__ndarray__"
IMAGE_TAG = "__image__"


def _type_path(value: Any) -> str:
    cls = type(value)
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_pil_image(value: Any) -> bool:
    return any(c.__module__.startswith("PIL.") and c.__name__ == "Image" for c in type(value).__mro__)


def _png_b64(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def encode_output(value: Any) -> Any:
    """Turn a pipeline's output into JSON-safe data with tags for tuples and arrays."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, dict):
        return {str(k): encode_output(v) for k, v in value.items()}
    if isinstance(value, list):
        return [encode_output(v) for v in value]
    if isinstance(value, tuple):
        return {TUPLE_TAG: [encode_output(v) for v in value]}
    type_path = _type_path(value)
    if type_path.startswith("torch.") and hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
        type_path = _type_path(value)
    if type_path == "numpy.ndarray":
        return {ARRAY_TAG: value.tolist(), "dtype": str(value.dtype)}
    if type_path.startswith("numpy.") and hasattr(value, "item"):
        return value.item()
    if _is_pil_image(value):
        return {IMAGE_TAG: _png_b64(value)}
    if isinstance(value, (bytes, bytearray)):
        return {"b64": base64.b64encode(bytes(value)).decode("ascii")}
    raise TypeError(f"cannot serialise pipeline output of type {type_path}")


def decode_output(value: Any) -> Any:
    """Restore tuples, arrays and images tagged by :func:`encode_output`."""
    if isinstance(value, list):
        return [decode_output(v) for v in value]
    if not isinstance(value, dict):
        return value
    if TUPLE_TAG in value and len(value) == 1:
        return tuple(decode_output(v) for v in value[TUPLE_TAG])
    if ARRAY_TAG in value and set(value) <= {ARRAY_TAG, "dtype"}:
        try:
            import numpy
        except ImportError:
            return value[ARRAY_TAG]
        return numpy.asarray(value[ARRAY_TAG], dtype=value.get("dtype"))
    if IMAGE_TAG in value and len(value) == 1:
        raw = base64.b64decode(value[IMAGE_TAG])
        try:
            from PIL import Image
        except ImportError:
            return raw
        with Image.open(io.BytesIO(raw)) as image:
            # A plain Image, as the pipeline made it (a PngImageFile never compares equal to one).
            return image.copy()
    return {k: decode_output(v) for k, v in value.items()}


def encode_input(value: Any, *, nested: bool = False) -> Any:
    """Turn one client-side input (text, dict, PIL image, array, bytes) into JSON.

    A top-level array (raw audio) becomes ``{"array": [...]}``; inside a dict
    such as ``{"raw": array, "sampling_rate": 16000}`` it becomes a plain list.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"inputs cannot contain {value!r}")
        return value
    if isinstance(value, dict):
        return {str(k): encode_input(v, nested=True) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_input(v, nested=True) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return {"b64": base64.b64encode(bytes(value)).decode("ascii")}
    if _is_pil_image(value):
        return {"b64": _png_b64(value), "mime": "image/png"}
    type_path = _type_path(value)
    if type_path.startswith("torch.") and hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
        type_path = _type_path(value)
    if type_path == "numpy.ndarray":
        as_list = value.tolist()
        return as_list if nested else {"array": as_list}
    if type_path.startswith("numpy.") and hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot send an input of type {type_path}; use text, dicts, lists, bytes, PIL images or arrays")
