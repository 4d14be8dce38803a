"""The OpenAI Batch API on real gateways and a real worker, through the unmodified ``openai`` package.

Each batch's answers are compared with what the online route returns for the same body, and every test
checks that each ``custom_id`` appears exactly once across the output and error files.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import time

import httpx
import openai
import pytest
import standardwebhooks

from tests.gateway.conftest import API_KEY, BATCHES, SECRET
from tests.fleet import wait_until
from tests.gateway.server import start_gateway

PROMPTS = ["the quick brown fox", "a b c d", "hello there", "pipefleet runs batches", "one more line"]


@pytest.fixture(scope="module")
def setup(batch_setup):
    """The package's batch fleet (tests/gateway/conftest.py)."""
    return batch_setup


@pytest.fixture(scope="module")
def gateway(batch_gateway):
    """The batch fleet's always-on gateway."""
    return batch_gateway


def sdk(gateway) -> openai.OpenAI:
    """The official client on a gateway."""
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def jsonl(lines: list[Any]) -> bytes:
    return b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines)


def line(custom_id: str, endpoint: str, body: dict) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": endpoint, "body": body}


def start_batch(client: openai.OpenAI, lines: list[Any], endpoint: str):
    uploaded = client.files.create(file=("input.jsonl", jsonl(lines)), purpose="batch")
    return client.batches.create(input_file_id=uploaded.id, endpoint=endpoint, completion_window="24h",
                                 metadata={"test": "batches"})


def wait_final(client: openai.OpenAI, batch_id: str, timeout_s: float = 120.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "cancelled", "expired"):
            return batch
        time.sleep(0.2)
    raise AssertionError(f"batch {batch_id} is still {batch.status} after {timeout_s} s: {batch}")


def answers(client: openai.OpenAI, batch) -> tuple[list[dict], list[dict]]:
    """The output and error lines, after checking each custom_id is in exactly one of them, once."""
    out = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()] \
        if batch.output_file_id else []
    err = [json.loads(x) for x in client.files.content(batch.error_file_id).text.splitlines()] \
        if batch.error_file_id else []
    ids = [entry["custom_id"] for entry in out + err if entry["custom_id"] is not None]
    assert len(ids) == len(set(ids)), f"a custom_id appears twice: {sorted(ids)}"
    assert batch.request_counts.completed == len(out) and batch.request_counts.failed == len(err)
    return out, err


def comparable(body: dict) -> dict:
    """A response without what differs between any two calls (its id and creation time)."""
    return {key: value for key, value in body.items() if key not in ("id", "created")}


def assert_same_body(online: dict, batched: dict) -> None:
    if online.get("object") == "list":  # embeddings: floats within tolerance
        assert comparable({**online, "data": None}) == comparable({**batched, "data": None})
        for mine, theirs in zip(online["data"], batched["data"], strict=True):
            assert mine["index"] == theirs["index"]
            assert theirs["embedding"] == pytest.approx(mine["embedding"], abs=1e-5)
    else:
        assert comparable(batched) == comparable(online)


CASES = {
    "/v1/embeddings": [{"model": "bt-emb", "input": PROMPTS[0]}, {"model": "bt-emb", "input": PROMPTS[1:4]},
                       {"model": "bt-emb", "input": PROMPTS[4], "encoding_format": "float"}],
    "/v1/completions": [{"model": "bt-gen", "prompt": prompt, "max_tokens": 5, "temperature": 0}
                        for prompt in PROMPTS[:3]] + [{"model": "bt-gen", "prompt": PROMPTS[3:], "max_tokens": 3,
                                                       "temperature": 0}],
    "/v1/chat/completions": [{"model": "bt-gen", "messages": [{"role": "user", "content": prompt}],
                              "max_tokens": 6, "temperature": 0} for prompt in PROMPTS[:4]],
}


