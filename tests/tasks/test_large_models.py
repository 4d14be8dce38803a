"""Large-model options of a deployment: dtype, device_map and quantization.

The CPU tests share one worker. The ``gpu`` tests start their own worker pinned
to a GPU and skip without CUDA. bitsandbytes on the CPU is tested in
tests/tasks/test_quantized_deployments.py, its start-up check in
tests/worker/test_quantization.py.
"""

from __future__ import annotations

import pytest

from tests.oracle import assert_same, local_pipeline
from tests.tasks.private_models import private_models

TEXTS = ["the cat sat on the mat", "a stormy night over the sea", "I love this film"]
#: bfloat16 keeps 8 bits of mantissa; the fleet and in-process run the same kernels, but batching differs.
BFLOAT16_TOLERANCE = 2e-2
FLOAT16_TOLERANCE = 5e-3


@pytest.fixture(scope="module")
def cpu_fleet(module_fleet, model_dir, tmp_path_factory):
    """One CPU worker: a bfloat16, a float16 and a device_map="auto" deployment."""
    paths = private_models(model_dir, tmp_path_factory.mktemp("models-large"),
                           {"tc": "text-classification", "gen": "text-generation"})
    tc, gen = paths["tc"], paths["gen"]
    config = module_fleet.config([
        {"name": "lm-bf16", "task": "text-classification", "model": tc, "dtype": "bfloat16"},
        {"name": "lm-f16", "task": "text-classification", "model": tc, "dtype": "float16"},
        {"name": "lm-auto-dtype", "task": "text-classification", "model": tc, "dtype": "auto"},
        {"name": "lm-map", "task": "text-generation", "model": gen, "device_map": "auto"},
    ])
    worker = module_fleet.worker(config, deployments=["lm-bf16", "lm-f16", "lm-auto-dtype", "lm-map"])
    return {"worker": worker, "text-classification": tc, "text-generation": gen}


def run(client, name, inputs, params=None):
    return client.submit(deployment=name, inputs=inputs, params=params or {}).result(timeout=120)


def test_bfloat16_on_cpu_equals_in_process_bfloat16(client, cpu_fleet):
    import torch

    local = local_pipeline("text-classification", cpu_fleet["text-classification"], dtype=torch.bfloat16)
    assert local.model.dtype == torch.bfloat16
    assert_same(run(client, "lm-bf16", TEXTS, {"top_k": None}), local(TEXTS, top_k=None), tol=BFLOAT16_TOLERANCE)
    assert_same(run(client, "lm-bf16", TEXTS[0]), local(TEXTS[0]), tol=BFLOAT16_TOLERANCE)


def test_float16_on_cpu_warns_and_still_serves(client, cpu_fleet):
    log = cpu_fleet["worker"].log()
    assert "'lm-f16': float16 on the CPU" in log
    assert "lm-bf16': float16" not in log
    result = run(client, "lm-f16", TEXTS[1], {"top_k": None})
    assert len(result) == 2 and all(0.0 <= item["score"] <= 1.0 for item in result)


def test_dtype_auto_uses_the_checkpoint_dtype(client, cpu_fleet):
    local = local_pipeline("text-classification", cpu_fleet["text-classification"], dtype="auto")
    assert_same(run(client, "lm-auto-dtype", TEXTS), local(TEXTS))


def test_device_map_auto_places_the_model_on_the_cpu(client, cpu_fleet):
    info = {d.name: d for d in client.deployments()}["lm-map"]
    assert info.task == "text-generation"
    local = local_pipeline("text-generation", cpu_fleet["text-generation"], device_map="auto")
    # Without accelerators accelerate puts every module on the CPU (transformers then keeps no hf_device_map).
    assert {str(d) for d in getattr(local.model, "hf_device_map", {"": "cpu"}).values()} <= {"cpu"}
    assert local.model.device.type == "cpu"
    params = {"max_new_tokens": 4, "do_sample": False}
    assert_same(run(client, "lm-map", TEXTS[:2], params), local(TEXTS[:2], **params))


def test_ads_advertise_how_each_deployment_was_built(client, cpu_fleet):
    built = {d.name: d.construction for d in client.deployments() if d.name.startswith("lm-")}
    assert (built["lm-bf16"].dtype, built["lm-bf16"].auto_dtype) == ("bfloat16", "float32")
    assert (built["lm-f16"].dtype, built["lm-auto-dtype"].dtype) == ("float16", "float32")
    assert built["lm-map"].device_map == "auto" and built["lm-auto-dtype"].device_map is None
    assert all(c.quantization is None and c.trust_remote_code is False for c in built.values())
    assert built["lm-bf16"].pipeline_class.endswith("TextClassificationPipeline")


