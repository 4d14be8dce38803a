"""Loading the fleet config: the shipped example, env overrides, and clear errors."""

from __future__ import annotations

import pytest

from config import DEFAULT_CONFIG_PATH, load_config
from producers.errors import ConfigError


def test_shipped_example_loads():
    config = load_config(DEFAULT_CONFIG_PATH, environ={})
    assert config.broker_url == "redis://127.0.0.1:6379/0"
    assert config.result_backend == "redis://127.0.0.1:6379/1"
    names = [d.name for d in config.deployments]
    assert "sentiment" in names
    sentiment = config.deployment("sentiment")
    assert sentiment.max_batch_size == 32 and sentiment.max_batch_wait_ms == 5
    assert sentiment.trust_remote_code is False
    llm = config.deployment("llm")
    assert llm.model_kwargs["quantization_config"]["load_in_4bit"] is True


def test_env_overrides_top_level_and_nested(tmp_path):
    path = tmp_path / "fleet.toml"
    path.write_text('[[deployments]]\nname = "a"\ntask = "text-classification"\nmodel = "m"\n')
    config = load_config(path, environ={
        "PIPEFLEET_BROKER_URL": "redis://:secret@redis.internal:6380/0",
        "PIPEFLEET_VISIBILITY_TIMEOUT_S": "42",
        "PIPEFLEET_LIMITS__MAX_INPUTS_PER_JOB": "7",
    })
    assert config.broker_url == "redis://:secret@redis.internal:6380/0"
    assert config.visibility_timeout_s == 42
    assert config.limits.max_inputs_per_job == 7


def test_pipefleet_config_env_picks_the_file(tmp_path):
    path = tmp_path / "other.toml"
    path.write_text('result_ttl_s = 60\n')
    assert load_config(environ={"PIPEFLEET_CONFIG": str(path)}).result_ttl_s == 60


@pytest.mark.parametrize(("body", "field"), [
    ('[[deployments]]\nname = "a"\ntask = "text-classification"\nmodel = "m"\nmax_batch_size = 0\n',
     "deployments[0].max_batch_size"),
    ('[[deployments]]\nname = "a"\ntask = "text-classification"\n', "deployments[0].model"),
    ('visibility_timeout_s = "soon"\n', "visibility_timeout_s"),
    ('[[deployments]]\nname = "a"\ntask = "t"\nmodel = "m"\ndtype = "float8"\n', "deployments[0].dtype"),
    ('[[deployments]]\nname = "a"\ntask = "t"\nmodel = "m"\nunknown_key = 1\n', "deployments[0].unknown_key"),
    ('[[deployments]]\nname = "a"\ntask = "text-classification"\nmodel = "m"\ncontinuous_batching = true\n',
     "continuous_batching"),
    ('[[deployments]]\nname = "a"\ntask = "text-generation"\nmodel = "m"\ncontinuous_batching = true\n'
     '[deployments.continuous_batching_options]\nmax_batch_tokens = 0\n',
     "deployments[0].continuous_batching_options.max_batch_tokens"),
])
def test_invalid_file_names_the_field_and_the_file(tmp_path, body, field):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(ConfigError) as error:
        load_config(path, environ={})
    assert str(path) in str(error.value)
    assert field in str(error.value)


def test_duplicate_deployment_names_are_refused(tmp_path):
    path = tmp_path / "dup.toml"
    path.write_text('[[deployments]]\nname = "a"\ntask = "t"\nmodel = "m"\n' * 2)
    with pytest.raises(ConfigError, match="repeated: a"):
        load_config(path, environ={})


def test_not_toml_and_missing_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("this is = = not toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path, environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml", environ={})


def test_environment_values_that_are_not_json_are_refused_naming_the_field(tmp_path):
    path = tmp_path / "fleet.toml"
    path.write_text("redis_write_retry_s = 5\n")
    assert load_config(path, environ={}).redis_write_retry_s == 5
    assert load_config(path, environ={"PIPEFLEET_REDIS_WRITE_RETRY_S": "60"}).redis_write_retry_s == 60
    with pytest.raises(ConfigError, match=r"media\.allowed_hosts: Input should be a valid list"):
        load_config(path, environ={"PIPEFLEET_MEDIA__ALLOWED_HOSTS": "a.example"})
    assert load_config(path, environ={"PIPEFLEET_DEPLOYMENTS": "[1]"}).deployments == []  # only from the file
