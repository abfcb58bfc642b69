"""DeepSeek-V2/V3 decoder (R1's own architecture): multi-head latent attention and DeepSeekMoE.

Sits beside the dense `transformer.Decoder` and subclasses it, so the pieces that are the same
are shared (RMSNorm, SwiGLU MLP, rope tables, masks, unembedding, `__call__` contract), and the
sampler, losses and trainers use it unchanged. `deepseek_hf.py` maps Hugging Face configs and
weights onto it.

Dimension legend (as in transformer.py, plus):
  Q q_lora_rank   C kv_lora_rank (the latent)   R qk_rope_head_dim   H qk_nope_head_dim
  V v_head_dim    E routed experts              M moe_intermediate_size

Notable choices:
- MLA. Keys and values are rebuilt from a per-token latent c = RMSNorm(x W_dkv) [C] plus one
  rope key shared by all heads [R]. The cache (`MLACache`) stores exactly those C + R numbers per
  token and layer, not N * (H + R + V) keys and values (V3: 576 vs 40,960 numbers).
- Two ways to attend, the same function: *naive* expands the latent into per-head keys and values
  (training and prefill: cheapest when T is large); *absorbed* folds the key up-projection into
  the query (q_nope W_uk -> [N, C]) and the value up-projection into the output (attend over
  latents, then W_uv), so a decode step reads only the latent cache. `absorb=None` picks absorbed
  exactly for single-token steps with a cache; tests show both paths equal.
- RoPE on the R rope dims only; DeepSeek checkpoints rotate adjacent pairs (`rope_interleave`,
  always for V2), which gives the same scores as HF whichever output layout is used. YaRN's
  attention-scale correction is applied as HF does: cos/sin scaled by
  mscale(mscale) / mscale(mscale_all_dim) and the softmax scale by mscale(mscale_all_dim)^2.
- DeepSeekMoE: `first_k_dense_replace` dense layers, then layers of shared + routed experts
  (`r1jax.moe`: routing exactly as HF, capacity/drop accounting, expert parallelism over the
  `expert` mesh axis). Padding tokens are not routed. V3's score-correction bias is a `RouterBias`
  variable: not a parameter (no gradient, no weight decay), saved with the model, and changed only
  by `update_router_bias` from measured expert load (auxiliary-loss-free load balancing).
- Router metrics come from `hidden_states_with_router` (the same forward plus a `RouterStats`);
  `__call__` and `hidden_states` keep the dense decoder's return contract.
- Multi-token-prediction modules are not part of this model (see `deepseek_hf` for loading).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from r1jax import moe, sharding
from r1jax.models import transformer
from r1jax.models.transformer import MLP, Decoder, ModelConfig, RMSNorm, _param

# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DeepseekConfig:
    """Hyperparameters of a DeepSeek-V2/V3 model (Hugging Face names where they exist). Frozen and
    hashable, so it can be a static jit argument.

    `rope_scaling` is a tuple of (key, value) pairs in HF's `rope_scaling` form, or None.
    `capacity_factor` sets the routed experts' capacity (None = dropless; see `r1jax.moe`).
    `router_bias_rate` is gamma of auxiliary-loss-free load balancing: the trainers apply
    `update_router_bias` at this rate after every optimizer step (0 = off, the bias stays as
    loaded; DeepSeek-V3 used 0.001, and 0 late in pre-training). V3 routers only.
    """

    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # F of the dense layers
    moe_intermediate_size: int  # M, per expert
    num_layers: int  # L
    num_heads: int  # N
    q_lora_rank: int | None  # Q; None = full-rank query projection (V2-Lite)
    kv_lora_rank: int  # C
    qk_nope_head_dim: int  # H
    qk_rope_head_dim: int  # R
    v_head_dim: int  # V
    n_routed_experts: int  # E
    n_shared_experts: int
    num_experts_per_tok: int
    first_k_dense_replace: int
    scoring_func: str = "sigmoid"  # "sigmoid" (V3) | "softmax" (V2)
    topk_method: str = "noaux_tc"  # "noaux_tc" (V3) | "greedy" | "group_limited_greedy" (V2)
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    capacity_factor: float | None = None
    router_bias_rate: float = 0.0
    rope_interleave: bool = True
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype; norms, routing, softmax and logits stay float32
    remat: bool = False
    model_type: str = "deepseek_v3"

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "moe_intermediate_size",
            "num_layers",
            "num_heads",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
            "n_routed_experts",
            "num_experts_per_tok",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(
                    f"DeepseekConfig.{name} must be positive, got {getattr(self, name)}"
                )
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ValueError(
                f"DeepseekConfig.q_lora_rank must be positive or None, got {self.q_lora_rank}"
            )
        if self.qk_rope_head_dim % 2:
            raise ValueError(
                f"DeepseekConfig.qk_rope_head_dim must be even, got {self.qk_rope_head_dim}"
            )
        if not 0 <= self.first_k_dense_replace <= self.num_layers:
            raise ValueError(
                f"DeepseekConfig.first_k_dense_replace must be in [0, num_layers], "
                f"got {self.first_k_dense_replace}"
            )
        if self.n_shared_experts < 0:
            raise ValueError(
                f"DeepseekConfig.n_shared_experts must be >= 0, got {self.n_shared_experts}"
            )
        if self.router_bias_rate < 0:
            raise ValueError(
                f"DeepseekConfig.router_bias_rate must be >= 0, got {self.router_bias_rate}"
            )
        if self.router_bias_rate and self.topk_method != "noaux_tc":
            raise ValueError(
                f"DeepseekConfig.router_bias_rate={self.router_bias_rate} needs a DeepSeek-V3 "
                f"router (topk_method 'noaux_tc'); {self.topk_method!r} has no score-correction "
                f"bias, set router_bias_rate to 0"
            )
        # Building the derived views validates the routing fields, rope_scaling and the dtypes.
        _ = self.moe, self.rope_view

    # -- derived views --

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def sliding_window(self) -> None:
        """MLA attends to every earlier token (the dense decoder's mask helpers read this)."""
        return None

    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling or ())

    @property
    def moe(self) -> moe.MoEConfig:
        return moe.MoEConfig(
            num_experts=self.n_routed_experts,
            top_k=self.num_experts_per_tok,
            scoring=self.scoring_func,
            topk_method=self.topk_method,
            n_group=self.n_group,
            topk_group=self.topk_group,
            norm_topk_prob=self.norm_topk_prob,
            routed_scaling_factor=self.routed_scaling_factor,
            capacity_factor=self.capacity_factor,
        )

    def dense_view(self, intermediate_size: int) -> ModelConfig:
        """A dense-decoder config carrying what the shared SwiGLU MLP reads (sizes and dtypes)."""
        return ModelConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=intermediate_size,
            num_layers=1,
            num_heads=1,
            num_kv_heads=1,
            head_dim=self.qk_rope_head_dim,
            param_dtype=self.param_dtype,
            dtype=self.dtype,
        )

    @property
    def rope_view(self) -> ModelConfig:
        """A dense-decoder config whose rope tables are MLA's: head_dim = R, same theta/scaling."""
        return dataclasses.replace(
            self.dense_view(self.intermediate_size),
            max_position_embeddings=self.max_position_embeddings,
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling,
        )

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(H + R), times YaRN's mscale(factor, mscale_all_dim)^2 as HF applies it."""
        scale = self.qk_head_dim**-0.5
        s = self.rope_scaling_dict
        if s.get("rope_type", "default") != "default" and s.get("mscale_all_dim"):
            m = 1.0 if s["factor"] <= 1 else 0.1 * s["mscale_all_dim"] * math.log(s["factor"]) + 1.0
            scale *= m * m
        return scale

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_k_dense_replace

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_k_dense_replace

    # -- sizes --

    @property
    def attention_params(self) -> int:
        d, n, c, r = self.hidden_size, self.num_heads, self.kv_lora_rank, self.qk_rope_head_dim
        q = (
            d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * n * self.qk_head_dim
            if self.q_lora_rank
            else d * n * self.qk_head_dim
        )
        kv = d * (c + r) + c + c * n * (self.qk_nope_head_dim + self.v_head_dim)
        return q + kv + n * self.v_head_dim * d

    @property
    def num_params(self) -> int:
        """Total parameters (embedding counted once when tied; MTP modules excluded)."""
        d, m = self.hidden_size, self.moe_intermediate_size
        dense = self.attention_params + 3 * d * self.intermediate_size + 2 * d
        moe_layer = (
            self.attention_params
            + 3 * d * m * (self.n_routed_experts + self.n_shared_experts)
            + d * self.n_routed_experts
            + 2 * d
        )
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.first_k_dense_replace * dense + self.num_moe_layers * moe_layer + emb + d

    @property
    def num_active_params(self) -> int:
        """Parameters touched per token: all but the E - K unchosen routed experts per layer."""
        idle = 3 * self.hidden_size * self.moe_intermediate_size
        return self.num_params - self.num_moe_layers * idle * (
            self.n_routed_experts - self.num_experts_per_tok
        )

    # -- named configurations (real checkpoints load through hf.load; these are for sizing/tests) --

    @classmethod
    def deepseek_v3(cls, **kw) -> DeepseekConfig:
        """DeepSeek-V3 / DeepSeek-R1: 671B total, 37B active (MTP module excluded)."""
        base = dict(
            vocab_size=129280,
            hidden_size=7168,
            intermediate_size=18432,
            moe_intermediate_size=2048,
            num_layers=61,
            num_heads=128,
            q_lora_rank=1536,
            kv_lora_rank=512,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            n_routed_experts=256,
            n_shared_experts=1,
            num_experts_per_tok=8,
            first_k_dense_replace=3,
            n_group=8,
            topk_group=4,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            max_position_embeddings=163840,
            rope_scaling=_yarn_40x(mscale=1.0),
        )
        return cls(**{**base, **kw})

    @classmethod
    def deepseek_v2_lite(cls, **kw) -> DeepseekConfig:
        """DeepSeek-V2-Lite: 15.7B total, 2.4B active; full-rank queries, softmax routing."""
        base = dict(
            vocab_size=102400,
            hidden_size=2048,
            intermediate_size=10944,
            moe_intermediate_size=1408,
            num_layers=27,
            num_heads=16,
            q_lora_rank=None,
            kv_lora_rank=512,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            n_routed_experts=64,
            n_shared_experts=2,
            num_experts_per_tok=6,
            first_k_dense_replace=1,
            scoring_func="softmax",
            topk_method="greedy",
            norm_topk_prob=False,
            routed_scaling_factor=1.0,
            max_position_embeddings=163840,
            rope_scaling=_yarn_40x(mscale=0.707),
            model_type="deepseek_v2",
        )
        return cls(**{**base, **kw})

    @classmethod
    def tiny(cls, **kw) -> DeepseekConfig:
        """A few-hundred-thousand-parameter V3-shaped model for CPU tests."""
        base = dict(
            vocab_size=96,
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_layers=3,
            num_heads=4,
            q_lora_rank=48,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=2.5,
            max_position_embeddings=128,
        )
        return cls(**{**base, **kw})


