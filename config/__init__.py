"""Fleet configuration: pydantic models loaded from TOML with environment overrides."""

from config.loader import CONFIG_ENV, DEFAULT_CONFIG_PATH, load_config
from config.models import (BatchSettings, Deployment, FleetConfig, FlowerSettings, GatewaySettings, Limits,
                           MediaSettings, WebhookSettings)

__all__ = [
    "BatchSettings",
    "CONFIG_ENV",
    "DEFAULT_CONFIG_PATH",
    "Deployment",
    "FleetConfig",
    "FlowerSettings",
    "GatewaySettings",
    "Limits",
    "MediaSettings",
    "WebhookSettings",
    "load_config",
]
