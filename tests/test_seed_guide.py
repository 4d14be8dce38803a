"""The transformers Pipeline guide, run on the fleet with one import swapped.

Every Python block of the guide (transformers' ``docs/source/en/pipeline_tutorial.md``, the "Pipeline" page)
is below as written, output listings left out. Each block runs twice: with ``from transformers import pipeline``
in this process, and with ``from producers import pipeline`` against a real worker. Its last expression,
what it prints and the variables it leaves must be equal (floats within the oracle's tolerance); where the
in-process run raises, the fleet raises the same exception type.

What stands in for what, the same in both runs (:data:`STAND_INS`):

- hub ids are tiny offline models. The text-generation ones carry a generation config that makes them
  deterministic (greedy; beams of 4 for the "gpt2" the guide asks four sequences of), so outputs can be
  compared at all; ``google/gemma-7b`` is deployed in bfloat16, as the guide loads it;
- hub URLs are a loopback HTTP server the deployments allowlist; ``load_dataset("imdb", ...)`` is a local
  ``datasets.Dataset`` (which also avoids the guide's ``datasets.load_dataset`` after importing only
  ``load_dataset``); the generator yields 100 prompts, not 1,000, to spare CPU time.

What the in-process run alone changes to run on a CPU without ffmpeg (:data:`CPU_EDITS`): ``device=0`` and
``device="mps"`` become the CPU, a task is named where offline mode cannot infer one, and the audio URL is
the decoded array. The fleet runs the blocks exactly as written: device options are placement, which the
deployment decides.

Not run: the ChunkPipeline block (pseudo-code: a Pipeline has no ``model_forward``) and ``!pip install``.
On this fleet, which serves gemma-7b in bfloat16 unquantized, the quantized block must raise UnknownDeployment
naming that, and without its ``model_kwargs`` it must run; against a fleet serving gemma-7b in 8-bit it runs
unchanged (tests/tasks/test_quantized_deployments.py).
"""

from __future__ import annotations

import ast
import json
import re
import shutil
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import soundfile
from PIL import Image

from producers.errors import UnknownDeployment
from tests.oracle import assert_same
from tests.tasks.media_server import media_settings, serve_directory
from tests.tiny_models import text
from tests.tiny_models.audio import SAMPLING_RATE

BILLSUM = (
    "Section was formerly set out as section 44 of this title. As originally enacted, this section contained two "
    "further provisions that 'nothing in this act shall be construed as in any wise affecting the grant of lands "
    "made to the State of California by virtue of the act entitled 'An act authorizing a grant to the State of "
    "California of the Yosemite Valley, and of the land' embracing the Mariposa Big-Tree Grove, approved June "
    "thirtieth, eighteen hundred and sixty-four; or as affecting any bona-fide entry of land made within the limits "
    "above described under any law of the United States prior to the approval of this act.' The first quoted "
    "provision was omitted from the Code because the land, granted to the state of California pursuant to the Act "
    "cite, was receded to the United States. Resolution June 11, 1906, No. 27, accepted the recession."
)

