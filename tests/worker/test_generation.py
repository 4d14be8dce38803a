"""Text generation on a real worker: token streaming (static and continuous) and continuous batching fidelity.

One worker serves a tiny Llama twice: ``gen-static`` (static batches) and
``gen-cb`` (``continuous_batching = true``, transformers' engine). The oracle
is in-process ``transformers.pipeline`` on the same model.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from producers import InvalidParams, JobCancelled, JobState, JobTimeout
from producers import pipeline as fleet_pipeline
from producers.schemas import EventKind
from tests.fleet import free_port
from tests.oracle import assert_same, local_pipeline
from tests.worker.test_prometheus import _scrape, _value
from tests.tasks.private_models import private_models

PROMPTS = ["hello", "the quick brown fox jumps over the lazy dog and runs far away", "a stormy night"]
CHAT = [{"role": "user", "content": "where does alice live?"}]
CHAT_TURNS = [{"role": "system", "content": "answer briefly"}, {"role": "user", "content": "hi"},
              {"role": "assistant", "content": "hello"}, {"role": "user", "content": "what about bob?"}]
GREEDY = {"do_sample": False}
METRICS_PORT = free_port()
#: The tiny Llama does not end this prompt's greedy continuation within 2,000 tokens (others stop early).
LONG_PROMPT = "hello"


@pytest.fixture(scope="module")
def model(module_fleet, model_dir, tmp_path_factory):
    """One worker serving the tiny Llama statically and through continuous batching; returns its path."""
    path = private_models(model_dir, tmp_path_factory.mktemp("models-gen"), {"llama": "text-generation-llama"})
    path = path["llama"]
    config = module_fleet.config([
        {"name": "gen-static", "task": "text-generation", "model": path, "max_batch_size": 8},
        {"name": "gen-cb", "task": "text-generation", "model": path, "continuous_batching": True,
         "continuous_batching_options": {"max_batch_tokens": 256, "num_blocks": 32, "page_size": 64}},
        {"name": "gen-cb-sample", "task": "text-generation", "model": path, "continuous_batching": True,
         "continuous_batching_options": {"num_blocks": 32, "page_size": 64, "do_sample": True, "top_p": 0.95}},
    ])
    module_fleet.worker(config, deployments=["gen-static", "gen-cb", "gen-cb-sample"], args=["--metrics-port", str(METRICS_PORT)])
    return path


def local(model):
    return local_pipeline("text-generation", model)


FIDELITY_CASES = [
    (PROMPTS[1], {"max_new_tokens": 12}),
    (PROMPTS[0], {"max_new_tokens": 7, "return_full_text": False}),
    (PROMPTS, {"max_new_tokens": 9}),
    (CHAT, {"max_new_tokens": 8}),
    (CHAT_TURNS, {"max_new_tokens": 6, "return_full_text": False}),
    ([CHAT, CHAT_TURNS], {"max_new_tokens": 5}),
]


@pytest.mark.parametrize("inputs,params", FIDELITY_CASES,
                         ids=["single", "single-new-text", "list", "chat", "chat-new-text", "list-of-chats"])
def test_continuous_greedy_equals_in_process_pipeline(client, model, inputs, params):
    params = {**params, **GREEDY}
    fleet = client.submit(deployment="gen-cb", inputs=inputs, params=params).result(timeout=120)
    assert_same(fleet, local(model)(inputs, **params))


def _generated(result) -> str:
    record = result[0]
    text = record["generated_text"]
    return text[-1]["content"] if isinstance(text, list) else text


@pytest.mark.parametrize("deployment", ["gen-static", "gen-cb"])
def test_stream_pieces_add_up_to_the_generated_text(client, module_fleet, model, deployment):
    params = {"max_new_tokens": 40, "return_full_text": False, **GREEDY}
    job = client.submit(deployment=deployment, inputs=PROMPTS[2], params=params, stream=True)
    pieces = list(job.stream(timeout_s=120))
    result = job.result(timeout=60)
    assert "".join(pieces) == _generated(result)
    assert _generated(result) == local(model)(PROMPTS[2], **params)[0]["generated_text"]
    assert len(pieces) > 1, "the text came in one piece: nothing streamed"
    with module_fleet.client() as other:  # another client replays from the first piece
        assert list(other.job(job.id).stream(timeout_s=30)) == pieces
        events = list(other.job(job.id).events(timeout_s=30))
    assert events[-1].kind is EventKind.DONE
    assert events[-1].data["finish_reasons"] in (["length"], ["stop"])
    usage = events[-1].data["usage"]
    assert usage["prompt_tokens"] == len(local(model).tokenizer(PROMPTS[2])["input_ids"])
    assert 0 < usage["completion_tokens"] <= 40
    ids = [event.id for event in events]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
    resumed = list(other_events(module_fleet, job.id, after=events[1].id))
    assert [event.id for event in resumed] == ids[2:]


@pytest.mark.parametrize("deployment", ["gen-static", "gen-cb"])
def test_a_job_nobody_streams_sends_its_text_in_one_piece_with_the_same_usage(client, model, deployment):
    """Without ``stream=True`` the worker decodes nothing per step; the text, usage and finish reasons match."""
    params = {"max_new_tokens": 40, "return_full_text": False, **GREEDY}
    jobs = {stream: client.submit(deployment=deployment, inputs=[PROMPTS[2], PROMPTS[1]], params=params,
                                  stream=stream) for stream in (True, False)}
    events = {stream: list(job.events(timeout_s=120)) for stream, job in jobs.items()}
    texts = {stream: [event for event in events[stream] if event.kind is EventKind.TEXT] for stream in jobs}
    for index in (0, 1):
        quiet = [event.data["text"] for event in texts[False] if event.data["index"] == index]
        loud = [event.data["text"] for event in texts[True] if event.data["index"] == index]
        assert len(quiet) == 1 and len(loud) > 1
        assert quiet == ["".join(loud)] == [_generated(jobs[False].result(timeout=60)[index])]
    assert events[False][-1].kind is events[True][-1].kind is EventKind.DONE
    assert events[False][-1].data == events[True][-1].data  # usage and finish reasons


def other_events(module_fleet, job_id, *, after):
    with module_fleet.client() as other:
        yield from other.job(job_id).events(last_event_id=after, timeout_s=30)


@pytest.mark.parametrize("deployment", ["gen-static", "gen-cb"])
def test_stream_of_a_list_and_a_chat_job(client, model, deployment):
    params = {"max_new_tokens": 10, "return_full_text": False, **GREEDY}
    job = client.submit(deployment=deployment, inputs=PROMPTS, params=params, stream=True)
    events = list(job.events(timeout_s=120))
    result = job.result(timeout=60)
    for index, output in enumerate(result):
        text = "".join(e.data["text"] for e in events if e.kind is EventKind.TEXT and e.data["index"] == index)
        assert text == output[0]["generated_text"]
    assert len(events[-1].data["finish_reasons"]) == len(PROMPTS)
    chat_job = client.submit(deployment=deployment, inputs=CHAT, params={"max_new_tokens": 10, **GREEDY})
    assert "".join(chat_job.stream(timeout_s=120)) == _generated(chat_job.result(timeout=60))


def test_pipeline_stream_and_async_stream(client, model):
    pipe = fleet_pipeline("text-generation", model=model, client=client, deployment="gen-cb")
    params = {"max_new_tokens": 15, **GREEDY}
    expected = local(model)(PROMPTS[0], return_full_text=False, **params)[0]["generated_text"]
    assert "".join(pipe.stream(PROMPTS[0], **params)) == expected

    async def collect() -> str:
        job = await client.asubmit(deployment="gen-static", inputs=PROMPTS[0], params=params)
        return "".join([piece async for piece in job.astream(timeout_s=120)])

    assert asyncio.run(collect()) == expected


def test_events_of_a_job_that_does_not_stream_end_with_its_result(client, model):
    job = client.submit(deployment="gen-static", inputs=PROMPTS, params={"max_new_tokens": 3, **GREEDY},
                        chunk_size=1)
    events = list(job.events(timeout_s=120))
    kinds = [event.kind for event in events]
    assert kinds.count(EventKind.PROGRESS) == len(PROMPTS)
    assert events[-1].kind is EventKind.DONE
    progress = [event.data for event in events if event.kind is EventKind.PROGRESS]
    assert sorted(p["done"] for p in progress) == list(range(1, len(PROMPTS) + 1))
    assert {p["total"] for p in progress} == {len(PROMPTS)}


@pytest.mark.parametrize("params,named", [
    ({"num_beams": 2, "max_new_tokens": 4, **GREEDY}, "num_beams"),
    ({"min_length": 8, "max_new_tokens": 4, **GREEDY}, "min_length"),
    ({"num_return_sequences": 2, "max_new_tokens": 4, **GREEDY}, "num_return_sequences"),
])
def test_continuous_refuses_params_it_cannot_honour_per_request(client, model, params, named):
    job = client.submit(deployment="gen-cb", inputs=PROMPTS[0], params=params)
    with pytest.raises(InvalidParams, match=named):
        job.result(timeout=60)
    with pytest.raises(InvalidParams, match=named):
        list(job.stream(timeout_s=30))


def test_cancel_removes_a_request_from_the_running_batch(client, model):
    long_job = client.submit(deployment="gen-cb", inputs=LONG_PROMPT, params={"max_new_tokens": 1500, **GREEDY},
                             stream=True)
    events = long_job.events(timeout_s=120)
    first = next(event for event in events if event.kind is EventKind.TEXT)
    assert first.data["index"] == 0
    long_job.cancel()
    with pytest.raises(JobCancelled):
        long_job.result(timeout=60)
    rest = list(events)
    assert rest[-1].kind is EventKind.ERROR and rest[-1].data["type"] == "JobCancelled"
    with pytest.raises(JobCancelled):
        list(client.job(long_job.id).stream(timeout_s=30))
    # The engine serves on: the cancelled request no longer runs.
    params = {"max_new_tokens": 5, **GREEDY}
    assert_same(client.submit(deployment="gen-cb", inputs=PROMPTS[0], params=params).result(timeout=60),
                local(model)(PROMPTS[0], **params))


def test_a_short_job_joins_the_running_batch_and_finishes_first(client, model):
    params = {"max_new_tokens": 1500, **GREEDY}
    long_jobs = [client.submit(deployment="gen-cb", inputs=LONG_PROMPT, params=params, stream=True) for _ in range(2)]
    for job in long_jobs:  # both generate before the short one arrives
        next(event for event in job.events(timeout_s=120) if event.kind is EventKind.TEXT)
    short = client.submit(deployment="gen-cb", inputs=PROMPTS[2], params={"max_new_tokens": 4, **GREEDY})
    short.result(timeout=120)
    assert all(job.status().state not in (JobState.SUCCESS, JobState.FAILURE) for job in long_jobs)
    for job in long_jobs:
        job.cancel()


def test_deadline_stops_a_long_generation(client, model):
    # Expired in the queue or while generating: either way a JobTimeout, and the engine drops the request.
    job = client.submit(deployment="gen-cb", inputs=LONG_PROMPT, params={"max_new_tokens": 2000, **GREEDY},
                        timeout_s=1)
    with pytest.raises(JobTimeout):
        job.result(timeout=120)
    with pytest.raises(JobTimeout):
        list(job.stream(timeout_s=30))


def test_metrics_show_running_requests_kv_cache_and_tokens(client, model):
    job = client.submit(deployment="gen-cb", inputs=LONG_PROMPT, params={"max_new_tokens": 1500, **GREEDY},
                             stream=True)
    next(event for event in job.events(timeout_s=120) if event.kind is EventKind.TEXT)
    labels = {"deployment": "gen-cb"}

    def scrape_until(predicate):
        for _ in range(100):
            samples = _scrape(METRICS_PORT)
            if predicate(samples):
                return samples
            time.sleep(0.05)
        raise AssertionError("the gauges never showed the running request")

    scrape_until(lambda s: _value(s, "pipefleet_running_requests", **labels) >= 1
                 and _value(s, "pipefleet_kv_cache_usage_ratio", **labels) > 0)
    job.cancel()
    samples = scrape_until(lambda s: _value(s, "pipefleet_running_requests", **labels) == 0)
    assert _value(samples, "pipefleet_generated_tokens_total", **labels) > 0
    assert _value(samples, "pipefleet_generated_tokens_per_second", **labels) > 0


def seeded_local(model, inputs, params):
    """In-process ``set_seed(seed); pipe(inputs, **params)``: what the fleet's seed means."""
    from transformers import set_seed

    params = dict(params)
    set_seed(params.pop("seed"))
    return local(model)(inputs, **params)