@pytest.mark.parametrize("endpoint", list(CASES))
def test_batch_answers_equal_the_online_route(gateway, receiver, endpoint):
    client = sdk(gateway)
    bodies = CASES[endpoint]
    batch = start_batch(client, [line(f"req-{i}", endpoint, body) for i, body in enumerate(bodies)], endpoint)
    assert batch.status == "validating" and batch.endpoint == endpoint and batch.metadata == {"test": "batches"}
    batch = wait_final(client, batch.id)
    assert batch.status == "completed", batch
    assert batch.request_counts.total == len(bodies) and batch.error_file_id is None
    assert batch.completed_at >= batch.in_progress_at >= batch.created_at
    out, _ = answers(client, batch)
    assert [entry["custom_id"] for entry in out] == [f"req-{i}" for i in range(len(bodies))]
    for entry, body in zip(out, bodies):
        assert entry["response"]["status_code"] == 200 and entry["error"] is None
        online = httpx.post(f"{gateway.url}{endpoint}", json=body, timeout=60,
                            headers={"Authorization": f"Bearer {API_KEY}"})
        assert online.status_code == 200, online.text
        assert_same_body(online.json(), entry["response"]["body"])
    # The batch event reaches every [webhooks] endpoint, signed.
    event = receiver.wait_for(lambda: next((r for r in receiver.accepted("/batches")
                                            if r.json()["data"]["id"] == batch.id), None))
    assert event.json()["type"] == "batch.completed" and event.json()["object"] == "event"
    assert standardwebhooks.Webhook(SECRET).verify(event.body, event.headers)["data"]["id"] == batch.id


def test_bad_lines_go_to_the_error_file_and_the_batch_completes(gateway):
    client = sdk(gateway)
    endpoint = "/v1/embeddings"
    lines = [line("good-0", endpoint, {"model": "bt-emb", "input": "fine"}),
             b'{"custom_id": "broken", "method": "POST", ',
             line("wrong-url", "/v1/completions", {"model": "bt-emb", "input": "x"}),
             line("no-input", endpoint, {"model": "bt-emb"}),
             line("unknown-model", endpoint, {"model": "no-such-model", "input": "x"}),
             line("wrong-method", endpoint, {"model": "bt-emb", "input": "x"}) | {"method": "GET"},
             line("good-1", endpoint, {"model": "bt-emb", "input": ["two", "inputs"]})]
    batch = wait_final(client, start_batch(client, lines, endpoint).id)
    assert batch.status == "completed"
    assert batch.request_counts.total == 7
    out, err = answers(client, batch)
    assert sorted(entry["custom_id"] for entry in out) == ["good-0", "good-1"]
    by_id = {entry["custom_id"]: entry for entry in err}
    assert set(by_id) == {None, "wrong-url", "no-input", "unknown-model", "wrong-method"}
    assert "line 2 is not valid JSON" in by_id[None]["error"]["message"]
    assert "'/v1/completions' is not this batch's endpoint" in by_id["wrong-url"]["error"]["message"]
    assert "input" in by_id["no-input"]["error"]["message"]
    assert by_id["wrong-method"]["error"]["code"] == "invalid_method"
    # An unknown model is answered as the online route answers it.
    unknown = by_id["unknown-model"]["response"]
    online = httpx.post(f"{gateway.url}{endpoint}", json={"model": "no-such-model", "input": "x"},
                        headers={"Authorization": f"Bearer {API_KEY}"})
    assert unknown["status_code"] == online.status_code == 404
    assert unknown["body"] == online.json()


@pytest.mark.parametrize("problem", ["duplicate", "too_many", "no_custom_id"])
def test_a_file_invalid_as_a_whole_fails_the_batch_naming_the_line(gateway, receiver, problem):
    client = sdk(gateway)
    endpoint = "/v1/embeddings"
    good = [line(f"id-{i}", endpoint, {"model": "bt-emb", "input": "x"}) for i in range(3)]
    lines, expected_line, code = {
        "duplicate": (good + [good[1]], 4, "duplicate_custom_id"),
        "too_many": (good * 0 + [line(f"id-{i}", endpoint, {"model": "bt-emb", "input": "x"})
                                 for i in range(BATCHES["max_lines"] + 1)], BATCHES["max_lines"] + 1,
                     "too_many_lines"),
        "no_custom_id": (good[:2] + [{"method": "POST", "url": endpoint, "body": {}}], 3,
                         "missing_required_parameter"),
    }[problem]
    batch = wait_final(client, start_batch(client, lines, endpoint).id)
    assert batch.status == "failed" and batch.failed_at is not None
    [error] = batch.errors.data
    assert (error.code, error.line) == (code, expected_line)
    assert f"line {expected_line}" in error.message
    event = receiver.wait_for(lambda: next((r for r in receiver.accepted("/batches")
                                            if r.json()["data"]["id"] == batch.id), None))
    assert event.json()["type"] == "batch.failed"


