"""Hugging Face checkpoints of DeepSeek-V2 / V3 (`model_type` deepseek_v2, deepseek_v3) in and out.

`hf.load` and `hf.save` dispatch here on the model type; the file handling (safetensors shards,
index, truncation checks) is `hf.py`'s. This module owns config.json <-> `DeepseekConfig` and the
tensor layout changes, including stacking the per-expert tensors
(`mlp.experts.{j}.gate_proj.weight`, the layout DeepSeek publishes and transformers writes) into
[E, D, M] arrays.

Notable choices:
- Missing config fields take transformers' own defaults for the family (read from its config
  class), so a hand-written config.json means what it means to transformers.
- Fields that change the forward pass and are not implemented are refused with the field named:
  quantisation (the FP8 release of V3/R1 must be converted to bf16 first), attention or MLP biases,
  `moe_layer_freq` != 1, a V2 config with `norm_topk_prob: true` (transformers ignores it while
  DeepSeek's code normalises, so there is no single right answer to match).
  Training-only fields (`aux_loss_alpha`, `seq_aux`, `ep_size`, ...) are accepted and ignored.
- Multi-token-prediction weights (`model.layers.{num_hidden_layers}.*` and beyond, as in the V3/R1
  release) are not part of the model: `load` skips them with a warning naming how many tensors and
  bytes (or refuses with `mtp="error"`); `save` writes none and sets `num_nextn_predict_layers: 0`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from r1jax import sharding
from r1jax.models import hf
from r1jax.models.deepseek import DeepseekConfig, DeepseekDecoder
from r1jax.models.hf import CheckpointError

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v2")
_ARCHITECTURES = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM"}

_MODEL_FIELDS = {
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "n_shared_experts",
    "n_routed_experts",
    "routed_scaling_factor",
    "kv_lora_rank",
    "q_lora_rank",
    "qk_rope_head_dim",
    "v_head_dim",
    "qk_nope_head_dim",
    "qk_head_dim",
    "head_dim",
    "n_group",
    "topk_group",
    "num_experts_per_tok",
    "first_k_dense_replace",
    "norm_topk_prob",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "rope_interleave",
    "attention_bias",
    "attention_dropout",
    "pretraining_tp",
    "mlp_bias",
    "topk_method",
    "scoring_func",
    "moe_layer_freq",
    "num_nextn_predict_layers",
    "num_mtp_layers",
}
# Fields of DeepSeek's own config.json files that only matter for training losses or deployment.
# (The auxiliary balance losses they set are not applied: stages/common.py, model.router_bias_rate.)
_TRAINING_ONLY_FIELDS = {
    "aux_loss_alpha",
    "seq_aux",
    "ep_size",
    "output_router_logits",
    "router_aux_loss_coef",
}


# --------------------------------------------------------------------------------------------------
# config.json <-> DeepseekConfig
# --------------------------------------------------------------------------------------------------


def config_from_hf(
    raw: dict[str, Any],
    *,
    param_dtype: str = "float32",
    dtype: str | None = None,
    remat: bool = False,
    capacity_factor: float | None = None,
    router_bias_rate: float = 0.0,
    where: str = "config.json",
) -> DeepseekConfig:
    """Translate a Hugging Face DeepSeek config dict into a DeepseekConfig, refusing what r1jax
    does not implement. `capacity_factor` (None = dropless routed experts) and
    `router_bias_rate` (load-balancing bias updates, 0 = off) are r1jax's own."""
    import transformers

    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{where}: model_type {model_type!r} is not a DeepSeek-V2/V3 type "
            f"({', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if "quantization_config" in raw:
        raise CheckpointError(
            f"{where}: quantization_config {raw['quantization_config']!r} is not supported: "
            f"convert the FP8 block-quantised weights to bfloat16 first (e.g. DeepSeek's "
            f"fp8_cast_bf16.py) and drop quantization_config"
        )
    unknown = sorted(set(raw) - hf._METADATA_FIELDS - _MODEL_FIELDS - _TRAINING_ONLY_FIELDS)
    if model_type == "deepseek_v2":
        unknown += ["rope_interleave"] if "rope_interleave" in raw else []
    if unknown:
        raise CheckpointError(
            f"{where}: field(s) {sorted(unknown)} are not supported by r1jax for "
            f"model_type {model_type!r}; remove them if they do not apply"
        )
    defaults = transformers.AutoConfig.for_model(model_type)

    def get(field):
        value = raw.get(field)
        return getattr(defaults, field, None) if value is None and field not in raw else value

    def require(cond, field, msg):
        if not cond:
            raise CheckpointError(f"{where}: {field}={raw.get(field)!r} is not supported: {msg}")

    def need(field):  # a size the model cannot be built without (missing: the family default)
        value = get(field)
        if value is None:
            raise CheckpointError(f"{where}: {field} is null; it needs a value")
        return value

    for field in ("n_group", "topk_group"):  # null: no groups (1); 0 is no routing at all
        require(raw.get(field) is None or raw[field] >= 1, field, "must be >= 1 (or null)")
    heads = need("num_attention_heads")
    rope_dim, nope_dim = need("qk_rope_head_dim"), need("qk_nope_head_dim")
    require(get("hidden_act") == "silu", "hidden_act", "only SwiGLU (silu) MLPs")
    require(not get("attention_dropout"), "attention_dropout", "dropout is not implemented")
    require(get("pretraining_tp") in (None, 1), "pretraining_tp", "must be 1")
    require(
        not get("attention_bias"),
        "attention_bias",
        "MLA projections with biases are not implemented (no DeepSeek release uses them)",
    )
    require(not raw.get("mlp_bias"), "mlp_bias", "MLP biases are not implemented")
    require(
        (get("n_shared_experts") or 0) >= 1,
        "n_shared_experts",
        "MoE layers without a shared expert are not implemented (every DeepSeek release has one)",
    )
    require(
        raw.get("num_key_value_heads") in (None, heads),
        "num_key_value_heads",
        "MLA expands the latent to every head; it must equal num_attention_heads",
    )
    require(raw.get("head_dim") in (None, rope_dim), "head_dim", "must equal qk_rope_head_dim")
    require(
        raw.get("qk_head_dim") in (None, rope_dim + nope_dim),
        "qk_head_dim",
        "must equal qk_nope_head_dim + qk_rope_head_dim",
    )
    require(
        raw.get("moe_layer_freq", 1) == 1,
        "moe_layer_freq",
        "every layer after first_k_dense_replace is MoE in r1jax (as in transformers)",
    )
    if model_type == "deepseek_v3":
        require(
            raw.get("scoring_func", "sigmoid") == "sigmoid",
            "scoring_func",
            "DeepSeek-V3 routes with sigmoid scores",
        )
        require(
            raw.get("topk_method", "noaux_tc") == "noaux_tc",
            "topk_method",
            "DeepSeek-V3 routes with noaux_tc",
        )
        scoring, topk_method, interleave = "sigmoid", "noaux_tc", bool(get("rope_interleave"))
        norm_topk = bool(get("norm_topk_prob"))
    else:
        require(
            raw.get("scoring_func", "softmax") == "softmax",
            "scoring_func",
            "DeepSeek-V2 routes with softmax scores",
        )
        topk_method = get("topk_method") or "greedy"
        require(
            topk_method in ("greedy", "group_limited_greedy"),
            "topk_method",
            "DeepSeek-V2 uses greedy or group_limited_greedy",
        )
        require(
            not raw.get("norm_topk_prob"),
            "norm_topk_prob",
            "transformers' DeepSeek-V2 ignores it but DeepSeek's code normalises the top-k "
            "weights; set it to false (as every released V2 checkpoint does)",
        )
        scoring, interleave, norm_topk = "softmax", True, False
    if get("num_experts_per_tok") is None:
        raise CheckpointError(f"{where}: num_experts_per_tok is required")

    default_theta = (defaults.rope_parameters or {}).get("rope_theta", 10000.0)
    rope_theta, rope_scaling = hf.rope_from_hf(raw, where, default_theta)

    try:
        return DeepseekConfig(
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            intermediate_size=need("intermediate_size"),
            moe_intermediate_size=need("moe_intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            q_lora_rank=get("q_lora_rank"),
            kv_lora_rank=need("kv_lora_rank"),
            qk_nope_head_dim=nope_dim,
            qk_rope_head_dim=rope_dim,
            v_head_dim=need("v_head_dim"),
            n_routed_experts=need("n_routed_experts"),
            n_shared_experts=get("n_shared_experts"),
            num_experts_per_tok=need("num_experts_per_tok"),
            first_k_dense_replace=need("first_k_dense_replace"),
            scoring_func=scoring,
            topk_method=topk_method,
            n_group=get("n_group") or 1,
            topk_group=get("topk_group") or 1,
            norm_topk_prob=norm_topk,
            routed_scaling_factor=float(need("routed_scaling_factor")),
            capacity_factor=capacity_factor,
            router_bias_rate=router_bias_rate,
            rope_interleave=interleave,
            max_position_embeddings=need("max_position_embeddings"),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            rms_norm_eps=need("rms_norm_eps"),
            tie_word_embeddings=bool(get("tie_word_embeddings")),
            param_dtype=param_dtype,
            dtype=dtype or param_dtype,
            remat=remat,
            model_type=model_type,
        )
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from e


def config_to_hf(cfg: DeepseekConfig) -> dict[str, Any]:
    """The config.json dict for `cfg`, produced by transformers' config class for its family."""
    import transformers

    if cfg.n_shared_experts < 1:
        raise CheckpointError("transformers' DeepSeek models need n_shared_experts >= 1")
    v3 = cfg.model_type == "deepseek_v3"
    if v3 != (cfg.topk_method == "noaux_tc"):
        raise CheckpointError(
            f"model_type {cfg.model_type!r} cannot express topk_method {cfg.topk_method!r}"
        )
    if not v3 and (cfg.norm_topk_prob or not cfg.rope_interleave):
        raise CheckpointError(
            "deepseek_v2 in transformers cannot express norm_topk_prob=True or "
            "rope_interleave=False"
        )
    kwargs = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        moe_intermediate_size=cfg.moe_intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        n_shared_experts=cfg.n_shared_experts,
        n_routed_experts=cfg.n_routed_experts,
        routed_scaling_factor=cfg.routed_scaling_factor,
        kv_lora_rank=cfg.kv_lora_rank,
        q_lora_rank=cfg.q_lora_rank,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim,
        qk_nope_head_dim=cfg.qk_nope_head_dim,
        n_group=cfg.n_group,
        topk_group=cfg.topk_group,
        num_experts_per_tok=cfg.num_experts_per_tok,
        first_k_dense_replace=cfg.first_k_dense_replace,
        norm_topk_prob=cfg.norm_topk_prob,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        rope_parameters=hf.rope_to_hf(cfg),
        architectures=[_ARCHITECTURES[cfg.model_type]],
        dtype=cfg.param_dtype,
        # not the family's defaults (Llama's 1 and 2): unknown here, `write_generation_metadata`
        # fills them in from the tokenizer or the source checkpoint
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    if v3:
        kwargs.update(rope_interleave=cfg.rope_interleave, num_nextn_predict_layers=0)
    else:
        kwargs.update(topk_method=cfg.topk_method)
    hf_config = transformers.AutoConfig.for_model(cfg.model_type, **kwargs).to_diff_dict()
    if v3:  # not fields of transformers' class (dropped above), but what vLLM and DeepSeek's own
        # code route by: without them they would score with softmax and no bias
        hf_config.update(topk_method=cfg.topk_method, scoring_func=cfg.scoring_func)
    return hf.with_legacy_rope(hf_config, cfg)


# --------------------------------------------------------------------------------------------------
# Tensor names and layouts
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One r1jax variable and the HF tensor(s) it is made of. One tensor: ours =
    hf.reshape(view(cfg)).transpose(perm), as an `hf._Mapping` (read block by block); several
    (`experts`): E tensors [out, in] stacked as ours [E, in, out]. `to_hf` inverts either."""

    path: tuple  # nnx flat-state path
    names: tuple[str, ...]  # HF tensor names (one, or one per expert)
    to_hf: Callable[[np.ndarray], list[np.ndarray]]
    view: Callable[[DeepseekConfig], tuple[int, ...]] | None = None
    perm: tuple[int, ...] | None = None
    experts: bool = False

    def blocks(self, files: hf._WeightFiles, cfg: DeepseekConfig):
        """A reader of this variable's blocks (`reader[index]`, `reader.shape`), for `hf.place`."""
        if self.experts:
            return _ExpertBlocks(files, self.names)
        return hf._checked(files, hf._Mapping(self.path, self.names[0], self.view, self.perm), cfg)


class _ExpertBlocks:
    """E routed-expert tensors [out, in] seen as ours [E, in, out], read a block at a time: a
    device holding experts e0:e1 (the expert axis) reads only those experts' files, and only the
    rows and columns of its block of each."""

    def __init__(self, files: hf._WeightFiles, names: tuple[str, ...]):
        shapes = {files.shape(name) for name in names}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise CheckpointError(
                f"{files.path}: the experts {names[0]} ... {names[-1]} must be 2-D and of one "
                f"shape, found shapes {sorted(shapes)}"
            )
        out, inner = shapes.pop()
        self.name = names[0]
        self.experts = [
            hf._Blocks(files, hf._Mapping((), name, perm=(1, 0)), None) for name in names
        ]
        self.shape = (len(names), inner, out)

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        experts, block = index[0], index[1:]
        return np.stack([self.experts[e][block] for e in range(*experts.indices(self.shape[0]))])


def _same(path, name) -> _Tensor:
    return _Tensor(path, (name,), lambda x: [x])


def _transposed(path, name) -> _Tensor:  # nn.Linear [out, in] <-> ours [in, out]
    return _Tensor(path, (name,), lambda x: [x.T], perm=(1, 0))


def _heads_out(path, name, n, h, x) -> _Tensor:  # HF [N*h, X] <-> ours [X, N, h]
    return _Tensor(
        path,
        (name,),
        lambda ours: [ours.transpose(1, 2, 0).reshape(n * h, x)],
        view=lambda c: (n, h, x),
        perm=(2, 0, 1),
    )


def _heads_in(path, name, n, v, d) -> _Tensor:  # HF o_proj [D, N*V] <-> ours [N, V, D]
    return _Tensor(
        path,
        (name,),
        lambda ours: [ours.transpose(2, 0, 1).reshape(d, n * v)],
        view=lambda c: (d, n, v),
        perm=(1, 2, 0),
    )


def _stacked(path, names) -> _Tensor:  # E tensors [out, in] <-> ours [E, in, out]
    return _Tensor(path, tuple(names), lambda ours: [w.T for w in ours], experts=True)


def _tensors(cfg: DeepseekConfig) -> list[_Tensor]:
    n, h, d = cfg.num_heads, cfg.qk_head_dim, cfg.hidden_size
    out = [
        _same(("embed_vd",), "model.embed_tokens.weight"),
        _same(("final_norm", "scale"), "model.norm.weight"),
    ]
    if not cfg.tie_word_embeddings:
        out.append(_transposed(("unembed_dv",), "lm_head.weight"))
    for i in range(cfg.num_layers):
        pre, hp = ("layers", i), f"model.layers.{i}."
        at, ha = pre + ("attn",), hp + "self_attn."
        out += [
            _same(pre + ("input_norm", "scale"), hp + "input_layernorm.weight"),
            _same(pre + ("post_attn_norm", "scale"), hp + "post_attention_layernorm.weight"),
            _transposed(at + ("kv_a_dc",), ha + "kv_a_proj_with_mqa.weight"),
            _same(at + ("kv_norm", "scale"), ha + "kv_a_layernorm.weight"),
            _heads_out(
                at + ("kv_b_cnh",),
                ha + "kv_b_proj.weight",
                n,
                cfg.qk_nope_head_dim + cfg.v_head_dim,
                cfg.kv_lora_rank,
            ),
            _heads_in(at + ("o_nvd",), ha + "o_proj.weight", n, cfg.v_head_dim, d),
        ]
        if cfg.q_lora_rank:
            out += [
                _transposed(at + ("q_a_dq",), ha + "q_a_proj.weight"),
                _same(at + ("q_norm", "scale"), ha + "q_a_layernorm.weight"),
                _heads_out(at + ("q_b_qnh",), ha + "q_b_proj.weight", n, h, cfg.q_lora_rank),
            ]
        else:
            out.append(_heads_out(at + ("q_dnh",), ha + "q_proj.weight", n, h, d))
        ml, hm = pre + ("mlp",), hp + "mlp."
        if not cfg.is_moe_layer(i):
            out += [
                _transposed(ml + ("gate_df",), hm + "gate_proj.weight"),
                _transposed(ml + ("up_df",), hm + "up_proj.weight"),
                _transposed(ml + ("down_fd",), hm + "down_proj.weight"),
            ]
            continue
        experts = range(cfg.n_routed_experts)
        out += [
            _transposed(ml + ("router_de",), hm + "gate.weight"),
            _stacked(ml + ("gate_edm",), [f"{hm}experts.{j}.gate_proj.weight" for j in experts]),
            _stacked(ml + ("up_edm",), [f"{hm}experts.{j}.up_proj.weight" for j in experts]),
            _stacked(ml + ("down_emd",), [f"{hm}experts.{j}.down_proj.weight" for j in experts]),
            _transposed(ml + ("shared", "gate_df"), hm + "shared_experts.gate_proj.weight"),
            _transposed(ml + ("shared", "up_df"), hm + "shared_experts.up_proj.weight"),
            _transposed(ml + ("shared", "down_fd"), hm + "shared_experts.down_proj.weight"),
        ]
        if cfg.topk_method == "noaux_tc":
            out.append(_same(ml + ("bias",), hm + "gate.e_score_correction_bias"))
    return out


def _mtp_names(names: set[str], num_layers: int) -> list[str]:
    """Tensors of layers numbered num_layers and above: DeepSeek's multi-token prediction."""
    pattern = re.compile(r"model\.layers\.(\d+)\.")
    return sorted(k for k in names if (m := pattern.match(k)) and int(m.group(1)) >= num_layers)


# --------------------------------------------------------------------------------------------------
# load / save
# --------------------------------------------------------------------------------------------------


def load(
    path: str,
    mesh: Mesh | None = None,
    *,
    param_dtype: str = "float32",
    dtype: str | None = None,
    remat: bool = False,
    rules=None,
    capacity_factor: float | None = None,
    router_bias_rate: float = 0.0,
    mtp: str = "skip",
) -> DeepseekDecoder:
    """Load a local DeepSeek-V2/V3 HF checkpoint folder into a DeepseekDecoder.

    Arguments as `hf.load`, plus `capacity_factor` (routed-expert capacity, None = dropless),
    `router_bias_rate` (gamma of the load-balancing bias updates the trainers apply after each
    optimizer step; 0 = off) and `mtp`: "skip" (log and ignore multi-token-prediction weights)
    or "error" (refuse them).
    The score-correction bias stays float32 whatever `param_dtype` is.
    """
    if mtp not in ("skip", "error"):
        raise ValueError(f"mtp must be 'skip' or 'error', got {mtp!r}")
    cfg = config_from_hf(
        hf.read_config(path),
        param_dtype=param_dtype,
        dtype=dtype,
        remat=remat,
        capacity_factor=capacity_factor,
        router_bias_rate=router_bias_rate,
        where=os.path.join(path, "config.json"),
    )
    hf._check_complete(path)
    if cfg.tie_word_embeddings:
        hf._check_tied_head(path)  # (a stored lm_head.weight must be the embedding)
    files = hf._WeightFiles(path)

    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: DeepseekDecoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    target = {p: v for p, v in nnx.to_flat_state(abstract_state)}

    tensors = _tensors(cfg)
    expected = {name for t in tensors for name in t.names}
    names = files.names()
    mtp_names = _mtp_names(names - expected, cfg.num_layers)
    hf.check_weight_names(path, expected, names, set(mtp_names) | {"lm_head.weight"})
    if mtp_names:
        size = sum(int(np.prod(files.shape(k))) for k in mtp_names)
        if mtp == "error":
            raise CheckpointError(
                f"{path}: holds {len(mtp_names)} multi-token-prediction tensors "
                f"(model.layers.{cfg.num_layers}.* ...), refused by mtp='error'"
            )
        log.warning(
            "%s: skipping %d multi-token-prediction tensors (%s ..., %.3g M values): "
            "r1jax does not implement MTP modules; sampling and GRPO do not use them",
            path,
            len(mtp_names),
            mtp_names[0],
            size / 1e6,
        )

    if mesh is not None:
        sharding.check_mesh(mesh)
        sharding.warn_undivided(abstract_state, mesh, rules)
    leaves = {}
    for t in tensors:  # each device's block read from the files (a host reads its devices' share)
        var = target[t.path]
        blocks = t.blocks(files, cfg)
        if blocks.shape != var.shape:
            raise CheckpointError(
                f"{path}: {t.names[0]} has shape {files.shape(t.names[0])}, which does not match "
                f"config.json (expected {var.shape} after layout change)"
            )
        # The bias keeps float32; parameters take param_dtype.
        leaves[t.path] = hf.place(blocks, var, mesh, rules, var.dtype)
    state = nnx.from_flat_state([(p, target[p].replace(leaves[p])) for p in target])
    return nnx.merge(graphdef, state)


def save(
    model: DeepseekDecoder,
    path: str,
    *,
    max_shard_bytes: int = 5 * 1024**3,
    dtype: str | None = None,
) -> None:
    """Write `model` as a transformers-loadable DeepSeek checkpoint folder (as `hf.save`).

    Routed experts are written one tensor per expert (the published layout). The router and its
    score-correction bias are written in float32, as they are trained and as transformers keeps
    them (rounded to bfloat16, the router picked other experts for ~2% of tokens at V3's size).
    """
    cfg = model.cfg
    os.makedirs(path, exist_ok=True)
    state = {p: v for p, v in nnx.to_flat_state(nnx.state(model))}
    out_dtype = jnp.dtype(dtype or cfg.param_dtype)

    def group(t: _Tensor):
        kept = t.path[-1] in ("bias", "router_de")  # (`_keep_in_fp32_modules_strict` in HF)
        kind = np.dtype(np.float32) if kept else np.dtype(out_dtype)
        each = math.prod(state[t.path].shape) * kind.itemsize // len(t.names)  # experts: equal

        def make():
            ours = sharding.to_host(state[t.path][...]).astype(kind)
            return [np.ascontiguousarray(x) for x in t.to_hf(ours)]

        return [(name, each) for name in t.names], make

    groups = [group(t) for t in _tensors(cfg)]
    hf_config = {**config_to_hf(cfg), "dtype": out_dtype.name}  # what transformers loads it as
    hf.write_files(path, hf_config, groups, max_shard_bytes)
