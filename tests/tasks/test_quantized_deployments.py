"""bitsandbytes 8-bit and 4-bit deployments on the CPU, against the in-process pipeline loaded the same way.

One worker serves the fleet docs/quantization.md configures (a classifier
unquantized, in 8-bit, 4-bit fp4 and 4-bit nf4), a tiny Llama in 8-bit, nf4
and fp4, and the seed guide's ``google/gemma-7b`` stand-in in bfloat16 and
8-bit; the docs' hub id is the tiny classifier. The oracle is
``transformers.pipeline(..., model_kwargs={"quantization_config": BitsAndBytesConfig(...)})``
in this process, with the same config. The page's Python blocks run here too.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
from functools import cache
from typing import Any

import pytest

from tests.fleet import REPO_ROOT, deployment_metrics, worker_env
from tests.oracle import assert_same
from tests.tasks.private_models import private_models
from tests.test_seed_guide import QUANTIZED, run_block

DOCS_PAGE = REPO_ROOT / "docs" / "quantization.md"
DOCS_MODEL = "distilbert/distilbert-base-uncased-finetuned-sst-2-english"


def docs_blocks(language: str) -> list[str]:
    """The page's fenced blocks of ``language``, in page order."""
    fences = re.finditer(rf"^( *)```{language}\n(.*?)^\1```", DOCS_PAGE.read_text(), flags=re.MULTILINE | re.DOTALL)
    return [textwrap.dedent(match.group(2)) for match in fences]


#: The page's fleet config: deployments of DOCS_MODEL.
DOCS_DEPLOYMENTS = {d["name"]: d for d in tomllib.loads(docs_blocks("toml")[0])["deployments"]}
TEXTS = ["the cat sat on the mat", "a stormy night over the sea in winter", "i love this film",
         "alice lives in paris and works as a baker.", "nobody liked the boring train near oslo."]
GENERATION = {"max_new_tokens": 4, "do_sample": False}


