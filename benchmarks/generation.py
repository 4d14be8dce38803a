"""Text generation: static batches, continuous batching (transformers' engine) and the engine alone, in one run.

    python -m benchmarks.generation                          # CPU: a 4-layer 256-wide and a 2-layer 64-wide Llama
    python -m benchmarks.generation --device cuda --sizes 1b --static   # a GPU, a ~1B-parameter random Llama
    python -m benchmarks.generation --profile .pipefleet/profile        # py-spy the worker, then the engine alone

Same model, same worker code, one fresh worker per deployment kind:

- **head-of-line**: 8 long jobs (200 new tokens) generate; then one short job
  (8 new tokens) arrives. Its time to first token (TTFT, from submit to its
  first streamed piece) and its latency, once on the fresh worker
  (``first_short_ttft_s``) and again after the uncounted throughput passes
  (``short_ttft_s``), when the engine has met the batch shapes as a serving one has.
- **throughput**: 64 concurrent jobs with ``max_new_tokens`` spread evenly from
  16 to 256, as generated tokens/s (submit of the first to result of the last)
  and p50/p95 job latency. Nobody streams these jobs; the client awaits their
  results on one asyncio loop.
- **the engine alone** on the same 64 requests: ``init_continuous_batching`` +
  ``add_request`` in this process with each prompt's own ``max_new_tokens``,
  ``streaming=False`` (and once ``streaming=True``): the upper bound of what the
  fleet can add to. One engine stays open beside the idle worker, and its
  passes alternate with the fleet's: engine, fleet, engine, … (``--rounds``
  fleet passes, default 7). The **fleet-to-engine ratio** divides the median
  fleet pass by the median engine pass, so a machine whose speed drifts during
  the run (a shared VM's does, by 2x within minutes) weighs on both sides.
- with ``--static``, the static worker and ``pipeline(...)`` with ``batch_size``.
- ``--passes 2`` (the default): each side first runs one throughput pass that
  does not count. The first pass over new batch shapes runs slower than the
  next: by a third on the CPU, several times on a GPU.
- each side's **CPU per thread** over its counted passes
  (:mod:`benchmarks.thread_cpu`), as a share of their wall time: where the
  fleet's cores go beside the engine's; and the fleet's **company** (the
  worker's own threads, the client, redis-server) as a share and in ms per job.

The model has random weights and no end-of-sequence token, so every job
generates exactly its ``max_new_tokens``; tokens that are not readable alone
(byte pieces) are muted, so every step streams a piece and the first piece is
the first token. ``setup`` records the load average before and after: the
machine may be shared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import threading
import time
from pathlib import Path

from collections import Counter

from benchmarks.models import STATE_DIR
from benchmarks.thread_cpu import (NATIVE, cpu_seconds, process_cpu_seconds, python_thread_names, share_of_wall,
                                   subtract)
from tests.fleet import RedisServer, start_worker, write_config

SIZES = {
    # hidden, layers, heads, kv heads, intermediate
    "small": (256, 4, 4, 2, 512),
    "tiny": (64, 2, 2, 1, 128),
    "1b": (2048, 16, 32, 8, 8192),
}
LONG_TOKENS = 200
SHORT_TOKENS = 8
N_JOBS = 64
THREADS = str(os.cpu_count() or 1)
PROMPTS = ["the quick brown fox", "a stormy night over the sea", "alice lives in paris", "hello there",
           "what did bob think of the museum in rome?", "the market near oslo"]


def build_model(size: str) -> Path:
    """A random Llama of ``size`` with the tests' byte-level tokenizer and no end-of-sequence token."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from tests.tiny_models.text import gpt2_tokenizer

    directory = STATE_DIR / "models" / f"llama-{size}"
    if (directory / "config.json").exists():
        return directory
    hidden, layers, heads, kv_heads, intermediate = SIZES[size]
    tokenizer = gpt2_tokenizer()
    tokenizer.model_max_length = 4096
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=intermediate,
                         max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id, eos_token_id=None,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    if size == "1b":  # saved in bf16, the dtype it runs in: half the bytes to write and load
        model = model.to(torch.bfloat16)
    with torch.no_grad():
        # Tokens that decode to nothing readable alone (byte pieces, specials) get a zero logit, below most
        # random ones: greedy text then shows in (nearly) every step, so the first piece is the first token.
        for token_id in range(len(tokenizer)):
            text = tokenizer.decode([token_id], skip_special_tokens=True)
            if not text or "\ufffd" in text:
                model.lm_head.weight[token_id].zero_()
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=None,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


