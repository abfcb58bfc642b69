"""The built-in synthetic reasoning tasks: registry, held-out split, dataset generation, verify.

Every row is a dict with the same keys, whatever the task::

    {"prompt": question text, "solution": canonical answer string, "task": task name,
     "steps": step-by-step solution, "terse": one-line solution, "meta": task-specific dict}

``solution`` is the gold answer the accuracy reward compares with (TRL's column name); ``meta``
carries what the task's verifier needs beyond it (Countdown's numbers, target and rule).

Notable choices:
- The train/eval split is a property of the *problem*, not of the draw: a problem is held out iff
  the SHA-256 of its key (which ignores operand order for commutative problems) falls below
  ``eval_fraction``. Train and eval sets are therefore disjoint for any seeds and sizes, and a
  corpus built from train problems never contains an eval problem. A problem every training
  text states in passing (`arithmetic.key_can_hold_out`: a single-digit sum, which each column
  addition writes) is never drawn for eval.
- Generation is a single ``random.Random`` stream seeded by (task, split, stream, seed) through
  Python's string seeding (SHA-512 based, so identical across processes and hash seeds on a
  given Python version). Draws that land in the other split are discarded; duplicates are
  discarded when ``unique``.
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections.abc import Callable, Sequence
from typing import Protocol

from r1jax.data.arithmetic import ArithmeticTask, key_can_hold_out
from r1jax.data.countdown import CountdownTask

SPLITS = ("train", "eval")


class Task(Protocol):
    """What a synthetic task provides (see ArithmeticTask, CountdownTask)."""

    name: str

    def sample(self, rng: random.Random) -> tuple[str, dict]: ...

    def verify(self, answer: str, row: dict) -> bool: ...

    def long_cot(self, row: dict, rng: random.Random, mistake_rate: float) -> str: ...


TASKS: dict[str, type] = {"arithmetic": ArithmeticTask, "countdown": CountdownTask}


def make_task(name: str, **knobs) -> Task:
    """A task by name with difficulty knobs, e.g. ``make_task("arithmetic", max_digits=4)``."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; built-in tasks are {sorted(TASKS)}")
    return TASKS[name](**knobs)


@functools.cache
def _default_task(name: str) -> Task:
    return make_task(name)


def _as_task(task: str | Task) -> Task:
    # verify() runs once per completion; reuse one default-knob instance per name.
    return _default_task(task) if isinstance(task, str) else task


# The share of each built-in task's problems held out for evaluation (every stage's default).
EVAL_FRACTION = 0.1


def split_of(key: str, eval_fraction: float) -> str:
    """Return "eval" iff the problem key's SHA-256, read as a number in [0, 1), is below
    ``eval_fraction``, else "train"."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64
    return "eval" if h < eval_fraction else "train"


def all_train(keys: Sequence[str], eval_fraction: float = EVAL_FRACTION) -> bool:
    """Whether every problem key in `keys` is in the train split, or a problem never drawn for
    eval (`key_can_hold_out`): a text stating only these gives away no held-out answer."""
    return all(split_of(k, eval_fraction) == "train" or not key_can_hold_out(k) for k in keys)


def make_dataset(
    task: str | Task,
    n: int,
    *,
    seed: int,
    split: str = "train",
    eval_fraction: float = EVAL_FRACTION,
    unique: bool = True,
    stream: str = "problems",
    also_train: Callable[[dict], Sequence[str]] | None = None,
) -> list[dict]:
    """Generate ``n`` rows of one task from one split, deterministically.

    Args:
      task: a task name (default knobs) or a task object (``make_task(name, **knobs)``).
      n: number of rows.
      seed: the random seed; the same arguments always give the same rows.
      split: "train" or "eval"; the two never share a problem (see module docstring).
      eval_fraction: share of the problem space held out; must match between the two splits.
      unique: no problem twice in the returned rows.
      stream: names the consumer, so e.g. the pretraining corpus and the RL prompts draw
        independent problems from the same seed.
      also_train: row -> the keys of other problems the consumer's text of the row will state
        with their answers (a check by the inverse operation); a train row is drawn again when
        one of them is held out, so no training text gives away an eval answer.
    Returns:
      ``n`` row dicts (keys in the module docstring).
    """
    task = _as_task(task)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"{task.name}|{split}|{stream}|{seed}")
    rows, seen = [], set()
    # Give up loudly once this many draws in a row found nothing new: the split is exhausted.
    patience = 1000 + int(500 / min(eval_fraction, 1.0 - eval_fraction))
    misses = 0
    while len(rows) < n and misses < patience:
        key, row = task.sample(rng)
        stated = also_train(row) if also_train is not None and split == "train" else ()
        if (
            split_of(key, eval_fraction) != split
            or (split == "eval" and not key_can_hold_out(key))
            or (unique and key in seen)
            or not all_train(stated, eval_fraction)
        ):
            misses += 1
            continue
        misses = 0
        seen.add(key)
        rows.append(row)
    if len(rows) < n:
        raise ValueError(
            f"only found {len(rows)} distinct {split} problems for {task} (asked for {n}"
            + ("; those whose text states a held-out problem are left out" if also_train else "")
            + (
                "; those every training text states, e.g. 8 + 9, are never held out"
                if split == "eval" and task.name == "arithmetic"
                else ""
            )
            + "); "
            "raise the difficulty knobs, ask for fewer rows, or pass unique=False"
        )
    return rows


def verify(task: str | Task, completion_answer: str, row: dict) -> bool:
    """Exact check of an extracted answer against a row of a built-in task.

    Args:
      task: the task name (``row["task"]``) or task object.
      completion_answer: the answer text only (e.g. the inside of ``<answer>…</answer>``).
      row: the dataset row the completion answers.
    Returns:
      True iff correct. Never raises on hostile answers (non-strings, huge or nested input).
    """
    task = _as_task(task)
    if not isinstance(completion_answer, str):
        return False
    return bool(task.verify(completion_answer, row))
