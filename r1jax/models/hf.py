"""Hugging Face checkpoints in and out: config.json <-> ModelConfig, safetensors <-> parameters.

`load(path, mesh=None)` reads a local checkpoint folder (config.json plus one `model.safetensors` or
shards listed in `model.safetensors.index.json`) into a `Decoder`. With a mesh, each tensor is
placed with `jax.make_array_from_callback`, and each device's callback reads from the file only the
block of the tensor that device holds, in r1jax layout (`_Blocks`): a host reads its devices' share
of the checkpoint and never holds more than one tensor. `save(model, path)` writes config.json
(through transformers' own config class, so the file is what transformers expects, with the RoPE
keys transformers 4.x reads too) and safetensors shards, streamed one shard at a time, that
`AutoModelForCausalLM.from_pretrained` loads.

Notable choices:
- config.json is parsed strictly: a field that would change the forward pass and that r1jax does not
  implement (a non-silu activation, quantisation, per-layer sliding windows, partial rotary ...) is
  refused with an error naming the field, never silently ignored.
- Tokenizers are not converted: they load from the same folder with `AutoTokenizer` (`tokenizer()`).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from r1jax import sharding
from r1jax.models.transformer import ROPE_REQUIRED_KEYS, Decoder, ModelConfig

log = logging.getLogger(__name__)

_DEEPSEEK_TYPES = ("deepseek_v3", "deepseek_v2")  # MLA + MoE: handled by deepseek_hf.py
SUPPORTED_MODEL_TYPES = ("qwen2", "llama", "mistral", "qwen3") + _DEEPSEEK_TYPES
_ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

# Fields that never change the forward pass of a causal LM.
_METADATA_FIELDS = {
    "architectures",
    "model_type",
    "transformers_version",
    "_attn_implementation_autoset",  # (transformers 4.48-4.50 saved it)
    "torch_dtype",
    "dtype",
    "initializer_range",
    "pretraining_tp",  # (Llama 2's sliced matmuls in transformers 4: the same function)
    "use_cache",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "_name_or_path",
    "tokenizer_class",
    "return_dict",
    "output_attentions",
    "output_hidden_states",
    "id2label",
    "label2id",
    "problem_type",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "max_window_layers",
    "torchscript",
    "tie_encoder_decoder",
    "pruned_heads",
    "finetuning_task",
    "task_specific_params",
    "cross_attention_hidden_size",
    "add_cross_attention",
    "prefix",
    "sep_token_id",
    "decoder_start_token_id",
    "tf_legacy_loss",
    "use_bfloat16",
    "is_decoder",
    "output_scores",
    "return_dict_in_generate",
    "auto_map",
    "use_return_dict",
}
_MODEL_FIELDS = {
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "rms_norm_eps",
    "tie_word_embeddings",
    "hidden_act",
    "attention_bias",
    "mlp_bias",
    "attention_dropout",
    "sliding_window",
    "use_sliding_window",
    "layer_types",
    "use_mrope",  # Qwen2.5 / R1-Distill-Qwen write "use_mrope": false
}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read as asked; the message names what to fix."""


# --------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# --------------------------------------------------------------------------------------------------


