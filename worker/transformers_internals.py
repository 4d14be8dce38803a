"""Every private part of transformers pipefleet uses, in one place.

A worker runs a pipeline's steps itself (one batched forward pass for many
jobs, chunk windows on other workers, generation in the continuous batching
engine), so it needs what ``Pipeline.__call__`` computes before the steps:

- ``Pipeline._sanitize_parameters(**params)`` splits call params into
  preprocess, forward and postprocess params, and raises on one the pipeline
  does not take (custom pipelines implement it; callers outside transformers
  are not meant to call it);
- ``Pipeline._preprocess_params`` / ``_forward_params`` / ``_postprocess_params``
  hold the params given at construction, which ``__call__`` puts under the
  call's own;
- ``Pipeline._generation_defaults`` holds the generation defaults a
  generating pipeline applies on top of the model's generation config;
- ``GenerationMixin._prepare_generation_config`` (with the pipeline's
  ``_prepare_generate_kwargs``) resolves a call's generate kwargs over the
  model's generation config exactly as ``generate`` does, and
  ``GenerationMixin._get_logits_processor`` builds the processors ``generate``
  would apply for that config, after ``GenerationMixin._prepare_special_tokens``
  has set the config's token tensors (``_eos_token_tensor``: without it the
  minimum-length processors are silently left out): the continuous batching
  path samples per request with them (:mod:`worker.cb_plan`, :mod:`worker.cb_sampling`);
- ``Pipeline.__call__`` runs a list input through ``get_iterator`` (a torch
  ``DataLoader`` and three iterators); for a one-item list at ``batch_size=1``
  that machinery costs a fifth of a tiny model's forward pass, and
  ``Pipeline.run_single`` gives the same output (:func:`run_one_item_lists_directly`);
- a multilingual tokenizer's ``_build_translation_inputs`` (NLLB, M2M100,
  mBART...) builds a source-language prompt with its target-language token,
  as transformers 4's translation pipeline did (pipefleet's own translation
  pipeline, transformers 5 having dropped it, does the same);
- the text-generation pipeline's ``_forward`` hands ``postprocess`` a dict with ``generated_sequence``,
  ``input_ids`` and, when ``generate`` kept them, the raw ``logits`` of every step, which ``postprocess``
  would turn into lists: :func:`take_generated_logits` takes them out for the fleet's ``logprobs``
  (:mod:`worker.logprobs`).

``tests/worker/test_transformers_internals.py`` pins them against the installed transformers.
"""

from __future__ import annotations

import copy
import types
from typing import Any, Callable


def sanitize_call_params(pipe: Any, params: dict[str, Any]) -> tuple[dict, dict, dict]:
    """The call's own ``(preprocess, forward, postprocess)`` params; raises as ``pipe(x, **params)`` would."""
    return pipe._sanitize_parameters(**params)


def step_params(pipe: Any, params: dict[str, Any]) -> tuple[dict, dict, dict]:
    """``(preprocess, forward, postprocess)`` params exactly as ``Pipeline.__call__`` builds them."""
    preprocess, forward, postprocess = pipe._sanitize_parameters(**params)
    return ({**pipe._preprocess_params, **preprocess}, {**pipe._forward_params, **forward},
            {**pipe._postprocess_params, **postprocess})


def preprocess_defaults(pipe: Any) -> dict[str, Any]:
    """The preprocess params the pipeline was constructed with."""
    return pipe._preprocess_params


def postprocess_defaults(pipe: Any) -> dict[str, Any]:
    """The postprocess params the pipeline was constructed with."""
    return pipe._postprocess_params


def generation_defaults(pipe: Any) -> dict[str, Any]:
    """The generation defaults a generating pipeline applies (empty for other pipelines)."""
    return getattr(pipe, "_generation_defaults", None) or {}


def translation_inputs_builder(tokenizer: Any) -> Callable[..., Any] | None:
    """A multilingual tokenizer's ``(text, return_tensors, truncation, src_lang, tgt_lang)`` encoder, else None."""
    return getattr(tokenizer, "_build_translation_inputs", None)


def resolved_generation_config(pipe: Any, generate_kwargs: dict[str, Any]) -> Any:
    """The ``GenerationConfig`` that ``pipe.model.generate(**generate_kwargs)`` would run with, from the pipeline."""
    config, _ = pipe.model._prepare_generation_config(None, **pipe._prepare_generate_kwargs(generate_kwargs))
    return config


def with_token_tensors(model: Any, generation_config: Any) -> Any:
    """A copy of ``generation_config`` with the token tensors ``generate`` sets before it builds its processors
    (on the model's device); the copy is for :func:`logits_processors` only (it no longer serialises)."""
    config = copy.deepcopy(generation_config)
    model._prepare_special_tokens(config, True, device=model.device)
    return config


def logits_processors(model: Any, generation_config: Any, **options: Any) -> Any:
    """The ``LogitsProcessorList`` that ``generate`` builds for ``generation_config`` (``input_ids_seq_length``,
    ``device``: as ``generate`` passes them)."""
    return model._get_logits_processor(generation_config=generation_config, **options)


def run_one_item_lists_directly(pipe: Any) -> bool:
    """Make ``pipe([x], batch_size=1)`` run ``x`` through ``run_single`` rather than a ``DataLoader``.

    ``Pipeline.__call__`` applies the pipeline's own input handling, then hands a list to
    ``get_iterator``; at ``batch_size=1`` that iterator preprocesses, forwards and postprocesses each item
    exactly as ``run_single`` does (no collation, no unbatching), for 0.2 ms more per call back to back
    and 0.4-0.5 ms after a pause on a 2-core CPU (a ``DataLoader`` and three iterators built for one item;
    ``benchmarks.cold_forward``). Only for pipelines that keep the base ``get_iterator`` (a
    ``ChunkPipeline`` packs chunks itself; a stand-in is left alone). Returns whether it was installed.
    """
    from transformers.pipelines.base import Pipeline

    if getattr(type(pipe), "get_iterator", None) is not Pipeline.get_iterator:
        return False

    def get_iterator(self: Any, inputs: Any, num_workers: int, batch_size: int, preprocess_params: dict,
                     forward_params: dict, postprocess_params: dict) -> Any:
        if isinstance(inputs, list) and len(inputs) == 1 and batch_size == 1 and not num_workers:
            return iter([self.run_single(inputs[0], preprocess_params, forward_params, postprocess_params)])
        return Pipeline.get_iterator(self, inputs, num_workers, batch_size, preprocess_params, forward_params,
                                     postprocess_params)

    pipe.get_iterator = types.MethodType(get_iterator, pipe)
    return True


def take_generated_logits(model_outputs: dict[str, Any]) -> tuple[Any, Any, int] | None:
    """From what the text-generation pipeline's ``_forward`` hands ``postprocess`` when ``generate`` ran with
    ``output_logits=True, return_dict_in_generate=True``: take out the raw logits (``[1, sequences, steps,
    vocabulary]``, so that ``postprocess`` does not list them) and return them with the generated sequences
    (``[sequences, prompt + new tokens]``) and the prompt's length there; None without logits."""
    logits = model_outputs.pop("logits", None)
    if logits is None:
        return None
    input_ids = model_outputs.get("input_ids")
    return logits, model_outputs["generated_sequence"][0], 0 if input_ids is None else int(input_ids.shape[-1])
