"""Turn a :class:`config.Deployment` into a loaded, warmed ``transformers`` pipeline."""

from __future__ import annotations

import importlib
import logging
import time
from typing import Any

from config.models import Deployment
from producers.errors import ConfigError
from worker.quantization import bitsandbytes_config, check_can_load

logger = logging.getLogger(__name__)

def _import_class(dotted: str) -> type:
    module_name, _, class_name = dotted.replace(":", ".").rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)


def pipeline_arguments(deployment: Deployment) -> dict[str, Any]:
    """The keyword arguments of ``transformers.pipeline(...)`` for this deployment."""
    arguments: dict[str, Any] = {
        "task": deployment.task,
        "model": deployment.model,
        "trust_remote_code": deployment.trust_remote_code,
    }
    if deployment.revision:
        arguments["revision"] = deployment.revision
    if deployment.device_map is not None:
        arguments["device_map"] = deployment.device_map
    elif deployment.device is not None:
        arguments["device"] = deployment.device
    if deployment.dtype is not None:
        arguments["dtype"] = deployment.dtype
    if deployment.batch_size is not None:
        arguments["batch_size"] = deployment.batch_size
    model_kwargs = dict(deployment.model_kwargs)
    if "quantization_config" in model_kwargs:
        model_kwargs["quantization_config"] = bitsandbytes_config(deployment, model_kwargs["quantization_config"])
    if model_kwargs:
        arguments["model_kwargs"] = model_kwargs
    pipeline_kwargs = dict(deployment.pipeline_kwargs)
    if isinstance(pipeline_kwargs.get("pipeline_class"), str):
        pipeline_kwargs["pipeline_class"] = _import_class(pipeline_kwargs["pipeline_class"])
    arguments.update(pipeline_kwargs)
    return arguments


def _check_dtype_on_device(deployment: Deployment) -> None:
    import torch

    on_cpu = deployment.device in (None, -1, "cpu") and deployment.device_map is None
    if deployment.dtype == "float16" and (on_cpu or not torch.cuda.is_available()):
        logger.warning(
            "deployment %r: float16 on the CPU is slow and some kernels lack it; prefer bfloat16 or float32",
            deployment.name,
        )


def load_pipeline(deployment: Deployment) -> Any:
    """Load the deployment's pipeline; raises :class:`ConfigError` naming the deployment."""
    from transformers import pipeline

    from worker.pipelines import register_all

    register_all()
    _check_dtype_on_device(deployment)
    arguments = pipeline_arguments(deployment)
    quantization = arguments.get("model_kwargs", {}).get("quantization_config")
    if quantization is not None:
        check_can_load(deployment, quantization)
    started = time.perf_counter()
    try:
        pipe = pipeline(**arguments)
    except ConfigError:
        raise
    except Exception as error:
        raise ConfigError(
            f"deployment {deployment.name!r}: cannot load {deployment.task!r} model {deployment.model!r}: "
            f"{type(error).__name__}: {error}"
        ) from error
    logger.info("loaded deployment %s (%s, %s) in %.2fs on %s", deployment.name, deployment.task,
                deployment.model, time.perf_counter() - started, getattr(pipe, "device", "?"))
    return pipe
