"""GRPO's array math: group advantages, the clipped policy loss, token log-probs, reward metrics.

Everything here is a pure function of arrays (no model inside), so it can be unit-tested against a
float64 numpy reference and called from inside the jitted update step. Option names and meanings
follow TRL's `GRPOConfig` / `GRPOTrainer` so that configs and logged numbers carry over.

Notable choices:
- Advantages are `(r - group mean) / (Bessel std + 1e-4)` as in TRL. Rewards are shifted by the
  group's first reward before averaging: mathematically a no-op, but it makes a group of equal
  rewards give advantages of exactly 0 (rounding in the mean would otherwise leave tiny ones).
- The loss is the *negated* objective: `-min(ratio * A, clip(ratio) * A) + beta * KL3`, so an
  optimiser minimises it. KL3 is the unbiased, non-negative estimator `exp(ref - logp) -
  (ref - logp) - 1` of KL(policy || reference).
- Aggregation (`loss_type`): `grpo` averages tokens within each sequence, then sequences (the
  DeepSeekMath paper); `bnpo` averages all completion tokens of the batch; `dr_grpo` divides the
  token sum by `B * max_completion_length` (Dr. GRPO, no length bias); `dapo` divides the token sum
  by the completion-token count of the whole generation batch, passed as `num_items_in_batch` so
  that micro-batch losses *sum* to the full-batch loss under gradient accumulation. For the other
  three types the step averages micro-batch losses (TRL divides by the accumulation steps).
- Positions where `mask == 0` are replaced by zeros before any arithmetic, so padding can hold
  anything (even -inf) without a NaN reaching the loss or the gradient; prompt and pad positions
  get exactly zero gradient.
- Log-probs use a one-hot reduction instead of a gather: it partitions cleanly when the vocabulary
  axis is sharded over the `tensor` mesh axis, and XLA fuses it without materialising the one-hot.
  The chunked variant never holds more than one `[B, chunk, V]` block of logits, forward or
  backward (`jax.checkpoint` inside `jax.lax.map`).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
ADVANTAGE_SCALES = ("group", "batch", "none")

# TRL adds this to the reward std; it bounds advantages at |r - mean| * 1e4 for near-equal groups.
_STD_EPS = 1e-4


# --------------------------------------------------------------------------------------------------
# Masked reductions
# --------------------------------------------------------------------------------------------------


def masked_mean(
    x: jax.Array, mask: jax.Array, axis: int | tuple[int, ...] | None = None
) -> jax.Array:
    """Mean of `x` over positions where `mask` is non-zero; 0 (never NaN) when nothing is selected.

    Args:
      x: any shape, broadcastable against `mask`.
      mask: 0/1 (or bool) of the same shape.
      axis: axes to reduce; None reduces everything.
    Returns:
      float32 array with `axis` reduced. Masked-out entries of `x` may be NaN or inf.
    """
    mask = mask.astype(jnp.float32)
    total = jnp.sum(jnp.where(mask > 0, x.astype(jnp.float32), 0.0), axis=axis)
    return total / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def _bessel_std(x: jax.Array, axis: int | None = None) -> jax.Array:
    """Sample standard deviation (n - 1 in the denominator) over all of `x` or its last axis."""
    if axis not in (None, -1):
        raise ValueError(f"_bessel_std reduces everything or the last axis, got axis={axis}.")
    n = x.size if axis is None else x.shape[-1]
    if n < 2:  # one sample has no spread; TRL's torch.std would give NaN here
        return jnp.zeros(() if axis is None else x.shape[:-1], x.dtype)
    # Shift by one element first: equal values then give a std of exactly 0, not rounding noise.
    first = x.reshape(-1)[0] if axis is None else x[..., :1]
    dev = (x - first) - jnp.mean(x - first, axis=axis, keepdims=axis is not None)
    return jnp.sqrt(jnp.sum(dev * dev, axis=axis) / (n - 1))


# --------------------------------------------------------------------------------------------------
# Advantages and reward metrics
# --------------------------------------------------------------------------------------------------


def group_advantages(rewards: jax.Array, group_size: int, scale: str = "group") -> jax.Array:
    """Group-relative advantages, as TRL's `GRPOTrainer` computes them.

    `rewards` is prompt-major: the G samples of prompt 0 come first, then those of prompt 1, ...
    Each reward minus its group's mean is divided by `std + 1e-4`, where std (Bessel-corrected) is
    the group's (`scale="group"`, TRL's default and the paper), the whole batch's (`"batch"`,
    TRL's `scale_rewards="batch"`), or not divided at all (`"none"`, Dr. GRPO). A group whose
    rewards are all equal gets advantages of exactly 0.

    Args:
      rewards: [P * G] float rewards.
      group_size: G, samples per prompt (TRL's `num_generations`); a static Python int.
      scale: "group" | "batch" | "none".
    Returns:
      [P * G] float32 advantages.
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}.")
    rewards = jnp.asarray(rewards, jnp.float32)
    grouped = _grouped(rewards, group_size, "rewards")  # [P, G]
    shifted = grouped - grouped[:, :1]
    centred = (shifted - jnp.mean(shifted, axis=-1, keepdims=True)).reshape(-1)
    if scale == "none":
        return centred
    if scale == "group":
        std = jnp.repeat(_bessel_std(grouped, axis=-1), group_size)
    else:
        std = _bessel_std(rewards)
    return centred / (std + _STD_EPS)


