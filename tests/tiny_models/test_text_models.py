"""Each tiny text model builds offline and runs through ``transformers.pipeline`` in-process."""

from __future__ import annotations

import time

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoTokenizer

from tests.tiny_models import KINDS, build, text
from worker.pipelines import question_answering, summarization

#: kind -> (pipeline task, input, call params)
CALLS = {
    "text-classification": ("text-classification", "the film was great", {}),
    "text-generation": ("text-generation", "alice lives in", {"max_new_tokens": 5, "do_sample": False}),
    "feature-extraction": ("feature-extraction", "alice lives in paris", {}),
    "token-classification": ("token-classification", "Alice visited Reykjavik.", {"aggregation_strategy": "first"}),
    "fill-mask": ("fill-mask", "alice lives in [MASK].", {"top_k": 3}),
    "zero-shot-classification": (
        "zero-shot-classification",
        "the film was great",
        {"candidate_labels": ["movies", "food"]},
    ),
    "summarization": ("summarization", "alice lives in paris and works as a teacher.", {"num_beams": 1}),
    "question-answering": (
        "question-answering",
        {"question": "where does alice live?", "context": "alice lives in paris."},
        {},
    ),
}
BUILD_BUDGET_S = 5.0


@pytest.fixture(scope="module", autouse=True)
def _registered():
    summarization.register()
    question_answering.register()


def test_every_text_kind_is_registered():
    assert set(CALLS) <= set(KINDS)


@pytest.mark.parametrize("kind", sorted(CALLS))
def test_builds_and_runs_in_a_pipeline(kind, tmp_path):
    started = time.perf_counter()
    build(kind, tmp_path)
    assert time.perf_counter() - started < BUILD_BUDGET_S
    task, inputs, params = CALLS[kind]
    pipe = transformers.pipeline(task, model=str(tmp_path))
    assert pipe.tokenizer.is_fast
    assert pipe(inputs, **params)


def test_builds_are_deterministic(tmp_path):
    first, second = build("fill-mask", tmp_path / "a"), build("fill-mask", tmp_path / "b")
    state_a, state_b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[key], state_b[key]) for key in state_a)
    assert AutoTokenizer.from_pretrained(first).get_vocab() == AutoTokenizer.from_pretrained(second).get_vocab()


def test_bert_tokenizer_splits_unseen_words_into_continuations():
    tokenizer = text.bert_tokenizer()
    tokens = tokenizer.tokenize("Reykjavik")
    assert len(tokens) > 1 and all(token.startswith("##") for token in tokens[1:])
    assert tokenizer.unk_token not in tokens
    assert "token_type_ids" in tokenizer("a question", "a context")


def test_generation_tokenizer_pads_left_and_batches_like_single(tmp_path):
    build("text-generation", tmp_path)
    pipe = transformers.pipeline("text-generation", model=str(tmp_path))
    assert pipe.tokenizer.padding_side == "left"
    assert pipe.tokenizer.pad_token_id not in (None, pipe.tokenizer.eos_token_id)
    prompts = ["alice lives in paris and", "the", "where does bob live?"]
    params = {"max_new_tokens": 6, "do_sample": False}
    assert pipe(prompts, batch_size=3, **params) == [pipe(prompt, **params) for prompt in prompts]


def test_generation_tokenizer_has_a_chat_template(tmp_path):
    build("text-generation", tmp_path)
    pipe = transformers.pipeline("text-generation", model=str(tmp_path))
    [output] = pipe([[{"role": "user", "content": "hi"}]], max_new_tokens=3, do_sample=False)
    assert output[0]["generated_text"][-1]["role"] == "assistant"


def test_token_classification_aggregates_with_bio_labels(tmp_path):
    build("token-classification", tmp_path)
    pipe = transformers.pipeline("token-classification", model=str(tmp_path))
    assert set(pipe.model.config.label2id) == set(text.NER_LABELS)
    for strategy in ("simple", "first", "average", "max"):
        for entity in pipe("Alice visited Reykjavik with Bartholomew.", aggregation_strategy=strategy):
            assert entity["entity_group"] in {"PER", "LOC"}


def test_zero_shot_model_declares_entailment(tmp_path):
    build("zero-shot-classification", tmp_path)
    pipe = transformers.pipeline("zero-shot-classification", model=str(tmp_path))
    assert {"entailment", "neutral", "contradiction"} <= set(pipe.model.config.label2id)
    assert pipe.entailment_id == pipe.model.config.label2id["entailment"]


def test_question_answering_tokenizer_is_short(tmp_path):
    build("question-answering", tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).model_max_length == text.QA_MODEL_MAX_LENGTH