#: The page's deployments share one model, so that construction matching tells them apart; 4-bit CPU kernels need
#: the wide tiny models (``tests.tiny_models.text.BNB_4BIT_WIDTH``).
DOCS_KIND = "text-classification-wide"
#: deployment -> (task, tiny model kind, quantization_config as the fleet TOML writes it).
QUANTIZED_DEPLOYMENTS = {
    **{name: ("text-classification", DOCS_KIND, d["model_kwargs"]["quantization_config"])
       for name, d in DOCS_DEPLOYMENTS.items() if "quantization_config" in d.get("model_kwargs", {})},
    "llama-8bit": ("text-generation", "text-generation-llama", {"load_in_8bit": True}),
    "llama-nf4": ("text-generation", "text-generation-llama-wide", {
        "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "float32"}),
    "llama-fp4": ("text-generation", "text-generation-llama-wide", {
        "load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_compute_dtype": "float32"}),
}
#: Measured: scores equal in-process to within 1e-7 (fp4, float32), exactly elsewhere, batched or not. A batch
#: pads inputs to one shape, and bfloat16 compute (sst2-nf4) keeps 8 mantissa bits, so another shape may round
#: a last bit differently; 8-bit picks its float16 outlier columns over the whole batch.
QUANTIZED_TOLERANCE = 1e-3
SEED_GUIDE_STAND_IN = "gemma-7b-8bit"
API_KEY = "quantized-test-key-0123456789"


def bnb_config(table: dict[str, Any]):
    """A ``BitsAndBytesConfig`` from a TOML-style table, as a user would write it in Python."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(**{k: getattr(torch, v) if k == "bnb_4bit_compute_dtype" else v
                                 for k, v in table.items()})


@pytest.fixture(scope="module")
def served(module_fleet, model_dir, tmp_path_factory):
    """The worker serving every deployment of this module; returns deployment -> model path."""
    root = tmp_path_factory.mktemp("models-quantized")
    kinds = {name: kind for name, (_, kind, _) in QUANTIZED_DEPLOYMENTS.items()}
    paths = private_models(model_dir, root, {**kinds, **{name: DOCS_KIND for name in DOCS_DEPLOYMENTS}})
    stand_in = root / SEED_GUIDE_STAND_IN
    shutil.copytree(model_dir("text-generation"), stand_in)
    generation = stand_in / "generation_config.json"
    generation.write_text(json.dumps({**json.loads(generation.read_text()), "do_sample": False, "max_new_tokens": 6}))
    paths[SEED_GUIDE_STAND_IN] = str(stand_in)
    deployments = [{**d, "model": paths[name]} for name, d in DOCS_DEPLOYMENTS.items()]
    deployments += [{"name": name, "task": task, "model": paths[name], "model_kwargs": {"quantization_config": table}}
                    for name, (task, _, table) in QUANTIZED_DEPLOYMENTS.items() if name not in DOCS_DEPLOYMENTS]
    deployments.append({
        "name": SEED_GUIDE_STAND_IN, "task": "text-generation", "model": paths[SEED_GUIDE_STAND_IN],
        "dtype": "bfloat16", "device_map": "auto", "model_kwargs": {"quantization_config": {"load_in_8bit": True}}})
    deployments = [{"max_batch_size": 8, "max_batch_wait_ms": 20, **d} for d in deployments]
    config = module_fleet.config(deployments, gateway={"api_keys": [API_KEY]})
    worker = module_fleet.worker(config, deployments=[d["name"] for d in deployments])
    module_fleet.quantized_config = config
    module_fleet.quantized_worker = worker
    return paths


def _params(name: str) -> dict[str, Any]:
    return GENERATION if QUANTIZED_DEPLOYMENTS[name][0] == "text-generation" else {"top_k": None}


@cache
def in_process(name: str, model: str):
    """The in-process pipeline of deployment ``name``, loaded with the same ``BitsAndBytesConfig``."""
    from transformers import pipeline

    task, _, table = QUANTIZED_DEPLOYMENTS[name]
    return pipeline(task, model=model, model_kwargs={"quantization_config": bnb_config(table)})


@cache
def in_process_outputs(name: str, model: str) -> list[Any]:
    """What the in-process pipeline returns for each of TEXTS."""
    return in_process(name, model)(TEXTS, **_params(name))


def forward_passes(client, deployment: str) -> int:
    """How many batches ``deployment`` has run, as its worker's ``pipefleet_metrics`` reply counts them."""
    return deployment_metrics(client.celery, deployment)["batch_size"]["count"]


@pytest.mark.parametrize("name", list(QUANTIZED_DEPLOYMENTS))
def test_single_list_and_batched_jobs_equal_in_process(client, served, name):
    expected = in_process_outputs(name, served[name])
    params = _params(name)
    single = client.submit(deployment=name, inputs=TEXTS[0], params=params).result(timeout=120)
    assert_same(single, expected[0], tol=QUANTIZED_TOLERANCE)
    as_list = client.submit(deployment=name, inputs=TEXTS, params=params).result(timeout=120)
    assert_same(as_list, expected, tol=QUANTIZED_TOLERANCE)
    # Published in one round trip, these are claimed together and share forward passes.
    before = forward_passes(client, name)
    jobs = client.submit_many([{"deployment": name, "inputs": text, "params": params} for text in TEXTS * 2])
    assert_same([job.result(timeout=120) for job in jobs], expected * 2, tol=QUANTIZED_TOLERANCE)
    assert forward_passes(client, name) - before < len(jobs), "the jobs ran one forward pass each"


@pytest.mark.parametrize("name", list(QUANTIZED_DEPLOYMENTS))
def test_drop_in_pipeline_reaches_the_deployment_built_the_same_way(client, served, name):
    from producers import pipeline

    task, _, table = QUANTIZED_DEPLOYMENTS[name]
    pipe = pipeline(task, model=served[name], model_kwargs={"quantization_config": bnb_config(table)}, client=client)
    assert pipe.info.name == name
    assert_same(pipe(TEXTS[:3], **_params(name)), in_process_outputs(name, served[name])[:3],
                tol=QUANTIZED_TOLERANCE)


def test_drop_in_as_users_write_it(client, served):
    import torch
    from transformers import BitsAndBytesConfig

    from producers import pipeline

    model = served["sst2-8bit"]
    eight = pipeline("text-classification", model=model, client=client,
                     model_kwargs={"quantization_config": BitsAndBytesConfig(load_in_8bit=True)})
    four = pipeline("text-classification", model=model, client=client, model_kwargs={
        "quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32,
                                                  llm_int8_skip_modules=["classifier"])})
    plain = pipeline("text-classification", model=model, client=client)
    as_dict = pipeline("text-classification", model=model, client=client,
                       model_kwargs={"quantization_config": {"load_in_8bit": True}})
    assert (eight.info.name, four.info.name, plain.info.name, as_dict.info.name) == (
        "sst2-8bit", "sst2-fp4", "sst2", "sst2-8bit")


def test_a_mismatched_quantization_config_names_what_is_served(client, served):
    import torch
    from transformers import BitsAndBytesConfig

    from producers import UnknownDeployment, pipeline

    asked = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float16)
    with pytest.raises(UnknownDeployment) as caught:
        pipeline("text-classification", model=served["sst2"], client=client,
                 model_kwargs={"quantization_config": asked})
    message = str(caught.value)
    assert "quantization=bitsandbytes 4-bit (bnb_4bit_quant_type=nf4, bnb_4bit_compute_dtype=float16)" in message
    for served_as in ("sst2-8bit (text-classification", "quantization bitsandbytes 8-bit",
                      "sst2-nf4 (text-classification", "bnb_4bit_quant_type=nf4, bnb_4bit_compute_dtype=bfloat16",
                      "sst2-fp4 (text-classification", "bnb_4bit_quant_type=fp4, bnb_4bit_compute_dtype=float32",
                      "sst2 (text-classification", "quantization none"):
        assert served_as in message, served_as


