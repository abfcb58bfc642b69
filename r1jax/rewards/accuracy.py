"""Math accuracy reward: extract the final answer, check it against the ground truth.

Owns ``accuracy_reward`` and the answer extraction it relies on (``extract_answer``,
``answers_match``). Notable choices:

- **Where the answer is.** The body of the last ``<answer>…</answer>``; if that body holds a
  ``\\boxed{…}``, just the box. Without an answer block, the last ``\\boxed{…}`` anywhere. Neither
  → no answer → 0.0. Boxes joined to the last by "and" or commas are one answer of several
  values (``\\boxed{2} and \\boxed{3}`` reads "2, 3", a gold solution's alike); joined by "or"
  they are a hedge, no answer. An answer longer than ``MAX_ANSWER_CHARS`` scores 0.0 (no final
  answer is that long, and sympy on megabytes of text would stall the trainer).
- **How it is compared.** Both sides go through math-verify (``math_verify.parse`` then
  ``math_verify.verify``; gold first, since ``verify`` is not symmetric). A bare answer such as
  ``\\frac{\\sqrt2}{2}`` or ``(0,1]`` is wrapped as ``\\boxed{…}`` before parsing, because
  math-verify's LaTeX extractor only looks inside delimiters; text with its own ``$…$`` is parsed
  as is. This gives fractions, radicals, sets (``\\{1,2\\}`` = ``2, 1``), intervals, percentages
  (``50\\%`` = ``0.5`` when the gold is the percentage), thousands separators (``1,000`` =
  ``1000``), and equations (``x=3`` = ``3``), all with math-verify's semantics. A lead-in
  ("The answer is") and unit words ("18 eggs", "12\\pi square units") are dropped first; an
  answer with any other words ("not 18", "17 eggs or 18", "18 thousand") has no answer.
- **Multiple choice.** A gold answer that is one capital letter ``A``–``J`` (optionally in
  parentheses) switches to letter matching: the prediction's letter is the one it starts with
  (``B``, ``(B)``, ``\\text{(B)}``, ``B) 42``, ``B because``), else the last bracketed one, else
  the last after "answer"/"option"/"choice", else the one capital standing alone ("A" and "I"
  as English words do not count).
- **A one-word gold** (``Even``, ``Paris``; two letters or more) against a one-word answer is
  compared as text, case-folded (to math-verify a word is a product of letters, which an anagram
  equals). **Gold that math-verify cannot parse** is compared as text too: case-folded, with
  whitespace, ``$`` and ``\\text{}`` removed. An empty or missing solution gives ``None`` ("not
  applicable"), which the composition skips.
- **Timeouts.** math-verify bounds each parse/verify with ``signal.alarm``, which only works in a
  process's main thread; the composition's process pool scores in worker main threads. Off the
  main thread (in-process scoring inside a ``jax.pure_callback``: ``num_workers=0``, or a custom
  reward calling this one) one answer such as ``9^{9^{9^{9}}}`` could hold the GIL for ever, so
  there each comparison runs in a helper process that is killed, and the answer scored as wrong,
  after ``OFF_THREAD_TIMEOUT_S`` (a script doing this needs the ``if __name__ == "__main__":``
  guard that starting processes needs; without it the comparison runs unbounded, in the thread).
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import multiprocessing
import numbers
import re
import threading
from collections.abc import Sequence
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np
from math_verify import (
    ExprExtractionConfig,
    LatexExtractionConfig,
    parse,
    verify,
)
from math_verify.errors import TimeoutException

from r1jax.rewards.common import (
    answer_region,
    closed_boxes,
    column,
    completion_texts,
    final_boxed,
)

logger = logging.getLogger(__name__)

MAX_ANSWER_CHARS = 1000
PARSE_TIMEOUT_S = 3  # per math-verify parse/verify call (seconds), main thread only
OFF_THREAD_TIMEOUT_S = 10  # per comparison, off the main thread (its three calls)
HELPER_START_TIMEOUT_S = 120  # the helper process's start (imports sympy and math-verify)

_PERCENT_SIGN = re.compile(r"\s*\\?%\s*$")
_LETTER_GOLD = re.compile(r"^\s*\(?\s*([A-J])\s*\)?\s*\.?\s*$")
# A prediction's letter, in order: the answer starts with the letter ("B", "b)", "B. 42", "(B) 42",
# "B because ...", "A is larger"; "A" and "I" opening a sentence are words; "B or C" is no
# choice); the last one after "answer is" / "answer:"; the last one in brackets ("so (C)"); the
# last one after "option" or "choice"; else the one capital A-J standing alone (not "A" and "I"
# as the words they also are, nor the "I" of "I'm").
_LETTER_LEAD = re.compile(
    r"^\s*(?:\(\s*([A-Ja-j])\s*\)|([A-Ja-j])(?:\s*[.:),]|\s*$)"
    r"|([B-HJ])\s|([AI])\s+(?=(?:is|was|because|since|as)\b))"
)
# Another letter offered right after a chosen one ("B or C", "(B), (C)", "(B) or maybe (C)") ...
_MAYBE = r"(?:\s+(?:maybe|perhaps|possibly|probably|also|even))?"
# (a letter, not the pronoun: "B, I think" still chooses B; "B or C is right" does not)
_LETTER_ALTERNATIVE = re.compile(
    rf"\s*\)?\s*(?:or|and|,|/){_MAYBE}\s*\(?\s*([A-J])(?![A-Za-z'’])"
    r"(?!\s+(?!(?:is|are|or|and)\b)[a-z])"
)
# ... or right before it ("either (B) or (C)", "B or possibly C")
_LETTER_ALTERNATIVE_BEFORE = re.compile(
    rf"(?<![A-Za-z'’])([A-J])\s*\)?\s*(?:or|and|,|/){_MAYBE}\s*\(?\s*$"
)
_LETTER_ANSWER = re.compile(r"(?i:answer)\s*(?:(?i:is)\s*|:\s*)\(?([A-J])(?![A-Za-z])")
_LETTER_BRACKETED = re.compile(r"\(\s*([A-J])\s*\)")
_LETTER_CUED = re.compile(r"(?i:option|choice)\s*(?:(?i:is)\s*|:\s*)?\(?([A-J])(?![A-Za-z])")
_LETTER_ALONE = re.compile(r"(?<![A-Za-z\\'’])([A-J])(?![A-Za-z'’])(?!\s+(?!(?:is|or|and)\b)[a-z])")
# Words around the value ("There are 18 eggs.", "12\pi square units", "The answer is 4"): a
# reward must not pay for words that change the value, so only these are dropped: a lead-in from
# a short list ("the answer is", "there are", "so"), unit words after the value ("eggs", "square
# units", "per hour"; not "thousand", "squared", "or more"), and a \text{} unit with its exponent.
# Any other word left ("not 18", "17 eggs or 18", "half of 18") and the answer is wrong: wrapped
# in \boxed{} words would be products of symbols (18*e*g*g*s), and math-verify's own reading of
# text takes its last number. "percent" is "\%"; "infinity" is "\infty". One token alone ("abc",
# "Paris") is never prose, and "and" / "or" join values ("1 and 2" is a set).
_WORD_TOKEN = re.compile(r"[A-Za-z]{2,}[.,:;!?]?")
_LEAD_IN = re.compile(
    r"^(?:(?:so|thus|therefore|hence)[,:]?\s+)?(?:(?:the\s+)?(?:final\s+)?(?:answer|total|result)"
    r"\s*(?:is|=|:)\s*|there\s+(?:are|is|were|was)\s+|it\s+is\s+|it's\s+)?",
    re.IGNORECASE,
)
_NOT_UNITS = frozenset(  # words after a value that change it or hedge it ("18 more apples",
    # "5 times" answer "how many more / times": the value, as "$18$ more apples" scored)
    "thousand thousands million millions billion billions trillion hundred hundreds dozen dozens "
    "squared cubed half halves third thirds quarter quarters tenths hundredths thousandths "
    "least most over under above below than plus minus not no or and to".split()
)
_UNIT_TEXT = re.compile(
    r"(?<=\S)\s*\\text\s*\{\s*(?!(?:or|and)\s*\})[A-Za-z][A-Za-z .]*\}(?:\s*\^\s*(?:\{\d+\}|\d))?"
)
_PERCENT = re.compile(r"\s*\bpercent\b", re.IGNORECASE)
_INFINITY = re.compile(r"(?<![A-Za-z\\])infinity(?![A-Za-z])", re.IGNORECASE)
_MATH_WORDS = frozenset(
    "sin cos tan cot sec csc arcsin arccos arctan sinh cosh tanh log ln exp sqrt max min mod gcd "
    "lcm det inf infty and or".split()
)
_MATH_DOLLAR = re.compile(r"(?<!\\)\$")  # a math delimiter; `\$` is a currency sign
# Words right around a delimited value that change or hedge it (`_hedged`): before it in its
# clause ("not $18$", "about $18$", "half of $18$", "不是 $18$"), right after it ("$18$ thousand",
# "$18$ or more", "18 左右"), or a short "or" between two values ("$17$ eggs or $18$"). Prose
# farther off ("Since $x$ is not negative, $x = 5$") is prose.
_HEDGE_BEFORE = re.compile(
    r"(?:\b(?:not|no|about|around|approximately|roughly|nearly|almost|maybe|perhaps|over|under|"
    r"above|below|except|never|isn't|between|(?:more|less|fewer|greater|smaller)\s+than|"
    r"at\s+(?:least|most)|(?:half|a\s+third|a\s+quarter)\s+of)|不是|大约|约为|约|或)\s*$",
    re.IGNORECASE,
)
_HEDGE_AFTER = re.compile(
    r"^\s*(?:(?:thousands?|millions?|billions?|hundreds?|dozens?|squared|cubed|percent)\b|"
    r"or\s+(?:more|less|fewer|so|above|below|greater|smaller)\b|at\s+(?:least|most)\b|"
    r"左右|以上|以下|多)",
    re.IGNORECASE,
)
_HEDGE_BETWEEN = re.compile(r"\bor\b|或", re.IGNORECASE)
_CLAUSE_END = re.compile(r"[.;:!?，。；：！？]|,\s")
_MATH_SPAN = re.compile(  # one delimited expression: $$…$$, $…$, \\(…\\), \\[…\\]
    # (an opener is not crossed: thousands of unclosed "\\(" each scanned to the end of the text)
    r"(?<!\\)\$\$(.+?)(?<!\\)\$\$|(?<!\\)\$(.+?)(?<!\\)\$"
    r"|\\\(((?:(?!\\\().)+?)\\\)|\\\[((?:(?!\\\[).)+?)\\\]",
    re.DOTALL,
)
_LATEX_WRAPPER = re.compile(
    r"\\(?:text|textbf|mathrm|mathbf|textit|boxed|textrm|textsf|texttt|textnormal|textup|mbox"
    r"|hbox)\s*\{([^{}]*)\}"
)
_MATH_CONFIG = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())
_guard: concurrent.futures.ProcessPoolExecutor | None = None  # comparisons off the main thread
_guard_lock = threading.Lock()
_helper_state = {"answered": False, "unusable": False}


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _timeout() -> int | None:
    """math-verify's per-call limit: only its main thread can take the alarm."""
    return PARSE_TIMEOUT_S if _on_main_thread() else None