def test_files_and_batches_list_retrieve_and_delete_as_the_sdk_pages_them(gateway):
    client = sdk(gateway)
    endpoint = "/v1/embeddings"
    created = [start_batch(client, [line("one", endpoint, {"model": "bt-emb", "input": "x"})], endpoint)
               for _ in range(3)]
    first_page = client.batches.list(limit=2)
    assert [b.id for b in first_page.data] == [created[2].id, created[1].id] and first_page.has_more
    second_page = client.batches.list(limit=2, after=first_page.data[-1].id)
    assert second_page.data[0].id == created[0].id
    for batch in created:
        wait_final(client, batch.id)
    uploaded = client.files.retrieve(created[0].input_file_id)
    assert uploaded.purpose == "batch" and uploaded.filename == "input.jsonl"
    assert uploaded.bytes == len(client.files.content(uploaded.id).content)
    assert uploaded.id in {f.id for f in client.files.list(purpose="batch")}
    assert client.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_does_not_exist")


def generation_lines(n: int, max_tokens: int = 24) -> list[dict]:
    return [line(f"gen-{i}", "/v1/completions", {"model": "bt-gen", "prompt": f"{PROMPTS[i % 5]} {i}",
                                                 "max_tokens": max_tokens, "temperature": 0}) for i in range(n)]


