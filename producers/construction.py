"""Construction options of ``transformers.pipeline(...)``, matched against what live deployments advertise.

A fleet client does not build the pipeline: a deployment did, once, on a
worker. ``producers.pipeline(task, model, dtype=..., device=..., ...)`` still
accepts every construction option of ``transformers.pipeline`` and checks it
against the deployment's advertised :class:`~producers.schemas.Construction`:

- options that change outputs or memory (``dtype``/``torch_dtype``,
  ``quantization_config`` and other ``model_kwargs``, ``trust_remote_code=True``,
  another tokenizer/config/processor, ``use_fast=False``, ``pipeline_class``)
  must agree, else :class:`UnknownDeployment` names what the live deployments
  serve;
- placement options (``device``, ``device_map``, ``token``, cache and offload
  settings) are the deployment's business: a difference is a debug log;
- ``batch_size`` becomes the default call ``batch_size``, as in-process.

Objects are read duck-typed, since producers never imports torch or
transformers: a torch dtype by its name (``torch.bfloat16`` -> ``"bfloat16"``),
a ``torch.device`` by ``.type``/``.index``, a ``BitsAndBytesConfig`` (or any
quantization config) by ``to_dict()``, a model/tokenizer/config object by
``name_or_path``.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from typing import Any

from producers.errors import UnknownDeployment
from producers.schemas import DeploymentInfo

logger = logging.getLogger(__name__)

#: Components ``transformers.pipeline`` can take instead of the model's own.
COMPONENT_OPTIONS = ("config", "tokenizer", "feature_extractor", "image_processor", "video_processor", "processor")

#: Every construction option a :class:`FleetPipeline` takes out of its keyword arguments.
CONSTRUCTION_OPTIONS = frozenset({
    *COMPONENT_OPTIONS, "device", "device_map", "dtype", "torch_dtype", "model_kwargs", "trust_remote_code",
    "use_fast", "token", "use_auth_token", "pipeline_class", "batch_size", "num_workers",
})

#: ``model_kwargs`` that only say where or how weights are fetched and placed, never what the model computes.
PLACEMENT_MODEL_KWARGS = frozenset({
    "device_map", "max_memory", "offload_folder", "offload_state_dict", "offload_buffers", "low_cpu_mem_usage",
    "cache_dir", "token", "use_auth_token", "local_files_only", "force_download", "proxies", "resume_download",
    "use_safetensors",
})

_QUANTIZATION_FLAGS = ("load_in_8bit", "load_in_4bit")
_DTYPE_ALIASES = {"float": "float32", "half": "float16", "double": "float64", "bf16": "bfloat16",
                  "fp16": "float16", "fp32": "float32"}


def dtype_name(value: Any) -> str | None:
    """``torch.bfloat16`` or ``"bfloat16"`` -> ``"bfloat16"``; ``"auto"`` stays ``"auto"``."""
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    return _DTYPE_ALIASES.get(name, name)


def device_name(value: Any) -> str | None:
    """``0`` -> ``"cuda:0"``, ``-1`` -> ``"cpu"``, ``torch.device("cuda", 1)`` -> ``"cuda:1"``."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return "cpu" if value < 0 else f"cuda:{value}"
    kind, index = getattr(value, "type", None), getattr(value, "index", None)
    if isinstance(kind, str):
        return kind if index is None else f"{kind}:{index}"
    return str(value)


def name_or_path(value: Any) -> Any:
    """The hub id or path a model/tokenizer/config object was loaded from; strings pass through."""
    if value is None or isinstance(value, str):
        return value
    for attribute in ("name_or_path", "_name_or_path"):
        name = getattr(value, attribute, None)
        if isinstance(name, str) and name:
            return name
    config = getattr(value, "config", None)
    return name_or_path(config) if config is not None else value


def plain_json(value: Any) -> Any:
    """Options as JSON: tables and lists kept, enums by value, dtypes and other objects by :func:`dtype_name`
    (quantization configs hold enums and torch dtypes; ads and requests travel as JSON)."""
    if isinstance(value, dict):
        return {str(k): plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(v) for v in value]
    if isinstance(value, enum.Enum):
        return plain_json(value.value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return dtype_name(value)


def quantization_dict(config: Any) -> dict[str, Any]:
    """A quantization config (``BitsAndBytesConfig``, any ``to_dict()`` object, or a dict) as plain JSON."""
    table = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in plain_json(table).items() if not k.startswith("_")}


