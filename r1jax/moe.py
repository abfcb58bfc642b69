"""Mixture-of-experts routing and dispatch (DeepSeekMoE), as pure array functions.

This module owns what happens to the routed experts of one MoE layer: choosing each token's
experts (`route`), packing tokens into per-expert buffers of fixed capacity (`dispatch`), running
the experts (`expert_ffn`), scattering results back (`combine`), and, when a mesh is set, doing all
of that expert-parallel inside `jax.shard_map` with an all-to-all over the `expert` mesh axis
(`routed_experts`); plus the load-balancing rule for the routing bias (`balance_bias`).
Shared experts and the module/parameter plumbing live in `r1jax.models.deepseek`.

Dimension letters: T tokens, D embed, E routed experts, K experts per token (top-k), C capacity
(slots per expert), F expert hidden size, X expert-parallel ways.

Notable choices:
- Routing follows Hugging Face's DeepSeek-V2/V3 routers exactly (the parity target): V3 scores
  with a sigmoid, picks `topk_group` groups by the sum of their two best biased scores, then the
  top-k experts in those groups by biased score, and weights them by the *unbiased* scores
  (optionally normalised, then times `routed_scaling_factor`); V2 scores with a softmax and picks
  greedily (or by group max).
- Dispatch is sort-based with static shapes: assignments are ranked within their expert in token
  order (earlier tokens first) and an assignment whose rank reaches the capacity C is *dropped*
  (that expert contributes nothing to that token; shared experts and the residual still do).
  `capacity_factor=None` means dropless: C = tokens, so nothing can be dropped (exact, but the
  buffers take E*T*D; right for tests and decode, not for long training batches).
  Padding tokens are never dispatched and never counted in the load.
- Expert parallelism (mesh with `expert` > 1): experts are split over `expert`, which must divide
  their number. The default rules split the batch over `expert` too (batch -> data, fsdp,
  expert): every rank routes its own tokens, packs [E, C, D], all-to-alls so that each rank holds
  its E/X experts' tokens from every rank, runs them, all-to-alls back and combines. When the
  tokens a device holds are replicated over `expert` instead (a batch the axes do not divide, or
  other rules), each expert rank first takes its 1/X share of them and the shares are summed back
  together at the end (a psum of disjoint pieces, which keeps the result typed as replicated).
  Capacity is per (rank share, expert), as in GShard. Expert
  hidden units may also be split over `tensor` (partial sums are psum-ed once, on [T, D]).
"""

from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from r1jax import sharding