def test_cancel_keeps_finished_lines_and_stops_the_rest(gateway, receiver):
    client = sdk(gateway)
    n = 120
    batch = start_batch(client, generation_lines(n), "/v1/completions")
    wait_until(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 1, 60, "a finished line")
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
    batch = wait_final(client, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at is not None
    out, err = answers(client, batch)
    assert 1 <= len(out) < n and len(out) + len(err) == n
    assert {entry["error"]["code"] for entry in err} == {"batch_cancelled"}
    assert all(entry["response"]["status_code"] == 200 for entry in out)
    event = receiver.wait_for(lambda: next((r for r in receiver.accepted("/batches")
                                            if r.json()["data"]["id"] == batch.id), None))
    assert event.json()["type"] == "batch.cancelled"


def test_an_unfinished_batch_expires_at_its_window(setup, gateway, receiver):
    window_s = 4.0
    with frozen(gateway):
        short_window(setup, receiver, window_s)


def short_window(setup, receiver, window_s: float) -> None:
    max_file_bytes = 100_000
    gateway = start_gateway(setup.config(completion_window_s=window_s, max_in_flight=2,
                                         max_file_bytes=max_file_bytes), setup.logs)
    try:
        client = sdk(gateway)
        with pytest.raises(openai.APIStatusError) as refused:
            client.files.create(file=("big.jsonl", b"x" * (max_file_bytes + 1)), purpose="batch")
        assert refused.value.status_code == 413 and str(max_file_bytes) in refused.value.message
        n = 240  # two at a time, far more work than the window holds on a fast machine
        created = start_batch(client, generation_lines(n, max_tokens=48), "/v1/completions")
        assert created.expires_at == created.created_at + int(window_s)
        batch = wait_final(client, created.id, timeout_s=60)
        assert batch.status == "expired" and batch.expired_at >= created.expires_at
        out, err = answers(client, batch)
        assert len(out) + len(err) == n and len(err) > 0
        assert {entry["error"]["code"] for entry in err} == {"batch_expired"}
        event = receiver.wait_for(lambda: next((r for r in receiver.accepted("/batches")
                                                if r.json()["data"]["id"] == batch.id), None))
        assert event.json()["type"] == "batch.expired"
    finally:
        gateway.stop()


@contextlib.contextmanager
def frozen(gateway):
    """The module's gateway stopped (SIGSTOP), so the gateways a test starts are the only batch runners."""
    os.kill(gateway.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(gateway.proc.pid, signal.SIGCONT)


def _broker(setup):
    return setup.fleet.server.client(int(setup.fleet.broker_url.rsplit("/", 1)[1]))


def _holder_pid(setup, batch_id: str) -> int | None:
    token = _broker(setup).get(f"pipefleet:batch:{batch_id}:lease")
    return int(token.decode().split(":")[1]) if token else None


def embedding_lines(n: int) -> list[dict]:
    return [line(f"emb-{i}", "/v1/embeddings", {"model": "bt-emb", "input": f"document number {i}"})
            for i in range(n)]


def test_two_replicas_serve_one_batch_and_the_holder_sigkilled_mid_batch_is_replaced(setup, gateway):
    with frozen(gateway):
        two_replicas(setup)


def two_replicas(setup) -> None:
    first = start_gateway(setup.base, setup.logs)
    second = start_gateway(setup.base, setup.logs)
    try:
        n = 200
        batch = start_batch(sdk(first), embedding_lines(n), "/v1/embeddings")
        readers = [sdk(first), sdk(second)]
        # Both replicas answer for the batch while one of them advances it.
        wait_until(lambda: all(c.batches.retrieve(batch.id).request_counts.completed >= 8 for c in readers), 60,
                   "progress seen on both replicas")
        holder_pid = _holder_pid(setup, batch.id)
        holder, survivor = (first, second) if holder_pid == first.proc.pid else (second, first)
        assert holder_pid == holder.proc.pid
        redis = _broker(setup)
        pending_at_kill = redis.hlen(f"pipefleet:batch:{batch.id}:pending")
        holder.proc.kill()
        holder.proc.wait(10)
        done = sdk(survivor).batches.retrieve(batch.id).request_counts.completed
        assert pending_at_kill > 0 and done < n, "the holder died after the batch, not in the middle of it"
        batch = wait_final(sdk(survivor), batch.id)
        assert batch.status == "completed"
        out, err = answers(sdk(survivor), batch)
        assert err == [] and sorted(e["custom_id"] for e in out) == sorted(f"emb-{i}" for i in range(n))
        assert _holder_pid(setup, batch.id) is None
    finally:
        first.stop()
        second.stop()


def test_a_gateway_sigkilled_mid_batch_and_restarted_completes_it(setup, gateway):
    with frozen(gateway):
        kill_and_restart(setup)


def kill_and_restart(setup) -> None:
    gateway = start_gateway(setup.base, setup.logs)
    n = 200
    client = sdk(gateway)
    batch = start_batch(client, embedding_lines(n), "/v1/embeddings")
    wait_until(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 8, 60, "progress")
    pending_at_kill = _broker(setup).hlen(f"pipefleet:batch:{batch.id}:pending")
    assert _holder_pid(setup, batch.id) == gateway.proc.pid
    gateway.proc.send_signal(signal.SIGKILL)
    gateway.proc.wait(10)
    assert pending_at_kill > 0
    restarted = start_gateway(setup.base, setup.logs)
    try:
        client = sdk(restarted)
        assert client.batches.retrieve(batch.id).request_counts.completed < n
        batch = wait_final(client, batch.id)
        assert batch.status == "completed"
        out, err = answers(client, batch)
        assert err == [] and len(out) == n
    finally:
        restarted.stop()


@pytest.mark.heavy
def test_a_worker_sigkilled_mid_batch_loses_no_line(setup, gateway):
    """The victim is frozen holding claimed lines, then killed; the module worker finishes the batch."""
    victim = setup.fleet.worker(setup.base, deployments=["bt-emb"])
    survivor = setup.worker
    redis = _broker(setup)
    os.kill(survivor.proc.pid, signal.SIGSTOP)
    try:
        client = sdk(gateway)
        n = 120
        batch = start_batch(client, embedding_lines(n), "/v1/embeddings")
        wait_until(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 8, 60, "victim progress")
        os.kill(victim.proc.pid, signal.SIGSTOP)
        held = wait_until(lambda: redis.hlen("unacked"), 10, "the victim to hold claimed lines")
        victim.proc.kill()
        victim.proc.wait(10)
    finally:
        os.kill(survivor.proc.pid, signal.SIGCONT)
    assert held > 0
    batch = wait_final(client, batch.id)
    assert batch.status == "completed"
    out, err = answers(client, batch)
    assert err == [] and len(out) == n
