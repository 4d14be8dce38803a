"""Fleet configuration: pydantic models loaded from TOML with environment overrides."""

from config.loader import CONFIG_ENV, DEFAULT_CONFIG_PATH, load_config
from config.models import Deployment, FleetConfig, FlowerSettings, GatewaySettings, Limits, MediaSettings

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONFIG_PATH",
    "Deployment",
    "FleetConfig",
    "FlowerSettings",
    "GatewaySettings",
    "Limits",
    "MediaSettings",
    "load_config",
]
