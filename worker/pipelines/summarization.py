"""Seq2seq generation pipelines (text2text-generation, summarization, translation) with v4 outputs.

transformers 5 removed these tasks; this is v4's ``Text2TextGenerationPipeline`` family on top of the
v5 generation plumbing (``_prepare_generate_kwargs``). One input gives ``[{"<name>_text": ...}]``;
a list of inputs gives one such record per input (a list per input when several sequences are
returned). ``return_tensors=True`` gives ``<name>_token_ids`` as a list of ints.
"""

from __future__ import annotations

import enum
import logging
from typing import Any

from transformers import AutoModelForSeq2SeqLM, GenerationConfig, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY, REMOVED_TASKS
from transformers.tokenization_utils_base import TruncationStrategy
from transformers.utils import ModelOutput

from worker.pipelines.params import given
from worker.transformers_internals import translation_inputs_builder

logger = logging.getLogger(__name__)


class ReturnType(enum.Enum):
    """What each output record holds: the decoded text or the generated token ids."""

    TENSORS = 0
    TEXT = 1


class Text2TextGenerationPipeline(Pipeline):
    """Generate text from text with a seq2seq model (``generated_text``)."""

    #: Output keys are ``f"{return_name}_text"`` and ``f"{return_name}_token_ids"``.
    return_name = "generated"

    _pipeline_calls_generate = True
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True
    # v4's defaults; the model's own generation config and the caller's kwargs take precedence.
    _default_generation_config = GenerationConfig(max_new_tokens=256, num_beams=4)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._apply_task_specific_params()

    def _apply_task_specific_params(self) -> None:
        # v4's pipeline() applied config.task_specific_params[task] (e.g. T5's "summarize: " prefix and
        # beam settings); v5 dropped that, so real checkpoints would otherwise summarize differently.
        params = dict((getattr(self.model.config, "task_specific_params", None) or {}).get(self.task, {}))
        prefix = params.pop("prefix", None)
        if prefix is not None:
            self.prefix = prefix
        for key, value in params.items():
            self._generate_kwargs.setdefault(key, value)

    def _sanitize_parameters(
        self,
        return_tensors=None,
        return_text=None,
        return_type=None,
        clean_up_tokenization_spaces=None,
        truncation=None,
        stop_sequence=None,
        **generate_kwargs,
    ):
        preprocess_params = given(truncation=truncation)

        postprocess_params = {}
        if return_tensors is not None and return_type is None:
            return_type = ReturnType.TENSORS if return_tensors else ReturnType.TEXT
        elif return_text is not None and return_type is None:
            return_type = ReturnType.TEXT if return_text else ReturnType.TENSORS
        if return_type is not None:
            postprocess_params["return_type"] = ReturnType(return_type)
        if clean_up_tokenization_spaces is not None:
            postprocess_params["clean_up_tokenization_spaces"] = clean_up_tokenization_spaces

        if stop_sequence is not None:
            stop_sequence_ids = self.tokenizer.encode(stop_sequence, add_special_tokens=False)
            if len(stop_sequence_ids) > 1:
                logger.warning("stop_sequence %r is several tokens; only its first one stops generation", stop_sequence)
            generate_kwargs["eos_token_id"] = stop_sequence_ids[0]
        if getattr(self, "assistant_model", None) is not None:
            generate_kwargs["assistant_model"] = self.assistant_model
        if getattr(self, "assistant_tokenizer", None) is not None:
            generate_kwargs["tokenizer"] = self.tokenizer
            generate_kwargs["assistant_tokenizer"] = self.assistant_tokenizer
        return preprocess_params, generate_kwargs, postprocess_params

    def check_inputs(self, input_length: int, min_length: int, max_length: int) -> None:
        """Warn about generation lengths that make little sense for this task."""

    def __call__(self, inputs: str | list[str], **kwargs: Any):
        """Generate for one text or a list of texts."""
        result = super().__call__(inputs, **kwargs)
        if (
            isinstance(inputs, list)
            and all(isinstance(item, str) for item in inputs)
            and all(len(records) == 1 for records in result)
        ):
            return [records[0] for records in result]
        return result

    def _parse_and_tokenize(self, text: Any, truncation) -> dict:
        if not isinstance(text, str):
            raise ValueError(f"{self.task} expects a string or a list of strings, got {type(text).__name__}")
        prefix = self.prefix if self.prefix is not None else ""
        inputs = self.tokenizer(prefix + text, padding=False, truncation=truncation, return_tensors="pt")
        # Seq2seq models take no segment ids.
        inputs.pop("token_type_ids", None)
        return inputs

    def preprocess(self, inputs, truncation=TruncationStrategy.DO_NOT_TRUNCATE, **kwargs):
        return self._parse_and_tokenize(inputs, truncation=truncation)

    def _forward(self, model_inputs, **generate_kwargs):
        in_b, input_length = model_inputs["input_ids"].shape
        generate_kwargs = self._prepare_generate_kwargs(generate_kwargs)
        params = self._get_set_generation_params(generate_kwargs)
        self.check_inputs(input_length, params.get("min_length", 0), params.get("max_length", 20))
        output = self.model.generate(**model_inputs, **generate_kwargs)
        output_ids = output.sequences if isinstance(output, ModelOutput) else output
        out_b = output_ids.shape[0]
        return {"output_ids": output_ids.reshape(in_b, out_b // in_b, *output_ids.shape[1:])}

    def postprocess(self, model_outputs, return_type=ReturnType.TEXT, clean_up_tokenization_spaces=False):
        records = []
        for output_ids in model_outputs["output_ids"][0]:
            if return_type == ReturnType.TENSORS:
                records.append({f"{self.return_name}_token_ids": output_ids.tolist()})
            else:
                text = self.tokenizer.decode(
                    output_ids, skip_special_tokens=True, clean_up_tokenization_spaces=clean_up_tokenization_spaces
                )
                records.append({f"{self.return_name}_text": text})
        return records


class SummarizationPipeline(Text2TextGenerationPipeline):
    """Summarize text with a seq2seq model (``summary_text``)."""

    return_name = "summary"

    def check_inputs(self, input_length: int, min_length: int, max_length: int) -> None:
        """Warn when ``min_length`` exceeds ``max_length``, as v4 did."""
        if max_length < min_length:
            logger.warning("min_length=%d is greater than max_length=%d", min_length, max_length)


class TranslationPipeline(Text2TextGenerationPipeline):
    """Translate text with a seq2seq model (``translation_text``); ``src_lang``/``tgt_lang`` as in v4."""

    return_name = "translation"

    def _sanitize_parameters(self, src_lang=None, tgt_lang=None, **kwargs):
        preprocess_params, forward_params, postprocess_params = super()._sanitize_parameters(**kwargs)
        if src_lang is not None:
            preprocess_params["src_lang"] = src_lang
        if tgt_lang is not None:
            preprocess_params["tgt_lang"] = tgt_lang
        if src_lang is None and tgt_lang is None:
            # v4 task names such as "translation_en_to_fr" carry the languages.
            items = (self.task or "").split("_")
            if len(items) == 4 and items[2] == "to":
                preprocess_params["src_lang"], preprocess_params["tgt_lang"] = items[1], items[3]
        return preprocess_params, forward_params, postprocess_params

    def preprocess(self, inputs, truncation=TruncationStrategy.DO_NOT_TRUNCATE, src_lang=None, tgt_lang=None):
        build_translation_inputs = translation_inputs_builder(self.tokenizer)
        if build_translation_inputs is not None:
            if not isinstance(inputs, str):
                raise ValueError(f"translation expects a string or a list of strings, got {type(inputs).__name__}")
            return build_translation_inputs(
                inputs, return_tensors="pt", truncation=truncation, src_lang=src_lang, tgt_lang=tgt_lang
            )
        return self._parse_and_tokenize(inputs, truncation=truncation)


_TASKS = {
    "text2text-generation": Text2TextGenerationPipeline,
    "summarization": SummarizationPipeline,
    "translation": TranslationPipeline,
}


def register() -> None:
    """Register text2text-generation, summarization and translation with transformers."""
    for task, pipeline_class in _TASKS.items():
        # pipeline() refuses tasks listed as removed before it consults the registry.
        REMOVED_TASKS.pop(task, None)
        if PIPELINE_REGISTRY.supported_tasks.get(task, {}).get("impl") is pipeline_class:
            continue
        PIPELINE_REGISTRY.register_pipeline(
            task, pipeline_class=pipeline_class, pt_model=AutoModelForSeq2SeqLM, default=None, type="text"
        )