def _yarn_40x(mscale: float) -> tuple[tuple[str, Any], ...]:
    """The YaRN setting of the DeepSeek-V2/V3 releases: 4K pre-training context stretched 40x."""
    return (
        ("beta_fast", 32),
        ("beta_slow", 1),
        ("factor", 40.0),
        ("mscale", mscale),
        ("mscale_all_dim", mscale),
        ("original_max_position_embeddings", 4096),
        ("rope_type", "yarn"),
    )


# --------------------------------------------------------------------------------------------------
# The latent cache
# --------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class MLACache:
    """MLA's cache: per token and layer, the normalised KV latent and the rotated shared rope key.

    latent:      L-tuple of [B, S, C]
    k_rope:      L-tuple of [B, S, R]
    mask:        [B, S] bool, True where a slot holds a real token
    index:       [] int32, the next slot to write (all rows decode in lockstep)
    prefix_latent / prefix_k_rope: optional L-tuples of [P, Sp, C] / [P, Sp, R], a read-only segment
                 shared by the B // P consecutive rows of each prompt (its prefill)
    prefix_mask: [P, Sp] bool, or None
    Same protocol as `transformer.KVCache`: `empty`, `with_prefix`, `prefix_length`, `mask`,
    `index`.
    """

    latent: tuple[jax.Array, ...]
    k_rope: tuple[jax.Array, ...]
    mask: jax.Array
    index: jax.Array
    prefix_latent: tuple[jax.Array, ...] | None = None
    prefix_k_rope: tuple[jax.Array, ...] | None = None
    prefix_mask: jax.Array | None = None

    @classmethod
    def empty(cls, cfg: DeepseekConfig, batch: int, length: int, dtype: Any = None) -> MLACache:
        """An all-empty cache for `batch` rows of `length` slots, in the compute dtype."""
        dtype = dtype or cfg.dtype

        def zeros(width):
            return sharding.constrain(
                jnp.zeros((batch, length, width), dtype), ("batch", "seq", "kv_lora")
            )

        return cls(
            latent=tuple(zeros(cfg.kv_lora_rank) for _ in range(cfg.num_layers)),
            k_rope=tuple(zeros(cfg.qk_rope_head_dim) for _ in range(cfg.num_layers)),
            mask=jnp.zeros((batch, length), bool),
            index=jnp.zeros((), jnp.int32),
        )

    def with_prefix(self, prefix: MLACache) -> MLACache:
        """Attach `prefix` (e.g. a prompt prefill over P rows) as the shared read-only segment."""
        return self.replace(
            prefix_latent=prefix.latent, prefix_k_rope=prefix.k_rope, prefix_mask=prefix.mask
        )

    @property
    def prefix_length(self) -> int:
        return 0 if self.prefix_mask is None else self.prefix_mask.shape[1]

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one token occupies over all layers."""
        return sum(a.shape[-1] * a.dtype.itemsize for a in self.latent + self.k_rope)


# --------------------------------------------------------------------------------------------------
# Router statistics and the load-balancing bias
# --------------------------------------------------------------------------------------------------


class RouterBias(nnx.Variable):
    """DeepSeek-V3's expert score-correction bias: state, not a parameter (no gradient)."""


