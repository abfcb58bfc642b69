"""Countdown: reach a target number with the given numbers and + - * / (the TinyZero task).

Owns the task's problem sampling, its written solutions, and its verifier, which includes a
small safe expression parser (recursive descent over exact fractions; no ``eval``).

Notable choices:
- Problems are made by combining the numbers in a random order with random operations, keeping
  only combinations whose every intermediate result is a positive integer, so each shipped solution
  reads as a short list of whole-number steps. The verifier is more permissive: any expression
  whose exact (Fraction) value is the target counts, whatever its intermediates.
- The rule follows TinyZero by default: every given number exactly once (``use_all=True``);
  ``use_all=False`` means each at most once. The rule is stored in the row, so a row verifies the
  same way wherever it travels.
- The answer may be ``expr`` or ``expr = target``. Unary minus, decimals, exponents, names and
  anything but digits, ``+ - * /`` (also ``− × ÷``) and parentheses are rejected; so are answers
  over 256 characters (after stripping whitespace) or nested deeper than 32 parentheses.
"""

from __future__ import annotations

import collections
import dataclasses
import random
from fractions import Fraction

MAX_ANSWER_CHARS = 256
MAX_DEPTH = 32
MAX_NUMBER_DIGITS = 12
_OP_ALIASES = {"+": "+", "-": "-", "\u2212": "-", "*": "*", "\u00d7": "*", "/": "/", "\u00f7": "/"}
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


# --------------------------------------------------------------------------------------------
# Safe expression parsing
# --------------------------------------------------------------------------------------------


class _Reject(Exception):
    """Internal: the expression is not a valid countdown expression."""


def _tokenize(text: str) -> list[str]:
    tokens, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch.isspace():
            i += 1
        elif "0" <= ch <= "9":
            j = i
            while j < len(text) and "0" <= text[j] <= "9":
                j += 1
            if j - i > MAX_NUMBER_DIGITS:
                raise _Reject
            tokens.append(text[i:j])
            i = j
        elif ch in _OP_ALIASES:
            tokens.append(_OP_ALIASES[ch])
            i += 1
        elif ch in "()":
            tokens.append(ch)
            i += 1
        else:
            raise _Reject
    return tokens


class _Parser:
    """expr := term (("+"|"-") term)* ; term := factor (("*"|"/") factor)* ;
    factor := NUMBER | "(" expr ")"."""

    def __init__(self, tokens: list[str]):
        self.tokens, self.pos, self.used = tokens, 0, []

    def _peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def expr(self, depth: int) -> Fraction:
        value = self.term(depth)
        while self._peek() in ("+", "-"):
            op = self.tokens[self.pos]
            self.pos += 1
            rhs = self.term(depth)
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(self, depth: int) -> Fraction:
        value = self.factor(depth)
        while self._peek() in ("*", "/"):
            op = self.tokens[self.pos]
            self.pos += 1
            rhs = self.factor(depth)
            if op == "*":
                value = value * rhs
            elif rhs == 0:
                raise _Reject
            else:
                value = value / rhs
        return value

    def factor(self, depth: int) -> Fraction:
        tok = self._peek()
        if tok is None:
            raise _Reject
        self.pos += 1
        if tok == "(":
            if depth >= MAX_DEPTH:
                raise _Reject
            value = self.expr(depth + 1)
            if self._peek() != ")":
                raise _Reject
            self.pos += 1
            return value
        if tok.isdigit():
            self.used.append(int(tok))
            return Fraction(int(tok))
        raise _Reject


def evaluate_expression(text: object) -> tuple[Fraction, list[int]] | None:
    """Exact value of an arithmetic expression and the numbers it uses, or None if invalid.

    Args:
      text: e.g. ``"(75 - 25) / 5 + 3"``.
    Returns:
      ``(value, numbers_in_order_of_appearance)``; None for a parse error, an unknown character,
      division by zero, or input over the length / nesting limits.
    """
    if not isinstance(text, str) or len(text) > MAX_ANSWER_CHARS:
        return None
    try:
        tokens = _tokenize(text)
        if not tokens:
            return None
        parser = _Parser(tokens)
        value = parser.expr(0)
        if parser.pos != len(tokens):
            return None
        return value, parser.used
    except _Reject:
        return None


