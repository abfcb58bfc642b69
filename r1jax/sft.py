"""Supervised losses and steps: masked next-token cross-entropy, logit distillation.

Used by the cold-start SFT, rejection-sampling SFT and distillation stages. The losses are pure
functions of arrays, tested against a float64 numpy reference; `train_step` and `distill_step`
run them on a model through the jitted, sharded update of `r1jax.train`:

    metrics = sft.train_step(train_state, batch, cfg)              # batch: data.batching.SFTBatch
    metrics = sft.distill_step(train_state, teacher, batch, cfg)   # teacher: frozen, same vocab

Notable choices:
- Inputs are already aligned: `logits[b, t]` predicts `targets[b, t]`. For a token sequence feed
  the model `tokens[:, :-1]` and score `targets = tokens[:, 1:]`; `loss_mask` is 1 where the
  target is a completion token, so prompt (and padding, and packed-segment boundary) positions
  contribute nothing and get exactly zero gradient. Sequence packing changes only the model's
  attention (segment ids), not these losses.
- Losses are a token sum divided by the token count. Under gradient accumulation pass the token
  count of the whole batch as `num_items_in_batch`; the micro-batch losses then *sum* to the
  full-batch loss (the same convention as `grpo.policy_loss(loss_type="dapo")`).
- Distillation is the forward KL(teacher || student) of the full next-token distributions, not
  Hinton's T^2-scaled variant: at `temperature=1` the value is the true per-token KL in nats.
- The steps take `SFTBatch` rows as they come (loss_mask marks completion *tokens*) and shift:
  position t-1 predicts token t, which counts when token t is a completion token of the same
  packed segment as position t-1. Segment ids and per-segment positions always go to the model,
  so a packed row computes exactly what its examples would alone (but with `rope_type:
  dynamic`, whose base follows the longest position of the packed row: its longest example's).
- Step losses divide by the completion-token count of the whole batch, so micro-batches sum to
  the full-batch loss (every token weighs the same, however the rows are split or packed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from r1jax import train
from r1jax.grpo import chunked_token_logprobs, over_position_chunks, token_logprobs


def masked_cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    loss_mask: jax.Array,
    *,
    num_items_in_batch: jax.Array | float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean next-token cross-entropy over the positions where `loss_mask` is 1.

    Args:
      logits: [B, T, V] any float dtype (computed in float32).
      targets: [B, T] int next tokens, aligned with `logits` (module docstring).
      loss_mask: [B, T] 1 on completion targets, 0 on prompt and padding.
      num_items_in_batch: token count to divide by (all micro-batches of an accumulated batch);
        None divides by `loss_mask.sum()`. Clamped to >= 1.
    Returns:
      (loss, metrics): float32 scalar loss; metrics `num_tokens` (tokens in this call).
    """
    _check(logits.shape[:2], targets=targets, loss_mask=loss_mask)
    return _normalised(-token_logprobs(logits, targets), loss_mask, num_items_in_batch)


