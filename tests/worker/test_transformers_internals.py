"""Pins worker/transformers_internals.py to the installed transformers.

A worker runs a pipeline's steps itself with the params ``Pipeline.__call__`` would use. If a transformers
release renames or reshapes the private parts this relies on, these fail before a fleet output drifts
from in-process.
"""

from __future__ import annotations

import inspect

import pytest

from tests.oracle import assert_same
from worker.transformers_internals import (generation_defaults, logits_processors, postprocess_defaults,
                                           preprocess_defaults, resolved_generation_config,
                                           run_one_item_lists_directly, sanitize_call_params, step_params,
                                           take_generated_logits, translation_inputs_builder, with_token_tensors)


@pytest.fixture(scope="module")
def classifier(model_dir):
    from transformers import pipeline

    return pipeline("text-classification", model=str(model_dir("text-classification")), top_k=None, truncation=True)


@pytest.fixture(scope="module")
def generator(model_dir):
    from transformers import pipeline

    return pipeline("text-generation", model=str(model_dir("text-generation")), max_new_tokens=3, do_sample=False)


def test_call_params_are_split_per_step(classifier):
    preprocess, forward, postprocess = sanitize_call_params(classifier, {"top_k": 2, "max_length": 8})
    assert preprocess == {"max_length": 8} and forward == {} and postprocess["top_k"] == 2


def test_construction_params_are_the_defaults_under_the_calls(classifier):
    assert preprocess_defaults(classifier)["truncation"] is True
    assert "top_k" in postprocess_defaults(classifier) and postprocess_defaults(classifier)["top_k"] is None
    preprocess, _, postprocess = step_params(classifier, {"top_k": 1})
    assert preprocess["truncation"] is True and postprocess["top_k"] == 1


def test_running_the_steps_with_those_params_equals_calling_the_pipeline(classifier, generator):
    for pipe, params in ((classifier, {"function_to_apply": "sigmoid"}), (generator, {"return_full_text": False}),
                         (generator, {})):
        # A list input: __call__ then returns each input's output as run_single does, without reshaping it.
        assert_same(pipe.run_single("the cat sat on the mat", *step_params(pipe, params)),
                    pipe(["the cat sat on the mat"], **params)[0])


def test_generation_defaults_are_those_the_pipeline_applies(generator, classifier):
    defaults = generation_defaults(generator)
    assert defaults["pad_token_id"] == generator.tokenizer.pad_token_id
    assert "max_new_tokens" in defaults  # the text-generation pipeline's own default length
    assert generation_defaults(classifier) == {}


@pytest.mark.parametrize("module, name", [
    ("transformers", "NllbTokenizer"), ("transformers", "M2M100Tokenizer"), ("transformers", "MBartTokenizer"),
    ("transformers", "MBart50Tokenizer"), ("transformers", "PLBartTokenizer"),
])
def test_multilingual_tokenizers_build_translation_inputs_as_pipefleet_calls_them(module, name):
    import importlib

    builder = translation_inputs_builder(getattr(importlib.import_module(module), name))
    assert builder is not None, f"{name} lost _build_translation_inputs"
    parameters = inspect.signature(builder).parameters
    assert list(parameters)[1] == "raw_inputs" and {"src_lang", "tgt_lang"} <= set(parameters)
    # worker/pipelines/summarization.py also passes return_tensors and truncation.
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def test_other_tokenizers_have_none(classifier):
    assert translation_inputs_builder(classifier.tokenizer) is None


def test_generation_config_and_processors_are_those_generate_uses(generator):
    import torch

    config = resolved_generation_config(generator, {"max_new_tokens": 5, "do_sample": True, "top_k": 7,
                                                    "temperature": 0.5, "repetition_penalty": 1.3})
    assert (config.max_new_tokens, config.do_sample, config.top_k, config.temperature) == (5, True, 7, 0.5)
    kinds = {type(p).__name__ for p in logits_processors(generator.model, config, input_ids_seq_length=3,
                                                          device=torch.device("cpu"))}
    assert {"RepetitionPenaltyLogitsProcessor", "TemperatureLogitsWarper", "TopKLogitsWarper"} <= kinds
    greedy = resolved_generation_config(generator, {"max_new_tokens": 5})
    assert not greedy.do_sample and len(logits_processors(generator.model, greedy)) == 0
    # The minimum-length processors need the token tensors generate sets first; without them they are left out.
    config = resolved_generation_config(generator, {"max_new_tokens": 5, "min_new_tokens": 2})
    assert not logits_processors(generator.model, config, input_ids_seq_length=3)
    tensors = with_token_tensors(generator.model, config)
    kinds = {type(p).__name__ for p in logits_processors(generator.model, tensors, input_ids_seq_length=3)}
    assert kinds == {"MinNewTokensLengthLogitsProcessor"} and not hasattr(config, "_eos_token_tensor")


@pytest.mark.parametrize("task, inputs, params", [
    ("text-classification", "the cat sat on the mat", {"top_k": None}),
    ("feature-extraction", "the cat sat on the mat", {}),
    ("fill-mask", "the cat [MASK] on the mat", {"top_k": 3}),
    ("text-generation", "the cat", {"max_new_tokens": 4, "do_sample": False}),
    ("image-classification", "image", {}),
])
def test_a_one_item_list_runs_through_run_single_with_the_same_output(model_dir, task, inputs, params):
    from PIL import Image
    from transformers import pipeline

    if inputs == "image":
        inputs = Image.new("RGB", (32, 32), (200, 30, 30))
    plain = pipeline(task, model=str(model_dir(task)))
    direct = pipeline(task, model=str(model_dir(task)))
    assert run_one_item_lists_directly(direct)
    singles = []
    run_single = direct.run_single
    direct.run_single = lambda *args: singles.append(args) or run_single(*args)
    assert_same(direct([inputs], batch_size=1, **params), plain([inputs], batch_size=1, **params))
    assert len(singles) == 1  # __call__ still hands a list to get_iterator, which the shortcut replaced
    assert_same(direct([inputs, inputs], batch_size=2, **params), plain([inputs, inputs], batch_size=2, **params))
    assert len(singles) == 1  # a larger batch keeps the DataLoader path


def test_chunk_pipelines_keep_their_own_iterator(model_dir):
    from transformers import pipeline

    assert not run_one_item_lists_directly(pipeline("token-classification",
                                                    model=str(model_dir("token-classification"))))


def test_the_pipelines_forward_hands_postprocess_the_raw_logits_of_each_step(generator):
    import torch

    model_inputs = generator.preprocess("hello there")
    model_outputs = generator.forward(model_inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                                      return_dict_in_generate=True)
    logits, sequences, start = take_generated_logits(model_outputs)
    assert "logits" not in model_outputs
    assert start == model_inputs["input_ids"].shape[-1] and sequences.shape == (1, start + 3)
    assert tuple(logits.shape[:3]) == (1, 1, 3)
    expected = generator.model.generate(model_inputs["input_ids"], attention_mask=model_inputs["attention_mask"],
                                        max_new_tokens=3, do_sample=False, output_logits=True,
                                        return_dict_in_generate=True)
    torch.testing.assert_close(logits[0, 0], torch.stack(expected.logits)[:, 0])
    assert sequences[0].tolist() == expected.sequences[0].tolist()
    assert take_generated_logits(generator.forward(model_inputs, max_new_tokens=2, do_sample=False)) is None