MIX = {"jobs": N_JOBS, "max_tokens": 256}
"""The throughput mix: ``jobs`` jobs with 16 to ``max_tokens`` new tokens (``--jobs``, ``--max-tokens``)."""


def token_budgets() -> list[int]:
    """``max_new_tokens`` of the throughput jobs: 16 to ``MIX["max_tokens"]``, evenly spread, shuffled."""
    jobs, top = MIX["jobs"], MIX["max_tokens"]
    budgets = [16 + ((top - 16) * i) // (jobs - 1) for i in range(jobs)]
    return budgets[::2] + budgets[1::2]


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class Worker:
    """A fresh worker serving one deployment ``gen`` of the model."""

    def __init__(self, server: RedisServer, model: Path, args: argparse.Namespace, continuous: bool) -> None:
        deployment = {"name": "gen", "task": "text-generation", "model": str(model), "max_batch_size": 64,
                      "max_batch_wait_ms": 5, "continuous_batching": continuous}
        if args.device == "cuda":
            deployment.update(device=0, dtype="bfloat16")
        if continuous:
            deployment["continuous_batching_options"] = engine_config(args.device)
        self.server = server
        self.gpu = "0" if args.device == "cuda" else "none"
        self.config = write_config(STATE_DIR / "bench-gen.toml", broker_url=f"{server.url}/0",
                                   result_backend=f"{server.url}/1", deployments=[deployment])

    def __enter__(self) -> "Worker":
        self.server.client(0).flushall()
        self.worker = start_worker(self.config, STATE_DIR, deployments=["gen"], name="bench-gen", gpu=self.gpu,
                                   env={"OMP_NUM_THREADS": THREADS}, redis_client=self.server.client(0))
        return self

    def __exit__(self, *exc) -> None:
        self.worker.terminate()


def head_of_line(client) -> dict:
    """TTFT and latency of a short job that arrives while 8 long generations run."""
    params = {"max_new_tokens": LONG_TOKENS, "do_sample": False}
    long_jobs = [client.submit(deployment="gen", inputs=PROMPTS[i % len(PROMPTS)], params=params, stream=True)
                 for i in range(8)]
    for job in long_jobs:
        next(iter(job.stream(timeout_s=600)))
    started = time.perf_counter()
    short = client.submit(deployment="gen", inputs=PROMPTS[3], params={"max_new_tokens": SHORT_TOKENS,
                                                                      "do_sample": False}, stream=True)
    pieces = short.stream(timeout_s=600)
    next(iter(pieces))
    ttft = time.perf_counter() - started
    list(pieces)
    latency = time.perf_counter() - started
    long_done = sum(job.status().state.value == "SUCCESS" for job in long_jobs)
    for job in long_jobs:
        job.result(timeout=600)
    return {"short_ttft_s": round(ttft, 3), "short_latency_s": round(latency, 3),
            "long_jobs_done_when_short_ended": long_done}


def throughput(client) -> dict:
    """64 concurrent jobs with 16..256 new tokens: tokens/s and job latency.

    The jobs are submitted one by one, and their results awaited on one asyncio loop (``job.aresult()``), as an
    async web backend or the gateway waits: one thread for all 64, where a thread per job would take CPU
    from the engine on a small machine.
    """
    budgets = token_budgets()
    started = time.perf_counter()
    jobs = [(time.perf_counter(), client.submit(deployment="gen", inputs=PROMPTS[i % len(PROMPTS)],
                                                params={"max_new_tokens": n, "do_sample": False}))
            for i, n in enumerate(budgets)]

    async def latency(submitted: float, job) -> float:
        await job.aresult(timeout=1800)
        return time.perf_counter() - submitted

    async def wait_all() -> list[float]:
        return await asyncio.gather(*(latency(submitted, job) for submitted, job in jobs))

    latencies = asyncio.run(wait_all())
    wall = time.perf_counter() - started
    return {"tokens": sum(budgets), "wall_s": round(wall, 2), "tokens_per_s": round(sum(budgets) / wall, 1),
            "p50_latency_s": round(statistics.median(latencies), 2),
            "p95_latency_s": round(percentile(latencies, 0.95), 2)}


def engine_config(device: str, **overrides) -> dict:
    """The ``ContinuousBatchingConfig`` fields the fleet's deployment and the engine alone both use."""
    return {**({"num_blocks": 128} if device == "cpu" else {"max_memory_percent": 0.5}), **overrides}


class EngineAlone:
    """The throughput requests through transformers' engine in this process, kept open between passes.

    ``init_continuous_batching`` + ``add_request`` with each prompt's own ``max_new_tokens``: the upper bound
    of what the fleet adds to. One engine serves every pass, so its passes can sit between the fleet's.
    This process gets the worker's malloc thresholds (:func:`worker.allocator.keep_large_allocations`): without
    them the engine alone ran the 4-layer mix 1.3 to 1.6 times slower (page faults on every step's KV-sized
    tensors), and the ratio would measure glibc rather than the fleet.
    """

    def __init__(self, model: Path, device: str) -> None:
        self.model, self.device = model, device
        self.passes = 0

    def __enter__(self) -> "EngineAlone":
        import torch
        import transformers
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        from worker.allocator import keep_large_allocations

        keep_large_allocations()
        torch.set_num_threads(int(THREADS))
        kwargs = {"device": 0, "dtype": torch.bfloat16} if self.device == "cuda" else {}
        pipe = transformers.pipeline("text-generation", model=str(self.model), **kwargs)
        self.ids = [pipe.tokenizer(PROMPTS[i % len(PROMPTS)])["input_ids"] for i in range(MIX["jobs"])]
        generation_config = transformers.GenerationConfig(do_sample=False, eos_token_id=-1,
                                                          pad_token_id=pipe.tokenizer.pad_token_id)
        self.manager = pipe.model.init_continuous_batching(
            generation_config=generation_config,
            continuous_batching_config=ContinuousBatchingConfig(**engine_config(self.device)))
        self.manager.start()
        resolved = self.manager.continuous_batching_config
        self.settings = {"cuda_graphs": str(resolved.use_cuda_graph),
                         "async_batching": str(resolved.use_async_batching)}
        self.manager.add_request(self.ids[0], request_id="warm", max_new_tokens=4)
        while not (out := self.manager.get_result(timeout=60)) or not out.is_finished():
            pass
        return self

    def __exit__(self, *exc) -> None:
        self.manager.stop(block=True, timeout=10)

    def measure(self, streaming: bool = False) -> float:
        """One pass over the throughput requests: generated tokens/s (``streaming``: every step reported)."""
        budgets = token_budgets()
        self.passes += 1
        started = time.perf_counter()
        for index, (prompt_ids, n) in enumerate(zip(self.ids, budgets)):
            self.manager.add_request(prompt_ids, request_id=f"r{index}-{self.passes}", max_new_tokens=n,
                                     streaming=streaming)
        finished = 0
        while finished < len(self.ids):
            out = self.manager.get_result(timeout=600)
            finished += bool(out is not None and out.is_finished())
        return round(sum(budgets) / (time.perf_counter() - started), 1)


def company_cpu(worker: Counter, side: Counter, runs: list[dict]) -> dict[str, dict[str, float]]:
    """The CPU beside the engine in the fleet's passes: the worker's own threads, the client, redis-server.

    For each, its share of the passes' wall time (1.0 = one core all along) and milliseconds per job. The client
    is this process (the engine alone's thread waits meanwhile); the worker's own threads are all but the
    engine's loop and the native threads. ``benchmarks.engine_contention`` measures what such a share of the
    two cores costs the engine alone.
    """
    wall, jobs = sum(run["wall_s"] for run in runs), MIX["jobs"] * len(runs)
    own = sum(seconds for name, seconds in worker.items()
              if name != NATIVE and "_run_generation_loop" not in name)
    parts = {"worker threads": own, "client": side["client"], "redis-server": side["redis"]}
    parts["all"] = sum(parts.values())
    return {name: {"share": round(seconds / wall, 3), "ms_per_job": round(1000 * seconds / jobs, 2)}
            for name, seconds in parts.items()}


def paired_ratios(fleet: list[float], engine: list[float]) -> list[float]:
    """Each fleet pass over the mean of the two engine passes beside it (``engine`` has one more pass).

    Their spread shows how far one round's ratio moves on this machine; the headline ratio is the medians'.
    """
    return [round(rate / ((engine[i] + engine[i + 1]) / 2), 3) for i, rate in enumerate(fleet)]


def pipeline_batched(model: Path, device: str, batch_size: int) -> dict:
    """``pipeline(prompts, batch_size=...)`` on the same prompts (every prompt at 256 tokens; only the asked count)."""
    import torch
    import transformers

    kwargs = {"device": 0, "dtype": torch.bfloat16} if device == "cuda" else {}
    pipe = transformers.pipeline("text-generation", model=str(model), **kwargs)
    budgets = token_budgets()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(budgets))]
    pipe(prompts[:2], max_new_tokens=4, do_sample=False, batch_size=2)  # warm-up
    started = time.perf_counter()
    pipe(prompts, max_new_tokens=max(budgets), do_sample=False, batch_size=batch_size)
    return {f"pipeline_batch_size_{batch_size}_tokens_per_s": round(sum(budgets) / (time.perf_counter() - started), 1)}