def chunked_cross_entropy(
    hidden: jax.Array,
    unembedding: jax.Array,
    targets: jax.Array,
    loss_mask: jax.Array,
    *,
    chunk_size: int = 256,
    num_items_in_batch: jax.Array | float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`masked_cross_entropy` of `hidden @ unembedding` without materialising [B, T, V] logits.

    Args:
      hidden: [B, T, D] final (post-norm) hidden states.
      unembedding: [D, V] output projection (tied embeddings: the embedding table transposed).
      targets, loss_mask, num_items_in_batch: as in `masked_cross_entropy`.
      chunk_size: positions per chunk (static); see `grpo.chunked_token_logprobs`.
    Returns:
      (loss, metrics) as `masked_cross_entropy`.
    """
    _check(hidden.shape[:2], targets=targets, loss_mask=loss_mask)
    logp, _ = chunked_token_logprobs(hidden, unembedding, targets, chunk_size=chunk_size)
    return _normalised(-logp, loss_mask, num_items_in_batch)


def logit_distillation_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    mask: jax.Array,
    temperature: float = 1.0,
    *,
    num_items_in_batch: jax.Array | float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Forward KL(teacher || student) per position, averaged over the positions where mask is 1.

    `KL_t = sum_v p_teacher(v) * (log p_teacher(v) - log p_student(v))`, both distributions being
    softmax(logits / temperature). The teacher is treated as a constant (no gradient). Teacher
    entries with probability 0 (logits of -inf) contribute 0.

    Args:
      student_logits: [B, T, V].
      teacher_logits: [B, T, V], same vocabulary (and tokenizer) as the student.
      mask: [B, T] 1 on positions to distil.
      temperature: static float > 0, applied to both.
      num_items_in_batch: as in `masked_cross_entropy`.
    Returns:
      (loss, metrics): float32 scalar loss (nats per token); metrics `num_tokens`.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {student_logits.shape} and teacher_logits {teacher_logits.shape} must "
            "have the same [B, T, V] shape (same tokenizer, same positions)."
        )
    _check(student_logits.shape[:2], mask=mask)
    per_token = _forward_kl(student_logits, teacher_logits, temperature)
    return _normalised(per_token, mask, num_items_in_batch)


def chunked_distillation_loss(
    hidden: jax.Array,
    unembedding: jax.Array,
    teacher_hidden: jax.Array,
    teacher_unembedding: jax.Array,
    mask: jax.Array,
    temperature: float = 1.0,
    *,
    vocab: int = 0,
    chunk_size: int = 256,
    num_items_in_batch: jax.Array | float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`logit_distillation_loss` of `hidden @ unembedding` against `teacher_hidden @
    teacher_unembedding` without materialising either [B, T, V] logits (two of them, and their
    softmaxes, are ~15 GB per row of 4096 tokens at Qwen's 152K vocabulary).

    Args:
      hidden, teacher_hidden: [B, T, D] and [B, T, D_teacher] final hidden states.
      unembedding, teacher_unembedding: [D, V] and [D_teacher, V'] output projections.
      mask, temperature, num_items_in_batch: as `logit_distillation_loss`.
      vocab: > 0 compares the first `vocab` ids only (embeddings padded past the tokenizer).
      chunk_size: positions per chunk (static); see `grpo.over_position_chunks`.
    """
    _check(hidden.shape[:2], mask=mask)
    widths = (unembedding.shape[-1], teacher_unembedding.shape[-1])
    if teacher_hidden.shape[:2] != hidden.shape[:2] or (
        widths[0] != widths[1] if not vocab else vocab > min(widths)
    ):
        raise ValueError(
            f"hidden {hidden.shape} with {widths[0]} ids and teacher_hidden "
            f"{teacher_hidden.shape} with {widths[1]} must share [B, T] and the vocabulary "
            f"(vocab={vocab}: the first ids of both; same tokenizer, same positions)."
        )
    if vocab:
        unembedding, teacher_unembedding = unembedding[:, :vocab], teacher_unembedding[:, :vocab]

    def one_chunk(h, teacher_h):
        logits = jnp.einsum("bcd,dv->bcv", h, unembedding, preferred_element_type=jnp.float32)
        teacher = jnp.einsum(
            "bcd,dv->bcv", teacher_h, teacher_unembedding, preferred_element_type=jnp.float32
        )
        return _forward_kl(logits, teacher, temperature)

    teacher_hidden = jax.lax.stop_gradient(teacher_hidden)
    per_token = over_position_chunks(one_chunk, chunk_size, hidden, teacher_hidden)
    return _normalised(per_token, mask, num_items_in_batch)


def _forward_kl(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float):
    """KL(teacher || student) of [..., V] logits at `temperature`, per position [...]."""
    teacher = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32) / temperature)
    log_p_teacher = jax.nn.log_softmax(teacher, axis=-1)
    log_p_student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    p_teacher = jnp.exp(log_p_teacher)
    # where(): a vocabulary entry the teacher rules out must not turn 0 * (-inf) into NaN.
    per_vocab = jnp.where(p_teacher > 0, p_teacher * (log_p_teacher - log_p_student), 0.0)
    return jnp.sum(per_vocab, axis=-1)


