"""Host-side tokenisation into fixed-shape numpy batches: bucketed prompts and SFT sequences.

Shapes inside jit are static, so every batch is padded to a length from a short list of buckets
(a few compiles in total, never one per step).

Notable choices:
- Prompts are *left*-padded to the smallest bucket that holds the longest prompt, so every
  prompt ends at the same column and generation appends in lockstep. A prompt longer than the
  largest bucket is an error by default; ``overflow="truncate"`` keeps its last tokens (the end
  holds "Assistant:" and the question; TRL truncates prompts on the left too) and
  ``overflow="skip"`` drops it. Both are counted.
- SFT sequences are *right*-padded. ``loss_mask[b, t] = 1`` iff ``input_ids[b, t]`` is a
  completion token (EOS included): the loss for position ``t`` is the prediction of token ``t``
  from the logits at ``t - 1``, so the consumer shifts. Prompt and completion are tokenised
  separately, exactly as RL sees them (prompt tokens, then sampled tokens).
- Packing is greedy in order: examples fill a row until the next one does not fit.
  ``segment_ids`` number the examples in a row from 1 (0 = padding) and ``positions`` restart at
  0 for each, so attention can be masked to same-segment pairs and RoPE sees each example alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from r1jax.data import tokenizer as toks

DEFAULT_BUCKETS = (32, 64, 128, 256, 512, 1024)
OVERFLOW = ("error", "truncate", "skip")


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= ``length``; ValueError when none is."""
    for b in sorted(buckets):
        if b >= length:
            return b
    raise ValueError(
        f"length {length} exceeds the largest bucket {max(buckets)}; add a larger "
        "bucket or shorten the input"
    )


def _check_overflow(overflow: str) -> None:
    if overflow not in OVERFLOW:
        raise ValueError(f"overflow must be one of {OVERFLOW}, got {overflow!r}")


# --------------------------------------------------------------------------------------------
# Prompts (left-padded)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """Left-padded prompts.

    Attributes:
      input_ids: [B, T] int32, pad id in the padding.
      attention_mask: [B, T] int32, 1 = token, 0 = pad (left).
      lengths: [B] int32 real prompt lengths (after truncation).
      kept: [B] int64 index of each row in the caller's list (differs with overflow="skip").
      num_truncated: prompts cut to the largest bucket.
      num_skipped: prompts dropped for being too long.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    lengths: np.ndarray
    kept: np.ndarray
    num_truncated: int
    num_skipped: int


