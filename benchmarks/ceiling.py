"""Per-job cost of the fleet: single-job throughput on a near-free model, and CPU ms per job, in one run.

    python -m benchmarks.ceiling [--n 2000] [--producers 8] [--in-flight 16] [--profile] [--task-events]
    python -m benchmarks.ceiling --model bert-base --gpu 0        (benchmarks/gpu.sh runs this on a GPU)

Model: a tiny random DistilBERT text classifier (tests.tiny_models), whose forward pass costs almost nothing,
so what is measured is the path that feeds the model: publish, consume, batch, store, fetch. One worker with
``max_batch_size = 64``. Rows:

- in-process ``pipeline(texts, batch_size=32)``: the model's own limit here;
- one producer process submitting N single-input jobs (in one ``submit_many``, then with one ``submit()``
  each), then collecting every result;
- P producer processes, each keeping K jobs in flight (the web-backend pattern);
- producer CPU per job of a plain ``submit()`` then ``result()`` loop;
- single-job latency p50 against the in-process ``pipe(text)``, both back to back and idle (each job after a
  20 ms pause, on both sides: see :data:`IDLE_GAP_S`).

The in-process rows run with the worker's malloc thresholds (:mod:`worker.allocator`), as the worker does.

CPU per job is read from the processes themselves (``/proc/<pid>/stat`` of the worker, ``getrusage`` of each
producer). Under each fleet row, the worker's CPU per job by thread (``/proc/<pid>/task/<tid>/stat``, each
thread named by the function py-spy finds it running). With ``--profile``, a py-spy profile of the worker during the single-producer row is written to
``.pipefleet/ceiling-worker.txt`` (collapsed stacks) (needs py-spy).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.models import STATE_DIR
from tests.fleet import REPO_ROOT, RedisServer, start_worker, worker_env, write_config

TINY_DIR = STATE_DIR / "models" / "tiny-text-classification"
BERT_BASE_DIR = STATE_DIR / "models" / "bert-base-random"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
IDLE_GAP_S = 0.02
"""Pause before each job of the idle-latency rows, fleet and in-process alike: a job that finds the machine idle.

