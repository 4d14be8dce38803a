"""Text tasks through a real worker give what in-process ``transformers.pipeline`` gives.

One worker serves every deployment of this module (worker start-up is the slow part).
"""

from __future__ import annotations

import pytest

from producers import pipeline as fleet_pipeline
from producers.errors import InvalidParams, JobError, PipefleetError
from tests.oracle import assert_same, local_pipeline
from tests.oracle import case_id as _case_id, run_job as run
from tests.tasks.private_models import private_models
from tests.tiny_models import text

TEXTS = ["the cat sat on the mat", "a stormy night over the sea", "I love this film", "terrible service"]
#: Prompts of clearly different token lengths, so a batch of them needs left padding.
PROMPTS = ["hello", "the quick brown fox jumps over the lazy dog and runs far away", "a stormy night"]
ARTICLE = "alice lives in paris and works as a teacher. the museum in rome was lovely, but bob found it boring."
CONTEXT = "Alice lives in Paris and works as a teacher. Bob visited Rome last summer with Carol."
LONG_CONTEXT = " ".join(text.corpus()[:24])

#: deployment name -> (task, tiny model kind). Names are prefixed: tests share one Redis.
DEPLOYMENTS = {
    "tt-gen": ("text-generation", "text-generation"),
    "tt-sum": ("summarization", "summarization"),
    "tt-qa": ("question-answering", "question-answering"),
    "tt-zsc": ("zero-shot-classification", "zero-shot-classification"),
    "tt-tc": ("text-classification", "text-classification"),
    "tt-fe": ("feature-extraction", "feature-extraction"),
    "tt-tok": ("token-classification", "token-classification"),
    "tt-fill": ("fill-mask", "fill-mask"),
    "tt-t2t": ("text2text-generation", "summarization"),
    "tt-tr": ("translation", "summarization"),
    "tt-ner": ("ner", "token-classification"),
    "tt-sent": ("sentiment-analysis", "text-classification"),
}


@pytest.fixture(scope="module")
def models(module_fleet, model_dir, tmp_path_factory):
    """Start one worker serving every text deployment; returns deployment -> model path."""
    paths = private_models(model_dir, tmp_path_factory.mktemp("models-text"),
                           {name: kind for name, (_, kind) in DEPLOYMENTS.items()})
    config = module_fleet.config([
        {"name": name, "task": task, "model": paths[name], "max_batch_size": 8}
        for name, (task, _) in DEPLOYMENTS.items()
    ])
    module_fleet.worker(config, deployments=list(DEPLOYMENTS))
    return paths


def local(models, name):
    return local_pipeline(DEPLOYMENTS[name][0], models[name])



MASK = "[MASK]"

