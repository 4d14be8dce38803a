"""Audio tasks through a real worker give what in-process ``transformers.pipeline`` gives.

One worker serves every deployment of this module. Audio travels as float
arrays (bare, or with a sampling rate), as WAV/FLAC files in base64, under
the data root, or from an allowlisted loopback HTTP server. The worker hands
the pipeline ``{"raw", "sampling_rate"}`` at the model's rate; this machine
has neither ffmpeg nor torchaudio, so in-process references get the decoded
array at 16 kHz.
"""

from __future__ import annotations

import base64

import numpy as np
import pytest
import soundfile

from producers import pipeline as fleet_pipeline
from producers.errors import InvalidParams, JobError, MediaError, PipefleetError
from tests.oracle import assert_same, local_pipeline
from tests.oracle import case_id as _case_id, run_job as run
from tests.tasks.private_models import private_models
from tests.tasks.media_server import media_settings, serve_directory
from tests.tiny_models.audio import SAMPLING_RATE

DEPLOYMENTS = {
    "ta-ctc": ("automatic-speech-recognition", "asr-ctc"),
    "ta-whisper": ("automatic-speech-recognition", "asr-whisper"),
    "ta-cls": ("audio-classification", "audio-classification"),
}


def _tone(seconds: float, frequency: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLING_RATE)) / SAMPLING_RATE
    return (0.1 * np.sin(2 * np.pi * frequency * t) + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)


