"""Vision and multimodal tasks through a real worker give what in-process ``transformers.pipeline`` gives.

One worker serves every deployment of this module. Images travel as PIL images
(the client sends PNG base64), ``{"b64", "mime"}``, paths under the data root,
and URLs of an allowlisted loopback HTTP server.
"""

from __future__ import annotations

import base64

import numpy as np
import pytest
from PIL import Image

from producers import pipeline as fleet_pipeline
from producers.errors import InvalidParams, JobError, MediaError, PipefleetError
from tests.oracle import assert_same, local_pipeline
from tests.oracle import case_id as _case_id, run_job as run
from tests.tasks.private_models import private_models
from tests.tasks.media_server import media_settings, serve_directory

#: ViLT's scores move by about 2e-4 with the composition of the batch an item runs in (its padded
#: text length changes), so ViLT compares at 1e-3 rather than the oracle's 1e-4.
VILT_TOLERANCE = 1e-3

DEPLOYMENTS = {
    "tv-cls": ("image-classification", "image-classification"),
    "tv-feat": ("image-feature-extraction", "image-feature-extraction"),
    "tv-zsi": ("zero-shot-image-classification", "zero-shot-image-classification"),
    "tv-det": ("object-detection", "object-detection"),
    "tv-seg": ("image-segmentation", "image-segmentation"),
    "tv-depth": ("depth-estimation", "depth-estimation"),
    "tv-vilt": ("visual-question-answering", "vqa-vilt"),
    "tv-blip": ("visual-question-answering", "vqa-blip"),
    "tv-vlm": ("image-text-to-text", "image-text-to-text"),
}


def _image(height: int, width: int, shift: int) -> Image.Image:
    pixels = (np.arange(height * width * 3).reshape(height, width, 3) * (shift + 1) + shift) % 251
    return Image.fromarray(pixels.astype("uint8"))


IMAGES = [_image(40, 50, 0), _image(64, 48, 7), _image(30, 30, 3)]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision-media")
    for index, image in enumerate(IMAGES):
        image.save(root / f"image{index}.png")
    IMAGES[1].save(root / "image1.jpg", quality=95)
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    return root


@pytest.fixture(scope="module")
def base_url(data_root):
    with serve_directory(data_root) as url:
        yield url


@pytest.fixture(scope="module")
def models(module_fleet, model_dir, data_root, tmp_path_factory):
    """Start one worker serving every vision deployment; returns deployment -> model path."""
    paths = private_models(model_dir, tmp_path_factory.mktemp("models-vision"),
                           {name: kind for name, (_, kind) in DEPLOYMENTS.items()})
    config = module_fleet.config([
        {"name": name, "task": task, "model": paths[name], "max_batch_size": 8}
        for name, (task, _) in DEPLOYMENTS.items()
    ], media=media_settings(data_root))
    module_fleet.worker(config, deployments=list(DEPLOYMENTS))
    return paths


def local(models, name):
    return local_pipeline(DEPLOYMENTS[name][0], models[name])



def _tolerance(name: str) -> float:
    return VILT_TOLERANCE if name == "tv-vilt" else 1e-4


QUESTION = "how many cats are there?"

CASES = [
    ("tv-cls", IMAGES[0], {}),
    ("tv-cls", IMAGES, {"top_k": 2}),
    ("tv-cls", IMAGES[1], {"top_k": 5, "function_to_apply": "sigmoid"}),
    ("tv-feat", IMAGES[0], {}),
    ("tv-feat", IMAGES[:2], {"pool": True}),
    ("tv-zsi", IMAGES[0], {"candidate_labels": ["a cat", "a dog", "a car"]}),
    ("tv-zsi", IMAGES[:2], {"candidate_labels": ["cat", "dog"], "hypothesis_template": "a photo of a {}"}),
    ("tv-det", IMAGES[0], {"threshold": 0.0}),
    ("tv-det", IMAGES[:2], {"threshold": 0.0}),
    ("tv-seg", IMAGES[0], {}),
    ("tv-seg", IMAGES[:2], {"subtask": "semantic"}),
    ("tv-depth", IMAGES[0], {}),
    ("tv-depth", IMAGES[:2], {}),
    ("tv-vilt", {"image": IMAGES[0], "question": QUESTION}, {}),
    ("tv-vilt", [{"image": IMAGES[0], "question": QUESTION}, {"image": IMAGES[1], "question": "what colour?"}],
     {"top_k": 2}),
    ("tv-blip", {"image": IMAGES[0], "question": QUESTION}, {}),
    ("tv-blip", [{"image": IMAGES[1], "question": QUESTION}, {"image": IMAGES[2], "question": "is it red?"}],
     {"max_new_tokens": 4}),
]



@pytest.mark.parametrize(("name", "inputs", "params"), CASES, ids=[_case_id(c) for c in CASES])
def test_fleet_equals_in_process(client, models, name, inputs, params):
    expected = local(models, name)(inputs, **params)
    assert_same(run(client, name, inputs, params), expected, tol=_tolerance(name))


def _open(data_root, name):
    return Image.open(data_root / name).convert("RGB")


def test_every_image_form_gives_the_same_output(client, models, data_root, base_url):
    raw = (data_root / "image1.jpg").read_bytes()
    forms = [
        f"{base_url}/image1.jpg",
        {"b64": base64.b64encode(raw).decode(), "mime": "image/jpeg"},
        "data:image/jpeg;base64," + base64.b64encode(raw).decode(),
        {"path": "image1.jpg"},
        "image1.jpg",
        raw,  # bytes: the client encodes them as base64
    ]
    expected = local(models, "tv-cls")(_open(data_root, "image1.jpg"), top_k=3)
    for form in forms:
        assert_same(run(client, "tv-cls", form, {"top_k": 3}), expected)
    assert_same(run(client, "tv-cls", forms, {"top_k": 3}), [expected] * len(forms))


def test_vqa_takes_an_image_url_and_keyword_inputs(module_fleet, models, data_root, base_url):
    image = _open(data_root, "image2.png")
    with module_fleet.client() as client:
        vqa = fleet_pipeline("visual-question-answering", model=models["tv-vilt"], client=client)
        expected = local(models, "tv-vilt")(image=image, question=QUESTION)
        assert_same(vqa(image=f"{base_url}/image2.png", question=QUESTION), expected, tol=VILT_TOLERANCE)
        assert_same(vqa(image=image, question=QUESTION, top_k=1),
                    local(models, "tv-vilt")(image=image, question=QUESTION, top_k=1), tol=VILT_TOLERANCE)
        classifier = fleet_pipeline("image-classification", model=models["tv-cls"], client=client)
        assert_same(classifier(f"{base_url}/image0.png"), local(models, "tv-cls")(_open(data_root, "image0.png")))


def _chat(image, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


VLM_CASES = [
    ({"images": IMAGES[0], "text": "<image> describe"}, {"max_new_tokens": 5}),
    ({"images": IMAGES[1], "text": "<image> what is it?"}, {"max_new_tokens": 4, "return_full_text": False}),
    (_chat(IMAGES[2], "what is this?"), {"max_new_tokens": 5}),
    (_chat(IMAGES[0], "and this?") + [{"role": "assistant", "content": "It is"}], {"max_new_tokens": 3}),
]


@pytest.mark.parametrize(("inputs", "params"), VLM_CASES, ids=[f"vlm-{i}" for i in range(len(VLM_CASES))])
def test_a_vision_language_model_answers_as_in_process(client, models, inputs, params):
    assert_same(run(client, "tv-vlm", inputs, params), local(models, "tv-vlm")(inputs, **params))


def test_the_fleet_pipeline_takes_keyword_inputs_as_in_process(module_fleet, models):
    chat = _chat(IMAGES[0], "what?")
    with module_fleet.client() as client:
        vlm = fleet_pipeline("image-text-to-text", model=models["tv-vlm"], client=client)
        assert_same(vlm(text=chat, max_new_tokens=4), local(models, "tv-vlm")(text=chat, max_new_tokens=4))
        assert_same(vlm(images=IMAGES[1], text="<image> hi", max_new_tokens=4),
                    local(models, "tv-vlm")(images=IMAGES[1], text="<image> hi", max_new_tokens=4))


def test_a_seeded_vision_language_chat_samples_as_in_process(client, models):
    from transformers import set_seed

    # This pipeline reads sampling only from generate_kwargs (as call params they reach its processor).
    params = {"max_new_tokens": 6, "generate_kwargs": {"do_sample": True, "temperature": 1.5, "top_k": 20}}
    chat = _chat(IMAGES[1], "tell me")
    set_seed(99)
    expected = local(models, "tv-vlm")(chat, **params)
    fleet = run(client, "tv-vlm", chat, dict(params, seed=99))
    assert_same(fleet, expected)
    assert fleet != run(client, "tv-vlm", chat, {"max_new_tokens": 6})  # it sampled
    assert_same(run(client, "tv-vlm", {"images": IMAGES[1], "text": "<image> tell me"}, dict(params, seed=5)),
                run(client, "tv-vlm", {"images": IMAGES[1], "text": "<image> tell me"}, dict(params, seed=5)))


@pytest.mark.parametrize("inputs", [{"images": IMAGES[0], "text": "<image> describe"}, _chat(IMAGES[2], "what?")],
                         ids=["dict", "chat"])
def test_a_vision_language_job_streams_its_text_as_it_comes(client, models, inputs):
    params = {"max_new_tokens": 8}
    job = client.submit(deployment="tv-vlm", inputs=inputs, params=params, stream=True)
    pieces = list(job.stream(timeout_s=120))
    assert_same(job.result(timeout=60), local(models, "tv-vlm")(inputs, **params))
    new = local(models, "tv-vlm")(inputs, return_full_text=False, **params)[0]["generated_text"]
    assert len(pieces) > 1 and "".join(pieces) == new


def test_vision_language_jobs_batch_together_and_chats_take_image_urls(client, models, data_root, base_url):
    """A list is one output per item (``pipe(item)`` each: in-process ``pipe`` reads a list of dicts as one
    chat); its items, of different prompt lengths, run in one left-padded batch."""
    vlm = local(models, "tv-vlm")
    params = {"max_new_tokens": 4}
    items = [{"images": IMAGES[i % 3], "text": "<image>" + " longer" * i} for i in range(5)]
    jobs = [client.submit(deployment="tv-vlm", inputs=items, params=params),
            client.submit(deployment="tv-vlm", inputs=_chat(f"{base_url}/image1.png", "what?"), params=params)]
    assert_same(jobs[0].result(timeout=120), [vlm(item, **params) for item in items])
    assert_same(jobs[1].result(timeout=120), vlm(_chat(_open(data_root, "image1.png"), "what?"), **params))
    with pytest.raises(PipefleetError, match="'images' and 'text'"):
        run(client, "tv-vlm", {"image": IMAGES[0], "text": "<image> hi"}, params)
    with pytest.raises(MediaError, match="not on the allowlist"):
        run(client, "tv-vlm", _chat("http://10.1.2.3/image0.png", "what?"), params)


@pytest.mark.parametrize(("inputs", "message"), [
    ("http://localhost:1/image0.png", "not on the allowlist"),
    ("http://10.1.2.3/image0.png", "not on the allowlist"),
    ("ftp://127.0.0.1/image0.png", None),
    ({"path": "../../etc/passwd"}, None),
    ("/etc/passwd", "escapes data root"),
    ({"path": "corrupt.png"}, "image"),
    ({"b64": base64.b64encode(b"GIF89a-broken").decode(), "mime": "image/gif"}, "image"),
    ({"b64": "%%% not base64 %%%"}, "base64"),
    ({"path": "missing.png"}, "no such file"),
])
def test_bad_media_fails_that_job_clearly_and_the_worker_keeps_serving(client, models, data_root, inputs, message):
    with pytest.raises(MediaError) as caught:
        run(client, "tv-cls", inputs)
    if message:
        assert message in str(caught.value)
    assert_same(run(client, "tv-cls", IMAGES[0]), local(models, "tv-cls")(IMAGES[0]))


def test_a_bad_image_in_a_list_names_the_problem(client, models):
    with pytest.raises(MediaError, match="escapes data root|no such file"):
        run(client, "tv-cls", [IMAGES[0], {"path": "../outside.png"}])


def test_url_to_a_missing_file_fails_clearly(client, models, base_url):
    with pytest.raises(MediaError, match="HTTP 404"):
        run(client, "tv-cls", f"{base_url}/nothing-here.png")


@pytest.mark.parametrize(("name", "inputs", "params"), [
    ("tv-zsi", IMAGES[0], {}),
    ("tv-cls", IMAGES[0], {"function_to_apply": "cube"}),
    ("tv-seg", IMAGES[0], {"subtask": "nonsense"}),
    ("tv-vilt", IMAGES[0], {}),
])
def test_params_or_inputs_the_pipeline_rejects_fail_clearly(client, models, name, inputs, params):
    with pytest.raises(PipefleetError) as caught:
        run(client, name, inputs, params)
    assert isinstance(caught.value, (InvalidParams, JobError, MediaError)) or "input" in str(caught.value)
    assert str(caught.value)
    assert_same(run(client, "tv-cls", IMAGES[1]), local(models, "tv-cls")(IMAGES[1]))