def config_from_hf(
    hf: dict[str, Any],
    *,
    param_dtype: str = "float32",
    dtype: str | None = None,
    remat: bool = False,
    where: str = "config.json",
) -> ModelConfig:
    """Translate a Hugging Face config dict into a ModelConfig; refuse what r1jax cannot do."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{where}: model_type {model_type!r} is not supported; r1jax loads "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if model_type in _DEEPSEEK_TYPES:
        from r1jax.models import deepseek_hf

        return deepseek_hf.config_from_hf(
            hf, param_dtype=param_dtype, dtype=dtype, remat=remat, where=where
        )
    unknown = sorted(set(hf) - _METADATA_FIELDS - _MODEL_FIELDS)
    if unknown:
        raise CheckpointError(
            f"{where}: field(s) {unknown} are not supported by r1jax for "
            f"model_type {model_type!r}; remove them if they do not apply"
        )

    def require(cond, field, msg):
        if not cond:
            raise CheckpointError(f"{where}: {field}={hf.get(field)!r} is not supported: {msg}")

    # Fields a config.json leaves out take the values transformers gives them for this family
    # (and from the fields present: e.g. head_dim = hidden_size / heads), so that both read one
    # file as one model (Qwen2 defaults to 32 kv heads and 32768 positions, Mistral to a 4096-token
    # window, Qwen3 to head_dim 128).
    try:
        import transformers

        # a deep copy: transformers writes into the dicts it is given (rope_theta into the
        # caller's rope_scaling)
        fields = copy.deepcopy({k: v for k, v in hf.items() if k != "model_type"})
        full = transformers.AutoConfig.for_model(model_type, **fields)
    except Exception as e:  # noqa: BLE001 -- any failure is the file's
        raise CheckpointError(f"{where}: transformers cannot read it either ({e})") from None

    def get(field, fallback=None):
        value = hf.get(field, getattr(full, field, None))
        return fallback if value is None else value

    require(not hf.get("use_mrope"), "use_mrope", "multimodal (M-RoPE) positions")

    # ("swish" is transformers' other name for SiLU)
    require(
        hf.get("hidden_act", "silu") in ("silu", "swish"), "hidden_act", "only SwiGLU (silu) MLPs"
    )
    require(not hf.get("attention_dropout"), "attention_dropout", "dropout is not implemented")

    rope_theta, rope_scaling = rope_from_hf(hf, where)
    resolved = getattr(full, "rope_parameters", None)  # transformers >= 5: what it will build
    if isinstance(resolved, dict) and "rope_type" in resolved:
        theirs = (resolved.get("rope_type"), float(resolved.get("rope_theta") or 0))
        ours = (dict(rope_scaling or ()).get("rope_type", "default"), rope_theta)
        if theirs != ours:
            raise CheckpointError(
                f"{where}: rope_parameters / rope_scaling / rope_theta disagree: transformers "
                f"reads RoPE as {theirs}, r1jax as {ours}; keep one spelling"
            )

    layer_types = hf.get("layer_types") or []
    require(
        all(t == "full_attention" for t in layer_types)
        or (model_type == "mistral" and all(t == "sliding_attention" for t in layer_types)),
        "layer_types",
        "per-layer sliding windows are not implemented",
    )
    sliding_window = None
    if model_type == "mistral":
        sliding_window = get("sliding_window")
        require(
            sliding_window is None or sliding_window > 0,
            "sliding_window",
            "a window must hold at least the token itself (null: no window)",
        )
        # transformers 5 reads a mistral config with layer_types as Ministral, whose layers
        # follow them (full attention: no window); 4.x windows every layer. Only "sliding"
        # layer types mean one thing to both.
        require(
            sliding_window is None or not layer_types or layer_types[0] == "sliding_attention",
            "layer_types",
            "full-attention layers beside a sliding_window are read as unwindowed by "
            "transformers 5 (as Ministral) and windowed by 4.x; set sliding_window to null or "
            "the layer types to sliding_attention",
        )
    elif get("use_sliding_window") and get("sliding_window") is not None:
        # Qwen windows the layers from max_window_layers on, and only with a sliding_window: a
        # config that sets the flag but windows no layer is full attention. (Read from the
        # fields, as transformers before 4.53 does, which has no resolved `layer_types`.)
        require(
            get("max_window_layers", 0) >= hf["num_hidden_layers"],
            "use_sliding_window",
            "Qwen sliding-window layers are not implemented",
        )

    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
    missing = [f for f in (*required, "num_attention_heads") if hf.get(f) is None]
    if missing:
        raise CheckpointError(f"{where}: required field(s) {missing} are missing")
    heads = hf["num_attention_heads"]
    attention_bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=get("num_key_value_heads", heads),
        head_dim=get("head_dim", hf["hidden_size"] // heads),
        max_position_embeddings=get("max_position_embeddings", 2048),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        rms_norm_eps=get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(get("tie_word_embeddings", False)),
        # As transformers' modeling code reads them: Qwen2 always has q/k/v biases; only Llama and
        # Qwen3 read attention_bias (Mistral ignores it) and only Llama reads mlp_bias.
        qkv_bias=model_type == "qwen2" or (model_type in ("llama", "qwen3") and attention_bias),
        o_bias=model_type in ("llama", "qwen3") and attention_bias,
        mlp_bias=model_type == "llama" and bool(hf.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        sliding_window=sliding_window,
        param_dtype=param_dtype,
        dtype=dtype or param_dtype,
        remat=remat,
        model_type=model_type,
    )


def rope_from_hf(
    hf: dict[str, Any], where: str, default_theta: float = 10000.0
) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """(rope_theta, rope_scaling as sorted (key, value) pairs or None for plain RoPE) from a HF
    config dict, whichever of `rope_parameters` / `rope_scaling` / `rope_theta` (and the old
    `type` key) it uses. Partial rotary embeddings are refused."""

    def spelled(field):  # one spelling's dict with the legacy "type" key as "rope_type"
        d = dict(hf.get(field) or {})
        if any(isinstance(v, dict) for v in d.values()):
            raise CheckpointError(
                f"{where}: {field}={hf.get(field)!r} is not supported: per-layer RoPE parameters"
            )
        if "type" in d:
            legacy = d.pop("type")
            d.setdefault("rope_type", legacy)
        return d

    rope = spelled("rope_parameters")
    rope_theta = rope.pop("rope_theta", hf.get("rope_theta", default_theta))
    # rope_scaling, where given, is what transformers reads: it replaces rope_parameters' type and
    # every parameter of it (a yarn export's beta_fast is not carried into a new block's yarn),
    # and its theta is the top-level rope_theta or the family's default, not rope_parameters'
    scaling = spelled("rope_scaling")
    if scaling:
        rope = scaling
        rope_theta = rope.pop("rope_theta", hf.get("rope_theta", default_theta))
    if not isinstance(rope_theta, int | float) or isinstance(rope_theta, bool) or rope_theta <= 0:
        raise CheckpointError(f"{where}: rope_theta={rope_theta!r} must be a positive number")
    rope_theta = float(rope_theta)
    if rope.pop("partial_rotary_factor", 1.0) != 1.0:
        raise CheckpointError(
            f"{where}: rope_parameters={hf.get('rope_parameters')!r} is not supported: "
            f"partial_rotary_factor != 1"
        )
    rope_type = rope.get("rope_type", "default")
    if rope_type == "default":
        return rope_theta, None
    if rope_type not in ROPE_REQUIRED_KEYS:
        raise CheckpointError(
            f"{where}: rope_type {rope_type!r} is not supported; r1jax implements "
            f"{', '.join(ROPE_REQUIRED_KEYS)}"
        )
    if rope_type in ("llama3", "yarn") and hf.get("max_position_embeddings"):
        # transformers' default when the scaling leaves it out
        rope.setdefault("original_max_position_embeddings", hf["max_position_embeddings"])
    needed = ROPE_REQUIRED_KEYS[rope_type]
    missing = [k for k in needed if rope.get(k) is None]
    if missing:
        raise CheckpointError(f"{where}: rope_type {rope_type!r} needs {', '.join(missing)}")
    # Keys other libraries read and transformers does not: read as transformers reads the config
    # (ignored), said once.
    for key, why in _ROPE_FOREIGN_KEYS.get(rope_type, {}).items():
        if key in rope:
            log.warning(
                "%s: rope_scaling.%s=%r is read as transformers reads it: ignored (%s)",
                where,
                key,
                rope.pop(key),
                why,
            )
    # Any other key r1jax does not read would be ignored silently (a typo): refused, naming it.
    known = {*needed, *_ROPE_OPTIONAL_KEYS.get(rope_type, ())}
    unknown = sorted(set(rope) - known - {"rope_type"})
    if unknown:
        raise CheckpointError(
            f"{where}: rope_type {rope_type!r} does not take {', '.join(unknown)} (r1jax and "
            f"transformers read {', '.join(sorted(known))})"
        )
    return rope_theta, tuple(sorted(rope.items()))


# Keys published configs carry that transformers does not read, and what they mean elsewhere.
_ROPE_FOREIGN_KEYS = {
    "yarn": {
        # (DeepSeek-R1-0528-Qwen3-8B: attn_factor 0.878 with factor 4 makes vLLM's scale 1.0)
        "attn_factor": "vLLM and SGLang multiply YaRN's cos/sin scale by it",
    },
    "dynamic": {
        "original_max_position_embeddings": "dynamic NTK grows from max_position_embeddings",
    },
}
# What each RoPE type reads beyond ROPE_REQUIRED_KEYS (transformers' `_check_received_keys`).
_ROPE_OPTIONAL_KEYS = {
    "yarn": (
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "truncate",
    ),
}


def rope_to_hf(cfg) -> dict[str, Any]:
    """The `rope_parameters` dict transformers expects, from a config's rope_theta and scaling."""
    return {"rope_type": "default", **cfg.rope_scaling_dict, "rope_theta": cfg.rope_theta}


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json dict for `cfg`, produced by transformers' config class for its family."""
    import transformers

    if cfg.qkv_bias != (cfg.model_type == "qwen2") and not cfg.o_bias:
        raise CheckpointError(
            f"model_type {cfg.model_type!r} cannot express qkv_bias={cfg.qkv_bias} "
            f"without o_bias; use model_type 'qwen2' for q/k/v bias only"
        )
    if cfg.qk_norm != (cfg.model_type == "qwen3"):
        raise CheckpointError(f"qk_norm={cfg.qk_norm} requires model_type 'qwen3'")
    # What the family's config has no field for would be dropped by transformers (its weights
    # "unexpected", the window ignored): the saved model would not be this one.
    for option, families in (
        ("mlp_bias", ("llama",)),
        ("o_bias", ("llama", "qwen3")),
        ("sliding_window", ("mistral",)),
    ):
        if getattr(cfg, option) and cfg.model_type not in families:
            raise CheckpointError(
                f"model_type {cfg.model_type!r} cannot express {option}="
                f"{getattr(cfg, option)!r} (only {', '.join(families)} can)"
            )
    kwargs = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        rope_parameters=rope_to_hf(cfg),
        architectures=[_ARCHITECTURES[cfg.model_type]],
        dtype=cfg.param_dtype,
        # not the family's defaults (Llama's 1 and 2): unknown here, `write_generation_metadata`
        # fills them in from the tokenizer or the source checkpoint
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    if cfg.model_type in ("llama", "qwen3"):
        kwargs["attention_bias"] = cfg.o_bias
    if cfg.model_type == "llama":
        kwargs["mlp_bias"] = cfg.mlp_bias
    if cfg.model_type == "mistral":
        kwargs["sliding_window"] = cfg.sliding_window
    hf_cfg = transformers.AutoConfig.for_model(cfg.model_type, **kwargs)
    return with_legacy_rope(hf_cfg.to_diff_dict(), cfg)