def test_pipeline_dtype_picks_the_deployment_built_that_way(client, cpu_fleet):
    import torch

    from producers import UnknownDeployment, pipeline

    model = cpu_fleet["text-classification"]
    picked = {dtype: pipeline("text-classification", model=model, dtype=dtype, client=client).info.name
              for dtype in (torch.bfloat16, torch.float16, torch.float32, "auto")}
    assert picked == {torch.bfloat16: "lm-bf16", torch.float16: "lm-f16", torch.float32: "lm-auto-dtype",
                      "auto": "lm-auto-dtype"}
    # No dtype: in-process loads the checkpoint as it is, and so does the one deployment built that way.
    assert pipeline("text-classification", model=model, client=client).info.name == "lm-auto-dtype"
    pipe = pipeline("text-classification", model=model, torch_dtype=torch.bfloat16, device=0, client=client)
    local = local_pipeline("text-classification", model, dtype=torch.bfloat16)
    assert_same(pipe(TEXTS, top_k=None), local(TEXTS, top_k=None), tol=BFLOAT16_TOLERANCE)
    with pytest.raises(UnknownDeployment) as caught:
        pipeline("text-classification", model=model, dtype=torch.float64, client=client)
    for served in ("lm-bf16 (text-classification", "dtype bfloat16", "dtype float16", "dtype float32"):
        assert served in str(caught.value)


# --- GPU: these skip without CUDA (tests/conftest.py) -----------------------------------------------------


def _gpu_worker(fleet, model_dir, deployment: dict, gpu: str = "0"):
    entry = {"name": deployment["name"], "task": "text-generation", "model": str(model_dir("text-generation")),
             **deployment}
    config = fleet.config([entry])
    return fleet.worker(config, deployments=[entry["name"]], gpu=gpu)


def _gpu_reference(model_dir, **kwargs):
    from transformers import pipeline

    return pipeline("text-generation", model=str(model_dir("text-generation")), **kwargs)


@pytest.mark.gpu
def test_float16_on_cuda_equals_in_process(fleet, model_dir):
    import torch

    _gpu_worker(fleet, model_dir, {"name": "gpu-f16", "device": 0, "dtype": "float16"})
    local = _gpu_reference(model_dir, device=0, dtype=torch.float16)
    params = {"max_new_tokens": 4, "do_sample": False}
    with fleet.client() as client:
        assert_same(client.submit(deployment="gpu-f16", inputs=TEXTS[0], params=params).result(timeout=120),
                    local(TEXTS[0], **params))
        assert client.resolve(deployment="gpu-f16").devices == ["cuda:0"]


@pytest.mark.gpu
def test_device_map_auto_spans_every_pinned_gpu(fleet, model_dir):
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    _gpu_worker(fleet, model_dir, {"name": "gpu-map", "device_map": "auto", "dtype": "float16",
                                   "model_kwargs": {"max_memory": {"0": "200KiB", "1": "2GiB"}}}, gpu="0,1")
    params = {"max_new_tokens": 4, "do_sample": False}
    with fleet.client() as client:
        result = client.submit(deployment="gpu-map", inputs=TEXTS[0], params=params).result(timeout=120)
    assert result[0]["generated_text"].startswith(TEXTS[0])


@pytest.mark.gpu
@pytest.mark.parametrize("quantization", [
    {"load_in_8bit": True},
    {"load_in_4bit": True, "bnb_4bit_compute_dtype": "float16", "bnb_4bit_quant_type": "nf4"},
], ids=["8bit", "4bit"])
def test_bitsandbytes_quantization_serves(fleet, model_dir, quantization):
    from transformers import BitsAndBytesConfig

    name = "gpu-q8" if quantization.get("load_in_8bit") else "gpu-q4"
    _gpu_worker(fleet, model_dir, {"name": name, "model_kwargs": {"quantization_config": quantization}})
    import torch

    table = dict(quantization)
    if "bnb_4bit_compute_dtype" in table:
        table["bnb_4bit_compute_dtype"] = getattr(torch, table["bnb_4bit_compute_dtype"])
    local = _gpu_reference(model_dir, model_kwargs={"quantization_config": BitsAndBytesConfig(**table)})
    params = {"max_new_tokens": 4, "do_sample": False}
    with fleet.client() as client:
        result = client.submit(deployment=name, inputs=TEXTS[0], params=params).result(timeout=120)
        assert_same(result, local(TEXTS[0], **params))
        # bitsandbytes runs on the CPU too: the ad shows the worker placed the quantized model on the GPU.
        info = client.resolve(deployment=name)
        assert info.devices == ["cuda:0"] and local.model.device.type == "cuda"
        assert info.construction.quantization_summary.bits == (8 if name == "gpu-q8" else 4)
        # producers.pipeline reads the BitsAndBytesConfig object and matches it with the advertised one.
        from producers import UnknownDeployment, pipeline

        model = str(model_dir("text-generation"))
        pipe = pipeline(model=model, model_kwargs={"quantization_config": BitsAndBytesConfig(**table)}, client=client)
        assert pipe.info.name == name
        other = {"load_in_4bit": True} if name == "gpu-q8" else {"load_in_8bit": True}
        with pytest.raises(UnknownDeployment, match="quantization bitsandbytes"):
            pipeline(model=model, model_kwargs={"quantization_config": BitsAndBytesConfig(**other)}, client=client)
