"""Multi-digit arithmetic: addition, subtraction and multiplication of n-digit integers.

Owns one task: problem sampling, the written column-by-column solution, a long readable chain of
thought (for cold-start SFT), and the exact verifier.

Notable choices:
- Every column line names its place value ("tens: 4 + 8 + 1 = 13, write 3 carry 1."), so a small
  model can find the digits to combine without counting positions, and every line has the same
  shape, carry or borrow included even when it is 0.
- Subtraction writes ``x - y - borrow = d`` and, when ``d`` is negative, writes ``d + 10`` and
  borrows 1; a negative result (``allow_negative``) is computed as the reversed difference, negated.
- Multiplication by a k-digit multiplier writes one partial product per multiplier digit (each
  column by column), then sums the shifted partial products with column additions.
- The verifier compares integers exactly. It accepts only an optionally signed ASCII integer, with
  optional well-formed thousands commas and a trailing period; anything else (words, other digit
  scripts, floats, over 64 characters after stripping whitespace) is wrong.
"""

from __future__ import annotations

import dataclasses
import random
import re

# Place names beyond this list fall back to "column N" (1-based from the right).
PLACES = (
    "ones",
    "tens",
    "hundreds",
    "thousands",
    "ten-thousands",
    "hundred-thousands",
    "millions",
    "ten-millions",
    "hundred-millions",
)
OPS = ("+", "-", "*")
MAX_ANSWER_CHARS = 64
_INT_RE = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)", re.ASCII)


def place_name(column: int) -> str:
    """Name of a column counted from the right, 0-based: 0 -> "ones", 1 -> "tens", ..."""
    return PLACES[column] if column < len(PLACES) else f"column {column + 1}"


def _digits_lsb(n: int) -> list[int]:
    return [int(c) for c in reversed(str(n))]


@dataclasses.dataclass(frozen=True)
class Line:
    """One written step: ``"{place}: {expr} = {value}{tail}"``; mistakes re-use expr and value."""

    place: str
    expr: str
    value: int
    tail: str

    def text(self) -> str:
        return f"{self.place}: {self.expr} = {self.value}{self.tail}"


# --------------------------------------------------------------------------------------------
# Column procedures. Each returns the lines (column steps) and free-text lines between them.
# --------------------------------------------------------------------------------------------


def add_lines(a: int, b: int) -> list[Line | str]:
    """Column addition of non-negative a + b, from the ones column up."""
    da, db = _digits_lsb(a), _digits_lsb(b)
    out: list[Line | str] = []
    carry = 0
    for i in range(max(len(da), len(db))):
        x = da[i] if i < len(da) else 0
        y = db[i] if i < len(db) else 0
        s = x + y + carry
        out.append(
            Line(place_name(i), f"{x} + {y} + {carry}", s, f", write {s % 10} carry {s // 10}.")
        )
        carry = s // 10
    if carry:
        out.append(f"{place_name(max(len(da), len(db)))}: write the carry {carry}.")
    return out


def sub_lines(a: int, b: int) -> list[Line | str]:
    """Column subtraction of non-negative a - b with a >= b, from the ones column up."""
    da, db = _digits_lsb(a), _digits_lsb(b)
    out: list[Line | str] = []
    borrow = 0
    for i in range(len(da)):
        x = da[i]
        y = db[i] if i < len(db) else 0
        d = x - y - borrow
        new_borrow = 1 if d < 0 else 0
        out.append(
            Line(
                place_name(i), f"{x} - {y} - {borrow}", d, f", write {d % 10} borrow {new_borrow}."
            )
        )
        borrow = new_borrow
    return out


def mul_digit_lines(a: int, y: int) -> list[Line | str]:
    """Column multiplication of non-negative a by one digit y."""
    da = _digits_lsb(a)
    out: list[Line | str] = []
    carry = 0
    for i, x in enumerate(da):
        p = x * y + carry
        out.append(
            Line(place_name(i), f"{x} * {y} + {carry}", p, f", write {p % 10} carry {p // 10}.")
        )
        carry = p // 10
    if carry:
        out.append(f"{place_name(len(da))}: write the carry {carry}.")
    return out


