"""bitsandbytes quantization of a deployment: its ``BitsAndBytesConfig``, and the start-up check that it can load.

A ``quantization_config`` table of a deployment becomes a ``BitsAndBytesConfig``
(dtype names become torch dtypes). Before the model is loaded the worker asks
bitsandbytes itself whether it can quantize on the device the deployment will
run on, in three steps, each naming the deployment and what is missing:

1. ``import bitsandbytes`` works (the ``quantization`` extra);
2. the device type is one bitsandbytes has a backend for
   (``bitsandbytes.supported_torch_devices``: CPU, CUDA/ROCm, XPU, HPU, NPU,
   MPS in 0.50) and this worker has that device;
3. one small layer of the configured kind (``Linear8bitLt`` or ``Linear4bit``
   with the configured quant type, compute dtype, storage and double
   quantization) quantizes and runs a forward pass there. This catches what
   the list cannot: a native library that failed to load (a CUDA runtime
   mismatch), a kernel missing for that device or dtype.

Where the deployment runs: its ``device``, else the devices of its
``device_map``, else where transformers' bitsandbytes quantizer puts a model
without either, the worker's accelerator or the CPU.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from config.models import Deployment
from producers.errors import ConfigError

logger = logging.getLogger(__name__)

_TORCH_DTYPE_KEYS = ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage")
_PROBE_FEATURES = 64
#: bitsandbytes' 8-bit matmul logs this on every forward pass whose inputs are not float16 (always, on a
#: float32 or bfloat16 model): once per worker says it all.
_PER_CALL_LOGGER = "bitsandbytes.autograd._functions"


def bitsandbytes_config(deployment: Deployment, table: dict[str, Any]) -> Any:
    """The deployment's ``quantization_config`` table as a ``BitsAndBytesConfig``; raises ConfigError."""
    import torch
    from transformers import BitsAndBytesConfig

    table = dict(table)
    # BitsAndBytesConfig only logs keys it does not know: a misspelt key would quietly load another way.
    known = {name for name in inspect.signature(BitsAndBytesConfig).parameters if name != "kwargs"}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"deployment {deployment.name!r}: quantization_config has unknown keys {unknown}; "
                          f"BitsAndBytesConfig takes {', '.join(sorted(known))}")
    for key in _TORCH_DTYPE_KEYS:
        if isinstance(table.get(key), str):
            dtype = getattr(torch, table[key], None)
            if not isinstance(dtype, torch.dtype):
                raise ConfigError(f"deployment {deployment.name!r}: quantization_config {key} = {table[key]!r} "
                                  "is not a torch dtype (e.g. \"float32\", \"bfloat16\", \"float16\")")
            table[key] = dtype
    compute = table.get("bnb_4bit_compute_dtype")
    if compute is not None and not getattr(compute, "is_floating_point", True):
        raise ConfigError(f"deployment {deployment.name!r}: quantization_config bnb_4bit_compute_dtype must be a "
                          f"floating-point dtype, not {str(compute).removeprefix('torch.')}")
    try:
        config = BitsAndBytesConfig(**table)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"deployment {deployment.name!r}: invalid quantization_config: {error}") from error
    if not (config.load_in_8bit or config.load_in_4bit):
        raise ConfigError(f"deployment {deployment.name!r}: quantization_config sets neither load_in_8bit "
                          "nor load_in_4bit, so it would load unquantized")
    return config


def _accelerator_type() -> str | None:
    import torch

    if not torch.accelerator.is_available():
        return None
    return torch.accelerator.current_accelerator().type


def _device_type(device: Any) -> str:
    import torch

    if isinstance(device, int) and not isinstance(device, bool):
        # transformers.pipeline reads an index as one of the accelerator's devices (CUDA where there is none).
        return "cpu" if device < 0 else (_accelerator_type() or "cuda")
    if device in ("disk", "meta"):
        return device
    return torch.device(device).type


