"""The toy tokenizer: a byte-level BPE trained with `tokenizers`, saved as an HF tokenizer folder.

The folder (tokenizer.json, tokenizer_config.json, special_tokens_map.json) loads offline with
``transformers.AutoTokenizer.from_pretrained(dir)``, like any real model's tokenizer.

Notable choices:
- Every digit is its own token (``Digits(individual_digits=True)`` runs before the byte-level
  split), so numbers are never merged into multi-digit tokens: column arithmetic needs to see
  digits one at a time.
- ``<|endoftext|>`` is EOS and PAD, ``<|im_start|>``/``<|im_end|>`` delimit chat turns (ChatML-like
  template); all three are special (dropped by ``skip_special_tokens``).
- ``<think>``, ``</think>``, ``<answer>``, ``</answer>`` are ordinary text (" <", "think", ">"), as
  in the Qwen2.5 and Llama 3 base tokenizers R1-Zero reproductions start from. A base model that
  never saw these tags in pretraining can still write them by copying them from the prompt, the
  way it learned to copy other tag names; a dedicated token it never saw would have an untrained
  embedding and could not be produced. Generation stops at "</answer>" through
  ``stop_sequences``.
- No BOS token and no post-processor: documents are separated by EOS, as in Qwen.
- Training is deterministic for the same texts and vocabulary size (checked in the tests).
- The config names ``PreTrainedTokenizerFast`` as its class and embeds the chat template, so
  transformers 4.x and 5.x both load it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (EOS, IM_START, IM_END)
# ChatML-like. No whitespace control: the newlines written here are the newlines in the prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_tokenizer(
    texts: Iterable[str],
    save_dir: str | os.PathLike,
    *,
    vocab_size: int = 512,
    min_frequency: int = 2,
):
    """Train a byte-level BPE on ``texts`` and save it as an HF tokenizer folder.

    Args:
      texts: training text (e.g. the pretraining corpus plus cold-start examples and templates).
      save_dir: folder to write; created if missing.
      vocab_size: total vocabulary size including the 256 byte tokens and the 3 special tokens.
      min_frequency: a pair must occur this often to be merged.
    Returns:
      The tokenizer, loaded back from ``save_dir`` through ``AutoTokenizer`` (so what the caller
      gets is exactly what later stages will load).
    """
    n_fixed = 256 + len(SPECIAL_TOKENS)
    if vocab_size < n_fixed:
        raise ValueError(
            f"vocab_size must be >= {n_fixed} (256 bytes + special tokens), got {vocab_size}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # Special tokens are single tokens whatever their spelling, so their text must not shape merges.
    tok.train_from_iterator(_without_special_tokens(texts), trainer)
    save_tokenizer(tok, save_dir)
    return load_tokenizer(save_dir)


def _without_special_tokens(texts: Iterable[str]) -> Iterable[str]:
    for text in texts:
        for token in SPECIAL_TOKENS:
            text = text.replace(token, " ")
        yield text


def save_tokenizer(tok: Tokenizer, save_dir: str | os.PathLike) -> None:
    """Write a `tokenizers.Tokenizer` as an HF tokenizer folder with our special tokens and
    chat template (tokenizer.json, tokenizer_config.json, special_tokens_map.json)."""
    from transformers import PreTrainedTokenizerFast

    os.makedirs(save_dir, exist_ok=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=EOS, chat_template=CHAT_TEMPLATE
    )
    fast.save_pretrained(save_dir)
    # Rewrite the config in a form both transformers 4.x and 5.x read: named class, template
    # inline, additional special tokens as a list (5.x writes its own, newer keys).
    config_path = os.path.join(save_dir, "tokenizer_config.json")
    with open(config_path) as f:
        config = json.load(f)
    config.pop("extra_special_tokens", None)
    config.pop("backend", None)
    config.update(
        tokenizer_class="PreTrainedTokenizerFast",
        chat_template=CHAT_TEMPLATE,
        eos_token=EOS,
        pad_token=EOS,
        bos_token=None,
        additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
    )
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
    jinja = os.path.join(save_dir, "chat_template.jinja")
    if os.path.exists(jinja):
        os.remove(jinja)  # one copy of the template: the one in tokenizer_config.json
    with open(os.path.join(save_dir, "special_tokens_map.json"), "w") as f:
        json.dump(
            {"eos_token": EOS, "pad_token": EOS, "additional_special_tokens": [IM_START, IM_END]},
            f,
            indent=2,
        )


def load_tokenizer(path: str | os.PathLike):
    """``AutoTokenizer.from_pretrained(path)`` offline, with a clear error for a missing folder."""
    from transformers import AutoTokenizer

    if not os.path.isfile(os.path.join(path, "tokenizer.json")) and not os.path.isfile(
        os.path.join(path, "tokenizer_config.json")
    ):
        raise FileNotFoundError(
            f"no tokenizer in {path!s} (expected tokenizer.json); train one "
            "with r1jax.data.train_toy_tokenizer or point to a model folder"
        )
    return AutoTokenizer.from_pretrained(os.fspath(path), local_files_only=True)


def leading_special_ids(tokenizer) -> list[int]:
    """The ids `tokenizer` puts before every text by default: BOS for Llama 3 and
    DeepSeek-R1-Distill, none for Qwen (and never the EOS some tokenizers append)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return list(full[:start])
    return []


