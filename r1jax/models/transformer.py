"""The decoder: one Flax NNX module for the dense families R1 and its distilled models use.

Covers Qwen2 / Qwen2.5 (qkv bias), Llama 3 / 3.1 (llama3 rope scaling), Qwen3 (per-head q/k RMSNorm,
explicit head_dim), Mistral (sliding window); GQA and MQA; RoPE with linear, dynamic-NTK, llama3 and
YaRN scaling; RMSNorm; SwiGLU; tied or untied embeddings. `hf.py` maps Hugging Face configs and
weights onto this module; nothing here knows about files.

Dimension legend (used in einsums, parameter shapes and comments):
  B batch   T query length   S key length   D embed   N q-heads   K kv-heads   G = N // K
  H head_dim   F mlp   V vocab   L layers   P prompts (rows sharing a cache prefix)

Notable choices:
- Parameters carry *logical* axis names (`embed`, `vocab`, `heads`, `kv_heads`, `head_dim`, `mlp`,
  `norm`) as `out_sharding` metadata; `r1jax.sharding` maps them onto mesh axes. No mesh axis names
  appear in this file.
- Positions come from the attention mask (`cumsum(mask) - 1`), so a left-padded row computes exactly
  what the unpadded row would. (HF's plain forward numbers left-padded rows from 0 at the first
  pad.)
- Masked-out scores use the dtype's most negative finite value rather than -inf, so a fully padded
  query row yields a harmless uniform distribution instead of NaN.
- Parameter dtype and compute dtype are separate; norms, softmax and logits are float32.
- Packed training rows (several examples per row) pass `segment_ids`: attention stays inside each
  segment and the caller supplies per-segment positions.
- One `__call__` serves training, prefill and decode: with a `KVCache` it writes the new keys and
  values at `cache.index` and returns `(logits, cache)`. A cache may also carry a read-only *prefix*
  segment shared by the `B // P` rows of each prompt (GRPO's group), which is how the sampler
  decodes G samples per prompt without copying or recomputing the prompt, and how GRPO's
  scoring and training forwards run each prompt once for its G completions
  (`grpo.prompt_forward`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from r1jax import sharding

# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of a dense decoder. Frozen and hashable, so it can be a static jit argument.

    `rope_scaling` is a tuple of (key, value) pairs (hashable) in Hugging Face's `rope_scaling`
    form, e.g. `(("rope_type", "llama3"), ("factor", 8.0), ...)`; `None` means plain RoPE.
    """

    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int  # L
    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int  # H
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: bias on q, k, v projections
    o_bias: bool = False  # Llama `attention_bias=True` also puts a bias on o_proj
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    sliding_window: int | None = None  # Mistral: attend to at most this many most recent keys
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype of matmuls; norms, softmax and logits stay float32
    remat: bool = False  # rematerialise each layer in the backward pass (jax.checkpoint)
    model_type: str = "qwen2"  # Hugging Face family, used when saving config.json

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(
                    f"ModelConfig.{name} must be float32, bfloat16 or float16, "
                    f"got {getattr(self, name)!r}"
                )
        rope_type = self.rope_scaling_dict.get("rope_type", "default")
        if rope_type not in _ROPE_TYPES:
            raise ValueError(
                f"rope_scaling type {rope_type!r} is not supported; "
                f"supported: {sorted(_ROPE_TYPES)}"
            )
        missing = [
            k for k in ROPE_REQUIRED_KEYS[rope_type] if self.rope_scaling_dict.get(k) is None
        ]
        if missing:
            raise ValueError(f"rope_scaling type {rope_type!r} needs {', '.join(missing)}")

    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling or ())

    @property
    def num_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        d, f, n, k, h = (
            self.hidden_size,
            self.intermediate_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
        )
        attn = d * n * h * 2 + d * k * h * 2 + (n * h + 2 * k * h if self.qkv_bias else 0)
        attn += (d if self.o_bias else 0) + (2 * h if self.qk_norm else 0)
        mlp = 3 * d * f + ((2 * f + d) if self.mlp_bias else 0)
        per_layer = attn + mlp + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb + d

    # -- Named configurations (real checkpoints load through hf.load; these are for tests and bench)
    # --

    @classmethod
    def tiny(cls, **kw) -> ModelConfig:
        """WORKLOAD.md 'tiny': Qwen2 architecture, 2.90M parameters."""
        base = dict(
            vocab_size=512,
            hidden_size=256,
            intermediate_size=688,
            num_layers=4,
            num_heads=8,
            num_kv_heads=2,
            head_dim=32,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            qkv_bias=True,
        )
        return cls(**{**base, **kw})

    @classmethod
    def small(cls, **kw) -> ModelConfig:
        """WORKLOAD.md 'small': Qwen2 architecture, 23.2M parameters."""
        base = dict(
            vocab_size=2048,
            hidden_size=512,
            intermediate_size=1376,
            num_layers=8,
            num_heads=8,
            num_kv_heads=2,
            head_dim=64,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            qkv_bias=True,
        )
        return cls(**{**base, **kw})

    @classmethod
    def qwen2p5_1p5b(cls, **kw) -> ModelConfig:
        """Qwen2.5-1.5B, the base of DeepSeek-R1-Distill-Qwen-1.5B."""
        base = dict(
            vocab_size=151936,
            hidden_size=1536,
            intermediate_size=8960,
            num_layers=28,
            num_heads=12,
            num_kv_heads=2,
            head_dim=128,
            max_position_embeddings=131072,
            rope_theta=10000.0,
            tie_word_embeddings=True,
            qkv_bias=True,
        )
        return cls(**{**base, **kw})


