"""The ``visual-question-answering`` pipeline that transformers 5 removed, with its v4 outputs.

Classifier models (ViLT) answer ``[{"score", "answer"}, ...]`` sorted by score;
generative models (BLIP) answer ``[{"answer": text}]``.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from transformers import AutoModelForVisualQuestionAnswering, GenerationConfig, Pipeline
from transformers.image_utils import load_image
from transformers.pipelines import PIPELINE_REGISTRY, REMOVED_TASKS

from worker.pipelines.params import at_least_one, given

logger = logging.getLogger(__name__)

#: The task name this module registers.
TASK = "visual-question-answering"
#: The v4 short name of the task.
ALIAS = "vqa"
#: Answers returned by classifier models unless ``top_k`` says otherwise.
DEFAULT_TOP_K = 5


def _is_image(value: Any) -> bool:
    from PIL import Image

    return isinstance(value, (Image.Image, str))


class VisualQuestionAnsweringPipeline(Pipeline):
    """Answer open questions about images, as ``transformers`` 4.x did."""

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = True
    _pipeline_calls_generate = True
    # The number of answers, not the sampling parameter
    _non_generation_params = ("top_k",)
    _default_generation_config = GenerationConfig(max_new_tokens=256)

    def _sanitize_parameters(self, top_k=None, padding=None, truncation=None, timeout=None, **generate_kwargs):
        preprocess_params = given(padding=padding, truncation=truncation, timeout=timeout)
        postprocess_params = given(top_k=at_least_one("top_k", top_k))
        forward_params = dict(generate_kwargs.pop("generate_kwargs", None) or {})
        forward_params.update(generate_kwargs)
        return preprocess_params, forward_params, postprocess_params

    def __call__(self, image, question: str | list[str] | None = None, **kwargs):
        """Answer ``question`` about ``image``; also takes ``{"image", "question"}`` dicts or lists of them."""
        is_image_batch = isinstance(image, list) and all(_is_image(item) for item in image)
        is_question_batch = isinstance(question, list) and all(isinstance(item, str) for item in question)
        if _is_image(image) and isinstance(question, str):
            inputs = {"image": image, "question": question}
        elif is_image_batch and isinstance(question, str):
            inputs = [{"image": item, "question": question} for item in image]
        elif _is_image(image) and is_question_batch:
            inputs = [{"image": image, "question": item} for item in question]
        elif is_image_batch and is_question_batch:
            inputs = [{"image": item, "question": q} for q in question for item in image]
        else:
            inputs = image
        return super().__call__(inputs, **kwargs)

    def preprocess(self, inputs, padding=False, truncation=False, timeout=None):
        image = load_image(inputs["image"], timeout=timeout)
        model_inputs = self.tokenizer(
            inputs["question"], return_tensors="pt", padding=padding, truncation=truncation
        )
        image_features = self.image_processor(images=image, return_tensors="pt").to(self.dtype)
        model_inputs.update(image_features)
        return model_inputs

    def _forward(self, model_inputs, **generate_kwargs):
        if not self.model.can_generate():
            return self.model(**model_inputs)
        # Generative VQA models take no segment ids; generate() refuses unused inputs.
        model_inputs.pop("token_type_ids", None)
        generate_kwargs = self._prepare_generate_kwargs(generate_kwargs)
        # BLIP's generate() ignores the model's own generation config and hard-codes pad/eos
        # kwargs, so everything travels inside one config, as v4 did.
        generation_config = generate_kwargs.pop("generation_config", None)
        if generation_config is None:
            generation_config = copy.deepcopy(self.model.generation_config)
        unused = generation_config.update(**generate_kwargs)
        return self.model.generate(**model_inputs, generation_config=generation_config, **unused)

    def postprocess(self, model_outputs, top_k=DEFAULT_TOP_K):
        if self.model.can_generate():
            return [
                {"answer": self.tokenizer.decode(output_ids, skip_special_tokens=True).strip()}
                for output_ids in model_outputs
            ]
        top_k = min(top_k, self.model.config.num_labels)
        probs = model_outputs.logits.sigmoid()[0]
        scores, ids = probs.topk(top_k)
        return [
            {"score": score, "answer": self.model.config.id2label[index]}
            for score, index in zip(scores.tolist(), ids.tolist())
        ]


def register() -> None:
    """Register ``visual-question-answering`` (and its alias ``vqa``) with transformers' registry."""
    # transformers.pipeline() refuses a removed task name before it looks in the registry.
    REMOVED_TASKS.pop(TASK, None)
    REMOVED_TASKS.pop(ALIAS, None)
    PIPELINE_REGISTRY.task_aliases[ALIAS] = TASK
    registered = PIPELINE_REGISTRY.supported_tasks.get(TASK, {}).get("impl")
    if registered is VisualQuestionAnsweringPipeline:
        return
    PIPELINE_REGISTRY.register_pipeline(
        TASK,
        pipeline_class=VisualQuestionAnsweringPipeline,
        pt_model=AutoModelForVisualQuestionAnswering,
        type="multimodal",
    )