def reward_metrics(
    rewards: jax.Array, per_reward: jax.Array, names: Sequence[str], group_size: int
) -> dict[str, jax.Array]:
    """Reward statistics for logging, named as TRL logs them.

    Args:
      rewards: [B] total (weighted) reward per sample, prompt-major groups of `group_size`.
      per_reward: [R, B] each reward function's raw score; NaN marks "not applicable" (TRL).
      names: R reward function names.
      group_size: G.
    Returns:
      float32 scalars: `reward` (mean), `reward_std` (mean over groups of the Bessel group std),
      `frac_reward_zero_std` (share of groups whose rewards are all equal: they carry no learning
      signal), and per function `rewards/<name>/mean`, `rewards/<name>/std` (NaN-aware; NaN when
      the function applied to no sample, or the std to fewer than two).
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    per_reward = jnp.asarray(per_reward, jnp.float32)
    if per_reward.ndim != 2 or per_reward.shape[1] != rewards.shape[0]:
        raise ValueError(
            f"per_reward must be [R, B] with B = len(rewards) = {rewards.shape[0]}, "
            f"got shape {per_reward.shape}."
        )
    if len(names) != per_reward.shape[0]:
        raise ValueError(
            f"names has {len(names)} entries but per_reward has {per_reward.shape[0]} rows."
        )
    group_std = _bessel_std(_grouped(rewards, group_size, "rewards"), axis=-1)  # [P]
    metrics = {
        "reward": jnp.mean(rewards),
        "reward_std": jnp.mean(group_std),
        "frac_reward_zero_std": jnp.mean(jnp.isclose(group_std, 0.0).astype(jnp.float32)),
    }
    for name, row in zip(names, per_reward, strict=True):
        valid = ~jnp.isnan(row)
        count = jnp.sum(valid)
        mean = jnp.sum(jnp.where(valid, row, 0.0)) / count  # NaN when count == 0, as TRL
        sq = jnp.sum(jnp.where(valid, (row - mean) ** 2, 0.0))
        metrics[f"rewards/{name}/mean"] = mean
        metrics[f"rewards/{name}/std"] = jnp.where(count > 1, jnp.sqrt(sq / (count - 1)), jnp.nan)
    return metrics


def _grouped(x: jax.Array, group_size: int, what: str) -> jax.Array:
    if x.ndim != 1:
        raise ValueError(f"{what} must be 1-D [P * G], got shape {x.shape}.")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}.")
    if x.shape[0] % group_size:
        raise ValueError(
            f"{what} has {x.shape[0]} entries, not a multiple of group_size={group_size}; "
            "it must hold G samples for each prompt, prompt-major."
        )
    return x.reshape(-1, group_size)


# --------------------------------------------------------------------------------------------------
# Policy loss
# --------------------------------------------------------------------------------------------------


def policy_loss(
    logprobs: jax.Array,
    old_logprobs: jax.Array | None,
    ref_logprobs: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    loss_type: str = "grpo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.04,
    max_completion_length: int | None = None,
    num_items_in_batch: jax.Array | float | None = None,
    entropy: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The GRPO loss (negated clipped objective plus `beta` * K3 KL) and its diagnostics.

    Per token, with `ratio = exp(logprobs - old_logprobs)`:
      `loss_t = -min(ratio * A, clip(ratio, 1 - epsilon_low, 1 + epsilon_high) * A)
                + beta * (exp(ref - logprobs) - (ref - logprobs) - 1)`,
    then aggregated over the tokens where `mask == 1` according to `loss_type` (module docstring).

    Args:
      logprobs: [B, T] log-probs of the sampled tokens under the policy being trained.
      old_logprobs: [B, T] log-probs under the policy that sampled them (for μ > 1 iterations);
        None means "same as `logprobs`" (μ = 1): the ratio is 1 but its gradient is kept, as TRL.
      ref_logprobs: [B, T] log-probs under the frozen reference; None is only allowed with beta=0,
        so the reference model need not be run at all.
      advantages: [B] one advantage per sequence (`group_advantages`).
      mask: [B, T] 1 on completion tokens that count, 0 on prompt and padding.
      loss_type: "grpo" | "bnpo" | "dr_grpo" | "dapo" (static).
      epsilon_low, epsilon_high: clip range [1 - epsilon_low, 1 + epsilon_high]; epsilon_high >
        epsilon_low is DAPO's clip-higher (TRL's `epsilon` and `epsilon_high`). Static floats.
      beta: KL weight, static float; 0 drops the KL term.
      max_completion_length: the generation budget; required by "dr_grpo", ignored otherwise.
      num_items_in_batch: "dapo" only: completion-token count of the whole generation batch (all
        gradient-accumulation micro-batches, all devices). None uses `mask.sum()`, i.e. this call
        is the whole batch. May be a traced scalar; clamped to >= 1.
      entropy: optional [B, T] per-token policy entropy, only logged.
    Returns:
      (loss, metrics): loss is a float32 scalar to minimise. metrics holds float32 scalars:
      `kl` (masked token mean of K3, only when `ref_logprobs` is given), `clip_ratio/low_mean`,
      `clip_ratio/high_mean`, `clip_ratio/region_mean` (share of tokens whose ratio sits outside
      the clip range on the side where clipping removes the gradient: below with A < 0, above with
      A > 0), `entropy` (when given), `completions/mean_length`, `/min_length`, `/max_length`.
    """
    _check_shapes(
        logprobs,
        advantages,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
        mask=mask,
        entropy=entropy,
    )
    _check_options(
        loss_type,
        epsilon_low,
        epsilon_high,
        beta,
        max_completion_length,
        num_items_in_batch,
        has_ref=ref_logprobs is not None,
    )
    mask = mask.astype(jnp.float32)
    valid = mask > 0
    # Zero the padding before exp(): otherwise its inf/NaN would leak into the gradient via 0 * inf.
    logp = jnp.where(valid, logprobs.astype(jnp.float32), 0.0)
    if old_logprobs is None:
        old = jax.lax.stop_gradient(logp)
    else:
        old = jnp.where(valid, old_logprobs.astype(jnp.float32), 0.0)
    adv = advantages.astype(jnp.float32)[:, None]  # [B, 1]

    ratio = jnp.exp(logp - old)
    clipped_ratio = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    per_token = -jnp.minimum(ratio * adv, clipped_ratio * adv)  # [B, T]

    metrics = {}
    if ref_logprobs is not None:
        ref = jnp.where(valid, ref_logprobs.astype(jnp.float32), 0.0)
        kl = jnp.exp(ref - logp) - (ref - logp) - 1.0
        if beta != 0.0:
            per_token = per_token + beta * kl
        metrics["kl"] = masked_mean(kl, mask)

    loss = _aggregate(per_token * mask, mask, loss_type, max_completion_length, num_items_in_batch)

    is_low = (ratio < 1.0 - epsilon_low) & (adv < 0)
    is_high = (ratio > 1.0 + epsilon_high) & (adv > 0)
    metrics["clip_ratio/low_mean"] = masked_mean(is_low, mask)
    metrics["clip_ratio/high_mean"] = masked_mean(is_high, mask)
    metrics["clip_ratio/region_mean"] = masked_mean(is_low | is_high, mask)
    if entropy is not None:
        metrics["entropy"] = masked_mean(entropy, mask)
    lengths = jnp.sum(mask, axis=-1)
    metrics["completions/mean_length"] = jnp.mean(lengths)
    metrics["completions/min_length"] = jnp.min(lengths)
    metrics["completions/max_length"] = jnp.max(lengths)
    return loss, metrics


