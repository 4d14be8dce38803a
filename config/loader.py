"""Load a :class:`FleetConfig` from TOML with ``PIPEFLEET_*`` environment overrides (pydantic-settings).

``PIPEFLEET_CONFIG`` names the file. Any top-level key but ``deployments`` can
be overridden by ``PIPEFLEET_<KEY>`` (``PIPEFLEET_BROKER_URL``,
``PIPEFLEET_VISIBILITY_TIMEOUT_S``, …) and nested keys with a double
underscore (``PIPEFLEET_LIMITS__MAX_INPUTS_PER_JOB``). The environment wins
over the file; lists and tables are given as JSON.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Mapping

from pydantic import ValidationError
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict, SettingsError, TomlConfigSettingsSource

from config.models import FleetConfig
from producers.errors import ConfigError

ENV_PREFIX = "PIPEFLEET_"
CONFIG_ENV = "PIPEFLEET_CONFIG"
DEFAULT_CONFIG_PATH = Path(__file__).with_name("fleet.toml")
NESTED_DELIMITER = "__"
"""``PIPEFLEET_<TABLE>__<KEY>`` sets ``key`` of ``[table]``."""
NOT_FROM_ENV = (CONFIG_ENV, f"{ENV_PREFIX}DEPLOYMENTS", f"{ENV_PREFIX}SOURCE")
"""Variables the fleet config never reads: the file's name, the deployments (only in the file), ``source``."""


class FleetSettings(BaseSettings, FleetConfig):
    """:class:`FleetConfig` read by pydantic-settings: ``PIPEFLEET_*`` variables over the TOML file."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter=NESTED_DELIMITER,
                                      case_sensitive=False, extra="forbid", frozen=True)


class MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping rather than ``os.environ``."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self.env_vars = {name.lower(): value for name, value in environ.items()
                         if not name.upper().startswith(NOT_FROM_ENV)}

    def decode_complex_value(self, field_name: str, field: Any, value: Any) -> Any:
        """JSON for a list or table; a value that is not JSON is left as it is, so validation names its field."""
        try:
            return super().decode_complex_value(field_name, field, value)
        except ValueError:
            return value


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = []
    for problem in error.errors():
        location = ""
        for part in problem["loc"]:
            location += f"[{part}]" if isinstance(part, int) else (f".{part}" if location else str(part))
        lines.append(f"  {location or '(top level)'}: {problem['msg']}")
    return f"invalid fleet config {source}:\n" + "\n".join(lines)


def _settings_for(chosen: Path, environ: Mapping[str, str]) -> type[FleetSettings]:
    """:class:`FleetSettings` reading ``environ`` over the file ``chosen`` (earlier sources win), through
    pydantic-settings' documented hook, ``settings_customise_sources``."""
    if not chosen.is_file():
        raise ConfigError(f"fleet config {chosen} does not exist")
    try:
        toml = TomlConfigSettingsSource(FleetSettings, toml_file=chosen)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"fleet config {chosen} is not valid TOML: {error}") from error
    env = MappingEnvSource(FleetSettings, environ)

    class LoadedSettings(FleetSettings):
        @classmethod
        def settings_customise_sources(cls, settings_cls: type[BaseSettings], *_: Any, **__: Any) -> tuple:
            return env, toml

    return LoadedSettings


def load_config(path: str | Path | None = None, *, environ: Mapping[str, str] | None = None) -> FleetConfig:
    """Read the fleet config; raises :class:`ConfigError` naming the file (or variable) and the field."""
    environ = os.environ if environ is None else environ
    chosen = Path(path or environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH)
    try:
        settings = _settings_for(chosen, environ)()
    except SettingsError as error:
        raise ConfigError(f"invalid fleet config {chosen} (PIPEFLEET_* environment): {error}") from error
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, str(chosen))) from error
    return FleetConfig.model_validate({**dict(settings), "source": str(chosen)})
