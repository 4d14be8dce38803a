"""The ``[gateway]`` table: keys from the file or the environment, caps defaulting to ``[limits]``."""

from __future__ import annotations

import pytest

from config import load_config
from producers.errors import ConfigError

BASE = 'broker_url = "redis://127.0.0.1:1/0"\n'


def test_keys_come_from_the_environment_as_json_or_comma_separated(tmp_path):
    path = tmp_path / "fleet.toml"
    path.write_text(BASE + '[gateway]\napi_keys = ["file-key-0123456789"]\ncors_origins = ["https://a.example"]\n')
    assert load_config(path, environ={}).gateway.api_keys == ["file-key-0123456789"]
    as_json = load_config(path, environ={"PIPEFLEET_GATEWAY__API_KEYS": '["env-key-0123456789abc"]'})
    assert as_json.gateway.api_keys == ["env-key-0123456789abc"]
    as_list = load_config(path, environ={"PIPEFLEET_GATEWAY__API_KEYS": "one-key-0123456789, two-key-0123456789"})
    assert as_list.gateway.api_keys == ["one-key-0123456789", "two-key-0123456789"]
    assert as_list.gateway.cors_origins == ["https://a.example"]


def test_short_keys_and_unknown_fields_are_config_errors(tmp_path):
    path = tmp_path / "fleet.toml"
    path.write_text(BASE + '[gateway]\napi_keys = ["short"]\n')
    with pytest.raises(ConfigError, match="gateway.api_keys"):
        load_config(path, environ={})
    path.write_text(BASE + '[gateway]\nmax_wait = 5\n')
    with pytest.raises(ConfigError, match="gateway.max_wait"):
        load_config(path, environ={})


def test_caps_default_to_the_limits(tmp_path):
    from gateway.state import GatewayState

    path = tmp_path / "fleet.toml"
    path.write_text(BASE + "[limits]\nmax_payload_bytes = 1234\nmax_inputs_per_job = 7\n")
    config = load_config(path, environ={})
    state = GatewayState(client=None, config=config, metrics=None)
    assert (state.max_body_bytes, state.max_inputs) == (1234, 7)
    path.write_text(BASE + "[gateway]\nmax_body_bytes = 99\nmax_inputs_per_request = 3\nmax_wait_s = 2\n")
    state = GatewayState(client=None, config=load_config(path, environ={}), metrics=None)
    assert (state.max_body_bytes, state.max_inputs, state.clamp_wait(30)) == (99, 3, 2)
