"""Deterministic English sentences of 5 to 25 words for the demo and the benchmarks."""

from __future__ import annotations

import random

_SUBJECTS = ["the old fisherman", "a young engineer", "my neighbour", "the city council", "our small team",
             "the orchestra", "a curious child", "the night train", "the research lab", "an elderly farmer",
             "the football club", "a street musician", "the hospital staff", "the bakery", "the mountain village"]
_VERBS = ["repaired", "celebrated", "discovered", "painted", "cancelled", "announced", "cooked", "visited",
          "studied", "built", "sold", "photographed", "ignored", "welcomed", "measured"]
_OBJECTS = ["a wooden boat", "the new bridge", "an ancient map", "the spring festival", "a quiet garden",
            "the solar panels", "a chocolate cake", "the museum", "a rare bird", "the harbour lights",
            "an electric bicycle", "the library roof", "a vintage camera", "the river path", "a chess tournament"]
_TAILS = ["before the storm arrived", "with great care", "despite the heavy rain", "on a sunny morning",
          "after many long months", "for the whole town", "without telling anyone", "in the early evening",
          "while the market was busy", "to everyone's surprise", "during the winter holidays",
          "near the old lighthouse", "as the sun went down", "with help from volunteers", "at the last minute"]


def sentences(count: int, *, seed: int = 0) -> list[str]:
    """``count`` sentences between 5 and 25 words long, the same for the same seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        words = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}".split()
        while len(words) < 25 and rng.random() < 0.6:
            words += rng.choice(_TAILS).split()
        out.append(" ".join(words[:25]))
    return out
