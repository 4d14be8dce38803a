"""The re-registered summarization and question-answering pipelines against references computed with the model."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoModelForQuestionAnswering, AutoModelForSeq2SeqLM, AutoTokenizer

from tests.tiny_models import build, text
from worker.pipelines import question_answering, summarization

ARTICLE = "alice lives in paris and works as a teacher. the museum in rome was lovely, but bob found it boring."
SHORT_CONTEXT = "Alice lives in Paris and works as a teacher. Bob visited Rome last summer with Carol."
LONG_CONTEXT = " ".join(text.corpus()[:24])
SCORE_TOLERANCE = 1e-4


@pytest.fixture(scope="module", autouse=True)
def _registered():
    summarization.register()
    question_answering.register()


@pytest.fixture(scope="module")
def summarizer_dir(tmp_path_factory):
    return build("summarization", tmp_path_factory.mktemp("summarization"))


@pytest.fixture(scope="module")
def summarizer(summarizer_dir):
    return transformers.pipeline("summarization", model=str(summarizer_dir))


@pytest.fixture(scope="module")
def seq2seq(summarizer_dir):
    return AutoTokenizer.from_pretrained(summarizer_dir), AutoModelForSeq2SeqLM.from_pretrained(summarizer_dir).eval()


@pytest.fixture(scope="module")
def qa_dir(tmp_path_factory):
    return build("question-answering", tmp_path_factory.mktemp("question-answering"))


@pytest.fixture(scope="module")
def qa(qa_dir):
    return transformers.pipeline("question-answering", model=str(qa_dir))


@pytest.fixture(scope="module")
def qa_model(qa_dir):
    return AutoTokenizer.from_pretrained(qa_dir), AutoModelForQuestionAnswering.from_pretrained(qa_dir).eval()


def reference_generate(seq2seq, document: str, truncation=False, **generate_kwargs) -> list[list[int]]:
    tokenizer, model = seq2seq
    with torch.no_grad():
        output = model.generate(**tokenizer(document, return_tensors="pt", truncation=truncation), **generate_kwargs)
    return output.tolist()


def reference_summaries(seq2seq, document: str, **kwargs) -> list[str]:
    tokenizer, _ = seq2seq
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in reference_generate(seq2seq, document, **kwargs)]


# --- summarization ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"num_beams": 1},
        {"num_beams": 2, "max_new_tokens": 6},
        {"num_beams": 1, "min_length": 8, "max_length": 12},
        {"num_beams": 3, "length_penalty": 0.5, "no_repeat_ngram_size": 2},
    ],
)
def test_summary_equals_direct_generate(summarizer, seq2seq, params):
    [expected] = reference_summaries(seq2seq, ARTICLE, **params)
    assert summarizer(ARTICLE, **params) == [{"summary_text": expected}]


def test_summary_defaults_to_v4_beam_search(summarizer, seq2seq):
    # v4's text2text default (num_beams=4) applies; the model's own max_length wins over the default max_new_tokens.
    [expected] = reference_summaries(seq2seq, ARTICLE, num_beams=4)
    assert summarizer(ARTICLE) == [{"summary_text": expected}]


def test_summary_params_given_at_construction_apply_to_every_call(summarizer_dir, seq2seq):
    pipe = transformers.pipeline("summarization", model=str(summarizer_dir), num_beams=1, max_new_tokens=5)
    [expected] = reference_summaries(seq2seq, ARTICLE, num_beams=1, max_new_tokens=5)
    assert pipe(ARTICLE) == [{"summary_text": expected}]


def test_summary_list_input_gives_one_record_per_text(summarizer):
    documents = [ARTICLE, "bob visited tokyo last winter.", "the hotel was awful."]
    expected = [summarizer(document, num_beams=1)[0] for document in documents]
    assert summarizer(documents, num_beams=1) == expected
    assert summarizer(documents, num_beams=1, batch_size=3) == expected


def test_summary_return_tensors_gives_token_ids(summarizer, seq2seq):
    [expected] = reference_generate(seq2seq, ARTICLE, num_beams=1)
    assert summarizer(ARTICLE, num_beams=1, return_tensors=True) == [{"summary_token_ids": expected}]
    assert summarizer(ARTICLE, num_beams=1, return_text=False) == [{"summary_token_ids": expected}]


def test_summary_several_sequences(summarizer, seq2seq):
    params = {"num_beams": 3, "num_return_sequences": 2}
    expected = [{"summary_text": summary} for summary in reference_summaries(seq2seq, ARTICLE, **params)]
    assert summarizer(ARTICLE, **params) == expected
    assert summarizer([ARTICLE, ARTICLE], **params) == [expected, expected]


def test_summary_truncation(summarizer, seq2seq):
    long_document = " ".join(text.corpus()[:40])
    [expected] = reference_summaries(seq2seq, long_document, truncation=True, num_beams=1)
    assert summarizer(long_document, truncation=True, num_beams=1) == [{"summary_text": expected}]


def test_summary_rejects_non_text(summarizer):
    with pytest.raises(ValueError, match="string"):
        summarizer({"text": ARTICLE})


@pytest.mark.parametrize(
    ("task", "key"), [("text2text-generation", "generated_text"), ("translation", "translation_text")]
)
def test_text2text_family_keys(summarizer_dir, seq2seq, task, key):
    pipe = transformers.pipeline(task, model=str(summarizer_dir))
    [expected] = reference_summaries(seq2seq, ARTICLE, num_beams=1)
    assert pipe(ARTICLE, num_beams=1) == [{key: expected}]


def test_register_is_idempotent():
    summarization.register()
    question_answering.register()
    tasks = transformers.pipelines.PIPELINE_REGISTRY.supported_tasks
    assert tasks["summarization"]["impl"] is summarization.SummarizationPipeline
    assert tasks["question-answering"]["impl"] is question_answering.QuestionAnsweringPipeline


# --- question answering ----------------------------------------------------------------------------------------


def reference_answers(
    qa_model, question: str, context: str, *, top_k=1, max_answer_len=15, doc_stride=None, align_to_words=True
):
    """All windows' spans scored from the model's logits, best first, as v4 defines them."""
    tokenizer, model = qa_model
    max_seq_len = tokenizer.model_max_length
    encoded = tokenizer(
        question,
        context,
        truncation="only_second",
        max_length=max_seq_len,
        stride=min(max_seq_len // 2, 128) if doc_stride is None else doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding="longest",
        return_tensors="pt",
    )
    with torch.no_grad():
        output = model(
            input_ids=encoded["input_ids"],
            token_type_ids=encoded["token_type_ids"],
            attention_mask=encoded["attention_mask"],
        )
    spans = []
    for window in range(encoded["input_ids"].shape[0]):
        in_context = torch.tensor([seq == 1 for seq in encoded.sequence_ids(window)])
        # The probabilities are normalised over the context and CLS (v4 keeps CLS for the no-answer score).
        normalised = in_context.clone()
        normalised[0] = True
        start = torch.softmax(output.start_logits[window].masked_fill(~normalised, -10000.0), dim=-1)
        end = torch.softmax(output.end_logits[window].masked_fill(~normalised, -10000.0), dim=-1)
        encoding = encoded.encodings[window]
        for i in in_context.nonzero().flatten().tolist():
            for j in range(i, min(i + max_answer_len, len(in_context))):
                if not in_context[j]:
                    continue
                if align_to_words:
                    char_start = encoding.word_to_chars(encoding.token_to_word(i), sequence_index=1)[0]
                    char_end = encoding.word_to_chars(encoding.token_to_word(j), sequence_index=1)[1]
                else:
                    char_start, char_end = encoding.offsets[i][0], encoding.offsets[j][1]
                spans.append((float(start[i] * end[j]), char_start, char_end))
    spans.sort(key=lambda span: span[0], reverse=True)
    return [
        {"score": score, "start": char_start, "end": char_end, "answer": context[char_start:char_end]}
        for score, char_start, char_end in spans[:top_k]
    ], encoded["input_ids"].shape[0]


def assert_same_answers(actual, expected):
    actual = actual if isinstance(actual, list) else [actual]
    assert [(a["start"], a["end"], a["answer"]) for a in actual] == [
        (e["start"], e["end"], e["answer"]) for e in expected
    ]
    for a, e in zip(actual, expected):
        assert a["score"] == pytest.approx(e["score"], abs=SCORE_TOLERANCE)


@pytest.mark.parametrize("align_to_words", [True, False])
@pytest.mark.parametrize("question", ["where does alice live?", "who visited rome last summer?"])
def test_answer_equals_best_span_from_logits(qa, qa_model, question, align_to_words):
    expected, windows = reference_answers(qa_model, question, SHORT_CONTEXT, align_to_words=align_to_words)
    assert windows == 1
    answer = qa(question=question, context=SHORT_CONTEXT, align_to_words=align_to_words)
    assert set(answer) == {"score", "start", "end", "answer"}
    assert_same_answers(answer, expected)


def test_max_answer_len_limits_spans(qa, qa_model):
    question = "what does alice do?"
    expected, _ = reference_answers(qa_model, question, SHORT_CONTEXT, max_answer_len=2, align_to_words=False)
    answer = qa(question=question, context=SHORT_CONTEXT, max_answer_len=2, align_to_words=False)
    assert_same_answers(answer, expected)


@pytest.mark.parametrize("doc_stride", [None, 16])
def test_long_context_is_split_into_windows(qa, qa_model, doc_stride):
    question = "where does isabel live?"
    expected, windows = reference_answers(qa_model, question, LONG_CONTEXT, doc_stride=doc_stride, top_k=3)
    assert windows > 2
    params = {} if doc_stride is None else {"doc_stride": doc_stride}
    assert_same_answers(qa(question=question, context=LONG_CONTEXT, top_k=3, **params), expected)
    assert_same_answers(qa(question=question, context=LONG_CONTEXT, **params), expected[:1])


def test_top_k_gives_a_sorted_list(qa, qa_model):
    question = "who visited rome last summer?"
    expected, _ = reference_answers(qa_model, question, SHORT_CONTEXT, top_k=5)
    answers = qa({"question": question, "context": SHORT_CONTEXT}, top_k=5)
    assert len(answers) == 5
    assert [a["score"] for a in answers] == sorted((a["score"] for a in answers), reverse=True)
    assert_same_answers(answers, expected)


def test_list_inputs_give_a_list_in_order(qa):
    examples = [
        {"question": "where does alice live?", "context": SHORT_CONTEXT},
        {"question": "where does isabel live?", "context": LONG_CONTEXT},
        {"question": "who visited rome?", "context": SHORT_CONTEXT},
    ]
    expected = [qa(example) for example in examples]
    assert qa(examples) == expected
    assert qa(question=[e["question"] for e in examples], context=[e["context"] for e in examples]) == expected
    assert qa([examples[0]]) == expected[:1]
    for batched, single in zip(qa(examples, batch_size=4), expected):
        assert_same_answers(batched, [single])


def test_question_list_against_one_context(qa):
    questions = ["where does alice live?", "who visited rome?"]
    expected = [qa(question=question, context=SHORT_CONTEXT) for question in questions]
    assert qa(question=questions, context=SHORT_CONTEXT) == expected
    assert qa(questions[0], SHORT_CONTEXT) == expected[0]


def test_impossible_answer_competes_with_spans(qa, qa_model):
    question = "where does alice live?"
    answers = qa(question=question, context=SHORT_CONTEXT, handle_impossible_answer=True, top_k=10_000)
    null = [a for a in answers if a["answer"] == "" and a["start"] == a["end"] == 0]
    assert len(null) == 1
    tokenizer, model = qa_model
    inputs = tokenizer(question, SHORT_CONTEXT, return_tensors="pt")
    with torch.no_grad():
        output = model(**inputs)
    allowed = torch.tensor([seq == 1 for seq in inputs.sequence_ids(0)])
    allowed[0] = True
    start = torch.softmax(output.start_logits[0].masked_fill(~allowed, -10000.0), dim=-1)
    end = torch.softmax(output.end_logits[0].masked_fill(~allowed, -10000.0), dim=-1)
    assert null[0]["score"] == pytest.approx(float(start[0] * end[0]), abs=SCORE_TOLERANCE)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda qa: qa(question="where?", context=""), "empty"),
        (lambda qa: qa({"question": "where?"}), "context"),
        (lambda qa: qa(question=["a", "b"], context=["c"]), "2 questions"),
        (lambda qa: qa(question="where?", context=SHORT_CONTEXT, top_k=0), "top_k"),
        (lambda qa: qa(question="where?", context=SHORT_CONTEXT, max_answer_len=0), "max_answer_len"),
        (lambda qa: qa(question="where?", context=SHORT_CONTEXT, doc_stride=100, max_seq_len=50), "doc_stride"),
        (lambda qa: qa(question="what " * 80, context=LONG_CONTEXT), "question takes"),
        (lambda qa: qa(question="where?", context=SHORT_CONTEXT, bogus=1), "unknown parameters"),
        (lambda qa: qa(42), "cannot take"),
    ],
)
def test_bad_input_raises_value_error(qa, call, message):
    with pytest.raises(ValueError, match=message):
        call(qa)
