"""The fleet returns exactly what in-process ``transformers.pipeline`` returns (foundation tasks)."""

from __future__ import annotations

import pytest

from producers import pipeline as fleet_pipeline
from tests.oracle import assert_same, local_pipeline

TEXTS = ["the cat sat on the mat", "a stormy night over the sea", "I love this film", "terrible service"]


@pytest.fixture(scope="module")
def deployments(module_fleet, model_dir):
    models = {kind: str(model_dir(kind)) for kind in ("text-classification", "text-generation", "feature-extraction")}
    config = module_fleet.config([
        {"name": "eq-tc", "task": "text-classification", "model": models["text-classification"]},
        {"name": "eq-tg", "task": "text-generation", "model": models["text-generation"], "max_batch_size": 4},
        {"name": "eq-fe", "task": "feature-extraction", "model": models["feature-extraction"]},
    ])
    module_fleet.worker(config, deployments=["eq-tc", "eq-tg", "eq-fe"])
    return models


CASES = [
    ("text-classification", TEXTS[0], {}),
    ("text-classification", TEXTS, {}),
    ("text-classification", TEXTS[1], {"top_k": None}),
    ("text-classification", TEXTS, {"top_k": 2}),
    ("text-classification", {"text": TEXTS[0], "text_pair": TEXTS[1]}, {}),
    ("text-classification", TEXTS[2], {"truncation": True}),
    ("text-generation", TEXTS[0], {"max_new_tokens": 5, "do_sample": False}),
    ("text-generation", TEXTS[:3], {"max_new_tokens": 4, "do_sample": False}),
    ("text-generation", TEXTS[1], {"max_new_tokens": 4, "return_full_text": False, "do_sample": False}),
    ("feature-extraction", TEXTS[0], {}),
    ("feature-extraction", TEXTS, {}),
]


@pytest.mark.parametrize(("task", "inputs", "params"), CASES,
                         ids=[f"{t}-{'list' if isinstance(i, list) else 'single'}-{p}" for t, i, p in CASES])
def test_fleet_equals_in_process(client, deployments, task, inputs, params):
    local = local_pipeline(task, deployments[task])(inputs, **params)
    fleet = client.submit(task=task, model=deployments[task], inputs=inputs, params=params).result(timeout=60)
    assert_same(fleet, local)


def test_pipeline_stand_in_matches_transformers(module_fleet, deployments):
    with module_fleet.client() as client:
        pipe = fleet_pipeline("text-classification", model=deployments["text-classification"], client=client)
        local = local_pipeline("text-classification", deployments["text-classification"])
        assert_same(pipe(TEXTS[0]), local(TEXTS[0]))
        assert_same(pipe(TEXTS, batch_size=2), local(TEXTS, batch_size=2))
        job = pipe.submit(TEXTS[3], top_k=1)
        assert_same(job.result(timeout=60), local(TEXTS[3], top_k=1))


async def _submit_async(client, model):
    job = await client.asubmit(task="text-classification", model=model, inputs=TEXTS[2])
    return await job.aresult(timeout=60)


def test_async_twins(client, deployments):
    import asyncio

    result = asyncio.run(_submit_async(client, deployments["text-classification"]))
    assert_same(result, local_pipeline("text-classification", deployments["text-classification"])(TEXTS[2]))


def test_deployments_lists_what_workers_advertise(client, deployments):
    names = {info.name: info for info in client.deployments()}
    assert {"eq-tc", "eq-tg", "eq-fe"} <= set(names)
    assert names["eq-tg"].task == "text-generation"
    assert names["eq-tg"].model == deployments["text-generation"]
    assert names["eq-tc"].devices == ["cpu"]