def _match_in_helper(gold: str, predicted: str) -> bool:
    """`answers_match` in a helper process (its main thread, where math-verify's own timeouts
    work), given up after OFF_THREAD_TIMEOUT_S: the helper is killed and the answer is wrong."""
    global _guard
    with _guard_lock:  # one comparison at a time; the helper is started on first use
        try:
            if _guard is None:
                from r1jax.rewards.compose import _init_worker

                context = multiprocessing.get_context("forkserver")  # never fork a JAX process
                context.set_forkserver_preload(["r1jax.rewards"])
                _guard = concurrent.futures.ProcessPoolExecutor(
                    1, mp_context=context, initializer=_init_worker
                )
                # Started outside the answer's limit: under load the start alone took seconds,
                # and the first answer compared (right or not) was scored wrong.
                try:
                    _guard.submit(answers_match, "1", "1").result(timeout=HELPER_START_TIMEOUT_S)
                except concurrent.futures.TimeoutError:
                    _discard_helper()
                    logger.warning(
                        "the accuracy helper process did not start in %d s; answer scored as "
                        "wrong (it is started again for the next one)",
                        HELPER_START_TIMEOUT_S,
                    )
                    return False
                _helper_state["answered"] = True  # (it starts: a later death is an answer's)
            future = _guard.submit(answers_match, gold, predicted)
            answer = future.result(timeout=OFF_THREAD_TIMEOUT_S)
            _helper_state["answered"] = True
            return answer
        except (concurrent.futures.TimeoutError, BrokenProcessPool) as e:
            _discard_helper()
            if isinstance(e, BrokenProcessPool) and not _helper_state["answered"]:
                # It died before ever answering: this process cannot start one (a script without
                # an `if __name__ == "__main__":` guard). Compare here from now on, unbounded.
                logger.warning(
                    "accuracy_reward off the main thread cannot start its helper process (no "
                    "`if __name__ == '__main__':` guard?); comparing without a time limit"
                )
                _helper_state["unusable"] = True
                return _match_here(gold, predicted)
            logger.warning(
                "an answer took over %d s to compare (%r...); scored as wrong",
                OFF_THREAD_TIMEOUT_S,
                predicted[:60],
            )
            return False


