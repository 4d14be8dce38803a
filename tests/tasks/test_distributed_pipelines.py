"""Distributed chunk pipelines: windows spread over two workers, output equal to the in-process chunked call."""

from __future__ import annotations

import numpy as np
import pytest

from tests.oracle import assert_same, local_pipeline
from tests.tiny_models.audio import SAMPLING_RATE

ASR, ZSC = "dist-asr", "dist-zsc"
LABELS = ["animals", "weather", "sports", "cinema", "food", "travel", "music", "science", "politics", "art",
          "history", "games"]


def synthetic_audio(seconds: float) -> np.ndarray:
    """Tones that change every half second over low noise: deterministic, and not silent anywhere."""
    rng = np.random.default_rng(7)
    t = np.arange(int(seconds * SAMPLING_RATE)) / SAMPLING_RATE
    freqs = rng.uniform(120, 2000, size=int(seconds * 2) + 1)[(t * 2).astype(int)]
    audio = 0.4 * np.sin(2 * np.pi * freqs * t) + 0.05 * rng.standard_normal(t.shape)
    return audio.astype(np.float32)


@pytest.fixture(scope="module", autouse=True)
def models(module_fleet, model_dir):
    paths = {ASR: str(model_dir("asr-ctc")), ZSC: str(model_dir("zero-shot-classification"))}
    config = module_fleet.config([
        {"name": ASR, "task": "automatic-speech-recognition", "model": paths[ASR], "max_batch_size": 4},
        {"name": ZSC, "task": "zero-shot-classification", "model": paths[ZSC], "max_batch_size": 8},
    ])
    for _ in range(2):
        module_fleet.worker(config, deployments=[ASR, ZSC], args=["--concurrency", "3"])
    return paths


@pytest.fixture(scope="module")
def audio() -> np.ndarray:
    return synthetic_audio(60.0)


def _window_workers(client, job) -> set[str]:
    record = job._record()
    return {client.celery.backend.get_task_meta(cid)["result"]["worker"] for cid in record["chunk_ids"]}


@pytest.mark.parametrize("timestamps", [None, "word", "char"])
def test_distributed_asr_equals_in_process_chunking(client, models, audio, timestamps):
    params = {"chunk_length_s": 8.0, "stride_length_s": 1.5}
    if timestamps:
        params["return_timestamps"] = timestamps
    local = local_pipeline("automatic-speech-recognition", models[ASR])(audio.copy(), **params)
    job = client.submit(deployment=ASR, inputs={"array": audio, "sampling_rate": SAMPLING_RATE}, params=params)
    fleet = job.result(timeout=180)
    assert_same(fleet, local)
    record = job._record()
    assert record["unit"] == "windows" and record["total"] == len(record["chunk_ids"]) >= 8
    assert job.status().done == record["total"]
    if timestamps is None:
        assert len(_window_workers(client, job)) == 2, "the windows should spread over both workers"


@pytest.mark.parametrize("params", [{}, {"multi_label": True}, {"hypothesis_template": "This text is about {}."}],
                         ids=["softmax", "multi_label", "template"])
def test_distributed_zero_shot_equals_in_process(client, models, params):
    text = "the storm rolled over the stadium before the match"
    local = local_pipeline("zero-shot-classification", models[ZSC])(text, candidate_labels=LABELS, **params)
    job = client.submit(deployment=ZSC, inputs=text, params={"candidate_labels": LABELS, **params})
    assert_same(job.result(timeout=60), local)
    assert job._record()["total"] == len(LABELS)  # one forward pass per label


def test_few_labels_and_lists_stay_on_one_worker(client, models):
    texts = ["a cat on a mat", "rain all day"]
    local = local_pipeline("zero-shot-classification", models[ZSC])
    job = client.submit(deployment=ZSC, inputs=texts, params={"candidate_labels": LABELS})
    assert_same(job.result(timeout=60), local(texts, candidate_labels=LABELS))
    assert job._record() is None