#: The guide's blocks, verbatim but for the output listings. ``{BILLSUM}`` is the guide's long bill text.
GUIDE = {
    "intro-one-input": '''
from transformers import pipeline

pipeline = pipeline(task="text-generation", model="google/gemma-2-2b")
pipeline("the secret to baking a really good cake is ")
''',
    "intro-list-on-accelerator-device": '''
from transformers import pipeline
from accelerate import Accelerator

device = Accelerator().device

pipeline = pipeline(task="text-generation", model="google/gemma-2-2b", device=device)
pipeline(["the secret to baking a really good cake is ", "a baguette is "])
''',
    "tasks-summarization": '''
from transformers import pipeline

pipeline = pipeline(task="summarization", model="google/pegasus-billsum")
pipeline("{BILLSUM}")
''',
    "tasks-automatic-speech-recognition": '''
from transformers import pipeline

pipeline = pipeline(task="automatic-speech-recognition", model="openai/whisper-large-v3")
pipeline("https://huggingface.co/datasets/Narsil/asr_dummy/resolve/main/mlk.flac")
''',
    # transformers 5 takes the image positionally only: this raises TypeError in-process, and on the fleet.
    "tasks-image-classification": '''
from transformers import pipeline

pipeline = pipeline(task="image-classification", model="google/vit-base-patch16-224")
pipeline(images="https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/pipeline-cat-chonk.jpeg")
''',
    "tasks-visual-question-answering": '''
from transformers import pipeline

pipeline = pipeline(task="visual-question-answering", model="Salesforce/blip-vqa-base")
pipeline(
    image="https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/transformers/tasks/idefics-few-shot.jpg",
    question="What is in the image?",
)
''',
    "device-gpu": '''
from transformers import pipeline

pipeline = pipeline(task="text-generation", model="google/gemma-2-2b", device=0)
pipeline("the secret to baking a really good cake is ")
''',
    "device-map-auto": '''
from transformers import pipeline

pipeline = pipeline(task="text-generation", model="google/gemma-2-2b", device_map="auto")
pipeline("the secret to baking a really good cake is ")
''',
    "device-apple-silicon": '''
from transformers import pipeline

pipeline = pipeline(task="text-generation", model="google/gemma-2-2b", device="mps")
pipeline("the secret to baking a really good cake is ")
''',
    "batch-inference": '''
from transformers import pipeline
from accelerate import Accelerator

device = Accelerator().device

pipeline = pipeline(task="text-generation", model="google/gemma-2-2b", device=device, batch_size=2)
pipeline(["the secret to baking a really good cake is", "a baguette is", "paris is the", "hotdogs are"])
''',
    "batch-inference-streaming": '''
from transformers import pipeline
from accelerate import Accelerator
from transformers.pipelines.pt_utils import KeyDataset
import datasets

device = Accelerator().device

# KeyDataset is a utility that returns the item in the dict returned by the dataset
dataset = datasets.load_dataset("imdb", name="plain_text", split="unsupervised")
pipeline = pipeline(task="text-classification", model="distilbert/distilbert-base-uncased-finetuned-sst-2-english", device=device)
for out in pipeline(KeyDataset(dataset, "text"), batch_size=8, truncation="only_first"):
    print(out)
''',
    # As written (audio= and return_timestamp): transformers 5 raises TypeError; so does the fleet.
    "task-parameters-asr-word-timestamps": '''
from transformers import pipeline

pipeline = pipeline(task="automatic-speech-recognition", model="openai/whisper-large-v3")
pipeline(audio="https://huggingface.co/datasets/Narsil/asr_dummy/resolve/main/mlk.flac", return_timestamp="word")
''',
    "task-parameters-text-generation": '''
from transformers import pipeline

pipeline = pipeline(task="text-generation", model="openai-community/gpt2")
pipeline("the secret to baking a good cake is", num_return_sequences=4, return_full_text=False)
''',
    "large-datasets-keydataset": '''
from transformers.pipelines.pt_utils import KeyDataset
from transformers import pipeline
from accelerate import Accelerator
from datasets import load_dataset

device = Accelerator().device

dataset = datasets.load_dataset("imdb", name="plain_text", split="unsupervised")
pipeline = pipeline(task="text-classification", model="distilbert/distilbert-base-uncased-finetuned-sst-2-english", device=device)
for out in pipeline(KeyDataset(dataset, "text"), batch_size=8, truncation="only_first"):
    print(out)
''',
    "large-datasets-generator": '''
def data():
    for i in range(1000):
        yield f"My example {i}"

pipeline = pipeline(model="openai-community/gpt2", device=0)
generated_characters = 0
for out in pipeline(data()):
    generated_characters += len(out[0]["generated_text"])
''',
}

#: The guide's quantized block; see :func:`test_quantized_block`.
QUANTIZED = '''
import torch
from transformers import pipeline, BitsAndBytesConfig

pipeline = pipeline(model="google/gemma-7b", dtype=torch.bfloat16, device_map="auto", model_kwargs={"quantization_config": BitsAndBytesConfig(load_in_8bit=True)})
pipeline("the secret to baking a good cake is ")
'''

