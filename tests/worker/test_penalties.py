"""OpenAI's frequency and presence penalties (:mod:`worker.penalties`), against their definition."""

from __future__ import annotations

import pytest
import torch

from producers.errors import InvalidParams
from worker.penalties import OutputTokenPenalty, check_penalties, penalty_processor


def openai_penalised(logits: list[float], output: list[int], frequency: float, presence: float) -> list[float]:
    """OpenAI's definition, token by token: ``mu[j] - c[j] * frequency - float(c[j] > 0) * presence``."""
    return [mu - output.count(j) * frequency - (output.count(j) > 0) * presence for j, mu in enumerate(logits)]


def test_penalties_count_the_output_only_as_openai_defines_them():
    logits = [0.5, -1.0, 2.0, 0.0, 1.5]
    prompt, output = [1, 1, 4], [2, 2, 3, 2]
    processor = OutputTokenPenalty(0.7, 0.4, prompt_length=len(prompt))
    got = processor(torch.tensor([prompt + output]), torch.tensor([logits]))
    assert torch.allclose(got, torch.tensor([openai_penalised(logits, output, 0.7, 0.4)]))
    assert torch.equal(processor(torch.tensor([prompt]), torch.tensor([logits])), torch.tensor([logits]))


def test_without_a_prompt_length_it_follows_each_generate_call():
    logits = torch.tensor([[0.0] * 5, [1.0] * 5])
    processor = OutputTokenPenalty(1.0, 0.0)
    first = torch.tensor([[1, 2], [3, 3]])
    assert torch.equal(processor(first, logits), logits)  # a first call: all prompt
    step = torch.cat([first, torch.tensor([[4], [4]])], dim=1)
    expected = logits.clone()
    expected[:, 4] -= 1.0
    assert torch.equal(processor(step, logits), expected)
    # Another generate call (the next item of one pipeline call): its prompt is not output.
    other = torch.tensor([[1, 2, 4]])
    assert torch.equal(processor(other, logits[:1]), logits[:1])


def test_no_processor_for_zero_penalties_and_checks_name_what_is_wrong():
    assert penalty_processor({}) is None and penalty_processor({"frequency_penalty": 0}) is None
    assert penalty_processor({"presence_penalty": 0.5}) is not None
    check_penalties("text-generation", {"frequency_penalty": -2, "presence_penalty": 2.0})
    with pytest.raises(InvalidParams, match="'frequency_penalty' must be a number from -2 to 2"):
        check_penalties("text-generation", {"frequency_penalty": 2.5})
    with pytest.raises(InvalidParams, match="'presence_penalty' must be"):
        check_penalties("text-generation", {"presence_penalty": "high"})
    with pytest.raises(InvalidParams, match="'presence_penalty' applies to text-generation deployments only"):
        check_penalties("summarization", {"presence_penalty": 0.5})
