"""Pins what :mod:`worker.cb_sampling` uses of transformers' continuous batching engine, in-process.

The fleet's sampler relies on the engine's processor list (``ContinuousBatchingLogitsProcessorList``: its
``logits_processor``, ``tensors_required``, ``supported_keys`` and ``do_processing``), on the base class
``ContinuousBatchingLogitsProcessor`` and on ``RequestState``'s ``initial_tokens``, ``generated_tokens`` and
``logit_processor_kwargs``. A transformers upgrade that moves them fails here first, by name.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from worker import cb_sampling

PROMPT = "a stormy night"


@pytest.fixture(scope="module")
def pipe(model_dir):
    import transformers

    return transformers.pipeline("text-generation", model=str(model_dir("text-generation-llama")))


def test_the_engine_internals_the_sampler_uses_are_there():
    from transformers.generation.continuous_batching.cb_logits_processors import (
        ContinuousBatchingLogitsProcessor, ContinuousBatchingLogitsProcessorList)
    from transformers.generation.continuous_batching.requests import FutureRequestState, RequestState

    assert set(ContinuousBatchingLogitsProcessor.__abstractmethods__) == {
        "fill_defaults", "prepare_tensor_args", "__call__"}
    assert {"initial_tokens", "generated_tokens", "logit_processor_kwargs"} <= {
        f.name for f in dataclasses.fields(RequestState)}
    assert "state" in FutureRequestState.__slots__ and "has_new_token" in FutureRequestState.__slots__
    for name in ("prepare_tensor_args", "fill_defaults", "check_kwargs"):
        assert callable(getattr(ContinuousBatchingLogitsProcessorList, name))
    assert "per_request_processors" in inspect.signature(ContinuousBatchingLogitsProcessorList).parameters


def run_engine(pipe, requests: dict[str, tuple[list[int], dict]]) -> dict[str, list[int]]:
    """Run ``{request_id: (prompt ids, engine kwargs)}`` through a greedy engine with the sampler installed."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    config = GenerationConfig(do_sample=False, eos_token_id=pipe.model.generation_config.eos_token_id,
                              pad_token_id=pipe.tokenizer.pad_token_id)
    manager = pipe.model.init_continuous_batching(
        generation_config=config, continuous_batching_config=ContinuousBatchingConfig(
            num_blocks=16, page_size=64, **cb_sampling.engine_overrides()))
    sampler = cb_sampling.install(manager, pipe.model)
    processors = manager.logit_processor
    assert processors.do_processing and processors.tensors_required >= 1
    assert cb_sampling.KWARG in processors.supported_keys
    manager.start()
    try:
        for request_id, (ids, kwargs) in requests.items():
            manager.add_request(ids, request_id=request_id, max_new_tokens=10, **kwargs)
        done: dict[str, list[int]] = {}
        while len(done) < len(requests):
            output = manager.get_result(timeout=60)
            assert output is not None and output.error is None
            if output.is_finished():
                done[output.request_id] = list(output.generated_tokens)
                sampler.forget(output.request_id)
        assert sampler.live_count() == 0
        return done
    finally:
        manager.stop(block=True, timeout=10)
        pipe.model.destroy_cached_continuous_batching_manager()


def test_seeded_rows_draw_what_generate_draws_beside_greedy_rows(pipe):
    import torch
    from transformers import set_seed

    ids = pipe.tokenizer(PROMPT)["input_ids"]
    sampled = pipe.model._prepare_generation_config(None, do_sample=True, temperature=0.7, top_k=20)[0]
    penalised = pipe.model._prepare_generation_config(None, do_sample=False, repetition_penalty=1.5)[0]
    requests = {
        "greedy": (ids, {}),
        "sampled": (ids, {cb_sampling.KWARG: cb_sampling.SamplingSpec(sampled, len(ids), True, 5)}),
        "penalised": (ids, {cb_sampling.KWARG: cb_sampling.SamplingSpec(penalised, len(ids), False, 0)}),
    }
    got = run_engine(pipe, requests)

    def generate(**kwargs):
        tensor = torch.tensor([ids])
        out = pipe.model.generate(input_ids=tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=10,
                                  pad_token_id=pipe.tokenizer.pad_token_id, **kwargs)
        return out[0, len(ids):].tolist()

    assert got["greedy"] == generate(do_sample=False)[:len(got["greedy"])]
    set_seed(5)
    assert got["sampled"] == generate(do_sample=True, temperature=0.7, top_k=20)[:len(got["sampled"])]
    assert got["penalised"] == generate(do_sample=False, repetition_penalty=1.5)[:len(got["penalised"])]