def check_answer(
    answer: object, numbers: list[int], target: int, use_all: bool, ops: str = "+-*/"
) -> bool:
    """True iff ``answer`` ("expr" or "expr = target") equals ``target`` and obeys the number rule.

    Args:
      numbers: the given numbers (a multiset).
      use_all: True = each given number exactly once; False = each at most once.
      ops: the operators the problem allows.
    """
    if not isinstance(answer, str):
        return False
    answer = answer.strip()
    if len(answer) > MAX_ANSWER_CHARS:
        return False
    parts = answer.removesuffix(".").split("=")
    if len(parts) > 2:
        return False
    if len(parts) == 2:
        rhs = parts[1].strip()
        if not rhs.isascii() or not rhs.isdigit() or int(rhs) != target:
            return False
    parsed = evaluate_expression(parts[0])
    if parsed is None:
        return False
    value, used = parsed
    if any(t in _PREC and t not in ops for t in _tokenize(parts[0])):
        return False
    have, want = collections.Counter(used), collections.Counter(numbers)
    if use_all and have != want:
        return False
    if not use_all and any(have[n] > want[n] for n in have):
        return False
    return value == target


# --------------------------------------------------------------------------------------------
# Building solutions
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Node:
    value: int
    text: str
    prec: int  # 3 for a bare number


def _combine(op: str, left: _Node, right: _Node) -> _Node:
    p = _PREC[op]
    lt = left.text if left.prec >= p else f"({left.text})"
    # Right operands of equal precedence keep their parentheses even where the value would not
    # change (a + (b - c)), so the expression reads in the same order as the written steps.
    rt = right.text if right.prec > p else f"({right.text})"
    value = {
        "+": left.value + right.value,
        "-": left.value - right.value,
        "*": left.value * right.value,
    }.get(op)
    if op == "/":
        value = left.value // right.value
    return _Node(value, f"{lt} {op} {rt}", p)


def random_combination(
    numbers: list[int], ops: str, rng: random.Random
) -> tuple[_Node, list[str]] | None:
    """Combine all ``numbers`` with random ops; each step's result must be a positive integer.

    Returns the final expression node and the step lines ("75 - 25 = 50."), or None when a drawn
    step cannot keep results positive whole numbers.
    """
    pool = [_Node(n, str(n), 3) for n in numbers]
    steps = []
    while len(pool) > 1:
        i, j = rng.sample(range(len(pool)), 2)
        a, b = pool[i], pool[j]
        op = rng.choice(ops)
        if op in "-/" and a.value < b.value:
            a, b = b, a  # keep differences and quotients positive
        if op == "-" and a.value == b.value:
            return None
        if op == "/" and (b.value == 0 or a.value % b.value):
            return None
        node = _combine(op, a, b)
        if node.value <= 0:
            return None
        steps.append(f"{a.value} {op} {b.value} = {node.value}.")
        pool = [n for k, n in enumerate(pool) if k not in (i, j)] + [node]
    return pool[0], steps