#: Blocks the guide writes in forms transformers 5 refuses, as the guide means them.
AS_MEANT = {
    "tasks-image-classification": '''
from transformers import pipeline

pipeline = pipeline(task="image-classification", model="google/vit-base-patch16-224")
pipeline("https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/pipeline-cat-chonk.jpeg")
''',
    "task-parameters-asr-word-timestamps": '''
from transformers import pipeline

pipeline = pipeline(task="automatic-speech-recognition", model="openai/whisper-large-v3")
pipeline("https://huggingface.co/datasets/Narsil/asr_dummy/resolve/main/mlk.flac", return_timestamps="word")
''',
    # The guide's earlier edition names zero-shot classification (a ChunkPipeline) in its text pipeline example.
    "text-zero-shot-classification": '''
from transformers import pipeline

classifier = pipeline(task="zero-shot-classification", model="facebook/bart-large-mnli")
classifier(
    "I have a problem with my iPhone that needs to be resolved asap!!",
    candidate_labels=["urgent", "phone", "computer", "not urgent", "tablet"],
)
''',
}

#: hub id -> (deployment, task, tiny model kind, generation config overrides, deployment settings).
STAND_INS = {
    "google/gemma-2-2b": ("sg-gemma", "text-generation", "text-generation",
                          {"do_sample": False, "max_new_tokens": 6}, {}),
    "google/gemma-7b": ("sg-gemma7b", "text-generation", "text-generation",
                        {"do_sample": False, "max_new_tokens": 6}, {"dtype": "bfloat16"}),
    "openai-community/gpt2": ("sg-gpt2", "text-generation", "text-generation",
                              {"do_sample": False, "num_beams": 4, "max_new_tokens": 4}, {}),
    "google/pegasus-billsum": ("sg-sum", "summarization", "summarization", {"max_new_tokens": 8}, {}),
    "openai/whisper-large-v3": ("sg-asr", "automatic-speech-recognition", "asr-whisper", None, {}),
    "google/vit-base-patch16-224": ("sg-vit", "image-classification", "image-classification", None, {}),
    "Salesforce/blip-vqa-base": ("sg-vqa", "visual-question-answering", "vqa-blip", None, {}),
    "distilbert/distilbert-base-uncased-finetuned-sst-2-english": ("sg-sst2", "text-classification",
                                                                    "text-classification", None, {}),
    "facebook/bart-large-mnli": ("sg-zsc", "zero-shot-classification", "zero-shot-classification", None, {}),
}

URLS = {
    "https://huggingface.co/datasets/Narsil/asr_dummy/resolve/main/mlk.flac": "mlk.flac",
    "https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/pipeline-cat-chonk.jpeg":
        "pipeline-cat-chonk.jpeg",
    "https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/transformers/tasks/"
    "idefics-few-shot.jpg": "idefics-few-shot.jpg",
}

SHARED_EDITS = [
    ('datasets.load_dataset("imdb", name="plain_text", split="unsupervised")', "IMDB"),
    ("range(1000)", "range(100)"),
]

#: What only the in-process run needs on a CPU without ffmpeg and offline (and, offline, a task for each model).
CPU_EDITS = [
    ("device=0", "device=-1"),
    ('device="mps"', 'device="cpu"'),
    ('"https://huggingface.co/datasets/Narsil/asr_dummy/resolve/main/mlk.flac"', "MLK_AUDIO"),
]


@dataclass
class Outcome:
    """What one block did: its last expression, what it printed, the variables it left, or its error."""

    value: Any = None
    printed: list[Any] = field(default_factory=list)
    variables: dict[str, Any] = field(default_factory=dict)
    error: BaseException | None = None


def _swap_import(source: str) -> str:
    def swap(match: re.Match) -> str:
        names = [n.strip() for n in match.group(1).split(",")]
        rest = [n for n in names if n != "pipeline"]
        lines = ["from producers import pipeline"] if "pipeline" in names else []
        return "\n".join(lines + ([f"from transformers import {', '.join(rest)}"] if rest else []))

    swapped = re.sub(r"^from transformers import (.+)$", swap, source, flags=re.MULTILINE)
    # The generator block relies on an import from an earlier block, as a notebook would.
    return swapped if "from producers import pipeline" in swapped else "from producers import pipeline\n" + swapped


