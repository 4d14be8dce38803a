"""A continuous deployment plans each params set once (:class:`worker.cb_plan.RequestPlans`), in-process."""

from __future__ import annotations

import pytest

from producers.errors import InvalidParams
from worker.cb_plan import RequestPlans, plan_request


@pytest.fixture(scope="module")
def pipe(model_dir):
    import transformers

    return transformers.pipeline("text-generation", model=str(model_dir("text-generation-llama")))


def test_the_same_params_get_the_same_plan_and_it_equals_a_fresh_one(pipe):
    plans = RequestPlans(pipe, 32)
    params = {"max_new_tokens": 12, "do_sample": True, "temperature": 0.7, "stop_sequence": ["\n", "."], "seed": 3}
    first = plans.plan(params)
    again = plans.plan(dict(reversed(list(params.items()))))  # key order does not matter
    assert again == first and again.generation_config is first.generation_config and len(plans) == 1
    fresh = plan_request(pipe, params, 32)
    assert (first.max_new_tokens, first.do_sample, first.seed, first.stop_strings, first.num_return_sequences) == (
        fresh.max_new_tokens, fresh.do_sample, fresh.seed, fresh.stop_strings, fresh.num_return_sequences)
    assert first.generation_config.to_dict() == fresh.generation_config.to_dict()
    other = plans.plan({**params, "do_sample": False})
    assert other is not first and not other.do_sample and first.do_sample


def test_a_new_seed_reuses_the_plan_of_its_params_with_its_own_seed(pipe):
    plans = RequestPlans(pipe, 32)
    params = {"max_new_tokens": 12, "do_sample": True, "top_k": 5}
    seeded = [plans.plan({**params, "seed": seed}) for seed in (3, 4)]
    unseeded = plans.plan(params)
    assert [plan.seed for plan in seeded] == [3, 4] and unseeded.seed is None
    assert seeded[0].generation_config is seeded[1].generation_config is unseeded.generation_config
    assert len(plans) == 1


def test_a_plan_cannot_be_changed_by_one_job(pipe):
    plan = RequestPlans(pipe, 32).plan({"max_new_tokens": 5})
    with pytest.raises(AttributeError):
        plan.max_new_tokens = 6  # type: ignore[misc]


def test_refused_params_raise_every_time_and_are_not_kept(pipe):
    plans = RequestPlans(pipe, 32)
    for _ in range(2):
        with pytest.raises(InvalidParams, match="num_beams"):
            plans.plan({"num_beams": 2})
    assert plans.plan({"max_new_tokens": 3}).max_new_tokens == 3


def test_the_cache_is_bounded_and_keeps_the_most_recently_used(pipe):
    plans = RequestPlans(pipe, 32, size=2)
    a, b = plans.plan({"max_new_tokens": 1}), plans.plan({"max_new_tokens": 2})
    assert plans.plan({"max_new_tokens": 1}) is a  # a is now the most recent
    plans.plan({"max_new_tokens": 3})  # evicts b
    assert plans.plan({"max_new_tokens": 1}) is a
    assert plans.plan({"max_new_tokens": 2}) is not b


def test_params_that_are_not_json_are_planned_each_time(pipe):
    plans = RequestPlans(pipe, 32)
    params = {"max_new_tokens": 4, "stop_sequence": {"not", "json"}}
    assert plans.plan(params) is not plans.plan(params)


def test_a_processor_that_refuses_its_params_on_its_first_call_is_refused_at_planning(pipe):
    """What a processor checks only when it first runs would otherwise fail inside the engine's step."""
    vocabulary = pipe.model.get_output_embeddings().out_features
    with pytest.raises(InvalidParams, match="vocabulary size"):
        plan_request(pipe, {"sequence_bias": [[[vocabulary + 5], 1.0]]}, 32)
    plan = plan_request(pipe, {"sequence_bias": [[[vocabulary - 1], 1.0]], "do_sample": False}, 32)
    assert plan.generation_config is not None and not plan.do_sample
