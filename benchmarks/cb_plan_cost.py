"""What planning a continuous-batching job costs, and what the per-deployment plan cache leaves of it.

    python -m benchmarks.cb_plan_cost

``worker.cb_plan.plan_request`` resolves a job's generation config as
``generate`` does (the call's params over the pipeline's defaults over the
model's config, with several deep copies); the worker's claim thread runs it for
every job it hands to the engine. ``RequestPlans`` plans each params set once.
Both on the benchmarks' 2-layer Llama, in this process, one thread.
"""

from __future__ import annotations

import timeit

REPEAT = 500
PARAMS = {"max_new_tokens": 64, "do_sample": False}


def main() -> int:
    import torch
    import transformers

    from benchmarks.generation import build_model
    from worker.cb_plan import RequestPlans, plan_request

    torch.set_num_threads(1)
    pipe = transformers.pipeline("text-generation", model=str(build_model("tiny")))
    plans = RequestPlans(pipe, 256)
    for name, call in (("plan_request (every job before)", lambda: plan_request(pipe, PARAMS, 256)),
                       ("RequestPlans.plan, same params (every job now)", lambda: plans.plan(PARAMS))):
        call()
        per_call = min(timeit.repeat(call, number=REPEAT, repeat=3)) / REPEAT
        print(f"{name:<48} {per_call * 1e3:8.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
