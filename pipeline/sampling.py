"""The one seeded sampler of items (corpus texts, task items), light enough for any module to import."""

from __future__ import annotations

import random


def seeded_sample(items: list, n: int, seed: int) -> list:
    """n items drawn by seed, kept in their original order (all of them when there are fewer)."""
    if len(items) <= n:
        return list(items)
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), n))]