def solution_lines(a: int, op: str, b: int) -> list[Line | str]:
    """The whole written solution of ``a op b`` (operands non-negative), ending in "So ... = c."."""
    c = apply_op(a, op, b)
    if op == "+":
        return [*add_lines(a, b), f"So {a} + {b} = {c}."]
    if op == "-":
        if a >= b:
            return [*sub_lines(a, b), f"So {a} - {b} = {c}."]
        return [
            f"{a} is smaller than {b}, so compute {b} - {a} and make it negative.",
            *sub_lines(b, a),
            f"So {b} - {a} = {b - a}, and {a} - {b} = {c}.",
        ]
    if op == "*":
        yd = _digits_lsb(b)
        if len(yd) == 1:
            return [*mul_digit_lines(a, b), f"So {a} * {b} = {c}."]
        out: list[Line | str] = []
        partials = []
        for j, y in enumerate(yd):
            shifted = a * y * 10**j
            out.append(f"Multiply {a} by the {place_name(j)} digit {y}.")
            out.extend(mul_digit_lines(a, y))
            shift = f", times {10**j} is {shifted}." if j else "."
            out.append(f"So {a} * {y} = {a * y}{shift}")
            partials.append(shifted)
        total = partials[0]
        for p in partials[1:]:
            out.append(f"Add {total} + {p}.")
            out.extend(add_lines(total, p))
            out.append(f"So {total} + {p} = {total + p}.")
            total += p
        out.append(f"So {a} * {b} = {c}.")
        return out
    raise ValueError(f"unknown arithmetic op {op!r}; expected one of {OPS}")


def apply_op(a: int, op: str, b: int) -> int:
    """Exact value of ``a op b`` for op in "+", "-", "*"."""
    return {"+": a + b, "-": a - b, "*": a * b}[op]


_KEY_RE = re.compile(r"arithmetic\|(-?\d+)[+*-](-?\d+)")


def key_can_hold_out(key: str) -> bool:
    """Whether the problem of split key `key` (any task's) can be an eval problem: not with both
    operands single digits, whose answers the column lines of every longer problem's solution
    state ("8 + 9 + 0 = 17", scores of times in the pretraining corpus). A text stating one
    that cannot gives nothing away."""
    found = _KEY_RE.fullmatch(key)
    return found is None or max(abs(int(found[1])), abs(int(found[2]))) >= 10


def problem_key(a: int, op: str, b: int) -> str:
    """The split key of the problem ``a op b`` (operand order ignored for + and *)."""
    a, b = sorted((a, b)) if op in "+*" else (a, b)
    return f"arithmetic|{a}{op}{b}"


# A whole equation "x op y = z" of two operands: not part of a longer chain ("a + b + c = d") nor a
# column's digit sum ("4 + 8 + 1 = 13", "7 - 3 - 0 = 4").
_EQUATION_RE = re.compile(r"(?<![\d+\-*/] )(?<![\d+\-*/])(\d+) ?([+*-]) ?(\d+) ?= ?(-?\d+)")


def equation_keys(text: str) -> list[str]:
    """The split keys of the arithmetic problems ``text`` states with their answers: every true
    two-operand equation in it ("So 47 * 3 = 141", a check "55 - 20 = 35", a Countdown step
    "20 + 35 = 55"). A training text whose keys are all train gives away no held-out answer."""
    return [
        problem_key(int(a), op, int(b))
        for a, op, b, c in _EQUATION_RE.findall(text)
        # (a number past Python's 4300 digits raised; no problem of a split has 64)
        if max(len(a), len(b), len(c)) <= 64 and apply_op(int(a), op, int(b)) == int(c)
    ]


