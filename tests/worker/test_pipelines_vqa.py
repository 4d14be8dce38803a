"""The re-registered ``visual-question-answering`` pipeline against the models called directly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from tests.tiny_models import build, vision
from worker.pipelines import visual_question_answering

QUESTION = "how many cats are there?"


@pytest.fixture(scope="module", autouse=True)
def _registered():
    visual_question_answering.register()


@pytest.fixture(scope="module")
def image():
    return Image.fromarray((np.arange(40 * 48 * 3).reshape(40, 48, 3) % 251).astype("uint8"))


@pytest.fixture(scope="module")
def vilt_dir(tmp_path_factory):
    return build("vqa-vilt", tmp_path_factory.mktemp("vilt"))


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    return build("vqa-blip", tmp_path_factory.mktemp("blip"))


@pytest.fixture(scope="module")
def vilt(vilt_dir):
    return transformers.pipeline("visual-question-answering", model=str(vilt_dir))


@pytest.fixture(scope="module")
def blip(blip_dir):
    return transformers.pipeline("visual-question-answering", model=str(blip_dir))


def _vilt_reference(model_dir, image, question, top_k):
    processor = transformers.AutoProcessor.from_pretrained(model_dir)
    model = transformers.AutoModelForVisualQuestionAnswering.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(**processor(images=image, text=question, return_tensors="pt")).logits
    scores, ids = logits.sigmoid()[0].topk(top_k)
    return [(model.config.id2label[i], s) for s, i in zip(scores.tolist(), ids.tolist())]


def _blip_reference(model_dir, image, question, **generate_kwargs):
    processor = transformers.AutoProcessor.from_pretrained(model_dir)
    model = transformers.AutoModelForVisualQuestionAnswering.from_pretrained(model_dir).eval()
    with torch.no_grad():
        output_ids = model.generate(**processor(images=image, text=question, return_tensors="pt"), **generate_kwargs)
    return processor.decode(output_ids[0], skip_special_tokens=True).strip()


def _assert_matches(answers, reference):
    assert [answer["answer"] for answer in answers] == [label for label, _ in reference]
    for answer, (_, score) in zip(answers, reference):
        assert answer["score"] == pytest.approx(score, abs=1e-5)


def test_register_is_idempotent():
    visual_question_answering.register()
    visual_question_answering.register()
    task = transformers.pipelines.PIPELINE_REGISTRY.supported_tasks["visual-question-answering"]
    assert task["impl"] is visual_question_answering.VisualQuestionAnsweringPipeline


@pytest.mark.parametrize("top_k", [None, 1, 3, 50])
def test_vilt_matches_model_logits(vilt, vilt_dir, image, top_k):
    kwargs = {} if top_k is None else {"top_k": top_k}
    answers = vilt(image=image, question=QUESTION, **kwargs)
    expected_k = min(top_k or visual_question_answering.DEFAULT_TOP_K, len(vision.VQA_ANSWERS))
    assert len(answers) == expected_k
    _assert_matches(answers, _vilt_reference(vilt_dir, image, QUESTION, expected_k))
    assert [a["score"] for a in answers] == sorted((a["score"] for a in answers), reverse=True)


def _same_answers(got, expected):
    """Same answers in the same order, scores equal to float32 rounding.

    ViLT shuffles its image patches with ``torch.multinomial`` on every call (``ViltEmbeddings.visual_embed``),
    so two calls on the same input sum in different orders and can differ in the last bits.
    """
    if isinstance(expected, list) and expected and isinstance(expected[0], list):
        assert len(got) == len(expected)
        for one, other in zip(got, expected):
            _same_answers(one, other)
        return
    _assert_matches(got, [(answer["answer"], answer["score"]) for answer in expected])


def test_vilt_input_forms_agree(vilt, image):
    single = vilt(image, QUESTION, top_k=2)
    _same_answers(vilt({"image": image, "question": QUESTION}, top_k=2), single)
    as_list = vilt([{"image": image, "question": QUESTION}, {"image": image, "question": "is it red?"}], top_k=2)
    assert len(as_list) == 2
    _same_answers(as_list[0], single)
    _same_answers(vilt([image, image], QUESTION, top_k=2), [single, single])
    _same_answers(vilt(image, [QUESTION, "is it red?"], top_k=2), as_list)


def test_image_from_path(vilt, image, tmp_path):
    path = tmp_path / "picture.png"
    image.save(path)
    _same_answers(vilt(image=str(path), question=QUESTION, top_k=2), vilt(image=image, question=QUESTION, top_k=2))


def test_top_k_must_be_positive(vilt, image):
    with pytest.raises(ValueError, match="top_k"):
        vilt(image, QUESTION, top_k=0)


def test_blip_matches_generate(blip, blip_dir, image):
    answers = blip(image, QUESTION)
    reference = _blip_reference(blip_dir, image, QUESTION, max_new_tokens=vision.BLIP_MAX_NEW_TOKENS)
    assert answers == [{"answer": reference}]
    assert answers[0]["answer"]


def test_blip_passes_generate_kwargs(blip, blip_dir, image):
    answers = blip(image, QUESTION, max_new_tokens=3)
    assert answers == [{"answer": _blip_reference(blip_dir, image, QUESTION, max_new_tokens=3)}]
    nested = blip(image, QUESTION, generate_kwargs={"max_new_tokens": 3})
    assert nested == answers


def test_blip_batch_equals_single(blip, image):
    items = [{"image": image, "question": QUESTION}, {"image": image, "question": "what colour is the car?"}]
    assert blip(items, batch_size=2) == [blip(item) for item in items]