SCORING = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Routing hyperparameters of one MoE layer (Hugging Face names). Frozen, so static under jit.

    num_experts:      E routed experts
    top_k:            K experts per token (`num_experts_per_tok`)
    scoring:          "sigmoid" (V3) or "softmax" (V2)
    topk_method:      "noaux_tc" (V3: biased group-limited top-k), "greedy" or
                      "group_limited_greedy" (V2)
    n_group, topk_group: experts form n_group equal groups; a token may use experts of topk_group
    norm_topk_prob:   renormalise the K weights to sum to 1 (before the scaling factor)
    routed_scaling_factor: multiplies the routed weights
    capacity_factor:  slots per expert = ceil(factor * tokens * K / E); None = dropless
    """

    num_experts: int
    top_k: int
    scoring: str = "sigmoid"
    topk_method: str = "noaux_tc"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    capacity_factor: float | None = None

    def __post_init__(self):
        if self.scoring not in SCORING:
            raise ValueError(f"MoEConfig.scoring must be one of {SCORING}, got {self.scoring!r}")
        if self.topk_method not in TOPK_METHODS:
            raise ValueError(
                f"MoEConfig.topk_method must be one of {TOPK_METHODS}, got {self.topk_method!r}"
            )
        if (self.scoring == "sigmoid") != (self.topk_method == "noaux_tc"):
            raise ValueError(
                f"MoEConfig: scoring {self.scoring!r} with topk_method "
                f"{self.topk_method!r} is not a DeepSeek router; V3 is sigmoid + "
                f"noaux_tc, V2 is softmax + greedy/group_limited_greedy"
            )
        if self.num_experts % self.n_group or not 1 <= self.topk_group <= self.n_group:
            raise ValueError(
                f"MoEConfig: n_group ({self.n_group}) must divide num_experts "
                f"({self.num_experts}) and 1 <= topk_group ({self.topk_group}) "
                f"<= n_group"
            )
        if self.topk_method == "noaux_tc" and self.num_experts // self.n_group < 2:
            raise ValueError(
                "MoEConfig: noaux_tc scores a group by its best two experts, so each "
                "group needs >= 2 experts (lower n_group)"
            )
        eligible = self.num_experts
        if self.topk_method != "greedy":
            eligible = self.topk_group * self.num_experts // self.n_group
        if not 1 <= self.top_k <= eligible:
            raise ValueError(
                f"MoEConfig: top_k ({self.top_k}) must be between 1 and the "
                f"{eligible} experts a token may choose from"
            )
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(
                f"MoEConfig.capacity_factor must be > 0 or None (dropless), "
                f"got {self.capacity_factor}"
            )

    def capacity(self, num_tokens: int) -> int:
        """Slots per expert for a group of `num_tokens` tokens (a token uses an expert at most once,
        so `num_tokens` slots can never overflow)."""
        if self.capacity_factor is None:
            return num_tokens
        want = math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)
        return max(1, min(num_tokens, want))


@flax.struct.dataclass
class MoEStats:
    """Routing counts of one MoE layer over the real (unpadded) tokens of a forward pass.

    load:    [E] float32, assignments each expert received (before capacity drops)
    dropped: [] float32, assignments dropped because their expert was full
    """

    load: jax.Array
    dropped: jax.Array


# --------------------------------------------------------------------------------------------------
# Routing
# --------------------------------------------------------------------------------------------------


def route(
    x_td: jax.Array, router_de: jax.Array, bias_e: jax.Array | None, cfg: MoEConfig
) -> tuple[jax.Array, jax.Array]:
    """Choose K experts per token.

    x_td [T, D]; router_de [D, E]; bias_e [E] score-correction bias (noaux_tc only, else None).
    Returns (experts [T, K] int32, weights [T, K] float32). Computed in float32, as HF does.
    """
    logits = jnp.dot(
        x_td.astype(jnp.float32), router_de.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )
    t, e = logits.shape
    per_group = e // cfg.n_group
    if cfg.scoring == "sigmoid":
        scores = jax.nn.sigmoid(logits)
        choice = scores + bias_e.astype(jnp.float32)  # the bias steers the choice, not the weights
        group_score = jax.lax.top_k(choice.reshape(t, cfg.n_group, per_group), 2)[0].sum(-1)
        choice = jnp.where(_group_mask(group_score, cfg, per_group), choice, -jnp.inf)
        _, experts = jax.lax.top_k(choice, cfg.top_k)
        weights = jnp.take_along_axis(scores, experts, axis=-1)
    else:
        scores = jax.nn.softmax(logits, axis=-1)
        if cfg.topk_method == "group_limited_greedy":
            group_score = scores.reshape(t, cfg.n_group, per_group).max(-1)
            scores = jnp.where(_group_mask(group_score, cfg, per_group), scores, 0.0)
        weights, experts = jax.lax.top_k(scores, cfg.top_k)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return experts.astype(jnp.int32), weights * cfg.routed_scaling_factor


def _group_mask(group_score: jax.Array, cfg: MoEConfig, per_group: int) -> jax.Array:
    """[T, G] group scores -> [T, E] bool, True for experts in the token's topk_group best
    groups."""
    _, groups = jax.lax.top_k(group_score, cfg.topk_group)
    chosen = jax.nn.one_hot(groups, cfg.n_group, dtype=jnp.int32).sum(1) > 0  # [T, G]
    return jnp.repeat(chosen, per_group, axis=-1)


def balance_bias(bias_e: jax.Array, load_e: jax.Array, rate: float) -> jax.Array:
    """Auxiliary-loss-free load balancing (DeepSeek-V3, section 2.1.2): one update of the
    score-correction bias [E] from the measured load [E]: bias + rate * sign(mean load - load).
    An overloaded expert becomes less attractive, an underloaded one more; rate 0 changes
    nothing."""
    return bias_e + rate * jnp.sign(jnp.mean(load_e) - load_e).astype(bias_e.dtype)


# --------------------------------------------------------------------------------------------------
# Dispatch, experts, combine (one device's view)
# --------------------------------------------------------------------------------------------------


def dispatch(
    x_td: jax.Array, experts_tk: jax.Array, valid_t: jax.Array, num_experts: int, capacity: int
) -> tuple[jax.Array, jax.Array, MoEStats]:
    """Pack tokens into per-expert buffers.

    x_td [T, D]; experts_tk [T, K] int32; valid_t [T] bool (False = padding, not dispatched).
    Returns (buffer [E, C, D], slot [T, K] int32 position in its expert's buffer or -1 if the
    assignment was dropped or the token is padding, stats).
    """
    t, k = experts_tk.shape
    flat = jnp.where(valid_t[:, None], experts_tk, num_experts).reshape(-1)  # [T*K]; pads -> E
    order = jnp.argsort(flat, stable=True)  # stable: within an expert, earlier tokens first
    counts = jnp.zeros((num_experts + 1,), jnp.int32).at[flat].add(1)
    starts = jnp.cumsum(counts) - counts
    rank_sorted = jnp.arange(t * k, dtype=jnp.int32) - starts[flat[order]]
    rank = jnp.zeros((t * k,), jnp.int32).at[order].set(rank_sorted)
    kept = (flat < num_experts) & (rank < capacity)
    slot = jnp.where(kept, rank, -1)
    token = jnp.repeat(jnp.arange(t), k)
    # Dropped and padding assignments point past the buffer and are discarded by mode="drop".
    row = jnp.where(kept, flat, num_experts)
    buffer = jnp.zeros((num_experts, capacity, x_td.shape[-1]), x_td.dtype)
    buffer = buffer.at[row, jnp.maximum(slot, 0)].set(x_td[token], mode="drop")
    real = flat < num_experts
    stats = MoEStats(
        load=counts[:num_experts].astype(jnp.float32),
        dropped=jnp.sum(real & ~kept).astype(jnp.float32),
    )
    return buffer, slot.reshape(t, k), stats


def expert_ffn(
    buffer_ecd: jax.Array, gate_edf: jax.Array, up_edf: jax.Array, down_efd: jax.Array
) -> jax.Array:
    """SwiGLU of each expert on its own slots: [..., E, C, D] -> [..., E, C, D] (compute dtype of
    the buffer; weights are cast to it)."""
    dt = buffer_ecd.dtype
    gate = jnp.einsum("...ecd,edf->...ecf", buffer_ecd, gate_edf.astype(dt))
    up = jnp.einsum("...ecd,edf->...ecf", buffer_ecd, up_edf.astype(dt))
    return jnp.einsum("...ecf,efd->...ecd", jax.nn.silu(gate) * up, down_efd.astype(dt))


def combine(
    out_ecd: jax.Array, experts_tk: jax.Array, slot_tk: jax.Array, weights_tk: jax.Array
) -> jax.Array:
    """Weighted sum over each token's kept assignments: -> [T, D] in the buffer's dtype."""
    gathered = out_ecd.at[experts_tk, jnp.maximum(slot_tk, 0)].get(mode="fill", fill_value=0)
    w = jnp.where(slot_tk >= 0, weights_tk, 0.0).astype(out_ecd.dtype)
    return jnp.einsum("tkd,tk->td", gathered, w)


def _moe_tokens(
    x_td,
    valid_t,
    router_de,
    bias_e,
    gate_edf,
    up_edf,
    down_efd,
    cfg: MoEConfig,
    ep_axis: str | None = None,
) -> tuple[jax.Array, MoEStats]:
    """Route, dispatch, run, combine for the tokens of one device. With `ep_axis`, the expert
    weights hold only this rank's E/X experts and buffers travel by all-to-all over that axis."""
    experts, weights = route(x_td, router_de, bias_e, cfg)
    capacity = cfg.capacity(x_td.shape[0])
    buffer, slot, stats = dispatch(x_td, experts, valid_t, cfg.num_experts, capacity)
    if ep_axis is None:
        out = expert_ffn(buffer, gate_edf, up_edf, down_efd)
    else:
        ways = jax.lax.axis_size(ep_axis)
        local = cfg.num_experts // ways
        # [E, C, D] -> [X, E/X, C, D]; after the exchange the leading axis is the source rank.
        sent = buffer.reshape(ways, local, capacity, -1)
        received = jax.lax.all_to_all(sent, ep_axis, 0, 0, tiled=True)
        done = expert_ffn(received, gate_edf, up_edf, down_efd)
        out = jax.lax.all_to_all(done, ep_axis, 0, 0, tiled=True).reshape(buffer.shape)
    return combine(out, experts, slot, weights), stats


