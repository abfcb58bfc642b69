"""Reward for the built-in synthetic tasks (arithmetic, Countdown): their exact verifiers.

Owns ``task_reward``: the answer is extracted as ``accuracy_reward`` does (last ``<answer>``
body, else last ``\\boxed{}``), then checked by ``r1jax.data.tasks.verify`` for the row's task,
which sees the whole row (Countdown needs ``meta``: numbers, target, rule).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from r1jax.rewards.accuracy import extract_answer
from r1jax.rewards.common import column, completion_texts, rows


def task_reward(completions: Sequence[Any], **columns: Any) -> list[float | None]:
    """1.0 when the row's task verifier accepts the completion's answer, else 0.0.

    Args:
      completions: [B] strings or chat-message lists.
      **columns: needs ``task`` ([B] task names, e.g. ``"countdown"``); the verifier reads the
        other columns of the row it needs (``solution``, ``meta``).
    Returns:
      [B] floats in {0.0, 1.0}; ``None`` for rows whose task is None or not a built-in task
      (the loaders label file rows "math", "code", "chat": other rewards score those).
    """
    # Imported here: the data layer is a sibling, and a lazy import keeps either importable alone.
    from r1jax.data import tasks as task_lib

    texts = completion_texts(completions)
    names = column(columns, "task", len(texts), reward="task_reward")
    rewards: list[float | None] = []
    for text, name, row in zip(texts, names, rows(columns, len(texts)), strict=True):
        if name is None or name not in task_lib.TASKS:  # e.g. "math" rows of a GSM8K file
            rewards.append(None)
            continue
        answer = extract_answer(text)
        if answer is None:
            rewards.append(0.0)
            continue
        rewards.append(1.0 if task_lib.verify(name, answer, row) else 0.0)
    return rewards