#: One request param each (seeded), as users send them; "defaults" sends none (the pipeline samples by default).
SAMPLING_CASES = {
    "defaults": {},
    "do_sample": {"do_sample": True},
    "temperature": {"do_sample": True, "temperature": 0.6},
    "top_p": {"do_sample": True, "top_p": 0.8},
    "top_k": {"do_sample": True, "top_k": 5},
    "min_p": {"do_sample": True, "min_p": 0.05},
    "repetition_penalty-greedy": {"do_sample": False, "repetition_penalty": 1.4},
    "repetition_penalty-sampled": {"do_sample": True, "repetition_penalty": 1.3, "temperature": 0.9},
}


@pytest.mark.parametrize("name", list(SAMPLING_CASES))
def test_each_sampling_param_equals_static_and_in_process_generate(client, model, name):
    params = {**SAMPLING_CASES[name], "max_new_tokens": 12, "seed": 17}
    jobs = {deployment: client.submit(deployment=deployment, inputs=PROMPTS[2], params=params)
            for deployment in ("gen-cb", "gen-static")}
    expected = seeded_local(model, PROMPTS[2], params)
    for deployment, job in jobs.items():
        assert job.result(timeout=120) == expected, deployment


def _first_greedy_token(model, prompt):
    pipe = local(model)
    encoded = pipe.tokenizer(prompt, return_tensors="pt")
    return int(pipe.model.generate(**encoded, max_new_tokens=1, do_sample=False)[0, -1])


