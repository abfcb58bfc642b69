"""GRPO: group advantages, the clipped policy loss, token log-probs, and the jitted GRPO step.

The first half is pure functions of arrays (no model inside), unit-tested against a float64 numpy
reference and called from inside the jitted update step. The second half is the step, in three
calls a stage loop makes per GRPO step (see the "GRPO step" section below):

    policy = grpo.policy_for_sampling(train_state)          # reshard weights for decoding
    rollouts, data_metrics = grpo.rollout(policy, ref_model, prompt_ids, prompt_mask, key,
                                          reward_fn, cfg)   # sample, score, advantages
    step_metrics = grpo.update(train_state, rollouts, cfg)  # μ optimizer steps

Option names and meanings follow TRL's `GRPOConfig` / `GRPOTrainer` so that configs and logged
numbers carry over.

Notable choices:
- Advantages are `(r - group mean) / (Bessel std + 1e-4)` as in TRL. Rewards are shifted by the
  group's first reward before averaging: mathematically a no-op, but it makes a group of equal
  rewards give advantages of exactly 0 (rounding in the mean would otherwise leave tiny ones).
- The loss is the *negated* objective: `-min(ratio * A, clip(ratio) * A) + beta * KL3`, so an
  optimiser minimises it. KL3 is the unbiased, non-negative estimator `exp(ref - logp) -
  (ref - logp) - 1` of KL(policy || reference).
- Aggregation (`loss_type`): `grpo` averages tokens within each sequence, then sequences (the
  DeepSeekMath paper); `bnpo` averages all completion tokens of the (micro-)batch it is given, as
  TRL's per-device batch (so the micro-batch count is part of its objective); `dr_grpo` divides the
  token sum by `B * max_completion_length` (Dr. GRPO, no length bias); `dapo` divides the token sum
  by the completion-token count of the optimizer step's batch (the whole generation batch, or
  one mini-batch of it), passed as `num_items_in_batch` so that micro-batch losses *sum* to that
  batch's loss under gradient accumulation. For the other
  three types the step averages micro-batch losses (TRL divides by the accumulation steps).
- Positions where `mask == 0` are replaced by zeros before any arithmetic, so padding can hold
  anything (even -inf) without a NaN reaching the loss or the gradient; prompt and pad positions
  get exactly zero gradient.
- Log-probs use a one-hot reduction instead of a gather: it partitions cleanly when the vocabulary
  axis is sharded over the `tensor` mesh axis, and XLA fuses it without materialising the one-hot.
  The chunked variant never holds more than one `[B, chunk, V]` block of logits, forward or
  backward (`jax.checkpoint` inside `jax.lax.map`).
- Old-policy log-probs: with `num_iterations == 1` and one mini-batch none are stored
  (`old_logprobs=None`: the ratio is exactly 1 and its gradient is the policy gradient, as TRL
  does); with μ > 1 or several mini-batches (`GRPOConfig.off_policy`) the rollout recomputes
  them with the training forward before any update, at the sampling temperature, as TRL does.
  (The sampler's own log-probs are of the raw, temperature-1 distribution, so they are not used
  for the ratio.)
- Prompts run once (`shared_prompt_forward`, on by default): the G completions of a prompt share
  its forward pass (KV cache and last hidden state) instead of each repeating it, in the
  reference / old-policy forwards and in the update, where their gradients w.r.t. that shared
  forward are summed over micro-batches and pulled back through it once. The loss and
  gradient are those of G separate forwards (tested against a plain whole-batch gradient);
  (G - 1) / G of the prompt tokens' work is skipped: with the R1-Zero template and G = 8,
  half of all the tokens of the toy RL stage.
- Rewards are scored on the host through `jax.pure_callback` from inside the jitted rollout; the
  device waits for the host while it scores (rule rewards are string logic, see DESIGN.md).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from r1jax import sampling, sharding, train
from r1jax.data.tokenizer import StopStrings
from r1jax.models import transformer

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


def _centre(x: jax.Array, axis: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Deviations from the mean and the sample std (n - 1), over all of `x` or its last axis,
    leaving out NaN entries (unscored samples).

    Returns (`x - mean`, 0 where `x` is NaN; std with `axis` reduced, 0 where fewer than two
    entries are scored: one sample has no spread, where TRL's torch.std would give NaN).
    """
    if axis not in (None, -1):
        raise ValueError(f"_centre reduces everything or the last axis, got axis={axis}.")
    flat = x.reshape(1, -1) if axis is None else x
    valid = ~jnp.isnan(flat)
    n = jnp.sum(valid, axis=-1, keepdims=True).astype(x.dtype)
    # Shift by the first scored element: equal values then give a std of exactly 0, not noise.
    first = jnp.take_along_axis(flat, jnp.argmax(valid, axis=-1, keepdims=True), axis=-1)
    shifted = jnp.where(valid, flat - first, 0.0)
    dev = jnp.where(valid, shifted - jnp.sum(shifted, -1, keepdims=True) / jnp.maximum(n, 1), 0.0)
    var = jnp.sum(dev * dev, axis=-1, keepdims=True) / jnp.maximum(n - 1, 1)
    std = jnp.where(n > 1, jnp.sqrt(var), 0.0)[..., 0]
    return dev.reshape(x.shape), (std[0] if axis is None else std)


# --------------------------------------------------------------------------------------------------
# Advantages and reward metrics
# --------------------------------------------------------------------------------------------------