def with_leading_specials(tokenizer, rows: Sequence[Sequence[int]]) -> list[list[int]]:
    """Prompt token ids (tokenised without special tokens) with the tokenizer's leading special
    ids prepended where they are not there yet: an "r1_zero" or "plain" prompt gets Llama 3's
    BOS, as the model saw in training; a chat template that writes BOS into its text keeps one."""
    lead = leading_special_ids(tokenizer)
    return [
        list(ids) if not lead or list(ids[: len(lead)]) == lead else lead + list(ids)
        for ids in rows
    ]


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    """Token ids that end a generation: EOS, plus ``<|im_end|>`` when the vocabulary has it."""
    ids = [tokenizer.eos_token_id]
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.append(im_end)
    return tuple(sorted({i for i in ids if i is not None}))


def stop_sequences(tokenizer, strings=("</answer>",)) -> tuple[tuple[int, ...], ...]:
    """Token-id sequences that end a generation when a row's tokens end in one of them.

    A string has several tokenisations in context: byte-level BPE merges a leading space into the
    first piece (" </" vs "</"), while a newline or a digit before it is a piece of its own. Both
    the bare and the space-led tokenisation of each string are returned (a sequence that ends in
    another one is redundant and dropped); other spellings of the string are not caught.
    """
    seqs = set()
    for text in strings:
        for variant in (text, " " + text):
            ids = tuple(tokenizer.encode(variant, add_special_tokens=False))
            if ids:
                seqs.add(ids)
    return tuple(
        sorted(q for q in seqs if not any(len(o) < len(q) and q[-len(o) :] == o for o in seqs))
    )


def toy_tokenizer_texts(
    *, seed: int = 0, n_docs: int = 2000, n_cold_start: int = 200, tag_names: str = "words"
) -> list[str]:
    """The texts the toy tokenizer is trained on: pretraining corpus, cold-start completions,
    and the R1-Zero instruction, so every text the pipeline feeds the model is covered.

    The instruction is repeated often enough to earn its own merges: every R1-Zero prompt
    carries it, and a word-level encoding halves the prompt length (~100 tokens, not ~180).
    """
    from r1jax.data.corpus import cold_start_examples, pretrain_corpus
    from r1jax.data.templates import R1_SYSTEM_PROMPT

    texts = pretrain_corpus(n_docs, seed=seed, tag_names=tag_names)
    texts += [r["completion"] for r in cold_start_examples(n_cold_start, seed=seed)]
    return texts + [R1_SYSTEM_PROMPT] * max(1, n_docs // 4)


def train_toy_tokenizer(
    save_dir: str | os.PathLike,
    *,
    seed: int = 0,
    vocab_size: int = 512,
    n_docs: int = 2000,
    tag_names: str = "words",
):
    """Train and save the built-in toy tokenizer (see ``toy_tokenizer_texts``); returns it."""
    return train_tokenizer(
        toy_tokenizer_texts(seed=seed, n_docs=n_docs, tag_names=tag_names),
        save_dir,
        vocab_size=vocab_size,
    )
