"""Shared plumbing for reward functions: completion text, column access, tag regions.

Every reward in this package has TRL's reward signature, ``fn(completions, **columns) ->
list[float | None]``. This module owns the conventions they share:

- A completion is a string, or a chat-message list such as ``[{"role": "assistant", "content":
  "..."}]`` (TRL's conversational format). The text scored is the content of the last assistant
  message (the last message when none is marked assistant); list-of-parts content
  (``[{"type": "text", "text": ...}]``) is joined. ``None``, bytes with invalid UTF-8 and any other
  malformed value become text too (``""`` or a lossy decode), so they score 0 rather than crash.
- A column is a per-row list with one entry per completion, as TRL passes dataset columns. A
  scalar is broadcast to every row (handy for ``language="en"``). A missing required column or a
  length mismatch is a configuration error and raises one ``ValueError`` naming the column.
- ``None`` in a reward's output means "not applicable to this row" (TRL's convention); the
  composition in ``compose.py`` ignores it when summing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

# Completions longer than this are cut before any regex or parser sees them: a runaway sample
# must cost bounded host time. 1 MiB of text is far beyond any max_completion_length in use.
MAX_COMPLETION_CHARS = 1 << 20


def completion_text(completion: Any) -> str:
    """One completion (string or chat-message list) -> its text, never raising.

    Args:
      completion: ``str``; a list of ``{"role", "content"}`` dicts; a single such dict; ``bytes``;
        or anything else (treated as malformed and scored as empty text).
    Returns:
      The text to score, at most ``MAX_COMPLETION_CHARS`` characters.
    """
    if isinstance(completion, str):
        text = completion
    elif isinstance(completion, bytes | bytearray):
        text = bytes(completion).decode("utf-8", errors="replace")
    elif isinstance(completion, Mapping):
        text = _content_text(completion.get("content"))
    elif isinstance(completion, Sequence) and completion:
        messages = [m for m in completion if isinstance(m, Mapping)]
        assistant = [m for m in messages if m.get("role") == "assistant"]
        chosen = assistant or messages
        text = _content_text(chosen[-1].get("content")) if chosen else ""
    else:
        text = ""
    return text[:MAX_COMPLETION_CHARS]


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, bytes | bytearray):
        return bytes(content).decode("utf-8", errors="replace")
    if isinstance(content, Sequence):
        parts = [p.get("text") for p in content if isinstance(p, Mapping)]
        return "".join(p for p in parts if isinstance(p, str))
    return ""


def completion_texts(completions: Sequence[Any]) -> list[str]:
    """[B] completions -> [B] texts (see ``completion_text``)."""
    if isinstance(completions, str | bytes | Mapping) or not hasattr(completions, "__len__"):
        raise ValueError(
            "completions must be a list with one entry per sample (strings or chat-message "
            f"lists), got {type(completions).__name__}"
        )
    return [completion_text(c) for c in completions]


def column(columns: Mapping[str, Any], name: str, n: int, *, reward: str) -> list[Any]:
    """Fetch dataset column ``name`` as a list of length ``n``.

    Args:
      columns: the ``**columns`` a reward function received.
      name: the column to fetch.
      n: number of completions in the batch.
      reward: the calling reward's name, for the error message.
    Returns:
      ``[n]`` values; a scalar (str, number, None) is broadcast to every row.
    Raises:
      ValueError: the column is missing, or is a list whose length is not ``n``.
    """
    if name not in columns:
        raise ValueError(
            f"{reward} needs a `{name}` column, one entry per completion; the batch has columns "
            f"{sorted(columns)}. Map your dataset field to `{name}` in the data config."
        )
    value = columns[name]
    if getattr(value, "ndim", None) == 0:  # a numpy scalar or 0-d array: one value for all
        value = value.item()
    if value is None or isinstance(value, str | bytes | int | float):
        return [value] * n
    try:
        values = python_list(value)
    except TypeError:
        raise ValueError(
            f"{reward}: column `{name}` must be a list, one entry per completion, "
            f"got {type(value).__name__}"
        ) from None
    if len(values) != n:
        raise ValueError(
            f"{reward}: column `{name}` has {len(values)} entries for {n} completions; "
            "each completion needs its own row (repeat the prompt's value for each sample)."
        )
    return values


def python_list(value: Any) -> list[Any]:
    """A column as a list of Python values: numpy, pandas and pyarrow columns iterate as their
    own scalar types (a pyarrow StringScalar is no str: a task name compared unequal)."""
    if hasattr(value, "to_pylist"):  # pyarrow
        return value.to_pylist()
    if hasattr(value, "tolist"):  # numpy, pandas
        return value.tolist()
    return list(value)


def is_per_row(value: Any, n: int) -> bool:
    """Whether a column value holds one entry per completion (a list, tuple, numpy, pandas or
    pyarrow column of length `n`) rather than one value for all (a scalar, a dict, an object
    such as TRL's ``trainer_state``)."""
    return (
        hasattr(value, "__len__")
        and hasattr(value, "__getitem__")
        and not isinstance(value, str | bytes | Mapping)
        and getattr(value, "ndim", 1) != 0  # (a 0-d array has no len())
        and len(value) == n
    )


def rows(columns: Mapping[str, Any], n: int) -> list[dict[str, Any]]:
    """Columns -> one dict per completion. Columns of length ``n`` (`is_per_row`) are split per
    row; any other value (a scalar, or an object such as TRL's ``trainer_state``) is shared by
    every row."""
    per_row = {k: python_list(v) for k, v in columns.items() if is_per_row(v, n)}
    shared = {k: v for k, v in columns.items() if k not in per_row}
    return [{**shared, **{k: v[i] for k, v in per_row.items()}} for i in range(n)]


# --- tag regions -----------------------------------------------------------------------------

# The tag regions are found with str.find rather than a lazy regex: a hostile completion with
# thousands of opening tags and no closing one made `<think>(.*?)</think>` rescan to the end from
# every opening, quadratic in the text (minutes for a 300 kB output).


def think_region(text: str) -> str:
    """The chain of thought: the first ``<think>…</think>`` body.

    When the prompt itself ended with ``<think>`` (so the completion has only the closing tag),
    everything before the first ``</think>`` is the chain of thought. With no think tags at all the
    whole text is returned: an untagged completion is all reasoning as far as language goes.
    """
    start = text.find("<think>")
    if start >= 0:
        end = text.find("</think>", start + len("<think>"))
        if end >= 0:
            return text[start + len("<think>") : end]
    if "</think>" in text and "<think>" not in text:
        return text.split("</think>", 1)[0]
    return text


def answer_region(text: str) -> str | None:
    """The body of the last ``<answer>…</answer>``, or None when there is none.

    Bodies pair each ``<answer>`` with the first ``</answer>`` after it, left to right (as a
    non-overlapping lazy match would); the last such pair wins.
    """
    last, pos = None, 0
    while (start := text.find("<answer>", pos)) >= 0:
        end = text.find("</answer>", start + len("<answer>"))
        if end < 0:
            break
        last, pos = text[start + len("<answer>") : end], end + len("</answer>")
    return last


_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
# What may stand between two boxes of one answer ("\\boxed{2} and \\boxed{3}", "$\\boxed{2}$,
# $\\boxed{3}$"), once spaces, "$" and LaTeX spacing are removed.
_BOX_SPACING = re.compile(r"[\s$]|\\[,;:! ]|\\q?quad\b")
_BOXES_JOINED_BY = re.compile(r",|;|&|and|,and|\\text\{(?:and|,)\}")


def closed_boxes(text: str) -> list[tuple[int, int, str]]:
    """(start, end, stripped content) of each ``\\boxed{…}`` / ``\\fbox{…}`` of `text` whose brace
    closes, in order of their starts (boxes inside boxes included)."""
    close, stack = {}, []  # each "{" -> its "}", in one pass (a scan per box is quadratic in a
    for j, c in enumerate(text):  # degenerate completion of thousands of unclosed boxes)
        if c == "{":
            stack.append(j)
        elif c == "}" and stack:
            close[stack.pop()] = j
    return [
        (m.start(), close[m.end() - 1] + 1, text[m.end() : close[m.end() - 1]].strip())
        for m in _BOX.finditer(text)
        if m.end() - 1 in close
    ]


def final_boxed(text: str) -> str | None:
    """`last_boxed(text)`, or, when the boxes just before it are joined to it by "and" or commas
    (an answer of several values: "\\boxed{2} and \\boxed{3}"), all of them as one list, "2, 3"
    (math-verify reads it as the set or tuple a gold "2, 3" is)."""
    last = last_boxed(text)
    if last is None:
        return None
    boxes = closed_boxes(text)
    if not boxes or not last.strip() or boxes[-1][2] != last.strip():  # ("\\boxed 5": no list)
        return last
    run = [boxes[-1]]
    for box in reversed(boxes[:-1]):
        between = text[box[1] : run[0][0]]
        if not box[2] or not _BOXES_JOINED_BY.fullmatch(_BOX_SPACING.sub("", between)):
            break  # (an empty box is no value of the list)
        run.insert(0, box)
    return last if len(run) == 1 else ", ".join(content for _, _, content in run)


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{…}`` (or ``\\fbox{…}``) with balanced braces, else None.

    ``\\boxed 5`` (no braces, as some models write) yields ``5``. An unclosed brace (a truncated
    completion) yields None.
    """
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    rest = text[i:]
    if rest.startswith(" ") and not rest.lstrip().startswith("{"):
        token = rest.split(None, 1)
        return token[0].rstrip("$.,") if token else None
    i += len(rest) - len(rest.lstrip())
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None