def _prepare(source: str, paths: dict[str, str], base_url: str, *, fleet: bool) -> str:
    source = source.replace("{BILLSUM}", BILLSUM)
    edits = SHARED_EDITS + ([] if fleet else CPU_EDITS + [
        (f'pipeline(model="{hub_id}"', f'pipeline(task="{task}", model="{hub_id}"')
        for hub_id, (_, task, *_) in STAND_INS.items()])
    for old, new in edits:
        source = source.replace(old, new)
    for url, filename in URLS.items():
        source = source.replace(f'"{url}"', repr(f"{base_url}/{filename}"))
    for hub_id, path in paths.items():
        source = source.replace(f'"{hub_id}"', repr(path))
    if fleet:
        return _swap_import(source)
    return source if "from transformers import" in source else "from transformers import pipeline\n" + source


def run_block(source: str, names: dict[str, Any]) -> Outcome:
    """Execute a block; capture its last expression, its prints and its variables."""
    outcome = Outcome()
    namespace = {**names, "print": outcome.printed.append}
    tree = ast.parse(source)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    try:
        exec(compile(tree, "<guide>", "exec"), namespace)
        if last is not None:
            outcome.value = eval(compile(ast.Expression(last.value), "<guide>", "eval"), namespace)
    except Exception as error:  # the in-process run may fail as written; the fleet must fail alike
        outcome.error = error
    outcome.variables = {k: v for k, v in namespace.items()
                         if k not in names and k != "print" and isinstance(v, (int, float, str))}
    return outcome


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("seed-guide-media")
    rng = np.random.default_rng(0)
    t = np.arange(int(2.0 * SAMPLING_RATE)) / SAMPLING_RATE
    speech = (0.1 * np.sin(2 * np.pi * 330 * t) + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)
    soundfile.write(root / "mlk.flac", speech, SAMPLING_RATE)
    pixels = (np.arange(48 * 64 * 3).reshape(48, 64, 3) * 3 + 5) % 251
    Image.fromarray(pixels.astype("uint8")).save(root / "pipeline-cat-chonk.jpeg", quality=95)
    Image.fromarray((pixels[::-1] * 2 % 251).astype("uint8")).save(root / "idefics-few-shot.jpg", quality=95)
    return root


@pytest.fixture(scope="module")
def base_url(data_root):
    with serve_directory(data_root) as url:
        yield url


@pytest.fixture(scope="module")
def paths(module_fleet, model_dir, data_root, tmp_path_factory):
    """One worker serving every stand-in; returns hub id -> stand-in model path."""
    root = tmp_path_factory.mktemp("seed-guide-models")
    found = {}
    for hub_id, (name, _, kind, generation, _) in STAND_INS.items():
        target = root / name  # one copy per hub id: two deployments of one path would be ambiguous
        shutil.copytree(model_dir(kind), target)
        if generation is not None:
            config_path = target / "generation_config.json"
            config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **generation}))
        found[hub_id] = str(target)
    config = module_fleet.config([
        {"name": name, "task": task, "model": found[hub_id], "max_batch_size": 8, **settings}
        for hub_id, (name, task, _, _, settings) in STAND_INS.items()
    ], media=media_settings(data_root))
    module_fleet.worker(config, deployments=[name for name, *_ in STAND_INS.values()])
    return found


@pytest.fixture(scope="module")
def names(module_fleet, data_root):
    """What the blocks see besides their own imports: the imdb and audio stand-ins."""
    import datasets
    from worker.pipelines import register_all

    register_all()  # summarization is pipefleet's own pipeline in transformers 5, in-process too
    reviews = [" ".join(text.corpus()[i:i + n]) for i, n in zip(range(0, 120, 6), [1, 9, 2, 30, 4, 1] * 4)]
    speech, _ = soundfile.read(data_root / "mlk.flac", dtype="float32")
    return {"IMDB": datasets.Dataset.from_dict({"text": reviews, "label": [-1] * len(reviews)}),
            "MLK_AUDIO": speech}