def profiled(pid: int, directory: Path, side: str, run):
    """``run()`` while py-spy records process ``pid``: wall time of every thread (--idle) and GIL holders (--gil).

    The profiles are ``<side>-idle.txt`` and ``<side>-gil.txt`` in ``directory``.
    """
    import shutil
    import subprocess
    import sys

    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("py-spy is not installed: no profile", flush=True)
        return run()
    directory.mkdir(parents=True, exist_ok=True)
    recorders = [subprocess.Popen([spy, "record", "--pid", str(pid), "--native", *flags, "--format", "raw",
                                   "--rate", "50", "--output", str(directory / f"{side}-{name}.txt")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for name, flags in (("idle", ["--idle", "--threads"]), ("gil", ["--gil", "--threads"]))]
    try:
        return run()
    finally:
        for recorder in recorders:
            recorder.send_signal(2)
            recorder.wait(timeout=60)


def run_size(server: RedisServer, args: argparse.Namespace, size: str) -> dict:
    """Every measurement of one model size: the fleet's continuous passes interleaved with the engine alone's.

    ``--rounds`` fleet passes sit between ``rounds + 1`` passes of the engine alone (engine, fleet, engine,
    …, engine), and the ratio divides the medians: on a shared machine whose speed drifts, each fleet pass
    has engine passes on both sides. ``--passes`` beyond the first are first-time-cost passes on each side
    before any of it counts. A ``--profile`` pass of each side runs last and does not count (py-spy slows what it records).
    """
    from producers import FleetClient

    model = build_model(size)
    results: dict[str, dict] = {}
    with EngineAlone(model, args.device) as engine:
        first = [engine.measure() for _ in range(args.passes - 1)]
        engine_runs = [engine.measure()]
        results["engine"] = {**engine.settings, **({"first_pass_tokens_per_s": first[0]} if first else {})}
        print(size, "engine", json.dumps({**results["engine"], "engine_tokens_per_s": engine_runs[0]}), flush=True)
        with Worker(server, model, args, True) as worker:
            with FleetClient(f"{server.url}/0", f"{server.url}/1") as client:
                first = head_of_line(client)
                for run in range(args.passes - 1):  # earlier passes pay first-time costs
                    measured = throughput(client)
                    first.setdefault("first_pass_tokens_per_s", measured["tokens_per_s"])
                # Again once the engine has met the batch shapes, as a serving engine has.
                results["continuous"] = {**head_of_line(client), "first_short_ttft_s": first["short_ttft_s"],
                                         "first_short_latency_s": first["short_latency_s"]}
                if "first_pass_tokens_per_s" in first:
                    results["continuous"]["first_pass_tokens_per_s"] = first["first_pass_tokens_per_s"]
                fleet_runs = []
                pid, fleet_cpu, engine_cpu = worker.worker.proc.pid, Counter(), Counter()
                names = python_thread_names(pid)
                own = {str(thread.native_id): thread.name for thread in threading.enumerate()}
                redis_pid = int(server.client(0).info("server")["process_id"])
                company = Counter()
                for _ in range(args.rounds):
                    before = cpu_seconds(pid, names)
                    side = {"client": process_cpu_seconds(os.getpid()), "redis": process_cpu_seconds(redis_pid)}
                    fleet_runs.append(throughput(client))
                    fleet_cpu.update(subtract(cpu_seconds(pid, names), before))
                    company.update({"client": process_cpu_seconds(os.getpid()) - side["client"],
                                    "redis": process_cpu_seconds(redis_pid) - side["redis"]})
                    before = cpu_seconds(os.getpid(), own)
                    engine_runs.append(engine.measure())
                    engine_cpu.update(subtract(cpu_seconds(os.getpid(), own), before))
                    print(size, "round", json.dumps({"fleet_tokens_per_s": fleet_runs[-1]["tokens_per_s"],
                                                     "engine_tokens_per_s": engine_runs[-1]}), flush=True)
                if args.profile is not None:
                    results["profiled"] = profiled(pid, args.profile / size, "worker", lambda: throughput(client))
                    results["profiled_engine_tokens_per_s"] = profiled(os.getpid(), args.profile / size, "engine",
                                                                       engine.measure)
        results["engine"]["engine_streaming_tokens_per_s"] = engine.measure(streaming=True)
    middle = sorted(fleet_runs, key=lambda run: run["tokens_per_s"])[(len(fleet_runs) - 1) // 2]
    results["continuous"].update(middle)  # the median pass (the lower middle of an even count)
    results["continuous"]["passes_tokens_per_s"] = [run["tokens_per_s"] for run in fleet_runs]
    results["engine"]["passes_tokens_per_s"] = engine_runs
    tokens = sum(token_budgets())
    # Each thread's CPU over its side's counted passes, as a share of their wall time (1.0 = one core all along).
    results["continuous"]["thread_cpu"] = share_of_wall(
        Counter(), fleet_cpu, sum(run["wall_s"] for run in fleet_runs))
    results["engine"]["thread_cpu"] = share_of_wall(
        Counter(), engine_cpu, sum(tokens / rate for rate in engine_runs[1:]))
    results["continuous"]["company"] = company_cpu(fleet_cpu, company, fleet_runs)
    engine_median = statistics.median(engine_runs)
    paired = paired_ratios([run["tokens_per_s"] for run in fleet_runs], engine_runs)
    results["ratio"] = {"fleet_continuous_to_engine": round(statistics.median(r["tokens_per_s"] for r in fleet_runs)
                                                            / engine_median, 3),
                        "engine_tokens_per_s_median": round(engine_median, 1),
                        "per_round": paired,
                        "per_round_min_median_max": [min(paired), round(statistics.median(paired), 3), max(paired)]}
    print(size, "continuous", json.dumps(results["continuous"]), flush=True)
    print(size, "engine", json.dumps(results["engine"]), flush=True)
    if args.static:
        with Worker(server, model, args, False) as worker:
            with FleetClient(f"{server.url}/0", f"{server.url}/1") as client:
                results["static"] = head_of_line(client)
                for run in range(args.passes):
                    results["static"].update(throughput(client))
        print(size, "static", json.dumps(results["static"]), flush=True)
        results["pipeline"] = pipeline_batched(model, args.device, args.batch_size)
        print(size, "pipeline", json.dumps(results["pipeline"]), flush=True)
    print(size, "ratio", json.dumps(results["ratio"]), flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--sizes", default=None, help="comma-separated of " + ", ".join(SIZES) +
                        " (default: small,tiny on the CPU, 1b on cuda)")
    parser.add_argument("--static", action="store_true", help="also the static worker and pipeline(batch_size)")
    parser.add_argument("--batch-size", type=int, default=16, help="in-process pipeline batch_size")
    parser.add_argument("--profile", type=Path, default=None, help="py-spy the continuous worker in one more "
                        "throughput pass, then the engine alone in one more of its own, after the counted ones")
    parser.add_argument("--jobs", type=int, default=N_JOBS, help="throughput jobs")
    parser.add_argument("--passes", type=int, default=2, help="throughput passes before the counted ones, "
                        "plus one: first passes pay first-time costs for each new batch shape")
    parser.add_argument("--rounds", type=int, default=7, help="fleet passes, each followed by one of the engine "
                        "alone (one runs before the first); the ratio divides the medians")
    parser.add_argument("--max-tokens", type=int, default=256, help="the throughput jobs' largest max_new_tokens")
    parser.add_argument("--json", type=Path, default=STATE_DIR / "bench-generation.json")
    args = parser.parse_args()
    if args.rounds < 1 or args.passes < 1:
        parser.error("--rounds and --passes take 1 or more")
    MIX.update(jobs=args.jobs, max_tokens=args.max_tokens)
    sizes = (args.sizes or ("1b" if args.device == "cuda" else "small,tiny")).split(",")
    STATE_DIR.mkdir(exist_ok=True)
    results: dict[str, dict] = {"setup": {"device": args.device, "threads": THREADS, "long_tokens": LONG_TOKENS,
                                          "short_tokens": SHORT_TOKENS, "jobs": args.jobs,
                                          "max_tokens": args.max_tokens,
                                          "rounds": args.rounds, "passes": args.passes,
                                          "load_before": [round(x, 2) for x in os.getloadavg()]}}
    server = RedisServer().start()
    try:
        for size in sizes:
            results[size] = run_size(server, args, size)
    finally:
        server.cleanup()
    results["setup"]["load_after"] = [round(x, 2) for x in os.getloadavg()]
    print("setup", json.dumps(results["setup"]), flush=True)
    print(f"{'size':<6} {'fleet tok/s':>12} {'engine tok/s':>13} {'ratio':>6} {'rounds min/median/max':>22} "
          f"{'short TTFT s (fresh worker)':>28}")
    for size in sizes:
        r = results[size]
        spread = "/".join(f"{x:.2f}" for x in r["ratio"]["per_round_min_median_max"])
        print(f"{size:<6} {r['continuous']['tokens_per_s']:>12} {r['ratio']['engine_tokens_per_s_median']:>13} "
              f"{r['ratio']['fleet_continuous_to_engine']:>6} {spread:>22} {r['continuous']['short_ttft_s']:>10} ({r['continuous']['first_short_ttft_s']})")
    for size in sizes:
        company = ", ".join(f"{name} {part['share']} ({part['ms_per_job']} ms/job)"
                            for name, part in results[size]["continuous"]["company"].items())
        print(f"{size:<6} company of the engine, share of a core: {company}")
    args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
