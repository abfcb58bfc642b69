"""Supervised losses: masked next-token cross-entropy and logit distillation (pure array math).

Used by the cold-start SFT, rejection-sampling SFT and distillation stages. Everything here is a
pure function of arrays, tested against a float64 numpy reference.

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
"""

import jax
import jax.numpy as jnp

from r1jax.grpo import chunked_token_logprobs, token_logprobs


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
    teacher = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32) / temperature)
    log_p_teacher = jax.nn.log_softmax(teacher, axis=-1)
    log_p_student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    p_teacher = jnp.exp(log_p_teacher)
    # where(): a vocabulary entry the teacher rules out must not turn 0 * (-inf) into NaN.
    per_vocab = jnp.where(p_teacher > 0, p_teacher * (log_p_teacher - log_p_student), 0.0)
    return _normalised(jnp.sum(per_vocab, axis=-1), mask, num_items_in_batch)


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