# --------------------------------------------------------------------------------------------------
# The layer's routed part, local or expert-parallel
# --------------------------------------------------------------------------------------------------


def routed_experts(
    x_btd: jax.Array,
    mask_bt: jax.Array,
    router_de: jax.Array,
    bias_e: jax.Array | None,
    gate_edf: jax.Array,
    up_edf: jax.Array,
    down_efd: jax.Array,
    cfg: MoEConfig,
) -> tuple[jax.Array, MoEStats]:
    """The routed experts' contribution for every token.

    x_btd [B, T, D] (compute dtype); mask_bt [B, T] bool, False for padding; router_de [D, E];
    bias_e [E] or None; gate_edf, up_edf [E, D, F]; down_efd [E, F, D].
    Returns ([B, T, D], stats summed over all devices' tokens).

    Without a mesh (`jax.set_mesh`) everything runs on the tokens as given. With one, the work runs
    per device in `shard_map`: tokens split over the batch axes of the current rules, experts over
    the mesh axis the `expert` rule names (all-to-all), expert hidden units over the `mlp` rule's.
    """
    b, t, d = x_btd.shape
    if bias_e is None:
        bias_e = jnp.zeros((cfg.num_experts,), jnp.float32)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        out, stats = _moe_tokens(
            x_btd.reshape(b * t, d),
            mask_bt.reshape(-1),
            router_de,
            bias_e,
            gate_edf,
            up_edf,
            down_efd,
            cfg,
        )
        return out.reshape(b, t, d), stats

    token_axes = _axes(sharding.logical_to_spec(("batch",), (b,), mesh)[0])
    w_spec = sharding.logical_to_spec(("expert", None, "mlp"), gate_edf.shape, mesh)
    ep_axes, tp_axes = _axes(w_spec[0]), _axes(w_spec[2])
    ep_size = mesh.shape.get("expert", 1)
    if ep_size > 1 and not ep_axes:
        raise ValueError(
            f"expert parallelism: n_routed_experts ({cfg.num_experts}) must be "
            f"divisible by the mesh's expert axis ({ep_size})"
        )
    if len(ep_axes) > 1:
        raise ValueError(
            f"expert parallelism needs the `expert` rule to name one mesh axis, got {ep_axes}"
        )
    if set(tp_axes) & set(token_axes):
        raise ValueError(
            f"the `mlp` rule ({tp_axes}) and the `batch` rule ({token_axes}) share a "
            f"mesh axis; expert hidden units cannot be split over the batch axes"
        )
    ep_axis = ep_axes[0] if ep_axes else None
    split_tokens = ep_axis is not None and ep_axis not in token_axes
    sum_axes = token_axes + ((ep_axis,) if split_tokens else ())

    def per_device(x, mask, router, bias, gate, up, down):
        bl = x.shape[0]
        x, mask = x.reshape(bl * t, d), mask.reshape(bl * t)
        n = bl * t
        if split_tokens:  # this expert rank's share of tokens that are replicated over the axis
            ways = jax.lax.axis_size(ep_axis)
            share = -(-n // ways)
            x = jnp.pad(x, ((0, share * ways - n), (0, 0)))
            mask = jnp.pad(mask, (0, share * ways - n))
            start = jax.lax.axis_index(ep_axis) * share
            x = jax.lax.dynamic_slice_in_dim(x, start, share)
            mask = jax.lax.dynamic_slice_in_dim(mask, start, share)
        out, stats = _moe_tokens(x, mask, router, bias, gate, up, down, cfg, ep_axis)
        if split_tokens:  # put the shares back together (disjoint pieces, so a sum reassembles)
            whole = jnp.zeros((share * ways, d), out.dtype)
            out = jax.lax.psum(jax.lax.dynamic_update_slice_in_dim(whole, out, start, 0), ep_axis)
            out = out[:n]
        if tp_axes:
            out = jax.lax.psum(out, tp_axes)
        if sum_axes:
            stats = jax.tree.map(lambda s: jax.lax.psum(s, sum_axes), stats)
        return out.reshape(bl, t, d), stats

    tb = _spec_entry(token_axes)
    ep, tp = _spec_entry(ep_axes), _spec_entry(tp_axes)
    fn = jax.shard_map(
        per_device,
        in_specs=(
            PartitionSpec(tb, None, None),
            PartitionSpec(tb, None),
            PartitionSpec(),
            PartitionSpec(),
            PartitionSpec(ep, None, tp),
            PartitionSpec(ep, None, tp),
            PartitionSpec(ep, tp, None),
        ),
        out_specs=(PartitionSpec(tb, None, None), MoEStats(PartitionSpec(), PartitionSpec())),
    )
    return fn(x_btd, mask_bt, router_de, bias_e, gate_edf, up_edf, down_efd)


def _axes(entry) -> tuple[str, ...]:
    """A PartitionSpec entry (None, a name, or a tuple of names) as a tuple of names."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _spec_entry(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes
