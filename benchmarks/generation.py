"""Text generation: static batches against continuous batching (transformers' engine), in one run.

    python -m benchmarks.generation                          # CPU, a small random Llama
    python -m benchmarks.generation --device cuda --size 1b  # a GPU, a ~1B-parameter random Llama

Same model, same worker code, one fresh worker per deployment kind:

- **head-of-line**: 8 long jobs (200 new tokens) generate; then one short job
  (8 new tokens) arrives. Its time to first token (TTFT, from submit to its
  first streamed piece) and its latency.
- **throughput**: 64 concurrent jobs with ``max_new_tokens`` spread evenly from
  16 to 256, as generated tokens/s (submit of the first to result of the last)
  and p50/p95 job latency.
- **in-process** references on the same prompts: ``pipeline(...)`` with
  ``batch_size`` (every prompt at 256 tokens, since one call takes one
  ``max_new_tokens``; only the requested tokens count), and the engine
  in-process (``init_continuous_batching`` + ``add_request`` with each prompt's
  own ``max_new_tokens``), the upper bound of what the fleet can add to.

The model has random weights and no end-of-sequence token, so every job
generates exactly its ``max_new_tokens``; tokens that are not readable alone
(byte pieces) are muted, so every step streams a piece and the first piece is
the first token. The engine in-process is measured with ``streaming=False``
and with ``streaming=True`` (what the worker uses: one output per token).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path

from benchmarks.models import STATE_DIR
from tests.fleet import RedisServer, start_worker, write_config

SIZES = {
    # hidden, layers, heads, kv heads, intermediate
    "small": (256, 4, 4, 2, 512),
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


def token_budgets() -> list[int]:
    """``max_new_tokens`` of the throughput jobs: 16 to 256, evenly spread, in a shuffled order."""
    budgets = [16 + (240 * i) // (N_JOBS - 1) for i in range(N_JOBS)]
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
            deployment["continuous_batching_options"] = (
                {"num_blocks": 128} if args.device == "cpu" else {"max_memory_percent": 0.5})
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
    long_jobs = [client.submit(deployment="gen", inputs=PROMPTS[i % len(PROMPTS)], params=params) for i in range(8)]
    for job in long_jobs:
        next(iter(job.stream(timeout_s=600)))
    started = time.perf_counter()
    short = client.submit(deployment="gen", inputs=PROMPTS[3], params={"max_new_tokens": SHORT_TOKENS,
                                                                      "do_sample": False})
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
    """64 concurrent jobs with 16..256 new tokens: tokens/s and job latency."""
    budgets = token_budgets()
    latencies: list[float] = [0.0] * len(budgets)
    started = time.perf_counter()
    jobs = [(time.perf_counter(), client.submit(deployment="gen", inputs=PROMPTS[i % len(PROMPTS)],
                                                params={"max_new_tokens": n, "do_sample": False}))
            for i, n in enumerate(budgets)]

    def wait(index: int) -> None:
        submitted, job = jobs[index]
        job.result(timeout=1800)
        latencies[index] = time.perf_counter() - submitted

    threads = [threading.Thread(target=wait, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {"tokens": sum(budgets), "wall_s": round(wall, 2), "tokens_per_s": round(sum(budgets) / wall, 1),
            "p50_latency_s": round(statistics.median(latencies), 2),
            "p95_latency_s": round(percentile(latencies, 0.95), 2)}


def in_process(model: Path, device: str, batch_size: int) -> dict:
    """The same 64 prompts in-process: pipeline(batch_size) and the engine with per-request budgets."""
    import torch
    import transformers
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    torch.set_num_threads(int(THREADS))
    kwargs = {"device": 0, "dtype": torch.bfloat16} if device == "cuda" else {}
    pipe = transformers.pipeline("text-generation", model=str(model), **kwargs)
    budgets = token_budgets()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(budgets))]
    pipe(prompts[:2], max_new_tokens=4, do_sample=False, batch_size=2)  # warm-up
    started = time.perf_counter()
    pipe(prompts, max_new_tokens=max(budgets), do_sample=False, batch_size=batch_size)
    static_s = time.perf_counter() - started
    config = ContinuousBatchingConfig(**({"num_blocks": 128} if device == "cpu" else {"max_memory_percent": 0.5}))
    generation_config = transformers.GenerationConfig(do_sample=False, eos_token_id=-1,
                                                      pad_token_id=pipe.tokenizer.pad_token_id)
    manager = pipe.model.init_continuous_batching(generation_config=generation_config,
                                                  continuous_batching_config=config)
    manager.start()
    try:
        ids = [pipe.tokenizer(prompt)["input_ids"] for prompt in prompts]
        manager.add_request(ids[0], request_id="warm", max_new_tokens=4)
        while not (out := manager.get_result(timeout=60)) or not out.is_finished():
            pass
        engine_s = {}
        for streaming in (False, True):
            started = time.perf_counter()
            for index, (prompt_ids, n) in enumerate(zip(ids, budgets)):
                manager.add_request(prompt_ids, request_id=f"r{index}-{streaming}", max_new_tokens=n,
                                    streaming=streaming)
            finished = 0
            while finished < len(ids):
                out = manager.get_result(timeout=600)
                finished += bool(out is not None and out.is_finished())
            engine_s[streaming] = time.perf_counter() - started
    finally:
        manager.stop(block=True, timeout=10)
    tokens = sum(budgets)
    return {f"pipeline_batch_size_{batch_size}_tokens_per_s": round(tokens / static_s, 1),
            "engine_in_process_tokens_per_s": round(tokens / engine_s[False], 1),
            "engine_in_process_streaming_tokens_per_s": round(tokens / engine_s[True], 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--batch-size", type=int, default=16, help="in-process pipeline batch_size")
    parser.add_argument("--skip-in-process", action="store_true")
    parser.add_argument("--json", type=Path, default=STATE_DIR / "bench-generation.json")
    args = parser.parse_args()
    STATE_DIR.mkdir(exist_ok=True)
    model = build_model(args.size)
    server = RedisServer().start()
    results: dict[str, dict] = {}
    try:
        from producers import FleetClient

        for kind, continuous in (("static", False), ("continuous", True)):
            with Worker(server, model, args, continuous):
                with FleetClient(f"{server.url}/0", f"{server.url}/1") as client:
                    results[kind] = {**head_of_line(client), **throughput(client)}
            print(kind, json.dumps(results[kind]), flush=True)
    finally:
        server.cleanup()
    if not args.skip_in_process:
        results["in_process"] = in_process(model, args.device, args.batch_size)
        print("in_process", json.dumps(results["in_process"]), flush=True)
    results["setup"] = {"device": args.device, "size": args.size, "threads": THREADS,
                        "long_tokens": LONG_TOKENS, "short_tokens": SHORT_TOKENS, "jobs": N_JOBS}
    args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
