"""Extractive question answering as a chunk pipeline, with v4's inputs, algorithm and outputs.

A long context is cut into overlapping windows (``doc_stride``) by the fast tokenizer; each window
is one forward pass, and :meth:`QuestionAnsweringPipeline.postprocess` scores spans over all of
them. The chunk outputs hold only tensors and plain Python values (no ``tokenizers.Encoding``), so
they can travel between processes.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForQuestionAnswering
from transformers.pipelines import PIPELINE_REGISTRY, REMOVED_TASKS
from transformers.pipelines.base import ChunkPipeline

from worker.pipelines.params import at_least_one, given

logger = logging.getLogger(__name__)

TASK = "question-answering"
#: Logit given to tokens that cannot be part of an answer, as in v4.
MASKED_LOGIT = -10000.0
_QUESTION_KEYS = ("question", "context")


def _example(item: Any) -> dict[str, str]:
    """Validate one ``{"question", "context"}`` input."""
    if not isinstance(item, dict):
        raise ValueError(f"question-answering expects a dict with 'question' and 'context', got {type(item).__name__}")
    for key in _QUESTION_KEYS:
        if key not in item:
            raise ValueError(f"question-answering input is missing {key!r} (got keys {sorted(item)})")
        if not isinstance(item[key], str):
            raise ValueError(f"question-answering {key!r} must be a string, got {type(item[key]).__name__}")
        if not item[key]:
            raise ValueError(f"question-answering {key!r} cannot be empty")
    return {"question": item["question"], "context": item["context"]}


def parse_inputs(inputs: Any = None, *, question: Any = None, context: Any = None) -> Any:
    """Turn v4's call forms into one example dict, a list of them, or a lazy iterable of dicts."""
    if inputs is None:
        if question is None or context is None:
            raise ValueError("question-answering needs question= and context=, or a {'question', 'context'} dict")
        if isinstance(question, str) and isinstance(context, str):
            return _example({"question": question, "context": context})
        if isinstance(question, list) and isinstance(context, str):
            return [_example({"question": q, "context": context}) for q in question]
        if isinstance(question, list) and isinstance(context, list):
            if len(question) != len(context):
                raise ValueError(f"got {len(question)} questions but {len(context)} contexts")
            return [_example({"question": q, "context": c}) for q, c in zip(question, context)]
        raise ValueError("question must be a string or a list, and context a string or a list of the same length")
    if question is not None or context is not None:
        raise ValueError("pass either an input dict (or list of them) or question=/context=, not both")
    if isinstance(inputs, dict):
        return _example(inputs)
    if isinstance(inputs, (list, tuple)):
        return [_example(item) for item in inputs]
    if isinstance(inputs, types.GeneratorType) or (hasattr(inputs, "__iter__") and not isinstance(inputs, str)):
        # Streams are validated item by item in preprocess.
        return inputs
    raise ValueError(f"question-answering cannot take input of type {type(inputs).__name__}")


