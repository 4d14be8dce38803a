"""The start-up check of quantized deployments, asked of the installed bitsandbytes on this CPU machine.

The worker refusing to start on a failed check is tested with a real worker in
tests/worker/test_worker_process.py; quantized deployments serving jobs, in
tests/tasks/test_quantized_deployments.py.
"""

from __future__ import annotations

import sys

import pytest

from config.models import Deployment
from producers.errors import ConfigError
from worker.quantization import bitsandbytes_config, check_can_load, target_device_types


def deployment(**settings) -> Deployment:
    return Deployment(name="qd", task="text-classification", model="some/model", **settings)


@pytest.mark.parametrize("table", [
    {"load_in_8bit": True},
    {"load_in_4bit": True},
    {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "bfloat16",
     "bnb_4bit_use_double_quant": True, "bnb_4bit_quant_storage": "bfloat16"},
    {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_compute_dtype": "float16"},
], ids=["8bit", "4bit-defaults", "nf4-bfloat16-double", "fp4-float16"])
def test_bitsandbytes_runs_every_method_on_the_cpu(table):
    import torch

    config = bitsandbytes_config(deployment(), table)
    if "bnb_4bit_compute_dtype" in table:
        assert config.bnb_4bit_compute_dtype == getattr(torch, table["bnb_4bit_compute_dtype"])
    check_can_load(deployment(), config)


def test_placement_decides_where_the_check_runs():
    assert target_device_types(deployment()) == ["cpu"]  # no accelerator on this machine
    assert target_device_types(deployment(device_map="auto")) == ["cpu"]
    assert target_device_types(deployment(device="cpu")) == ["cpu"]
    assert target_device_types(deployment(device=-1)) == ["cpu"]
    assert target_device_types(deployment(device=0)) == ["cuda"]
    assert target_device_types(deployment(device_map={"model": 0, "lm_head": "cpu"})) == ["cpu", "cuda"]


def test_a_config_bitsandbytes_cannot_run_names_the_deployment_and_bitsandbytes_answer():
    config = bitsandbytes_config(deployment(), {"load_in_4bit": True, "bnb_4bit_quant_type": "int4"})
    with pytest.raises(ConfigError) as caught:
        check_can_load(deployment(), config)
    message = str(caught.value)
    assert message.startswith("deployment 'qd': quantization_config (4-bit int4, compute float32): bitsandbytes 0.")
    assert "cannot run it on 'cpu'" in message and "quant_type must be 'nf4' or 'fp4'" in message


def test_a_device_bitsandbytes_has_no_backend_for_is_named():
    config = bitsandbytes_config(deployment(), {"load_in_8bit": True})
    with pytest.raises(ConfigError, match=r"deployment 'qd': quantization_config \(8-bit \(LLM.int8\)\): "
                                          r"bitsandbytes .* quantizes on cpu, cuda, .* and this deployment "
                                          r"would place weights on 'disk'"):
        check_can_load(deployment(device_map={"model": "cpu", "lm_head": "disk"}), config)


def test_a_device_this_worker_lacks_is_named():
    config = bitsandbytes_config(deployment(), {"load_in_8bit": True})
    with pytest.raises(ConfigError, match="runs on 'cuda', and this worker has no such device"):
        check_can_load(deployment(device=0), config)


def test_without_the_bitsandbytes_package_the_check_says_what_to_install(monkeypatch):
    # This machine has bitsandbytes; a None entry makes ``import bitsandbytes`` fail as on one without it.
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    config = bitsandbytes_config(deployment(), {"load_in_8bit": True})
    with pytest.raises(ConfigError, match=r"deployment 'qd': quantization_config \(8-bit \(LLM.int8\)\) needs the "
                                          r"'bitsandbytes' package.*pip install 'pipefleet\[quantization\]'"):
        check_can_load(deployment(), config)


@pytest.mark.parametrize("table, expected", [
    ({"load_in_4bit": True, "bnb_4bit_quant_typ": "nf4"}, r"unknown keys \['bnb_4bit_quant_typ'\]"),
    ({"bnb_4bit_quant_type": "nf4"}, "sets neither load_in_8bit nor load_in_4bit"),
    ({"load_in_4bit": True, "bnb_4bit_compute_dtype": "float33"}, "'float33' is not a torch dtype"),
    ({"load_in_4bit": True, "bnb_4bit_compute_dtype": "int8"}, "must be a floating-point dtype, not int8"),
    ({"load_in_4bit": True, "load_in_8bit": True}, "invalid quantization_config: load_in_4bit and load_in_8bit"),
], ids=["misspelt-key", "no-bits", "not-a-dtype", "integer-compute", "both"])
def test_a_bad_table_is_refused_naming_what_is_wrong(table, expected):
    with pytest.raises(ConfigError, match=expected) as caught:
        bitsandbytes_config(deployment(), table)
    assert str(caught.value).startswith("deployment 'qd': ")
