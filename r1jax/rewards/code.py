"""Code reward: run the completion's last Python block on test cases, in the sandbox.

Owns ``code_reward``, ``extract_code`` and ``outputs_match``. Notable choices:

- **Which code.** The answer's last fenced block tagged ``python``, ``python3`` or ``py``: after
  the last ``</think>`` when there is one (a draft in the reasoning is not the answer, even when
  the answer's own block was cut off), else anywhere. An unclosed fence (a truncated completion)
  does not count; a block indented as a whole (inside a list item) is dedented. No block → 0.0,
  nothing is run.
- **Tests.** Per row, a list of ``{"input": str, "output": str}`` (stdin, expected stdout). A JSON
  string of that list, and the code-contest shapes ``{"inputs": [...], "outputs": [...]}`` /
  ``{"input": [...], "output": [...]}``, are accepted too (as the loaders read them; a value given
  as a list of lines is joined with newlines). Call-based tests (APPS ``fn_name``) are not run.
  A row with no tests, or malformed tests, gives ``None`` (not applicable) and a logged warning,
  never an exception mid-training.
- **Pass** = the program exits with status 0 within the time limit, its stdout is within the
  output cap (raised for a test whose expected output is larger), and it holds the expected
  output's tokens: the same words in the same order, however spaces, tabs and line breaks
  separate them (Codeforces' default checker; numbers are compared as text, "0.50" is not
  "0.5"). With the sandbox option ``float_tolerance=eps``, a token that differs still matches
  when both are decimal numbers within an absolute *or* relative error of eps (the judges'
  checker for real-valued answers, typically 1e-6; "1.9999999" for "2"), but an expected
  integer only when equal to an integer, or within the absolute error of a real (a relative
  error would take 999999937 for 1000000000 or 1e9, an answer mod 1e9+7 off by 63). "inf",
  "nan" and hex never count as numbers. Output is decoded as UTF-8 with
  replacement, so invalid bytes simply fail to match.
- **Reward** = passed / number of tests. Every test runs in a fresh sandbox (``sandbox.py``), so
  one test cannot leave state for the next. A program that hangs costs ``timeout_s`` per test,
  up to ``hang_budget_s`` for the row (once its runs that timed out add up to it, the rest of
  its tests are not run and fail), so one completion cannot hold a training step for its
  row's tests x timeout_s; runs that finish in time never count against it.
"""

from __future__ import annotations

import dataclasses
import decimal
import logging
import math
import re
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

from r1jax.rewards.common import column, completion_texts
from r1jax.rewards.sandbox import SandboxConfig, run_python

logger = logging.getLogger(__name__)

# A block's closing fence starts or ends a line (a ``` inside a string of the code does not).
_OPEN_FENCE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\r?\n", re.IGNORECASE)
_CLOSE_FENCE = re.compile(r"^[ \t]*```|```[ \t]*\r?$", re.MULTILINE)