EXPECTED_SUMMARIES = {
    "sst2-8bit": {"method": "bitsandbytes", "bits": 8, "quant_type": "int8", "compute_dtype": "float32",
                  "double_quant": None},
    "sst2-nf4": {"method": "bitsandbytes", "bits": 4, "quant_type": "nf4", "compute_dtype": "bfloat16",
                 "double_quant": True},
    "sst2-fp4": {"method": "bitsandbytes", "bits": 4, "quant_type": "fp4", "compute_dtype": "float32",
                 "double_quant": False},
    SEED_GUIDE_STAND_IN: {"method": "bitsandbytes", "bits": 8, "quant_type": "int8", "compute_dtype": "bfloat16",
                          "double_quant": None},
    "sst2": None,
}


def test_pipefleet_deployments_shows_the_quantization(module_fleet, served):
    result = subprocess.run(
        [sys.executable, "-m", "producers.cli", "--broker-url", module_fleet.broker_url, "--result-backend",
         module_fleet.result_backend, "deployments"],
        cwd=REPO_ROOT, env=worker_env(), capture_output=True, text=True, timeout=60, check=True)
    shown = {d["name"]: d["construction"]["quantization_summary"] for d in json.loads(result.stdout)}
    assert {name: shown[name] for name in EXPECTED_SUMMARIES} == EXPECTED_SUMMARIES


def test_openai_models_list_shows_the_quantization(module_fleet, served, tmp_path_factory):
    from openai import OpenAI

    from tests.gateway.server import start_gateway

    gateway = start_gateway(module_fleet.quantized_config, tmp_path_factory.mktemp("gateway-quantized"))
    try:
        models = OpenAI(base_url=f"{gateway.url}/v1", api_key=API_KEY).models.list()
    finally:
        gateway.stop()
    shown = {model.id: model.model_extra["quantization"] for model in models.data}
    assert {name: shown[name] for name in EXPECTED_SUMMARIES} == EXPECTED_SUMMARIES
    docs_card = json.loads(docs_blocks("json")[0])
    assert docs_card["quantization"] == shown[docs_card["id"]]


@pytest.fixture
def fleet_env(module_fleet, monkeypatch):
    """Environment of code written for ``FleetClient.from_env()``."""
    monkeypatch.setenv("PIPEFLEET_BROKER_URL", module_fleet.broker_url)
    monkeypatch.setenv("PIPEFLEET_RESULT_BACKEND", module_fleet.result_backend)


def test_the_seed_guides_quantized_block_runs_unchanged(served, fleet_env):
    """The guide's block with only its import swapped, against a fleet serving the model quantized that way."""
    block = QUANTIZED.replace('"google/gemma-7b"', repr(served[SEED_GUIDE_STAND_IN]))
    on_fleet = block.replace("from transformers import pipeline, BitsAndBytesConfig",
                             "from producers import pipeline\nfrom transformers import BitsAndBytesConfig")
    # In-process and offline, transformers cannot infer the task of a local model without one.
    local = block.replace("pipeline(model=", 'pipeline(task="text-generation", model=')
    fleet_outcome, local_outcome = run_block(on_fleet, {}), run_block(local, {})
    assert local_outcome.error is None and fleet_outcome.error is None, (local_outcome.error, fleet_outcome.error)
    assert fleet_outcome.value[0]["generated_text"].startswith("the secret to baking a good cake is ")
    assert_same(fleet_outcome.value, local_outcome.value)


def _exec_keeping_last_value(source: str, namespace: dict[str, Any]) -> Any:
    tree = ast.parse(source)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, str(DOCS_PAGE), "exec"), namespace)
    return None if last is None else eval(compile(ast.Expression(last.value), str(DOCS_PAGE), "eval"), namespace)


def test_the_docs_python_blocks_run_on_the_fleet(served, fleet_env):
    printed: list[Any] = []
    namespace: dict[str, Any] = {"print": lambda *args: printed.append(" ".join(map(str, args)))}
    blocks = [block.replace(repr(DOCS_MODEL).replace("'", '"'), repr(served["sst2"])) for block in docs_blocks("python")]
    values = [_exec_keeping_last_value(block, namespace) for block in blocks]
    assert namespace["classifier"].info.name == "sst2-nf4"
    texts = ["I love this film", "a stormy night over the sea"]
    assert_same(values[0], in_process("sst2-nf4", served["sst2-nf4"])(texts, top_k=None), tol=QUANTIZED_TOLERANCE)
    mismatch = next(line for line in printed if line.startswith("no live deployment serves"))
    assert "bnb_4bit_compute_dtype=float16" in mismatch and "sst2-nf4 (text-classification" in mismatch
    summaries = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in printed if line.startswith("sst2")}
    assert summaries["sst2"] == "None"
    assert summaries["sst2-fp4"] == ("method='bitsandbytes' bits=4 quant_type='fp4' compute_dtype='float32' "
                                     "double_quant=False")


def test_the_worker_logs_what_bitsandbytes_runs_and_the_per_call_warning_once(module_fleet, served):
    log = module_fleet.quantized_worker.log()
    assert "deployment sst2-nf4: bitsandbytes" in log and "runs 4-bit nf4, compute bfloat16, double quantization" in log
    assert "deployment llama-8bit: bitsandbytes" in log and "runs 8-bit (LLM.int8) on cpu" in log
    assert log.count("MatMul8bitLt: inputs will be cast from torch.float32 to float16") == 1
