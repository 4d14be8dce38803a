"""Shared prompt prefixes on continuous batching: 64 chat requests behind one 512-token system prompt.

    python -m benchmarks.prefix_sharing                 # CPU, the 2-layer 64-wide random Llama
    python -m benchmarks.prefix_sharing --size small    # the 4-layer 256-wide one

Two fresh workers serve the same model through transformers' engine, one with
``allow_block_sharing = true`` (the engine reuses the KV pages of a prefix it
has already computed) and one with it off. Each gets the same 64 chat jobs
at once: one system prompt of 512 tokens, then a short user message of its
own, 32 new tokens each (greedy). Reported per setting: TTFT p50/p95 (submit
to first streamed piece) and generated tokens/s (submit of the first job to
the result of the last). The 512 tokens are whole KV pages (``page_size``
64), so a shared prompt's pages are shared whole.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time

from benchmarks.generation import STATE_DIR, THREADS, build_model, percentile
from tests.fleet import RedisServer, start_worker, write_config

N_JOBS = 64
SYSTEM_TOKENS = 512
NEW_TOKENS = 32
PAGE_SIZE = 64


def system_prompt(tokenizer) -> str:
    """A system prompt of exactly ``SYSTEM_TOKENS`` tokens once the chat template wraps it."""
    words = " ".join(f"rule {i}: answer briefly and politely." for i in range(400))
    ids = tokenizer(words, add_special_tokens=False)["input_ids"]
    wrapped = len(tokenizer.apply_chat_template([{"role": "system", "content": ""}], tokenize=True,
                                                return_dict=True)["input_ids"])
    return tokenizer.decode(ids[:SYSTEM_TOKENS - wrapped])


async def run_jobs(client, chats: list[list[dict]]) -> dict:
    """Submit every chat at once; TTFT of each and tokens/s of all."""
    params = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "return_full_text": False}
    started = time.perf_counter()

    async def one(chat) -> float:
        submitted = time.perf_counter()
        job = await client.asubmit(deployment="gen", inputs=chat, params=params, stream=True)
        ttft = None
        async for _ in job.astream(timeout_s=1200):
            ttft = ttft if ttft is not None else time.perf_counter() - submitted
        return ttft if ttft is not None else time.perf_counter() - submitted

    ttfts = await asyncio.gather(*(one(chat) for chat in chats))
    wall = time.perf_counter() - started
    return {"ttft_p50_s": round(statistics.median(ttfts), 3), "ttft_p95_s": round(percentile(ttfts, 0.95), 3),
            "tokens_per_s": round(len(chats) * NEW_TOKENS / wall, 1), "wall_s": round(wall, 2)}


def measure(server: RedisServer, model, chats: list[list[dict]], sharing: bool, device: str) -> dict:
    """One fresh worker with block sharing on or off, and the 64 jobs through it."""
    from producers import FleetClient

    options = {"allow_block_sharing": sharing, "page_size": PAGE_SIZE}
    options.update({"num_blocks": 2 * len(chats) * (SYSTEM_TOKENS // PAGE_SIZE + 2)} if device == "cpu"
                   else {"max_memory_percent": 0.5})
    deployment = {"name": "gen", "task": "text-generation", "model": str(model), "continuous_batching": True,
                  "continuous_batching_options": options}
    if device == "cuda":
        deployment.update(device=0, dtype="bfloat16")
    config = write_config(STATE_DIR / "bench-prefix.toml", broker_url=f"{server.url}/0",
                          result_backend=f"{server.url}/1", deployments=[deployment])
    server.client(0).flushall()
    worker = start_worker(config, STATE_DIR, deployments=["gen"], name="bench-prefix",
                          gpu="0" if device == "cuda" else "none", env={"OMP_NUM_THREADS": THREADS},
                          redis_client=server.client(0))
    try:
        with FleetClient(f"{server.url}/0", f"{server.url}/1") as client:
            asyncio.run(run_jobs(client, chats[:2]))  # warm: the first shared prefix is computed once anyway
            return asyncio.run(run_jobs(client, chats))
    finally:
        worker.terminate()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--size", default=None, help="tiny (CPU default), small or 1b (cuda default)")
    parser.add_argument("--jobs", type=int, default=N_JOBS)
    parser.add_argument("--json", default=str(STATE_DIR / "bench-prefix.json"))
    args = parser.parse_args()
    from transformers import AutoTokenizer

    model = build_model(args.size or ("1b" if args.device == "cuda" else "tiny"))
    system = system_prompt(AutoTokenizer.from_pretrained(str(model)))
    chats = [[{"role": "system", "content": system}, {"role": "user", "content": f"question number {i}?"}]
             for i in range(args.jobs)]
    results = {"setup": {"device": args.device, "model": model.name, "jobs": args.jobs, "system_tokens": SYSTEM_TOKENS,
                         "new_tokens": NEW_TOKENS, "load_before": [round(x, 2) for x in os.getloadavg()]}}
    server = RedisServer().start()
    try:
        for sharing in (True, False):
            key = "sharing" if sharing else "no_sharing"
            results[key] = measure(server, model, chats, sharing, args.device)
            print(key, json.dumps(results[key]), flush=True)
    finally:
        server.cleanup()
    results["setup"]["load_after"] = [round(x, 2) for x in os.getloadavg()]
    results["ttft_p50_speedup"] = round(results["no_sharing"]["ttft_p50_s"] / results["sharing"]["ttft_p50_s"], 2)
    print("setup", json.dumps(results["setup"]))
    print("ttft_p50_speedup", results["ttft_p50_speedup"])
    with open(args.json, "w") as handle:
        json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
