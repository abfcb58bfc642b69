"""Prompt templates: the R1-Zero template, chat templating, and the think/answer completion format.

Notable choices:
- ``R1_ZERO_TEMPLATE`` is Table 1 of the DeepSeek-R1 paper word for word. The paper writes
  "User: prompt. Assistant:"; the period is added only when the question does not already end in
  ".", "?" or "!", so "What is 3 + 4?" does not become "What is 3 + 4?.".
- ``prefill_think`` appends " <think>" after "Assistant:" (as TinyZero and many R1-Zero
  reproductions do) so a weak base model starts inside the reasoning block; the completion then
  begins with the reasoning itself and the format reward must be given the prefilled tag back
  (``completion_prefix``).
- Chat prompts go through ``tokenizer.apply_chat_template``, so instruct models get their own
  template; ``R1_SYSTEM_PROMPT`` carries the same instruction as the R1-Zero template for them.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import threading
from collections.abc import Sequence

log = logging.getLogger(__name__)

# Chat templates that write today's date into the system turn get a fixed one (Llama 3.1's
# default), so the same data tokenises the same on every day and every host (SFT's and RL's
# prompts, resume fingerprints): Llama 3.2 / 3.3 read `date_string` when given one, Granite 3 and
# SmolLM3 call `strftime_now` directly, which reads this day through `apply_chat_template`.
TEMPLATE_KWARGS = {"date_string": "26 Jul 2024"}
_TEMPLATE_DAY = (2024, 7, 26)
_CLOCK_LOCK = threading.Lock()  # one patch of the template clock at a time (threads)


def apply_chat_template(tokenizer, messages: Sequence[dict], **kwargs):
    """`tokenizer.apply_chat_template(messages, **kwargs)` on the fixed day above."""
    with _CLOCK_LOCK, _fixed_day():
        return tokenizer.apply_chat_template(messages, **TEMPLATE_KWARGS, **kwargs)


@contextlib.contextmanager
def _fixed_day():
    """transformers gives templates `strftime_now(fmt) = datetime.now().strftime(fmt)`, built per
    compiled template from its module's `datetime` (a `strftime_now` passed as a template variable
    is overridden by that global): the module's clock reads `_TEMPLATE_DAY` meanwhile."""
    from transformers.utils import chat_template_utils

    clock = getattr(chat_template_utils, "datetime", None)
    if not isinstance(clock, type) or not issubclass(clock, datetime.datetime):
        yield  # another transformers: tests/test_stages.py notices
        return

    class Day(clock):
        @classmethod
        def now(cls, tz=None):
            return clock(*_TEMPLATE_DAY, tzinfo=tz)

    chat_template_utils.datetime = Day
    try:
        yield
    finally:
        chat_template_utils.datetime = clock


R1_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process "
    "here </think> <answer> answer here </answer>."
)
R1_ZERO_TEMPLATE = R1_SYSTEM_PROMPT + " User: {prompt} Assistant:"
THINK_PREFILL = " <think>"
TEMPLATES = ("r1_zero", "chat", "plain")


def _sentence(question: str) -> str:
    q = question.strip()
    return q if q.endswith((".", "?", "!", "。", "？", "！")) else q + "."


def r1_zero_prompt(question: str, *, prefill_think: bool = False) -> str:
    """The paper's R1-Zero prompt for one question (ends with "Assistant:" or " <think>")."""
    prompt = R1_ZERO_TEMPLATE.format(prompt=_sentence(question))
    return prompt + THINK_PREFILL if prefill_think else prompt


def chat_prompt(
    tokenizer, question: str, *, system: str | None = None, prefill_think: bool = False
) -> str:
    """A chat-templated prompt ending in the assistant turn's header (add_generation_prompt).

    Args:
      tokenizer: any HF tokenizer with a chat template.
      question: the user message.
      system: optional system message (e.g. ``R1_SYSTEM_PROMPT``).
      prefill_think: append "<think>\\n" so generation starts inside the reasoning block.
    """
    return conversation_prompt(
        tokenizer,
        [{"role": "user", "content": question}],
        system=system,
        prefill_think=prefill_think,
    )


