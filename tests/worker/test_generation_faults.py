"""A worker killed mid-generation: the job is redelivered, completes, and its stream says it restarted."""

from __future__ import annotations

import os
import signal
import time

import pytest

from producers.schemas import EventKind
from tests.conftest import Fleet
from tests.oracle import local_pipeline

VISIBILITY_TIMEOUT_S = 4
PROMPT = "hello"  # the tiny Llama's greedy continuation runs past max_new_tokens
PARAMS = {"max_new_tokens": 600, "do_sample": False, "return_full_text": False}


@pytest.mark.parametrize("continuous", [True, False], ids=["continuous", "static"])
def test_sigkill_mid_generation_restarts_the_stream(fleet: Fleet, model_dir, continuous):
    model = str(model_dir("text-generation-llama"))
    name = "flt-gen-cb" if continuous else "flt-gen-static"
    deployment = {"name": name, "task": "text-generation", "model": model, "continuous_batching": continuous}
    config = fleet.config([deployment], visibility_timeout_s=VISIBILITY_TIMEOUT_S)
    victim = fleet.worker(config, deployments=[name])
    survivor = fleet.worker(config, deployments=[name])
    with fleet.client() as client:
        os.kill(survivor.proc.pid, signal.SIGSTOP)  # the victim takes the job
        try:
            job = client.submit(deployment=name, inputs=PROMPT, params=PARAMS, stream=True)
            events = job.events(timeout_s=120)
            first = next(event for event in events if event.kind is EventKind.TEXT)
        finally:
            os.kill(survivor.proc.pid, signal.SIGCONT)
        victim.proc.kill()
        victim.proc.wait(10)
        killed_at = time.monotonic()
        result = job.result(timeout=120)
        recovered_s = time.monotonic() - killed_at
        seen = [first, *events]
        replayed = list(client.job(job.id).events(timeout_s=30))
        streamed = "".join(client.job(job.id).stream(timeout_s=30))
        meta = client.celery.backend.get_task_meta(job.id)
    expected = local_pipeline("text-generation", model)(PROMPT, **PARAMS)
    assert result == expected
    assert meta["result"]["worker"] == survivor.name
    kinds = [event.kind for event in replayed]
    assert EventKind.RESTART in kinds, "the stream does not say the job restarted"
    assert kinds.index(EventKind.RESTART) > kinds.index(EventKind.TEXT)
    assert kinds[-1] is EventKind.DONE and seen[-1].kind is EventKind.DONE
    assert streamed == result[0]["generated_text"]
    print(f"FIGURES sigkill-generation-{name}: recovered_s={recovered_s:.1f}, events={len(replayed)}, "
          f"visibility_timeout_s={VISIBILITY_TIMEOUT_S}")