@flax.struct.dataclass
class RouterStats:
    """Routing counts of one forward pass, stacked over the MoE layers (real tokens only).

    load:    [L_moe, E] float32 assignments per expert (before capacity drops)
    dropped: [L_moe] float32 assignments dropped for capacity
    """

    load: jax.Array
    dropped: jax.Array

    @property
    def load_fraction(self) -> jax.Array:
        """[L_moe, E] share of each layer's assignments that went to each expert."""
        return self.load / jnp.maximum(self.load.sum(-1, keepdims=True), 1.0)


def router_metrics(stats: RouterStats) -> dict[str, jax.Array]:
    """Scalar summaries of a RouterStats for logging (all ratios, so counts summed or averaged
    over micro-batches give the same values).

    router/max_load_ratio:  max over layers of (max expert load / mean expert load); 1 = uniform
    router/mean_load_ratio: the same ratio averaged over layers
    router/dropped_frac:    dropped assignments / all assignments (capacity overflow)
    router/idle_experts:    mean over layers of the number of experts that received nothing
    router/load/e{j}:       expert j's load / mean expert load, averaged over layers (E scalars,
                            zero-padded index; 1 = its fair share)
    """
    mean = jnp.maximum(stats.load.mean(-1, keepdims=True), 1e-9)  # [L_moe, 1]
    relative = (stats.load / mean).mean(0)  # [E]
    ratio = stats.load.max(-1) / mean[:, 0]
    metrics = {
        "router/max_load_ratio": ratio.max(),
        "router/mean_load_ratio": ratio.mean(),
        "router/dropped_frac": stats.dropped.sum() / jnp.maximum(stats.load.sum(), 1.0),
        "router/idle_experts": (stats.load == 0).sum(-1).astype(jnp.float32).mean(),
    }
    width = len(str(stats.load.shape[-1] - 1))
    metrics.update({f"router/load/e{j:0{width}d}": relative[j] for j in range(relative.shape[0])})
    return metrics