def with_legacy_rope(hf_config: dict[str, Any], cfg) -> dict[str, Any]:
    """`hf_config` with RoPE also spelled as `rope_theta` / `rope_scaling`, as hub files spell it:
    transformers 4.x reads only those (without them it takes theta 10000 and no scaling, another
    model), transformers 5 reads either."""
    return {
        **hf_config,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling_dict or None,
    }


# --------------------------------------------------------------------------------------------------
# Parameter names and layouts
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Mapping:
    """How one r1jax parameter relates to one HF tensor: ours = hf.reshape(view).transpose(perm)
    (read block by block by `_Blocks`)."""

    path: tuple  # r1jax nnx state path
    name: str  # HF tensor name
    view: Callable[[ModelConfig], tuple[int, ...]] | None = None
    perm: tuple[int, ...] | None = None

    def to_hf(self, ours: np.ndarray, hf_shape: tuple[int, ...]) -> np.ndarray:
        x = ours.transpose(np.argsort(self.perm)) if self.perm else ours
        return x.reshape(hf_shape)


def _mappings(cfg: ModelConfig) -> list[_Mapping]:
    n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    out = [
        _Mapping(("embed_vd",), "model.embed_tokens.weight"),
        _Mapping(("final_norm", "scale"), "model.norm.weight"),
    ]
    if not cfg.tie_word_embeddings:
        out.append(_Mapping(("unembed_dv",), "lm_head.weight", perm=(1, 0)))
    for i in range(cfg.num_layers):
        pre, hp = ("layers", i), f"model.layers.{i}."
        out += [
            _Mapping(pre + ("input_norm", "scale"), hp + "input_layernorm.weight"),
            _Mapping(pre + ("post_attn_norm", "scale"), hp + "post_attention_layernorm.weight"),
            _Mapping(
                pre + ("attn", "q_dnh"),
                hp + "self_attn.q_proj.weight",
                lambda c: (n, h, d),
                (2, 0, 1),
            ),
            _Mapping(
                pre + ("attn", "k_dkh"),
                hp + "self_attn.k_proj.weight",
                lambda c: (k, h, d),
                (2, 0, 1),
            ),
            _Mapping(
                pre + ("attn", "v_dkh"),
                hp + "self_attn.v_proj.weight",
                lambda c: (k, h, d),
                (2, 0, 1),
            ),
            _Mapping(
                pre + ("attn", "o_nhd"),
                hp + "self_attn.o_proj.weight",
                lambda c: (d, n, h),
                (1, 2, 0),
            ),
            _Mapping(pre + ("mlp", "gate_df"), hp + "mlp.gate_proj.weight", perm=(1, 0)),
            _Mapping(pre + ("mlp", "up_df"), hp + "mlp.up_proj.weight", perm=(1, 0)),
            _Mapping(pre + ("mlp", "down_fd"), hp + "mlp.down_proj.weight", perm=(1, 0)),
        ]
        if cfg.qkv_bias or cfg.o_bias:
            out += [
                _Mapping(pre + ("attn", "q_bias"), hp + "self_attn.q_proj.bias", lambda c: (n, h)),
                _Mapping(pre + ("attn", "k_bias"), hp + "self_attn.k_proj.bias", lambda c: (k, h)),
                _Mapping(pre + ("attn", "v_bias"), hp + "self_attn.v_proj.bias", lambda c: (k, h)),
            ]
        if cfg.o_bias:
            out.append(_Mapping(pre + ("attn", "o_bias"), hp + "self_attn.o_proj.bias"))
        if cfg.qk_norm:
            out += [
                _Mapping(pre + ("attn", "q_norm", "scale"), hp + "self_attn.q_norm.weight"),
                _Mapping(pre + ("attn", "k_norm", "scale"), hp + "self_attn.k_norm.weight"),
            ]
        if cfg.mlp_bias:
            out += [
                _Mapping(pre + ("mlp", "gate_bias"), hp + "mlp.gate_proj.bias"),
                _Mapping(pre + ("mlp", "up_bias"), hp + "mlp.up_proj.bias"),
                _Mapping(pre + ("mlp", "down_bias"), hp + "mlp.down_proj.bias"),
            ]
    return out


