"""What a loaded deployment advertises about how it was built, so clients can match construction options."""

from __future__ import annotations

import logging
from typing import Any

from config.models import Deployment
from producers.construction import dtype_name, plain_json, quantization_dict
from producers.schemas import Construction

logger = logging.getLogger(__name__)


def _quantization(model: Any) -> dict[str, Any] | None:
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    return None if config is None else quantization_dict(config)


def _auto_dtype(deployment: Deployment, loaded: str | None) -> str | None:
    if deployment.dtype in (None, "auto"):
        return loaded  # transformers 5 loads with dtype="auto" by default
    try:
        from transformers import AutoConfig

        # The loaded model's config records the dtype it was cast to, not the checkpoint's.
        config = AutoConfig.from_pretrained(deployment.model, revision=deployment.revision,
                                            trust_remote_code=deployment.trust_remote_code)
    except Exception as error:  # an unreadable config only makes dtype="auto" unmatchable
        logger.debug("deployment %s: cannot read the checkpoint dtype: %s", deployment.name, error)
        return None
    return dtype_name(getattr(config, "dtype", None)) or "float32"


def construction_facts(deployment: Deployment, pipe: Any) -> Construction:
    """The construction facts of ``deployment`` as loaded in ``pipe``."""
    model = getattr(pipe, "model", None)
    loaded = dtype_name(getattr(model, "dtype", None))
    model_kwargs = {k: v for k, v in deployment.model_kwargs.items() if k != "quantization_config"}
    return Construction(
        dtype=loaded, auto_dtype=_auto_dtype(deployment, loaded), quantization=_quantization(model),
        device_map=deployment.device_map, trust_remote_code=deployment.trust_remote_code,
        model_kwargs=plain_json(model_kwargs), batch_size=deployment.batch_size,
        pipeline_class=f"{type(pipe).__module__}.{type(pipe).__qualname__}",
    )