def router_step(
    model: DeepseekDecoder, stats: RouterStats, skipped: jax.Array
) -> dict[str, jax.Array]:
    """Router bookkeeping after one optimizer step, from the routing of that step's batch.

    `stats` come from the step's training forward (`hidden_states_with_router`; summed or
    averaged over micro-batches: only ratios are used). Returns `router_metrics(stats)` and, for
    a V3 router, applies `update_router_bias` at `model.cfg.router_bias_rate` (in place; rate 0
    leaves the bias as it is) and adds `router/bias_drift` (0 when off) and `router/bias_abs`.
    {} for a model without MoE layers.
    """
    if stats.load.shape[0] == 0:
        return {}
    metrics = router_metrics(stats)
    if model.cfg.topk_method == "noaux_tc":
        # (an optimizer step skipped for non-finite gradients leaves the whole model as it was:
        # its routing counts may come from a batch the step refused)
        rate = jnp.where(skipped, 0.0, model.cfg.router_bias_rate)
        metrics.update(update_router_bias(model, stats, rate))
    return metrics


def update_router_bias(
    model: DeepseekDecoder, stats: RouterStats, rate: float
) -> dict[str, jax.Array]:
    """Auxiliary-loss-free load balancing (DeepSeek-V3, section 2.1.2), outside the gradient.

    For each MoE layer, `moe.balance_bias`: bias += rate * sign(mean load - load), so an
    overloaded expert becomes less attractive and an underloaded one more. In place (works
    inside jit on a merged model). `rate` is gamma (DeepSeek: 0.001, then 0 late in pre-training);
    0 switches the rule off. Returns {"router/bias_drift": mean |change|, "router/bias_abs":
    mean |bias|} after the update.
    """
    layers = [layer.mlp for layer in model.layers if isinstance(layer.mlp, MoE)]
    if not layers or layers[0].bias is None:
        raise ValueError(
            "update_router_bias needs a sigmoid (noaux_tc, DeepSeek-V3) router; this "
            "model's router has no score-correction bias"
        )
    if stats.load.shape[0] != len(layers):
        raise ValueError(
            f"stats cover {stats.load.shape[0]} MoE layers, the model has {len(layers)}"
        )
    drift, size = [], []
    for mlp, load in zip(layers, stats.load, strict=True):
        old = mlp.bias[...]
        mlp.bias[...] = moe.balance_bias(old, load, rate)
        drift.append(jnp.abs(mlp.bias[...] - old).mean())
        size.append(jnp.abs(mlp.bias[...]).mean())
    return {"router/bias_drift": jnp.stack(drift).mean(), "router/bias_abs": jnp.stack(size).mean()}


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------