def _aggregate(
    masked_loss: jax.Array,
    mask: jax.Array,
    loss_type: str,
    max_completion_length: int | None,
    num_items_in_batch: jax.Array | float | None,
) -> jax.Array:
    """[B, T] per-token losses (already zero off-mask) -> scalar, per `loss_type`."""
    if loss_type == "grpo":
        per_seq = jnp.sum(masked_loss, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
        return jnp.mean(per_seq)
    if loss_type == "bnpo":
        return jnp.sum(masked_loss) / jnp.maximum(jnp.sum(mask), 1.0)
    if loss_type == "dr_grpo":
        return jnp.sum(masked_loss) / (masked_loss.shape[0] * max_completion_length)
    # dapo
    total = jnp.sum(mask) if num_items_in_batch is None else num_items_in_batch
    return jnp.sum(masked_loss) / jnp.maximum(jnp.asarray(total, jnp.float32), 1.0)


def _check_shapes(logprobs: jax.Array, advantages: jax.Array, **same_shape: jax.Array | None):
    if logprobs.ndim != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {logprobs.shape}.")
    for name, x in same_shape.items():
        if x is not None and x.shape != logprobs.shape:
            raise ValueError(f"{name} must have logprobs' shape {logprobs.shape}, got {x.shape}.")
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(
            f"advantages must be [B] = {logprobs.shape[:1]} (one per sequence), "
            f"got shape {advantages.shape}."
        )


def _check_options(
    loss_type: str,
    epsilon_low: float,
    epsilon_high: float,
    beta: float,
    max_completion_length: int | None,
    num_items_in_batch: jax.Array | float | None,
    has_ref: bool,
) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}.")
    if not 0.0 <= epsilon_low < 1.0:
        raise ValueError(f"epsilon_low must be in [0, 1), got {epsilon_low}.")
    if epsilon_high < 0.0:
        raise ValueError(f"epsilon_high must be >= 0, got {epsilon_high}.")
    if beta < 0.0:
        raise ValueError(f"beta must be >= 0, got {beta}.")
    if not has_ref and beta != 0.0:
        raise ValueError(
            f"beta={beta} needs ref_logprobs (the KL is taken against the reference policy); "
            "pass them, or set beta=0.0 to train without the KL term."
        )
    if loss_type == "dr_grpo" and (
        not isinstance(max_completion_length, int) or max_completion_length < 1
    ):
        raise ValueError(
            "loss_type='dr_grpo' divides by batch * max_completion_length: pass "
            f"max_completion_length as a positive int (got {max_completion_length!r})."
        )
    if num_items_in_batch is not None and loss_type != "dapo":
        raise ValueError(
            f"num_items_in_batch only applies to loss_type='dapo', not {loss_type!r}; for the "
            "other types average micro-batch losses instead."
        )