#: Params that become one more of ``generate``'s logits processors, given the prompt's first greedy token.
PROCESSOR_CASES = {
    "no_repeat_ngram_size": lambda first: {**GREEDY, "no_repeat_ngram_size": 1},
    "sequence_bias": lambda first: {**GREEDY, "sequence_bias": [[[first], -100.0]]},
    "suppress_tokens": lambda first: {**GREEDY, "suppress_tokens": [first]},
    "bad_words_ids": lambda first: {**GREEDY, "bad_words_ids": [[first]]},
    "begin_suppress_tokens": lambda first: {**GREEDY, "begin_suppress_tokens": [first]},
    "epsilon_cutoff": lambda first: {"do_sample": True, "epsilon_cutoff": 0.002},
    "eta_cutoff": lambda first: {"do_sample": True, "eta_cutoff": 0.002},
}


@pytest.mark.parametrize("name", list(PROCESSOR_CASES))
def test_each_processor_param_changes_the_output_and_equals_static_and_in_process(client, model, name):
    params = {**PROCESSOR_CASES[name](_first_greedy_token(model, PROMPTS[2])), "max_new_tokens": 24, "seed": 17}
    jobs = {deployment: client.submit(deployment=deployment, inputs=PROMPTS[2], params=params)
            for deployment in ("gen-cb", "gen-static")}
    expected = seeded_local(model, PROMPTS[2], params)
    without = seeded_local(model, PROMPTS[2], {key: value for key, value in params.items() if key != name})
    assert expected != without, f"{name} did not change the in-process output: no evidence either way"
    for deployment, job in jobs.items():
        assert job.result(timeout=120) == expected, deployment