@dataclasses.dataclass(frozen=True)
class CountdownTask:
    """Countdown; rows hold ``meta = {"numbers": [...], "target": int, "use_all": bool}`` (and
    ``"ops"`` when not all four are allowed).

    Difficulty knobs: how many numbers (``min_numbers..max_numbers``), their range
    (``min_value..max_value``), the target range, the ops, and the number rule.
    """

    min_numbers: int = 3
    max_numbers: int = 4
    min_value: int = 1
    max_value: int = 50
    min_target: int = 1
    max_target: int = 100
    ops: str = "+-*/"
    use_all: bool = True
    name: str = dataclasses.field(default="countdown", init=False)

    def __post_init__(self):
        if not 2 <= self.min_numbers <= self.max_numbers:
            raise ValueError(
                f"need 2 <= min_numbers <= max_numbers, got {self.min_numbers}, {self.max_numbers}"
            )
        if not 1 <= self.min_value <= self.max_value:
            raise ValueError("need 1 <= min_value <= max_value")
        if not 1 <= self.min_target <= self.max_target:
            raise ValueError("need 1 <= min_target <= max_target")
        if not self.ops or any(op not in _PREC for op in self.ops):
            raise ValueError(
                f"countdown ops must be a non-empty subset of '+-*/', got {self.ops!r}"
            )

    def _rule_text(self) -> str:
        return "each number exactly once" if self.use_all else "each number at most once"

    def sample(self, rng: random.Random) -> tuple[str, dict]:
        """Draw one solvable problem: (split key, row). The key ignores the numbers' order."""
        for _ in range(10_000):
            k = rng.randint(self.min_numbers, self.max_numbers)
            numbers = [rng.randint(self.min_value, self.max_value) for _ in range(k)]
            for _ in range(20):
                chosen = numbers if self.use_all else rng.sample(numbers, rng.randint(2, k))
                built = random_combination(chosen, self.ops, rng)
                if built is None or not self.min_target <= built[0].value <= self.max_target:
                    continue
                node, steps = built
                target = node.value
                if not self.use_all and target in numbers:  # copying a number is no solution
                    continue
                key = f"countdown|{sorted(numbers)}|{target}|{self.use_all}"
                nums = ", ".join(map(str, numbers))
                row = {
                    "prompt": (
                        f"Using the numbers [{nums}], write an expression that equals "
                        f"{target}. You may use {', '.join(self.ops)} and parentheses, and "
                        f"{self._rule_text()}."
                    ),
                    "solution": node.text,
                    "task": self.name,
                    "steps": "\n".join([*steps, f"So {node.text} = {target}."]),
                    "terse": f"{node.text} = {target}",
                    "meta": {"numbers": numbers, "target": target, "use_all": self.use_all},
                }
                if self.ops != "+-*/":  # (the default is what a row without "ops" allows)
                    row["meta"]["ops"] = self.ops
                return key, row
        raise ValueError(
            f"could not build a countdown problem with {self}; widen the target "
            "range or the number range"
        )

    def verify(self, answer: str, row: dict) -> bool:
        """True iff ``answer`` reaches the row's target under the row's number rule."""
        meta = row["meta"]
        return check_answer(
            answer,
            list(meta["numbers"]),
            int(meta["target"]),
            bool(meta["use_all"]),
            meta.get("ops", "+-*/"),
        )

    def long_cot(self, row: dict, rng: random.Random, mistake_rate: float) -> str:
        """A readable search: a few failed attempts (more often at higher ``mistake_rate``),
        the working combination, and a check of value and number use."""
        meta = row["meta"]
        numbers, target = meta["numbers"], meta["target"]
        nums = ", ".join(map(str, numbers))
        out = [f"I need to reach {target} using {nums}, {self._rule_text()}."]
        n_fail = sum(rng.random() < mistake_rate for _ in range(3))
        for _ in range(200):
            if n_fail == 0:
                break
            chosen = (
                numbers if meta["use_all"] else rng.sample(numbers, rng.randint(2, len(numbers)))
            )
            built = random_combination(chosen, self.ops, rng)
            # Skip attempts that hit the target or overshoot wildly (nobody tries those).
            if built is None or built[0].value == target or built[0].value > 10 * target:
                continue
            node, steps = built
            how = "too big" if node.value > target else "too small"
            out.append(f"Try {' '.join(steps)} That gives {node.value}, {how}.")
            n_fail -= 1
        solution_steps = row["steps"].split("\n")[:-1]
        out.append(f"Try {' '.join(solution_steps)} That gives {target}. It works.")
        used = ", ".join(map(str, evaluate_expression(row["solution"])[1]))
        out.append(f"Let me check: {row['solution']} = {target}, and it uses {used}. Correct.")
        return "\n".join(out)
