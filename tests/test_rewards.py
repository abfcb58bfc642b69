"""Reward functions on strings, the composition with weights, and the host callback inside jit.

The hostile-code suite for ``code_reward`` lives in test_sandbox.py; here code runs only in
well-behaved programs. Numerical rewards (shaping, weighted totals) are checked against float64
numpy re-derivations of their formulas.
"""

import json
import logging
import math
import multiprocessing
import os
import re
import time
import types
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import pyarrow
import pytest

from r1jax.rewards import (
    HostRewardBridge,
    RewardSpec,
    accuracy_reward,
    build_reward_fn,
    code_reward,
    cosine_scaled_reward,
    extract_answer,
    extract_code,
    format_reward,
    language_consistency_reward,
    outputs_match,
    overlong_penalty_reward,
    parse_spec,
    repetition_penalty_reward,
    sandbox_available,
    tag_count_reward,
    task_reward,
)
from r1jax.rewards.common import completion_text, last_boxed, think_region
from r1jax.rewards.language import word_scripts

needs_sandbox = pytest.mark.skipif(not sandbox_available(), reason="bubblewrap not usable here")


def chat(text):
    return [{"role": "assistant", "content": text}]


# --- accuracy ----------------------------------------------------------------------------------

EQUIVALENT = [  # (gold, completion): same answer written differently
    # Two boxes are a hedge only as the final answer's last two, with different values.
    ("5", "<think>Is it \\boxed{3} or \\boxed{5}? Only 5 works.</think> It is \\boxed{5}."),
    ("5", "\\boxed{3} or \\boxed{5}? Checking both, the answer is \\boxed{5}."),
    ("\\frac{1}{2}", "<answer>\\boxed{\\frac{1}{2}} or \\boxed{0.5}</answer>"),
    # An answer of several values boxed one by one, joined by "and" or commas (only the last
    # box was read: 3); a gold solution's boxes alike.
    ("2, 3", "The roots are $\\boxed{2}$ and $\\boxed{3}$."),
    ("2, 3", "<answer>\\boxed{3}, \\boxed{2}</answer>"),
    ("The solutions are $\\boxed{-1}$ and $\\boxed{4}$.", "<answer>x = -1, 4</answer>"),
    ("18", "<answer>The answer is $18$ eggs.</answer>"),  # words around delimited math
    # "How many more / fewer / times": the count, with or without delimiters (only "$18$ more"
    # scored before, "18 more apples" was no answer).
    ("18", "<answer>18 more apples</answer>"),
    ("C", "<answer>Not B, so (C)</answer>"),  # (another letter, not offered: still a choice)
    ("B", "<answer>B, because C is wrong</answer>"),
    ("B", "<answer>The answer is B, I think</answer>"),  # (the pronoun is no option)
    ("B", "<answer>The answer is (B), I am confident</answer>"),
    ("B", "<answer>Between (A) and (B), (B)</answer>"),  # (the same letter twice: one)
    ("18", "<answer>18 fewer</answer>"),
    ("5", "<answer>5 times</answer>"),
    ("12\\pi", "<answer>The area is $12\\pi$.</answer>"),
    ("5", "<answer>The value of $x$ is $5$.</answer>"),
    ("5", "<answer>The answer to the question is $5$ km/h.</answer>"),
    ("5", "<answer>Die Antwort ist $5$.</answer>"),
    # ... and prose with hedge-like words away from the value is prose
    ("5", "<answer>Since $x = 2$ and $y = 3$, the sum is $5$.</answer>"),
    ("5", "<answer>Thinking about it again, the answer is $5$.</answer>"),
    ("5", "<answer>Since $x$ is not negative, $x = 5$.</answer>"),
    ("12", "<answer>$3$ times $4$ is $12$.</answer>"),
    ("5", "<answer>由以上可知，答案是 $5$。</answer>"),
    ("\\frac{1}{2}", "<answer>约分得 $\\frac{1}{2}$。</answer>"),
    ("1000", "<answer>1 000</answer>"),  # thousands grouped by a space or a thin space
    ("1\\,000", "<answer>1000</answer>"),
    ("12345", "<answer>12 345</answer>"),
    ("5°", "<answer>5^\\circ</answer>"),  # the degree sign
    ("90", "<answer>90°</answer>"),
    ("B", "<answer>B, not C</answer>"),
    ("\\frac{3}{4}", "<answer>0.75</answer>"),  # fraction vs decimal
    ("3/4", "<answer>$\\dfrac{3}{4}$</answer>"),
    ("\\frac{\\sqrt{2}}{2}", "<answer>\\frac{1}{\\sqrt{2}}</answer>"),  # radicals
    ("2\\sqrt{3}", "<answer>\\sqrt{12}</answer>"),
    ("\\{1, 2\\}", "<answer>\\{2,1\\}</answer>"),  # sets, order-free
    ("1, 2", "<answer>2, 1</answer>"),
    ("(0, 1]", "<answer>(0,1]</answer>"),  # intervals
    ("(-\\infty, 2)", "\\boxed{(-\\infty,2)}"),
    ("50\\%", "<answer>0.5</answer>"),  # percentages
    ("50\\%", "<answer>50</answer>"),
    ("12.5", "<answer>12.5\\%</answer>"),  # (math-verify drops the sign of integers only)
    ("12.5\\%", "<answer>12.5</answer>"),
    ("12.5", "<answer>12.5%</answer>"),
    ("5", "<answer>5\\,\\mathrm{cm}</answer>"),  # units in \\mathrm{} and compound ones
    ("60", "<answer>60\\,\\text{km/h}</answer>"),
    ("9.8", "<answer>9.8\\,\\mathrm{m/s^2}</answer>"),
    ("4", "<answer>4 (hours)</answer>"),
    ("1,000", "<answer>1000</answer>"),  # thousands separators
    ("1234567", "<answer>1,234,567</answer>"),
    ("B", "<answer>B</answer>"),  # multiple choice
    ("(C)", "<answer>\\text{(C)}</answer>"),
    ("D", "<answer>The answer is D</answer>"),
    ("A", "<answer>(A) 42</answer>"),
    ("3", "<answer>x = 3</answer>"),  # equation vs value
    ("x^2+2x+1", "<answer>(x+1)^2</answer>"),  # symbolic
    ("The answer is \\boxed{12}.", "<answer>12</answer>"),  # gold is a full solution
    ("Paris", "<answer>paris</answer>"),  # not math: compared as text
    (7, "<answer>7</answer>"),  # numeric gold
    # Words around the value (GSM8K's first problem is about eggs): wrapped in \boxed{} they
    # were products of symbols, 18*E*g*g*s, and only some units were dropped.
    ("18", "<answer>18 eggs</answer>"),
    ("18", "<answer>There are 18 apples in total.</answer>"),
    ("18", "<answer>The answer is 18</answer>"),
    ("18", "<answer>**18**</answer>"),
    ("\\frac{1}{2}", "<answer>\\frac{1}{2} cup</answer>"),
    ("1, 2", "<answer>1 and 2</answer>"),
    ("2ab", "<answer>2ab</answer>"),  # a product of variables is not a word
    ("abc", "<answer>a*b*c</answer>"),  # (a one-word gold in notation is still a product)
    ("xy", "<answer>yx</answer>"),  # (no vowel: a product, not a word)
    ("ab", "<answer>ba</answer>"),  # (short and lowercase: a product too, when not the word)
    ("abc", "<answer>cba</answer>"),
    ("ABCDEF", "<answer>FEDCBA</answer>"),
    ("ABD", "<answer>BAD</answer>"),  # (capitals of the first letters: a multiple-choice set)
    ("24", "<answer>24\\text{ units squared}</answer>"),  # (the unit first: "squared" is its)
    ("\\frac{xyz}{2}", "<answer>xyz/2</answer>"),
    ("12\\pi", "<answer>12\\pi square units</answer>"),  # a unit after a LaTeX value
    ("12\\pi", "<answer>12\\pi \\text{square units}</answer>"),
    ("\\infty", "<answer>infinity</answer>"),
    ("[1, \\infty)", "<answer>[1, infinity)</answer>"),
    ("\\pm 3", "<answer>x = 3 or x = -3</answer>"),
    ("5", "<answer>\\$5 per hour</answer>"),
    ("12", "<answer>12 \\text{ cm}^{2}</answer>"),  # a unit with its exponent
    ("\\pm 3", "<answer>x = 3 \\text{ or } x = -3</answer>"),
    ("yes", "<answer>\\text{Yes}</answer>"),
    ("0.5", "<answer>50 percent</answer>"),
    # A letter chosen in words: not the article "A" or the pronoun "I" that open the sentence.
    ("C", "<answer>A prime greater than 7, so (C)</answer>"),
    ("D", "<answer>a total of 12, which is option D</answer>"),
    ("B", "<answer>I believe it is (B)</answer>"),
    ("A", "<answer>It must be A</answer>"),
    ("B", "<answer>B because it is larger</answer>"),
    ("A", "<answer>A is larger</answer>"),
    ("B", "<answer>After checking (C), the answer is B</answer>"),
    ("B", "<answer>I'm sure it is B</answer>"),
    # Several values each in \\( \\) or \\[ \\], as with $…$ (the outer pair was stripped:
    # "5\\) and \\(6").
    ("5, 6", "<answer>\\(5\\) and \\(6\\)</answer>"),
    ("5, 6", "<answer>\\[5\\] and \\[6\\]</answer>"),
    ("5, 6", "<answer>\\(x=5\\) and \\(x=6\\)</answer>"),
    # A float solution is its digits (its repr "1e-07" was 1 - 7 + e to math-verify).
    (1e-07, "<answer>0.0000001</answer>"),
    (1e-07, "<answer>10^{-7}</answer>"),
    (1e16, "<answer>10000000000000000</answer>"),
    (2.5e-05, "\\boxed{0.000025}"),
    # A one-word gold is a word, compared case-folded (math-verify's product E*e*n*v was not
    # e*e*n*v).
    ("Paris", "<answer>PARIS</answer>"),
    ("Even", "<answer>\\text{even}.</answer>"),
    ("true", "<answer>True</answer>"),
    ("Yes", "<answer>The answer is yes.</answer>"),
    ("infinity", "<answer>\\infty</answer>"),  # (notation still goes to math-verify)
    # Unicode maths signs
    ("2\\sqrt3", "<answer>2√3</answer>"),
    ("\\sqrt{x+1}", "<answer>√(x+1)</answer>"),
    ("12", "<answer>3·4</answer>"),
    ("12", "<answer>3×4</answer>"),
    ("\\frac12", "<answer>½</answer>"),
    ("2.5", "<answer>2½</answer>"),
    ("(-\\infty, 2)", "<answer>(-∞, 2)</answer>"),
    ("x \\ge 3", "<answer>x ≥ 3</answer>"),
    ("-5", "<answer>−5</answer>"),
    # Text-mode commands math-verify does not know are \text (a value in them scored 0).
    ("12", "<answer>\\textsf{12}</answer>"),
    ("12", "<answer>The answer is $\\texttt{12}$.</answer>"),
    ("12", "<answer>12 \\hbox{ eggs}</answer>"),
    ("12", "\\boxed{\\textup{12}}"),
    ("\\textsf{12}", "<answer>12</answer>"),
]
DIFFERENT = [
    ("\\frac{3}{4}", "<answer>0.7</answer>"),
    ("2\\sqrt{3}", "<answer>\\sqrt{13}</answer>"),
    ("\\{1, 2\\}", "<answer>\\{1,3\\}</answer>"),
    ("(0, 1]", "<answer>[0,1]</answer>"),
    ("1,000", "<answer>100</answer>"),
    ("B", "<answer>C</answer>"),
    ("B", "<answer>The answer is A</answer>"),
    # A letter offered with another is no choice, however it is cued (only a leading "B or C"
    # counted as none; "The answer is B or C" chose B).
    ("B", "<answer>The answer is B or C</answer>"),
    ("B", "<answer>Option B, C</answer>"),
    ("C", "<answer>either (B) or (C)</answer>"),
    ("B", "<answer>(B) or maybe (C)</answer>"),
    ("B", "<answer>B or C is correct</answer>"),
    ("-5", "<answer>5</answer>"),
    ("Paris", "<answer>London</answer>"),
    ("18", "<answer>18 or 19</answer>"),  # two answers are none
    ("5", "<answer>3 (or 5)</answer>"),  # math-verify read "3 (, 5)" as 5
    ("5", "<answer>3 \\quad (\\text{or } 5)</answer>"),
    ("3", "<answer>3 \\text{ (or 5)}</answer>"),
    ("5", "<answer>4 \\textsf{ or } 5</answer>"),  # (\\hbox, \\texttt... are text as \\text is)
    ("5", "<answer>4 \\hbox{ or } 5</answer>"),
    ("12", "<answer>12 \\texttt{ thousand}</answer>"),
    ("D", "<answer>B (or D)</answer>"),
    ("5", "<answer>\\boxed{3} or \\boxed{5}</answer>"),  # the last box was taken
    ("5", "The answer is \\boxed{3} or \\boxed{5}."),
    ("3", "The roots are \\boxed{2} and \\boxed{3}."),  # (the last of a list is not the list)
    ("2", "<answer>\\boxed{2}, \\boxed{}</answer>"),  # (an empty box is no value: not joined)
    ("7", "x = \\boxed{5}. Then y = \\boxed{7} and z = \\boxed{9}."),  # (words: separate boxes)
    # A unit after a value is not the value's first number (12*pi is not 12).
    ("12", "<answer>12\\pi \\text{ square units}</answer>"),
    ("12", "<answer>The area is 12\\pi</answer>"),
    ("3", "<answer>3\\sqrt{2} units</answer>"),
    ("5", "<answer>5! ways</answer>"),
    ("144", "<answer>12 \\text{cm}^2</answer>"),  # the exponent is the unit's, not the value's
    # Words that change or hedge the value are not dropped: such an answer is no answer.
    ("18", "<answer>not 18</answer>"),
    ("18", "<answer>less than 18</answer>"),
    ("18", "<answer>18 thousand</answer>"),
    ("18", "<answer>18 or more</answer>"),
    ("18", "<answer>18 more than 5</answer>"),
    ("15", "<answer>5 times 3</answer>"),
    ("18", "<answer>half of 18</answer>"),
    ("18", "<answer>17 eggs or 18</answer>"),
    ("18", "<answer>I think 7, no 18</answer>"),
    ("6", "<answer>18 eggs, 6 per basket</answer>"),
    ("C", "<answer>The answer is B. Option C is wrong.</answer>"),
    ("B", "<answer>B or C</answer>"),  # two choices are none
    ("B", "<answer>(B) or (C)</answer>"),
    ("A", "<answer>A prime greater than 7, so (C)</answer>"),
    ("I", "<answer>I believe it is (B)</answer>"),
    ("A", "<answer>A or B</answer>"),
    # The same words around one delimited value ($…$ went to math-verify, which took the value)
    ("18", "<answer>not $18$</answer>"),
    ("18", "<answer>half of $18$</answer>"),
    ("18", "<answer>$18$ thousand</answer>"),
    ("18", "<answer>\\(18\\) or fewer</answer>"),
    ("18", "<answer>$17$ eggs or $18$</answer>"),
    ("5", "<answer>\\(6\\) or \\(5\\)</answer>"),
    ("18", "<answer>不是 $18$</answer>"),
    ("18", "<answer>about $18$</answer>"),
    ("18", "<answer>$18$ or so</answer>"),
    ("18", "<answer>$17$ or perhaps $18$</answer>"),
    ("B", "<answer>not B</answer>"),  # a negated choice is not that choice
    ("A", "<answer>except (A)</answer>"),
    ("1\\,000", "<answer>0</answer>"),  # a thin-space-grouped number is not a product
    ("6", "<answer>\\(x=5\\) or \\(x=6\\)</answer>"),  # (a hedge however delimited)
    ("6", "<answer>\\[x=5\\] or \\[x=6\\]</answer>"),
    # A one-word gold is not a product of letters, which an anagram equals.
    ("listen", "<answer>silent</answer>"),
    ("No", "<answer>On</answer>"),
    # Words in \\text{} that change the value are no unit (they were dropped as one).
    ("5", "\\boxed{5\\text{ thousand}}"),
    ("5", "\\boxed{5\\text{ squared}}"),
    ("5", "\\boxed{5\\text{ or more}}"),
    ("5", "<answer>5 \\text{at least}</answer>"),
]