def group_advantages(rewards: jax.Array, group_size: int, scale: str = "group") -> jax.Array:
    """Group-relative advantages, as TRL's `GRPOTrainer` computes them.

    `rewards` is prompt-major: the G samples of prompt 0 come first, then those of prompt 1, ...
    Each reward minus its group's mean is divided by `std + 1e-4`, where std (Bessel-corrected) is
    the group's (`scale="group"`, TRL's default and the paper), the whole batch's (`"batch"`,
    TRL's `scale_rewards="batch"`), or not divided at all (`"none"`, Dr. GRPO). A group whose
    rewards are all equal gets advantages of exactly 0. A NaN reward marks a sample that could not
    be scored (its reward worker died twice): it gets advantage 0 and is left out of its group's
    mean and std, so the others are ranked among themselves rather than against a made-up 0.

    Args:
      rewards: [P * G] float rewards, NaN where unscored.
      group_size: G, samples per prompt (TRL's `num_generations`); a static Python int.
      scale: "group" | "batch" | "none".
    Returns:
      [P * G] float32 advantages.
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}.")
    rewards = jnp.asarray(rewards, jnp.float32)
    grouped = _grouped(rewards, group_size, "rewards")  # [P, G]
    centred, group_std = _centre(grouped, axis=-1)
    centred = centred.reshape(-1)  # 0 for unscored samples
    if scale == "none":
        return centred
    std = jnp.repeat(group_std, group_size) if scale == "group" else _centre(rewards)[1]
    return centred / (std + _STD_EPS)


def informative_groups(rewards: np.ndarray, group_size: int) -> np.ndarray:
    """[P * G] rewards (NaN = unscored) -> [P] bool: the groups whose scored rewards differ.

    A group whose rewards are all equal (every answer right, or every one wrong) has advantages
    of exactly 0 and moves the policy only through the KL term: DAPO's dynamic sampling
    (arXiv 2503.14476, section 3.2) samples more prompts in its place (`select_groups`).
    """
    grouped = np.asarray(rewards, np.float64).reshape(-1, group_size)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (an all-NaN group: not informative)
        spread = np.nanmax(grouped, axis=-1) - np.nanmin(grouped, axis=-1)
    return np.nan_to_num(spread) > 0


@functools.partial(jax.jit, static_argnames=("shardings", "pad_token_id"))
def _take_rows(draws: tuple, rows: jax.Array, shardings: tuple, pad_token_id: int):
    """`rows` of the concatenated `draws`, each leaf laid out as `shardings`. The draws' prompts
    (left-padded to their own bucket) are padded on the left to the widest first."""
    width = max(d.prompt_ids.shape[1] for d in draws)

    def widen(x, value):
        return jnp.pad(x, ((0, 0), (width - x.shape[1], 0)), constant_values=value)

    draws = [
        d.replace(prompt_ids=widen(d.prompt_ids, pad_token_id), prompt_mask=widen(d.prompt_mask, 0))
        for d in draws
    ]
    taken = jax.tree.leaves(jax.tree.map(lambda *xs: jnp.concatenate(xs)[rows], *draws))
    laid_out = map(jax.lax.with_sharding_constraint, taken, shardings)
    return jax.tree.unflatten(jax.tree.structure(draws[0]), list(laid_out))


def select_groups(
    draws: Sequence[Rollouts], picks: Sequence[tuple[int, int]], cfg: GRPOConfig
) -> Rollouts:
    """One batch of the groups `picks` ((draw, group) pairs, in order) of several `Rollouts`.

    The rows come out sharded as `draws[0]`'s, the prompts left-padded to the widest prompt
    bucket among the draws picked from; with `scale_rewards="batch"` the advantages are
    computed again over the new batch (a group's own scale does not depend on the others). One
    compiled gather per number of draws and prompt widths.
    """
    G = cfg.num_generations
    B = draws[0].rewards.shape[0]
    if len(picks) * G != B:
        raise ValueError(f"need {B // G} groups to fill a batch of {B} rows, got {len(picks)}")
    used = sorted({d for d, _ in picks})  # (a draw none is picked from is not gathered)
    draws = [draws[d] for d in used]
    rows = np.array([used.index(d) * B + g * G + j for d, g in picks for j in range(G)], np.int32)
    # (each leaf as draws[0]'s: with the prompts of another bucket, the same spec)
    shardings = tuple(x.sharding for x in jax.tree.leaves(draws[0]))
    out = _take_rows(tuple(draws), rows, shardings, cfg.pad_token_id)
    if cfg.scale_rewards == "batch":
        advantages = group_advantages(out.rewards, G, "batch")
        out = out.replace(advantages=jax.device_put(advantages, out.advantages.sharding))
    return out


def reward_metrics(
    rewards: jax.Array,
    per_reward: jax.Array,
    names: Sequence[str],
    group_size: int,
    scale: str = "group",
) -> dict[str, jax.Array]:
    """Reward statistics for logging, named as TRL logs them.

    Args:
      rewards: [B] total (weighted) reward per sample, prompt-major groups of `group_size`; NaN
        where unscored (left out of every statistic, counted in `frac_reward_unscored`).
      per_reward: [R, B] each reward function's raw score; NaN marks "not applicable" (TRL).
      names: R reward function names.
      group_size: G.
      scale: the advantages' `scale` (`group_advantages`): with "batch", the std is the batch's.
    Returns:
      float32 scalars: `reward` (mean), `reward_std` (the Bessel std the advantages are divided
      by: the mean over groups of the group std, or with `scale="batch"` the batch std, as TRL
      logs it), `frac_reward_zero_std` (share of groups, or of the batch, whose rewards are all
      equal: they carry no learning signal), and per function `rewards/<name>/mean`,
      `rewards/<name>/std` (NaN-aware; NaN when the function applied to no sample, or the std to
      fewer than two).
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
    if scale == "batch":
        std = _centre(rewards)[1][None]  # [1]
    else:
        std = _centre(_grouped(rewards, group_size, "rewards"), axis=-1)[1]  # [P]
    scored = ~jnp.isnan(rewards)
    metrics = {
        "reward": jnp.sum(jnp.where(scored, rewards, 0.0)) / jnp.maximum(jnp.sum(scored), 1),
        "frac_reward_unscored": 1.0 - jnp.mean(scored.astype(jnp.float32)),
        "reward_std": jnp.mean(std),
        "frac_reward_zero_std": jnp.mean(jnp.isclose(std, 0.0).astype(jnp.float32)),
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
    if not isinstance(group_size, numbers.Integral) or group_size < 1:
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
      num_items_in_batch: "dapo" only: completion-token count of the optimizer step's batch (the
        generation batch or one mini-batch of it: all its micro-batches, all devices). None uses
        `mask.sum()`, i.e. this call is the whole batch. May be a traced scalar; clamped to >= 1.
      entropy: optional [B, T] per-token policy entropy, only logged.
    Returns:
      (loss, metrics): loss is a float32 scalar to minimise. metrics holds float32 scalars:
      `kl` (masked token mean of K3, only when `ref_logprobs` is given), `clip_ratio/low_mean`,
      `clip_ratio/high_mean`, `clip_ratio/region_mean` (share of tokens whose ratio sits outside
      the clip range on the side where clipping removes the gradient: below with A < 0, above with
      A > 0), `entropy` (when given), `completions/mean_length`, `/min_length`, `/max_length`.
    """
    logprobs, advantages, mask = (jnp.asarray(x) for x in (logprobs, advantages, mask))
    old_logprobs, ref_logprobs, entropy = (
        None if x is None else jnp.asarray(x) for x in (old_logprobs, ref_logprobs, entropy)
    )
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
    # min(ratio * A, clip(ratio) * A), with the branch chosen explicitly: where it is flat (the
    # ratio past the bound on the side A pushes it) no gradient, else ratio * A's whole gradient.
    # (jnp.minimum splits a tie's gradient in half, and with a bound of 0 the ratio 1 of every
    # first iteration is a tie: the policy gradient came out 25-37% too small.)
    is_low = (ratio < 1.0 - epsilon_low) & (adv < 0)
    is_high = (ratio > 1.0 + epsilon_high) & (adv > 0)
    clipped_ratio = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    per_token = -jnp.where(is_low | is_high, jax.lax.stop_gradient(clipped_ratio), ratio) * adv

    metrics = {}
    if ref_logprobs is not None:
        ref = jnp.where(valid, ref_logprobs.astype(jnp.float32), 0.0)
        kl = jnp.exp(ref - logp) - (ref - logp) - 1.0
        if beta != 0.0:
            per_token = per_token + beta * kl
        metrics["kl"] = masked_mean(kl, mask)

    loss = _aggregate(per_token * mask, mask, loss_type, max_completion_length, num_items_in_batch)

    metrics["clip_ratio/low_mean"] = masked_mean(is_low, mask)
    metrics["clip_ratio/high_mean"] = masked_mean(is_high, mask)
    metrics["clip_ratio/region_mean"] = masked_mean(is_low | is_high, mask)
    if entropy is not None:
        metrics["entropy"] = masked_mean(entropy, mask)
    lengths = jnp.sum(mask, axis=-1)
    metrics["completions/mean_length"] = jnp.sum(lengths) / max(lengths.shape[0], 1)
    metrics["completions/min_length"] = jnp.min(lengths) if lengths.size else jnp.float32(0.0)
    metrics["completions/max_length"] = jnp.max(lengths, initial=0.0)
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
        return jnp.sum(per_seq) / max(per_seq.shape[0], 1)  # (0 for an empty batch, not NaN)
    if loss_type == "bnpo":
        return jnp.sum(masked_loss) / jnp.maximum(jnp.sum(mask), 1.0)
    if loss_type == "dr_grpo":
        return jnp.sum(masked_loss) / (max(masked_loss.shape[0], 1) * max_completion_length)
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
    traced = [
        name
        for name, v in (
            ("epsilon_low", epsilon_low),
            ("epsilon_high", epsilon_high),
            ("beta", beta),
        )
        if isinstance(v, jax.core.Tracer)
    ]
    if traced:
        raise ValueError(
            f"{', '.join(traced)} must be Python numbers (static): under jax.jit pass them with "
            "static_argnames, or bind them with functools.partial"
        )
    if not epsilon_low >= 0.0:  # (>= 1: no lower clip, since a ratio is > 0)
        raise ValueError(
            f"epsilon_low must be >= 0 (not NaN; 1 or more: no lower clip), got {epsilon_low}."
        )
    if not epsilon_high >= 0.0:  # (inf: no upper clip)
        raise ValueError(f"epsilon_high must be >= 0 (not NaN), got {epsilon_high}.")
    if not 0.0 <= beta < float("inf"):
        raise ValueError(f"beta must be a finite number >= 0, got {beta}.")
    if not has_ref and beta != 0.0:
        raise ValueError(
            f"beta={beta} needs ref_logprobs (the KL is taken against the reference policy); "
            "pass them, or set beta=0.0 to train without the KL term."
        )
    if loss_type == "dr_grpo" and (
        not isinstance(max_completion_length, numbers.Integral) or max_completion_length < 1
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

    def one_chunk(h, tgt):
        logits = jnp.einsum("bcd,dv->bcv", h, unembedding, preferred_element_type=jnp.float32)
        logits = logits / temperature
        lse = jax.nn.logsumexp(logits, axis=-1)
        logp = _target_logit(logits, tgt) - lse
        return logp, (_entropy(logits, lse) if with_entropy else None)

    return over_position_chunks(one_chunk, chunk_size, hidden, targets)


def over_position_chunks(fn, chunk_size: int, *arrays: jax.Array):
    """`fn(*arrays)` computed `chunk_size` positions at a time, for per-position outputs of
    [B, T, V]-sized intermediates (logits) that must never exist whole: `fn` maps [B, c, ...]
    chunks to (a tuple of) [B, c] arrays (or None), `jax.checkpoint` makes the backward pass
    recompute each chunk's intermediates instead of storing them, and the outputs come back as
    [B, T]. T need not divide by chunk_size (the last chunk is padded, its padding dropped).

    arrays: [B, T, ...] each. chunk_size: static, >= 1; memory is about B * chunk_size * V floats.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    b, t = arrays[0].shape[:2]
    chunk = min(chunk_size, t)
    n_chunks = -(-t // chunk)
    pad = n_chunks * chunk - t

    def chunked(x):  # [B, T, ...] -> [n_chunks, B, chunk, ...]; padded positions dropped later
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        return x.reshape(b, n_chunks, chunk, *x.shape[2:]).swapaxes(0, 1)

    out = jax.lax.map(jax.checkpoint(lambda xs: fn(*xs)), tuple(chunked(x) for x in arrays))
    unchunk = lambda x: x.swapaxes(0, 1).reshape(b, n_chunks * chunk)[:, :t]
    return jax.tree.map(unchunk, out)


def _target_logit(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """logits[..., targets] as a masked sum over V (see module docstring for why not a gather)."""
    targets = jnp.asarray(targets)
    hit = targets[..., None] == jnp.arange(logits.shape[-1], dtype=targets.dtype)
    return jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)


def _entropy(logits: jax.Array, lse: jax.Array) -> jax.Array:
    """-sum p log p written as sum p * (lse - logit): every term is >= 0, so nothing cancels."""
    neg_logp = lse[..., None] - logits
    return jnp.sum(jnp.exp(-neg_logp) * neg_logp, axis=-1)


# --------------------------------------------------------------------------------------------------
# The GRPO step: configuration, rollout-and-score, update
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """GRPO hyperparameters, named as TRL's `GRPOConfig`. Frozen and hashable (a static argument).

    num_generations:   G, completions sampled per prompt ("G" in DeepSeekMath's Algorithm 1).
    num_iterations:    μ, passes over each rollout batch ("μ" in Algorithm 1).
    num_mini_batches:  optimizer steps per pass: the batch's prompts are dealt into this many
                       mini-batches of whole groups (prompts j, j + M, ...), each its own step on
                       the policy the previous one left (R1: 16 per rollout; TRL's
                       `steps_per_generation`); μ x M steps per rollout batch. P must divide by
                       it, and > 1 needs the old log-probs, as μ > 1 does.
    beta:              KL weight; 0 means the reference model is neither needed nor run.
    epsilon_low:       clip below at 1 - epsilon_low (TRL's `epsilon`); >= 1: no lower clip.
    epsilon_high:      clip above at 1 + epsilon_high (> epsilon_low is DAPO's clip-higher).
    loss_type:         "grpo" | "bnpo" | "dr_grpo" | "dapo" (module docstring).
    scale_rewards:     "group" | "batch" | "none": the std the advantages are divided by (TRL's
                       older True / False mean "group" / "none").
    max_completion_length: Tc, the sampling budget per completion, in tokens.
    temperature, top_k, top_p: sampling settings; the loss's log-probs use the same temperature.
    num_tokens:        the tokenizer's length: ids past it (an embedding padded beyond the
                       tokenizer) are never sampled; 0 = every id (`sampling.SamplingConfig`).
    num_micro_batches: gradient-accumulation steps per optimizer step (TRL's
                       `gradient_accumulation_steps`); P * G must divide by it. The rollout's
                       reference and old-policy forwards take the same micro-batches. On a CPU,
                       micro-batches of a few rows are faster (they stay in cache); on an
                       accelerator use the fewest that fit in memory. `bnpo` then averages
                       tokens per micro-batch (as TRL does with gradient accumulation).
    stop_token_ids:    token ids that end a completion (the tokenizer's EOS, ...); stop strings
                       ("</answer>") are an argument of `rollout`, not part of this static config.
    pad_token_id:      fills completions after their end.
    logprob_chunk_size: positions per chunk when turning hidden states into log-probs.
    shared_prompt_forward: run each prompt through the model once per rollout batch, not once
                       per completion: its KV cache and last hidden state are shared by the G
                       completions (in the update, their gradients are summed back into it).
                       Same loss and gradient as G separate forwards, up to float rounding
                       (and MoE capacity drops, which depend on which tokens share a forward);
                       the training and scoring forwards skip (G - 1) / G of the prompt tokens'
                       layer work (attending to the prompt stays per completion). A MoE
                       model's router counts (metrics, V3 bias update) then count each prompt
                       token once, as routed, not G times.
                       Needs rows prompt-major in groups of G, as `rollout` makes them; an
                       update on rows whose group does not share one prompt is skipped (NaN
                       gradient) with metric `shared_prompt_mismatch` = 1. The
                       prompts' forward is one pass over all P prompts (not micro-batched), and
                       the update keeps its activations until the last micro-batch is done:
                       turn it off if P long prompts do not fit beside a micro-batch.
    decode_first_window: completion slots of the sampler's KV cache in its first decode phase;
                       the cache doubles as it fills, so a step attends over fewer than 3x the
                       tokens written once past the first window (`sampling.decode_windows`).
                       0 = the whole budget from the first step: one compiled loop body
                       instead of ~log2(budget / window), and no moment where two caches are
                       alive (the peak is up to 5/3 of one cache while a phase's is copied).
    """

    num_generations: int = 8
    num_iterations: int = 1
    num_mini_batches: int = 1
    beta: float = 0.04
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    loss_type: str = "grpo"
    scale_rewards: str = "group"
    max_completion_length: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_tokens: int = 0
    num_micro_batches: int = 1
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    logprob_chunk_size: int = 256
    shared_prompt_forward: bool = True
    decode_first_window: int = sampling.DEFAULT_FIRST_WINDOW

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.num_generations < 2:
            raise ValueError(
                f"grpo.num_generations must be >= 2 (advantages compare samples "
                f"of one prompt), got {self.num_generations}"
            )
        for name in (
            "num_iterations",
            "num_mini_batches",
            "num_micro_batches",
            "max_completion_length",
            "logprob_chunk_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"grpo.{name} must be >= 1, got {getattr(self, name)}")
        if self.decode_first_window < 0:
            raise ValueError(
                f"grpo.decode_first_window must be >= 0 (0 = one decode phase), "
                f"got {self.decode_first_window}"
            )
        if not 0 < self.temperature < float("inf"):
            raise ValueError(
                f"grpo.temperature must be > 0 (GRPO needs diverse samples), got {self.temperature}"
            )
        if isinstance(self.scale_rewards, bool):  # TRL's older spelling: True / False
            object.__setattr__(self, "scale_rewards", "group" if self.scale_rewards else "none")
        if self.scale_rewards not in ADVANTAGE_SCALES:
            raise ValueError(
                f"grpo.scale_rewards must be one of {ADVANTAGE_SCALES}, got {self.scale_rewards!r}"
            )
        _check_options(
            self.loss_type,
            self.epsilon_low,
            self.epsilon_high,
            self.beta,
            self.max_completion_length,
            None,
            has_ref=True,
        )
        self.sampling_config()  # validates top_k and top_p

    @property
    def off_policy(self) -> bool:
        """Whether a step can see a policy other than the one that sampled (μ > 1 or mini-batches
        > 1): the ratio then needs the sampling policy's log-probs."""
        return self.num_iterations > 1 or self.num_mini_batches > 1

    def sampling_config(self) -> sampling.SamplingConfig:
        return sampling.SamplingConfig(self.temperature, self.top_k, self.top_p, self.num_tokens)


@flax.struct.dataclass
class Rollouts:
    """One GRPO batch: B = P * G completions, prompt-major (rows p*G .. p*G+G-1 answer prompt p).

    prompt_ids:      [B, Tp] int32, each row's left-padded prompt (every prompt repeated G times)
    prompt_mask:     [B, Tp] int32, 1 = token, 0 = pad
    completion_ids:  [B, Tc] int32, right-padded with `pad_token_id` (Tc = max_completion_length)
    completion_mask: [B, Tc] int32, 1 on completion tokens (the stop token included)
    advantages:      [B] float32, `group_advantages` of `rewards`
    rewards:         [B] float32, the weighted total reward
    per_reward:      [B, R] float32, each reward function's raw value (NaN = not applicable)
    truncated:       [B] bool, hit max_completion_length without a stop token
    old_logprobs:    [B, Tc] float32 under the policy that sampled, or None when every step is
                     on-policy (μ = 1, one mini-batch: the ratio is then 1 by definition)
    ref_logprobs:    [B, Tc] float32 under the reference model, or None when beta == 0
    """

    prompt_ids: jax.Array
    prompt_mask: jax.Array
    completion_ids: jax.Array
    completion_mask: jax.Array
    advantages: jax.Array
    rewards: jax.Array
    per_reward: jax.Array
    truncated: jax.Array
    old_logprobs: jax.Array | None = None
    ref_logprobs: jax.Array | None = None


class SamplingPolicy(NamedTuple):
    """The policy's weights laid out for decoding (see `policy_for_sampling`)."""

    graphdef: nnx.GraphDef
    state: nnx.State
    mesh: Mesh


def sampling_copy_plan(state: nnx.State, mesh: Mesh, dtype) -> list[tuple[list[int], Callable]]:
    """The programs `policy_for_sampling` runs: (leaf indices of `state`, jitted copy of those
    leaves into their sampling layout and `dtype`), one per layer (layers of one kind share a
    program, so it compiles once) and one per other top-level weight."""
    shardings = jax.tree.leaves(sharding.state_shardings(state, mesh, sharding.SAMPLING_RULES))
    variables = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    # What the forward reads in float32 (norm scales, the router) stays as stored, so that the
    # copy computes exactly what the training forward does (the μ > 1 ratio starts at 1).
    casts = [not transformer.is_float32_in_forward(v) for v in variables]
    groups: dict[tuple, list[int]] = {}  # ("layers", i) or (top-level name,) -> leaf indices
    for i, (path, _) in enumerate(jax.tree_util.tree_flatten_with_path(state)[0]):
        keys = [getattr(k, "key", getattr(k, "idx", k)) for k in path]
        groups.setdefault(tuple(keys[:2]) if keys[0] == "layers" else (keys[0],), []).append(i)
    programs: dict[tuple, Callable] = {}

    def program(leaves: list[int]) -> Callable:
        flags = tuple(casts[i] for i in leaves)
        out = tuple(shardings[i] for i in leaves)
        if (flags, out) not in programs:

            def cast(xs):
                return [
                    x.astype(dtype) if c and jnp.issubdtype(x.dtype, jnp.floating) else x
                    for x, c in zip(xs, flags, strict=True)
                ]

            programs[flags, out] = jax.jit(cast, out_shardings=list(out))
        return programs[flags, out]

    return [(leaves, program(leaves)) for leaves in groups.values()]


def sync_reference(ref: nnx.Module, train_state: train.TrainState, alpha: float = 1.0) -> None:
    """Move the reference model to the policy, in place: every variable becomes
    `alpha * policy + (1 - alpha) * reference` (alpha = 1: a copy, DeepSeekMath's iterative GRPO
    resetting its reference; below 1, TRL's soft update), in the reference's own dtypes and
    shardings. The reference must have the policy's structure (the same architecture)."""
    ref_def, ref_state = nnx.split(ref)
    policy = train_state.model_state()
    if jax.tree.structure(ref_state) != jax.tree.structure(policy):
        raise ValueError(
            "the reference model's variables are not the policy's: syncing the reference to the "
            "policy needs one architecture (start the reference from the policy's checkpoint)"
        )
    key = ("sync_reference", ref_def, float(alpha))

    def mixed(ref_leaf, policy_leaf):
        if alpha == 1.0 or not jnp.issubdtype(ref_leaf.dtype, jnp.floating):
            return policy_leaf.astype(ref_leaf.dtype)
        both = alpha * policy_leaf.astype(jnp.float32) + (1 - alpha) * ref_leaf.astype(jnp.float32)
        return both.astype(ref_leaf.dtype)

    shardings = jax.tree.map(lambda x: x.sharding, ref_state)
    program = train_state.program(
        key,
        lambda: jax.jit(
            lambda r, p: jax.tree.map(mixed, r, p), out_shardings=shardings, donate_argnums=0
        ),
    )
    nnx.update(ref, program(ref_state, policy))


def policy_for_sampling(train_state: train.TrainState) -> SamplingPolicy:
    """A copy of the policy's weights resharded for sampling; call once per GRPO step.

    The training layout splits every weight over `fsdp`, which would all-gather every weight at
    every decode step; `sharding.SAMPLING_RULES` keeps weights whole along `embed` (still split
    over `tensor`). The copy is cast to the model's compute dtype (bfloat16 under mixed
    precision: half the memory), except what the forward reads in float32 (norm scales, the MoE
    router): it holds exactly the values the training forward computes with.
    It is a fresh copy even when the layouts coincide, so the next `update` (which donates the
    training buffers) cannot invalidate it; it is stale after that update.

    The copy is made a layer at a time (one program per layer, compiled once for all layers of a
    kind, and one per other top-level weight): in one program XLA:TPU gathered every weight
    before laying any out, so the copy's peak was twice its size (bench/NOTES.md, session 17).
    """
    graphdef, state = train_state.model_graphdef, train_state.model_state()
    dtype = jnp.dtype(train_state.model.cfg.dtype)

    def build():
        plan = sampling_copy_plan(state, train_state.mesh, dtype)

        def copy(s):
            leaves, treedef = jax.tree.flatten(s)
            out = list(leaves)
            for group, run in plan:
                for i, x in zip(group, run([leaves[i] for i in group]), strict=True):
                    out[i] = x
            return jax.tree.unflatten(treedef, out)

        return copy

    program = train_state.program(("policy_for_sampling", dtype), build)
    with train_state.mesh_context():
        return SamplingPolicy(graphdef, program(state), train_state.mesh)


def completion_logprobs(
    model: nnx.Module,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    completion_ids: jax.Array,
    completion_mask: jax.Array,
    *,
    temperature: float = 1.0,
    chunk_size: int = 256,
    with_entropy: bool = False,
) -> tuple[jax.Array, jax.Array | None, Any]:
    """Log-probs of completion tokens given their prompts: the training forward, inside jit.

    Args:
      model: a `Decoder` or `DeepseekDecoder` (see `train.hidden_states`).
      prompt_ids, prompt_mask: [B, Tp] int32, left-padded.
      completion_ids, completion_mask: [B, Tc] int32, right-padded.
      temperature: static; logits are divided by it (TRL scores at the sampling temperature).
      chunk_size: positions per logits chunk (see `chunked_token_logprobs`).
      with_entropy: also return per-token entropies.
    Returns:
      (logprobs [B, Tc] float32, entropy [B, Tc] float32 or None, the forward's
      `deepseek.RouterStats` for a mixture-of-experts model or None); values where
      `completion_mask == 0` are meaningless (mask them).
    """
    tp = prompt_ids.shape[1]
    ids = jnp.concatenate([prompt_ids, completion_ids], axis=1)
    mask = jnp.concatenate([prompt_mask, completion_mask], axis=1)
    hidden, router = train.hidden_states(model, ids, mask)  # [B, Tp + Tc, D]
    # The hidden state at position t predicts token t + 1: completion token i is read at tp - 1 + i.
    logp, entropy = chunked_token_logprobs(
        hidden[:, tp - 1 : -1],
        model.unembedding(),
        completion_ids,
        chunk_size=chunk_size,
        temperature=temperature,
        with_entropy=with_entropy,
    )
    return logp, entropy, router


class PromptForward(NamedTuple):
    """Each prompt's forward pass, run once and shared by the completions that continue it.

    cache:       the prompts' KV cache over P rows (`model.init_cache` layout), the prefix
                 segment every completion of prompt p attends to
    last_hidden: [P, D] final hidden state at each prompt's last position (left padding: the
                 last slot is always a real token); it predicts the first completion token
    router:      the forward's routing counts (`deepseek.RouterStats`), or None (dense models)
    """

    cache: Any
    last_hidden: jax.Array
    router: Any = None


def prompt_forward(model: nnx.Module, prompt_ids: jax.Array, prompt_mask: jax.Array):
    """`PromptForward` of [P, Tp] left-padded prompts, inside jit."""
    cache = model.init_cache(*prompt_ids.shape)
    hidden, cache, router = train.cached_hidden_states(model, prompt_ids, prompt_mask, cache)
    return PromptForward(cache, hidden[:, -1], router)


def logprobs_after_prompts(
    model: nnx.Module,
    prompts: PromptForward,
    prompt_index: jax.Array | None,
    completion_ids: jax.Array,
    completion_mask: jax.Array,
    *,
    temperature: float = 1.0,
    chunk_size: int = 256,
    with_entropy: bool = False,
) -> tuple[jax.Array, jax.Array | None, Any]:
    """`completion_logprobs` with each prompt's forward already done once (`prompt_forward`).

    The completions [R, Tc] attend to their prompt's cached keys and values as a prefix segment,
    and their first token is read from the prompt's last hidden state. prompt_index [R] int32
    names each completion's prompt row (its cache rows are then copied out per completion); None
    means the rows are already in the cache's layout, R / P consecutive rows per prompt in
    prompt order, and the cache is attended in place. Returns what `completion_logprobs`
    returns; the router counts are the completions' only.
    """
    if prompt_index is None:
        prefix = prompts.cache
        first = jnp.repeat(
            prompts.last_hidden, completion_ids.shape[0] // len(prompts.last_hidden), 0
        )
    else:
        take = lambda x: jnp.take(x, prompt_index, axis=0) if x.ndim else x  # noqa: E731
        prefix = jax.tree.map(take, prompts.cache)  # [R, ...]: one prefix row per completion
        first = take(prompts.last_hidden)
    cache = model.init_cache(*completion_ids.shape).with_prefix(prefix)
    hidden, _, router = train.cached_hidden_states(model, completion_ids, completion_mask, cache)
    # Completion token 0 is predicted at the prompt's last position, token i at completion i - 1.
    logp, entropy = chunked_token_logprobs(
        jnp.concatenate([first[:, None].astype(hidden.dtype), hidden[:, :-1]], axis=1),
        model.unembedding(),
        completion_ids,
        chunk_size=chunk_size,
        temperature=temperature,
        with_entropy=with_entropy,
    )
    return logp, entropy, router


def _floats_and_rest(tree: Any) -> tuple[Any, Any]:
    """Split a pytree into its floating-point leaves and the rest (None where the other is)."""
    is_float = lambda x: jnp.issubdtype(jnp.result_type(x), jnp.floating)  # noqa: E731
    floats = jax.tree.map(lambda x: x if is_float(x) else None, tree)
    rest = jax.tree.map(lambda x: None if is_float(x) else x, tree)
    return floats, rest


def _join(floats: Any, rest: Any) -> Any:
    """Inverse of `_floats_and_rest`."""
    return jax.tree.map(
        lambda f, r: r if f is None else f, floats, rest, is_leaf=lambda x: x is None
    )


def _prompts_once(
    prompt_ids: jax.Array, prompt_mask: jax.Array, cfg: GRPOConfig, pieces: int
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """[B, Tp] prompts repeated in runs of G -> ([P, Tp] ids and mask, [B] each row's prompt
    or None), for the B rows split into `pieces` micro-batches.

    The row -> prompt map is needed only when micro-batches mix rows of different prompts out of
    order: with k pieces dividing G, piece j (rows j::k) holds every prompt in order with G / k
    consecutive rows each, which is the prefix cache's own layout (None: no copy).
    """
    b, g = prompt_ids.shape[0], cfg.num_generations
    if b % g:
        raise ValueError(
            f"shared_prompt_forward needs rows in whole groups of num_generations={g}, got {b} rows"
        )
    rows = None if g % pieces == 0 else jnp.arange(b) // g
    # Laid out as the batch explicitly: with as many prompts as the `tensor` axis and fewer than
    # the batch shards (2 prompts on fsdp=4 x tensor=2), Shardy partitioned the strided slice's
    # use in the MLA prefix's backward wrongly (gradients of the embedding, layer 0 and each
    # kv_a_dc off by up to 3%, the loss right; jax 0.10).
    ids, mask = (sharding.constrain(x[::g], ("batch", None)) for x in (prompt_ids, prompt_mask))
    return ids, mask, rows


def scoring_logprobs(
    model: nnx.Module,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    completion_ids: jax.Array,
    completion_mask: jax.Array,
    cfg: GRPOConfig,
) -> jax.Array:
    """`completion_logprobs` [B, Tc] of a frozen model (reference, old policy), inside jit, taken
    micro-batch by micro-batch as the update takes them: the same memory bound, and on a CPU a
    micro-batch's activations stay in cache (bench/NOTES.md, U1). With `shared_prompt_forward`
    the prompts ([B, Tp], repeated in runs of G) run once, then the completions after them."""
    kw = dict(temperature=cfg.temperature, chunk_size=cfg.logprob_chunk_size)
    # (the update's micro-batches split a mini-batch: as many rows here, M times as many pieces)
    pieces = cfg.num_micro_batches * cfg.num_mini_batches
    if cfg.shared_prompt_forward:
        ids, mask, rows = _prompts_once(prompt_ids, prompt_mask, cfg, pieces)
        prompts = prompt_forward(model, ids, mask)
        micro_batches = train.split_micro_batches((rows, completion_ids, completion_mask), pieces)
        one = lambda micro: logprobs_after_prompts(model, prompts, *micro, **kw)[0]  # noqa: E731
    else:
        micro_batches = train.split_micro_batches(
            (prompt_ids, prompt_mask, completion_ids, completion_mask), pieces
        )
        one = lambda micro: completion_logprobs(model, *micro, **kw)[0]  # noqa: E731
    return train.merge_micro_batches(jax.lax.map(one, micro_batches))


def rollout(
    policy: SamplingPolicy,
    ref: nnx.Module | None,
    prompt_ids: jax.Array | np.ndarray,
    prompt_mask: jax.Array | np.ndarray,
    key: jax.Array,
    reward_fn: Callable[..., tuple[jax.Array, jax.Array]],
    cfg: GRPOConfig,
    *,
    row_ids: jax.Array | np.ndarray | None = None,
    stop_strings: StopStrings | None = None,
) -> tuple[Rollouts, dict[str, jax.Array]]:
    """Sample G completions per prompt, score them, and compute everything `update` needs.

    One jitted program (compiled once per prompt shape): sample with the KV-cached sampler,
    score through the host reward callback, group advantages, old-policy log-probs (μ > 1 or
    several mini-batches only)
    and reference log-probs (beta > 0 only).

    Args:
      policy: `policy_for_sampling(train_state)`.
      ref: the frozen reference model in its training layout, or None; never run when beta == 0
        (pass None then and don't load it).
      prompt_ids, prompt_mask: [P, Tp] int32, left-padded prompts (`data.batching`).
      key: PRNG key for sampling.
      reward_fn: traced-side scorer `reward_fn(tokens [B, Tc] int32, lengths [B] int32[,
        row_ids [B] int32]) -> (total [B] float32, per_reward [R, B] float32)` with a `names`
        attribute (R reward names), e.g. `rewards.compose.HostRewardBridge` (its exceptions are
        held until its `raise_error()`, to call once the outputs are fetched).
      cfg: GRPOConfig (static).
      row_ids: [P] int32 dataset row of each prompt, passed (repeated G times) to `reward_fn`
        to look up answer columns; None to call `reward_fn(tokens, lengths)`.
      stop_strings: `data.StopStrings` ("</answer>", ...): a completion ends after the token that
        writes one, however the tokens spell it; None = only `cfg.stop_token_ids` end one.
    Returns:
      (rollouts, metrics): a `Rollouts` over B = P * G rows sharded over the batch axes, and
      replicated float32 scalars named as TRL logs them: `reward`, `reward_std`,
      `frac_reward_zero_std`, `rewards/<name>/mean`, `rewards/<name>/std`,
      `completions/mean_length`, `completions/min_length`, `completions/max_length`,
      `completions/clipped_ratio` (share truncated at max_completion_length).
    """
    if cfg.beta > 0 and ref is None:
        raise ValueError(
            f"grpo.beta={cfg.beta} needs the reference model (pass ref=...), or set "
            "beta=0.0 to train without the KL term and skip loading it"
        )
    if np.ndim(prompt_ids) != 2 or np.shape(prompt_ids) != np.shape(prompt_mask):
        raise ValueError(
            f"prompt_ids and prompt_mask must both be [P, Tp], got "
            f"{np.shape(prompt_ids)} and {np.shape(prompt_mask)}"
        )
    if row_ids is not None and np.shape(row_ids) != np.shape(prompt_ids)[:1]:
        raise ValueError(
            f"row_ids must be [P] = {np.shape(prompt_ids)[:1]}, got {np.shape(row_ids)}"
        )
    # (host masks only: reading a placed one would wait for it)
    if isinstance(prompt_mask, np.ndarray) and prompt_mask.size and not prompt_mask[:, -1].all():
        raise ValueError(
            "prompts must be left-padded (the first token is sampled after the last column): "
            f"rows {np.flatnonzero(prompt_mask[:, -1] == 0)[:8].tolist()} end in padding; pad "
            "on the left (data.batching, or a tokenizer with padding_side='left')"
        )
    ref_graphdef, ref_state = nnx.split(ref) if cfg.beta > 0 else (None, None)
    shape = tuple(np.shape(prompt_ids))
    program = _rollout_program(
        policy.mesh,
        policy.graphdef,
        ref_graphdef,
        reward_fn,
        cfg,
        shape,
        row_ids is not None,
        bool(stop_strings),
    )
    # Host prompts (the same on every process) become global arrays in the program's input
    # shardings: jit refuses numpy for a sharding split over processes.
    rows, by_row = _prompt_shardings(policy.mesh, shape)

    def placed(x, where):  # jax arrays as they come
        return x if isinstance(x, jax.Array) else sharding.from_host(x, where)

    prompt_ids, prompt_mask = (placed(x, rows) for x in (prompt_ids, prompt_mask))
    if row_ids is not None:
        row_ids = placed(row_ids, by_row)
    table = None
    if stop_strings:
        table = placed(stop_strings.table, NamedSharding(policy.mesh, PartitionSpec()))
    with jax.set_mesh(policy.mesh), sharding.use_rules(sharding.SAMPLING_RULES):
        return program(policy.state, ref_state, prompt_ids, prompt_mask, key, row_ids, table)


def _prompt_shardings(mesh: Mesh, shape: tuple[int, int]) -> tuple[NamedSharding, NamedSharding]:
    """The rollout's input shardings of [P, Tp] prompts and of their [P] row ids."""
    rules = sharding.SAMPLING_RULES
    return (
        sharding.logical_sharding(("batch", None), shape, mesh, rules),
        sharding.logical_sharding(("batch",), shape[:1], mesh, rules),
    )


@functools.cache
def _rollout_program(
    mesh: Mesh,
    policy_graphdef,
    ref_graphdef,
    reward_fn,
    cfg: GRPOConfig,
    prompt_shape: tuple[int, int],
    with_row_ids: bool,
    with_stop_table: bool,
) -> Callable:
    """The jitted rollout for one set of static inputs (weights keep the layout they arrive in)."""
    rules = sharding.SAMPLING_RULES
    rows, row_ids = _prompt_shardings(mesh, prompt_shape)
    samples = sharding.logical_sharding(
        ("batch",), (prompt_shape[0] * cfg.num_generations,), mesh, rules
    )
    replicated = NamedSharding(mesh, PartitionSpec())
    body = functools.partial(
        _rollout,
        policy_graphdef=policy_graphdef,
        ref_graphdef=ref_graphdef,
        reward_fn=reward_fn,
        cfg=cfg,
    )
    return jax.jit(
        body,
        in_shardings=(
            None,
            None,
            rows,
            rows,
            replicated,
            row_ids if with_row_ids else None,
            replicated if with_stop_table else None,
        ),
        out_shardings=(samples, replicated),
    )


def _rollout(
    policy_state,
    ref_state,
    prompt_ids,
    prompt_mask,
    key,
    row_ids,
    stop_table,
    *,
    policy_graphdef,
    ref_graphdef,
    reward_fn,
    cfg: GRPOConfig,
) -> tuple[Rollouts, dict[str, jax.Array]]:
    g = cfg.num_generations
    out = sampling.sample(
        policy_graphdef,
        policy_state,
        prompt_ids,
        prompt_mask,
        key,
        num_samples=g,
        max_new_tokens=cfg.max_completion_length,
        cfg=cfg.sampling_config(),
        stop_ids=cfg.stop_token_ids,
        stop_table=stop_table,
        pad_id=cfg.pad_token_id,
        first_window=cfg.decode_first_window,
    )
    prompt_ids = jnp.repeat(prompt_ids, g, axis=0)  # [B, Tp]
    prompt_mask = jnp.repeat(prompt_mask, g, axis=0)
    score_args = (out.tokens, out.lengths)
    if row_ids is not None:
        score_args += (jnp.repeat(jnp.asarray(row_ids, jnp.int32), g),)
    rewards, per_reward = reward_fn(*score_args)  # [B], [R, B]: host callback

    logprobs = functools.partial(
        scoring_logprobs,
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=out.tokens,
        completion_mask=out.mask,
        cfg=cfg,
    )
    old = ref = None
    if cfg.off_policy:
        old = logprobs(nnx.merge(policy_graphdef, policy_state))
    if cfg.beta > 0:
        ref = logprobs(nnx.merge(ref_graphdef, ref_state))

    truncated = out.stop_reason == sampling.LENGTH
    rollouts = Rollouts(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=out.tokens,
        completion_mask=out.mask,
        advantages=group_advantages(rewards, g, cfg.scale_rewards),
        rewards=rewards,
        per_reward=per_reward.T,
        truncated=truncated,
        old_logprobs=old,
        ref_logprobs=ref,
    )
    lengths = out.lengths.astype(jnp.float32)
    metrics = reward_metrics(rewards, per_reward, reward_fn.names, g, cfg.scale_rewards)
    metrics.update(
        {
            "completions/mean_length": jnp.mean(lengths),
            "completions/min_length": jnp.min(lengths),
            "completions/max_length": jnp.max(lengths),
            "completions/clipped_ratio": jnp.mean(truncated.astype(jnp.float32)),
        }
    )
    return rollouts, metrics


def grpo_loss(
    model: nnx.Module,
    rollouts: Rollouts,
    cfg: GRPOConfig,
    num_items_in_batch: jax.Array | None = None,
    prompts: PromptForward | None = None,
    prompt_index: jax.Array | None = None,
    num_tokens_per_micro_batch: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`policy_loss` of the model's current log-probs on (a micro-batch of) `rollouts`.

    Args:
      model: the policy being trained.
      rollouts: a `Rollouts`, or a micro-batch of one (same fields, fewer rows).
      cfg: GRPOConfig (static).
      num_items_in_batch: "dapo" only: completion tokens in the whole rollout batch.
      prompts, prompt_index: the prompts' shared forward (`prompt_forward`, of this model) and
        the prompt row of each of the rollouts' rows (see `logprobs_after_prompts`); prompts
        None: each row runs its own prompt. The router counts are then the completions' only.
      num_tokens_per_micro_batch: the whole batch's completion tokens / micro-batches; the
        token-mean metrics are then scaled so that their mean over micro-batches is the batch's.
    Returns:
      (loss, metrics): metrics as `policy_loss` minus the completion lengths (the rollout
      reports those for the whole batch) and with `entropy`; for a mixture-of-experts model
      also "router", the forward's `RouterStats` (not a scalar: the step consumes it).
    """
    kw = dict(temperature=cfg.temperature, chunk_size=cfg.logprob_chunk_size, with_entropy=True)
    if prompts is None:
        logp, entropy, router = completion_logprobs(
            model,
            rollouts.prompt_ids,
            rollouts.prompt_mask,
            rollouts.completion_ids,
            rollouts.completion_mask,
            **kw,
        )
    else:
        logp, entropy, router = logprobs_after_prompts(
            model, prompts, prompt_index, rollouts.completion_ids, rollouts.completion_mask, **kw
        )
    loss, metrics = policy_loss(
        logp,
        rollouts.old_logprobs,
        rollouts.ref_logprobs,
        rollouts.advantages,
        rollouts.completion_mask,
        loss_type=cfg.loss_type,
        epsilon_low=cfg.epsilon_low,
        epsilon_high=cfg.epsilon_high,
        beta=cfg.beta,
        max_completion_length=cfg.max_completion_length,
        num_items_in_batch=num_items_in_batch,
        entropy=jax.lax.stop_gradient(entropy),
    )
    metrics = {k: v for k, v in metrics.items() if not k.startswith("completions/")}
    if num_tokens_per_micro_batch is not None:
        # Every metric left is a token mean of this micro-batch: reweighted so that their mean
        # over the micro-batches is the whole batch's token mean (micro-batches hold different
        # numbers of tokens; the logged kl and entropy moved with num_micro_batches).
        share = jnp.sum(rollouts.completion_mask) / jnp.maximum(num_tokens_per_micro_batch, 1.0)
        metrics = {k: v * share for k, v in metrics.items()}
    if router is not None:  # routing counts, for `train.router_step` after the optimizer step
        metrics["router"] = router
    return loss, metrics


def update(
    train_state: train.TrainState, rollouts: Rollouts, cfg: GRPOConfig
) -> dict[str, jax.Array]:
    """μ = `num_iterations` passes over one rollout batch, each `num_mini_batches` optimizer steps
    (`mini_batches`), in place on `train_state`.

    Each step accumulates gradients over `num_micro_batches` micro-batches of the whole batch,
    clips, and applies AdamW (skipping it if a gradient is not finite). Compiled once per
    rollout shape; the training state is donated.

    Returns:
      replicated float32 scalars, averaged over the μ x M steps: `loss`, `kl` (beta > 0),
      `clip_ratio/low_mean`, `clip_ratio/high_mean`, `clip_ratio/region_mean`, `entropy`,
      `grad_norm` (before clipping), `learning_rate`, `update_skipped` (share of the μ x M
      updates skipped), `skipped_updates` (total skipped so far in the run), and with
      `shared_prompt_forward` `shared_prompt_mismatch` (1.0: a group's rows had different
      prompts, the update was skipped). For a DeepSeek model
      also `router/*` (`deepseek.router_step`: expert load, drops, bias drift), the routing
      bias being updated after each of the μ steps when the model's `router_bias_rate` > 0.
    """
    if cfg.off_policy and rollouts.old_logprobs is None:
        raise ValueError(
            f"grpo.num_iterations={cfg.num_iterations} with num_mini_batches="
            f"{cfg.num_mini_batches} needs the sampling policy's log-probs in "
            "rollouts.old_logprobs (grpo.rollout fills them when either is > 1); without "
            "them every step's ratio would be 1 and nothing would be clipped"
        )
    rows, m, g = rollouts.advantages.shape[0], cfg.num_mini_batches, cfg.num_generations
    if rows % (m * g) or (rows // m) % cfg.num_micro_batches:
        raise ValueError(
            f"grpo.num_mini_batches={m} must deal the {rows // g} prompts of the batch evenly, "
            f"and each mini-batch's {rows // m} rows must split into num_micro_batches="
            f"{cfg.num_micro_batches}"
        )
    return train_state.run_step(_update_step, rollouts, cfg=cfg)


def loss_and_gradients(
    model: nnx.Module, rollouts: Rollouts, cfg: GRPOConfig
) -> tuple[jax.Array, nnx.State, dict[str, jax.Array]]:
    """`grpo_loss` over the whole rollout batch and its float32 gradients, accumulated over
    `cfg.num_micro_batches` micro-batches (inside jit; `train.accumulate_gradients`)."""
    dapo = cfg.loss_type == "dapo"
    # dapo divides by the whole batch's token count, so micro-batch losses sum to the batch loss.
    num_items = jnp.sum(rollouts.completion_mask) if dapo else None
    # the mean token count of a micro-batch: token-mean metrics are weighted by it
    per_micro = jnp.sum(rollouts.completion_mask).astype(jnp.float32) / cfg.num_micro_batches
    if not cfg.shared_prompt_forward:
        loss_fn = lambda m, micro: grpo_loss(
            m, micro, cfg, num_items, num_tokens_per_micro_batch=per_micro
        )  # noqa: E731
        return train.accumulate_gradients(
            loss_fn, model, rollouts, cfg.num_micro_batches, sum_micro_batches=dapo
        )
    # Each prompt's forward runs once for the whole batch; every micro-batch's completions attend
    # to it, and their gradients w.r.t. it are pulled back through it once.
    g, k = cfg.num_generations, cfg.num_micro_batches
    ids, mask, rows = _prompts_once(rollouts.prompt_ids, rollouts.prompt_mask, cfg, k)

    def shared(m):  # differentiable: the cache's float arrays and the last hidden states
        fwd = prompt_forward(m, ids, mask)
        floats, rest = _floats_and_rest(fwd.cache)
        return (floats, fwd.last_hidden), (rest, fwd.router)

    def loss_fn(m, micro, shared_values):
        (floats, last_hidden), (rest, prompt_router) = shared_values
        prompts = PromptForward(_join(floats, rest), last_hidden, prompt_router)
        micro_rollouts, prompt_index = micro
        loss, metrics = grpo_loss(
            m, micro_rollouts, cfg, num_items, prompts, prompt_index, per_micro
        )
        if prompt_router is not None:  # the prompts were routed once: 1/k of them per micro-batch
            share = lambda c, p: c + p / k  # noqa: E731
            metrics["router"] = jax.tree.map(share, metrics["router"], prompt_router)
        return loss, metrics

    loss, grads, metrics = train.accumulate_gradients(
        loss_fn, model, (rollouts, rows), k, sum_micro_batches=dapo, shared=shared
    )
    # Rows of a group that do not share one prompt (a hand-built batch) would be trained on the
    # wrong prompt: poison the gradient instead, so the optimizer skips the step, and say why.
    mismatch = jnp.any(jnp.repeat(ids, g, 0) != rollouts.prompt_ids) | jnp.any(
        jnp.repeat(mask, g, 0) != rollouts.prompt_mask
    )
    grads = jax.tree.map(lambda x: jnp.where(mismatch, jnp.nan, x), grads)
    metrics["shared_prompt_mismatch"] = mismatch.astype(jnp.float32)
    return loss, grads, metrics


def mini_batches(rollouts: Rollouts, cfg: GRPOConfig) -> Rollouts:
    """[B, ...] rollouts -> [M, B / M, ...]: mini-batch j holds prompts j, j + M, j + 2M, ...
    with their G rows each, prompt-major (whole groups: the shared prompt forward takes every
    G-th row)."""
    m, g = cfg.num_mini_batches, cfg.num_generations

    def one(x):
        p = x.shape[0] // g
        x = x.reshape(p // m, m, g, *x.shape[1:]).swapaxes(0, 1)
        x = x.reshape(m, (p // m) * g, *x.shape[3:])
        return sharding.constrain(x, (None, "batch") + (None,) * (x.ndim - 2))

    return jax.tree.map(one, rollouts)


def _update_step(
    model, optimizer: train.Optimizer, rollouts: Rollouts, *, cfg: GRPOConfig
) -> dict[str, jax.Array]:
    def one_step(model, optimizer, batch):
        loss, grads, metrics = loss_and_gradients(model, batch, cfg)
        router = metrics.pop("router", None)
        metrics = {"loss": loss, **metrics, **optimizer.apply_gradients(model, grads)}
        return {**metrics, **train.router_step(model, router, metrics["update_skipped"] > 0)}

    if cfg.num_mini_batches == 1:
        one_pass = lambda m, o: one_step(m, o, rollouts)  # noqa: E731
    else:
        minis = mini_batches(rollouts, cfg)
        one_pass = lambda m, o: train.repeat(one_step, m, o, cfg.num_mini_batches, minis)  # noqa: E731
    metrics = train.repeat(one_pass, model, optimizer, cfg.num_iterations)
    metrics["skipped_updates"] = optimizer.skipped[...].astype(jnp.float32)
    return metrics