def penalised_local(model, inputs, params):
    """In-process ``pipe(inputs, **params)`` with OpenAI's penalties as the fleet's own logits processor."""
    from worker.penalties import OutputTokenPenalty

    params = dict(params)
    processor = OutputTokenPenalty(params.pop("frequency_penalty", 0), params.pop("presence_penalty", 0))
    return seeded_local(model, inputs, {**params, "logits_processor": [processor]})


@pytest.mark.parametrize("penalties", [{"frequency_penalty": 1.5}, {"presence_penalty": 1.2},
                                       {"frequency_penalty": 2.0, "presence_penalty": -1.0, "do_sample": True,
                                        "temperature": 0.9}],
                         ids=["frequency", "presence", "both-sampled"])
def test_openai_penalties_change_the_output_and_equal_static_and_in_process(client, model, penalties):
    params = {**GREEDY, **penalties, "max_new_tokens": 24, "seed": 17}
    jobs = {deployment: client.submit(deployment=deployment, inputs=PROMPTS[2], params=params)
            for deployment in ("gen-cb", "gen-static")}
    expected = penalised_local(model, PROMPTS[2], params)
    without = seeded_local(model, PROMPTS[2], {k: v for k, v in params.items() if not k.endswith("_penalty")})
    assert expected != without, "the penalties did not change the in-process output: no evidence either way"
    for deployment, job in jobs.items():
        assert job.result(timeout=120) == expected, deployment