CASES = [
    # text-generation (it samples by default in transformers 5, hence do_sample=False; see the seed tests).
    ("tt-gen", PROMPTS[1], {"max_new_tokens": 6, "do_sample": False}),
    ("tt-gen", PROMPTS[0], {"max_new_tokens": 4, "return_full_text": False, "do_sample": False}),
    ("tt-gen", PROMPTS, {"max_new_tokens": 5, "do_sample": False}),
    ("tt-gen", PROMPTS[2], {"max_new_tokens": 3, "num_beams": 2, "num_return_sequences": 2, "do_sample": False}),
    ("tt-gen", PROMPTS[2], {"max_new_tokens": 4, "repetition_penalty": 1.3, "return_full_text": False,
                            "do_sample": False}),
    # summarization (pipefleet's v4 pipeline).
    ("tt-sum", ARTICLE, {}),
    ("tt-sum", [ARTICLE, TEXTS[1]], {"max_new_tokens": 6}),
    ("tt-sum", ARTICLE, {"num_beams": 2, "max_new_tokens": 6}),
    ("tt-sum", ARTICLE, {"min_length": 8, "max_length": 12}),
    # text2text-generation and translation (pipefleet's v4 pipelines, on the tiny T5).
    ("tt-t2t", ARTICLE, {"max_new_tokens": 5}),
    ("tt-t2t", [ARTICLE, TEXTS[0]], {"max_new_tokens": 4}),
    # Same-length texts: beam search on a random model is a near-tie that padding's float noise can flip.
    ("tt-t2t", [TEXTS[0], TEXTS[0]], {"num_beams": 2, "num_return_sequences": 2, "max_new_tokens": 4}),
    ("tt-tr", TEXTS[1], {}),
    ("tt-tr", TEXTS[:2], {"max_new_tokens": 4}),
    # The task aliases ner and sentiment-analysis.
    ("tt-ner", "Alice lives in Paris", {"aggregation_strategy": "simple"}),
    ("tt-sent", TEXTS[2], {}),
    ("tt-sent", TEXTS[:2], {}),
    # question-answering: one, a list, top_k, long context with doc_stride.
    ("tt-qa", {"question": "where does alice live?", "context": CONTEXT}, {}),
    ("tt-qa", [{"question": "who visited rome?", "context": CONTEXT},
               {"question": "what is alice?", "context": CONTEXT}], {}),
    ("tt-qa", {"question": "who visited rome?", "context": CONTEXT}, {"top_k": 3}),
    ("tt-qa", {"question": "what is the weather?", "context": LONG_CONTEXT}, {"doc_stride": 8, "top_k": 2}),
    ("tt-qa", {"question": "what is the weather?", "context": LONG_CONTEXT}, {"max_answer_len": 5}),
    # zero-shot-classification.
    ("tt-zsc", TEXTS[0], {"candidate_labels": ["animals", "weather", "sports"]}),
    ("tt-zsc", TEXTS[:2], {"candidate_labels": ["animals", "weather"], "multi_label": True}),
    ("tt-zsc", TEXTS[2], {"candidate_labels": "cinema, food", "hypothesis_template": "This text is about {}."}),
    # text-classification.
    ("tt-tc", TEXTS[0], {}),
    ("tt-tc", TEXTS, {"top_k": 2}),
    ("tt-tc", TEXTS[1], {"top_k": None}),
    ("tt-tc", {"text": TEXTS[0], "text_pair": TEXTS[1]}, {}),
    ("tt-tc", [{"text": TEXTS[0], "text_pair": TEXTS[1]}, {"text": TEXTS[2], "text_pair": TEXTS[3]}], {}),
    ("tt-tc", LONG_CONTEXT, {"truncation": True}),
    ("tt-tc", TEXTS[3], {"function_to_apply": "sigmoid"}),
    # feature-extraction.
    ("tt-fe", TEXTS[0], {}),
    ("tt-fe", TEXTS, {}),
    ("tt-fe", TEXTS[:2], {"return_tensors": True}),
    # token-classification, every aggregation strategy.
    ("tt-tok", "Alice lives in Paris with Bob", {}),
    ("tt-tok", ["Alice lives in Paris", "Bob visited Rome"], {"aggregation_strategy": "simple"}),
    ("tt-tok", "Alice lives in Paris with Bob", {"aggregation_strategy": "first"}),
    ("tt-tok", "Alice lives in Paris with Bob", {"aggregation_strategy": "average"}),
    ("tt-tok", "Alice lives in Paris with Bob", {"aggregation_strategy": "max"}),
    ("tt-tok", "Alice lives in Paris", {"ignore_labels": []}),
    # fill-mask.
    ("tt-fill", f"the cat sat on the {MASK}", {}),
    ("tt-fill", [f"the {MASK} sat on the mat", f"a stormy {MASK}"], {"top_k": 3}),
    ("tt-fill", f"the cat sat on the {MASK}", {"targets": ["mat", "sea"]}),
    ("tt-fill", f"the {MASK} sat on the {MASK}", {"top_k": 2}),
]



@pytest.mark.parametrize(("name", "inputs", "params"), CASES, ids=[_case_id(c) for c in CASES])
def test_fleet_equals_in_process(client, models, name, inputs, params):
    expected = local(models, name)(inputs, **params)
    assert_same(run(client, name, inputs, params), expected)


def test_prompts_batched_with_left_padding_equal_unbatched(client, models):
    params = {"max_new_tokens": 5, "do_sample": False}
    jobs = [client.submit(deployment="tt-gen", inputs=prompt, params=params) for prompt in PROMPTS]
    pipe = local(models, "tt-gen")
    for prompt, job in zip(PROMPTS, jobs):
        assert_same(job.result(timeout=120), pipe(prompt, **params))
    assert_same(run(client, "tt-gen", PROMPTS, params), [pipe(p, **params) for p in PROMPTS])


