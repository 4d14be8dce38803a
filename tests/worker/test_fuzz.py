"""Hostile input against a real worker: fuzzed job specs, crafted broker messages, oversized and bomb media.

Every bad job must end in a pipefleet error with a message, and the worker must keep serving.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import pickle
import struct
import time
import uuid
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producers import InvalidInput, InvalidParams, JobRejected, MediaError, PayloadTooLarge
from producers.constants import INFER_TASK
from producers.errors import JobError, PipefleetError
from tests.oracle import assert_same, local_pipeline

VISIBILITY_TIMEOUT_S = 6
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
LIMITS = {"max_inputs_per_job": 20, "max_payload_bytes": 300_000, "max_input_chars": 5_000, "max_new_tokens": 16,
          "max_num_return_sequences": 3, "max_top_k": 10}
MEDIA = {"max_image_pixels": 250_000, "max_audio_seconds": 20.0, "max_bytes": 2_000_000}

_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                  st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30))
GARBAGE = st.recursive(_leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=8), inner, max_size=4), max_leaves=12)


@pytest.fixture(scope="module", autouse=True)
def served(module_fleet, model_dir):
    models = {kind: str(model_dir(kind)) for kind in
              ("text-classification", "text-generation", "image-classification", "asr-ctc")}
    deployments = [
        {"name": "fz-tc", "task": "text-classification", "model": models["text-classification"]},
        {"name": "fz-gen", "task": "text-generation", "model": models["text-generation"]},
        {"name": "fz-img", "task": "image-classification", "model": models["image-classification"]},
        {"name": "fz-asr", "task": "automatic-speech-recognition", "model": models["asr-ctc"]},
    ]
    # A short visibility timeout is safe with leases (live claims are renewed) and lets the unacked sweeps run here.
    config = module_fleet.config(deployments, limits=LIMITS, media=MEDIA, visibility_timeout_s=VISIBILITY_TIMEOUT_S)
    worker = module_fleet.worker(config, deployments=[d["name"] for d in deployments])
    return {"models": models, "worker": worker}


OUTCOMES: dict[str, int] = {}
"""How the fuzzed jobs ended, printed as figures once the fuzzing is over."""
JOB_ERRORS: set[str] = set()


def _outcome(client, deployment: str, inputs, params) -> str:
    """Run one job; returns 'ok' or the error class name. Anything but a pipefleet error fails."""
    outcome = _run(client, deployment, inputs, params)
    OUTCOMES[outcome] = OUTCOMES.get(outcome, 0) + 1
    return outcome


def _run(client, deployment: str, inputs, params) -> str:
    try:
        job = client.submit(deployment=deployment, inputs=inputs, params=params)
    except JobRejected as error:
        assert str(error), "a client-side rejection without a message"
        return f"client:{type(error).__name__}"
    try:
        job.result(timeout=60)
    except (JobRejected, JobError) as error:
        assert str(error), "a worker-side failure without a message"
        if isinstance(error, JobError):
            JOB_ERRORS.add(str(error)[:100])
        return type(error).__name__
    return "ok"


def _assert_serving(client, served) -> None:
    assert served["worker"].alive(), served["worker"].log()[-3000:]
    text = "still serving"
    assert_same(client.submit(deployment="fz-tc", inputs=text).result(timeout=30),
                local_pipeline("text-classification", served["models"]["text-classification"])(text))


_TC_PARAM_NAMES = st.sampled_from(["top_k", "function_to_apply", "truncation", "max_length", "padding",
                                   "return_all_scores", "made_up_param"]) | st.text(max_size=10)


@FUZZ
@given(inputs=GARBAGE | st.text(min_size=4_000, max_size=7_000),
       params=st.dictionaries(_TC_PARAM_NAMES, GARBAGE, max_size=3))
def test_fuzzed_text_jobs_fail_clearly(client, served, inputs, params):
    _outcome(client, "fz-tc", inputs, params)


_INT_OR_GARBAGE = st.one_of(st.integers(-10, 10**12), GARBAGE)


@FUZZ
@given(max_new_tokens=_INT_OR_GARBAGE, num_return_sequences=_INT_OR_GARBAGE,
       extra=st.dictionaries(st.sampled_from(["do_sample", "temperature", "top_k", "num_beams", "not_a_param"]),
                             st.one_of(st.booleans(), st.floats(allow_nan=True, allow_infinity=True),
                                       st.integers(-5, 50)), max_size=2))
def test_fuzzed_generation_params_respect_the_caps(client, served, max_new_tokens, num_return_sequences, extra):
    params = {"max_new_tokens": max_new_tokens, "num_return_sequences": num_return_sequences, **extra}
    outcome = _outcome(client, "fz-gen", "hello there", params)
    for name, cap in (("max_new_tokens", LIMITS["max_new_tokens"]),
                      ("num_return_sequences", LIMITS["max_num_return_sequences"])):
        value = params[name]
        if isinstance(value, int) and not isinstance(value, bool) and not 1 <= value <= cap:
            assert outcome in ("InvalidParams", "client:InvalidParams"), (name, value, outcome)


def test_the_worker_survived_the_fuzzing(client, served):
    _assert_serving(client, served)
    print(f"FIGURES fuzz: {sum(OUTCOMES.values())} jobs, outcomes {dict(sorted(OUTCOMES.items()))}; "
          f"worker-side JobError messages: {sorted(JOB_ERRORS)}")


def test_nan_and_inf_params_are_refused_by_client_and_worker(client, served):
    with pytest.raises(InvalidParams, match="NaN or infinity"):
        client.submit(deployment="fz-gen", inputs="x", params={"temperature": math.nan})
    forged = client.celery.send_task(INFER_TASK, queue="pipefleet.fz-gen", kwargs={"spec": {
        "deployment": "fz-gen", "inputs": ["x"], "params": {"generate_kwargs": {"temperature": math.inf}}}})
    with pytest.raises(InvalidParams, match="finite"):
        client.job(forged.id).result(timeout=30)


def test_huge_inputs_fail_at_the_worker_and_oversized_ones_never_reach_the_queue(client, served, module_fleet):
    with pytest.raises(InvalidInput, match="limit is 5000"):
        client.submit(deployment="fz-tc", inputs="x" * 6_000).result(timeout=30)
    broker = module_fleet.server.client(0)
    queued_before = broker.llen("pipefleet.fz-tc")
    job_id = str(uuid.uuid4())
    with pytest.raises(PayloadTooLarge, match="at most 300000"):
        client.submit(deployment="fz-tc", inputs=["y" * 21_000] * 15, job_id=job_id)
    with pytest.raises(PayloadTooLarge, match="at most 300000"):
        client.submit(deployment="fz-tc", inputs="z" * 400_000, job_id=job_id)
    assert broker.llen("pipefleet.fz-tc") == queued_before
    assert client.job(job_id).status().state.value == "PENDING"  # nothing was ever stored for it


# --- messages crafted on the broker, past the client ------------------------------------------------------


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _publish_raw(module_fleet, body: bytes, content_type: str, *, task: str = INFER_TASK) -> str:
    from kombu import Connection

    task_id = str(uuid.uuid4())
    with Connection(module_fleet.broker_url) as connection:
        connection.Producer().publish(
            body, routing_key="pipefleet.fz-tc", content_type=content_type, content_encoding="binary",
            headers={"lang": "py", "task": task, "id": task_id, "root_id": task_id, "retries": 0},
            delivery_mode=2)
    return task_id


def _wait_in_log(worker, text: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in worker.log():
        assert time.monotonic() < deadline, f"{text!r} never appeared in the worker log"
        time.sleep(0.1)


def test_a_pickle_message_is_refused_not_executed(client, served, module_fleet, tmp_path):
    marker = tmp_path / "pwned"
    body = pickle.dumps(((), {"spec": _Exploit(str(marker))}, {}))
    _publish_raw(module_fleet, body, "application/x-python-serialize")
    _wait_in_log(served["worker"], "'application/x-python-serialize' is refused (JSON only)")
    _assert_serving(client, served)
    assert not marker.exists(), "the worker unpickled a message"


def test_malformed_messages_fail_clearly_or_are_dropped(client, served, module_fleet):
    missing = client.celery.send_task(INFER_TASK, queue="pipefleet.fz-tc", kwargs={"spec": {"inputs": ["x"]}})
    with pytest.raises(InvalidInput, match="deployment"):
        client.job(missing.id).result(timeout=30)
    not_a_dict = client.celery.send_task(INFER_TASK, queue="pipefleet.fz-tc", kwargs={"spec": ["garbage"]})
    with pytest.raises(InvalidInput, match="malformed job spec"):
        client.job(not_a_dict.id).result(timeout=30)
    no_spec = client.celery.send_task(INFER_TASK, queue="pipefleet.fz-tc", kwargs={})
    with pytest.raises(PipefleetError, match="spec"):
        client.job(no_spec.id).result(timeout=30)
    client.celery.send_task("pipefleet.no_such_task", queue="pipefleet.fz-tc", kwargs={"spec": {}})
    _wait_in_log(served["worker"], "pipefleet.no_such_task")
    _publish_raw(module_fleet, b"{not json", "application/json")
    _assert_serving(client, served)


# --- hostile media -------------------------------------------------------------------------------------------


def _png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _forged_png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + \
        chunk(b"IEND", b"")


def _audio(seconds: float, fmt: str) -> bytes:
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(int(16_000 * seconds), dtype=np.float32), 16_000, format=fmt)
    return buffer.getvalue()


def _b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode()}


def test_hostile_images_and_audio_fail_with_media_errors(client, served):
    bomb = _png((2_000, 2_000), "L")
    assert len(bomb) < 20_000  # 4 million pixels in a few kilobytes
    wav = _audio(1.0, "WAV")
    long_flac = _audio(60.0, "FLAC")
    cases = {
        ("fz-img", "truncated PNG"): (_b64(_png((32, 32))[:60]), "truncated or corrupt"),
        ("fz-img", "decompression bomb"): (_b64(bomb), "too large"),
        ("fz-img", "forged 100000x100000 header"): (_b64(_forged_png_header(100_000, 100_000)), "too large"),
        ("fz-img", "not an image"): (_b64(b"MZ\x90\x00 definitely not a picture"), "not a supported image"),
        ("fz-asr", "truncated WAV"): (_b64(wav[:30]), "corrupt or unsupported audio"),
        ("fz-asr", "60 s of FLAC silence"): (_b64(long_flac), "too long"),
    }
    figures = {}
    for (deployment, what), (value, message) in cases.items():
        with pytest.raises(MediaError, match=message):
            client.submit(deployment=deployment, inputs=value).result(timeout=60)
        figures[what] = message
    good = _b64(_png((32, 32)))
    assert client.submit(deployment="fz-img", inputs=good).result(timeout=60)
    assert "text" in client.submit(deployment="fz-asr", inputs=_b64(wav)).result(timeout=60)
    _assert_serving(client, served)
    print(f"FIGURES hostile-media: {len(cases)} cases refused with MediaError, worker serving")


# Poison messages: what a producer bug, another Celery app on the same Redis, or a hand-edited entry leaves in a
# queue or in the unacked hash. Each must end in the dead-letter list, and the next job must still complete.

def _poison_raw(client, variant: str, marker: str, job_id: str) -> bytes:
    """A message for ``fz-tc`` spoilt in one way; ``marker`` is its delivery tag (or its text when it has none)."""
    from producers.constants import INFER_TASK
    from producers.publishing import build_message

    good = json.loads(build_message(client.celery, INFER_TASK, task_id=job_id, queue="pipefleet.fz-tc", priority=0,
                                    kwargs={"spec": {"deployment": "fz-tc", "inputs": ["x"]}}).raw)
    good["properties"]["delivery_tag"] = marker
    if variant == "garbage":
        return f"garbage {marker} {{[".encode()
    if variant in ("hex", "nan"):
        spoilt = json.dumps(good)
        return spoilt.replace('"priority": 0', '"priority": 0x0' if variant == "hex" else '"priority": nan').encode()
    if variant == "unknown-task-no-id":
        good["headers"]["task"] = "some.other.app.task"
        del good["headers"]["id"]
    elif variant == "unknown-task":
        good["headers"]["task"] = "some.other.app.task"
    elif variant == "missing-id":
        del good["headers"]["id"]
    elif variant == "headers-not-object":
        good["headers"] = ["task", INFER_TASK]
    elif variant == "body-not-text":
        good["body"] = 5
    elif variant == "pickle":
        good["content-type"] = "application/x-python-serialize"
    elif variant == "not-an-object":
        return json.dumps([marker, good]).encode()
    return json.dumps(good).encode()


POISON_VARIANTS = ["garbage", "hex", "nan", "unknown-task-no-id", "unknown-task", "missing-id", "headers-not-object",
                   "body-not-text", "pickle", "not-an-object"]
POISONED: list[str] = []


def _dead_letter_records(broker) -> list[dict]:
    from producers.constants import DEAD_LETTER_KEY

    return [json.loads(record) for record in broker.lrange(DEAD_LETTER_KEY, 0, -1)]


@FUZZ
@given(variant=st.sampled_from(POISON_VARIANTS), where=st.sampled_from(["queue", "unacked"]))
def test_poison_in_the_queues_and_the_unacked_hash_is_dead_lettered(client, served, module_fleet, variant, where):
    import time
    import uuid

    from producers.errors import DeadLettered
    from worker import kombu_layout

    broker = module_fleet.server.client(int(module_fleet.broker_url.rsplit("/", 1)[1]))
    marker, job_id = f"poison-{uuid.uuid4()}", str(uuid.uuid4())
    raw = _poison_raw(client, variant, marker, job_id)
    if where == "queue":
        broker.lpush("pipefleet.fz-tc", raw)
    else:  # as a kombu consumer (no lease) that claimed it just now and died would leave it
        broker.hset(kombu_layout.UNACKED_KEY, marker, b"[" + raw + b', "", "pipefleet.fz-tc"]')
        broker.zadd(kombu_layout.UNACKED_INDEX_KEY, {marker: time.time()})
    POISONED.append(marker)
    text = f"after {variant} in the {where}"
    started = time.monotonic()
    assert_same(client.submit(deployment="fz-tc", inputs=text).result(timeout=15),
                local_pipeline("text-classification", served["models"]["text-classification"])(text))
    if variant == "unknown-task" and where == "queue":
        with pytest.raises(DeadLettered, match="unknown task"):
            client.job(job_id).result(timeout=15)
    assert time.monotonic() - started < 15


def test_every_poison_entry_ended_in_the_dead_letter_list_and_good_entries_were_restored(client, served,
                                                                                          module_fleet):
    from worker import kombu_layout

    broker = module_fleet.server.client(int(module_fleet.broker_url.rsplit("/", 1)[1]))
    # Good entries behind poison in the unacked hash: kombu's sweep restores them and they complete.
    good_ids = [_park_in_unacked(client, broker, f"restored {i}", age_s=3600 + i)[0] for i in range(3)]
    for job_id in good_ids:
        try:
            client.job(job_id).result(timeout=60)
        except PipefleetError as error:  # a timeout, above all
            raise AssertionError(f"{error}; {_sweep_state(broker)}; worker log tail:\n"
                                 f"{served['worker'].log()[-3000:]}") from None
    deadline = time.monotonic() + 20
    while True:
        records = _dead_letter_records(broker)
        found = {marker for marker in POISONED if any(r.get("tag") == marker or marker in str(r.get("message"))
                                                      for r in records)}
        if found == set(POISONED) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert found == set(POISONED), f"not dead-lettered: {sorted(set(POISONED) - found)[:5]}"
    assert all(record["reason"] for record in records)
    assert not set(POISONED) & {tag.decode() for tag in broker.hkeys(kombu_layout.UNACKED_KEY)}
    assert served["worker"].log().count("dead-lettered message") >= len(POISONED)
    _assert_serving(client, served)
    print(f"FIGURES poison: {len(POISONED)} poison entries dead-lettered, {len(good_ids)} good unacked entries "
          f"restored behind them")


def _park_in_unacked(client, broker, text: str, *, age_s: float) -> tuple[str, str]:
    """A good ``fz-tc`` job left in the unacked hash, ``age_s`` old, as a plain kombu consumer that died leaves it.

    Returns ``(job id, delivery tag)``; no lease holds it, so only kombu's sweep gives it back to the queue.
    """
    from producers.publishing import build_message
    from worker import kombu_layout

    job_id = str(uuid.uuid4())
    message = json.loads(build_message(client.celery, INFER_TASK, task_id=job_id, queue="pipefleet.fz-tc",
                                       priority=6, kwargs={"spec": {"deployment": "fz-tc", "inputs": [text]}}).raw)
    tag = message["properties"]["delivery_tag"]
    broker.hset(kombu_layout.UNACKED_KEY, tag, json.dumps([message, "", "pipefleet.fz-tc"]))
    broker.zadd(kombu_layout.UNACKED_INDEX_KEY, {tag: time.time() - age_s})
    return job_id, tag


def _sweep_state(broker) -> str:
    """What holds kombu's sweep back, for a failure message."""
    from worker import kombu_layout

    return (f"sweep lock ttl {broker.ttl('unacked_mutex')} s, {broker.hlen(kombu_layout.UNACKED_KEY)} unacked "
            f"entries, {broker.zcount(kombu_layout.UNACKED_INDEX_KEY, '-inf', time.time() - VISIBILITY_TIMEOUT_S)} "
            "past the visibility timeout")