def _discard_helper() -> None:
    global _guard
    for process in list(getattr(_guard, "_processes", {}).values()):
        process.kill()
    _guard.shutdown(wait=False, cancel_futures=True)
    _guard = None


def extract_answer(text: str) -> str | None:
    """Completion text -> the final answer string, or None when there is none.

    Order: last ``<answer>`` body (its last ``\\boxed{}`` if it has one), else last ``\\boxed{}``.
    """
    region = answer_region(text)
    if region is None:
        # (the final answer only: a chain of thought may weigh "\\boxed{3} or \\boxed{5}" and
        # then commit to one after </think>)
        return None if _hedged_boxes(text.rpartition("</think>")[2]) else final_boxed(text)
    boxed = final_boxed(region)
    if boxed is not None and _hedged_boxes(region):
        return None  # "\\boxed{3} or \\boxed{5}": two answers are none (not the last one)
    return boxed if boxed is not None else region


def _hedged_boxes(text: str) -> bool:
    """Whether the last ``\\boxed{}`` of `text` is given as an alternative to the one before it
    (a short "or" between two different values)."""
    boxes = closed_boxes(text)
    if len(boxes) < 2:
        return False
    (_, end, a), (start, _, b) = boxes[-2:]
    between = text[end:start]
    # (the same value written twice, "\\frac{1}{2} or 0.5", is one answer; a box too long to
    # grade is not compared: a regex over it can take minutes, which no alarm interrupts)
    short_or = len(between.split()) <= 3 and _HEDGE_BETWEEN.search(between)
    if not short_or or a == b:
        return False
    return max(len(a), len(b)) > MAX_ANSWER_CHARS or not answers_match(a, b)


