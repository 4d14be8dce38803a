"""Construction options of ``producers.pipeline``: torch and transformers objects read duck-typed, matched to ads.

These run against real ``torch``/``transformers`` objects (the test process may import them; ``producers``
itself does not) and against advertisements as workers write them.
"""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoTokenizer, BitsAndBytesConfig

from producers.construction import (choose, describe, device_name, dtype_name, mismatches, quantization_dict,
                                    split_construction)
from producers.discovery import match_deployment
from producers.errors import UnknownDeployment
from producers.schemas import Construction, DeploymentInfo


def _info(name: str = "gen", model: str = "m", **construction) -> DeploymentInfo:
    built = Construction(**{"dtype": "float32", "auto_dtype": "float32", **construction})
    return DeploymentInfo(name=name, task="text-generation", model=model, queue=f"pipefleet.{name}",
                          workers=["w1"], devices=["cuda:1"], construction=built)


@pytest.mark.parametrize(("value", "name"), [
    (torch.bfloat16, "bfloat16"), (torch.float16, "float16"), ("torch.float32", "float32"), ("auto", "auto"),
    ("half", "float16"), (None, None),
])
def test_dtypes_are_read_by_name(value, name):
    assert dtype_name(value) == name


@pytest.mark.parametrize(("value", "name"), [
    (0, "cuda:0"), (-1, "cpu"), ("mps", "mps"), (torch.device("cpu"), "cpu"), (torch.device("cuda", 1), "cuda:1"),
])
def test_devices_are_read_duck_typed(value, name):
    assert device_name(value) == name


def test_split_keeps_call_params_and_reads_every_construction_option():
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    request, params = split_construction("m", {
        "device": torch.device("cuda", 0), "device_map": "auto", "torch_dtype": torch.bfloat16, "batch_size": 4,
        "trust_remote_code": False, "max_new_tokens": 5, "num_workers": 2, "token": "hf_x",
        "model_kwargs": {"quantization_config": quantization, "attn_implementation": "eager", "cache_dir": "/c"},
    })
    assert params == {"max_new_tokens": 5}
    assert (request.device, request.device_map, request.dtype, request.batch_size) == ("cuda:0", "auto",
                                                                                        "bfloat16", 4)
    assert request.quantization["load_in_4bit"] is True and request.quantization["quant_method"] == "bitsandbytes"
    assert request.quantization["bnb_4bit_compute_dtype"] == "bfloat16"
    assert request.model_kwargs == {"attn_implementation": "eager"}
    assert request.placement_kwargs == {"cache_dir": "/c"}


def test_placement_differences_pass_with_a_debug_log(caplog):
    request, _ = split_construction("m", {"device": 0, "device_map": "auto", "trust_remote_code": False,
                                          "dtype": "float32"})
    with caplog.at_level(logging.DEBUG, logger="producers.construction"):
        assert choose([_info(trust_remote_code=True)], request, "model='m'").name == "gen"
    assert "cuda:1" in caplog.text and all(r.levelno == logging.DEBUG for r in caplog.records)


@pytest.mark.parametrize(("options", "differs"), [
    ({"dtype": torch.bfloat16}, "dtype=bfloat16"),
    ({"model_kwargs": {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}}, "8-bit"),
    ({"model_kwargs": {"load_in_8bit": True}}, "8-bit"),
    ({"trust_remote_code": True}, "trust_remote_code=True"),
    ({"model_kwargs": {"attn_implementation": "eager"}}, "attn_implementation"),
    ({"tokenizer": "another/tokenizer"}, "tokenizer='another/tokenizer'"),
    ({"use_fast": False}, "use_fast=False"),
])
def test_an_output_changing_option_raises_naming_what_is_served(options, differs):
    request, _ = split_construction("m", options)
    with pytest.raises(UnknownDeployment) as caught:
        choose([_info()], request, "model='m'")
    message = str(caught.value)
    assert differs in message
    assert "gen (text-generation, m; dtype float32, quantization none, trust_remote_code off" in message


def test_dtype_auto_means_the_checkpoint_dtype():
    request, _ = split_construction("m", {"dtype": "auto"})
    assert mismatches(request, _info()) == []
    assert mismatches(request, _info(dtype="float16", auto_dtype="float32")) == ["dtype='auto' (float32 for this "
                                                                                "checkpoint)"]


def test_quantization_matches_the_advertised_config():
    served = _info(dtype="bfloat16", quantization={
        k: v for k, v in BitsAndBytesConfig(load_in_8bit=True).to_dict().items() if not k.startswith("_")} | {
        "quant_method": "bitsandbytes"})
    same, _ = split_construction("m", {"dtype": torch.bfloat16,
                                       "model_kwargs": {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}})
    assert mismatches(same, served) == []
    four_bit, _ = split_construction("m", {"model_kwargs": {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True)}})
    assert mismatches(four_bit, served) == ["quantization=bitsandbytes 4-bit (bnb_4bit_quant_type=fp4, "
                                            "bnb_4bit_compute_dtype=float32)"]
    assert "quantization bitsandbytes 8-bit" in describe(served)


def test_options_pick_one_of_several_builds_of_a_model():
    builds = [_info("gen-f32"), _info("gen-bf16", dtype="bfloat16")]
    pick = lambda **options: match_deployment(builds, task="text-generation", model="m", deployment=None,
                                               construction=split_construction("m", options)[0]).name
    assert pick(dtype=torch.bfloat16) == "gen-bf16"
    assert pick(dtype="float32") == "gen-f32"
    assert pick() == "gen-f32"  # in-process, no options load the checkpoint as it is
    with pytest.raises(UnknownDeployment, match="gen-f32 .*gen-bf16"):
        pick(dtype=torch.float16)


def test_component_objects_are_read_by_name(model_dir):
    path = str(model_dir("text-classification"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    request, _ = split_construction(path, {"tokenizer": tokenizer})
    assert request.components == {}
    by_name, _ = split_construction(None, {"tokenizer": "m"})
    assert mismatches(by_name, _info()) == [] and mismatches(by_name, _info(model="other")) == ["tokenizer='m'"]


def test_ads_of_older_workers_are_not_checked(caplog):
    old = DeploymentInfo(name="gen", task="text-generation", model="m", queue="q", workers=["w"], devices=["cpu"])
    request, _ = split_construction("m", {"dtype": torch.float16})
    with caplog.at_level(logging.WARNING, logger="producers.construction"):
        assert choose([old], request, "model='m'").name == "gen"
    assert "does not advertise" in caplog.text


def test_the_quantization_summary_reads_the_advertised_config_and_travels_as_json():
    from producers.schemas import QuantizationSummary

    nf4 = quantization_dict(BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True))
    info = _info(quantization=nf4)
    assert info.construction.quantization_summary == QuantizationSummary(
        method="bitsandbytes", bits=4, quant_type="nf4", compute_dtype="bfloat16", double_quant=True)
    eight = _info(dtype="bfloat16", quantization=quantization_dict(BitsAndBytesConfig(load_in_8bit=True)))
    assert eight.construction.quantization_summary.model_dump() == {
        "method": "bitsandbytes", "bits": 8, "quant_type": "int8", "compute_dtype": "bfloat16", "double_quant": None}
    assert _info().construction.quantization_summary is None
    # The summary is derived: an ad carrying it reads back (a client ignores it and derives its own).
    assert DeploymentInfo.model_validate_json(info.model_dump_json()) == info