# --------------------------------------------------------------------------------------------------
# Rotary position embedding
# --------------------------------------------------------------------------------------------------

_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
# The rope_scaling keys each type cannot do without (transformers' config checks ask the same).
ROPE_REQUIRED_KEYS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
}


def _rope_inv_freq(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """Static inverse frequencies [H/2] and cos/sin scale for every rope type except `dynamic`.

    Mirrors the Hugging Face definitions (`modeling_rope_utils`), computed in float64 then cast.
    """
    dim = cfg.head_dim
    scaling = cfg.rope_scaling_dict
    rope_type = scaling.get("rope_type", "default")
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    attention_factor = 1.0
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        factor, low, high = (
            scaling["factor"],
            scaling["low_freq_factor"],
            scaling["high_freq_factor"],
        )
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        inv_freq = np.where(medium, smoothed, scaled)
    elif rope_type == "yarn":
        inv_freq, attention_factor = _yarn_inv_freq(cfg, scaling)
    return inv_freq.astype(np.float32), float(attention_factor)


def _yarn_inv_freq(cfg: ModelConfig, s: dict[str, Any]) -> tuple[np.ndarray, float]:
    """YaRN (arXiv 2309.00071) as Hugging Face computes it, including DeepSeek's mscale terms."""
    dim, base = cfg.head_dim, cfg.rope_theta
    original = s["original_max_position_embeddings"]
    factor = s["factor"]  # required (hf.rope_from_hf), as transformers' config checks

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attention_factor = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    extrapolation = 1 - ramp
    inv_freq = (1 / (factor * pos_freqs)) * (1 - extrapolation) + (1 / pos_freqs) * extrapolation
    return inv_freq, attention_factor


def rope_tables(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin tables [B, T, H] (float32) for integer positions [B, T]."""
    if cfg.rope_scaling_dict.get("rope_type") == "dynamic":
        # Dynamic NTK grows the base with the longest position seen, as HF does per forward call,
        # but per row: HF takes its batch's longest, so a short prompt beside a long one got
        # other logits (and samples) than alone. Decoding past max_position_embeddings, the
        # cached keys keep the base they were written with (as in HF), so sampled and rescored
        # log-probs of such a row differ.
        dim, s = cfg.head_dim, cfg.rope_scaling_dict
        seq_len = jnp.maximum(
            jnp.max(positions, axis=-1, keepdims=True) + 1, cfg.max_position_embeddings
        ).astype(jnp.float32)  # [B, 1]
        base = cfg.rope_theta * (
            (s["factor"] * seq_len / cfg.max_position_embeddings) - (s["factor"] - 1)
        ) ** (dim / (dim - 2))
        inv_freq = 1.0 / base[..., None] ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
        scale = 1.0
    else:
        inv_freq_np, scale = _rope_inv_freq(cfg)
        inv_freq = jnp.asarray(inv_freq_np)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    # Evaluated once per forward: left to itself, XLA fuses the cos and sin into every layer's
    # rope and evaluates them again per head and layer (bench/NOTES.md, M7). Only the [B, T, H/2]
    # halves are materialised; the duplication into [B, T, H] fuses into the consumers.
    cos, sin = jax.lax.optimization_barrier((jnp.cos(freqs) * scale, jnp.sin(freqs) * scale))
    return jnp.concatenate([cos, cos], axis=-1), jnp.concatenate([sin, sin], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [B, T, N, H] by the tables [B, T, H] (the "rotate half" layout of HF weights)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


# --------------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer, written in place at `index` as tokens arrive.

    - k: L-tuple of [B, K, H, S] per-row key segments.
    - v: L-tuple of [B, K, S, H] per-row value segments. Both attention products are then plain
      [rows, H] x [H, S] and [rows, S] x [S, H] matmuls that read the cache in place (no copy on
      XLA:CPU; bench/NOTES.md, M1 and M6).
    - mask: [B, S] bool, True where a slot holds a real token (left padding and unwritten slots
      False).
    - index: [] int32, the next slot to write (all rows decode in lockstep). A call writes at
      most the slots left (checked in eager calls; under jit the caller sizes the cache).
    - prefix_k / prefix_v: optional L-tuples of [P, K, H, Sp] / [P, K, Sp, H], a read-only segment
      shared by the B // P consecutive rows of each prompt (its prefill), placed before the
      per-row segment.
    - prefix_mask: [P, Sp] bool, or None.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    mask: jax.Array
    index: jax.Array
    prefix_k: tuple[jax.Array, ...] | None = None
    prefix_v: tuple[jax.Array, ...] | None = None
    prefix_mask: jax.Array | None = None

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, length: int, dtype: Any = None) -> KVCache:
        """An all-empty cache for `batch` rows of `length` slots, in the compute dtype."""
        dtype = dtype or cfg.dtype
        k_shape = (batch, cfg.num_kv_heads, cfg.head_dim, length)  # [B, K, H, S]
        v_shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)  # [B, K, S, H]

        # Sharded like the activations: rows over the batch axes, kv-heads over tensor.
        def zeros(shape, names):
            return sharding.constrain(jnp.zeros(shape, dtype), names)

        return cls(
            k=tuple(
                zeros(k_shape, ("batch", "kv_heads", "head_dim", "seq"))
                for _ in range(cfg.num_layers)
            ),
            v=tuple(
                zeros(v_shape, ("batch", "kv_heads", "seq", "head_dim"))
                for _ in range(cfg.num_layers)
            ),
            mask=jnp.zeros((batch, length), bool),
            index=jnp.zeros((), jnp.int32),
        )

    def with_prefix(self, prefix: KVCache) -> KVCache:
        """Attach `prefix` (e.g. a prompt prefill over P rows) as the shared read-only segment."""
        return self.replace(prefix_k=prefix.k, prefix_v=prefix.v, prefix_mask=prefix.mask)

    @property
    def prefix_length(self) -> int:
        return 0 if self.prefix_mask is None else self.prefix_mask.shape[1]


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------


def _param(rngs: nnx.Rngs, init, shape, dtype, axes, *, float32_in_forward=False) -> nnx.Param:
    """A parameter initialised by `init`, annotated with its logical axis names.

    float32_in_forward: the forward reads it in float32 whatever the compute dtype (norm scales,
    the MoE router), so a compute-dtype copy of the weights must leave it as it is
    (`is_float32_in_forward`; `grpo.policy_for_sampling`).
    """
    extra = {"float32_in_forward": True} if float32_in_forward else {}
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=axes, **extra)


def is_float32_in_forward(variable: nnx.Variable) -> bool:
    """Whether the forward reads `variable` in float32 rather than the compute dtype: parameters
    marked so (`_param`) and any state that is not a parameter (e.g. the router's bias)."""
    if not isinstance(variable, nnx.Param):
        return True
    return bool(variable.get_metadata().get("float32_in_forward", False))


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis in float32 (as HF: normalise in f32, scale, cast back)."""

    def __init__(self, dim: int, eps: float, param_dtype, *, rngs: nnx.Rngs):
        self.scale = _param(
            rngs, nnx.initializers.ones, (dim,), param_dtype, ("norm",), float32_in_forward=True
        )
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return (self.scale[...].astype(jnp.float32) * h.astype(x.dtype)).astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query attention with RoPE, optional qkv bias, q/k norm and sliding window."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, n, k, h, pd = (
            cfg.hidden_size,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.param_dtype,
        )
        init = nnx.initializers.normal(0.02)
        self.cfg = cfg
        self.q_dnh = _param(rngs, init, (d, n, h), pd, ("embed", "heads", "head_dim"))
        self.k_dkh = _param(rngs, init, (d, k, h), pd, ("embed", "kv_heads", "head_dim"))
        self.v_dkh = _param(rngs, init, (d, k, h), pd, ("embed", "kv_heads", "head_dim"))
        self.o_nhd = _param(rngs, init, (n, h, d), pd, ("heads", "head_dim", "embed"))
        zeros = nnx.initializers.zeros
        if cfg.qkv_bias or cfg.o_bias:
            self.q_bias = _param(rngs, zeros, (n, h), pd, ("heads", "head_dim"))
            self.k_bias = _param(rngs, zeros, (k, h), pd, ("kv_heads", "head_dim"))
            self.v_bias = _param(rngs, zeros, (k, h), pd, ("kv_heads", "head_dim"))
        if cfg.o_bias:
            self.o_bias = _param(rngs, zeros, (d,), pd, ("norm",))
        if cfg.qk_norm:
            self.q_norm = RMSNorm(h, cfg.rms_norm_eps, pd, rngs=rngs)
            self.k_norm = RMSNorm(h, cfg.rms_norm_eps, pd, rngs=rngs)

    def __call__(self, x, cos, sin, mask, cache_kv=None, prefix_kv=None, index=None):
        """x [B, T, D] -> ([B, T, D], (k, v) of this layer's per-row cache segment or None).

        mask [B, T, Sp + S] bool covers the prefix segment (if any) then the per-row keys.
        """
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        q = jnp.einsum("btd,dnh->btnh", x, self.q_dnh[...].astype(dt))
        k = jnp.einsum("btd,dkh->btkh", x, self.k_dkh[...].astype(dt))
        v = jnp.einsum("btd,dkh->btkh", x, self.v_dkh[...].astype(dt))
        if cfg.qkv_bias or cfg.o_bias:
            q = q + self.q_bias[...].astype(dt)
            k = k + self.k_bias[...].astype(dt)
            v = v + self.v_bias[...].astype(dt)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = sharding.constrain(q, ("batch", "seq", "heads", "head_dim"))

        # Cache layout (see KVCache): keys [B, K, H, S], values [B, K, S, H]. Both attention
        # products then read the cache in place; with [B, S, K, H], XLA:CPU copies (transposes)
        # every layer's whole cache at every decode step.
        k = k.transpose(0, 2, 3, 1)  # [B, K, H, T]
        v = v.transpose(0, 2, 1, 3)  # [B, K, T, H]
        new_kv = None
        if cache_kv is not None:
            ck, cv = cache_kv
            ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, 0, 0, index))
            cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, 0, index, 0))
            new_kv, k, v = (ck, cv), ck.astype(dt), cv.astype(dt)

        b, t, n, h = q.shape
        kh, g = cfg.num_kv_heads, n // cfg.num_kv_heads
        q = q * (1.0 / math.sqrt(h))
        out = _attend(q.reshape(b, t, kh, g, h), k, v, mask, prefix_kv)
        # One plain [B*T, N*H] x [N*H, D] matmul: as a two-axis contraction, XLA:CPU copies the
        # o weight to a new layout at every decode step.
        w_o = self.o_nhd[...].astype(dt).reshape(n * h, -1)
        out = out.reshape(b, t, n * h) @ w_o
        if cfg.o_bias:
            out = out + self.o_bias[...].astype(dt)
        return out, new_kv


def _attend(q, k, v, mask, prefix_kv=None):
    """Attention of T query positions on every path (training, scoring, prefill, decode with
    T = 1, GRPO's completions after a shared prompt forward): q [B, T, K, G, H] (already
    scaled), keys [B, K, H, S], values [B, K, S, H], optionally a prefix segment shared by the
    R = B // P rows of each prompt (keys [P, K, H, Sp], values [P, K, Sp, H]); mask
    [B, T, Sp + S] -> [B, T, K, G, H].

    The G query heads that share a kv-head are stacked as rows ([B, K, G*T, H]; for the prefix,
    the R rows of a prompt too: [P, K, R*G*T, H]), so each product is one plain batched matmul
    over (B, K) or (P, K); in the backward pass XLA:CPU then needs fewer layout copies of the
    scores than with G and T as separate axes (bench/NOTES.md, M4). The two segments' scores are
    never concatenated: one softmax spans both through a shared row maximum and denominator.
    """
    b, t, kh, g, h = q.shape
    s, dt = k.shape[3], q.dtype
    neg = jnp.finfo(jnp.float32).min
    rows = q.transpose(0, 2, 3, 1, 4).reshape(b, kh, g * t, h)
    own = jnp.einsum("bkqh,bkhs->bkqs", rows, k, preferred_element_type=jnp.float32)
    own = jnp.where(mask[:, None, None, :, -s:], own.reshape(b, kh, g, t, s), neg)
    if prefix_kv is None:
        probs = jax.nn.softmax(own, axis=-1).astype(dt).reshape(b, kh, g * t, s)
        out = jnp.einsum("bkqs,bksh->bkqh", probs, v)  # [B, K, G*T, H]
        return out.reshape(b, kh, g, t, h).transpose(0, 3, 1, 2, 4)
    pk, pv = prefix_kv
    p, sp = pk.shape[0], pk.shape[3]
    r = b // p
    prow = q.reshape(p, r, t, kh, g, h).transpose(0, 3, 1, 4, 2, 5).reshape(p, kh, r * g * t, h)
    pre = jnp.einsum("pkqh,pkhs->pkqs", prow, pk.astype(dt), preferred_element_type=jnp.float32)
    pre_mask = mask[..., :sp].reshape(p, 1, r, 1, t, sp)
    pre = jnp.where(pre_mask, pre.reshape(p, kh, r, g, t, sp), neg)  # [P, K, R, G, T, Sp]

    def to_pre(x):  # [B, K, G, T, ...] -> [P, K, R, G, T, ...]
        x = x.reshape(p, r, *x.shape[1:])
        return jnp.swapaxes(x, 1, 2)

    def to_own(x):  # the inverse
        x = jnp.swapaxes(x, 1, 2)
        return x.reshape(b, *x.shape[2:])

    # softmax over [prefix, own] without building it: shared max (no gradient, as in
    # jax.nn.softmax) and denominator; the row statistics are small, so moving them is cheap.
    top = jax.lax.stop_gradient(jnp.maximum(pre.max(-1), to_pre(own.max(-1))))
    e_pre = jnp.exp(pre - top[..., None])
    e_own = jnp.exp(own - to_own(top)[..., None])
    denom = e_pre.sum(-1) + to_pre(e_own.sum(-1))
    p_pre = (e_pre / denom[..., None]).astype(dt).reshape(p, kh, r * g * t, sp)
    p_own = (e_own / to_own(denom)[..., None]).astype(dt).reshape(b, kh, g * t, s)
    out_pre = jnp.einsum("pkqs,pksh->pkqh", p_pre, pv.astype(dt)).reshape(p, kh, r, g, t, h)
    out = to_own(out_pre) + jnp.einsum("bkqs,bksh->bkqh", p_own, v).reshape(b, kh, g, t, h)
    return out.transpose(0, 3, 1, 2, 4)


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f, pd = cfg.hidden_size, cfg.intermediate_size, cfg.param_dtype
        init = nnx.initializers.normal(0.02)
        self.cfg = cfg
        self.gate_df = _param(rngs, init, (d, f), pd, ("embed", "mlp"))
        self.up_df = _param(rngs, init, (d, f), pd, ("embed", "mlp"))
        self.down_fd = _param(rngs, init, (f, d), pd, ("mlp", "embed"))
        if cfg.mlp_bias:
            zeros = nnx.initializers.zeros
            self.gate_bias = _param(rngs, zeros, (f,), pd, ("mlp",))
            self.up_bias = _param(rngs, zeros, (f,), pd, ("mlp",))
            self.down_bias = _param(rngs, zeros, (d,), pd, ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = jnp.dtype(self.cfg.dtype)
        gate = x @ self.gate_df[...].astype(dt)
        up = x @ self.up_df[...].astype(dt)
        if self.cfg.mlp_bias:
            gate, up = gate + self.gate_bias[...].astype(dt), up + self.up_bias[...].astype(dt)
        hidden = sharding.constrain(jax.nn.silu(gate) * up, ("batch", "seq", "mlp"))
        out = hidden @ self.down_fd[...].astype(dt)
        return out + self.down_bias[...].astype(dt) if self.cfg.mlp_bias else out


class Block(nnx.Module):
    """Pre-norm transformer layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.param_dtype, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.param_dtype, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, cos, sin, mask, cache_kv=None, prefix_kv=None, index=None):
        attn_out, new_kv = self.attn(self.input_norm(x), cos, sin, mask, cache_kv, prefix_kv, index)
        x = x + attn_out
        x = x + self.mlp(self.post_attn_norm(x))
        return sharding.constrain(x, ("batch", "seq", "embed")), new_kv


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """[B, T] 0/1 mask -> [B, T] int32 positions counting real tokens only (pads get 0)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


class Decoder(nnx.Module):
    """Decoder-only language model. See the module docstring for the legend and choices."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pd = cfg.param_dtype
        self.embed_vd = _param(
            rngs,
            nnx.initializers.normal(0.02),
            (cfg.vocab_size, cfg.hidden_size),
            pd,
            ("vocab", "embed"),
        )
        self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.unembed_dv = _param(
                rngs,
                nnx.initializers.normal(0.02),
                (cfg.hidden_size, cfg.vocab_size),
                pd,
                ("embed", "vocab"),
            )

    def init_cache(self, batch: int, length: int) -> KVCache:
        """An empty KV cache of `length` slots for `batch` rows (the sampler's entry point, so that
        models with other cache layouts, e.g. MLA's latent cache, plug into the same sampler)."""
        return KVCache.empty(self.cfg, batch, length)

    # -- pieces, public so losses can work from hidden states without materialising [B, T, V] --

    def unembedding(self) -> jax.Array:
        """The output projection [D, V] in the compute dtype."""
        dt = jnp.dtype(self.cfg.dtype)
        w = self.embed_vd[...].T if self.cfg.tie_word_embeddings else self.unembed_dv[...]
        return w.astype(dt)

    def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
        """Final hidden states [B, T, D] -> float32 logits [B, T, V]."""
        logits = jnp.einsum(
            "btd,dv->btv", hidden, self.unembedding(), preferred_element_type=jnp.float32
        )
        return sharding.constrain(logits, ("batch", "seq", "vocab"))

    def _prepare_inputs(self, input_ids, attention_mask, positions, cache, segment_ids):
        """The start of every forward pass (shared with `DeepseekDecoder`): argument checks and
        defaults, the embedded tokens, and the attention mask. Arguments as `hidden_states`.

        Returns (x [B, T, D] embeddings in the compute dtype, token_mask [B, T] bool, positions
        [B, T] int32, mask [B, T, T] (no cache) or [B, T, Sp + S] bool, and the cache with this
        call's slots marked in its mask, or None).
        """
        b, t = input_ids.shape
        if cache is not None and not isinstance(cache.index, jax.core.Tracer):
            # (eager calls; under jit the caller sizes the cache, as the sampler does: a write
            # past its end would overwrite the last slots, dynamic_update_slice clamping it)
            free = cache.mask.shape[1] - int(cache.index)
            if t > free:
                raise ValueError(
                    f"the KV cache has {free} free slots of {cache.mask.shape[1]} and this call "
                    f"writes {t} tokens: make the cache longer"
                )
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("segment_ids (packed sequences) cannot be used with a KV cache")
            if positions is None:
                raise ValueError(
                    "segment_ids needs explicit positions (restarting at 0 for each "
                    "segment, e.g. SFTBatch.positions)"
                )
            if attention_mask is None:
                attention_mask = (segment_ids > 0).astype(jnp.int32)
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        token_mask = attention_mask.astype(bool)
        if positions is None:
            positions = positions_from_mask(attention_mask)
            if cache is not None:  # continue each row's count after the real tokens already cached
                prior = cache.mask.sum(-1, dtype=jnp.int32)
                if cache.prefix_mask is not None:
                    per_prompt = cache.prefix_mask.sum(-1, dtype=jnp.int32)
                    prior += jnp.repeat(per_prompt, b // cache.prefix_mask.shape[0])
                positions = positions + prior[:, None]
        # Padding never reaches the lookup: an id past the embedding (a tokenizer's pad token the
        # embedding was not resized for) gives NaN there, which the masked attention still
        # multiplies by 0 (NaN) into every real token of the row.
        ids = jnp.where(token_mask, input_ids, 0)
        x = jnp.take(self.embed_vd[...], ids, axis=0).astype(jnp.dtype(self.cfg.dtype))
        x = sharding.constrain(x, ("batch", "seq", "embed"))
        if cache is None:
            mask = self._self_mask(token_mask, positions, segment_ids)
            return x, token_mask, positions, mask, None
        cache = cache.replace(
            mask=jax.lax.dynamic_update_slice(cache.mask, token_mask, (0, cache.index))
        )
        return x, token_mask, positions, self._cache_mask(cache, t), cache

    def hidden_states(
        self, input_ids, attention_mask=None, *, positions=None, cache=None, segment_ids=None
    ):
        """Everything but the unembedding: returns final-normed hidden [B, T, D] (and the cache).

        input_ids [B, T] int32; attention_mask [B, T] (1 = token, 0 = pad; default all ones);
        positions [B, T] int32 (default from the mask; with a cache, continue from the cache).
        segment_ids [B, T] int32, optional, for packed sequences: a query attends only to keys of
        its own segment, 0 marks padding (the default mask is then `segment_ids > 0`), and the
        caller passes `positions` restarting at 0 for each segment. Not allowed with a cache.
        """
        cfg = self.cfg
        t = input_ids.shape[1]
        x, _, positions, mask, cache = self._prepare_inputs(
            input_ids, attention_mask, positions, cache, segment_ids
        )
        cos, sin = rope_tables(cfg, positions)
        index = None if cache is None else cache.index
        new_cache = None

        block_fn = lambda block, x, *a: block(x, cos, sin, mask, *a)  # noqa: E731
        if cfg.remat:
            block_fn = nnx.remat(block_fn)
        new_k, new_v = [], []
        for i, block in enumerate(self.layers):
            cache_kv = prefix_kv = None
            if cache is not None:
                cache_kv = (cache.k[i], cache.v[i])
                if cache.prefix_k is not None:
                    prefix_kv = (cache.prefix_k[i], cache.prefix_v[i])
            x, kv = block_fn(block, x, cache_kv, prefix_kv, index)
            if kv is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
        hidden = self.final_norm(x)
        if cache is not None:
            new_cache = cache.replace(k=tuple(new_k), v=tuple(new_v), index=cache.index + t)
        return hidden, new_cache

    def __call__(
        self, input_ids, attention_mask=None, *, positions=None, cache=None, segment_ids=None
    ):
        """input_ids [B, T] int32 -> float32 logits [B, T, V]; with `cache`, (logits, new cache).

        `segment_ids` (packed sequences) as in `hidden_states`.
        """
        hidden, new_cache = self.hidden_states(
            input_ids, attention_mask, positions=positions, cache=cache, segment_ids=segment_ids
        )
        logits = self.logits_from_hidden(hidden)
        return logits if cache is None else (logits, new_cache)

    # -- masks --

    def _window_ok(self, query_pos, key_pos):
        if self.cfg.sliding_window is None:
            return True
        return key_pos > query_pos - self.cfg.sliding_window

    def _self_mask(self, token_mask, positions, segment_ids=None):
        """[B, T, T]: causal over slots, keys must be real tokens, within the sliding window (and,
        for packed rows, in the query's segment)."""
        t = token_mask.shape[1]
        slots = jnp.arange(t)
        causal = slots[None, :, None] >= slots[None, None, :]
        window = self._window_ok(positions[:, :, None], positions[:, None, :])
        mask = causal & token_mask[:, None, :] & window
        if segment_ids is not None:
            mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
        return mask

    def _cache_mask(self, cache: KVCache, t: int):
        """[B, T, Sp + S] for T new tokens at slots index..index+T-1 of the per-row segment."""
        b, s = cache.mask.shape
        sp = cache.prefix_length
        query_slot = sp + cache.index + jnp.arange(t)  # [T], slots counted across both segments
        key_slot = jnp.arange(sp + s)
        key_ok = cache.mask
        if sp:
            key_ok = jnp.concatenate(
                [jnp.repeat(cache.prefix_mask, b // cache.prefix_mask.shape[0], axis=0), key_ok], 1
            )
        causal = key_slot[None, :] <= query_slot[:, None]  # [T, Sp + S]
        window = self._window_ok(query_slot[:, None], key_slot[None, :])
        return causal[None] & window & key_ok[:, None, :]


def create(cfg: ModelConfig, seed: int = 0) -> Decoder:
    """A random model on the default device (`sharding.create_sharded` places one on a mesh)."""
    with nnx.use_eager_sharding(False):
        return Decoder(cfg, rngs=nnx.Rngs(seed))