def test_min_new_tokens_holds_off_the_end_of_generation_on_both_paths(client, model):
    eos = local(model).model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    ends_at_once = {**GREEDY, "max_new_tokens": 12, "sequence_bias": [[[eos], 100.0]], "return_full_text": False}
    assert local(model)(PROMPTS[2], **ends_at_once)[0]["generated_text"] == ""
    params = {**ends_at_once, "min_new_tokens": 5}
    expected = local(model)(PROMPTS[2], **params)
    assert expected[0]["generated_text"]
    for deployment in ("gen-cb", "gen-static"):
        assert client.submit(deployment=deployment, inputs=PROMPTS[2], params=params).result(timeout=120) == \
            expected, deployment


def test_a_token_outside_the_vocabulary_fails_its_job_clearly_and_the_engine_serves_on(client, model):
    for name, value in [("sequence_bias", [[[10**6], 5.0]]), ("suppress_tokens", [3, -1]),
                        ("begin_suppress_tokens", ["x"])]:
        for deployment in ("gen-cb", "gen-static"):
            job = client.submit(deployment=deployment, inputs=PROMPTS[0],
                                params={**GREEDY, "max_new_tokens": 4, name: value})
            with pytest.raises(InvalidParams, match=f"{name}.*vocabulary"):
                job.result(timeout=60)
    params = {**GREEDY, "max_new_tokens": 6}
    assert client.submit(deployment="gen-cb", inputs=PROMPTS[0], params=params).result(timeout=60) == \
        local(model)(PROMPTS[0], **params)


def test_mixed_requests_share_one_running_batch_and_each_equals_its_oracle(client, model):
    first = {prompt: _first_greedy_token(model, prompt) for prompt in PROMPTS}
    long_job = client.submit(deployment="gen-cb", inputs=LONG_PROMPT, params={"max_new_tokens": 1500, **GREEDY},
                             stream=True)
    next(event for event in long_job.events(timeout_s=120) if event.kind is EventKind.TEXT)
    penalised = [{**GREEDY, "frequency_penalty": 1.5}, {"do_sample": True, "presence_penalty": 1.2}]
    every = [*SAMPLING_CASES.values(), *PROCESSOR_CASES.values(), *penalised]
    cases = [(prompt, {**(params(first[prompt]) if callable(params) else params), "max_new_tokens": 10 + i,
                       "seed": 100 + i})
             for i, params in enumerate(every) for prompt in [PROMPTS[i % len(PROMPTS)]]]
    jobs = [client.submit(deployment="gen-cb", inputs=prompt, params=params) for prompt, params in cases]
    results = [job.result(timeout=120) for job in jobs]
    assert long_job.status().state not in (JobState.SUCCESS, JobState.FAILURE), "the batch did not run alongside"
    long_job.cancel()
    for (prompt, params), result in zip(cases, results):
        assert result == penalised_local(model, prompt, params), params