def parse_int_answer(text: object) -> int | None:
    """The integer an answer string states, or None when it is not exactly one integer.

    Accepts surrounding whitespace, a sign, thousands commas ("1,234") and a trailing period.
    """
    if not isinstance(text, str):
        return None
    s = text.strip()
    if len(s) > MAX_ANSWER_CHARS:
        return None
    if s.endswith("."):
        s = s[:-1].rstrip()
    if not _INT_RE.fullmatch(s):
        return None
    return int(s.replace(",", ""))


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ArithmeticTask:
    """n-digit arithmetic; rows hold ``meta = {"op": str, "operands": [a, b]}``.

    Difficulty knobs: digit counts of the first operand (``min_digits..max_digits``), of the
    second (same range, capped by ``max_multiplier_digits`` for "*"), the ops drawn uniformly,
    and whether a subtraction may go negative.
    """

    ops: tuple[str, ...] = ("+", "-")
    min_digits: int = 1
    max_digits: int = 3
    max_multiplier_digits: int = 1
    allow_negative: bool = False
    name: str = dataclasses.field(default="arithmetic", init=False)

    def __post_init__(self):
        bad = [op for op in self.ops if op not in OPS]
        if not self.ops or bad:
            raise ValueError(f"arithmetic ops must be a non-empty subset of {OPS}, got {self.ops}")
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(
                f"need 1 <= min_digits <= max_digits, got {self.min_digits}, {self.max_digits}"
            )
        if self.max_multiplier_digits < 1:
            raise ValueError("max_multiplier_digits must be >= 1")

    def _number(self, rng: random.Random, max_digits: int) -> int:
        d = rng.randint(min(self.min_digits, max_digits), max_digits)
        return rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1)

    def sample(self, rng: random.Random) -> tuple[str, dict]:
        """Draw one problem: (split key, row). The key ignores operand order for + and *."""
        op = rng.choice(self.ops)
        a = self._number(rng, self.max_digits)
        b_digits = (
            self.max_digits if op != "*" else min(self.max_digits, self.max_multiplier_digits)
        )
        b = self._number(rng, b_digits)
        if op == "-" and not self.allow_negative and a < b:
            a, b = b, a
        c = apply_op(a, op, b)
        key = problem_key(a, op, b)
        lines = solution_lines(a, op, b)
        row = {
            "prompt": f"What is {a} {op} {b}?",
            "solution": str(c),
            "task": self.name,
            "steps": "\n".join(x.text() if isinstance(x, Line) else x for x in lines),
            "terse": f"{a} {op} {b} = {c}",
            "meta": {"op": op, "operands": [a, b]},
        }
        return key, row

    def verify(self, answer: str, row: dict) -> bool:
        """True iff ``answer`` states exactly the integer ``row["solution"]``."""
        value = parse_int_answer(answer)
        return value is not None and value == int(row["solution"])

    def long_cot(self, row: dict, rng: random.Random, mistake_rate: float) -> str:
        """A readable long chain of thought: plan, column steps (with, at ``mistake_rate``, one
        slip that is noticed and corrected), the result, and a check by the inverse operation."""
        op = row["meta"]["op"]
        a, b = row["meta"]["operands"]
        c = apply_op(a, op, b)
        lines = solution_lines(a, op, b)
        steps = [x for x in lines if isinstance(x, Line)]
        slip = rng.choice(steps) if steps and rng.random() < mistake_rate else None
        out = [
            f"I need to compute {a} {op} {b}. I will work column by column, starting from the ones."
        ]
        for x in lines:
            if x is slip:
                wrong = x.value + rng.choice((-1, 1))
                out.append(
                    f"{x.place}: {x.expr} = {wrong}. Wait, that is not right: "
                    f"{x.expr} = {x.value}, not {wrong}."
                )
            out.append(x.text() if isinstance(x, Line) else x)
        if op == "+":
            out.append(f"Let me check by subtracting: {c} - {b} = {a}. That matches.")
        elif op == "-":
            out.append(f"Let me check by adding: {c} + {b} = {a}. That matches.")
        elif b != 0:
            out.append(f"Let me check by dividing: {c} / {b} = {a}. That matches.")
        else:
            out.append("Let me check: any number times 0 is 0. That matches.")
        return "\n".join(out)