# --------------------------------------------------------------------------------------------------
# safetensors files
# --------------------------------------------------------------------------------------------------


class _WeightFiles:
    """The tensors of a checkpoint folder by name, across one file or an index of shards."""

    def __init__(self, path: str):
        from safetensors import safe_open

        if all(os.path.exists(os.path.join(path, n)) for n in (_SINGLE, _INDEX)):
            log.warning(
                "%s holds both %s and %s; reading %s, as transformers does",
                *(path, _SINGLE, _INDEX, _SINGLE),
            )
        files, weight_map = _weight_files(path)
        self._handles = {}
        for name in files:
            file = os.path.join(path, name)
            if not os.path.exists(file):
                raise CheckpointError(f"{file} is listed in the index but missing")
            try:
                self._handles[name] = safe_open(file, framework="numpy")
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise CheckpointError(
                    f"{file} is not a readable safetensors file ({e}); re-download or re-save it"
                ) from e
        if weight_map is None:
            weight_map = {k: files[0] for k in self._handles[files[0]].keys()}
        self.weight_map = weight_map
        self.path = path

    def names(self) -> set[str]:
        return set(self.weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        try:
            return tuple(self._handles[self.weight_map[name]].get_slice(name).get_shape())
        except Exception as e:  # e.g. an index naming the wrong shard for this tensor
            raise CheckpointError(
                f"{os.path.join(self.path, self.weight_map[name])}: tensor {name!r} cannot be "
                f"read ({e}); the file or model.safetensors.index.json is wrong"
            ) from e

    def get(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """The tensor `name`, or only its block `index` (one slice per axis)."""
        file = os.path.join(self.path, self.weight_map[name])
        try:
            handle = self._handles[self.weight_map[name]]
            return handle.get_tensor(name) if index is None else handle.get_slice(name)[index]
        except Exception as e:
            raise CheckpointError(
                f"{file}: tensor {name!r} cannot be read ({e}); the file is "
                f"probably truncated or corrupt"
            ) from e


class _Blocks:
    """One HF tensor seen in our layout (`_Mapping`), read a block at a time: `blocks[index]`
    reads from the file only the rows and columns of that block of ours, so a host of a pod slice
    reads the slices its devices hold rather than every tensor whole. `shape` is ours."""

    def __init__(self, files: _WeightFiles, m: _Mapping, cfg: ModelConfig):
        self.files, self.name = files, m.name
        hf_shape = files.shape(m.name)
        view = tuple(m.view(cfg)) if m.view else hf_shape
        # The view axes each HF axis splits into (a reshape of the HF shape: leading to trailing).
        self.groups, axis = [], 0
        for size in hf_shape:
            group, prod = [axis], view[axis]
            axis += 1
            while prod < size:
                group.append(axis)
                prod *= view[axis]
                axis += 1
            self.groups.append(group)
        self.groups[-1] += list(range(axis, len(view)))  # trailing size-1 axes, if any
        self.view = view
        self.perm = tuple(m.perm) if m.perm else tuple(range(len(view)))
        self.shape = tuple(view[a] for a in self.perm)
        self._read: dict[tuple, np.ndarray] = {}

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        ranges = [range(*sl.indices(n)) for sl, n in zip(index, self.shape, strict=True)]
        key = tuple((r.start, r.stop) for r in ranges)
        if key not in self._read:  # devices holding the same block (replicas) read it once
            view_ranges = [None] * len(self.view)
            for ours, r in enumerate(ranges):
                view_ranges[self.perm[ours]] = r
            # Per HF axis: the rows of its leading view axis, whole in the axes split off it
            # (those are cut after the reshape, so the read stays one contiguous run per axis).
            hf_index, block_shape, inner = [], [], []
            for group in self.groups:
                lead, rest = view_ranges[group[0]], group[1:]
                step = math.prod(self.view[a] for a in rest)
                hf_index.append(slice(lead.start * step, lead.stop * step))
                block_shape += [len(lead), *(self.view[a] for a in rest)]
                inner += [slice(None)] + [
                    slice(view_ranges[a].start, view_ranges[a].stop) for a in rest
                ]
            block = self.files.get(self.name, tuple(hf_index)).reshape(block_shape)
            self._read[key] = block[tuple(inner)].transpose(self.perm)
        return self._read[key]

    def whole(self) -> np.ndarray:
        return self[tuple(slice(None) for _ in self.shape)]


_SINGLE, _INDEX = "model.safetensors", "model.safetensors.index.json"


def _weight_files(path: str) -> tuple[list[str], dict[str, str] | None]:
    """(the safetensors files the weights are read from, the index's {tensor: file} or None for
    one file), as transformers picks them: model.safetensors, else the index's shards."""
    index, single = os.path.join(path, _INDEX), os.path.join(path, _SINGLE)
    if os.path.exists(single):
        return [_SINGLE], None
    if os.path.exists(index):
        with open(index) as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from e
        return sorted(set(weight_map.values())), weight_map
    present = sorted(os.listdir(path))
    hint = (
        " (PyTorch .bin weights are not read; convert them to safetensors)"
        if any(p.endswith(".bin") for p in present)
        else ""
    )
    raise CheckpointError(f"{path}: no {_SINGLE} or {_INDEX} found{hint}; folder holds {present}")


def _check_complete(path: str) -> None:
    """Each safetensors file the weights are read from must be as long as its header says
    (catches truncated downloads; another file, e.g. Mistral's consolidated.safetensors beside
    the shards, may be a git-lfs pointer never pulled)."""
    for name in _weight_files(path)[0]:
        file = os.path.join(path, name)
        if not os.path.exists(file):
            continue  # (named by _WeightFiles: listed in the index but missing)
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{file} is truncated ({size} bytes)")
            header_len = int.from_bytes(head, "little")
            if (
                header_len > size - 8
            ):  # text in place of the weights: a git-lfs pointer, an HTML page
                raise CheckpointError(
                    f"{file} is not a safetensors file (its first bytes {head!r} give a header "
                    f"of {header_len} bytes in a {size}-byte file); a git-lfs pointer? run "
                    f"`git lfs pull` or re-download it"
                )
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{file} has a corrupt header ({e}); re-download it") from e
        end = max(
            (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0
        )
        if size < 8 + header_len + end:
            raise CheckpointError(
                f"{file} is truncated: {size} bytes on disk, header describes "
                f"{8 + header_len + end}; re-download or re-save it"
            )


def check_weight_names(
    path: str, expected: set[str], names: set[str], unused: set[str] = frozenset()
) -> None:
    """Every `expected` tensor is in the folder, and every tensor there is expected or `unused`
    (or a RoPE `inv_freq` buffer, which transformers <= 4.31 saved: computed from the config, as
    transformers does)."""
    missing = sorted(expected - names)
    if missing:
        # (a base model saves no lm_head: an untied config misses that one too)
        prefixed = [n for n in missing if n.startswith("model.")]
        bare = (
            bool(prefixed)
            and set(missing) - set(prefixed) <= {"lm_head.weight"}
            and {n.removeprefix("model.") for n in prefixed} <= names
        )
        raise CheckpointError(
            f"{path}: weights {missing[:5]}{'...' if len(missing) > 5 else ''} "
            f"are missing ({len(missing)} in all) for the architecture in config.json"
            + (
                "; the folder holds them without the 'model.' prefix, as a base model "
                "(e.g. Qwen2Model) saves them: save the *ForCausalLM model instead"
                if bare
                else ""
            )
        )
    unused = set(unused) | {n for n in names if n.endswith(".rotary_emb.inv_freq")}
    extra = sorted(names - expected - unused)
    if extra:
        raise CheckpointError(
            f"{path}: weights {extra[:5]} are not used by the architecture in "
            f"config.json ({len(extra)} in all); config and weights disagree"
        )


def place(host, var: nnx.Variable, mesh: Mesh | None, rules=None, dtype=None) -> jax.Array:
    """A host array (or `_Blocks`, read block by block) as the value of the (abstract) variable
    `var`, converted to `dtype` if given: on the default device, or in the sharding its logical
    names give on `mesh` (each device receives, and a `_Blocks` reads, only its own slice)."""

    def block(index):
        x = np.asarray(host[index])
        return x.astype(dtype) if dtype is not None else x

    if mesh is None:
        return jnp.asarray(block(tuple(slice(None) for _ in var.shape)))
    names = var.get_metadata().get("out_sharding")
    shard = sharding.logical_sharding(names, var.shape, mesh, rules)
    return jax.make_array_from_callback(var.shape, shard, block)


def write_files(
    path: str,
    hf_config: dict[str, Any],
    tensors: list[tuple[list[tuple[str, int]], Callable[[], list[np.ndarray]]]],
    max_shard_bytes: int,
) -> None:
    """Write config.json and the tensors as model.safetensors, or as shards of at most
    `max_shard_bytes` plus model.safetensors.index.json; stale weight files are removed first.

    `tensors`: in file order, `(names with their byte sizes, make)` groups; `make()` returns the
    group's arrays. Every process calls every `make` (their gathers are collective); only process
    0 keeps what they return and writes, holding at most one shard (plus one group) at a time, so
    exporting a model never needs host memory for all of it.
    """
    from safetensors.numpy import save_file

    if "dtype" in hf_config:  # (transformers 4.x reads the dtype as `torch_dtype` only)
        hf_config = {**hf_config, "torch_dtype": hf_config["dtype"]}
    plan, size = [[]], 0  # names per shard, cut as the sizes add up
    for names, _ in tensors:
        for name, nbytes in names:
            if plan[-1] and size + nbytes > max_shard_bytes:
                plan.append([])
                size = 0
            plan[-1].append(name)
            size += nbytes
    files = (
        ["model.safetensors"]
        if len(plan) == 1
        else [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    )
    shard_of = {name: i for i, names in enumerate(plan) for name in names}
    writer = jax.process_index() == 0
    if writer:
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)
        for stale in os.listdir(path):
            if stale.startswith("model") and (
                stale.endswith(".safetensors") or stale.endswith(".safetensors.index.json")
            ):
                os.remove(os.path.join(path, stale))
    pending: dict[int, dict[str, np.ndarray]] = {}
    for names, make in tensors:
        arrays = make()
        if not writer:
            continue
        for (name, _), array in zip(names, arrays, strict=True):
            shard = pending.setdefault(shard_of[name], {})
            shard[name] = array
            if len(shard) == len(plan[shard_of[name]]):  # complete: write it and let it go
                i = shard_of[name]
                target = os.path.join(path, files[i])
                save_file(pending.pop(i), target, metadata={"format": "pt"})
                if (mask := _umask()) is not None:  # (safetensors writes 0600)
                    os.chmod(target, 0o666 & ~mask)
    if writer and len(plan) > 1:
        total = sum(nbytes for names, _ in tensors for _, nbytes in names)
        weight_map = {name: files[shard_of[name]] for name in shard_of}
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


# --------------------------------------------------------------------------------------------------
# load / save
# --------------------------------------------------------------------------------------------------


def _umask() -> int | None:
    """The process's umask, read without setting it (os.umask would change it for a moment, under
    other threads writing files); None where /proc does not say (the files keep 0600)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        return None


def read_config(path: str) -> dict[str, Any]:
    """The raw config.json dict of a checkpoint folder (clear errors for a missing folder/file)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint folder {path!r} does not exist")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise CheckpointError(
            f"{path!r} has no config.json; is it a Hugging Face checkpoint folder?"
        )
    try:
        with open(cfg_path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_path} holds a JSON {type(raw).__name__}, not a config object")
    return raw


def load(
    path: str,
    mesh: Mesh | None = None,
    *,
    param_dtype: str = "float32",
    dtype: str | None = None,
    remat: bool = False,
    rules=None,
    **deepseek_options,
) -> Decoder:
    """Load a local HF checkpoint folder into a Decoder.

    path:         folder with config.json and safetensors weights (single file or index + shards)
    mesh:         place each parameter straight into its sharding on this mesh (None: default
    device) param_dtype:  storage dtype of the parameters ("float32" default, or "bfloat16") dtype:
    compute dtype (default = param_dtype) rules:        logical-axis rules (default
    `sharding.RULES`) deepseek_options: for DeepSeek-V2/V3 checkpoints only, see `deepseek_hf.load`
    """
    if read_config(path).get("model_type") in _DEEPSEEK_TYPES:
        from r1jax.models import deepseek_hf

        return deepseek_hf.load(
            path,
            mesh,
            param_dtype=param_dtype,
            dtype=dtype,
            remat=remat,
            rules=rules,
            **deepseek_options,
        )
    if deepseek_options:
        raise TypeError(f"load: {sorted(deepseek_options)} only apply to DeepSeek checkpoints")
    cfg = config_from_hf(
        read_config(path),
        param_dtype=param_dtype,
        dtype=dtype,
        remat=remat,
        where=os.path.join(path, "config.json"),
    )
    if cfg.tie_word_embeddings:
        _check_tied_head(path)
    return load_weights(
        path,
        lambda: Decoder(cfg, rngs=nnx.Rngs(0)),
        _mappings(cfg),
        cfg,
        mesh=mesh,
        param_dtype=param_dtype,
        rules=rules,
        unused=("lm_head.weight",),  # tied models may still store lm_head
    )


def _check_tied_head(path: str, rows: int = 4096) -> None:
    """A tied config whose weights also hold an lm_head.weight must hold the embedding there
    (transformers 5 leaves a different one untied: another model than r1jax's). Compared a block
    of rows at a time."""
    files = _WeightFiles(path)
    head, embed = "lm_head.weight", "model.embed_tokens.weight"
    if head not in files.names() or embed not in files.names():
        return
    if files.shape(head) != files.shape(embed):
        raise CheckpointError(
            f"{path}: tie_word_embeddings is true but {head} has shape "
            f"{files.shape(head)}, {embed} {files.shape(embed)}"
        )
    vocab = files.shape(embed)[0]
    for start in range(0, vocab, rows):
        block = (slice(start, min(start + rows, vocab)), slice(None))
        if not np.array_equal(files.get(head, block), files.get(embed, block)):
            raise CheckpointError(
                f"{path}: config.json ties the embeddings (tie_word_embeddings=true) but {head} "
                f"differs from {embed}; transformers leaves them untied: set "
                f"tie_word_embeddings to false"
            )


def load_weights(
    path: str,
    build: Callable[[], nnx.Module],
    mappings: list[_Mapping],
    cfg: ModelConfig,
    *,
    mesh: Mesh | None = None,
    param_dtype: str = "float32",
    rules=None,
    unused: tuple[str, ...] = (),
) -> nnx.Module:
    """Fill every parameter of the module `build()` makes from the safetensors in `path`.

    The loader behind `load`, open to modules that wrap the decoder with another head (the
    reward model's scalar `score`, `r1jax.rewards.reward_model`): `mappings` names the HF tensor
    of every parameter (paths relative to the module `build` returns). A tensor of the folder
    that no mapping names is an error unless listed in `unused`; each tensor is read, converted
    and placed one at a time (into its sharding on `mesh` when given).
    """
    _check_complete(path)
    files = _WeightFiles(path)

    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(build)
    graphdef, abstract_state = nnx.split(abstract)
    target = {path_: v for path_, v in nnx.to_flat_state(abstract_state)}
    unmapped = sorted(set(target) - {m.path for m in mappings}, key=str)
    if unmapped:
        raise ValueError(f"load_weights: parameters {unmapped[:5]} have no tensor mapping")

    check_weight_names(path, {m.name for m in mappings}, files.names(), set(unused))
    if mesh is not None:
        sharding.check_mesh(mesh)
        sharding.warn_undivided(abstract_state, mesh, rules)

    leaves = {}
    for m in mappings:
        var = target[m.path]
        blocks = _checked(files, m, cfg)
        if blocks.shape != var.shape:
            raise CheckpointError(
                f"{path}: {m.name} has shape {files.shape(m.name)}, which does "
                f"not match config.json (expected {_hf_shape(m, cfg, var.shape)})"
            )
        leaves[m.path] = place(blocks, var, mesh, rules, jnp.dtype(param_dtype))
    state = nnx.from_flat_state([(p, target[p].replace(leaves[p])) for p in target])
    return nnx.merge(graphdef, state)


def _checked(files: _WeightFiles, m: _Mapping, cfg: ModelConfig) -> _Blocks:
    shape = files.shape(m.name)
    # Exact, not the element count: a tensor stored [in, out] has the right count and the wrong
    # layout. (Tensors without a view are checked against the parameter's shape by the caller.)
    want = _hf_shape(m, cfg, ()) if m.view else shape
    if shape != want:
        raise CheckpointError(
            f"{files.path}: {m.name} has shape {shape}, which does not match "
            f"config.json (expected {want})"
        )
    return _Blocks(files, m, cfg)


def save(
    model: Decoder, path: str, *, max_shard_bytes: int = 5 * 1024**3, dtype: str | None = None
) -> None:
    """Write `model` as a Hugging Face checkpoint folder (config.json + safetensors [+ index]).

    Shards above `max_shard_bytes`. `dtype` converts on the way out (default: the parameter dtype).
    In multi-process runs every process must call this (gathers are collective); process 0 writes.
    """
    if model.cfg.model_type in _DEEPSEEK_TYPES:
        from r1jax.models import deepseek_hf

        return deepseek_hf.save(model, path, max_shard_bytes=max_shard_bytes, dtype=dtype)
    save_weights(
        model,
        path,
        _mappings(model.cfg),
        config_to_hf(model.cfg),
        max_shard_bytes=max_shard_bytes,
        dtype=dtype,
    )


def save_weights(
    model: nnx.Module,
    path: str,
    mappings: list[_Mapping],
    hf_config: dict[str, Any],
    *,
    max_shard_bytes: int = 5 * 1024**3,
    dtype: str | None = None,
) -> None:
    """Write `hf_config` as config.json and the `mappings` tensors of `model` as safetensors.

    The writer behind `save`, for modules that wrap the decoder (see `load_weights`); `model.cfg`
    is the decoder's ModelConfig (tensor layouts, default dtype).
    """
    cfg = model.cfg
    if "://" in os.fspath(path):  # os.makedirs("gs://b/x") would write a local ./gs:/b/x
        raise ValueError(
            f"save_weights: {path!r} is not a local folder; use checkpoint.export_hf for a "
            f"cloud URI"
        )
    os.makedirs(path, exist_ok=True)
    state = {p: v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    out_dtype = jnp.dtype(dtype or cfg.param_dtype)
    hf_config = {**hf_config, "dtype": out_dtype.name}  # what transformers loads the model as

    def group(m: _Mapping):
        hf_shape = _hf_shape(m, cfg, state[m.path].shape)
        nbytes = math.prod(hf_shape) * out_dtype.itemsize

        def make():
            ours = sharding.to_host(state[m.path][...]).astype(out_dtype)
            return [np.ascontiguousarray(m.to_hf(ours, hf_shape))]

        return [(m.name, nbytes)], make

    write_files(path, hf_config, [group(m) for m in mappings], max_shard_bytes)


def _hf_shape(m: _Mapping, cfg: ModelConfig, ours_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor shape for one of our parameters (inverse of the `_Mapping`'s layout change)."""
    if m.view is None:
        return tuple(ours_shape[i] for i in np.argsort(m.perm)) if m.perm else ours_shape
    view = m.view(cfg)
    if m.name.endswith("o_proj.weight"):
        return (view[0], view[1] * view[2])
    if m.name.endswith(".bias"):
        return (math.prod(view),)
    return (view[0] * view[1], view[2])


_TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def generation_metadata(source: str | None = None, tokenizer=None) -> dict[str, Any]:
    """What a serving stack reads besides the weights, for `write_generation_metadata`: the bos /
    eos / pad ids (transformers' `generate` and vLLM stop at the eos; without it a Llama 3 export
    stops at token 2 and a Qwen one never), the generation config, and the dtype the weights were
    stored in (a bfloat16 model trained in float32 goes back out as bfloat16, not twice the size).

    Taken from `source`, the HF folder the weights were loaded from (its config.json ids, e.g.
    Llama 3.1's three eos ids, and its generation_config.json with R1-Distill's temperature 0.6 and
    top-p 0.95), else from `tokenizer`. Read before anything is written: an export may go over its
    own source.
    """
    ids = {k: getattr(tokenizer, k, None) for k in _TOKEN_ID_FIELDS}
    generation = dtype = None
    if source and os.path.exists(os.path.join(source, "config.json")):
        raw = read_config(source)
        known = {k: v for k, v in raw.items() if k in _TOKEN_ID_FIELDS}
        ids.update({k: v for k, v in known.items() if v is not None})
        dtype = raw.get("dtype") or raw.get("torch_dtype")
        dtype = dtype if dtype in ("float32", "bfloat16", "float16") else None
    if source and os.path.exists(os.path.join(source, "generation_config.json")):
        with open(os.path.join(source, "generation_config.json")) as f:
            generation = json.load(f)
    ids = {k: v for k, v in ids.items() if v is not None}
    return {"ids": ids, "generation_config": generation, "dtype": dtype}


def with_eos_ids(metadata: dict[str, Any], eos_ids: Sequence[int]) -> dict[str, Any]:
    """`generation_metadata(...)` with `eos_ids` added to its eos_token_id (an int, or a list
    when there are several, as Llama 3.1 and Qwen2.5-Instruct ship it), in the ids and in the
    generation config alike."""

    def merged(value) -> int | list[int] | None:
        ids = [] if value is None else [value] if isinstance(value, int) else list(value)
        ids += [int(i) for i in eos_ids if int(i) not in ids]
        return ids[0] if len(ids) == 1 else ids or None

    if not eos_ids:
        return metadata
    ids = {**metadata["ids"], "eos_token_id": merged(metadata["ids"].get("eos_token_id"))}
    generation = metadata["generation_config"]
    if generation is not None:
        eos = merged(generation.get("eos_token_id", metadata["ids"].get("eos_token_id")))
        generation = {**generation, "eos_token_id": eos}
    return {**metadata, "ids": ids, "generation_config": generation}


def write_generation_metadata(path: str, metadata: dict[str, Any]) -> None:
    """Add `generation_metadata(...)` to the checkpoint folder `path`: the ids into its config.json,
    and a generation_config.json (the source's, else one with the ids). Process 0 writes."""
    import transformers

    if jax.process_index() != 0:
        return
    config_file = os.path.join(path, "config.json")
    with open(config_file) as f:
        config = json.load(f)
    with open(config_file, "w") as f:
        json.dump({**config, **metadata["ids"]}, f, indent=2, sort_keys=True)
    if metadata["generation_config"] is not None:
        with open(os.path.join(path, "generation_config.json"), "w") as f:
            json.dump(metadata["generation_config"], f, indent=2, sort_keys=True)
    elif metadata["ids"]:
        transformers.GenerationConfig(**metadata["ids"]).save_pretrained(path)


def tokenizer(path: str):
    """The tokenizer stored beside the weights, loaded with transformers from local files only."""
    import transformers

    try:
        tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # (OSError, ValueError, huggingface_hub's StrictDataclassError ...)
        raise CheckpointError(f"{path}: no usable tokenizer files ({e})") from e
    file = os.path.join(path, "tokenizer.json")
    config = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(file) and os.path.isfile(config) and hasattr(tok, "backend_tokenizer"):
        # transformers 5 builds some families' tokenizers with their own normalizer and
        # pre-tokenizer, whatever tokenizer.json says (qwen2 as Qwen2Tokenizer: NFC and Qwen's
        # regex, which split the toy base's text unlike its pretraining did; LlamaTokenizer
        # folders without SentencePiece's dummy-prefix normaliser): a folder is read as its file
        # says, as the model was trained and as transformers 4.x and `tokenizers` read it. (Real
        # Qwen2.5 folders land here too, for a `trim_offsets` flag that changes no ids.)
        import tokenizers

        want = json.loads(tokenizers.Tokenizer.from_file(file).to_str())
        have = json.loads(tok.backend_tokenizer.to_str())
        if any(want.get(k) != have.get(k) for k in ("normalizer", "pre_tokenizer")):
            tok = transformers.PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    if not tok("a", add_special_tokens=False)["input_ids"]:  # (every text would be no tokens)
        raise CheckpointError(
            f"{path}: the tokenizer files hold no vocabulary ({len(tok)} tokens; is tokenizer.json "
            "missing?)"
        )
    return tok