@dataclass(frozen=True)
class ConstructionRequest:
    """The construction options one ``producers.pipeline(...)`` call passed, normalised."""

    dtype: str | None = None
    quantization: dict[str, Any] | None = None
    trust_remote_code: bool | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    components: dict[str, Any] = field(default_factory=dict)
    use_fast: bool | None = None
    pipeline_class: str | None = None
    device: str | None = None
    device_map: Any = None
    placement_kwargs: dict[str, Any] = field(default_factory=dict)
    batch_size: int | None = None

    def changes_outputs(self) -> bool:
        """Whether any asked option could make outputs differ from the checkpoint loaded as it is."""
        return bool(self.dtype not in (None, "auto") or self.quantization is not None or self.trust_remote_code
                    or self.model_kwargs or self.components or self.use_fast is False or self.pipeline_class)

    def summary(self) -> str:
        """The output-changing options asked for, as ``key=value`` pairs."""
        parts = [f"dtype={self.dtype}"] if self.dtype else []
        if self.quantization is not None:
            parts.append(f"quantization={_describe_quantization(self.quantization)}")
        if self.trust_remote_code:
            parts.append("trust_remote_code=True")
        parts += [f"model_kwargs[{k!r}]={v!r}" for k, v in self.model_kwargs.items()]
        parts += [f"{k}={v!r}" for k, v in self.components.items()]
        if self.use_fast is False:
            parts.append("use_fast=False")
        if self.pipeline_class:
            parts.append(f"pipeline_class={self.pipeline_class}")
        return ", ".join(parts) or "the in-process defaults"