@pytest.mark.parametrize("gold,completion", EQUIVALENT)
def test_accuracy_equivalent_forms(gold, completion):
    assert accuracy_reward([completion], solution=[gold]) == [1.0]


def test_the_first_answer_a_process_grades_is_not_charged_its_imports(monkeypatch):
    """math-verify's first comparisons import sympy modules (1-3 s here, more under load), and the
    first answers a process graded (a test worker's in CI, under load) ran out of the per-call
    limit and scored 0. They are made once, under a long limit, before any limited call."""
    from r1jax.rewards import accuracy

    limits = []

    def parse(s, *args, parsing_timeout, **kwargs):
        limits.append(parsing_timeout)
        return real_parse(s, *args, parsing_timeout=parsing_timeout, **kwargs)

    real_parse = accuracy.parse
    monkeypatch.setattr(accuracy, "parse", parse)
    accuracy._warm_up.cache_clear()
    accuracy._parse_math.cache_clear()
    assert accuracy_reward(["<answer>$\\sqrt{12}$</answer>"], solution=["$2\\sqrt{3}$"]) == [1.0]
    long, short = 20 * accuracy.PARSE_TIMEOUT_S, accuracy.PARSE_TIMEOUT_S
    assert limits == [long] * 4 + [short] * 2, limits


