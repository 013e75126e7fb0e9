"""Evaluation items (read by distill4all.evalset) and the seeded subset eval scores."""

from __future__ import annotations

import random

from distill4all.evalset import Item, load_items

__all__ = ["Item", "load_items", "pick"]


def pick(items: list[Item], limit: int | None, seed: int) -> list[Item]:
    """A seeded subset, in the file's order (the whole set when limit is None or larger)."""
    if limit is None or limit >= len(items):
        return items
    keep = set(random.Random(seed).sample(range(len(items)), limit))
    return [it for i, it in enumerate(items) if i in keep]
