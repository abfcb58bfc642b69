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
  ``StopStrings``, which matches the decoded text whatever tokens spell it (")</" "answer" ">").
- No BOS token and no post-processor: documents are separated by EOS, as in Qwen.
- Training is deterministic for the same texts and vocabulary size (checked in the tests).
- The config names ``PreTrainedTokenizerFast`` as its class and embeds the chat template, so
  transformers 4.x and 5.x both load it.
"""

from __future__ import annotations

import json
import os
import shutil
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
    portable_tokenizer_config(save_dir, chat_template=CHAT_TEMPLATE)
    _set_toy_fields(save_dir)
    with open(os.path.join(save_dir, "special_tokens_map.json"), "w") as f:
        json.dump(
            {"eos_token": EOS, "pad_token": EOS, "additional_special_tokens": [IM_START, IM_END]},
            f,
            indent=2,
        )


def portable_tokenizer_config(
    save_dir: str | os.PathLike, chat_template: str | None = None
) -> None:
    """Rewrite the tokenizer_config.json that `save_pretrained` wrote in a form transformers 4.x
    and 5.x both read: a named class (5.x writes "TokenizersBackend", which 4.x does not know),
    the template inline (named templates as a list), additional special tokens as a list (5.x
    writes `extra_special_tokens` as a list, which 4.x reads as a dict), none of 5.x's load-time
    keys."""
    config_path = os.path.join(save_dir, "tokenizer_config.json")
    if not os.path.exists(config_path):  # (a tokenizer that writes none)
        return
    with open(config_path) as f:
        config = json.load(f)
    extra = config.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        config.setdefault("additional_special_tokens", extra)
    elif extra:  # a dict: 4.x's own meaning
        config["extra_special_tokens"] = extra
    for key in ("backend", "is_local", "local_files_only"):
        config.pop(key, None)
    if config.get("tokenizer_class") in (None, "TokenizersBackend"):
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        # (4.x's plain class returns token_type_ids too, which `generate(**inputs)` refuses)
        config.setdefault("model_input_names", ["input_ids", "attention_mask"])
    jinja = os.path.join(save_dir, "chat_template.jinja")
    if chat_template is None and os.path.exists(jinja):
        with open(jinja) as f:
            chat_template = f.read()
    named = os.path.join(save_dir, "additional_chat_templates")
    if os.path.isdir(named):  # 5.x's named templates, a file each: all inline, by name (4.x and
        # 5.x both ignore an inline default beside the folder: it would be lost)
        templates = [{"name": "default", "template": chat_template}] if chat_template else []
        for name in sorted(os.listdir(named)):
            if name.endswith(".jinja"):
                with open(os.path.join(named, name)) as f:
                    templates.append({"name": name.removesuffix(".jinja"), "template": f.read()})
        chat_template = templates
        shutil.rmtree(named)
    if chat_template is not None:
        config["chat_template"] = chat_template
    if os.path.exists(jinja):
        os.remove(jinja)  # one copy of the template: the one in tokenizer_config.json
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)


def _set_toy_fields(save_dir) -> None:
    config_path = os.path.join(save_dir, "tokenizer_config.json")
    with open(config_path) as f:
        config = json.load(f)
    config.update(
        tokenizer_class="PreTrainedTokenizerFast",
        eos_token=EOS,
        pad_token=EOS,
        bos_token=None,
        additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
    )
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)


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
    """Token ids that end a generation: EOS, ``<|im_end|>`` when the vocabulary has it, the
    token the chat template ends an assistant turn with (Llama 3's ``<|eot_id|>``, whose base
    tokenizer's EOS is ``<|end_of_text|>``): SFT under the chat template teaches it
    (`templates.turn_end`), so sampling must stop there; and every eos id the model folder the
    tokenizer was loaded from declares (config.json, generation_config.json: Qwen2.5-Instruct's
    ``<|endoftext|>`` beside ``<|im_end|>``, Llama 3.1's three), where transformers' `generate`
    and vLLM stop."""
    folder = model_eos_ids(getattr(tokenizer, "name_or_path", None))
    return tuple(sorted({*_tokenizer_stop_ids(tokenizer), *folder}))


def declared_stop_ids(tokenizer) -> tuple[int, ...]:
    """The eos ids the model folder declares beyond the tokenizer's own stop ids (none for most
    base models; Qwen2.5-Instruct's <|endoftext|>): recorded where they change what is sampled."""
    folder = model_eos_ids(getattr(tokenizer, "name_or_path", None))
    return tuple(sorted(set(folder) - set(_tokenizer_stop_ids(tokenizer))))


def _tokenizer_stop_ids(tokenizer) -> tuple[int, ...]:
    from r1jax.data import templates

    ids = [tokenizer.eos_token_id]
    ends = [IM_END]
    if getattr(tokenizer, "chat_template", None):
        ends.append(templates.turn_end(tokenizer))
    for end in ends:
        token = tokenizer.convert_tokens_to_ids(end) if end else None
        if isinstance(token, int) and token != tokenizer.unk_token_id:
            ids.append(token)
    return tuple(sorted({i for i in ids if i is not None}))


def model_eos_ids(path: str | os.PathLike | None) -> list[int]:
    """The eos ids a local model folder declares in config.json and generation_config.json
    (each an int or a list; none for a path that is no folder)."""
    ids: list[int] = []
    for name in ("config.json", "generation_config.json"):
        file = os.path.join(path, name) if path and os.path.isdir(path) else None
        if file is None or not os.path.isfile(file):
            continue
        try:
            with open(file) as f:
                value = json.load(f).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue  # (config.json's errors are the model loader's to name)
        values = value if isinstance(value, list) else [value]
        ids += [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 0]
    return ids


class StopStrings:
    """Stop strings found in the decoded text of a generation, whatever tokens spell them.

    A string has many tokenisations in context: byte-level BPE merges "</" with what precedes it
    (")</", "$</", " </"), and a generation may split it anywhere. So the sampler does not compare
    token ids: it runs an automaton over the text of each token it samples. State q < Q - 1 is the
    longest end of the text so far that begins one of the strings; Q - 1 means one of them has
    appeared (the row stops after that token, as transformers' `StopStringCriteria` does).
    `table` [Q, V] is the state after a token from each state, precomputed over the vocabulary, so
    a decode step reads one entry per row.

    The automaton reads UTF-8 bytes, not characters: byte-level BPE and SentencePiece's byte
    fallback split a Chinese or accented character over several tokens, none of which decodes to
    a character alone. `texts` gives each token's bytes as they read inside a decoded completion
    (`token_bytes`: special tokens empty); a str is taken as its UTF-8. Matching bytes is matching
    the decoded text wherever the completion's bytes are valid UTF-8, and for byte-level BPE
    everywhere (a UTF-8 string never begins with a continuation byte, so its decoder, replacing a
    broken sequence before the string, still sees it whole); SentencePiece's byte-fallback decoder
    replaces a whole run of byte pieces that holds a broken sequence, so a string spelt by byte
    pieces right after a broken one is found where its decoded text shows U+FFFD.
    """

    def __init__(self, texts: Sequence[str | bytes], strings: Sequence[str]):
        import numpy as np

        if isinstance(strings, str):  # one stop string, as transformers takes it (not its letters)
            strings = [strings]
        self.strings = tuple(dict.fromkeys(s for s in strings if s))
        codes = [s.encode() for s in self.strings]
        texts = [t.encode() if isinstance(t, str) else bytes(t) for t in texts]
        # States: every proper prefix of a string ("" first), then the accepting state.
        prefixes = sorted({s[:i] for s in codes for i in range(len(s))} | {b""}, key=len)
        index = {p: q for q, p in enumerate(prefixes)}
        accept = len(prefixes)
        alphabet = {c: a for a, c in enumerate(sorted({c for s in codes for c in s}))}
        other, end = len(alphabet), len(alphabet) + 1  # any other byte; past a token's end
        step = np.zeros((accept + 1, end + 1), np.int32)  # the byte automaton
        for p, q in index.items():
            for c, a in alphabet.items():
                text = p + bytes([c])
                if any(text.endswith(s) for s in codes):
                    step[q, a] = accept
                else:  # the longest end of `text` that begins a string
                    step[q, a] = next(
                        index[text[i:]] for i in range(len(text) + 1) if text[i:] in index
                    )
            step[q, end] = q
        step[accept, :] = accept
        # Run every token's bytes through it from every state at once, longest tokens
        # first so that step i only touches the tokens that have an i-th byte.
        lengths = np.array([len(t) for t in texts], np.int64)
        order = np.argsort(-lengths, kind="stable")
        symbol = np.full(256, other, np.int32)  # byte -> automaton symbol
        symbol[list(alphabet)] = list(alphabet.values())
        chars = np.full((len(texts), int(lengths.max(initial=0))), end, np.int32)
        for row, t in enumerate(order):
            chars[row, : lengths[t]] = symbol[np.frombuffer(texts[t], np.uint8)]
        states = np.tile(np.arange(accept + 1, dtype=np.int32), (len(texts), 1))  # [V, Q]
        active = np.searchsorted(-lengths[order], -np.arange(chars.shape[1]), side="right")
        for i, n in enumerate(active):  # n tokens are longer than i bytes
            states[:n] = step[states[:n], chars[:n, i : i + 1]]
        table = np.empty_like(states)
        table[order] = states
        dtype = np.int8 if accept < 128 else np.int16 if accept < 2**15 else np.int32
        self.table = np.ascontiguousarray(table.T.astype(dtype))  # [Q, V]

    @classmethod
    def for_tokenizer(cls, tokenizer, strings: Sequence[str]) -> StopStrings:
        return cls(token_bytes(tokenizer), strings)

    def __bool__(self) -> bool:
        return bool(self.strings)

    def stopped(self, ids: Sequence[int]) -> bool:
        """Whether the sampler's automaton reaches a stop string over these token ids (ids past
        the table leave the state as it is, as in the sampler)."""
        q, accept, width = 0, self.table.shape[0] - 1, self.table.shape[1]
        for t in ids:
            if 0 <= t < width:
                q = int(self.table[q, t])
        return q == accept


FORMAT_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def format_tag_ids(tokenizer) -> dict[str, int]:
    """{tag: id} of the R1 format tags this tokenizer declares *special* (given with
    `add_special_tokens`, as some R1 recipes do). They are the completion's text all the same:
    `decode_completions` keeps them (skip_special_tokens would drop them, and with them every
    format reward, extracted answer and stop string), `encode_completions` writes them as their
    one token (split_special_tokens would spell them in characters the model never samples)."""
    special = _special_tokens(tokenizer)
    return {t: i for t, i in special.items() if t in FORMAT_TAGS}


def control_texts(tokenizer) -> list[str]:
    """The texts of the tokenizer's special tokens but the format tags (EOS, turn markers, pad):
    written in a completion they are its characters (`encode_completions`), never the token."""
    return [t for t in _special_tokens(tokenizer) if t and t not in FORMAT_TAGS]


def _special_tokens(tokenizer) -> dict[str, int]:
    """{text: id} of every token the tokenizer treats as special: its named ones and the added
    tokens flagged special (chat models' turn ends, "<|im_end|>", are only the latter)."""
    named = getattr(tokenizer, "all_special_tokens", ())
    special = {t: tokenizer.convert_tokens_to_ids(t) for t in named}
    for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(t, "special", False):
            special[t.content] = i
    return special


def decode_completions(tokenizer, rows: Sequence[Sequence[int]]) -> list[str]:
    """Sampled ids -> completion texts: `batch_decode(rows, skip_special_tokens=True)`, except
    that the format tags stay when the tokenizer declares them special (`format_tag_ids`)."""
    keep = set(format_tag_ids(tokenizer).values())
    if not keep:
        return tokenizer.batch_decode(rows, skip_special_tokens=True)
    drop = set(_special_tokens(tokenizer).values()) - keep  # (what skip_special_tokens drops)
    return tokenizer.batch_decode([[t for t in row if t not in drop] for row in rows])


def encode_completions(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Completion texts -> ids, a special token's text written in one spelt as text
    ("<|endoftext|>" in an answer is those characters, not EOS), except the format tags a
    tokenizer declares special (`format_tag_ids`), which are their one token."""
    import re

    def encode(pieces):
        return tokenizer(list(pieces), add_special_tokens=False, split_special_tokens=True)[
            "input_ids"
        ]

    tags = format_tag_ids(tokenizer)
    if not tags:
        return encode(texts)
    others = [t for t in _special_tokens(tokenizer) if t not in tags and t]
    split = re.compile("(" + "|".join(re.escape(t) for t in sorted(tags, key=len)[::-1]) + ")")
    out = []
    for text in texts:
        if not any(t in text for t in others):  # the tags the only special text: one call (a
            out.append(tokenizer(text, add_special_tokens=False)["input_ids"])  # piece alone
            continue  # would get SentencePiece's "▁" prefix after every tag)
        pieces = [p for p in split.split(text) if p]
        encoded = iter(encode([p for p in pieces if p not in tags]))
        out.append([i for p in pieces for i in ([tags[p]] if p in tags else next(encoded))])
    return out


def token_texts(tokenizer) -> list[str]:
    """Each token's text as it reads inside a decoded completion (`decode_completions`).

    Decoded after an anchor token and with the anchor's text cut off: a SentencePiece token's
    leading space ("▁</") survives, which decoding the token alone drops.
    """
    anchor = tokenizer.encode("a", add_special_tokens=False)[:1]
    lead = tokenizer.decode(anchor, skip_special_tokens=True)
    pairs = decode_completions(tokenizer, [anchor + [i] for i in range(len(tokenizer))])
    return [p[len(lead) :] if p.startswith(lead) else p for p in pairs]


def token_bytes(tokenizer) -> list[bytes]:
    """Each token's UTF-8 bytes as they read inside a decoded completion: `token_texts`, except
    that a token holding part of a character (which decodes to U+FFFD alone) gives its raw
    bytes: byte-level BPE's stand-in characters mapped back (GPT-2, Qwen, Llama 3, DeepSeek), or
    SentencePiece's byte-fallback pieces ``<0xE4>`` (Llama 2, Mistral)."""
    import re

    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    texts = token_texts(tokenizer)
    out = []
    for i, text in enumerate(texts):
        piece = tokenizer.convert_ids_to_tokens(i) if "\ufffd" in text else None
        if isinstance(piece, str) and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            out.append(bytes([int(piece[3:5], 16)]))
        elif isinstance(piece, str) and piece and all(c in byte_of for c in piece):
            out.append(bytes(byte_of[c] for c in piece))
        else:  # a whole text, or a replacement character the token really spells
            out.append(text.encode())
    return out


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

    # (the texts as drawn before held-out problems stated in them were redrawn: the toy tokenizer,
    # and with it every cached toy base, stays what it was)
    texts = pretrain_corpus(n_docs, seed=seed, tag_names=tag_names, hold_out_stated=False)
    examples = cold_start_examples(n_cold_start, seed=seed, hold_out_stated=False)
    texts += [r["completion"] for r in examples]
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
