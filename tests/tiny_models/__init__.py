"""Tiny random models built offline, one per task, for the fleet tests.

Every builder takes a directory and writes a complete model there with
``save_pretrained`` (config, weights and a tokenizer trained in-process with
``tokenizers``, or an image processor / feature extractor), so that
``transformers.pipeline(task, model=str(directory))`` loads it with no hub
access. Builders are deterministic (seeded).

Use :func:`build` with one of :data:`KINDS`; the test session caches the
results (see ``tests/conftest.py``).
"""

from __future__ import annotations

import importlib
from pathlib import Path

#: kind -> (module, builder function name). Modules are imported lazily.
_BUILDERS: dict[str, tuple[str, str]] = {
    "text-classification": ("tests.tiny_models.text", "build_text_classification"),
    "text-generation": ("tests.tiny_models.text", "build_text_generation"),
    "text-generation-llama": ("tests.tiny_models.text", "build_llama_generation"),
    "text-classification-wide": ("tests.tiny_models.text", "build_text_classification_wide"),
    "text-generation-llama-wide": ("tests.tiny_models.text", "build_llama_generation_wide"),
    "feature-extraction": ("tests.tiny_models.text", "build_feature_extraction"),
    "token-classification": ("tests.tiny_models.text", "build_token_classification"),
    "fill-mask": ("tests.tiny_models.text", "build_fill_mask"),
    "zero-shot-classification": ("tests.tiny_models.text", "build_zero_shot"),
    "summarization": ("tests.tiny_models.text", "build_summarization"),
    "question-answering": ("tests.tiny_models.text", "build_question_answering"),
    "image-classification": ("tests.tiny_models.vision", "build_image_classification"),
    "image-feature-extraction": ("tests.tiny_models.vision", "build_image_feature_extraction"),
    "zero-shot-image-classification": ("tests.tiny_models.vision", "build_zero_shot_image_classification"),
    "object-detection": ("tests.tiny_models.vision", "build_object_detection"),
    "image-segmentation": ("tests.tiny_models.vision", "build_image_segmentation"),
    "depth-estimation": ("tests.tiny_models.vision", "build_depth_estimation"),
    "vqa-vilt": ("tests.tiny_models.vision", "build_vqa_vilt"),
    "vqa-blip": ("tests.tiny_models.vision", "build_vqa_blip"),
    "image-text-to-text": ("tests.tiny_models.vision", "build_image_text_to_text"),
    "asr-ctc": ("tests.tiny_models.audio", "build_asr_ctc"),
    "asr-whisper": ("tests.tiny_models.audio", "build_asr_whisper"),
    "audio-classification": ("tests.tiny_models.audio", "build_audio_classification"),
}

KINDS = tuple(sorted(_BUILDERS))


def register(kind: str, module: str, function: str) -> None:
    """Add a builder; used by the task-specific modules' maintainers."""
    _BUILDERS[kind] = (module, function)


def build(kind: str, directory: Path) -> Path:
    """Build the tiny model ``kind`` into ``directory`` and return the directory."""
    try:
        module_name, function_name = _BUILDERS[kind]
    except KeyError:
        raise KeyError(f"no tiny model {kind!r}; known: {sorted(_BUILDERS)}") from None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    builder = getattr(importlib.import_module(module_name), function_name)
    builder(directory)
    return directory
