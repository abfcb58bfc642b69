"""Math accuracy reward: extract the final answer, check it against the ground truth.

Owns ``accuracy_reward`` and the answer extraction it relies on (``extract_answer``,
``answers_match``). Notable choices:

- **Where the answer is.** The body of the last ``<answer>…</answer>``; if that body holds a
  ``\\boxed{…}``, just the box. Without an answer block, the last ``\\boxed{…}`` anywhere. Neither
  → no answer → 0.0. An answer longer than ``MAX_ANSWER_CHARS`` scores 0.0 (no final answer is
  that long, and sympy on megabytes of text would stall the trainer).
- **How it is compared.** Both sides go through math-verify (``math_verify.parse`` then
  ``math_verify.verify``; gold first, since ``verify`` is not symmetric). A bare answer such as
  ``\\frac{\\sqrt2}{2}`` or ``(0,1]`` is wrapped as ``\\boxed{…}`` before parsing, because
  math-verify's LaTeX extractor only looks inside delimiters; text with its own ``$…$`` is parsed
  as is. This gives fractions, radicals, sets (``\\{1,2\\}`` = ``2, 1``), intervals, percentages
  (``50\\%`` = ``0.5`` when the gold is the percentage), thousands separators (``1,000`` =
  ``1000``), and equations (``x=3`` = ``3``), all with math-verify's semantics.
- **Multiple choice.** A gold answer that is one capital letter ``A``–``J`` (optionally in
  parentheses) switches to letter matching: the prediction's letter is read from ``B``, ``(B)``,
  ``\\text{(B)}``, ``B) 42`` or, failing that, math-verify's ``StringExtractionConfig`` (which
  understands "the answer is B").
- **Gold that math-verify cannot parse** (e.g. a word) is compared as text: case-folded, with
  whitespace, ``$`` and ``\\text{}`` removed. An empty or missing solution gives ``None`` ("not
  applicable"), which the composition skips.
- **Timeouts.** math-verify bounds each parse/verify with ``signal.alarm``, which only works in a
  process's main thread. Off the main thread (e.g. inside a ``jax.pure_callback``) the timeout is
  disabled; the composition's process pool runs scoring in worker main threads, where it is on.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from typing import Any

from math_verify import (
    ExprExtractionConfig,
    LatexExtractionConfig,
    StringExtractionConfig,
    parse,
    verify,
)

from r1jax.rewards.common import answer_region, column, completion_texts, last_boxed

logger = logging.getLogger(__name__)

MAX_ANSWER_CHARS = 1000
PARSE_TIMEOUT_S = 3  # per math-verify parse/verify call (seconds), main thread only

_LETTERS = "ABCDEFGHIJ"
_LETTER_GOLD = re.compile(r"^\s*\(?\s*([A-J])\s*\)?\s*\.?\s*$")
_LETTER_PRED = re.compile(r"^\(?\s*([A-Ja-j])\s*\)?(?:[.:)\s]|$)")
_MATH_DOLLAR = re.compile(r"(?<!\\)\$")  # a math delimiter; `\$` is a currency sign
_LATEX_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textit|boxed)\s*\{([^{}]*)\}")
_MATH_CONFIG = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())
_LETTER_CONFIG = (StringExtractionConfig(strings=tuple(_LETTERS)),)
_warned_no_timeout = False


def _timeout() -> int | None:
    global _warned_no_timeout
    if threading.current_thread() is threading.main_thread():
        return PARSE_TIMEOUT_S
    if not _warned_no_timeout:
        logger.warning(
            "accuracy_reward is running off the main thread, so math-verify's signal-based "
            "timeout is disabled; score through build_reward_fn(num_workers>0) to keep it."
        )
        _warned_no_timeout = True
    return None


def extract_answer(text: str) -> str | None:
    """Completion text -> the final answer string, or None when there is none.

    Order: last ``<answer>`` body (its last ``\\boxed{}`` if it has one), else last ``\\boxed{}``.
    """
    region = answer_region(text)
    if region is None:
        return last_boxed(text)
    boxed = last_boxed(region)
    return boxed if boxed is not None else region


def _strip_delimiters(s: str) -> str:
    s = s.strip()
    for left, right in (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$")):
        if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
            inner = s[len(left) : len(s) - len(right)]
            if "$" not in inner:
                return inner.strip()
    return s.rstrip(".").strip()


def _parse_math(s: str) -> list[Any]:
    """Answer string -> math-verify parse result ([] when nothing parsed)."""
    timeout = _timeout()
    if _MATH_DOLLAR.search(s) or "\\(" in s or "\\[" in s:
        # Prose with delimited math: let math-verify find the (last) expression itself.
        return parse(s, list(_MATH_CONFIG), parsing_timeout=timeout)
    return parse("\\boxed{" + s + "}", list(_MATH_CONFIG), parsing_timeout=timeout)


def _plain(s: str) -> str:
    s = _LATEX_WRAPPER.sub(r"\1", s)
    return re.sub(r"[\s$]", "", s).casefold()


def _letter(s: str) -> str | None:
    plain = _LATEX_WRAPPER.sub(r"\1", _LATEX_WRAPPER.sub(r"\1", s)).replace("$", "").strip()
    match = _LETTER_PRED.match(plain)
    if match:
        return match.group(1).upper()
    found = parse(s, list(_LETTER_CONFIG), parsing_timeout=_timeout())
    strings = [x for x in found if isinstance(x, str) and x.upper() in _LETTERS]
    return strings[0].upper() if strings else None


def answers_match(gold: str, predicted: str) -> bool:
    """Whether ``predicted`` (an extracted answer) equals ``gold`` (see the module docstring).

    Args:
      gold: the ground truth: a bare answer, ``$…$`` math, a full solution with ``\\boxed{}``, or
        a multiple-choice letter.
      predicted: the answer string from ``extract_answer``.
    """
    gold_boxed = last_boxed(gold)
    gold = _strip_delimiters(gold_boxed if gold_boxed is not None else gold)
    predicted = _strip_delimiters(predicted)
    letter = _LETTER_GOLD.match(gold)
    if letter:
        return _letter(predicted) == letter.group(1)
    gold_parsed = _parse_math(gold)
    if not gold_parsed:
        return bool(gold) and _plain(gold) == _plain(predicted)
    predicted_parsed = _parse_math(predicted)
    if not predicted_parsed:
        return False
    return bool(verify(gold_parsed, predicted_parsed, timeout_seconds=_timeout()))


def accuracy_reward(completions: Sequence[Any], **columns: Any) -> list[float | None]:
    """1.0 when the completion's final answer equals the solution, else 0.0.

    Args:
      completions: [B] strings or chat-message lists.
      **columns: needs ``solution`` ([B] ground-truth answers; str or number); others are ignored.
    Returns:
      [B] floats in {0.0, 1.0}; ``None`` for rows whose solution is empty or missing.
    """
    texts = completion_texts(completions)
    solutions = column(columns, "solution", len(texts), reward="accuracy_reward")
    rewards: list[float | None] = []
    for text, solution in zip(texts, solutions, strict=True):
        if solution is None or not str(solution).strip():
            rewards.append(None)
            continue
        answer = extract_answer(text)
        if answer is None or not answer.strip() or len(answer) > MAX_ANSWER_CHARS:
            rewards.append(0.0)
            continue
        rewards.append(1.0 if answers_match(str(solution), answer) else 0.0)
    return rewards
