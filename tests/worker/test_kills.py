"""Workers SIGKILLed at the moments that lose jobs in a plain kombu consumer, on a real fleet, shipped defaults.

Each test prints its figures (rounds, sent, completed, lost, duplicated, recovery) on one ``FIGURES`` line.
The guarantee under test: once ``submit()`` returns, the job completes as long as one worker of its deployment
stays alive, whichever moment another worker dies at, and a dead worker's jobs are back within the lease
(``lease_ttl_s``, 5 s) plus a reap round, whatever the job length: well within 15 s of the kill.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

from producers.constants import LEASE_TTL_S
from tests.conftest import Fleet
from tests.fault_pipelines import BATCH_LOG_PREFIX, SLOW_S_ENV, SLOW_STAGE_ENV, STAGE_LOG_PREFIX
from tests.fleet import held_job_ids, job_log_counts
from tests.oracle import assert_same, local_pipeline
from tests.tasks.test_distributed_pipelines import LABELS, synthetic_audio
from tests.tiny_models.audio import SAMPLING_RATE
from tests.worker.test_faults import SLOW_CLASS, _check_outputs, _collect, _deployment, _figures, _wait_for

RECOVERY_BOUND_S = 15.0
"""A killed worker's jobs complete elsewhere within this long of the kill (the issue's promise)."""


def _duplicates(workers) -> tuple[int, int]:
    """``(results stored twice, runs after a stored result)`` counted across every worker's log."""
    stored, again = job_log_counts(workers)
    return sum(n - 1 for n in stored.values() if n > 1), sum(again.values())


def _broker(fleet: Fleet):
    return fleet.server.client(int(fleet.broker_url.rsplit("/", 1)[1]))


def _queued(fleet: Fleet, queue: str) -> int:
    client = fleet.server.client(int(fleet.broker_url.rsplit("/", 1)[1]))
    return sum(client.llen(key) for key in client.keys(f"{queue}*") if client.type(key) == b"list")


def test_sigkill_of_a_saturated_worker_loses_nothing(fleet: Fleet, model_dir):
    """The victim has every job thread busy and more jobs wait in the queue while it claims."""
    model = str(model_dir("text-classification"))
    config = fleet.config([_deployment("kill-sat", model, max_batch_size=4)])
    victim = fleet.worker(config, deployments=["kill-sat"], env={SLOW_S_ENV: "1"}, args=["--concurrency", "6"])
    survivor = fleet.worker(config, deployments=["kill-sat"], env={SLOW_S_ENV: "0"}, args=["--concurrency", "6"])
    sent = 120
    with fleet.client() as client:
        os.kill(survivor.proc.pid, signal.SIGSTOP)
        try:
            jobs = {}
            for i in range(sent):
                text = f"SLOW saturated job {i}"
                jobs[client.submit(deployment="kill-sat", inputs=text).id] = text
            _wait_for(lambda: victim.log().count(BATCH_LOG_PREFIX) >= 2, 60, "the victim to run two batches")
            backlog = _queued(fleet, "pipefleet.kill-sat")
        finally:
            os.kill(survivor.proc.pid, signal.SIGCONT)
        held = held_job_ids(_broker(fleet), victim.name)
        victim.proc.kill()
        victim.proc.wait(10)
        killed_at = time.monotonic()
        held_outputs = _collect(client, {job_id: jobs[job_id] for job_id in held if job_id in jobs}, timeout_s=60)
        held_back_s = time.monotonic() - killed_at
        outputs = _collect(client, jobs, timeout_s=120)
        recovered_s = time.monotonic() - killed_at
        completed = _check_outputs(model, jobs, outputs)
    stored_twice, ran_again = _duplicates([victim, survivor])
    assert backlog > 0, "the queue was empty at the kill: the victim was not saturated"
    assert held and len(held_outputs) == len(held), "the victim held no job when it died"
    # A job whose result was stored just before the kill, but not yet acked, comes back marked redelivered:
    # the survivor finds its result and acks it without running it again.
    assert completed == sent and stored_twice == 0 and ran_again == 0, (stored_twice, ran_again)
    assert held_back_s <= RECOVERY_BOUND_S, f"the victim's jobs took {held_back_s:.1f}s to complete elsewhere"
    _figures("sigkill-saturated", sent=sent, completed=completed, lost=sent - completed, duplicated=stored_twice,
             ran_again=ran_again, stored_before_kill_not_rerun=survivor.log().count(": REDELIVERED-"),
             held_at_kill=len(held), backlog_at_kill=backlog,
             held_jobs_done_after_kill_s=round(held_back_s, 1), lease_ttl_s=LEASE_TTL_S,
             all_done_after_kill_s=round(recovered_s, 1))