def test_sampling_with_a_seed_is_deterministic_and_equals_in_process(client, models):
    from transformers import set_seed

    params = {"max_new_tokens": 6, "do_sample": True, "num_return_sequences": 4, "top_k": 20}
    set_seed(1234)
    expected = local(models, "tt-gen")(PROMPTS[2], **params)
    fleet = run(client, "tt-gen", PROMPTS[2], dict(params, seed=1234))
    assert_same(fleet, expected)
    assert len(fleet) == 4
    assert_same(run(client, "tt-gen", PROMPTS[2], dict(params, seed=1234)), fleet)


def test_seeded_list_runs_each_input_as_its_own_seeded_call(client, models):
    from transformers import set_seed

    params = {"max_new_tokens": 5, "do_sample": True, "num_return_sequences": 2}
    pipe = local(models, "tt-gen")
    expected = []
    for prompt in PROMPTS:
        set_seed(7)
        expected.append(pipe(prompt, **params))
    # Concurrent jobs share batches; a seeded item's output must not depend on its batch neighbours.
    other = client.submit(deployment="tt-gen", inputs=PROMPTS[::-1], params=dict(params, seed=7))
    assert_same(run(client, "tt-gen", PROMPTS, dict(params, seed=7)), expected)
    assert_same(other.result(timeout=120), expected[::-1])


def test_chat_input_generates_like_in_process(client, models):
    chat = [{"role": "user", "content": "hello there"}]
    params = {"max_new_tokens": 4, "do_sample": False}
    assert_same(run(client, "tt-gen", chat, params), local(models, "tt-gen")(chat, **params))


def test_summary_equals_direct_generate(client, models):
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models["tt-sum"])
    model = AutoModelForSeq2SeqLM.from_pretrained(models["tt-sum"]).eval()
    with torch.no_grad():
        ids = model.generate(**tokenizer(ARTICLE, return_tensors="pt"), num_beams=1)
    expected = [{"summary_text": tokenizer.decode(ids[0], skip_special_tokens=True)}]
    assert run(client, "tt-sum", ARTICLE, {"num_beams": 1}) == expected


def test_pipeline_stand_in_takes_keyword_and_positional_inputs(module_fleet, models):
    with module_fleet.client() as client:
        qa = fleet_pipeline("question-answering", model=models["tt-qa"], client=client)
        assert_same(qa(question="where does alice live?", context=CONTEXT),
                    local(models, "tt-qa")(question="where does alice live?", context=CONTEXT))
        questions = ["where does alice live?", "who visited rome?"]
        assert_same(qa(question=questions, context=[CONTEXT, CONTEXT]),
                    local(models, "tt-qa")(question=questions, context=[CONTEXT, CONTEXT]))
        zsc = fleet_pipeline("zero-shot-classification", model=models["tt-zsc"], client=client)
        labels = ["animals", "weather"]
        assert_same(zsc(TEXTS[0], labels), local(models, "tt-zsc")(TEXTS[0], labels))
        gen = fleet_pipeline("text-generation", model=models["tt-gen"], client=client, max_new_tokens=3,
                             do_sample=False)
        assert_same(gen(PROMPTS, batch_size=2), local(models, "tt-gen")(PROMPTS, max_new_tokens=3, do_sample=False))


@pytest.mark.parametrize(("name", "inputs", "params"), [
    ("tt-tok", "Alice lives in Paris", {"aggregation_strategy": "no-such-strategy"}),
    ("tt-zsc", TEXTS[0], {}),
    ("tt-tc", TEXTS[0], {"function_to_apply": "cube"}),
    ("tt-gen", PROMPTS[0], {"max_new_tokens": 10**9}),
])
def test_params_the_pipeline_rejects_fail_clearly_and_the_worker_keeps_serving(client, models, name, inputs, params):
    with pytest.raises(PipefleetError) as caught:
        run(client, name, inputs, params)
    assert isinstance(caught.value, (InvalidParams, JobError)), caught.value
    assert str(caught.value)
    assert_same(run(client, "tt-tc", TEXTS[0], {}), local(models, "tt-tc")(TEXTS[0]))