def test_one_job_id_submitted_twice_at_once_runs_both_in_the_engine_and_keeps_the_first_result(client, model,
                                                                                                 module_fleet):
    """A client that retries a submit with its own job id: two engine requests of one job in one running batch."""
    import uuid

    job_id = str(uuid.uuid4())
    params = {"do_sample": True, "max_new_tokens": 24, "seed": 5}
    first = client.submit(deployment="gen-cb", inputs=PROMPTS[0], params=params, job_id=job_id)
    client.submit(deployment="gen-cb", inputs=PROMPTS[0], params=params, job_id=job_id)
    assert first.result(timeout=120) == seeded_local(model, PROMPTS[0], params)
    worker = module_fleet.workers[0]
    deadline = time.monotonic() + 60
    while len([line for line in worker.log().splitlines() if f"job {job_id} on gen-cb:" in line]) < 2:
        assert time.monotonic() < deadline, f"the second run never ended:\n{worker.log()[-3000:]}"
        time.sleep(0.2)
    lines = [line for line in worker.log().splitlines() if f"job {job_id} on gen-cb:" in line]
    assert any("SUCCESS" in line and "DUPLICATE" not in line for line in lines), lines
    assert any("DUPLICATE-SUCCESS" in line for line in lines), lines


def _cut(result, stop: str) -> str:
    text = result[0]["generated_text"]
    return text[:text.find(stop)] if stop in text else text