def _class_name(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', repr(value))}"


def split_construction(model: Any, kwargs: dict[str, Any]) -> tuple[ConstructionRequest, dict[str, Any]]:
    """Split ``pipeline(...)`` keyword arguments into construction options and default call params."""
    options = {k: v for k, v in kwargs.items() if k in CONSTRUCTION_OPTIONS}
    params = {k: v for k, v in kwargs.items() if k not in CONSTRUCTION_OPTIONS}
    model_kwargs = dict(options.get("model_kwargs") or {})
    dtype = options.get("dtype", options.get("torch_dtype"))
    dtype = model_kwargs.pop("dtype", model_kwargs.pop("torch_dtype", dtype))
    quantization = model_kwargs.pop("quantization_config", None)
    flags = {k: model_kwargs.pop(k) for k in _QUANTIZATION_FLAGS if k in model_kwargs}
    if quantization is not None or any(flags.values()):
        quantization = {**(quantization_dict(quantization) if quantization is not None else {}), **flags}
    else:
        quantization = None
    trust = model_kwargs.pop("trust_remote_code", options.get("trust_remote_code"))
    placement = {k: model_kwargs.pop(k) for k in list(model_kwargs) if k in PLACEMENT_MODEL_KWARGS}
    model_id = name_or_path(model)
    components = {}
    for key in COMPONENT_OPTIONS:
        given = name_or_path(options.get(key))
        if given is not None and given != model_id:
            components[key] = given if isinstance(given, str) else f"<{type(given).__name__} object>"
    request = ConstructionRequest(
        dtype=dtype_name(dtype), quantization=quantization, trust_remote_code=trust,
        model_kwargs=plain_json(model_kwargs), components=components, use_fast=options.get("use_fast"),
        pipeline_class=_class_name(options.get("pipeline_class")), device=device_name(options.get("device")),
        device_map=options.get("device_map", placement.pop("device_map", None)), placement_kwargs=placement,
        batch_size=options.get("batch_size"),
    )
    return request, params


def _describe_quantization(table: dict[str, Any] | None) -> str:
    if not table:
        return "none"
    method = table.get("quant_method", "bitsandbytes" if any(table.get(k) for k in _QUANTIZATION_FLAGS) else "?")
    if table.get("load_in_8bit"):
        return f"{method} 8-bit"
    if table.get("load_in_4bit"):
        extras = [f"{k}={table[k]}" for k in ("bnb_4bit_quant_type", "bnb_4bit_compute_dtype") if k in table]
        return f"{method} 4-bit" + (f" ({', '.join(extras)})" if extras else "")
    keys = ", ".join(f"{k}={v}" for k, v in table.items() if k != "quant_method")
    return f"{method} ({keys})" if keys else str(method)


def describe(info: DeploymentInfo) -> str:
    """What a live deployment serves and how it was built, in one line."""
    c = info.construction
    head = f"{info.name} ({info.task}, {info.model}"
    if info.revision:
        head += f"@{info.revision}"
    if c is None:
        return head + f"; construction not advertised; on {', '.join(info.devices)})"
    parts = [f"dtype {c.dtype or '?'}", f"quantization {_describe_quantization(c.quantization)}",
             f"trust_remote_code {'on' if c.trust_remote_code else 'off'}"]
    if c.model_kwargs:
        parts.append(f"model_kwargs {c.model_kwargs}")
    if c.device_map is not None:
        parts.append(f"device_map {c.device_map!r}")
    parts.append(f"on {', '.join(info.devices)}")
    return head + "; " + ", ".join(parts) + ")"


def _quantization_differs(asked: dict[str, Any], served: dict[str, Any] | None) -> bool:
    if served is None:
        return any(v for k, v in asked.items() if k in _QUANTIZATION_FLAGS) or "quant_method" in asked
    # Only keys both sides know: client and worker may run different transformers versions.
    return any(k in served and served[k] != v for k, v in asked.items()) or any(
        asked.get(k) and not served.get(k) for k in _QUANTIZATION_FLAGS)


def mismatches(request: ConstructionRequest, info: DeploymentInfo) -> list[str]:
    """The asked options that would change outputs or memory on this deployment (empty: it fits)."""
    c = info.construction
    if c is None:
        return []
    found = []
    if request.dtype == "auto":
        if c.auto_dtype is not None and c.dtype is not None and c.auto_dtype != c.dtype:
            found.append(f"dtype='auto' ({c.auto_dtype} for this checkpoint)")
    elif request.dtype is not None and c.dtype is not None and request.dtype != c.dtype:
        found.append(f"dtype={request.dtype}")
    if request.quantization is not None and _quantization_differs(request.quantization, c.quantization):
        found.append(f"quantization={_describe_quantization(request.quantization)}")
    if request.trust_remote_code and not c.trust_remote_code:
        found.append("trust_remote_code=True")
    for key, value in request.model_kwargs.items():
        if c.model_kwargs.get(key) != value:
            found.append(f"model_kwargs[{key!r}]={value!r}")
    # A component loaded from the deployment's own model is the one it already uses.
    found += [f"{key}={value!r}" for key, value in request.components.items() if value != info.model]
    if request.use_fast is False:
        found.append("use_fast=False")
    if request.pipeline_class and c.pipeline_class and request.pipeline_class != c.pipeline_class:
        found.append(f"pipeline_class={request.pipeline_class}")
    return found


def _serves_in_process_defaults(info: DeploymentInfo) -> bool:
    c = info.construction
    return c is not None and not mismatches(ConstructionRequest(dtype="auto"), info) and c.quantization is None \
        and not c.model_kwargs


def _log_placement(request: ConstructionRequest, info: DeploymentInfo) -> None:
    c = info.construction
    if info.construction is None:
        logger.warning("deployment %s does not advertise how it was built (an older worker); "
                       "construction options are not checked", info.name)
    if request.device is not None and request.device not in info.devices:
        logger.debug("device=%s asked; deployment %s runs on %s", request.device, info.name, info.devices)
    if request.device_map is not None and (c is None or request.device_map != c.device_map):
        logger.debug("device_map=%r asked; deployment %s was loaded with device_map=%r", request.device_map,
                     info.name, None if c is None else c.device_map)
    if request.trust_remote_code is False and c is not None and c.trust_remote_code:
        logger.debug("trust_remote_code=False asked; deployment %s trusts its model's code", info.name)
    if request.placement_kwargs:
        logger.debug("placement model_kwargs %s are the deployment's business", sorted(request.placement_kwargs))


def choose(candidates: list[DeploymentInfo], request: ConstructionRequest, wanted: str) -> DeploymentInfo:
    """The one candidate whose construction fits ``request``; raises :class:`UnknownDeployment` naming them all."""
    fitting = [c for c in candidates if not mismatches(request, c)]
    if not fitting:
        served = "; ".join(f"{describe(c)}, which differs in {', '.join(mismatches(request, c))}"
                           for c in candidates)
        raise UnknownDeployment(f"no live deployment serves {wanted} with {request.summary()}; "
                                f"live: {served}. Deploy one built that way, or drop those options")
    if len(fitting) > 1:
        # Several builds of one model: without options, in-process would load the checkpoint as it is.
        defaults = [c for c in fitting if _serves_in_process_defaults(c)]
        if len(defaults) == 1 and not request.changes_outputs():
            fitting = defaults
    if len(fitting) > 1:
        raise UnknownDeployment(f"several deployments serve {wanted} with {request.summary()}: "
                                f"{'; '.join(describe(c) for c in fitting)}; pass deployment=<name>, "
                                "or the dtype/model_kwargs that single one out")
    _log_placement(request, fitting[0])
    return fitting[0]