def decode_spans(
    start: np.ndarray, end: np.ndarray, top_k: int, max_answer_len: int, allowed: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``top_k`` best (start, end, score) spans by ``start[i] * end[j]`` with ``i <= j < i + max_answer_len``."""
    outer = np.outer(start, end)
    candidates = np.tril(np.triu(outer), max_answer_len - 1)
    scores_flat = candidates.flatten()
    if top_k == 1:
        order = np.array([np.argmax(scores_flat)])
    elif len(scores_flat) <= top_k:
        order = np.argsort(-scores_flat)
    else:
        best = np.argpartition(-scores_flat, top_k)[:top_k]
        order = best[np.argsort(-scores_flat[best])]
    starts, ends = np.unravel_index(order, candidates.shape)
    # Beyond the valid spans the top-k holds zero-score pairs with end < start; v4 could return those.
    keep = allowed[starts] & allowed[ends] & (ends >= starts) & (ends - starts < max_answer_len)
    starts, ends = starts[keep], ends[keep]
    return starts, ends, candidates[starts, ends]


def select_starts_ends(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    allowed: np.ndarray,
    *,
    min_null_score: float,
    top_k: int,
    handle_impossible_answer: bool,
    max_answer_len: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Softmax start/end logits over the allowed (context) tokens and pick the best spans, as v4 did."""
    start = np.where(allowed, start_logits, MASKED_LOGIT)
    end = np.where(allowed, end_logits, MASKED_LOGIT)
    start = np.exp(start - start.max())
    start = start / start.sum()
    end = np.exp(end - end.max())
    end = end / end.sum()
    if handle_impossible_answer:
        min_null_score = min(min_null_score, float(start[0] * end[0]))
    # The first token (CLS) stands for "no answer"; it never starts or ends a span.
    start[0] = end[0] = 0.0
    in_span = allowed.copy()
    in_span[0] = False
    starts, ends, scores = decode_spans(start, end, top_k, max_answer_len, in_span)
    return starts, ends, scores, min_null_score


def _char_span(chunk: dict, start: int, end: int, align_to_words: bool) -> tuple[int, int]:
    """Character offsets in the context of the token span ``start..end`` (widened to whole words)."""
    offsets = chunk["offsets"]
    if align_to_words:
        word_ids, sequence_ids, context_index = chunk["word_ids"], chunk["sequence_ids"], chunk["context_index"]
        start_word, end_word = word_ids[start], word_ids[end]
        if start_word is not None and end_word is not None:
            context_tokens = [i for i, seq in enumerate(sequence_ids) if seq == context_index]
            start_tokens = [i for i in context_tokens if word_ids[i] == start_word]
            end_tokens = [i for i in context_tokens if word_ids[i] == end_word]
            return offsets[start_tokens[0]][0], offsets[end_tokens[-1]][1]
    return offsets[start][0], offsets[end][1]


class QuestionAnsweringPipeline(ChunkPipeline):
    """Answer a question by extracting a span of a context; v4's ``{"score","start","end","answer"}``."""

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True

    default_input_names = "question,context"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.tokenizer is None or not self.tokenizer.is_fast:
            raise ValueError("question-answering needs a fast tokenizer (offsets and overflowing windows)")

    def __call__(self, *args: Any, question: Any = None, context: Any = None, **kwargs: Any):
        """Answer one example (a dict, ``(question, context)`` or question=/context=), or a list of them."""
        if len(args) == 2 and all(isinstance(arg, str) for arg in args):
            question, context, args = args[0], args[1], ()
        if len(args) > 1:
            raise ValueError(f"question-answering takes one input or (question, context), got {len(args)} arguments")
        inputs = args[0] if args else None
        return super().__call__(parse_inputs(inputs, question=question, context=context), **kwargs)

    def _sanitize_parameters(
        self,
        padding=None,
        top_k=None,
        doc_stride=None,
        max_answer_len=None,
        max_seq_len=None,
        max_question_len=None,
        handle_impossible_answer=None,
        align_to_words=None,
        **kwargs,
    ):
        if kwargs:
            raise ValueError(f"question-answering got unknown parameters {sorted(kwargs)}")
        # max_question_len: only v4's slow-tokenizer path used it; accepted for compatibility.
        preprocess_params = given(padding=padding, doc_stride=doc_stride, max_seq_len=max_seq_len,
                                  max_question_len=max_question_len)
        postprocess_params = given(top_k=at_least_one("top_k", top_k),
                                   max_answer_len=at_least_one("max_answer_len", max_answer_len),
                                   handle_impossible_answer=handle_impossible_answer, align_to_words=align_to_words)
        return preprocess_params, {}, postprocess_params

    def _check_windows(self, question: str, context: str, max_seq_len: int, doc_stride: int) -> None:
        # On these the tokenizer panics (PanicException derives from BaseException) instead of raising.
        question_len = len(self.tokenizer(question, add_special_tokens=False, verbose=False)["input_ids"])
        context_len = len(self.tokenizer(context, add_special_tokens=False, verbose=False)["input_ids"])
        fixed_len = question_len + self.tokenizer.num_special_tokens_to_add(pair=True)
        if fixed_len + context_len <= max_seq_len:
            return
        room = max_seq_len - fixed_len
        if room <= doc_stride:
            raise ValueError(
                f"the question takes {question_len} of max_seq_len={max_seq_len} tokens, leaving {max(room, 0)} per"
                f" context window; doc_stride={doc_stride} must be smaller than that (shorten the question, lower"
                " doc_stride or raise max_seq_len)"
            )

    def preprocess(self, example, padding="do_not_pad", doc_stride=None, max_question_len=64, max_seq_len=None):
        example = _example(example)
        if max_seq_len is None:
            max_seq_len = min(self.tokenizer.model_max_length, 384)
        if doc_stride is None:
            doc_stride = min(max_seq_len // 2, 128)
        if doc_stride > max_seq_len:
            raise ValueError(f"`doc_stride` ({doc_stride}) is larger than `max_seq_len` ({max_seq_len})")
        question_first = self.tokenizer.padding_side == "right"
        context_index = 1 if question_first else 0
        self._check_windows(example["question"], example["context"], max_seq_len, doc_stride)
        first, second = (
            (example["question"], example["context"]) if question_first else (example["context"], example["question"])
        )
        encoded = self.tokenizer(
            text=first,
            text_pair=second,
            padding=padding,
            truncation="only_second" if question_first else "only_first",
            max_length=max_seq_len,
            stride=doc_stride,
            return_token_type_ids=True,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
        )
        num_chunks = len(encoded["input_ids"])
        model_keys = [key for key in self.tokenizer.model_input_names if key in encoded]
        for index in range(num_chunks):
            sequence_ids = encoded.sequence_ids(index)
            p_mask = [seq != context_index for seq in sequence_ids]
            # Keep CLS selectable: it carries the "no answer" score.
            if self.tokenizer.cls_token_id is not None:
                for position, token_id in enumerate(encoded["input_ids"][index]):
                    if token_id == self.tokenizer.cls_token_id:
                        p_mask[position] = False
            chunk = {key: torch.tensor([encoded[key][index]], dtype=torch.long) for key in model_keys}
            chunk["p_mask"] = torch.tensor([p_mask], dtype=torch.long)
            if "attention_mask" not in chunk:
                chunk["attention_mask"] = torch.ones_like(chunk["p_mask"])
            yield {
                **chunk,
                "context": example["context"],
                "offsets": [tuple(pair) for pair in encoded["offset_mapping"][index]],
                "word_ids": encoded.word_ids(index),
                "sequence_ids": sequence_ids,
                "context_index": context_index,
                "is_last": index == num_chunks - 1,
            }

    def _forward(self, inputs):
        model_inputs = {key: inputs[key] for key in self.tokenizer.model_input_names if key in inputs}
        output = self.model(**model_inputs)
        start, end = (output["start_logits"], output["end_logits"]) if isinstance(output, dict) else output[:2]
        return {"start_logits": start, "end_logits": end, **inputs}

    def postprocess(
        self, model_outputs, top_k=1, handle_impossible_answer=False, max_answer_len=15, align_to_words=True
    ):
        min_null_score = 1000000.0  # large and positive, as in v4
        answers = []
        for chunk in model_outputs:
            start_logits = chunk["start_logits"][0].float().numpy()
            end_logits = chunk["end_logits"][0].float().numpy()
            allowed = (chunk["p_mask"][0].numpy() == 0) & (chunk["attention_mask"][0].numpy() == 1)
            starts, ends, scores, min_null_score = select_starts_ends(
                start_logits,
                end_logits,
                allowed,
                min_null_score=min_null_score,
                top_k=top_k,
                handle_impossible_answer=handle_impossible_answer,
                max_answer_len=max_answer_len,
            )
            # Left padding (from batching) shifts the tokens relative to the offsets.
            shift = len(allowed) - len(chunk["offsets"]) if self.tokenizer.padding_side == "left" else 0
            for start, end, score in zip(starts, ends, scores):
                char_start, char_end = _char_span(chunk, int(start) - shift, int(end) - shift, align_to_words)
                answers.append(
                    {
                        "score": float(score),
                        "start": int(char_start),
                        "end": int(char_end),
                        "answer": chunk["context"][char_start:char_end],
                    }
                )
        if handle_impossible_answer:
            answers.append({"score": min_null_score, "start": 0, "end": 0, "answer": ""})
        answers = sorted(answers, key=lambda answer: answer["score"], reverse=True)[:top_k]
        if len(answers) == 1:
            return answers[0]
        return answers


def register() -> None:
    """Register question-answering with transformers."""
    # pipeline() refuses tasks listed as removed before it consults the registry.
    REMOVED_TASKS.pop(TASK, None)
    if PIPELINE_REGISTRY.supported_tasks.get(TASK, {}).get("impl") is QuestionAnsweringPipeline:
        return
    PIPELINE_REGISTRY.register_pipeline(
        TASK,
        pipeline_class=QuestionAnsweringPipeline,
        pt_model=AutoModelForQuestionAnswering,
        default=None,
        type="text",
    )
