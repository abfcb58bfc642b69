"""Format rewards: is the completion laid out as R1-Zero's template asks?

Owns ``format_reward`` (all or nothing) and ``tag_count_reward`` (partial credit, the idea of
open-r1's reward of the same name). Notable choices:

- ``format_reward`` is 1.0 exactly when the text is ``<think>T</think>`` then ``<answer>A</answer>``
  with only whitespace before, between and after; each of the four tags appears once; and both ``T``
  and ``A`` contain something other than whitespace (an empty block is not reasoning or an answer).
- ``tag_count_reward`` gives 0.25 for each of ``<think>``, ``</think>``, ``<answer>``, ``</answer>``
  that appears exactly once. Unlike open-r1 it does not require newlines around the tags, because
  the R1-Zero template in the paper does not put them there.
- Both accept ``prefix``: text the prompt already ended with (e.g. ``"<think>"`` when the template
  pre-fills the opening tag), prepended to the completion before checking.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import Any

from r1jax.rewards.common import completion_texts

_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_LAYOUT = re.compile(r"\s*<think>(.*)</think>\s*<answer>(.*)</answer>\s*", re.DOTALL)


def _is_well_formed(text: str) -> bool:
    if any(text.count(tag) != 1 for tag in _TAGS):
        return False
    match = _LAYOUT.fullmatch(text)
    return bool(match) and _has_text(match.group(1)) and _has_text(match.group(2))


def _has_text(block: str) -> bool:
    """Whether a block holds something visible: not only whitespace or format characters
    (zero-width spaces and joiners, a BOM), which str.strip leaves."""
    return any(not c.isspace() and unicodedata.category(c) != "Cf" for c in block)


def format_reward(completions: Sequence[Any], *, prefix: str = "", **columns: Any) -> list[float]:
    """1.0 for exactly one non-empty think block then one non-empty answer block, else 0.0.

    Args:
      completions: [B] strings or chat-message lists.
      prefix: text the prompt ended with, prepended before checking (e.g. ``"<think>"``).
      **columns: ignored.
    Returns:
      [B] floats in {0.0, 1.0}.
    """
    return [1.0 if _is_well_formed(prefix + t) else 0.0 for t in completion_texts(completions)]


def tag_count_reward(
    completions: Sequence[Any], *, prefix: str = "", **columns: Any
) -> list[float]:
    """0.25 for each of the four format tags that appears exactly once.

    Args:
      completions: [B] strings or chat-message lists.
      prefix: text the prompt ended with, prepended before counting.
      **columns: ignored.
    Returns:
      [B] floats in {0, 0.25, 0.5, 0.75, 1.0}.
    """
    texts = completion_texts(completions)
    return [sum(0.25 for tag in _TAGS if (prefix + t).count(tag) == 1) for t in texts]