Back-to-back calls keep the model's code and weights in the CPU's caches; after a pause the same forward pass
costs about twice as much on the 2-core VM (docs/benchmarks.md), so the overhead is measured between two idle
runs."""
LOOP_LABEL = "1 producer, submit() then result() loop ({n})"
IDLE_LABEL = "1 producer, one job every 20 ms ({n}), latency"


def ensure_tiny_model() -> Path:
    """Build the tiny text classifier once."""
    if not (TINY_DIR / "config.json").exists():
        from tests import tiny_models

        tiny_models.build("text-classification", TINY_DIR)
    return TINY_DIR


def ensure_bert_base() -> Path:
    """A BERT-base-shaped classifier (12 layers, 768 wide) with random weights: realistic cost per item."""
    if not (BERT_BASE_DIR / "config.json").exists():
        import torch
        from transformers import BertConfig, BertForSequenceClassification

        from tests.tiny_models.text import bert_tokenizer

        torch.manual_seed(0)
        tokenizer = bert_tokenizer()
        config = BertConfig(vocab_size=len(tokenizer), num_labels=2, max_position_embeddings=512)
        BertForSequenceClassification(config).save_pretrained(BERT_BASE_DIR)
        tokenizer.save_pretrained(BERT_BASE_DIR)
    return BERT_BASE_DIR


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def command_calls(client: Any) -> dict[str, int]:
    """Calls of each command Redis has run, from ``INFO commandstats`` (a script's own calls included), by
    name; the ``info`` call itself and the benchmark's own reads left out."""
    return {name.removeprefix("cmdstat_"): stats["calls"] for name, stats in client.info("commandstats").items()
            if name not in ("cmdstat_info",)}


def thread_cpu_s(pid: int) -> dict[int, float]:
    """User + system CPU seconds of each live thread of a process, by thread id."""
    seconds = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        seconds[int(tid)] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return seconds


#: Worker thread -> a frame of its stack that names it (first match wins).
THREAD_ROLES = {
    "inference (batcher, forward pass)": "DeviceRunner._loop",
    "claim (claim, decode, prepare, submit)": "BulkConsumer._run",
    "commit (outcome, encode, store, ack)": "HotPath._commit_loop",
    "queue watchers": "QueueWatcher._watch",
    "acks": "BulkAcker._run",
    "job events": "EventWriter._loop",
    "lease": "LeaseKeeper._loop",
    "deadlines": "DeadlineWatch._loop",
    "Celery's event loop (main thread)": "_run_module_as_main",
}


def thread_roles(pid: int) -> dict[int, str]:
    """Thread id -> role, from one ``py-spy dump`` of the process (empty without py-spy)."""
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        return {}
    dump = subprocess.run([str(spy), "dump", "-p", str(pid)], capture_output=True, text=True).stdout
    roles = {}
    for block in dump.split("\nThread ")[1:]:
        head, _, stack = block.partition("\n")
        try:
            tid = int(head.split()[0], 0)
        except ValueError:
            continue
        roles[tid] = next((role for role, frame in THREAD_ROLES.items() if frame in stack), "other")
    return roles


def texts(n: int) -> list[str]:
    """Short, distinct sentences."""
    words = ["the", "fleet", "runs", "a", "small", "model", "on", "every", "job", "fast", "queue", "worker"]
    return [" ".join(words[(i * 7 + k) % len(words)] for k in range(4 + i % 9)) + f" {i}" for i in range(n)]


def producer_main(argv: list[str]) -> int:
    """Child process: submit jobs, print JSON with seconds, CPU and outputs."""
    import resource

    from producers import FleetClient

    parser = argparse.ArgumentParser()
    parser.add_argument("--broker")
    parser.add_argument("--backend")
    parser.add_argument("--mode", choices=["burst", "burst-submit", "in-flight", "loop", "idle"])
    parser.add_argument("--n", type=int)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--in-flight", type=int, default=16)
    parser.add_argument("--start-at", type=float, default=0.0)
    args = parser.parse_args(argv)
    inputs = texts(args.offset + args.n)[args.offset:]
    with FleetClient(args.broker, args.backend) as client:
        client.resolve(deployment="tiny")
        client.submit(deployment="tiny", inputs="warm").result(timeout=60)
        while time.time() < args.start_at:
            time.sleep(0.001)
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        outputs: list = []
        latencies: list[float] = []
        if args.mode == "burst":
            jobs = client.submit_many([{"deployment": "tiny", "inputs": text} for text in inputs]) \
                if hasattr(client, "submit_many") else [client.submit(deployment="tiny", inputs=t) for t in inputs]
            outputs = [job.result(timeout=600) for job in jobs]
        elif args.mode == "burst-submit":
            jobs = [client.submit(deployment="tiny", inputs=text) for text in inputs]
            outputs = [job.result(timeout=600) for job in jobs]
        elif args.mode in ("loop", "idle"):
            for text in inputs:
                if args.mode == "idle":
                    time.sleep(IDLE_GAP_S)
                began = time.perf_counter()
                outputs.append(client.submit(deployment="tiny", inputs=text).result(timeout=60))
                latencies.append(time.perf_counter() - began)
        else:
            window: list = []
            for text in inputs:
                window.append(client.submit(deployment="tiny", inputs=text))
                if len(window) >= args.in_flight:
                    outputs.append(window.pop(0).result(timeout=600))
            outputs.extend(job.result(timeout=600) for job in window)
        seconds = time.perf_counter() - started
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    json.dump({"seconds": seconds, "cpu_s": cpu_s, "n": len(outputs), "outputs": outputs,
               "latencies": latencies}, sys.stdout)
    return 0


def _producer(server: RedisServer, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "benchmarks.ceiling", "--producer", "--broker", f"{server.url}/0",
               "--backend", f"{server.url}/1", *extra]
    return subprocess.Popen(command, cwd=REPO_ROOT, env=worker_env({"OMP_NUM_THREADS": "1"}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"producer failed:\n{err[-3000:]}")
    return json.loads(out)


def in_process_latency_ms(model: Path, n: int, device: int = -1, gap_s: float = 0.0) -> float:
    """p50 of sequential single-input calls of the in-process pipeline (after a warm-up), ``gap_s`` apart."""
    code = ("import json,time;from transformers import pipeline;from benchmarks.ceiling import texts;"
            "from worker.allocator import keep_large_allocations;keep_large_allocations();"
            f"p=pipeline('text-classification',model={str(model)!r},device={device});t=texts({n});"
            "[p(x) for x in t[:10]];d=[];\nfor x in t:\n"
            f" time.sleep({gap_s})\n s=time.perf_counter();p(x);d.append(time.perf_counter()-s)"
            "\nd.sort();print(json.dumps({'p50':d[len(d)//2]}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=worker_env({"OMP_NUM_THREADS": "1"}),
                         capture_output=True, text=True, check=True)
    return 1000 * json.loads(out.stdout.strip().splitlines()[-1])["p50"]


def in_process(model: Path, n: int, device: int = -1, batch_size: int = 32) -> float:
    """Items/s of the in-process pipeline with ``batch_size`` (after a warm-up)."""
    code = ("import json,sys,time;from transformers import pipeline;from benchmarks.ceiling import texts;"
            "from worker.allocator import keep_large_allocations;keep_large_allocations();"
            f"p=pipeline('text-classification',model={str(model)!r},device={device});t=texts({n});"
            f"p(t[:64],batch_size={batch_size});"
            f"s=time.perf_counter();o=p(t,batch_size={batch_size});print(json.dumps({{'s':time.perf_counter()-s}}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=worker_env({"OMP_NUM_THREADS": "1"}),
                         capture_output=True, text=True, check=True)
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return n / data["s"]


def run_fleet(args: argparse.Namespace, model: Path) -> dict[str, dict]:
    """Every fleet row against one worker."""
    server = RedisServer().start()
    rows: dict[str, dict] = {}
    try:
        config = write_config(STATE_DIR / "ceiling.toml", broker_url=f"{server.url}/0",
                              result_backend=f"{server.url}/1",
                              deployments=[{"name": "tiny", "task": "text-classification", "model": str(model),
                                            "max_batch_size": 64, "max_batch_wait_ms": 5,
                                            **({"device": 0} if args.gpu is not None else {})}],
                              task_events=args.task_events)
        worker = start_worker(config, STATE_DIR, deployments=["tiny"], name="ceiling-worker",
                              gpu="none" if args.gpu is None else str(args.gpu),
                              env={"OMP_NUM_THREADS": "1"}, redis_client=server.client(0))
        pid = worker.proc.pid
        roles = thread_roles(pid)
        try:
            def measure(label: str, procs: list[subprocess.Popen], jobs: int, profile: bool = False) -> None:
                spy = None
                if profile:
                    spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "--gil", "-p", str(pid), "-o",
                                            str(STATE_DIR / "ceiling-worker.txt"), "--format", "raw", "-d", "15"],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                commands0 = command_calls(server.client(0))
                cpu0, threads0 = process_cpu_s(pid), thread_cpu_s(pid)
                results = [_finish(p) for p in procs]
                worker_cpu = process_cpu_s(pid) - cpu0
                by_role: dict[str, float] = {}
                for tid, seconds in thread_cpu_s(pid).items():
                    role = roles.get(tid, "other")
                    by_role[role] = by_role.get(role, 0.0) + 1000 * (seconds - threads0.get(tid, 0.0)) / jobs
                if spy is not None:
                    spy.wait()
                seconds = max(r["seconds"] for r in results)
                rows[label] = {"jobs_per_s": jobs / seconds, "worker_cpu_ms_per_job": 1000 * worker_cpu / jobs,
                               "producer_cpu_ms_per_job": 1000 * sum(r["cpu_s"] for r in results) / jobs}
                latencies = sorted(x for r in results for x in r["latencies"])
                if latencies:
                    rows[label]["p50_ms"] = 1000 * latencies[len(latencies) // 2]
                rows[label]["worker_threads_cpu_ms_per_job"] = by_role
                commands = {name: (calls - commands0.get(name, 0)) / jobs
                            for name, calls in command_calls(server.client(0)).items()}
                rows[label]["redis_commands_per_job"] = {k: v for k, v in commands.items() if v >= 0.01}
                print(f"  {label:<58} {jobs / seconds:8.0f} jobs/s  worker {rows[label]['worker_cpu_ms_per_job']:.2f}"
                      f" ms/job  producer {rows[label]['producer_cpu_ms_per_job']:.2f} ms/job", flush=True)
                top = sorted(rows[label]["redis_commands_per_job"].items(), key=lambda item: -item[1])
                print(f"      Redis commands per job: {sum(commands.values()):.2f} ("
                      + ", ".join(f"{name} {calls:.2f}" for name, calls in top[:8]) + ")", flush=True)
                for role, ms in sorted(by_role.items(), key=lambda item: -item[1]):
                    if ms >= 0.005:
                        print(f"      {role:<54} {ms:6.3f} ms/job", flush=True)

            n = args.n
            measure(f"1 producer, {n} single jobs at once (submit_many)",
                    [_producer(server, "--mode", "burst", "--n", str(n))], n, profile=args.profile)
            measure(f"1 producer, {n} single jobs, submit() each",
                    [_producer(server, "--mode", "burst-submit", "--n", str(n))], n)
            per = n // args.producers
            start_at = time.time() + 15
            procs = [_producer(server, "--mode", "in-flight", "--n", str(per), "--offset", str(i * per),
                               "--in-flight", str(args.in_flight), "--start-at", str(start_at))
                     for i in range(args.producers)]
            measure(f"{args.producers} producers x {args.in_flight} in flight", procs, per * args.producers)
            loop_n = min(n, 300)
            measure(LOOP_LABEL.format(n=loop_n), [_producer(server, "--mode", "loop", "--n", str(loop_n))], loop_n)
            measure(IDLE_LABEL.format(n=loop_n), [_producer(server, "--mode", "idle", "--n", str(loop_n))], loop_n)
        finally:
            worker.terminate()
    finally:
        server.cleanup()
    return rows


def main() -> int:
    if "--producer" in sys.argv:
        argv = list(sys.argv[1:])
        argv.remove("--producer")
        return producer_main(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--producers", type=int, default=8)
    parser.add_argument("--in-flight", type=int, default=16)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--task-events", action="store_true", help="the worker sends Celery task events (as with "
                        "Flower watching)")
    parser.add_argument("--model", choices=["tiny", "bert-base"], default="tiny")
    parser.add_argument("--gpu", type=int, default=None, help="pin the worker (and the in-process run) to this GPU")
    parser.add_argument("--json", type=Path, default=STATE_DIR / "ceiling-results.json")
    args = parser.parse_args()
    STATE_DIR.mkdir(exist_ok=True)
    model = ensure_tiny_model() if args.model == "tiny" else ensure_bert_base()
    device = "cpu" if args.gpu is None else f"cuda:{args.gpu}"
    print(f"machine: {os.cpu_count()} cores, {device}; {args.model} text classifier (random weights); "
          "one worker, max_batch_size 64")
    rows: dict[str, dict] = {}
    for batch_size in (32, 64):
        local = in_process(model, args.n, -1 if args.gpu is None else args.gpu, batch_size)
        rows[f"in-process batch_size={batch_size}"] = {"jobs_per_s": local}
        print(f"  {f'in-process pipeline(texts, batch_size={batch_size})':<58} {local:8.0f} items/s", flush=True)
    rows.update(run_fleet(args, model))
    loop_n = min(args.n, 300)
    device = -1 if args.gpu is None else args.gpu
    for key, label, gap_s in (("back-to-back single-job latency", LOOP_LABEL, 0.0),
                              ("idle single-job latency", IDLE_LABEL, IDLE_GAP_S)):
        local_p50 = in_process_latency_ms(model, loop_n, device, gap_s=gap_s)
        fleet_p50 = rows[label.format(n=loop_n)]["p50_ms"]
        rows[key] = {"in_process_p50_ms": local_p50, "fleet_p50_ms": fleet_p50, "overhead_p50_ms": fleet_p50 - local_p50}
        print(f"  {key} p50: in-process {local_p50:.2f} ms, fleet {fleet_p50:.2f} ms, "
              f"overhead {fleet_p50 - local_p50:.2f} ms", flush=True)
    args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