AUDIO = [_tone(2.0, 440, 0), _tone(1.3, 220, 1), _tone(3.0, 330, 2)]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio-media")
    soundfile.write(root / "clip.wav", AUDIO[0], SAMPLING_RATE, subtype="FLOAT")
    soundfile.write(root / "clip.flac", AUDIO[1], SAMPLING_RATE)
    (root / "corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 12)
    return root


@pytest.fixture(scope="module")
def base_url(data_root):
    with serve_directory(data_root) as url:
        yield url


@pytest.fixture(scope="module")
def models(module_fleet, model_dir, data_root, tmp_path_factory):
    """Start one worker serving every audio deployment; returns deployment -> model path."""
    paths = private_models(model_dir, tmp_path_factory.mktemp("models-audio"),
                           {name: kind for name, (_, kind) in DEPLOYMENTS.items()})
    config = module_fleet.config([
        {"name": name, "task": task, "model": paths[name], "max_batch_size": 8}
        for name, (task, _) in DEPLOYMENTS.items()
    ], media=media_settings(data_root))
    module_fleet.worker(config, deployments=list(DEPLOYMENTS))
    return paths


def local(models, name):
    return local_pipeline(DEPLOYMENTS[name][0], models[name])



def _with_rate(array: np.ndarray) -> dict:
    return {"raw": array, "sampling_rate": SAMPLING_RATE}


CASES = [
    ("ta-ctc", AUDIO[0], {}),
    ("ta-ctc", AUDIO, {}),
    ("ta-ctc", AUDIO[0], {"return_timestamps": "word"}),
    ("ta-ctc", AUDIO[:2], {"return_timestamps": "char"}),
    ("ta-ctc", np.tile(AUDIO[2], 2), {"chunk_length_s": 2.0, "stride_length_s": (0.5, 0.25)}),
    ("ta-whisper", AUDIO[:2], {}),
    ("ta-whisper", AUDIO[1], {"return_timestamps": True}),
    ("ta-whisper", AUDIO[0], {"return_timestamps": "word"}),
    ("ta-whisper", AUDIO[1], {"generate_kwargs": {"language": "en", "task": "transcribe"}}),
    ("ta-cls", AUDIO[0], {}),
    ("ta-cls", AUDIO, {"top_k": 2}),
    ("ta-cls", AUDIO[1], {"function_to_apply": "sigmoid"}),
]



@pytest.mark.parametrize(("name", "inputs", "params"), CASES, ids=[_case_id(c) for c in CASES])
def test_fleet_equals_in_process(client, models, name, inputs, params):
    expected = local(models, name)(inputs, **params)
    assert_same(run(client, name, inputs, params), expected)
    if name != "ta-whisper":  # Whisper is the slow one; the array forms are the same code for every model.
        # The same arrays with their rate, as {"raw", "sampling_rate"}.
        with_rate = [_with_rate(a) for a in inputs] if isinstance(inputs, list) else _with_rate(inputs)
        assert_same(run(client, name, with_rate, params), expected)


@pytest.mark.parametrize("name", ["ta-ctc", "ta-whisper", "ta-cls"])
def test_every_audio_file_form_gives_the_same_output(client, models, data_root, base_url, name):
    params = {"return_timestamps": "word"} if name == "ta-ctc" else {}
    for filename in ("clip.wav", "clip.flac"):
        decoded, rate = soundfile.read(data_root / filename, dtype="float32")
        assert rate == SAMPLING_RATE
        expected = local(models, name)(decoded, **params)
        raw = (data_root / filename).read_bytes()
        forms = [f"{base_url}/{filename}", {"path": filename},
                 {"b64": base64.b64encode(raw).decode(), "mime": "audio/" + filename.rsplit(".", 1)[1]}, raw]
        if name == "ta-whisper":  # slow: one form per file is enough to show decoding reaches Whisper
            forms = forms[:1] if filename.endswith("wav") else forms[2:3]
        assert_same(run(client, name, forms, params), [expected] * len(forms))


def test_audio_reaches_the_pipeline_at_the_model_rate(client, models):
    from scipy.signal import resample_poly

    # 8 kHz in; the worker resamples to the model's 16 kHz (polyphase) before the pipeline sees it.
    slow = resample_poly(AUDIO[0], 1, 2).astype(np.float32)
    expected_input = resample_poly(slow, 2, 1).astype(np.float32)
    for name in ("ta-ctc", "ta-cls"):
        expected = local(models, name)(expected_input)
        assert_same(run(client, name, {"raw": slow, "sampling_rate": 8000}), expected)
        assert_same(run(client, name, {"array": slow.tolist(), "sampling_rate": 8000}), expected)


def test_stereo_is_mixed_down(client, models):
    stereo = np.stack([AUDIO[1], AUDIO[1] * 0.5])
    mono = stereo.mean(axis=0).astype(np.float32)
    assert_same(run(client, "ta-cls", {"raw": stereo, "sampling_rate": SAMPLING_RATE}), local(models, "ta-cls")(mono))


def test_pipeline_stand_in_takes_arrays_and_urls(module_fleet, models, base_url, data_root):
    with module_fleet.client() as client:
        asr = fleet_pipeline("automatic-speech-recognition", model=models["ta-ctc"], client=client)
        assert_same(asr(AUDIO[0], return_timestamps="word"), local(models, "ta-ctc")(AUDIO[0], return_timestamps="word"))
        decoded, _ = soundfile.read(data_root / "clip.flac", dtype="float32")
        assert_same(asr(f"{base_url}/clip.flac"), local(models, "ta-ctc")(decoded))
        classifier = fleet_pipeline("audio-classification", model=models["ta-cls"], client=client)
        assert_same(classifier(AUDIO[:2], top_k=1), local(models, "ta-cls")(AUDIO[:2], top_k=1))


@pytest.mark.parametrize(("inputs", "message"), [
    ({"path": "corrupt.wav"}, "corrupt or unsupported audio"),
    ({"b64": base64.b64encode(b"fLaC" + b"\x00" * 40).decode(), "mime": "audio/flac"}, "audio"),
    ({"path": "../clip.wav"}, None),
    ("http://example.com/clip.wav", "not on the allowlist"),
    ({"raw": [0.1, float("inf")] * 4, "sampling_rate": SAMPLING_RATE}, None),
    ({"raw": [0.0] * 100, "sampling_rate": -5}, "sampling_rate"),
])
def test_bad_audio_fails_clearly_and_the_worker_keeps_serving(client, models, inputs, message):
    with pytest.raises(PipefleetError) as caught:
        run(client, "ta-ctc", inputs)
    assert str(caught.value)
    if message:
        assert isinstance(caught.value, MediaError)
        assert message in str(caught.value)
    assert_same(run(client, "ta-ctc", AUDIO[1]), local(models, "ta-ctc")(AUDIO[1]))


@pytest.mark.parametrize(("name", "params"), [
    ("ta-ctc", {"return_timestamps": "word", "return_language": "yes-please"}),
    ("ta-whisper", {"return_timestamps": "char"}),
    ("ta-cls", {"function_to_apply": "cube"}),
])
def test_params_the_pipeline_rejects_fail_clearly(client, models, name, params):
    with pytest.raises(PipefleetError) as caught:
        run(client, name, AUDIO[1], params)
    assert isinstance(caught.value, (InvalidParams, JobError)), caught.value
    assert str(caught.value)
    assert_same(run(client, "ta-cls", AUDIO[0]), local(models, "ta-cls")(AUDIO[0]))