# --------------------------------------------------------------------------------------------------
# Token log-probs
# --------------------------------------------------------------------------------------------------


def token_logprobs(logits: jax.Array, targets: jax.Array, temperature: float = 1.0) -> jax.Array:
    """log softmax(logits / temperature)[target] per position, in float32.

    Positions are already aligned: `logits[b, t]` is scored against `targets[b, t]` (for a
    sequence `tokens`, pass the logits of `tokens[:, :-1]` and `targets = tokens[:, 1:]`). Use the
    sampling temperature so these match the sampler's log-probs, as TRL does.

    Args:
      logits: [B, T, V] any float dtype.
      targets: [B, T] int token ids.
      temperature: static float > 0.
    Returns:
      [B, T] float32 log-probs.
    """
    logits = logits.astype(jnp.float32) / temperature
    return _target_logit(logits, targets) - jax.nn.logsumexp(logits, axis=-1)


def token_entropy(logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """Entropy of softmax(logits / temperature) per position: [B, T, V] -> [B, T] float32."""
    logits = logits.astype(jnp.float32) / temperature
    return _entropy(logits, jax.nn.logsumexp(logits, axis=-1))


def chunked_token_logprobs(
    hidden: jax.Array,
    unembedding: jax.Array,
    targets: jax.Array,
    *,
    chunk_size: int = 256,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """Token log-probs (and entropy) from final hidden states, `chunk_size` positions at a time.

    Equals `token_logprobs(hidden @ unembedding, targets)` but never holds the [B, T, V] logits:
    each chunk's logits are computed, reduced and dropped, and `jax.checkpoint` makes the backward
    pass recompute them chunk by chunk instead of storing them. T need not divide by chunk_size.

    Args:
      hidden: [B, T, D] final (post-norm) hidden states, any float dtype.
      unembedding: [D, V] output projection (for tied embeddings, the embedding table transposed).
      targets: [B, T] int token ids, aligned with `hidden` as in `token_logprobs`.
      chunk_size: positions per chunk (static); memory is about B * chunk_size * V floats.
      temperature: static float > 0.
      with_entropy: also return the per-position entropy.
    Returns:
      (logprobs [B, T] float32, entropy [B, T] float32 or None).
    """
    b, t, d = hidden.shape
    if unembedding.ndim != 2 or unembedding.shape[0] != d:
        raise ValueError(f"unembedding must be [D={d}, V], got shape {unembedding.shape}.")
    if targets.shape != (b, t):
        raise ValueError(f"targets must be [B, T] = {(b, t)}, got shape {targets.shape}.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    chunk = min(chunk_size, t)
    n_chunks = -(-t // chunk)
    pad = n_chunks * chunk - t
    # [B, T, ...] -> [n_chunks, B, chunk, ...]; padded positions are computed and then dropped.
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    hidden = hidden.reshape(b, n_chunks, chunk, d).swapaxes(0, 1)
    targets = targets.reshape(b, n_chunks, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one_chunk(args):
        h, tgt = args
        logits = jnp.einsum("bcd,dv->bcv", h, unembedding, preferred_element_type=jnp.float32)
        logits = logits / temperature
        lse = jax.nn.logsumexp(logits, axis=-1)
        logp = _target_logit(logits, tgt) - lse
        if not with_entropy:
            return logp, None
        return logp, _entropy(logits, lse)

    logp, ent = jax.lax.map(one_chunk, (hidden, targets))  # [n_chunks, B, chunk]
    unchunk = lambda x: x.swapaxes(0, 1).reshape(b, n_chunks * chunk)[:, :t]
    return unchunk(logp), (unchunk(ent) if with_entropy else None)


def _target_logit(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """logits[..., targets] as a masked sum over V (see module docstring for why not a gather)."""
    targets = jnp.asarray(targets)
    hit = targets[..., None] == jnp.arange(logits.shape[-1], dtype=targets.dtype)
    return jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)


def _entropy(logits: jax.Array, lse: jax.Array) -> jax.Array:
    """-sum p log p written as sum p * (lse - logit): every term is >= 0, so nothing cancels."""
    neg_logp = lse[..., None] - logits
    return jnp.sum(jnp.exp(-neg_logp) * neg_logp, axis=-1)