def test_a_missing_number_is_no_solution(monkeypatch):
    """A missing cell of a pandas or Parquet number column is a float NaN: its "nan" was the gold,
    which the answer "nan" matched. And the reward pool's size needs no Linux-only call."""
    import numpy as np

    from r1jax.rewards import compose

    nan_golds = [float("nan"), np.float32("nan"), 5.0]
    assert accuracy_reward(["<answer>nan</answer>"] * 3, solution=nan_golds) == [None, None, 0.0]
    # One numpy value is every row's (a 0-d array was split into its characters' rows).
    answers = ["<answer>18</answer>", "<answer>8</answer>"]
    for one in (np.int64(18), np.array("18")):
        assert accuracy_reward(answers, solution=one) == [1.0, 0.0]
    cores = compose._default_workers()
    monkeypatch.delattr(compose.os, "sched_getaffinity")  # (macOS, Windows)
    assert 1 <= compose._default_workers() <= 16 and cores >= 1


def test_a_parse_that_ran_out_of_time_is_not_remembered(monkeypatch):
    """math-verify's parse returns [] when it runs out of time, and that [] was cached: one slow
    moment on a loaded host made a gold unparseable for the rest of the worker's life (its right
    answers scored 0, compared as text)."""
    from math_verify.errors import TimeoutException

    from r1jax.rewards import accuracy

    assert accuracy_reward(["<answer>1</answer>"], solution=["1"]) == [1.0]  # (warmed up)
    real, timed_out = accuracy.parse, []

    def slow_once(s, *args, raise_on_error=False, **kwargs):  # as math-verify's own
        if not timed_out:
            timed_out.append(s)
            if raise_on_error:
                raise TimeoutException("Timeout during parsing")
            return []
        return real(s, *args, raise_on_error=raise_on_error, **kwargs)

    monkeypatch.setattr(accuracy, "parse", slow_once)
    gold, answer = "\\frac{3}{17}", ["<answer>3/17</answer>"]
    assert accuracy_reward(answer, solution=[gold]) == [0.0]  # (the loaded moment)
    assert timed_out and accuracy_reward(answer, solution=[gold]) == [1.0]


def test_a_float_solution_is_its_digits():
    """A float solution was its repr ("1e-07": 1 - 7 + e to math-verify); a numpy float is its own
    shortest digits, a bool is a word, and NaN is still no solution."""
    golds = [np.float32(1e-07), np.float32(0.1), 3.0, True, float("nan"), 1e23]
    answers = ["0.0000001", "0.1", "3", "true", "nan", "100000000000000000000000"]
    texts = [f"<answer>{a}</answer>" for a in answers]  # (int(1e23) is 99999999999999991611392)
    assert accuracy_reward(texts, solution=golds) == [1.0, 1.0, 1.0, 1.0, None, 1.0]


@pytest.mark.parametrize("gold,completion", DIFFERENT)
def test_accuracy_different_answers(gold, completion):
    assert accuracy_reward([completion], solution=[gold]) == [0.0]


def test_accuracy_extraction_order_and_no_answer():
    # The answer block wins over a box inside the reasoning; inside it, its own box wins.
    assert extract_answer("<think>\\boxed{5}</think><answer>so \\boxed{12}.</answer>") == "12"
    assert extract_answer("<think>x</think><answer> 7 </answer>") == " 7 "
    # Boxes joined by "and" are one answer of several values (as math-verify reads them).
    assert extract_answer("work... \\boxed{\\frac{1}{2}} and \\boxed{3}") == "\\frac{1}{2}, 3"
    assert extract_answer("\\boxed{1}. So \\boxed{3}") == "3"
    assert extract_answer("\\boxed{}, \\boxed{2}") == "2"
    assert extract_answer("the answer is 4") is None
    assert last_boxed("\\boxed{\\frac{a}{b}}") == "\\frac{a}{b}"
    assert last_boxed("\\boxed{\\frac{a}{b}") is None  # truncated
    completions = ["the answer is 4", "<answer></answer>", "<answer>4", "", "\\boxed{4"]
    assert accuracy_reward(completions, solution=["4"] * 5) == [0.0] * 5


def test_accuracy_off_the_main_thread_is_bounded_and_still_right(monkeypatch):
    """In-process scoring inside a jax.pure_callback runs off the main thread, where math-verify's
    alarm cannot fire: `9^{9^{9^{9}}}` held the GIL for over 300 s. There each comparison runs in
    a helper process, killed after OFF_THREAD_TIMEOUT_S, and the answer is scored wrong."""
    import concurrent.futures

    from r1jax.rewards import accuracy

    completions = [
        "<answer>\\frac{1}{2}</answer>",
        "<answer>9^{9^{9^{9}}}</answer>",
        "<answer>3</answer>",
    ]
    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        started = time.time()
        scores = thread.submit(accuracy_reward, completions, solution=["0.5", "7", "4"]).result()
    assert scores == [1.0, 0.0, 0.0]
    assert time.time() - started < accuracy.OFF_THREAD_TIMEOUT_S + 20
    # A comparison past the limit: the helper is killed, the answer is wrong, the next one works.
    monkeypatch.setattr(accuracy, "OFF_THREAD_TIMEOUT_S", 0.5)
    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        assert thread.submit(accuracy_reward, completions[1:2], solution=["7"]).result() == [0.0]
        monkeypatch.setattr(accuracy, "OFF_THREAD_TIMEOUT_S", 30)
        assert thread.submit(accuracy_reward, completions[:1], solution=["0.5"]).result() == [1.0]


def test_accuracy_columns_and_inputs():
    out = accuracy_reward(
        [chat("<answer>4</answer>"), "<answer>4</answer>", None, b"\xff<answer>4</answer>", 17],
        solution=["4", None, "4", "4", "4"],
        prompts=["p"] * 5,
        other_column=[1, 2, 3, 4, 5],
    )
    assert out == [1.0, None, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="`solution` column"):
        accuracy_reward(["<answer>4</answer>"])
    with pytest.raises(ValueError, match="2 entries for 1 completions"):
        accuracy_reward(["<answer>4</answer>"], solution=["4", "4"])
    assert accuracy_reward([], solution=[]) == []