def left_pad(
    sequences: Sequence[Sequence[int]], length: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists to ``length``: ([B, length] int32 ids, [B, length] int32 mask)."""
    ids = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), np.int32)
    for i, seq in enumerate(sequences):
        if len(seq) > length:
            raise ValueError(f"sequence {i} has {len(seq)} tokens, more than {length}")
        if len(seq):
            ids[i, length - len(seq) :] = seq
            mask[i, length - len(seq) :] = 1
    return ids, mask


def batch_prompt_ids(
    token_ids: Sequence[Sequence[int]],
    *,
    pad_id: int,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    overflow: str = "error",
    leading: Sequence[int] = (),
) -> PromptBatch:
    """Bucket and left-pad already tokenised prompts (see ``tokenize_prompts``); `leading`: ids
    a truncated prompt keeps at its front when it starts with them (the tokenizer's BOS,
    `tokenizer.leading_special_ids`), before its last tokens."""
    _check_overflow(overflow)
    if not buckets or min(buckets) < 1:
        raise ValueError(f"buckets must be positive lengths, got {buckets}")
    if not token_ids:
        raise ValueError("no prompts to batch")
    largest = max(buckets)
    too_long = [i for i, t in enumerate(token_ids) if len(t) > largest]
    if too_long and overflow == "error":
        worst = max(too_long, key=lambda i: len(token_ids[i]))
        raise ValueError(
            f"{len(too_long)} of {len(token_ids)} prompts are longer than the largest bucket "
            f"({largest} tokens; longest is prompt {worst} with {len(token_ids[worst])}). Add a "
            "larger bucket, shorten the prompts, or set overflow='truncate' or 'skip'"
        )
    empty = [i for i, t in enumerate(token_ids) if not len(t)]
    if empty:
        raise ValueError(f"prompt {empty[0]} is empty after tokenisation ({len(empty)} empty)")
    kept, seqs = [], []
    for i, t in enumerate(token_ids):
        if len(t) > largest:
            if overflow == "skip":
                continue
            lead = list(leading) if 0 < len(leading) < largest else []
            lead = lead if list(t[: len(lead)]) == lead else []
            t = lead + list(t[len(t) - (largest - len(lead)) :])
        kept.append(i)
        seqs.append(list(t))
    if not seqs:
        raise ValueError(
            f"all {len(token_ids)} prompts are longer than the largest bucket "
            f"({largest} tokens); add a larger bucket"
        )
    length = bucket_length(max(map(len, seqs)), buckets)
    ids, mask = left_pad(seqs, length, pad_id)
    return PromptBatch(
        ids,
        mask,
        np.asarray([len(s) for s in seqs], np.int32),
        np.asarray(kept, np.int64),
        num_truncated=len(too_long) if overflow == "truncate" else 0,
        num_skipped=len(too_long) if overflow == "skip" else 0,
    )


def tokenize_prompts(
    tokenizer,
    prompts: Sequence[str],
    *,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    overflow: str = "error",
    add_special_tokens: bool = False,
) -> PromptBatch:
    """Batch-tokenise prompt strings and left-pad them to a bucket length.

    Args:
      tokenizer: an HF tokenizer (its pad id, else its EOS id, pads).
      prompts: B strings, already templated (see ``templates.format_prompts``).
      buckets: allowed padded lengths T.
      overflow: "error" | "truncate" (keep the last tokens) | "skip" for prompts over the largest
        bucket.
      add_special_tokens: let the tokenizer add its special ids (BOS, and EOS where it appends
        one) to every prompt, even one whose template wrote them. Off by default: the leading
        ones (Llama 3's BOS) are put once, where the prompt does not start with them.
    Returns:
      A ``PromptBatch`` with ``input_ids``/``attention_mask`` of shape [B', T] int32.
    """
    encoded = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
    if not add_special_tokens:  # still the tokenizer's BOS, once, as `tokenize_sft` and the stages
        encoded = toks.with_leading_specials(tokenizer, encoded)
    return batch_prompt_ids(
        encoded,
        pad_id=pad_token_id(tokenizer),
        buckets=buckets,
        overflow=overflow,
        leading=toks.leading_special_ids(tokenizer),
    )


def pad_token_id(tokenizer) -> int:
    """The id prompts and completions are padded with: the pad token, else the EOS."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
    return int(pad)


# --------------------------------------------------------------------------------------------
# SFT sequences (right-padded, optionally packed)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SFTBatch:
    """Right-padded prompt+completion sequences.

    Attributes:
      input_ids: [N, L] int32, pad id in the padding.
      loss_mask: [N, L] int32, 1 on completion tokens (targets), 0 on prompt and padding.
      segment_ids: [N, L] int32, 1.. per example within a row, 0 on padding.
      positions: [N, L] int32, 0-based position within each example, 0 on padding.
      attention_mask: [N, L] int32, 1 = token, 0 = pad (``segment_ids > 0``).
      num_truncated: examples whose completion was cut to fit ``seq_len``.
      num_skipped: examples dropped: too long with overflow="skip", a prompt that fills the
        whole row by itself, or an empty completion.
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    attention_mask: np.ndarray
    num_truncated: int
    num_skipped: int


def pack_sft_ids(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    *,
    seq_len: int,
    pad_id: int,
    pack: bool = False,
    overflow: str = "truncate",
) -> SFTBatch:
    """Lay out tokenised (prompt, completion) pairs as fixed-length rows.

    Args:
      prompt_ids, completion_ids: per example token lists (completion includes EOS if wanted).
      seq_len: row length L.
      pad_id: padding token id.
      pack: several examples per row (greedy, in order) instead of one.
      overflow: for an example longer than L: "truncate" (cut the completion's end),
        "skip" (drop it), "error" (raise).
    Returns:
      An ``SFTBatch`` of N rows (N = examples, or fewer when packed).
    """
    _check_overflow(overflow)
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    examples, truncated, skipped = [], 0, 0
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        p, c = list(p), list(c)
        if len(p) + len(c) > seq_len:
            if overflow == "error":
                raise ValueError(
                    f"example {i} has {len(p) + len(c)} tokens, more than seq_len "
                    f"{seq_len}; raise seq_len or set overflow='truncate'/'skip'"
                )
            if overflow == "skip" or len(p) >= seq_len:
                skipped += 1  # nothing of the completion would be left to learn from
                continue
            c = c[: seq_len - len(p)]
            truncated += 1
        if not c:
            skipped += 1
            continue
        examples.append((p, c))
    if not examples:
        raise ValueError(f"no SFT example fits seq_len {seq_len} ({skipped} skipped)")
    rows: list[list[tuple[list[int], list[int]]]] = []
    used = seq_len  # forces a new row for the first example
    for p, c in examples:
        n = len(p) + len(c)
        if not pack or used + n > seq_len:
            rows.append([])
            used = 0
        rows[-1].append((p, c))
        used += n
    shape = (len(rows), seq_len)
    ids = np.full(shape, pad_id, np.int32)
    loss = np.zeros(shape, np.int32)
    seg = np.zeros(shape, np.int32)
    pos = np.zeros(shape, np.int32)
    for r, row in enumerate(rows):
        t = 0
        for s, (p, c) in enumerate(row, start=1):
            n = len(p) + len(c)
            ids[r, t : t + n] = p + c
            loss[r, t + len(p) : t + n] = 1
            seg[r, t : t + n] = s
            pos[r, t : t + n] = np.arange(n)
            t += n
    return SFTBatch(ids, loss, seg, pos, (seg > 0).astype(np.int32), truncated, skipped)


def tokenize_sft(
    tokenizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    seq_len: int,
    pack: bool = False,
    append_eos: bool = True,
    overflow: str = "truncate",
    add_special_tokens: bool = False,
    ends: Sequence[str] | None = None,
) -> SFTBatch:
    """Tokenise prompt and completion strings separately and lay them out (``pack_sft_ids``).

    Args:
      tokenizer: an HF tokenizer.
      prompts, completions: N strings each; prompts already templated.
      seq_len: row length L.
      pack: pack several examples per row.
      append_eos: end each completion with the tokenizer's EOS token (the model learns to stop).
      overflow: see ``pack_sft_ids``.
      add_special_tokens: let the tokenizer add BOS etc. to prompts.
      ends: per completion, the special-token text that ends it in place of the EOS (a chat
        template's end of turn, ``templates.turn_end``); "" = the EOS. Needs append_eos.
    Returns:
      An ``SFTBatch`` with [N', L] int32 arrays.
    """
    p_ids = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
    if not add_special_tokens:  # still the tokenizer's BOS, once (see `with_leading_specials`)
        p_ids = toks.with_leading_specials(tokenizer, p_ids)
    # A completion is text: "<|endoftext|>" written in it is those characters, not the EOS token
    # (which would teach the model to stop mid-answer, and end the row's loss there).
    c_ids = toks.encode_completions(tokenizer, completions)
    if append_eos:
        ends = [""] * len(c_ids) if ends is None else list(ends)
        if len(ends) != len(c_ids):
            raise ValueError(f"{len(ends)} ends for {len(c_ids)} completions")
        if tokenizer.eos_token_id is None and "" in ends:
            raise ValueError("append_eos=True but the tokenizer has no EOS token")
        end_ids = {e: tokenizer(e, add_special_tokens=False)["input_ids"] for e in set(ends) if e}
        end_ids[""] = [tokenizer.eos_token_id]
        c_ids = [list(c) + end_ids[e] for c, e in zip(c_ids, ends, strict=True)]
    elif ends is not None:
        raise ValueError("ends replace the appended EOS: they need append_eos=True")
    return pack_sft_ids(
        p_ids, c_ids, seq_len=seq_len, pad_id=pad_token_id(tokenizer), pack=pack, overflow=overflow
    )
