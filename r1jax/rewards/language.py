"""Language-consistency reward (DeepSeek-R1, stage 2): share of the chain of thought in the target
language.

The R1 paper defines the reward as "the proportion of target language words in the CoT". This
module makes "word" and "language" precise, by script, using only the standard library:

- **The chain of thought** is the first ``<think>…</think>`` body (see ``common.think_region``).
- **Neutral text**: LaTeX commands (``\\frac``) and markup tags (``<answer>``) are removed, and in
  closed code fences and math spans (``$…$``, ``$$…$$``, ``\\(…\\)``, ``\\[…\\]``) Latin letters
  do not count (identifiers, keywords, variables such as ``AB``): formulas and code are not
  written in any natural language. Every other script still counts there, and an unclosed fence
  or delimiter hides nothing, so wrapping a paragraph in ``$…$`` or opening a fence does not
  hide it (a policy under RL finds such holes). What stays unseen: Latin-script words inside
  math or code, and English written in words of up to three capitals, for targets other than
  ``en``.
- **Words.** Each CJK ideograph (Han) is one word, as is each kana character: Chinese and
  Japanese have no spaces, and a character is the unit a tokenizer-free count can rely on (a
  Chinese word averages 1.5 characters, so Chinese is slightly over-weighted relative to
  English). A maximal run of letters of any other script is one word (so Hangul words, which
  are space-separated, count once). Digits, punctuation, symbols, super- and subscripts,
  letterlike symbols (``ℝ``) and Greek letters (almost always math variables here) are not
  words. A single Latin letter is not a word either: in a chain of thought it is nearly always a
  variable (``x``, ``n``); this costs English only "a" and "I". Nor are two or three capitals
  (points, segments, triangles: ``AB``, ``ABC``) or a math function's name (``sin``, ``log``,
  ``gcd``; ``_MATH_NAMES``): Chinese reasoning writes them in its prose, outside ``$…$``, and
  they are no English. This costs English "OK" and the like.
- **Languages are scripts.** ``en`` = Latin letters, ``zh`` = Han, ``ja`` = Han + kana,
  ``ko`` = Hangul, ``ru`` = Cyrillic. Languages sharing a script cannot be told apart this way
  (French reads as ``en``), so only these codes are accepted.
- **Score** = target-language words / all words, in [0, 1]. A chain of thought with no words
  (empty, or only math) scores 0.0: there is no reasoning in the target language to reward.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import Any

from r1jax.rewards.common import column, completion_texts, think_region

# Code-point classes, by Unicode block. Han covers CJK Unified Ideographs, Extension A,
# Compatibility Ideographs and the supplementary-plane extensions.
_HAN = "\u3005-\u3007\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_KANA = "\u3040-\u309f\u30a0-\u30ff\u31f0-\u31ff\uff66-\uff9f"
_HANGUL = "\uac00-\ud7af\u1100-\u11ff\u3130-\u318f"
_LATIN = "A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u1e00-\u1eff\uff21-\uff3a\uff41-\uff5a"
_CYRILLIC = "\u0400-\u04ff"
_GREEK = "\u0370-\u03ff"
# Word characters that are math, not words: superscripts and subscripts (x², a₁, aⁿ, xᵢ, aⱼ),
# vulgar fractions (½), letterlike symbols (ℝ, ℓ), number forms (Ⅳ), math alphanumerics (𝑥).
_SYMBOLS = (
    "\u00b2\u00b3\u00b9\u00bc-\u00be\u2070-\u209f\u2100-\u218f"
    "\u1d62-\u1d6a\u2c7c\U0001d400-\U0001d7ff"
    "\u00b5\u02b0-\u02ff\u1d2c-\u1d61"  # micro sign, modifier letters (Aᵀ, 2ᵏ, xʰ)
)

# Spans where Latin letters are not words: closed code fences, display and inline math. A
# delimited span may not contain its own opener, so that a text with thousands of unclosed openers
# is scanned once, not once from each opener (quadratic).
_CODE_OR_MATH = re.compile(
    r"```(?:(?!```).)*```"
    r"|(?<!\\)\$\$(?:(?!\$\$).)*\$\$|(?<!\\)\$[^$]*(?<!\\)\$"  # `\$` is a currency sign
    r"|\\\[(?:(?!\\\[).)*?\\\]|\\\((?:(?!\\\().)*?\\\)",
    re.DOTALL,
)
# LaTeX commands, tags such as <answer> (ASCII names only: `<a因为…>` is text, not a tag)
_MARKUP = re.compile(r"\\[A-Za-z]+|</?[A-Za-z_][A-Za-z0-9_-]*>")
_WORD = re.compile(
    rf"(?P<han>[{_HAN}])|(?P<kana>[{_KANA}])|(?P<hangul>[{_HANGUL}]+)"
    rf"|(?P<latin>[{_LATIN}]+(?:['’][{_LATIN}]+)*)|(?P<cyrillic>[{_CYRILLIC}]+)"
    rf"|(?P<other>[^\W\d_{_GREEK}{_SYMBOLS}{_LATIN}{_HAN}{_KANA}{_HANGUL}{_CYRILLIC}]+)"
)

# Which word classes count as each target language.
LANGUAGE_SCRIPTS: dict[str, frozenset[str]] = {
    "en": frozenset({"latin"}),
    "zh": frozenset({"han"}),
    "ja": frozenset({"han", "kana"}),
    "ko": frozenset({"hangul"}),
    "ru": frozenset({"cyrillic"}),
}
# Latin words that are math in any language's prose (see the module docstring).
_MATH_NAMES = frozenset(
    "sin cos tan cot sec csc tg ctg arcsin arccos arctan sinh cosh tanh log ln lg exp "
    "gcd lcm mod max min lim det arg deg sgn".split()
)
_ALIASES = {"english": "en", "chinese": "zh", "japanese": "ja", "korean": "ko", "russian": "ru"}


def normalize_language(language: str) -> str:
    """``"en"``, ``"EN"``, ``"en-US"``, ``"zh_CN"``, ``"Chinese"`` -> a key of ``LANGUAGE_SCRIPTS``.

    Raises:
      ValueError: the language is not one this script-based measure can recognise.
    """
    key = str(language).strip().lower().replace("_", "-").split("-")[0]
    key = _ALIASES.get(key, key)
    if key not in LANGUAGE_SCRIPTS:
        raise ValueError(
            f"language_consistency_reward: unsupported language {language!r}; use one of "
            f"{sorted(LANGUAGE_SCRIPTS)} (languages are told apart by script)."
        )
    return key


def word_scripts(text: str) -> list[str]:
    """Text -> the script class of each word, in order (see the module docstring).

    Classes: ``han``, ``kana``, ``hangul``, ``latin``, ``cyrillic``, ``other``.
    """
    text = _MARKUP.sub(" ", unicodedata.normalize("NFC", text))
    scripts, start = [], 0
    for span in [*_CODE_OR_MATH.finditer(text), None]:
        prose = text[start : span.start() if span else len(text)]
        scripts += [
            m.lastgroup
            for m in _WORD.finditer(prose)
            if not (m.lastgroup == "latin" and _is_math_label(m.group()))
        ]
        if span:
            scripts += [m.lastgroup for m in _WORD.finditer(span.group()) if m.lastgroup != "latin"]
            start = span.end()
    return scripts


def _is_math_label(word: str) -> bool:
    """A Latin run that is a variable, a point's, segment's or triangle's name, or a function's
    (fullwidth forms, as a Chinese input method types them, read as ASCII)."""
    word = unicodedata.normalize("NFKC", word)
    return (
        len(word) == 1 or (len(word) <= 3 and word.isascii() and word.isupper())
    ) or word in _MATH_NAMES


def language_share(text: str, language: str) -> float:
    """Share of the words of ``text`` that are in ``language``; 0.0 when it has no words."""
    target = LANGUAGE_SCRIPTS[normalize_language(language)]
    scripts = word_scripts(text)
    if not scripts:
        return 0.0
    return sum(s in target for s in scripts) / len(scripts)


def language_consistency_reward(
    completions: Sequence[Any], language: Any = "en", **columns: Any
) -> list[float | None]:
    """Share of the chain of thought's words that are in the target language.

    Args:
      completions: [B] strings or chat-message lists.
      language: target language: one code for all rows (``"en"``), or a [B] per-row column.
      **columns: ignored.
    Returns:
      [B] floats in [0, 1]; ``None`` for rows whose language is None.
    Raises:
      ValueError: an unsupported language code.
    """
    texts = completion_texts(completions)
    languages = column(
        {"language": language}, "language", len(texts), reward="language_consistency_reward"
    )
    return [
        None if lang is None else language_share(think_region(text), lang)
        for text, lang in zip(texts, languages, strict=True)
    ]