@pytest.fixture(autouse=True)
def fleet_env(module_fleet, monkeypatch):
    # The blocks build their client as a web backend would: FleetClient.from_env().
    monkeypatch.setenv("PIPEFLEET_BROKER_URL", module_fleet.broker_url)
    monkeypatch.setenv("PIPEFLEET_RESULT_BACKEND", module_fleet.result_backend)


def _assert_same_outcome(fleet: Outcome, local: Outcome) -> None:
    if local.error is not None:
        assert fleet.error is not None, f"in-process raised {local.error!r}; the fleet returned {fleet.value!r}"
        assert type(fleet.error) is type(local.error), (fleet.error, local.error)
        return
    assert fleet.error is None, fleet.error
    assert_same(fleet.value, local.value)
    assert_same(fleet.printed, local.printed)
    assert_same(fleet.variables, local.variables)


def _run_both(source: str, paths, base_url, names) -> tuple[Outcome, Outcome]:
    local = run_block(_prepare(source, paths, base_url, fleet=False), names)
    fleet = run_block(_prepare(source, paths, base_url, fleet=True), names)
    return fleet, local


@pytest.mark.parametrize("block", list(GUIDE))
def test_guide_block_runs_on_the_fleet_as_in_process(block, paths, base_url, names):
    fleet, local = _run_both(GUIDE[block], paths, base_url, names)
    _assert_same_outcome(fleet, local)
    assert local.error is None or block in AS_MEANT, f"in-process run failed: {local.error!r}"
    if local.error is None:
        assert local.value is not None or local.printed or local.variables


@pytest.mark.parametrize("block", list(AS_MEANT))
def test_guide_block_as_meant_runs_on_the_fleet_as_in_process(block, paths, base_url, names):
    fleet, local = _run_both(AS_MEANT[block], paths, base_url, names)
    assert local.error is None, local.error
    _assert_same_outcome(fleet, local)


def test_quantized_block(paths, base_url, names):
    fleet = run_block(_prepare(QUANTIZED, paths, base_url, fleet=True), names)
    assert isinstance(fleet.error, UnknownDeployment), fleet.error
    message = str(fleet.error)
    assert "quantization=bitsandbytes 8-bit" in message
    assert "sg-gemma7b" in message and "dtype bfloat16, quantization none" in message
    # Without the quantization config, the same block runs on the bfloat16 deployment as in-process.
    unquantized = QUANTIZED.replace(
        ', model_kwargs={"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}', "")
    fleet, local = _run_both(unquantized, paths, base_url, names)
    assert local.error is None, local.error
    _assert_same_outcome(fleet, local)


def test_another_dtype_names_what_is_deployed(paths, base_url, names):
    source = QUANTIZED.replace(
        'dtype=torch.bfloat16, device_map="auto", model_kwargs={"quantization_config": '
        'BitsAndBytesConfig(load_in_8bit=True)}', "dtype=torch.float16")
    fleet = run_block(_prepare(source, paths, base_url, fleet=True), names)
    assert isinstance(fleet.error, UnknownDeployment), fleet.error
    assert "dtype=float16" in str(fleet.error) and "dtype bfloat16" in str(fleet.error)
    remote_code = GUIDE["device-gpu"].replace("device=0", "device=0, trust_remote_code=True")
    fleet = run_block(_prepare(remote_code, paths, base_url, fleet=True), names)
    assert isinstance(fleet.error, UnknownDeployment) and "trust_remote_code off" in str(fleet.error)


def test_construction_batch_size_is_the_default_call_batch_size(paths, names, module_fleet):
    from producers import pipeline

    with module_fleet.client() as client:
        pipe = pipeline(task="text-generation", model=paths["google/gemma-2-2b"], batch_size=3, client=client)
        assert pipe.batch_size == 3 and "batch_size" not in pipe.default_params
