"""Load a :class:`FleetConfig` from TOML with ``PIPEFLEET_*`` environment overrides.

``PIPEFLEET_CONFIG`` names the file. Any top-level scalar key can be
overridden by ``PIPEFLEET_<KEY>`` (``PIPEFLEET_BROKER_URL``,
``PIPEFLEET_VISIBILITY_TIMEOUT_S``, …) and nested keys with a double
underscore (``PIPEFLEET_LIMITS__MAX_INPUTS_PER_JOB``).
"""

from __future__ import annotations

import json
import logging
import os
import tomllib
from pathlib import Path
from typing import Any, Mapping

from pydantic import ValidationError

from config.models import FleetConfig
from producers.errors import ConfigError

logger = logging.getLogger(__name__)

ENV_PREFIX = "PIPEFLEET_"
CONFIG_ENV = "PIPEFLEET_CONFIG"
DEFAULT_CONFIG_PATH = Path(__file__).with_name("fleet.toml")


_STRING_SUFFIXES = ("_url", "backend", "_name", "_username", "_password", "_certs", "_certfile", "_keyfile")


def _parse_env_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        path = name[len(ENV_PREFIX):].lower().split("__")
        if path[0] not in FleetConfig.model_fields or path[0] in ("deployments", "source"):
            continue
        target = data
        for part in path[:-1]:
            target = target.setdefault(part, {})
        # URLs, names, passwords and paths stay strings even when they happen to parse as JSON numbers.
        target[path[-1]] = raw if path[-1].endswith(_STRING_SUFFIXES) else _parse_env_value(raw)
    return data


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = []
    for problem in error.errors():
        location = ""
        for part in problem["loc"]:
            location += f"[{part}]" if isinstance(part, int) else (f".{part}" if location else str(part))
        lines.append(f"  {location or '(top level)'}: {problem['msg']}")
    return f"invalid fleet config {source}:\n" + "\n".join(lines)


def load_config(path: str | Path | None = None, *, environ: Mapping[str, str] | None = None) -> FleetConfig:
    """Read the fleet config; raises :class:`ConfigError` naming the file and field."""
    environ = os.environ if environ is None else environ
    chosen = Path(path or environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH)
    try:
        data = tomllib.loads(chosen.read_text())
    except FileNotFoundError:
        raise ConfigError(f"fleet config {chosen} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"fleet config {chosen} is not valid TOML: {error}") from error
    data = _apply_env(data, environ)
    try:
        config = FleetConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, str(chosen))) from error
    return config.model_copy(update={"source": str(chosen)})