def _normalised(
    per_token: jax.Array, mask: jax.Array, num_items_in_batch: jax.Array | float | None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Masked token sum / token count, with padding zeroed before the sum (no NaN leaks)."""
    mask = mask.astype(jnp.float32)
    num_tokens = jnp.sum(mask)
    total = num_tokens if num_items_in_batch is None else num_items_in_batch
    loss_sum = jnp.sum(jnp.where(mask > 0, per_token, 0.0) * mask)
    loss = loss_sum / jnp.maximum(jnp.asarray(total, jnp.float32), 1.0)
    return loss, {"num_tokens": num_tokens}


def _check(batch_shape: tuple[int, ...], **arrays: jax.Array) -> None:
    for name, x in arrays.items():
        if x.shape != tuple(batch_shape):
            raise ValueError(f"{name} must be [B, T] = {tuple(batch_shape)}, got shape {x.shape}.")


# --------------------------------------------------------------------------------------------------
# Steps on a model
# --------------------------------------------------------------------------------------------------

SFT_FIELDS = ("input_ids", "loss_mask", "segment_ids", "positions", "attention_mask")


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Options of the SFT and distillation steps. Frozen and hashable (a static argument).

    num_micro_batches:   gradient-accumulation steps per optimizer step; rows must divide by it.
    logits_chunk_size:   positions per logits chunk in the cross-entropy or the distillation KL
                         (memory, not math).
    distill_temperature: softmax temperature of both distributions in `distill_step`.
    distill_vocab:       the first `distill_vocab` token ids are the vocabulary `distill_step`
                         compares the two distributions over: the tokenizer's size, when the
                         teacher and the student pad their embedding tables differently (Qwen2.5
                         7B: 152064 rows, 1.5B: 151936, for one 151665-token tokenizer). 0 = the
                         whole vocabulary, which must then be the same size in both.
    """

    num_micro_batches: int = 1
    logits_chunk_size: int = 256
    distill_temperature: float = 1.0
    distill_vocab: int = 0

    def __post_init__(self):
        if self.num_micro_batches < 1 or self.logits_chunk_size < 1:
            raise ValueError(
                f"sft.num_micro_batches and sft.logits_chunk_size must be >= 1, got "
                f"{self.num_micro_batches} and {self.logits_chunk_size}"
            )
        if not 0 < self.distill_temperature < float("inf"):
            raise ValueError(f"sft.distill_temperature must be > 0, got {self.distill_temperature}")
        if self.distill_vocab < 0:
            raise ValueError(f"sft.distill_vocab must be >= 0, got {self.distill_vocab}")


def sft_arrays(batch: Any) -> dict[str, Any]:
    """An `SFTBatch` (or a mapping with its fields) -> {field: [N, L] array} for the steps."""
    get = batch.get if isinstance(batch, Mapping) else lambda k: getattr(batch, k, None)
    arrays = {k: get(k) for k in SFT_FIELDS}
    missing = [k for k, v in arrays.items() if v is None]
    if missing:
        raise ValueError(
            f"SFT batch lacks {missing}; build it with data.batching.pack_sft_ids or tokenize_sft"
        )
    shape = np.shape(arrays["input_ids"])
    bad = {k: np.shape(v) for k, v in arrays.items() if np.shape(v) != shape or len(shape) != 2}
    if bad:
        raise ValueError(f"SFT batch fields must all be [N, L] like input_ids {shape}, got {bad}")
    return arrays


def next_token_targets(batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Targets and loss mask aligned with positions 0 .. L-2 of the model's output.

    Position t predicts token t + 1; it counts when token t + 1 is a completion token of the
    same segment (a packed row's next example is never predicted from the previous one).
    Returns (targets [N, L-1] int32, mask [N, L-1] float32).
    """
    seg = batch["segment_ids"]
    same_segment = seg[:, 1:] == seg[:, :-1]
    mask = (batch["loss_mask"][:, 1:] > 0) & same_segment
    return batch["input_ids"][:, 1:], mask.astype(jnp.float32)


def _hidden(model: nnx.Module, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, Any]:
    """([N, L-1, D] hidden states, routing counts of a mixture-of-experts model or None)."""
    hidden, router = train.hidden_states(
        model,
        batch["input_ids"],
        batch["attention_mask"],
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
    )
    return hidden[:, :-1], router  # the last position predicts nothing


def sft_loss(
    model: nnx.Module,
    batch: Mapping[str, jax.Array],
    *,
    chunk_size: int = 256,
    num_items_in_batch: jax.Array | float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Masked next-token cross-entropy of `model` on SFT rows (inside jit).

    Args:
      model: a `Decoder`.
      batch: `sft_arrays(...)`: [N, L] input_ids, loss_mask, segment_ids, positions,
        attention_mask.
      chunk_size: positions per logits chunk.
      num_items_in_batch: token count to divide by (the whole accumulated batch); None = this
        batch's own count.
    Returns:
      (loss, metrics) as `chunked_cross_entropy`, plus "router" (the forward's `RouterStats`)
      for a mixture-of-experts model.
    """
    targets, mask = next_token_targets(batch)
    hidden, router = _hidden(model, batch)
    loss, metrics = chunked_cross_entropy(
        hidden,
        model.unembedding(),
        targets,
        mask,
        chunk_size=chunk_size,
        num_items_in_batch=num_items_in_batch,
    )
    return loss, _with_router(metrics, router)


def distill_loss(
    model: nnx.Module,
    teacher: nnx.Module,
    batch: Mapping[str, jax.Array],
    *,
    temperature: float = 1.0,
    vocab: int = 0,
    chunk_size: int = 256,
    num_items_in_batch: jax.Array | float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Forward KL(teacher || student) per completion position (inside jit), `chunk_size`
    positions' logits at a time; the teacher gets no gradient. `vocab` > 0 compares the
    distributions over the first `vocab` ids only (the tokenizer's; `SFTConfig.distill_vocab`).
    Other arguments as `sft_loss`; returns (loss, metrics) as `logit_distillation_loss`."""
    _, mask = next_token_targets(batch)
    hidden, router = _hidden(model, batch)
    teacher_hidden = _hidden(teacher, batch)[0]
    # (embedding rows past the tokenizer, `vocab`, are padding: no token, no probability)
    loss, metrics = chunked_distillation_loss(
        hidden,
        model.unembedding(),
        teacher_hidden,
        jax.lax.stop_gradient(teacher.unembedding()),
        mask,
        temperature,
        vocab=vocab,
        chunk_size=chunk_size,
        num_items_in_batch=num_items_in_batch,
    )
    return loss, _with_router(metrics, router)


def _with_router(metrics: dict[str, jax.Array], router) -> dict[str, Any]:
    """Routing counts ride along with the metrics to `train.router_step` (MoE models only)."""
    return metrics if router is None else {**metrics, "router": router}


def train_step(
    train_state: train.TrainState, batch: Any, cfg: SFTConfig = SFTConfig()
) -> dict[str, jax.Array]:
    """One optimizer step of masked cross-entropy on `batch`, in place on `train_state`.

    Args:
      train_state: the model being fine-tuned and its optimizer.
      batch: an `SFTBatch` (or mapping) of [N, L] rows; N must divide by the batch axes and by
        `cfg.num_micro_batches`.
      cfg: SFTConfig (static).
    Returns:
      replicated float32 scalars: `loss` (mean cross-entropy per completion token), `num_tokens`
      (completion tokens in the batch), `grad_norm`, `learning_rate`, `update_skipped`,
      `skipped_updates` (total so far); for a DeepSeek model also `router/*`
      (`deepseek.router_step`), with the routing bias updated when `router_bias_rate` > 0.
    """
    return train_state.run_step(_sft_step, sft_arrays(batch), cfg=cfg)


def distill_step(
    train_state: train.TrainState, teacher: nnx.Module, batch: Any, cfg: SFTConfig = SFTConfig()
) -> dict[str, jax.Array]:
    """One optimizer step of logit distillation from `teacher` (frozen, same tokenizer).

    As `train_step`, with `loss` the mean KL(teacher || student) per completion token (nats).
    The teacher should be placed on the train state's mesh in its training layout (e.g.
    `hf.load(path, mesh)`); it is read, never donated or changed.
    """
    sizes = (teacher.cfg.vocab_size, train_state.model.cfg.vocab_size)
    if cfg.distill_vocab == 0 and sizes[0] != sizes[1]:
        raise ValueError(
            f"teacher vocab_size {sizes[0]} differs from the student's {sizes[1]}: with one "
            "tokenizer padded to two sizes, set SFTConfig.distill_vocab to the tokenizer's size"
        )
    if cfg.distill_vocab > min(sizes):
        raise ValueError(
            f"SFTConfig.distill_vocab={cfg.distill_vocab} exceeds the teacher's ({sizes[0]}) or "
            f"the student's ({sizes[1]}) vocab_size"
        )
    return train_state.run_step(_distill_step, sft_arrays(batch), teacher, cfg=cfg)


def _sft_step(model, optimizer: train.Optimizer, batch, *, cfg: SFTConfig):
    num_items = jnp.sum(next_token_targets(batch)[1])
    loss_fn = lambda m, micro: sft_loss(
        m, micro, chunk_size=cfg.logits_chunk_size, num_items_in_batch=num_items
    )
    return _step(loss_fn, model, optimizer, batch, num_items, cfg)


def _distill_step(model, optimizer: train.Optimizer, batch, teacher, *, cfg: SFTConfig):
    num_items = jnp.sum(next_token_targets(batch)[1])
    loss_fn = lambda m, micro: distill_loss(
        m,
        teacher,
        micro,
        temperature=cfg.distill_temperature,
        vocab=cfg.distill_vocab,
        chunk_size=cfg.logits_chunk_size,
        num_items_in_batch=num_items,
    )
    return _step(loss_fn, model, optimizer, batch, num_items, cfg)


def _step(
    loss_fn, model, optimizer: train.Optimizer, batch, num_items, cfg: SFTConfig
) -> dict[str, jax.Array]:
    # Every micro-batch loss is already divided by the whole batch's token count: sum them.
    loss, grads, aux = train.accumulate_gradients(
        loss_fn, model, batch, cfg.num_micro_batches, sum_micro_batches=True
    )
    metrics = {"loss": loss, "num_tokens": num_items}
    metrics.update(optimizer.apply_gradients(model, grads))
    metrics.update(train.router_step(model, aux.get("router"), metrics["update_skipped"] > 0))
    metrics["skipped_updates"] = optimizer.skipped[...].astype(jnp.float32)
    return metrics