_SPACE = re.compile(rb"[ \t\r\n]+")  # a judge's whitespace (str.split would take "\xa0" too)
# (not inf, nan, 0x1p3, 1_0; one way to match a run of digits: "\d+\.?\d*" backtracked
# quadratically on a long one, 12 s for 20 kB of output, holding the GIL)
_DECIMAL = re.compile(rb"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_MAX_EXPECTED_CAP = 64 * 1024 * 1024  # the largest output cap a test's expected output raises


def extract_code(text: str) -> str | None:
    """Completion text -> the body of its answer's last closed ```python block, or None."""
    answer = text.rpartition("</think>")[2]  # (all of it when there is no </think>)
    # One pass, each opener paired with the first closing fence after it (a lazy regex over both
    # scanned from every unclosed opener to the end: quadratic in a degenerate completion).
    last, pos = None, 0
    while (opener := _OPEN_FENCE.search(answer, pos)) is not None:
        closer = _CLOSE_FENCE.search(answer, opener.end())
        if closer is None:  # (nor any later opener)
            break
        last, pos = answer[opener.end() : closer.start()], closer.end()
    return None if last is None else textwrap.dedent(last)


def outputs_match(actual: str, expected: str, float_tolerance: float = 0.0) -> bool:
    """Whether `actual` holds the tokens of `expected` (whitespace-separated words), in order;
    with `float_tolerance` > 0, numbers within that absolute or relative error count as equal
    (an expected integer: the same value only)."""
    a, e = (s.encode("utf-8", errors="replace") for s in (actual, expected))
    if any(c in x for c in (b"\x0b", b"\x0c") for x in (a, e)):  # (bytes.split takes these)
        got, want = (_SPACE.split(x.strip(b" \t\r\n")) for x in (a, e))
    else:
        got, want = a.split(), e.split()  # (the same, in C: outputs of megabytes)
    if got == want:
        return True
    if float_tolerance <= 0 or len(got) != len(want):
        return False
    return all(g == w or _close(g, w, float_tolerance) for g, w in zip(got, want, strict=True))


def _close(got: bytes, want: bytes, tolerance: float) -> bool:
    """Both decimal numbers, |got - want| <= tolerance * max(1, |want|) (absolute or relative);
    an expected integer: the same value when `got` is one too, else within the absolute error
    (a relative one took 1e9 for 999999937)."""
    if not (_DECIMAL.fullmatch(got) and _DECIMAL.fullmatch(want)):
        return False
    integer = not any(c in want for c in b".eE")
    if integer and not any(c in got for c in b".eE"):  # two integers: their values alone
        return decimal.Decimal(got.decode()) == decimal.Decimal(want.decode())
    g, w = float(got), float(want)  # (a huge exponent is inf: equal only to the same inf)
    if math.isinf(g) or math.isinf(w):
        return False
    return abs(g - w) <= tolerance * (1.0 if integer else max(1.0, abs(w)))


def normalize_tests(raw: Any) -> list[tuple[str, str]]:
    """One row's ``tests`` value -> [(stdin, expected stdout), ...], read as the dataset loaders
    read it (``r1jax.data.loaders.parse_tests``: the same shapes, whichever way rows arrive).

    Raises:
      ValueError: the value is not one of the accepted shapes (see the module docstring).
    """
    from r1jax.data.loaders import parse_tests  # (a sibling layer; imported where used)

    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")
    if isinstance(raw, Sequence) and not isinstance(raw, str) and not raw:
        return []
    tests = parse_tests(raw)
    if tests is None:
        raise ValueError(
            "not stdin/stdout tests: expected a list of {input, output} or {inputs, outputs} "
            f"lists (call-based tests with fn_name are not run), got {raw!r:.80}"
        )
    return [(t["input"], t["output"]) for t in tests]


def code_reward(
    completions: Sequence[Any],
    *,
    sandbox: SandboxConfig | Mapping[str, Any] | None = None,
    **columns: Any,
) -> list[float | None]:
    """Fraction of a row's tests that the completion's last Python block passes.

    Args:
      completions: [B] strings or chat-message lists.
      sandbox: limits for each run: a ``SandboxConfig``, or a dict of its fields (as a config
        file gives), or None for the defaults (2 s wall per test, 30 s of runs timing out per
        completion, numbers compared as text: ``float_tolerance``, bubblewrap required).
      **columns: needs ``tests`` ([B] lists of ``{"input", "output"}``); others are ignored.
    Returns:
      [B] floats in [0, 1]; ``None`` for rows without (valid) tests.
    Raises:
      SandboxUnavailableError: no bubblewrap and ``allow_unsandboxed`` is not set.
    """
    if sandbox is None or isinstance(sandbox, SandboxConfig):
        cfg = sandbox or SandboxConfig()
    else:  # a dict, or an ml_collections ConfigDict from the stage config
        options = sandbox.to_dict() if hasattr(sandbox, "to_dict") else dict(sandbox)
        unknown = set(options) - {f.name for f in dataclasses.fields(SandboxConfig)}
        if unknown:
            raise ValueError(
                f"code_reward: unknown sandbox options {sorted(unknown)}; see "
                "r1jax.rewards.SandboxConfig for the fields"
            )
        cfg = SandboxConfig(**options)
    texts = completion_texts(completions)
    rows = column(columns, "tests", len(texts), reward="code_reward")
    rewards: list[float | None] = []
    for i, (text, raw_tests) in enumerate(zip(texts, rows, strict=True)):
        try:
            tests = normalize_tests(raw_tests) if raw_tests is not None else []
        except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
            logger.warning("code_reward: row %d has malformed tests (%s); reward None", i, e)
            tests = []
        if not tests:
            rewards.append(None)
            continue
        code = extract_code(text)
        if code is None:
            rewards.append(0.0)
            continue
        passed, hung = 0, 0.0  # (wall time spent in runs that timed out)
        for stdin, expected in tests:
            left = (cfg.hang_budget_s or math.inf) - hung
            if left <= 0:
                break  # (the tests not run fail)
            # (an expected output past the output cap could never be matched)
            needed = min(
                2 * len(expected.encode("utf-8", errors="replace")) + 4096, _MAX_EXPECTED_CAP
            )
            limits = dataclasses.replace(
                cfg,
                timeout_s=min(cfg.timeout_s, left),
                max_output_bytes=max(needed, cfg.max_output_bytes),
            )
            result = run_python(code, stdin, limits)
            hung += result.wall_s if result.timed_out else 0.0
            actual = result.stdout.decode("utf-8", errors="replace")
            passed += result.ok and outputs_match(actual, expected, cfg.float_tolerance)
        rewards.append(passed / len(tests))
    return rewards