def _kill_during_stage(fleet: Fleet, *, deployment: dict, inputs, params: dict, local, stage: str) -> None:
    """Run one chunk-pipeline job on a slow victim, SIGKILL it inside ``stage``, expect the survivor to finish."""
    name = deployment["name"]
    config = fleet.config([deployment])
    victim = fleet.worker(config, deployments=[name], env={SLOW_STAGE_ENV: "12"})
    survivor = fleet.worker(config, deployments=[name])
    marker = f"{STAGE_LOG_PREFIX} {stage}"
    with fleet.client() as client:
        os.kill(survivor.proc.pid, signal.SIGSTOP)
        try:
            warm_up_markers = victim.log().count(marker)  # warm-up passes through the slow stage too
            job = client.submit(deployment=name, inputs=inputs, params=params)
            _wait_for(lambda: victim.log().count(marker) > warm_up_markers and held_job_ids(_broker(fleet),
                                                                                             victim.name),
                      90, f"the victim to hold the job inside {stage}")
            held = held_job_ids(_broker(fleet), victim.name)
            victim.proc.kill()
            victim.proc.wait(10)
        finally:
            os.kill(survivor.proc.pid, signal.SIGCONT)
        killed_at = time.monotonic()
        try:
            output = job.result(timeout=120)
        except Exception as error:
            raise AssertionError(f"{error}\nstatus: {job.status()}\nsurvivor log:\n{survivor.log()[-6000:]}"
                                 f"\nvictim log:\n{victim.log()[-3000:]}") from error
        recovered_s = time.monotonic() - killed_at
        assert_same(output, local)
    stored_twice, ran_again = _duplicates([victim, survivor])
    assert held, "the victim held nothing when it died"
    assert stored_twice == 0 and ran_again == 0, (stored_twice, ran_again)
    assert recovered_s <= RECOVERY_BOUND_S, f"the job took {recovered_s:.1f}s to complete after the kill"
    _figures(f"kill-during-{stage}", sent=1, completed=1, lost=0, duplicated=stored_twice, ran_again=ran_again,
             held_at_kill=len(held), done_after_kill_s=round(recovered_s, 1), lease_ttl_s=LEASE_TTL_S)


def test_sigkill_during_a_chord_assemble_redelivers_the_assemble(fleet: Fleet, model_dir):
    model = str(model_dir("zero-shot-classification"))
    text = "the storm rolled over the stadium before the match"
    local = local_pipeline("zero-shot-classification", model)(text, candidate_labels=LABELS)
    deployment = {"name": "kill-assemble", "task": "zero-shot-classification", "model": model,
                  "max_batch_size": 8,
                  "pipeline_kwargs": {"pipeline_class": "tests.fault_pipelines.SlowPostprocessZeroShot"}}
    _kill_during_stage(fleet, deployment=deployment, inputs=text, params={"candidate_labels": LABELS},
                       local=local, stage="postprocess")


def test_sigkill_during_a_split_jobs_forward_redelivers_its_windows(fleet: Fleet, model_dir):
    model = str(model_dir("asr-ctc"))
    audio = synthetic_audio(30.0)
    params = {"chunk_length_s": 8.0, "stride_length_s": 1.5}
    local = local_pipeline("automatic-speech-recognition", model)(audio.copy(), **params)
    deployment = {"name": "kill-split", "task": "automatic-speech-recognition", "model": model,
                  "max_batch_size": 4,
                  "pipeline_kwargs": {"pipeline_class": "tests.fault_pipelines.SlowForwardSpeechRecognition"}}
    _kill_during_stage(fleet, deployment=deployment, inputs={"array": audio, "sampling_rate": SAMPLING_RATE},
                       params=params, local=local, stage="forward")


class _Load:
    """Submits jobs from a background thread until stopped; remembers every job id and its text."""

    def __init__(self, client, deployment: str, per_second: float) -> None:
        self.client = client
        self.deployment = deployment
        self.delay_s = 1.0 / per_second
        self.jobs: dict[str, str] = {}
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        i = 0
        while not self._stop.wait(self.delay_s):
            text = f"{'SLOW ' if i % 3 == 0 else ''}loop job {i}"
            try:
                self.jobs[self.client.submit(deployment=self.deployment, inputs=text).id] = text
            except BaseException as error:  # a submit that raised is not a job the fleet accepted
                self.errors.append(error)
            i += 1


@pytest.mark.heavy
@pytest.mark.timeout(1800)
def test_twenty_kills_at_random_moments_under_load_lose_nothing(fleet: Fleet, model_dir):
    """Kill, restart, kill again: one of two workers dies at a random moment each round, under steady load."""
    rounds = int(os.environ.get("PIPEFLEET_KILL_ROUNDS", "20"))
    rng = random.Random(int(os.environ.get("PIPEFLEET_KILL_SEED", "7")))
    model = str(model_dir("text-classification"))
    config = fleet.config([_deployment("kill-loop", model, max_batch_size=8, max_batch_wait_ms=20)])
    env = {SLOW_S_ENV: "0.3"}
    workers = [fleet.worker(config, deployments=["kill-loop"], env=env, args=["--concurrency", "12"])
               for _ in range(2)]
    every_worker = list(workers)
    with fleet.client() as client:
        load = _Load(client, "kill-loop", per_second=40)
        load.start()
        try:
            for round_index in range(rounds):
                victim_slot = round_index % 2
                other = workers[1 - victim_slot]
                # The guarantee needs one live worker: wait until the other one consumes again.
                _wait_for(lambda: other.name in {w for d in client.deployments() for w in d.workers}, 120,
                          "the other worker to be ready")
                time.sleep(rng.uniform(0.2, 3.0))
                workers[victim_slot].proc.kill()
                workers[victim_slot].proc.wait(10)
                replacement = fleet.worker(config, deployments=["kill-loop"], env=env, args=["--concurrency", "12"],
                                           wait=False)
                workers[victim_slot] = replacement
                every_worker.append(replacement)
        finally:
            load.stop()
        last_kill = time.monotonic()
        outputs = _collect(client, load.jobs, timeout_s=240)
        recovered_s = time.monotonic() - last_kill
        sent = len(load.jobs)
        completed = _check_outputs(model, load.jobs, outputs)
    stored_twice, ran_again = _duplicates(every_worker)
    assert not load.errors, load.errors[:3]
    assert completed == sent and stored_twice == 0
    _figures("kill-loop", rounds=rounds, sent=sent, completed=completed, lost=sent - completed,
             duplicated=stored_twice, ran_again=ran_again, all_done_after_last_kill_s=round(recovered_s, 1),
             lease_ttl_s=LEASE_TTL_S)