def apply_rope_pairs(x: jax.Array, cos: jax.Array, sin: jax.Array, interleave: bool) -> jax.Array:
    """Rotate x [B, T, N, R] by tables [B, T, R] (HF's cat(freqs, freqs) layout).

    interleave=True rotates adjacent pairs (x0, x1), (x2, x3) ... as DeepSeek checkpoints are laid
    out, returning the rotated pairs de-interleaved (first all x', then all y'), as HF does;
    attention scores only need q and k in the same layout. interleave=False is rotate-half.
    """
    if not interleave:
        return transformer.apply_rope(x, cos, sin)
    half = x.shape[-1] // 2
    c = cos[:, :, None, :half].astype(x.dtype)
    s = sin[:, :, None, :half].astype(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


class MLAttention(nnx.Module):
    """Multi-head latent attention with a decoupled rope key (DeepSeek-V2, section 2.1)."""

    def __init__(self, cfg: DeepseekConfig, *, rngs: nnx.Rngs):
        d, n, pd = cfg.hidden_size, cfg.num_heads, cfg.param_dtype
        c, r = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        init = nnx.initializers.normal(0.02)
        self.cfg = cfg
        if cfg.q_lora_rank:
            self.q_a_dq = _param(rngs, init, (d, cfg.q_lora_rank), pd, ("embed", "q_lora"))
            self.q_norm = RMSNorm(cfg.q_lora_rank, 1e-6, pd, rngs=rngs)  # as HF: eps fixed
            self.q_b_qnh = _param(
                rngs,
                init,
                (cfg.q_lora_rank, n, cfg.qk_head_dim),
                pd,
                ("q_lora", "heads", "head_dim"),
            )
        else:
            self.q_dnh = _param(
                rngs, init, (d, n, cfg.qk_head_dim), pd, ("embed", "heads", "head_dim")
            )
        # The latent and the rope key come from one projection, as in the checkpoints.
        self.kv_a_dc = _param(rngs, init, (d, c + r), pd, ("embed", "kv_lora"))
        self.kv_norm = RMSNorm(c, 1e-6, pd, rngs=rngs)  # as HF: eps fixed, not rms_norm_eps
        self.kv_b_cnh = _param(
            rngs,
            init,
            (c, n, cfg.qk_nope_head_dim + cfg.v_head_dim),
            pd,
            ("kv_lora", "heads", "head_dim"),
        )
        self.o_nvd = _param(rngs, init, (n, cfg.v_head_dim, d), pd, ("heads", "head_dim", "embed"))

    def latent(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B, T, D] -> (normalised latent [B, T, C], rotated rope key [B, T, R]), the cached
        part."""
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        kv = jnp.einsum("btd,dc->btc", x, self.kv_a_dc[...].astype(dt))
        latent = self.kv_norm(kv[..., : cfg.kv_lora_rank])
        k_rope = apply_rope_pairs(kv[..., None, cfg.kv_lora_rank :], cos, sin, cfg.rope_interleave)
        return latent, k_rope[:, :, 0]

    def query(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B, T, D] -> (q_nope [B, T, N, H], rotated q_rope [B, T, N, R])."""
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        if cfg.q_lora_rank:
            q = self.q_norm(jnp.einsum("btd,dq->btq", x, self.q_a_dq[...].astype(dt)))
            q = jnp.einsum("btq,qnh->btnh", q, self.q_b_qnh[...].astype(dt))
        else:
            q = jnp.einsum("btd,dnh->btnh", x, self.q_dnh[...].astype(dt))
        q = sharding.constrain(q, ("batch", "seq", "heads", "head_dim"))
        h = cfg.qk_nope_head_dim
        return q[..., :h], apply_rope_pairs(q[..., h:], cos, sin, cfg.rope_interleave)

    def __call__(
        self, x, cos, sin, mask, cache_entry=None, prefix_entry=None, index=None, absorb=False
    ):
        """x [B, T, D] -> ([B, T, D], (latent, k_rope) of this layer's per-row cache or None).

        mask [B, T, Sp + S] bool covers the prefix segment (if any) then the per-row keys.
        cache_entry: ([B, S, C], [B, S, R]) to write at `index`; prefix_entry: ([P, Sp, C],
        [P, Sp, R]) read-only. absorb: attend over latents with folded projections (decode).
        """
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        q_nope, q_rope = self.query(x, cos, sin)
        latent, k_rope = self.latent(x, cos, sin)
        new_entry = None
        if cache_entry is not None:
            c_lat, c_rope = cache_entry
            c_lat = jax.lax.dynamic_update_slice(c_lat, latent.astype(c_lat.dtype), (0, index, 0))
            c_rope = jax.lax.dynamic_update_slice(
                c_rope, k_rope.astype(c_rope.dtype), (0, index, 0)
            )
            new_entry, latent, k_rope = (c_lat, c_rope), c_lat.astype(dt), c_rope.astype(dt)
        segments = [(latent, k_rope, False)]
        if prefix_entry is not None:
            segments.insert(0, (prefix_entry[0].astype(dt), prefix_entry[1].astype(dt), True))

        kv_b = self.kv_b_cnh[...].astype(dt)
        w_uk, w_uv = kv_b[..., : cfg.qk_nope_head_dim], kv_b[..., cfg.qk_nope_head_dim :]
        b, t, n, _ = q_nope.shape
        if absorb:  # q_nope W_uk^T: a query in latent space [B, T, N, C]
            q_main = jnp.einsum("btnh,cnh->btnc", q_nope, w_uk)
        else:
            q_main = q_nope

        def keys(lat, rows):  # per-segment keys in the space q_main lives in
            return lat if absorb else jnp.einsum(f"{rows}sc,cnh->{rows}snh", lat, w_uk)

        scores = []
        for lat, rope, shared in segments:
            if shared:  # the prefix is per prompt: rows p*G .. p*G+G-1 (g) share segment p
                p = lat.shape[0]
                qm = q_main.reshape(p, b // p, *q_main.shape[1:])
                qr = q_rope.reshape(p, b // p, *q_rope.shape[1:])
                k = keys(lat, "p")
                spec = "pgtnc,psc->pgnts" if absorb else "pgtnh,psnh->pgnts"
                main = jnp.einsum(spec, qm, k, preferred_element_type=jnp.float32)
                pe = jnp.einsum("pgtnr,psr->pgnts", qr, rope, preferred_element_type=jnp.float32)
                scores.append((main + pe).reshape(b, n, t, -1))
            else:
                k = keys(lat, "b")
                spec = "btnc,bsc->bnts" if absorb else "btnh,bsnh->bnts"
                main = jnp.einsum(spec, q_main, k, preferred_element_type=jnp.float32)
                pe = jnp.einsum("btnr,bsr->bnts", q_rope, rope, preferred_element_type=jnp.float32)
                scores.append(main + pe)
        scores = jnp.concatenate(scores, axis=-1) * cfg.softmax_scale
        scores = jnp.where(mask[:, None, :, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)  # [B, N, T, Sp + S]

        out, start = 0.0, 0
        for lat, _, shared in segments:
            seg = probs[..., start : start + lat.shape[1]]
            start += lat.shape[1]
            if shared:
                p = lat.shape[0]
                seg = seg.reshape(p, b // p, *seg.shape[1:])
                if absorb:
                    o = jnp.einsum("pgnts,psc->pgtnc", seg, lat)
                else:
                    o = jnp.einsum("pgnts,psnv->pgtnv", seg, jnp.einsum("psc,cnv->psnv", lat, w_uv))
                out = out + o.reshape(b, *o.shape[2:])
            elif absorb:
                out = out + jnp.einsum("bnts,bsc->btnc", seg, lat)
            else:
                v = jnp.einsum("bsc,cnv->bsnv", lat, w_uv)
                out = out + jnp.einsum("bnts,bsnv->btnv", seg, v)
        if absorb:  # the value up-projection, applied once to the attended latent
            out = jnp.einsum("btnc,cnv->btnv", out, w_uv)
        return jnp.einsum("btnv,nvd->btd", out, self.o_nvd[...].astype(dt)), new_entry


class MoE(nnx.Module):
    """DeepSeekMoE: shared experts on every token plus K of E routed experts (`r1jax.moe`)."""

    def __init__(self, cfg: DeepseekConfig, *, rngs: nnx.Rngs):
        d, e, m = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
        pd = cfg.param_dtype
        init = nnx.initializers.normal(0.02)
        self.cfg = cfg
        # HF keeps the router and its bias in float32 whatever the model dtype; so do we (a
        # bfloat16 router picks other experts for ~2% of tokens at V3's size).
        self.router_de = _param(
            rngs, init, (d, e), jnp.float32, ("embed", None), float32_in_forward=True
        )
        self.bias = (
            RouterBias(jnp.zeros((e,), jnp.float32), out_sharding=(None,))
            if cfg.topk_method == "noaux_tc"
            else None
        )
        self.gate_edm = _param(rngs, init, (e, d, m), pd, ("expert", "embed", "mlp"))
        self.up_edm = _param(rngs, init, (e, d, m), pd, ("expert", "embed", "mlp"))
        self.down_emd = _param(rngs, init, (e, m, d), pd, ("expert", "mlp", "embed"))
        self.shared = (
            MLP(cfg.dense_view(m * cfg.n_shared_experts), rngs=rngs)
            if cfg.n_shared_experts
            else None
        )

    def __call__(self, x: jax.Array, token_mask: jax.Array) -> tuple[jax.Array, moe.MoEStats]:
        """x [B, T, D], token_mask [B, T] bool -> ([B, T, D], this layer's routing counts)."""
        bias = None if self.bias is None else self.bias[...]
        out, stats = moe.routed_experts(
            x,
            token_mask,
            self.router_de[...],
            bias,
            self.gate_edm[...],
            self.up_edm[...],
            self.down_emd[...],
            self.cfg.moe,
        )
        if self.shared is not None:
            out = out + self.shared(x)
        return out, stats


class Block(nnx.Module):
    """Pre-norm layer: x + mla(norm(x)), then x + ffn(norm(x)); ffn dense or MoE by layer index."""

    def __init__(self, cfg: DeepseekConfig, layer: int, *, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.param_dtype, rngs=rngs)
        self.attn = MLAttention(cfg, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.param_dtype, rngs=rngs)
        self.mlp = (
            MoE(cfg, rngs=rngs)
            if cfg.is_moe_layer(layer)
            else MLP(cfg.dense_view(cfg.intermediate_size), rngs=rngs)
        )

    def __call__(
        self,
        x,
        token_mask,
        cos,
        sin,
        mask,
        cache_entry=None,
        prefix_entry=None,
        index=None,
        absorb=False,
    ):
        attn_out, new_entry = self.attn(
            self.input_norm(x), cos, sin, mask, cache_entry, prefix_entry, index, absorb
        )
        x = x + attn_out
        h = self.post_attn_norm(x)
        stats = None
        if isinstance(self.mlp, MoE):
            h, stats = self.mlp(h, token_mask)
        else:
            h = self.mlp(h)
        return sharding.constrain(x + h, ("batch", "seq", "embed")), new_entry, stats


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class DeepseekDecoder(Decoder):
    """DeepSeek-V2/V3 decoder-only language model with the dense decoder's interface.

    Inherited unchanged: `unembedding`, `logits_from_hidden`, the mask helpers. `init_cache` returns
    an `MLACache`; `hidden_states` / `__call__` accept `absorb` (None = absorbed for cached
    single-token steps, naive otherwise; True / False force a path).
    """

    def __init__(self, cfg: DeepseekConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pd = cfg.param_dtype
        self.embed_vd = _param(
            rngs,
            nnx.initializers.normal(0.02),
            (cfg.vocab_size, cfg.hidden_size),
            pd,
            ("vocab", "embed"),
        )
        self.layers = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.unembed_dv = _param(
                rngs,
                nnx.initializers.normal(0.02),
                (cfg.hidden_size, cfg.vocab_size),
                pd,
                ("embed", "vocab"),
            )

    def init_cache(self, batch: int, length: int) -> MLACache:
        """An empty latent cache of `length` slots for `batch` rows (the sampler's entry point)."""
        return MLACache.empty(self.cfg, batch, length)

    def hidden_states_with_router(
        self,
        input_ids,
        attention_mask=None,
        *,
        positions=None,
        cache=None,
        segment_ids=None,
        absorb=None,
    ):
        """The forward pass up to the final norm, plus routing counts.

        input_ids [B, T] int32; attention_mask [B, T] (1 = token, 0 = pad; default all ones);
        positions [B, T] int32 (default from the mask; with a cache, continuing from it);
        segment_ids [B, T] int32 for packed rows (needs positions; not with a cache).
        Returns (hidden [B, T, D], new MLACache or None, RouterStats over the real tokens).
        """
        cfg = self.cfg
        t = input_ids.shape[1]
        x, token_mask, positions, mask, cache = self._prepare_inputs(
            input_ids, attention_mask, positions, cache, segment_ids
        )
        if absorb is None:
            absorb = cache is not None and t == 1
        cos, sin = transformer.rope_tables(cfg.rope_view, positions)
        index = None if cache is None else cache.index

        def block_fn(block, x, entry, prefix):
            return block(x, token_mask, cos, sin, mask, entry, prefix, index, absorb)

        if cfg.remat:
            # jax.checkpoint over a pure function of the block's state: `nnx.remat` would write the
            # non-parameter RouterBias back across trace levels (a TraceContextError under grad).
            plain_fn = block_fn

            def block_fn(block, x, entry, prefix):
                graphdef, state = nnx.split(block)

                def pure(state, *args):
                    return plain_fn(nnx.merge(graphdef, state), *args)

                return jax.checkpoint(pure)(state, x, entry, prefix)

        latents, ropes, loads, dropped = [], [], [], []
        for i, block in enumerate(self.layers):
            entry = prefix = None
            if cache is not None:
                entry = (cache.latent[i], cache.k_rope[i])
                if cache.prefix_latent is not None:
                    prefix = (cache.prefix_latent[i], cache.prefix_k_rope[i])
            x, new_entry, stats = block_fn(block, x, entry, prefix)
            if new_entry is not None:
                latents.append(new_entry[0])
                ropes.append(new_entry[1])
            if stats is not None:
                loads.append(stats.load)
                dropped.append(stats.dropped)
        hidden = self.final_norm(x)
        new_cache = None
        if cache is not None:
            new_cache = cache.replace(
                latent=tuple(latents), k_rope=tuple(ropes), index=cache.index + t
            )
        e = cfg.n_routed_experts
        router = RouterStats(
            load=jnp.stack(loads) if loads else jnp.zeros((0, e), jnp.float32),
            dropped=jnp.stack(dropped) if dropped else jnp.zeros((0,), jnp.float32),
        )
        return hidden, new_cache, router

    def hidden_states(
        self,
        input_ids,
        attention_mask=None,
        *,
        positions=None,
        cache=None,
        segment_ids=None,
        absorb=None,
    ):
        """As `Decoder.hidden_states`: (final-normed hidden [B, T, D], new cache or None)."""
        hidden, new_cache, _ = self.hidden_states_with_router(
            input_ids,
            attention_mask,
            positions=positions,
            cache=cache,
            segment_ids=segment_ids,
            absorb=absorb,
        )
        return hidden, new_cache

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        *,
        positions=None,
        cache=None,
        segment_ids=None,
        absorb=None,
    ):
        """input_ids [B, T] int32 -> float32 logits [B, T, V]; with `cache`, (logits, new cache)."""
        hidden, new_cache = self.hidden_states(
            input_ids,
            attention_mask,
            positions=positions,
            cache=cache,
            segment_ids=segment_ids,
            absorb=absorb,
        )
        logits = self.logits_from_hidden(hidden)
        return logits if cache is None else (logits, new_cache)


def create(cfg: DeepseekConfig, seed: int = 0) -> DeepseekDecoder:
    """A randomly initialised model on the default device (`sharding.create_sharded` for a mesh)."""
    with nnx.use_eager_sharding(False):
        return DeepseekDecoder(cfg, rngs=nnx.Rngs(seed))
