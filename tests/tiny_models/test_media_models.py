"""Every tiny vision and audio model loads with ``transformers.pipeline`` offline and runs a call."""

from __future__ import annotations

import numpy as np
import pytest
import transformers
from PIL import Image

from tests.tiny_models import KINDS, audio, build
from worker.pipelines import visual_question_answering

#: kind -> the pipeline task that serves it.
TASKS = {
    "image-classification": "image-classification",
    "image-feature-extraction": "image-feature-extraction",
    "zero-shot-image-classification": "zero-shot-image-classification",
    "object-detection": "object-detection",
    "image-segmentation": "image-segmentation",
    "depth-estimation": "depth-estimation",
    "vqa-vilt": "visual-question-answering",
    "vqa-blip": "visual-question-answering",
    "asr-ctc": "automatic-speech-recognition",
    "asr-whisper": "automatic-speech-recognition",
    "audio-classification": "audio-classification",
}

_IMAGE = Image.fromarray((np.arange(40 * 50 * 3).reshape(40, 50, 3) % 251).astype("uint8"))
_RNG = np.random.default_rng(0)
_AUDIO = (
    0.1 * np.sin(np.arange(3 * audio.SAMPLING_RATE) / audio.SAMPLING_RATE * 2 * np.pi * 440)
    + 0.05 * _RNG.standard_normal(3 * audio.SAMPLING_RATE)
).astype(np.float32)

#: kind -> (positional inputs, call kwargs) for one representative call.
CALLS = {
    "image-classification": ((_IMAGE,), {}),
    "image-feature-extraction": ((_IMAGE,), {}),
    "zero-shot-image-classification": ((_IMAGE,), {"candidate_labels": ["a cat", "a dog", "a car"]}),
    "object-detection": ((_IMAGE,), {"threshold": 0.0}),
    "image-segmentation": ((_IMAGE,), {}),
    "depth-estimation": ((_IMAGE,), {}),
    "vqa-vilt": ((_IMAGE, "how many cats are there?"), {}),
    "vqa-blip": ((_IMAGE, "how many cats are there?"), {}),
    "asr-ctc": ((_AUDIO,), {}),
    "asr-whisper": ((_AUDIO,), {}),
    "audio-classification": ((_AUDIO,), {}),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Build each tiny model once per module."""
    built = {}

    def get(kind):
        if kind not in built:
            built[kind] = build(kind, tmp_path_factory.mktemp(kind))
        return built[kind]

    return get


@pytest.fixture(scope="module")
def pipe(model_dir):
    """One loaded pipeline per kind."""
    visual_question_answering.register()
    loaded = {}

    def get(kind):
        if kind not in loaded:
            loaded[kind] = transformers.pipeline(TASKS[kind], model=str(model_dir(kind)))
        return loaded[kind]

    return get


def _plain(value):
    """Outputs made comparable: tensors and PIL images become numpy arrays."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, Image.Image):
        return np.asarray(value)
    if hasattr(value, "numpy"):
        return value.detach().numpy()
    return value


def _assert_same(left, right):
    left, right = _plain(left), _plain(right)
    if isinstance(left, dict):
        assert left.keys() == right.keys()
        for key in left:
            _assert_same(left[key], right[key])
    elif isinstance(left, list):
        assert len(left) == len(right)
        for a, b in zip(left, right):
            _assert_same(a, b)
    elif isinstance(left, (np.ndarray, float)):
        np.testing.assert_allclose(left, right, atol=1e-6)
    else:
        assert left == right


def test_every_media_kind_is_registered():
    assert set(TASKS) <= set(KINDS)


@pytest.mark.parametrize("kind", sorted(TASKS))
def test_kind_loads_and_runs_deterministically(kind, pipe):
    args, kwargs = CALLS[kind]
    first = pipe(kind)(*args, **kwargs)
    second = pipe(kind)(*args, **kwargs)
    assert first
    _assert_same(first, second)


@pytest.mark.parametrize("kind", ["image-classification", "vqa-vilt", "asr-ctc"])
def test_builds_are_reproducible(kind, model_dir, tmp_path):
    again = build(kind, tmp_path / kind)
    first = (model_dir(kind) / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == first


def test_image_classifier_has_five_labels(pipe):
    out = pipe("image-classification")(_IMAGE, top_k=10)
    assert len(out) == 5
    assert {item["label"] for item in out} == {"cat", "dog", "bird", "car", "tree"}


@pytest.mark.parametrize("level", ["char", "word"])
def test_ctc_timestamps(pipe, level):
    out = pipe("asr-ctc")(_AUDIO, return_timestamps=level)
    assert out["chunks"]
    duration = len(_AUDIO) / audio.SAMPLING_RATE
    for chunk in out["chunks"]:
        start, end = chunk["timestamp"]
        assert 0 <= start <= end <= duration
    if level == "word":
        assert [chunk["text"] for chunk in out["chunks"]] == out["text"].split()


def test_ctc_chunking_with_strides(pipe):
    long_audio = np.tile(_AUDIO, 4)
    out = pipe("asr-ctc")(long_audio, chunk_length_s=2.0, stride_length_s=(0.5, 0.25), return_timestamps="word")
    duration = len(long_audio) / audio.SAMPLING_RATE
    assert out["text"]
    assert max(chunk["timestamp"][1] for chunk in out["chunks"]) <= duration
    batched = pipe("asr-ctc")(long_audio, chunk_length_s=2.0, stride_length_s=(0.5, 0.25), batch_size=3)
    assert batched["text"] == out["text"]


@pytest.mark.parametrize("return_timestamps", [True, "word"])
def test_whisper_timestamps(pipe, return_timestamps):
    out = pipe("asr-whisper")(_AUDIO, return_timestamps=return_timestamps)
    assert "chunks" in out
    for chunk in out["chunks"]:
        assert set(chunk) >= {"text", "timestamp"}


def test_whisper_language_task_and_chunking(pipe):
    whisper = pipe("asr-whisper")
    out = whisper(_AUDIO, generate_kwargs={"language": "en", "task": "transcribe"})
    assert isinstance(out["text"], str)
    long_audio = np.tile(_AUDIO, 4)
    chunked = whisper(long_audio, chunk_length_s=8, batch_size=2, return_timestamps=True)
    assert isinstance(chunked["text"], str)


def test_whisper_tokenizer_layout(model_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir("asr-whisper"))
    ids = tokenizer.convert_tokens_to_ids
    assert ids("<|startoftranscript|>") == ids("<|endoftext|>") + 1
    assert ids("<|en|>") == ids("<|startoftranscript|>") + 1
    assert ids("<|0.00|>") == ids("<|notimestamps|>") + 1
    assert ids("<|30.00|>") == ids("<|0.00|>") + 1500
    assert ids("<|0.00|>") not in tokenizer.all_special_ids