# A number grouped in thousands by spaces ("1 000", LaTeX's "1\,000"): one number, not a product.
_SPACE_GROUPED = re.compile(r"(?<![\d.])\d{1,3}(?:(?: |\\[,;:! ]|~)\d{3})+(?![\d.])")
_NEGATED = re.compile(  # a negation just before a chosen letter ("not B", "except (C)")
    r"(?i:\b(?:not|no|except|never|isn't|is not)\s*(?:option\s*|choice\s*)?\(?\s*)$"
)


# Unicode maths signs math-verify does not read (it reads −, ×, ⋅, ÷, ≤, ≥, ≠ and π itself).
_UNICODE_MATH = {
    "°": "^\\circ",
    "∞": "\\infty ",
    "·": "\\cdot ",
    "½": "\\frac{1}{2}",
    "¼": "\\frac{1}{4}",
    "¾": "\\frac{3}{4}",
    "⅓": "\\frac{1}{3}",
    "⅔": "\\frac{2}{3}",
}
_UNICODE_MATH_SIGN = re.compile("|".join(_UNICODE_MATH))
# √ and what it covers: a number, a {group}, a (group) (one level of nesting), or one letter.
_ROOT = re.compile(r"√\s*(\d+(?:\.\d+)?|\{[^{}]*\}|\(((?:[^()]|\([^()]*\))*)\)|[A-Za-z])?")


def _root(m: re.Match) -> str:
    radicand = m.group(2) if m.group(2) is not None else m.group(1)
    if radicand is None:
        return "\\sqrt"  # ("√\\pi": LaTeX takes the next token)
    return "\\sqrt{" + radicand.removeprefix("{").removesuffix("}") + "}"


# Text-mode commands math-verify does not know, written as the \text it reads ("\textsf{12}"
# was no answer where "\text{12}" is 12; "12 \hbox{ eggs}" a unit like "12 \text{ eggs}").
_TEXT_ALIAS = re.compile(r"\\(?:textsf|texttt|textup|hbox)(?![A-Za-z])")


