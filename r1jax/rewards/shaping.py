"""Length-aware reward shaping, each off unless a config lists it.

Owns ``cosine_scaled_reward`` (open-r1's idea, from "Demystifying Long Chain-of-Thought
Reasoning in LLMs", arXiv 2502.03373), ``repetition_penalty_reward`` (same source) and
``overlong_penalty_reward`` (DAPO's soft overlong punishment, arXiv 2503.14476, eq. 13).

Length is measured in tokens when the batch carries ``completion_ids`` (TRL passes it, and so does
``compose.HostRewardBridge``); otherwise ``cosine_scaled_reward`` falls back to characters, and
``overlong_penalty_reward``, which is defined against ``max_completion_length`` in tokens, refuses.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from r1jax.rewards.accuracy import accuracy_reward
from r1jax.rewards.common import completion_texts
from r1jax.rewards.task import task_reward

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_TOKEN = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")


def _lengths(texts: list[str], columns: dict[str, Any]) -> list[int] | None:
    ids = columns.get("completion_ids")
    if ids is None:
        return None
    ids = list(ids)
    if len(ids) != len(texts):
        raise ValueError(f"completion_ids has {len(ids)} rows for {len(texts)} completions")
    return [len(x) for x in ids]


def cosine_scaled_reward(
    completions: Sequence[Any],
    *,
    min_value_wrong: float = -1.0,
    max_value_wrong: float = -0.5,
    min_value_correct: float = 0.5,
    max_value_correct: float = 1.0,
    max_len: int = 1000,
    exceed_length: float | None = None,
    **columns: Any,
) -> list[float | None]:
    """Correctness scaled by length along a half cosine. Correct means the row's built-in task
    verifier accepts the answer (``task_reward``: a Countdown answer must use the given numbers,
    not just reach the target) or, for other rows, ``accuracy_reward``.

    With ``p = min(L / max_len, 1)`` and ``c = cos(pi * p)``:
    correct: ``min_value_correct + (max_value_correct - min_value_correct) * (1 + c) / 2``
    (shorter right answers earn more); wrong: ``max_value_wrong + (min_value_wrong -
    max_value_wrong) * (1 + c) / 2`` (shorter wrong answers are punished more, so the model is
    pushed to think longer when it is wrong).

    A completion cut off at the budget gets the wrong end point, ``max_value_wrong``, the mildest
    penalty: better than any short wrong answer, so "never answer, run to the limit" pays when
    the model is unsure. The paper adds an exceed-length penalty for it: ``exceed_length``, the
    reward of every completion cut off, whatever its answer (the RL stage sets it to
    ``min_value_wrong``; open-r1 has none, the default). Cut off: the batch's
    ``completion_truncated`` column (``compose.HostRewardBridge`` passes it: the budget filled
    without a stop token or stop string), else a length of ``max_len`` or more.

    Args:
      completions: [B] strings or chat-message lists.
      max_len: length at which the cosine reaches its end point (tokens, or characters when the
        batch has no ``completion_ids``).
      exceed_length: the reward of a completion cut off (None: the cosine's end point).
      **columns: needs ``solution`` (see ``accuracy_reward``); uses ``completion_ids`` and
        ``completion_truncated`` if present.
    Returns:
      [B] floats; ``None`` where neither can check the row.
    """
    if max_len <= 0:
        raise ValueError(f"cosine_scaled_reward: max_len must be > 0, got {max_len}")
    texts = completion_texts(completions)
    correct = task_reward(texts, **columns) if "task" in columns else [None] * len(texts)
    if None in correct:
        by_answer = accuracy_reward(texts, **columns)
        correct = [a if c is None else c for c, a in zip(correct, by_answer, strict=True)]
    lengths = _lengths(texts, columns) or [len(t) for t in texts]
    cut = columns.get("completion_truncated")
    if cut is None:
        cut = [n >= max_len for n in lengths]
    rewards: list[float | None] = []
    for acc, length, cut_off in zip(correct, lengths, cut, strict=True):
        if acc is None:
            rewards.append(None)
            continue
        if exceed_length is not None and cut_off:
            rewards.append(float(exceed_length))
            continue
        cosine = math.cos(math.pi * min(length / max_len, 1.0))
        if acc > 0:
            low, high = min_value_correct, max_value_correct
        else:  # swapped ends: the short end is the most negative
            low, high = max_value_wrong, min_value_wrong
        rewards.append(low + (high - low) * 0.5 * (1.0 + cosine))
    return rewards


def repetition_penalty_reward(
    completions: Sequence[Any], *, ngram_size: int = 3, max_penalty: float = -1.0, **columns: Any
) -> list[float]:
    """``max_penalty * (1 - distinct n-grams / total n-grams)``; 0.0 below ``ngram_size`` tokens.

    Tokens are whitespace-separated runs, lower-cased, except that each CJK character is its own
    token (Chinese has no spaces).

    Args:
      completions: [B] strings or chat-message lists.
      ngram_size: n of the n-grams compared.
      max_penalty: the reward of a completion that is one n-gram repeated (must be <= 0).
      **columns: ignored.
    Returns:
      [B] floats in [max_penalty, 0].
    """
    if max_penalty > 0:
        raise ValueError(f"repetition_penalty_reward: max_penalty must be <= 0, got {max_penalty}")
    if ngram_size < 1:
        raise ValueError(f"repetition_penalty_reward: ngram_size must be >= 1, got {ngram_size}")
    rewards = []
    for text in completion_texts(completions):
        tokens = _TOKEN.findall(text.lower())
        if len(tokens) < ngram_size:
            rewards.append(0.0)
            continue
        ngrams = [tuple(tokens[i : i + ngram_size]) for i in range(len(tokens) - ngram_size + 1)]
        rewards.append(max_penalty * (1.0 - len(set(ngrams)) / len(ngrams)))
    return rewards


def overlong_penalty_reward(
    completions: Sequence[Any],
    *,
    max_completion_length: int,
    soft_punish_cache: int,
    **columns: Any,
) -> list[float]:
    """DAPO's soft overlong punishment on the completion's token length ``L``.

    ``0`` if ``L <= max_completion_length - soft_punish_cache``; ``((max_completion_length -
    soft_punish_cache) - L) / soft_punish_cache`` (linear from 0 to -1) up to
    ``max_completion_length``; ``-1`` beyond it.

    Args:
      completions: [B] strings or chat-message lists (only counted, via ``completion_ids``).
      max_completion_length: L_max, in tokens (as the sampler's ``max_new_tokens``).
      soft_punish_cache: L_cache, the width of the linear zone, in tokens (0 < L_cache <= L_max).
      **columns: needs ``completion_ids`` ([B] token-id lists).
    Returns:
      [B] floats in [-1, 0].
    """
    if not 0 < soft_punish_cache <= max_completion_length:
        raise ValueError(
            "overlong_penalty_reward: need 0 < soft_punish_cache <= max_completion_length, got "
            f"{soft_punish_cache} and {max_completion_length}"
        )
    texts = completion_texts(completions)
    lengths = _lengths(texts, columns)
    if lengths is None:
        raise ValueError(
            "overlong_penalty_reward needs a `completion_ids` column (token ids of each "
            "completion); TRL and r1jax's RL stage pass it."
        )
    start = max_completion_length - soft_punish_cache
    return [
        0.0
        if n <= start
        else (start - n) / soft_punish_cache
        if n <= max_completion_length
        else -1.0
        for n in lengths
    ]