@pytest.mark.parametrize("aligned", [True, False], ids=["on-token-boundaries", "anywhere"])
def test_stop_strings_end_generation_where_static_does(client, model, aligned):
    params = {"max_new_tokens": 30, "return_full_text": False, **GREEDY}
    pipe = local(model)
    ids = pipe.model.generate(**pipe.tokenizer(PROMPTS[1], return_tensors="pt"), max_new_tokens=30, do_sample=False,
                              pad_token_id=pipe.tokenizer.pad_token_id)[0].tolist()
    generated = ids[len(pipe.tokenizer(PROMPTS[1])["input_ids"]):]

    def decode(tokens):
        return pipe.tokenizer.decode(tokens, skip_special_tokens=True)

    full = decode(generated)
    # On token boundaries: two whole tokens, readable, whose text first occurs where they start.
    candidates = [decode(generated[k:k + 2]) for k in range(3, len(generated) - 2)
                  if "\ufffd" not in decode(generated[:k + 2]) and decode(generated[k:k + 2]).strip()
                  and full.find(decode(generated[k:k + 2])) == len(decode(generated[:k]))] if aligned else \
        [full[len(full) // 2:len(full) // 2 + 2]]
    assert candidates, f"no readable stop string in {full!r}"
    stop = candidates[0]
    params["stop_sequence"] = [stop]
    results = {}
    for deployment in ("gen-cb", "gen-static"):
        job = client.submit(deployment=deployment, inputs=PROMPTS[1], params=params)
        results[deployment] = job.result(timeout=120)
        done = list(job.events(timeout_s=30))[-1]
        if deployment == "gen-cb" or aligned:
            assert done.data["finish_reasons"] == ["stop"], deployment
    # The engine ends the sequence at the first token whose text completes the stop string.
    ending = next(k for k in range(1, len(generated) + 1) if stop in decode(generated[:k]))
    assert results["gen-cb"] == local(model)(PROMPTS[1], **{**params, "max_new_tokens": ending,
                                                            "stop_sequence": None})
    # What OpenAI returns (the text before the stop) is the same on both paths and in-process.
    expected = local(model)(PROMPTS[1], **params)
    assert _cut(results["gen-cb"], stop) == _cut(results["gen-static"], stop) == _cut(expected, stop) \
        == full[:full.find(stop)]
    if aligned:  # generate's StopStringCriteria ends on the same token
        assert results["gen-cb"] == results["gen-static"] == expected


def test_n_seeded_sequences_are_reproducible_and_the_first_is_generates(client, model):
    params = {"do_sample": True, "num_return_sequences": 3, "seed": 9, "max_new_tokens": 10}
    first, second = (client.submit(deployment="gen-cb", inputs=PROMPTS[0], params=params).result(timeout=120)
                     for _ in range(2))
    assert first == second
    assert len({record["generated_text"] for record in first}) > 1
    # generate() draws n rows from one stream; the engine gives each sequence its own, the first one the seed's.
    single = seeded_local(model, PROMPTS[0], {**params, "num_return_sequences": 1})
    assert first[0] == single[0]


def test_deployment_sampling_defaults_apply_to_requests_that_leave_them_out(client, model):
    # gen-cb-sample sets do_sample and top_p=0.95 as its defaults; the request sets neither.
    params = {"max_new_tokens": 12, "seed": 4, "num_return_sequences": 3, "return_full_text": False}
    result = client.submit(deployment="gen-cb-sample", inputs=PROMPTS[0], params=params).result(timeout=120)
    expected = seeded_local(model, PROMPTS[0], {**params, "num_return_sequences": 1, "do_sample": True,
                                                "top_p": 0.95})
    assert result[0] == expected[0]


def test_sampled_sequences_stream_their_text(client, model):
    params = {"max_new_tokens": 12, "do_sample": True, "temperature": 0.9, "top_k": 8,
              "num_return_sequences": 3, "return_full_text": False}
    job = client.submit(deployment="gen-cb", inputs=PROMPTS, params=params, stream=True)
    events = list(job.events(timeout_s=120))
    result = job.result(timeout=60)
    assert [len(records) for records in result] == [3] * len(PROMPTS)
    for index, record in enumerate(record for records in result for record in records):
        text = "".join(e.data["text"] for e in events if e.kind is EventKind.TEXT and e.data["index"] == index)
        assert text == record["generated_text"]
    assert len(events[-1].data["finish_reasons"]) == 3 * len(PROMPTS)


def logprobs_local(model, prompt, params, top):
    """In-process ``generate(output_logits=True)`` (seeded as the fleet seeds): each generated token's raw
    log-softmax and the ``top`` best of its step, what the fleet's ``logprobs`` reports."""
    import torch
    from transformers import set_seed

    pipe = local(model)
    params = dict(params)
    set_seed(params.pop("seed", 0))
    encoded = pipe.tokenizer(prompt, return_tensors="pt")
    out = pipe.model.generate(**encoded, **params, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, encoded["input_ids"].shape[1]:].tolist()
    entries = []
    for token, logits in zip(tokens, out.logits):
        logprobs = torch.log_softmax(logits[0].float(), dim=-1)
        values, ids = torch.topk(logprobs, top)
        entries.append((token, float(logprobs[token]), ids.tolist(), values.tolist()))
    return tokens, entries


@pytest.mark.parametrize("deployment", ["gen-cb", "gen-static"])
@pytest.mark.parametrize("params", [{**GREEDY}, {"do_sample": True, "temperature": 0.7, "top_k": 8},
                                    {**GREEDY, "repetition_penalty": 1.5}],
                         ids=["greedy", "sampled", "penalised"])
def test_logprobs_are_the_raw_log_softmax_of_each_taken_token_as_generate_reports(client, model, params,
                                                                                  deployment):
    params = {**params, "max_new_tokens": 10, "seed": 23, "return_full_text": False}
    fleet = client.submit(deployment=deployment, inputs=PROMPTS[2], params={**params, "logprobs": 3}
                          ).result(timeout=120)
    tokens, expected = logprobs_local(model, PROMPTS[2], {k: v for k, v in params.items()
                                                          if k != "return_full_text"}, 3)
    [record] = fleet
    assert [entry["token_id"] for entry in record["logprobs"]] == tokens
    tokenizer = local(model).tokenizer
    for entry, (token, logprob, ids, values) in zip(record["logprobs"], expected):
        assert entry["token"] == tokenizer.decode([token])
        assert entry["logprob"] == pytest.approx(logprob, abs=1e-4)
        assert [alt["token_id"] for alt in entry["top_logprobs"]] == ids
        assert [alt["logprob"] for alt in entry["top_logprobs"]] == pytest.approx(values, abs=1e-4)
    # The text is what the same job without logprobs generates.
    plain = client.submit(deployment=deployment, inputs=PROMPTS[2], params=params).result(timeout=120)
    assert plain == [{"generated_text": record["generated_text"]}]


def test_static_logprobs_of_a_batch_follow_each_row_and_end_at_its_end_of_sequence(client, model):
    """One job's prompts share one left-padded static batch; rows that end early pad on while others run."""
    eos = local(model).model.generation_config.eos_token_id
    # With EOS biased +5 these prompts end after 13, 3 and 9 new tokens; "hello" runs to the cap.
    prompts = ["hello", "a stormy night", "where does alice live?", "the market near oslo"]
    params = {**GREEDY, "max_new_tokens": 16, "return_full_text": False, "sequence_bias": [[[eos], 5.0]],
              "logprobs": 2}
    static = client.submit(deployment="gen-static", inputs=prompts, params=params).result(timeout=120)
    continuous = client.submit(deployment="gen-cb", inputs=prompts, params=params).result(timeout=120)
    lengths = []
    for prompt, [record], [cb] in zip(prompts, static, continuous):
        tokens, expected = logprobs_local(model, prompt, {k: v for k, v in params.items()
                                                          if k not in ("return_full_text", "logprobs")}, 2)
        ended = tokens.index(eos) + 1 if eos in tokens else len(tokens)
        lengths.append(ended)
        for got in (record, cb):
            assert [entry["token_id"] for entry in got["logprobs"]] == tokens[:ended]
            assert [entry["logprob"] for entry in got["logprobs"]] == \
                pytest.approx([logprob for _, logprob, _, _ in expected[:ended]], abs=1e-4)
        assert record["generated_text"] == cb["generated_text"]
    assert len(set(lengths)) == len(prompts), f"the rows did not end apart: {lengths}"


def test_logprobs_follow_each_sequence_and_a_stop_string(client, model):
    params = {"do_sample": True, "num_return_sequences": 2, "max_new_tokens": 12, "seed": 5, "logprobs": 0}
    records = client.submit(deployment="gen-cb", inputs=PROMPTS[0], params=params).result(timeout=120)
    tokenizer = local(model).tokenizer
    for record in records:
        assert all(entry["top_logprobs"] == [] and entry["logprob"] <= 0 for entry in record["logprobs"])
        ids = [entry["token_id"] for entry in record["logprobs"]]
        assert PROMPTS[0] + tokenizer.decode(ids, skip_special_tokens=True) == record["generated_text"]
    whole = client.submit(deployment="gen-cb", inputs=PROMPTS[2],
                          params={**GREEDY, "max_new_tokens": 24, "logprobs": 1}).result(timeout=120)[0]
    stop = tokenizer.decode([entry["token_id"] for entry in whole["logprobs"]][8:10])
    cut = client.submit(deployment="gen-cb", inputs=PROMPTS[2],
                        params={**GREEDY, "max_new_tokens": 24, "logprobs": 1, "stop_sequence": stop}
                        ).result(timeout=120)[0]
    assert len(cut["logprobs"]) < len(whole["logprobs"])
    assert cut["logprobs"] == whole["logprobs"][:len(cut["logprobs"])]
    assert PROMPTS[2] + tokenizer.decode([entry["token_id"] for entry in cut["logprobs"]]) == cut["generated_text"]


@pytest.mark.parametrize("deployment,value,match", [
    ("gen-static", 21, "0 to 20"), ("gen-cb", 21, "0 to 20"), ("gen-cb", True, "0 to 20"),
    ("gen-cb", "3", "0 to 20")])
def test_logprobs_refused_clearly_where_they_cannot_be_given(client, model, deployment, value, match):
    job = client.submit(deployment=deployment, inputs=PROMPTS[0], params={"max_new_tokens": 3, "logprobs": value})
    with pytest.raises(InvalidParams, match=f"logprobs.*{match}"):
        job.result(timeout=60)