def target_device_types(deployment: Deployment) -> list[str]:
    """The device types the deployment's quantized weights will sit on, as transformers will place them."""
    if deployment.device is not None:
        return [_device_type(deployment.device)]
    if isinstance(deployment.device_map, dict):
        return sorted({_device_type(device) for device in deployment.device_map.values()})
    # device_map="auto" (or none at all): the accelerator this worker sees, else the CPU.
    return [_accelerator_type() or "cpu"]


def _probe(config: Any, device_type: str) -> None:
    import bitsandbytes as bnb
    import torch

    device = torch.device(device_type)
    if config.load_in_8bit:
        layer = bnb.nn.Linear8bitLt(_PROBE_FEATURES, _PROBE_FEATURES, has_fp16_weights=False,
                                    threshold=config.llm_int8_threshold)
        dtype = torch.float16
    else:
        layer = bnb.nn.Linear4bit(_PROBE_FEATURES, _PROBE_FEATURES, compute_dtype=config.bnb_4bit_compute_dtype,
                                  compress_statistics=config.bnb_4bit_use_double_quant,
                                  quant_type=config.bnb_4bit_quant_type, quant_storage=config.bnb_4bit_quant_storage)
        dtype = config.bnb_4bit_compute_dtype
    layer = layer.to(device)
    with torch.inference_mode():
        output = layer(torch.randn(2, _PROBE_FEATURES, dtype=dtype, device=device))
    if not bool(torch.isfinite(output).all()):
        raise RuntimeError("the probe layer returned non-finite values")


def describe(config: Any) -> str:
    """``8-bit (LLM.int8)`` or ``4-bit nf4, compute float32, double quantization``."""
    if config.load_in_8bit:
        return "8-bit (LLM.int8)"
    parts = [f"4-bit {config.bnb_4bit_quant_type}",
             f"compute {str(config.bnb_4bit_compute_dtype).removeprefix('torch.')}"]
    if config.bnb_4bit_use_double_quant:
        parts.append("double quantization")
    return ", ".join(parts)


def check_can_load(deployment: Deployment, config: Any) -> None:
    """Ask bitsandbytes whether ``config`` runs where ``deployment`` will; raises ConfigError naming what is missing."""
    what = f"deployment {deployment.name!r}: quantization_config ({describe(config)})"
    try:
        import bitsandbytes as bnb
    except ImportError as error:
        raise ConfigError(f"{what} needs the 'bitsandbytes' package, which this worker cannot import "
                          f"({error}); pip install 'pipefleet[quantization]'") from error
    version = getattr(bnb, "__version__", "?")
    supported = set(getattr(bnb, "supported_torch_devices", ()))
    for device_type in target_device_types(deployment):
        if device_type not in supported:
            raise ConfigError(f"{what}: bitsandbytes {version} quantizes on {', '.join(sorted(supported))}, "
                              f"and this deployment would place weights on {device_type!r}")
        if device_type != "cpu" and device_type != _accelerator_type():
            raise ConfigError(f"{what} runs on {device_type!r}, and this worker has no such device "
                              f"(its accelerator: {_accelerator_type() or 'none'}; check --gpu, "
                              "CUDA_VISIBLE_DEVICES and the deployment's device)")
        try:
            _probe(config, device_type)
        except Exception as error:
            raise ConfigError(f"{what}: bitsandbytes {version} cannot run it on {device_type!r}: "
                              f"{type(error).__name__}: {error}") from error
    logging.getLogger(_PER_CALL_LOGGER).addFilter(_once_per_message)
    logger.info("deployment %s: bitsandbytes %s runs %s on %s", deployment.name, version, describe(config),
                ", ".join(target_device_types(deployment)))


class _OncePerMessage(logging.Filter):
    """Passes each distinct message once; later copies are dropped."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self._seen:
            return False
        self._seen.add(message)
        return True


_once_per_message = _OncePerMessage()