def _strip_delimiters(s: str) -> str:
    s = _TEXT_ALIAS.sub(r"\\text", s)
    s = _SPACE_GROUPED.sub(lambda m: re.sub(r"\D", "", m.group()), s.strip())
    s = _UNICODE_MATH_SIGN.sub(lambda m: _UNICODE_MATH[m.group()], s)
    s = _ROOT.sub(_root, s)
    for left, right in (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$")):
        if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
            inner = s[len(left) : len(s) - len(right)]
            # ("\\(5\\) and \\(6\\)" is two values, not one "5\\) and \\(6")
            if not any(d in inner for d in ({left, right} if left[0] == "\\" else {"$"})):
                return inner.strip()
    for mark in ("**", "__"):  # Markdown emphasis around the whole answer
        if s.startswith(mark) and s.endswith(mark) and len(s) > 2 * len(mark):
            s = s[len(mark) : -len(mark)].strip()
    return s.rstrip(".").strip()


# "3 (or 5)", "3 (\\text{or } 5)": an alternative in brackets (math-verify read "3 (, 5)" as 5).
_BRACKETED_ALTERNATIVE = re.compile(r"[(\[]\s*(?:or|and)\b", re.IGNORECASE)
_TEXT_WORDS = re.compile(
    r"\\(?:text|textrm|textit|textbf|textsf|texttt|textnormal|textup|mbox|hbox)\s*\{([^{}]*)\}"
)


def _is_word(token: str) -> bool:
    token = token.strip("()[]")  # "(or", "5)": a word in brackets is a word
    return bool(_WORD_TOKEN.fullmatch(token)) and token.rstrip(".,:;!?").lower() not in _MATH_WORDS


def _changes_value(text: str) -> bool:
    """Whether \\text{`text`} after a value changes it ("thousand", "or more", "at least"),
    rather than naming its unit ("units squared", "feet squared": the unit comes first)."""
    words = re.findall(r"[a-z]+", text.lower())
    return bool(words) and (
        words[0] in _NOT_UNITS or words[:2] in (["at", "least"], ["at", "most"])
    )


def _without_words(s: str) -> tuple[str, bool]:
    """(the answer without its lead-in and unit words, whether other words remain)."""
    s = _PERCENT.sub(r"\\%", _INFINITY.sub(r"\\infty", s))
    # \\text{ thousand}, \\text{ or more}: words that change the value, not a unit to drop
    s = _TEXT_WORDS.sub(lambda m: f" {m.group(1)} " if _changes_value(m.group(1)) else m.group(), s)
    s = _UNIT_TEXT.sub(" ", s)
    if _BRACKETED_ALTERNATIVE.search(_TEXT_WORDS.sub(lambda m: f" {m.group(1)} ", s)):
        return s.strip(), True  # (the words \\text{} holds, read as words only for this test)
    if len(s.split()) < 2:
        return s.strip(), False
    tokens = s[_LEAD_IN.match(s).end() :].split()
    while (
        len(tokens) > 1
        and _is_word(tokens[-1])
        and tokens[-1].strip("()[]").rstrip(".,:;!?").lower() not in _NOT_UNITS
    ):
        tokens.pop()
    return " ".join(tokens).rstrip(".,:;"), any(_is_word(t) for t in tokens)


def _parsed(s: str) -> list[Any]:
    """`_parse_math(s)`, or [] when it ran out of time: not cached, so that one slow moment on a
    loaded host does not make a gold unparseable for the rest of the run."""
    try:
        return _parse_math(s)
    except TimeoutException:
        logger.warning("math-verify ran out of time parsing %.200r", s)
        return []


def _parse(s: str, timeout: int | None) -> list[Any]:
    """math-verify's parse; [] for what it cannot parse, its TimeoutException raised."""
    try:
        return parse(s, list(_MATH_CONFIG), parsing_timeout=timeout, raise_on_error=True)
    except Exception:  # (its parse errors; a TimeoutException is a BaseException)
        return []


@functools.lru_cache(maxsize=4096)
def _parse_math(s: str) -> list[Any]:
    """Answer string -> math-verify parse result ([] when nothing parsed; TimeoutException when
    it ran out of time: `_parsed`). Cached: a cons@k vote compares each answer with every
    group's, and a group's gold with every sample."""
    timeout = _timeout()
    spans = list(_MATH_SPAN.finditer(s))
    if spans:
        # Prose with delimited math: math-verify finds the (last) expression itself, unless the
        # prose changes or hedges it ("not $18$", "$18$ thousand", "$17$ eggs or $18$"), which
        # undelimited words may not do either.
        if _hedged(s, spans):
            return []
        return _parse(s, timeout)
    s = _MATH_DOLLAR.sub("", s)  # a lone "$" is a currency sign ("$5")
    value, wordy = _without_words(s)
    if wordy:  # words that may change the value ("not 18", "17 eggs or 18"): no answer
        return []
    return _parse("\\boxed{" + value + "}", timeout)


def _hedged(s: str, spans: list[re.Match]) -> bool:
    """Whether words right around a delimited value change or hedge it (`_HEDGE_BEFORE`,
    `_HEDGE_AFTER`, a short "or" between two values)."""
    for i, span in enumerate(spans):
        before = _CLAUSE_END.split(s[: span.start()])[-1]
        if _HEDGE_BEFORE.search(before) or _HEDGE_AFTER.match(s[span.end() :]):
            return True
        if i:
            between = s[spans[i - 1].end() : span.start()]
            if len(between.split()) <= 3 and _HEDGE_BETWEEN.search(between):
                return True
    return False


_WORD = re.compile(r"[A-Za-z]{2,}")
_CHOICE_SET = re.compile(r"\s*[A-J]{2,10}\s*$")
_SHORT_SYMBOLS = re.compile(r"\$?[a-z]{2,3}\$?")


def _word(s: str) -> str | None:
    """`s` case-folded if it is one word (2+ letters; in \\text{}, $…$, **…**, with punctuation
    around it), else None."""
    s = _TEXT_WORDS.sub(r"\1", _LATEX_WRAPPER.sub(r"\1", _LATEX_WRAPPER.sub(r"\1", s)))
    s = _strip_delimiters(s).strip(" .,;:!?\"'*_")
    return s.casefold() if _WORD.fullmatch(s) else None


def _plain(s: str) -> str:
    s = _LATEX_WRAPPER.sub(r"\1", s)
    return re.sub(r"[\s$]", "", s).casefold()


def _letter(s: str) -> str | None:
    """The option letter a prediction chooses (see `_LETTER_LEAD` and below), or None."""
    plain = _LATEX_WRAPPER.sub(r"\1", _LATEX_WRAPPER.sub(r"\1", s)).replace("$", "").strip()
    lead = _LETTER_LEAD.match(plain)
    if lead:
        chosen = next(g for g in lead.groups() if g).upper()
        other = _LETTER_ALTERNATIVE.match(plain, lead.end(lead.lastindex))
        return None if other and other.group(1) != chosen else chosen  # "B or C": no choice
    for pattern in (_LETTER_ANSWER, _LETTER_BRACKETED, _LETTER_CUED):
        found = list(pattern.finditer(plain))
        if found:
            last = found[-1]
            others = (  # ("The answer is B or C", "Option B, C", "either (B) or (C)")
                _LETTER_ALTERNATIVE.match(plain, last.end(1)),
                _LETTER_ALTERNATIVE_BEFORE.search(plain, 0, last.start(1)),
            )
            if any(o and o.group(1) != last.group(1) for o in others):
                return None  # another letter offered with it: no choice
            return None if _NEGATED.search(plain, 0, last.start(1)) else last.group(1)
    alone = list(_LETTER_ALONE.finditer(plain))
    if len({m.group(1) for m in alone}) != 1 or any(
        _NEGATED.search(plain, 0, m.start(1)) for m in alone
    ):
        return None  # two letters are no choice; "not B" is not B
    return alone[0].group(1)


def answers_match(gold: str, predicted: str) -> bool:
    """Whether ``predicted`` (an extracted answer) equals ``gold`` (see the module docstring).

    Args:
      gold: the ground truth: a bare answer, ``$…$`` math, a full solution with ``\\boxed{}``, or
        a multiple-choice letter.
      predicted: the answer string from ``extract_answer``.
    """
    if len(predicted) > MAX_ANSWER_CHARS:
        return False  # (and sympy on megabytes of text would stall the caller)
    if not _on_main_thread() and not _helper_state["unusable"]:
        return _match_in_helper(gold, predicted)
    return _match_here(gold, predicted)


@functools.cache
def _warm_up() -> None:
    """math-verify's first parse and verify import the sympy modules they use (units, sets,
    combinatorics: 1.7 s on a quiet host, past PARSE_TIMEOUT_S on a loaded one, where the first
    answer a process graded was scored wrong). Done once per process under a long limit."""
    limit = 20 * PARSE_TIMEOUT_S
    for gold, predicted in (("$2\\sqrt{3}$", "$[1, 2)$"), ("$x^2 + 1 = 0$", "$\\log_2 8$")):
        verify(*(parse(s, parsing_timeout=limit) for s in (gold, predicted)), timeout_seconds=limit)


def _match_here(gold: str, predicted: str) -> bool:
    if _on_main_thread():  # (where math-verify's limits apply)
        _warm_up()
    gold_boxed = final_boxed(gold)
    gold = _strip_delimiters(gold_boxed if gold_boxed is not None else gold)
    predicted = _strip_delimiters(predicted)
    letter = _LETTER_GOLD.match(gold)
    if letter:
        return _letter(predicted) == letter.group(1)
    # A one-word gold ("Even", "Paris") is a word, not a product of symbols (to math-verify PARIS
    # was not Paris, and "silent" was "listen"); an answer in notation ("a*b*c" for "abc",
    # "\\infty" for "infinity") still goes to math-verify.
    gold_word = _word(gold)
    # (not a product of symbols, "xy" = "yx", nor a multiple-choice set, "ABD" = "BAD": a word
    # has a vowel, and a set is capitals of the first letters; a short lowercase gold, "ab" or
    # "abc", may be either: equal words match, others go on to math-verify)
    if gold_word is not None and re.search("[aeiou]", gold_word) and not _CHOICE_SET.match(gold):
        predicted_word = _word(predicted[_LEAD_IN.match(predicted).end() :])
        if predicted_word is not None:
            if gold_word == predicted_word or not _SHORT_SYMBOLS.fullmatch(gold.strip()):
                return gold_word == predicted_word
    gold_parsed = _parsed(gold)
    if not gold_parsed:
        return bool(gold) and _plain(gold) == _plain(predicted)
    predicted_parsed = _parsed(predicted)
    if not predicted_parsed:
        return False
    if verify(gold_parsed, predicted_parsed, timeout_seconds=_timeout()):
        return True
    # math-verify takes "50\\%" for 50 only when the number is an integer ("12.5\\%" is never
    # 12.5): a percentage against a bare gold (or the reverse) is compared without its sign too.
    if bool(_PERCENT_SIGN.search(gold)) != bool(_PERCENT_SIGN.search(predicted)):
        gold_bare, predicted_bare = (_parsed(_PERCENT_SIGN.sub("", x)) for x in (gold, predicted))
        return bool(gold_bare and predicted_bare) and bool(
            verify(gold_bare, predicted_bare, timeout_seconds=_timeout())
        )
    return False


def accuracy_reward(completions: Sequence[Any], **columns: Any) -> list[float | None]:
    """1.0 when the completion's final answer equals the solution, else 0.0.

    Args:
      completions: [B] strings or chat-message lists.
      **columns: needs ``solution`` ([B] ground-truth answers; str or number); others are ignored.
    Returns:
      [B] floats in {0.0, 1.0}; ``None`` for rows whose solution is empty or missing (a float
      NaN too: a missing cell of a pandas or Parquet number column, whose "nan" an answer "nan"
      matched).
    """
    texts = completion_texts(completions)
    solutions = column(columns, "solution", len(texts), reward="accuracy_reward")
    rewards: list[float | None] = []
    for text, solution in zip(texts, solutions, strict=True):
        missing = isinstance(solution, numbers.Real) and solution != solution  # (NaN)
        if missing or solution is None or not str(solution).strip():
            rewards.append(None)
            continue
        answer = extract_answer(text)
        if answer is None or not answer.strip() or len(answer) > MAX_ANSWER_CHARS:
            rewards.append(0.0)
            continue
        rewards.append(1.0 if answers_match(_solution_text(solution), answer) else 0.0)
    return rewards


def _solution_text(solution: Any) -> str:
    """A solution cell as text; a float positionally, in its shortest digits (its repr "1e-07"
    is 1 - 7 + e to math-verify, e being Euler's number; int(1e23) is 99999999999999991611392)."""
    if not isinstance(solution, float | np.floating) or not np.isfinite(solution):
        return str(solution)  # (a bool is no float: True stays "True")
    return np.format_float_positional(solution, trim="-")