def test_completion_text_formats():
    assert completion_text(chat("hi")) == "hi"
    assert (
        completion_text([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
        == "a"
    )
    assert (
        completion_text(chat([{"type": "text", "text": "x"}, {"type": "text", "text": "y"}]))
        == "xy"
    )
    assert completion_text([]) == completion_text(None) == completion_text(3.5) == ""
    assert completion_text([{"role": "assistant"}]) == ""


# --- format ------------------------------------------------------------------------------------


def test_format_reward():
    cases = {
        "<think>reason</think><answer>42</answer>": 1.0,
        "  <think>\nreason\n</think>\n<answer>\n42\n</answer>\n": 1.0,
        "<think>reason</think>": 0.0,
        "<answer>42</answer>": 0.0,
        "<answer>42</answer><think>reason</think>": 0.0,  # wrong order
        "hello <think>reason</think><answer>42</answer>": 0.0,  # text outside
        "<think>reason</think> so <answer>42</answer>": 0.0,
        "<think>reason</think><answer>42</answer> bye": 0.0,
        "<think>a</think><think>b</think><answer>42</answer>": 0.0,  # two think blocks
        "<think>a</think><answer>1</answer><answer>2</answer>": 0.0,
        "<think>  </think><answer>42</answer>": 0.0,  # empty block
        "<think>a</think><answer> </answer>": 0.0,
        "<think>\u200b</think><answer>42</answer>": 0.0,  # zero-width space: nothing visible
        "<think>a</think><answer>\ufeff\u2060 </answer>": 0.0,
        "<think>a <answer>1</answer></think><answer>2</answer>": 0.0,  # nested tags
        "": 0.0,
    }
    assert format_reward(list(cases)) == list(cases.values())
    assert format_reward([chat("<think>r</think><answer>1</answer>")], extra=[0]) == [1.0]
    # A template that pre-fills "<think>" leaves only the closing tag in the completion.
    assert format_reward(["r</think><answer>1</answer>"], prefix="<think>") == [1.0]
    assert format_reward(["r</think><answer>1</answer>"]) == [0.0]


def test_tag_count_reward():
    texts = [
        "<think>a</think><answer>b</answer>",
        "<think>a</think>",
        "<think><think></think>",
        "no tags",
        "<answer>x</answer><answer>y</answer>",
    ]
    assert tag_count_reward(texts) == [1.0, 0.5, 0.25, 0.0, 0.0]


# --- language ----------------------------------------------------------------------------------


def test_language_words_definition():
    text = "Let me try: $x^2 = 4$, so x is 2. 所以答案是二。 Wait, мир \\frac{1}{2} don't α"
    # latin: Let me try so is Wait don't (single letters and math removed); han: 所以答案是二
    assert word_scripts(text) == (["latin"] * 5 + ["han"] * 6 + ["latin", "cyrillic", "latin"])


def test_language_reward_cannot_be_hidden_in_math_or_code_spans():
    """A paragraph wrapped in $…$ or \\(…\\), or after an unclosed fence, is still read (these
    spans hid any amount of other-language reasoning: each row below scored 1.0); Latin letters
    inside math and closed code fences stay neutral (variables such as AB, identifiers)."""
    han = "我们先计算这个数字的平方然后再检查结果是否正确" * 5  # 125 Han words
    hacks = [
        ("Let me think ``` " + han, "en"),
        ("So $" + han + "$ done", "en"),
        ("\\(" + han + "\\)", "en"),
        ("我想 ``` " + "first add the numbers then check the result carefully " * 10, "zh"),
    ]
    for text, language in hacks:
        (score,) = language_consistency_reward([f"<think>{text}</think>"], language=language)
        assert score < 0.1, (text[:40], score)
    # A tag's name is ASCII: "<a因为…>" is text, not markup to skip.
    (score,) = language_consistency_reward(
        ["<think>‹a因为x等于3所以答案是5></think>"], language="en"
    )
    assert score < 0.5
    # 々 (repetition) is Han; Vietnamese letters (ệ, ạ) are Latin (languages are scripts).
    assert language_consistency_reward(["<think>人々は時々</think>"], language="ja") == [1.0]
    assert language_consistency_reward(["<think>Việt Nam đẹp lắm</think>"], language="en") == [1.0]
    zh_geometry = (
        "<think>因为 $AB = BC$ 所以 $\\angle ABC$ 是直角 ```python\nprint(ab)\n```</think>"
    )
    assert language_consistency_reward([zh_geometry], language="zh") == [1.0]
    # ... and outside them, as Chinese reasoning writes them: labels of up to three capitals and
    # function names are math (these scored 0.77, 0.57, 0.75); English words still count.
    labelled = [
        "因为 AB = AC，所以 △ABC 是等腰三角形。",
        "首先，AB=5，BC=12，那么 AC=13。",
        "所以 sin x = 1/2，log 2 和 gcd(4, 6) 都算。",
        "因为 ＡＢ＝ＡＣ，所以 tg x 和 arg z 都是。",  # (fullwidth, as an input method types)
    ]
    rows = [f"<think>{t}</think>" for t in labelled]
    assert language_consistency_reward(rows, language="zh") == [1.0] * 4
    assert word_scripts("因为 ABCD 是 square") == ["han", "han", "latin", "han", "latin"]
    # Math written with Unicode symbols is not a foreign language; an escaped dollar is a price.
    math = ["So the area is $x² + y² = r²$ and", "Let $f: ℝ → ℝ$ with $f(x_₁) = ½$", "$ℓ$ aⁿ"]
    assert language_consistency_reward(math, language="en") == [1.0, 1.0, 0.0]
    assert word_scripts("The cost is \\$5 and then \\$ here") == ["latin"] * 6
    # Modifier-letter superscripts (Aᵀ, 2ᵏ) and µ are math; fullwidth letters are Latin; an
    # accent written as a combining mark (NFD) does not split its word.
    assert language_consistency_reward(
        ["so Aᵀ is the transpose, 2ᵏ rows of 5 µm"], language="en"
    ) == [1.0]
    assert word_scripts("Ｈｅｌｌｏ re\u0301sume\u0301 café") == ["latin"] * 3
    assert word_scripts("$\\text{直角}$ and ```x = 1 # 注释```") == [
        "han",
        "han",
        "latin",
        "han",
        "han",
    ]


def test_language_consistency_values():
    completions = [
        "<think>first add the numbers then check</think><answer>5</answer>",  # 7 en words
        "<think>先把数字加起来 then check</think><answer>5</answer>",  # 7 han + 2 en
        "<think>$1 + 1 = 2$</think><answer>2</answer>",  # no words
        "plain reasoning with no tags 你好",  # untagged: whole text is the chain of thought
        "<think>한국어 문장 check</think>",
    ]
    en = language_consistency_reward(completions, language="en")
    zh = language_consistency_reward(completions, language="zh")
    np.testing.assert_allclose(en, [1.0, 2 / 9, 0.0, 5 / 7, 1 / 3])
    np.testing.assert_allclose(zh, [0.0, 7 / 9, 0.0, 2 / 7, 0.0])
    per_row = language_consistency_reward(completions[:2] + [""], language=["en", "zh-CN", None])
    np.testing.assert_allclose(per_row[:2], [1.0, 7 / 9])
    assert per_row[2] is None
    assert language_consistency_reward(completions[4:], language="ko") == [2 / 3]
    with pytest.raises(ValueError, match="unsupported language 'fr'"):
        language_consistency_reward(completions, language="fr")
    assert think_region("abc</think><answer>x</answer>") == "abc"


# --- shaping -----------------------------------------------------------------------------------


def test_cosine_scaled_reward_matches_formula():
    solution = ["4"] * 6
    texts = ["<answer>4</answer>" + "x" * k for k in (0, 300, 2000)]
    texts += ["<answer>5</answer>" + "x" * k for k in (0, 300, 2000)]
    got = cosine_scaled_reward(texts, solution=solution, max_len=1000)
    lengths = np.array([len(t) for t in texts], dtype=np.float64)
    c = np.cos(np.pi * np.minimum(lengths / 1000.0, 1.0))
    correct = np.array([1, 1, 1, 0, 0, 0], dtype=bool)
    want = np.where(correct, 0.5 + 0.5 * (1.0 - 0.5) * (1 + c), -0.5 + 0.5 * (-1.0 + 0.5) * (1 + c))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert got[0] > 0.999 and got[3] < -0.999  # short: best if right, worst if wrong
    assert got[2] == pytest.approx(0.5) and got[5] == pytest.approx(-0.5)
    # Token lengths are used when the batch carries completion_ids.
    tok = cosine_scaled_reward(texts[:1], solution=["4"], max_len=10, completion_ids=[[0] * 10])
    assert tok == [pytest.approx(0.5)]
    assert cosine_scaled_reward(["x"], solution=[None]) == [None]
    # Cut off at the budget: the mildest wrong reward, -0.5, better than a short wrong answer's
    # -1, unless exceed_length (the paper's penalty, the RL stage's -1) takes its place.
    cut = ["<think>" + "x" * 20, "<answer>5</answer>", "<answer>4</answer>" + "x" * 30]
    ids = [[0] * 20, [0] * 5, [0] * 20]
    plain = cosine_scaled_reward(cut, solution=["4"] * 3, max_len=20, completion_ids=ids)
    assert plain[0] == pytest.approx(-0.5) and plain[1] < plain[0]
    got = cosine_scaled_reward(
        cut, solution=["4"] * 3, max_len=20, completion_ids=ids, exceed_length=-1.0
    )
    assert got == [-1.0, plain[1], -1.0]


def test_cosine_scaled_reward_judges_built_in_rows_by_their_task_verifier():
    """A Countdown answer that is just the target (or any expression equal to it) matched the
    solution's value and earned ~+1: a reward for skipping the puzzle."""
    from r1jax.data import tasks

    [row] = tasks.make_dataset("countdown", 1, seed=0)
    target = row["meta"]["target"]
    texts = [
        f"<answer>{row['solution']}</answer>",
        f"<answer>{target}</answer>",
        "<answer>5</answer>",
    ]
    columns = {k: [row[k]] * 3 for k in ("task", "solution", "meta")}
    got = cosine_scaled_reward(texts, max_len=1000, **columns)
    assert got[0] > 0.99 and got[1] < -0.99 and got[2] < -0.99
    # A row no built-in verifier checks ("math") falls back to the answer's value.
    mixed = cosine_scaled_reward(texts[:2], max_len=1000, task=["math", None], solution=["4"] * 2)
    assert mixed == cosine_scaled_reward(texts[:2], max_len=1000, solution=["4"] * 2)


def test_repetition_penalty_reward():
    texts = ["a b c a b c", "one two three four", "x", "我 我 我 我", ""]
    got = repetition_penalty_reward(texts, ngram_size=2, max_penalty=-1.0)
    # bigrams: ab bc ca ab bc -> 3 distinct of 5; all distinct; too short; 我我 x3 -> 1 of 3.
    np.testing.assert_allclose(got, [-(1 - 3 / 5), 0.0, 0.0, -(1 - 1 / 3), 0.0])
    assert repetition_penalty_reward(["我我我我"], ngram_size=2) == [pytest.approx(-2 / 3)]
    with pytest.raises(ValueError, match="max_penalty must be <= 0"):
        repetition_penalty_reward(texts, max_penalty=0.5)


def test_overlong_penalty_reward_matches_dapo():
    lengths = np.array([0, 80, 81, 90, 99, 100, 101, 500])
    ids = [[1] * n for n in lengths]
    got = overlong_penalty_reward(
        ["x"] * len(ids), max_completion_length=100, soft_punish_cache=20, completion_ids=ids
    )
    want = np.clip((100.0 - 20.0 - lengths) / 20.0, -np.inf, 0.0)
    want[lengths > 100] = -1.0
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="completion_ids"):
        overlong_penalty_reward(["x"], max_completion_length=10, soft_punish_cache=2)
    with pytest.raises(ValueError, match="soft_punish_cache"):
        overlong_penalty_reward(
            ["x"], max_completion_length=10, soft_punish_cache=20, completion_ids=[[1]]
        )


# --- task verifiers ----------------------------------------------------------------------------


def test_task_reward_uses_the_data_layer_verifiers():
    from r1jax.data import tasks

    rows = tasks.make_dataset("arithmetic", 2, seed=0) + tasks.make_dataset("countdown", 1, seed=0)
    good = [f"<think>t</think><answer>{r['solution']}</answer>" for r in rows]
    bad = ["<answer>-1</answer>", "no answer", "<answer>1 + 1</answer>"]
    columns = {k: [r[k] for r in rows] * 2 for k in ("task", "solution", "meta")}
    assert task_reward(good + bad, **columns) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    # Extra per-call objects (TRL passes e.g. trainer_state) are shared, not split per row.
    assert task_reward(good, trainer_state=object(), **{k: v[:3] for k, v in columns.items()}) == [
        1.0,
        1.0,
        1.0,
    ]
    # Rows of a dataset file are labelled "math", "code", "chat": no built-in verifier applies
    # (other rewards score them), so the default RL rewards work on a GSM8K file too.
    assert task_reward(good[:3], task=["math", "code", None], solution=["7", None, None]) == [
        None,
        None,
        None,
    ]


# --- code (well-behaved programs; hostile ones are in test_sandbox.py) -------------------------


def test_extract_code_and_output_matching():
    text = "```python\nprint(1)\n```\nthen\n```py\nprint(2)\n```\n```python\nprint(3)"
    assert extract_code(text) == "print(2)\n"  # the last *closed* python block
    assert extract_code("```bash\nls\n```") is None
    # A fence closes a block at a line's start or end, not inside a string of the code.
    assert extract_code("```python\ns = '```'\nprint(s)\n```") == "s = '```'\nprint(s)\n"
    assert extract_code("```python\nprint(1)```\nDone.") == "print(1)"
    assert outputs_match("1 2  \n3\n\n", "1 2\n3")
    assert outputs_match("1\r\n2\r\n", "1\n2")
    # Tokens, as Codeforces' default checker reads them: any spacing between the same words.
    assert outputs_match("\n1  2\n3", "1 2 3") and outputs_match(" 1\t2", "1\n2")
    assert not outputs_match("0.50", "0.5") and not outputs_match("1 2", "12")
    # Only spaces, tabs, "\r" and "\n" separate them, as on a judge.
    assert not any(outputs_match(a, b) for a, b in [("1\x0c2", "1\n2"), ("5\xa0", "5")])
    assert not outputs_match("1\x0b2", "1 2") and outputs_match("1\x0b2", "1\x0b2")
    assert not outputs_match("", "0")
    # Real-valued answers (opt-in): absolute or relative error within the tolerance, per token.
    assert outputs_match("0.50 x 3", "0.5 x 3", 1e-6) and outputs_match("1e-7", "0.0", 1e-6)
    assert outputs_match("1000000.9", "1e6", 1e-6) and outputs_match("2.0000009", "2.0", 1e-6)
    assert not outputs_match("2.000003", "2.", 1e-6) and not outputs_match("0.5 y", "0.5 x", 1e-6)
    # ... but two integers only when equal (a tolerance took 999999937 for 10^9, an answer mod
    # 10^9 + 7 off by 63).
    assert not outputs_match("1000000000", "999999937", 1e-6)
    assert outputs_match("2.0000009", "2", 1e-6) and outputs_match("1e-7", "0", 1e-6)
    assert outputs_match("5.0 1e9 -0", "5 1000000000 0", 1e-6)  # (a real written for one)
    assert not outputs_match("1e9", "999999937", 1e-6)  # (... within the absolute error only)
    assert not outputs_match("1000000000.0", "999999937", 1e-6)
    assert not outputs_match("1.0000011e6", "1e6", 1e-6) and outputs_match(
        "-.5", "-0.5000001", 1e-6
    )
    assert not any(
        outputs_match(a, b, 1e-6)
        for a, b in [
            ("nan", "0"),
            ("inf", "1e400"),
            ("1e400", "1e401"),
            ("0x1", "1"),
            ("1", "1 1"),
        ]
    )
    assert not outputs_match("1\x0b2.0000001", "1 2.0", 1e-6)
    assert outputs_match("1\x0b 2.0000001", "1\x0b 2.0", 1e-6)  # (only space, tab, \r, \n split)
    # The answer's code: after </think> (not a draft in the reasoning, even when the answer's
    # own block is cut off), dedented when the block sits in a list item.
    draft = "<think>```python\nprint(0)\n```</think>"
    assert extract_code(draft + "Answer:\n```python\nprint(1)\n```") == "print(1)\n"
    assert extract_code(draft + "Answer:\n```python\nprint(1)") is None
    assert (
        extract_code("1. Code:\n   ```python\n   x = 1\n   print(x)\n   ```") == "x = 1\nprint(x)\n"
    )


def test_extract_code_matches_the_lazy_regex_and_reads_unclosed_fences_once():
    """Each opener is paired with the first closing fence after it in one pass: the blocks a
    non-overlapping lazy regex finds, and a degenerate completion of thousands of unclosed
    openers is read once (the regex rescanned to the end from each: 15 s at 88 kB, on eval's
    main loop and in every reward worker)."""
    import random
    import re
    import textwrap

    lazy = re.compile(
        r"```[ \t]*(?:python3?|py)[ \t]*\r?\n(.*?)(?:^[ \t]*```|```[ \t]*\r?$)",
        re.DOTALL | re.IGNORECASE | re.MULTILINE,
    )
    pieces = ["```python\n", "```Py3 \r\n", "```", "``` ", "\n", "\r\n", " ", "x", "</think>"]
    rng = random.Random(0)
    for _ in range(5000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        blocks = lazy.findall(text.rpartition("</think>")[2])
        assert extract_code(text) == (textwrap.dedent(blocks[-1]) if blocks else None), text
    hostile = "a```python\n" * 200_000  # 2.2 MB, nothing closed
    assert extract_code(hostile) is None and extract_code("```py\n" + hostile) is None


@needs_sandbox
def test_code_reward_fraction_passed():
    program = "```python\nn = int(input())\nprint(n * 2 if n < 3 else n)\n```"
    tests = [{"input": f"{n}\n", "output": f"{2 * n}\n"} for n in range(5)]  # n=0..2 pass
    crash = "```python\nraise SystemExit(3)\n```"
    as_json = '[{"input": "1", "output": "2"}]'
    contest = {"inputs": ["2"], "outputs": ["4"]}
    out = code_reward(
        [program, chat(program), crash, "no code", program, program, program],
        tests=[tests, tests, tests, tests, as_json, contest, []],
        extra=[0] * 7,
    )
    assert out == [0.6, 0.6, 0.0, 0.0, 1.0, 1.0, None]
    assert code_reward([program], tests=["{not json"]) == [None]
    # The shapes the loaders read, read alike here: code_contests' input/output lists, lines
    # given as lists, numbers; APPS call-based tests (fn_name) ran as stdin tests and scored 0.
    others = [
        {"input": ["2"], "output": ["4"]},
        [{"input": ["1", ""], "output": 2}],
        {"fn_name": "double", "inputs": [[1]], "outputs": [[2]]},
    ]
    assert code_reward([program] * 3, tests=others) == [1.0, 1.0, None]
    third = "```python\nprint(1 / 3, 2 / 3)\n```"
    real = [[{"input": "", "output": "0.333333 0.666667\n"}]]
    assert code_reward([third], tests=real) == [0.0]
    assert code_reward([third], tests=real, sandbox={"float_tolerance": 1e-6}) == [1.0]
    with pytest.raises(ValueError, match="float_tolerance must be >= 0"):
        code_reward([third], tests=real, sandbox={"float_tolerance": -1})
    # A long run of digits is compared in linear time (the number pattern backtracked
    # quadratically: 12 s for 20 kB, holding the GIL, hours for the 1 MiB output cap).
    from r1jax.rewards.code import _close

    start = time.monotonic()
    assert not _close(b"1" * 200_000 + b"x", b"1", 1e-6)
    assert time.monotonic() - start < 5.0


# --- composition -------------------------------------------------------------------------------


def reference_total(per_reward, weights):
    per = np.asarray(per_reward, dtype=np.float64)
    return np.nansum(np.asarray(weights, dtype=np.float64)[:, None] * per, axis=0)


COMPLETIONS = [
    "<think>add them</think><answer>4</answer>",
    "<think>加起来</think><answer>5</answer>",
    "<answer>4</answer>",
    "nothing",
]
COLUMNS = dict(solution=["4", "4", None, "4"], language="en", prompt=["p"] * 4)


def test_build_reward_fn_weights_and_per_reward_values():
    specs = [
        ("accuracy", 2.0, {}),
        ("format", 0.5),
        {"name": "language_consistency", "weight": -1.0},
    ]
    with build_reward_fn(specs, num_workers=0) as fn:
        out = fn(COMPLETIONS, **COLUMNS)
    want_per = np.array([[1, 0, np.nan, 0], [1, 1, 0, 0], [1, 0, 0, 1]], dtype=np.float64)
    np.testing.assert_array_equal(out.per_reward, want_per.astype(np.float32))
    np.testing.assert_allclose(out.total, reference_total(want_per, [2.0, 0.5, -1.0]), atol=1e-6)
    assert out.names == ("accuracy", "format", "language_consistency")
    assert out.total.dtype == np.float32 and out.per_reward.shape == (3, 4)
    metrics = out.metrics()
    assert metrics["rewards/accuracy"] == pytest.approx(1 / 3)
    assert metrics["rewards/accuracy/none_frac"] == pytest.approx(0.25)


def learned_rm_stub(completions, **columns):
    """Stands in for a learned reward model: any callable with the TRL signature."""
    return [len(c) / 100.0 for c in completions]


def test_numpy_and_arrow_columns_score_as_lists():
    """A pyarrow column reached the rewards as pyarrow scalars (a task name unequal to every
    task's: every row unscored, total 0), and a numpy one was not split per row in-process."""
    import random

    from r1jax.data import tasks

    rng = random.Random(0)
    rows = [tasks.make_task("countdown").sample(rng)[1] for _ in range(4)]
    completions = [f"<answer>{r['solution']}</answer>" for r in rows]
    columns = {k: [r[k] for r in rows] for k in ("task", "meta", "solution")}
    for workers in (0, 2):
        with build_reward_fn(["task"], num_workers=workers) as fn:
            for convert in (pyarrow.array, lambda v: np.array(v, dtype=object)):
                out = fn(completions, **{k: convert(v) for k, v in columns.items()})
                assert out.total.tolist() == [1.0] * 4, (workers, convert)


def test_pool_matches_serial_and_custom_callables():
    specs = [
        ("accuracy", 1.0, {}),
        ("format", 1.0, {}),
        ("tag_count", 0.25, {}),
        RewardSpec("rm", 0.1, fn=learned_rm_stub),
    ]
    batch = COMPLETIONS * 5
    columns = dict(solution=COLUMNS["solution"] * 5, language="en")
    with (
        build_reward_fn(specs, num_workers=0) as serial,
        build_reward_fn(specs, num_workers=2) as pooled,
    ):
        a, b = serial(batch, **columns), pooled(batch, **columns)
        assert not pooled.specs[3].parallel and pooled.specs[0].parallel
        np.testing.assert_array_equal(a.per_reward, b.per_reward)
        np.testing.assert_array_equal(a.total, b.total)
        np.testing.assert_allclose(b.per_reward[3], [len(c) / 100.0 for c in batch], rtol=1e-6)
        # A column of another array type (pyarrow, pandas) is split per worker as a list is.
        arrow = dict(columns, solution=pyarrow.array(columns["solution"]))
        np.testing.assert_array_equal(pooled(batch, **arrow).total, a.total)
        # Configuration errors inside a worker reach the caller unchanged.
        with pytest.raises(ValueError, match="`solution` column"):
            pooled(batch)


def test_specs_from_a_config_dict_and_column_overrides():
    import ml_collections

    config = ml_collections.ConfigDict()
    config.rewards = {
        "format": 0.5,
        "language_consistency": {"weight": 2.0, "kwargs": {"language": "zh"}},
    }
    texts = [
        "<think>先想</think><answer>1</answer>",
        "<think>think first</think><answer>1</answer>",
    ]
    with build_reward_fn(config.rewards, num_workers=0) as fn:
        assert fn.names == ("format", "language_consistency")
        np.testing.assert_allclose(fn(texts).per_reward, [[1, 1], [1, 0]])
        # A per-row dataset column of the same name overrides the configured default.
        np.testing.assert_allclose(fn(texts, language=["zh", "en"]).per_reward[1], [1, 1])
        np.testing.assert_allclose(fn(texts).total, [0.5 + 2.0, 0.5])
    with pytest.raises(ValueError, match="unknown sandbox options"):
        code_reward(["x"], tests=[[]], sandbox={"timeout": 1})


def dies_in_worker(completions, **columns):
    """A reward whose worker process dies (as under the OOM killer) on the sample "die"."""
    import multiprocessing
    import os

    if "die" in completions and multiprocessing.parent_process() is not None:
        os._exit(1)
    return [1.0] * len(completions)


def test_worker_death_loses_one_chunk_not_the_trainer():
    spec = RewardSpec("fragile", 1.0, fn=dies_in_worker, parallel=True)
    with build_reward_fn([spec, ("format", 1.0, {})], num_workers=2) as fn:
        fn.chunks_per_worker = 2  # 4 chunks of 2
        out = fn(["a", "b", "c", "die", "e", "f", "g", "h"])
        np.testing.assert_array_equal(out.per_reward[0], [1, 1, np.nan, np.nan, 1, 1, 1, 1])
        np.testing.assert_array_equal(out.per_reward[1], [0, 0, np.nan, np.nan, 0, 0, 0, 0])
        # Unscored, not scored 0 (GRPO then leaves them out of their groups' statistics).
        np.testing.assert_array_equal(out.total, [1, 1, np.nan, np.nan, 1, 1, 1, 1])
        assert out.metrics()["reward"] == 1.0
        assert fn(["ok"] * 4).per_reward[0].tolist() == [1.0] * 4  # the pool was rebuilt
        # Every sample kills its worker, but a new pool works: those samples are unscored, the
        # run goes on (one such sample, alone in its batch, said "the pool itself is failing").
        assert np.isnan(fn(["die"]).total).all() and np.isnan(fn(["die"] * 2).total).all()
        assert fn(["ok"]).total.tolist() == [1.0]

        class NothingRuns:  # (a pool whose workers die whatever they run, e.g. no main guard)
            def submit(self, *args, **kwargs):
                raise BrokenProcessPool("a worker died")

            def shutdown(self, **kwargs):
                pass

        fn._get_pool = NothingRuns
        with pytest.raises(RuntimeError, match="every reward worker died.*cannot run a trivial"):
            fn(["a"] * 2)


def hangs_in_worker(completions, **columns):
    """A reward that never returns (in a pool worker) on the sample "hang"."""
    import time

    if "hang" in completions and multiprocessing.parent_process() is not None:
        time.sleep(3600)
    return [1.0] * len(completions)


def backtracks_in_worker(completions, **columns):
    """A reward stuck in C code holding the GIL (a regex backtracking) on the sample "regex"."""
    import re

    if "regex" in completions and multiprocessing.parent_process() is not None:
        re.match(r"(a+)+$", "a" * 64 + "b")
    return [1.0] * len(completions)


def test_a_reward_that_never_returns_costs_its_samples_not_the_run(caplog):
    """A pooled reward stuck on one sample (a custom reward waiting on a dead service) held the
    trainer forever; its worker now ends itself at the chunk's deadline, naming the reward."""
    spec = RewardSpec("stuck", 1.0, fn=hangs_in_worker, parallel=True)
    with build_reward_fn([spec, ("format", 1.0, {})], num_workers=2, timeout_s=0.5) as fn:
        fn.chunks_per_worker = 2  # 4 chunks of 2
        start = time.monotonic()
        with caplog.at_level(logging.ERROR, logger="r1jax.rewards.compose"):
            out = fn(["a", "b", "c", "d", "hang", "f", "g", "h"])
        np.testing.assert_array_equal(out.total, [1, 1, 1, 1, np.nan, np.nan, 1, 1])
        assert time.monotonic() - start < 60  # (two deadlines of 1 s, a rebuilt pool)
        said = caplog.text
        assert "reward 'stuck' was still scoring samples [4, 6) after 1 s" in said, said
        assert "died again on samples [4, 6)" in said, said
        assert fn(["ok"] * 4).total.tolist() == [1.0] * 4  # the pool was rebuilt
    # Stuck in C with the GIL held, the watchdog thread never runs: faulthandler's timer ends it.
    spec = RewardSpec("backtracks", 1.0, fn=backtracks_in_worker, parallel=True)
    with build_reward_fn([spec], num_workers=2, timeout_s=0.5) as fn:
        fn._backstop_s = 1.0
        out = fn(["a", "regex", "c", "d"])
        np.testing.assert_array_equal(out.total, [1, np.nan, 1, 1])
        # A deadline past what faulthandler's clock holds is no deadline (it raised on every
        # chunk); a report a finished chunk left behind is dropped with the next call.
        fn.timeout_s = 1e9
        assert fn(["a", "c"]).total.tolist() == [1.0, 1.0]
        fn._reports.put((0, 1, "stale"))
        assert fn(["a"]).total.tolist() == [1.0] and fn._reports.empty()
    # Scoring that takes its time within the deadline is untouched (slow but not stuck).
    with build_reward_fn([("format", 1.0, {})], num_workers=1, timeout_s=0.0) as fn:
        assert fn(["x"] * 3).total.tolist() == [0.0] * 3
    with pytest.raises(ValueError, match=r"timeout_s \(seconds per sample\) must be >= 0"):
        build_reward_fn(["format"], timeout_s=-1)


def test_reward_pool_config_reaches_the_pools():
    from r1jax.stages import common
    from r1jax.stages import eval as eval_stage

    config = common.default_config("rl")
    assert common.reward_pool_options(config) == {"num_workers": None, "timeout_s": 120.0}
    config.reward_pool.workers, config.reward_pool.timeout_s = 3, 7.5
    assert common.reward_pool_options(config) == {"num_workers": 3, "timeout_s": 7.5}
    # A code row's 100 tests may each run to sandbox.timeout_s (3 s here): its sample's share of
    # the chunk's deadline covers that; a row without tests gets timeout_s.
    tests = [{"input": "", "output": "1"}] * 100
    code = [("code", 1.0, {"sandbox": {"timeout_s": 3.0}}), "accuracy"]
    with build_reward_fn(code, num_workers=1, timeout_s=7.5) as fn:
        assert fn._deadline_s(fn.specs, {"tests": [tests, None]}, 2) == 300.0 + 7.5
        assert fn._deadline_s(fn.specs, {"solution": ["1", "2"]}, 2) == 15.0
        assert fn._deadline_s(fn.specs, {"tests": json.dumps(tests)}, 2) == 600.0  # (all rows')
    with build_reward_fn(["accuracy"], num_workers=1, timeout_s=7.5) as fn:
        assert fn._deadline_s(fn.specs, {"tests": [tests, None]}, 2) == 15.0  # (no code reward)
    with build_reward_fn(code, num_workers=1, timeout_s=0) as fn:
        assert fn._deadline_s(fn.specs, {"tests": [tests, None]}, 2) == 0.0  # (none stays none)
    rows = types.SimpleNamespace(rows=[{"task": None}, {"task": "arithmetic"}])
    with eval_stage.Grader(rows, config) as grade:
        pools = {k: (f.num_workers, f.timeout_s) for k, f in grade._by_kind.items()}
    assert pools == {"accuracy": (3, 7.5), "task": (0, 7.5)}  # (cheap checks in-process)
    # The pipeline's top-level section reaches every stage; no setting of it retrains a stage
    # or rebuilds the toy base.
    from r1jax.stages import pipeline

    whole = common.default_config("pipeline")
    whole.reward_pool.timeout_s = 7.5
    assert pipeline._stage_config(whole, "r1_zero").reward_pool.timeout_s == 7.5
    assert pipeline._eval_config(whole, "toy").reward_pool.timeout_s == 7.5
    assert pipeline._result_neutral("reward_pool.timeout_s", "rl")
    pretrain = common.default_config("pretrain")
    pretrain.reward_pool.workers = 3
    assert common.toy_recipe(pretrain) == common.toy_recipe()
    for field, value, message in (
        ("workers", -2, "reward_pool.workers must be an integer >= -1"),
        ("timeout_s", -1.0, "reward_pool.timeout_s must be a number of seconds per sample >= 0"),
        ("timeout_s", float("inf"), "reward_pool.timeout_s must be a number"),
    ):
        bad = common.default_config("eval")
        bad.reward_pool[field] = value
        with pytest.raises(common.ConfigError, match=re.escape(message)):
            common.validate(bad, "eval")


def test_ctrl_c_in_a_terminal_leaves_the_reward_workers_alone():
    """Ctrl-C reaches the whole foreground process group: every worker died of it (tracebacks,
    "a reward worker died", a rebuilt pool) while the trainer was saving its step."""
    import signal

    with build_reward_fn([("format", 1.0, {})], num_workers=2) as fn:
        fn.warmup()
        workers = list(fn._pool._processes.values())
        for worker in workers:
            os.kill(worker.pid, signal.SIGINT)
        assert fn(["<think>a</think><answer>1</answer>"] * 4).total.tolist() == [1.0] * 4
        assert all(worker.is_alive() for worker in workers)
        assert list(fn._pool._processes.values()) == workers  # the same pool


def test_a_worker_dying_while_chunks_are_still_being_submitted_is_retried():
    # A dead worker marks the pool broken at once, so a later submit() of the same call raises
    # instead of returning a future: that chunk must be retried like the others.
    with build_reward_fn([("format", 1.0, {})], num_workers=2) as fn:
        real, submits = fn._get_pool(), []

        class BreaksOnSecondSubmit:
            def submit(self, *args, **kwargs):
                submits.append(args)
                if len(submits) == 2:
                    raise BrokenProcessPool("a worker died")
                return real.submit(*args, **kwargs)

            def shutdown(self, **kwargs):
                real.shutdown(**kwargs)

        fn._pool = BreaksOnSecondSubmit()
        good = "<think>a</think><answer>1</answer>"
        out = fn([good, "x", good, "y"])
        assert len(submits) >= 2
        np.testing.assert_array_equal(out.per_reward[0], [1, 0, 1, 0])


def test_spec_parsing_errors():
    assert parse_spec("format").weight == 1.0
    assert parse_spec(("format", 0.5, {"prefix": "<think>"})).kwargs == {"prefix": "<think>"}
    assert parse_spec((learned_rm_stub, 0.3)).name == "learned_rm_stub"
    with pytest.raises(ValueError, match="unknown reward 'acuracy'"):
        build_reward_fn([("acuracy", 1.0, {})])
    with pytest.raises(ValueError, match="unique"):
        build_reward_fn(["format", "format"])
    with pytest.raises(ValueError, match="unknown keys"):
        build_reward_fn([{"name": "format", "wieght": 1.0}])
    with pytest.raises(ValueError, match="at least one"):
        build_reward_fn([])


def test_bad_inputs_never_crash():
    huge = "<think>" + "blah " * 400_000 + "</think><answer>" + "9" * 5000 + "</answer>"
    weird = [
        "",
        None,
        42,
        b"\xff\xfe",
        [],
        [{"role": "assistant"}],
        "\udcff<answer>4</answer>",
        huge,
        "\\boxed{1 " * 8000,  # a stuck model's unclosed boxes (a scan per box: 36 s)
    ]
    specs = ["accuracy", "format", "tag_count", "language_consistency", "repetition_penalty"]
    start = time.monotonic()
    with build_reward_fn(specs, num_workers=0) as fn:
        out = fn(weird, solution=["4"] * len(weird), language="en")
    assert time.monotonic() - start < 20
    assert out.per_reward.shape == (5, len(weird))
    np.testing.assert_array_equal(out.per_reward[0], [0, 0, 0, 0, 0, 0, 1, 0, 0])
    assert np.isfinite(out.total).all()
    with pytest.raises(ValueError, match="list with one entry per sample"):
        format_reward("a single string")


# --- host callback inside jit ------------------------------------------------------------------

VOCAB = list("<>/abcdefghijklmnopqrstuvwxyz0123456789 ")


def decode(batch):
    return ["".join(VOCAB[i] for i in ids) for ids in batch]


def encode(texts, width):
    tokens = np.zeros((len(texts), width), np.int32)
    for b, t in enumerate(texts):
        tokens[b, : len(t)] = [VOCAB.index(ch) for ch in t]
    return tokens, np.array([len(t) for t in texts], np.int32)


def test_host_callback_inside_jit_on_a_sharded_batch():
    # jax is imported here, not at module level: pool workers import this module to unpickle the
    # test's reward functions, and should not pay for jax.
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    texts = [
        "<think>ok</think><answer>4</answer>",
        "<answer>4</answer>",
        "<answer>5</answer>",
        "junk",
        "<think>so</think><answer>12</answer>",
        "<answer>7</answer>",
        "<think>x</think><answer>4</answer>zz",
        "",
    ]
    tokens, lengths = encode(texts, 40)
    tokens[:, 38:] = 1  # padding beyond each length must be ignored
    lengths[-1] = 0
    row_ids = np.array([0, 0, 0, 0, 1, 1, 0, 1], np.int32)
    columns = {"solution": ["4", "12"]}
    fn = build_reward_fn(
        [
            ("accuracy", 1.0, {}),
            ("format", 0.5, {}),
            ("overlong_penalty", 1.0, {"max_completion_length": 30, "soft_punish_cache": 10}),
        ],
        num_workers=0,
    )
    bridge = HostRewardBridge(fn, decode, columns)

    @jax.jit
    def score(tokens, lengths, row_ids):
        total, per_reward = bridge(tokens, lengths, row_ids)
        return total - jnp.mean(total), per_reward  # stand-in for the advantage computation

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    shard = NamedSharding(mesh, PartitionSpec("data"))
    centred, per_reward = score(
        jax.device_put(tokens, shard),
        jax.device_put(lengths, shard),
        jax.device_put(row_ids, shard),
    )
    direct = fn(
        [t[:n] for t, n in zip(texts, lengths, strict=True)],
        solution=[columns["solution"][i] for i in row_ids],
        completion_ids=[[0] * n for n in lengths],
    )
    np.testing.assert_allclose(per_reward, direct.per_reward)
    np.testing.assert_allclose(centred, direct.total - direct.total.mean(), atol=1e-6)
    assert per_reward.shape == (3, 8) and math.isclose(float(per_reward[0, 4]), 1.0)


def test_only_a_completion_cut_off_at_the_budget_takes_the_exceed_length_penalty():
    """The bridge tells the rewards which completions filled the budget without a stop token:
    one that ended with its stop token or a stop string exactly at the budget scored -1 as if
    cut off (lengths alone cannot tell them apart)."""
    from r1jax.data import StopStrings
    from r1jax.rewards import HostRewardBridge, build_reward_fn

    spec = {"max_len": 4, "exceed_length": -1.0}
    fn = build_reward_fn([("cosine_scaled", 1.0, spec)], num_workers=0)
    eos = 9
    words = {1: "<answer>4</answer>", 2: "<answer>5</answer>", eos: ""}
    bridge = HostRewardBridge(
        fn, lambda ids: ["".join(words[t] for t in x) for x in ids], {"solution": ["4"]}, [eos]
    )
    tokens = np.array([[1, 0, 0, eos], [1, 0, 0, 0], [1, 0, eos, 0], [2, 0, 0, 0]], np.int32)
    words[0] = " so"
    total, _ = bridge.score_host(tokens, np.array([4, 4, 3, 4]), np.zeros(4, np.int32))
    # right, stop token at the budget: the cosine's end (0.5); right or wrong, cut off: -1
    assert total[0] == pytest.approx(0.5) and total[1] == -1.0 and total[3] == -1.0
    assert total[2] == pytest.approx(0.5 + 0.5 * 0.5 * (1 + np.cos(np.pi * 3 / 4)))

    # A stop string the last token completes ends the row as the sampler saw it; one the text
    # holds only across the "<think>" prefilled before the completion does not.
    words.update({3: "<answer>4</ans", 4: "wer>", 5: "User:"})
    stops = StopStrings([words.get(i, "") for i in range(10)], ["</answer>", "\nUser:"])
    bridge = HostRewardBridge(
        fn,
        lambda ids: ["<think>\n" + "".join(words[t] for t in x) for x in ids],
        {"solution": ["4"]},
        [eos],
        stops,
    )
    tokens = np.array([[0, 0, 3, 4], [5, 0, 0, 0]], np.int32)
    total, _ = bridge.score_host(tokens, np.array([4, 4]), np.zeros(2, np.int32))
    assert total[0] == pytest.approx(0.5) and total[1] == -1.0


def test_tag_regions_match_the_lazy_regex_and_survive_thousands_of_unclosed_tags():
    """The regions are found with str.find: the same bodies as a non-overlapping lazy match, and a
    hostile completion of tens of thousands of unclosed tags is read once (the lazy regex
    rescanned to the end from every opening tag)."""
    import random
    import re

    from r1jax.rewards.common import answer_region

    pieces = ["<think>", "</think>", "<answer>", "</answer>", "a", " 7 ", "\n"]
    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        think = re.search(r"<think>(.*?)</think>", text, re.DOTALL)
        if think:
            assert think_region(text) == think.group(1), text
        answers = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
        assert answer_region(text) == (answers[-1] if answers else None), text
    hostile = "<think><answer>\\[\\($$" * 40_000 + "</think>"  # ~900 kB, nothing else closed
    assert think_region(hostile).startswith("<answer>")
    assert answer_region(hostile) is None
    assert word_scripts(hostile) == []
    assert format_reward([hostile]) == [0.0]
    # A box of unclosed "\\(" before a last one, "or" between: the hedge check compared the two
    # boxes, the first as the gold, whose math spans a lazy regex rescanned from every opener
    # (30 s here, in C, where math-verify's alarm cannot reach; minutes at the length cap).
    for opener in ("\\(x ", "\\[x "):
        boxes = "<think>hm</think>\\boxed{" + opener * 40_000 + "} or \\boxed{5}"
        started = time.monotonic()
        assert extract_answer(boxes) is None  # (a hedge: no answer)
        assert time.monotonic() - started < 5
    from r1jax.rewards import accuracy

    started = time.monotonic()
    assert len(list(accuracy._MATH_SPAN.finditer("\\(x " * 40_000 + "\\[y \\]"))) == 1
    assert time.monotonic() - started < 5


def test_an_escaped_dollar_is_a_currency_sign_not_math():
    gold = ["18"] * 4
    answers = [
        "<answer>\\$18</answer>",
        "\\boxed{\\$18}",
        "<answer>$18$</answer>",
        "\\boxed{\\$17}",
    ]
    assert accuracy_reward(answers, solution=gold) == [1.0, 1.0, 1.0, 0.0]


KILLED_TRAINER = """
import os, time
from r1jax.rewards import build_reward_fn
if __name__ == "__main__":
    f = build_reward_fn({"format": 1.0}, num_workers=2)
    f(["<think>a</think><answer>1</answer>"] * 4)
    print("READY", *f._pool._processes, flush=True)
    time.sleep(120)
"""


def test_reward_workers_exit_when_the_trainer_is_killed(tmp_path):
    """A SIGKILLed trainer (an OOM kill, `kill -9`) must not leave its reward workers (and the
    fork server they keep alive) running."""
    import signal
    import subprocess
    import sys

    script = tmp_path / "trainer.py"
    script.write_text(KILLED_TRAINER)
    trainer = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=tmp_path
    )
    line = trainer.stdout.readline()
    assert line.startswith("READY"), line
    workers = [int(p) for p in line.split()[1:]]
    assert len(workers) == 2
    trainer.send_signal(signal.SIGKILL)
    trainer.wait()
    deadline = time.monotonic() + 20
    alive = workers
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in workers if os.path.exists(f"/proc/{p}") and _state(p) != "Z"]
    assert not alive, f"reward workers {alive} outlived the killed trainer"


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"