def test_a_sweep_lock_left_by_a_killed_worker_holds_the_sweep_back_for_seconds_not_minutes(client, served,
                                                                                          module_fleet):
    """kombu's sweep runs under a Redis lock; a worker SIGKILLed while sweeping leaves it behind until it expires."""
    from producers.celery_app import SWEEP_MUTEX_EXPIRE_S
    from worker import kombu_layout

    broker = module_fleet.server.client(int(module_fleet.broker_url.rsplit("/", 1)[1]))
    with client.celery.connection_for_write() as connection:
        channel = connection.default_channel
        key, expire_s = channel.unacked_mutex_key, channel.unacked_mutex_expire
    assert expire_s == SWEEP_MUTEX_EXPIRE_S
    # Take the lock exactly as kombu's sweep does (kombu.transport.redis.Mutex), and never release it.
    lock = broker.lock(key, timeout=expire_s)
    deadline = time.monotonic() + 10
    while not lock.acquire(blocking=False):  # a live sweep holds it for milliseconds
        assert time.monotonic() < deadline, "the sweep lock was never free"
        time.sleep(0.01)
    job_id, tag = _park_in_unacked(client, broker, "behind a stale sweep lock", age_s=3600)
    time.sleep(3)  # three sweep rounds of the worker (visibility 6 s: one a second)
    assert broker.ttl(key) > 0 and broker.hexists(kombu_layout.UNACKED_KEY, tag), \
        "the job was restored while the lock lived: the lock did not hold the sweep back"
    try:
        client.job(job_id).result(timeout=expire_s + 20)
    except PipefleetError as error:
        raise AssertionError(f"{error}; {_sweep_state(broker)}") from None
    print(f"FIGURES stale sweep lock: expires after {expire_s} s (kombu's default 300 s); the job behind it "
          "completed once it did")


def test_the_ownership_pages_python_blocks_run_on_this_fleet(client, served, capsys):
    """Every ```python block of docs/ownership.md, run against this module's worker (after the poison above)."""
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "ownership.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert len(blocks) == 2
    for block in blocks:
        exec(compile(block, "docs/ownership.md", "exec"), {"client": client})
    from producers.constants import DEAD_LETTER_KEY

    printed = capsys.readouterr().out
    newest = json.loads(client.redis.lindex(DEAD_LETTER_KEY, 0))
    assert printed.startswith(newest["reason"]), "the dead-letter block did not print the newest record"
    assert served["worker"].name in printed, "the reliability block printed no worker"