def conversation_prompt(
    tokenizer, messages: Sequence[dict], *, system: str | None = None, prefill_think: bool = False
) -> str:
    """`chat_prompt` for a whole conversation (`messages`: role/content dicts, ending before the
    assistant turn to be written); `system` is put first unless the conversation has its own."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no chat template; use "
            "template='r1_zero' or a tokenizer that defines one"
        )
    has_system = bool(messages) and messages[0].get("role") == "system"
    messages = [{"role": "system", "content": system}] * bool(system and not has_system) + [
        *messages
    ]
    try:
        text = apply_chat_template(tokenizer, messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja2's TemplateError: e.g. raise_exception in the template
        if not system or has_system:
            raise
        try:  # blamed on the system message only when the turns render without it
            apply_chat_template(tokenizer, messages[1:], tokenize=False, add_generation_prompt=True)
        except Exception:
            raise e from None
        raise ValueError(
            f"the tokenizer's chat template refused a system message ({e}); this model takes "
            "none: leave system_prompt empty"
        ) from None
    # Reasoning models' templates (DeepSeek-R1-Distill, QwQ) open the block themselves.
    if prefill_think and not text.endswith(_OPEN_THINK):
        text += "<think>\n"
    return text


def turn_end(tokenizer) -> str:
    """What the chat template writes after an assistant message's content, up to its last
    special token ("<|im_end|>" for Qwen, "<|eot_id|>" for Llama 3, the EOS for
    DeepSeek-R1-Distill): an answer trained under a chat-templated prompt must end with it, not
    with the EOS the tokenizer may have besides (Qwen2.5 base: "<|endoftext|>"), or the model
    never learns to close a turn its own template then writes. "" when the template renders none
    (or fails)."""
    marker = "\u2063r1jax-answer\u2063"  # text no template rewrites
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}]
    try:
        text = apply_chat_template(tokenizer, turns, tokenize=False)
    except Exception:  # a template that refuses this exchange: callers fall back to the EOS
        return ""
    if not isinstance(text, str) or marker not in text:
        return ""
    end = text.rsplit(marker, 1)[1]
    special = set(getattr(tokenizer, "all_special_tokens", ()))
    # (Llama 3's configs declare <|eot_id|> special only in added_tokens_decoder)
    special |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()
                if getattr(t, "special", False)}  # fmt: skip
    special = [t for t in special if t and t in end]
    if not special:  # trailing text only (e.g. newlines): nothing the model has to learn
        return ""
    return end[: max(end.rfind(t) + len(t) for t in special)]


def system_prompt(value: str) -> str | None:
    """A config's `system_prompt`: "" -> None (no system message), "r1" -> `R1_SYSTEM_PROMPT`,
    anything else as it is."""
    return None if not value else R1_SYSTEM_PROMPT if value == "r1" else value


def warn_if_templated(questions: Sequence[str], template: str, tokenizer) -> None:
    """Warn when questions already carry a template (R1's instruction, a prompt ending in
    "Assistant:" or "<think>", a chat template's special tokens): a second one around them puts
    the instruction twice, or one conversation inside another, in every prompt."""
    specials = [
        t
        for t in (getattr(tokenizer, "all_special_tokens", None) or [])
        if t != getattr(tokenizer, "unk_token", None)
    ]

    def templated(q: str) -> bool:
        q = q.strip()
        return (
            R1_SYSTEM_PROMPT[:48] in q
            or q.endswith(("Assistant:", "<think>"))
            or any(t in q for t in specials)
        )

    found = [q for q in questions if isinstance(q, str) and templated(q)]
    if found:
        log.warning(
            "%d of %d questions already look templated (e.g. %r); the %r template is applied "
            "around them again: give the raw questions, or data.template='plain' for prompts "
            "templated as the model expects",
            len(found),
            len(questions),
            found[0][-120:],
            template,
        )


def format_prompts(
    questions: Sequence[str],
    template: str,
    *,
    tokenizer=None,
    system: str | None = None,
    prefill_think: bool = False,
    check_templated: bool = True,
) -> list[str]:
    """Apply one template to a list of questions.

    Args:
      template: "r1_zero" (paper template), "chat" (tokenizer's chat template; needs tokenizer),
        or "plain" (the question unchanged).
      check_templated: warn about questions that already carry a template (`warn_if_templated`;
        False for a caller that checked all its questions at once).
    Returns:
      One prompt string per question.
    """
    if check_templated and template in ("r1_zero", "chat"):
        warn_if_templated(questions, template, tokenizer)
    if template == "r1_zero":
        return [r1_zero_prompt(q, prefill_think=prefill_think) for q in questions]
    if template == "chat":
        if tokenizer is None:
            raise ValueError("template='chat' needs a tokenizer")
        return [
            chat_prompt(tokenizer, q, system=system, prefill_think=prefill_think) for q in questions
        ]
    if template == "plain":
        return list(questions)
    raise ValueError(f"unknown template {template!r}; expected one of {TEMPLATES}")


def turns_before_answer(row: dict) -> list[dict]:
    """The turns a dataset row's answer follows: its chat `messages` without a last assistant
    turn (the answer, or a reference the completion replaces) when they are a conversation, else
    its one `prompt` question (the column the loader, or a field_map, chose)."""
    messages = row.get("messages") or []
    if messages and messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    turns = list(messages)
    question = row.get("prompt")
    # One question (or none left): the row's prompt column, as the loader (and a field_map) chose
    # it; only a conversation (several turns, its own system message) is rendered from its turns.
    if isinstance(question, str) and question.strip() and (not turns or not is_conversation(turns)):
        return [{"role": "user", "content": question}]
    return turns or [{"role": "user", "content": question}]


def is_conversation(turns: Sequence[dict]) -> bool:
    """Several turns, or a system message of the row's own: what has no R1-Zero or plain form,
    so the model's chat template renders it whatever the configured template."""
    return not (len(turns) == 1 and turns[0].get("role") == "user")


def turns_prompt(
    turns: Sequence[dict],
    template: str,
    *,
    tokenizer=None,
    system: str | None = None,
    prefill_think: bool = False,
) -> str:
    """The prompt for `turns` (`turns_before_answer`): one question in `template` (as RL samples
    it, so SFT and RL see one prompt), a conversation through the chat template (raises
    ValueError without one). The one rendering SFT, RL, rejection sampling and eval share."""
    if not is_conversation(turns):
        question = [turns[0]["content"]]
        return format_prompts(
            question,
            template,
            tokenizer=tokenizer,
            system=system,
            prefill_think=prefill_think,
            check_templated=False,
        )[0]
    return conversation_prompt(tokenizer, turns, system=system, prefill_think=prefill_think)


_OPEN_THINK = ("<think>\n", "<think>")


def completion_prefix(template: str, prefill_think: bool, prompt: str | None = None) -> str:
    """The part of the think/answer format already in the prompt, to prepend to completions
    before format scoring: the opening think tag the prompt ends with ("<think>" when prefilled,
    else ""). Given a templated `prompt`, read from it, which also covers chat templates that
    open the block themselves whatever `prefill_think` says (DeepSeek-R1-Distill's)."""
    if prompt is not None:
        return next((tag for tag in _OPEN_THINK if prompt.endswith(tag)), "")
    if not prefill_think or template == "plain":
        return ""
    return "<think>" if template == "r1_zero" else "<think>\n"


def think_answer(reasoning: str, answer: str) -> str:
    """The R1 completion format.

    Returns:
      ``"<think>\\n{reasoning}\\n</think>\\n<answer>{answer}</answer>"``, both parts stripped.
    """
    return f"<think>\n{reasoning.strip()}\n</think>\n<answer>{answer.strip()}</answer>"
