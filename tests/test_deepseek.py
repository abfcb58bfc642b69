"""DeepSeek-V2/V3 (MLA + DeepSeekMoE) against transformers, the latent cache against recomputation,
expert parallelism against one device, routing/dispatch against float64 numpy, load balancing."""

import contextlib
import copy
import dataclasses
import functools
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import (
    VOCAB,
    assert_a_stored_head_must_equal_the_embedding,
    left_padded_batch,
    load_counting_reads,
    random_blocks,
    scratch_dir,
)

from r1jax import grpo, moe, sampling, sft, sharding, train
from r1jax.data.batching import pack_sft_ids
from r1jax.models import deepseek, deepseek_hf, hf
from r1jax.models.deepseek import DeepseekConfig, MLACache

# Tiny checkpoints built by transformers. YaRN with mscale terms in two of them, so the rope and
# softmax-scale corrections are exercised; routers get larger weights than HF's init (and V3 a
# random score-correction bias) so routing decisions are far from ties.
_YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32, rope_theta=1e4)
KINDS = {
    "v3": (
        "deepseek_v3",
        dict(
            rope_parameters={**_YARN, "mscale": 1.0, "mscale_all_dim": 1.0},
            routed_scaling_factor=2.5,
        ),
    ),
    "v2": (
        "deepseek_v2",
        dict(
            rope_parameters={**_YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
            topk_method="group_limited_greedy",
            # Not 1e-6: the latent norms keep HF's fixed 1e-6 whatever rms_norm_eps says.
            rms_norm_eps=1e-2,
        ),
    ),
    "v2_lite": (
        "deepseek_v2",
        dict(q_lora_rank=None, n_group=1, topk_group=1, topk_method="greedy", n_shared_experts=2),
    ),
    # One MoE layer and nothing else: small compiles for the expert-parallel gradient test.
    "v3_moe_only": ("deepseek_v3", dict(num_hidden_layers=1, first_k_dense_replace=0)),
}
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [40, 41, 42, 43, 44], [1, 2]]


def batch():
    """The one [4, 12] left-padded batch every full forward here uses (one compile per model)."""
    return left_padded_batch(batch=4, length=12, pads=(0, 3, 7, 1))


def hf_config(kind: str, **overrides):
    import transformers

    model_type, spec = KINDS[kind]
    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=8,
        kv_lora_rank=32,
        q_lora_rank=48,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        n_group=2,
        topk_group=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
    )
    return transformers.AutoConfig.for_model(model_type, **{**base, **spec, **overrides})


@functools.cache
def checkpoint(kind: str) -> str:
    """A saved random transformers checkpoint of `kind` (built once per session)."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(kind)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.3)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)
    path = os.path.join(scratch_dir(f"ds_{kind}_"), "ckpt")
    model.save_pretrained(path)
    return path


@functools.cache
def torch_model(path: str):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def torch_logits(path, ids, mask):
    import torch

    pos = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        return torch_model(path)(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            position_ids=torch.tensor(pos),
        ).logits.numpy()


@functools.cache
def model(kind: str):
    return hf.load(checkpoint(kind))


@functools.cache
def forward(kind: str):
    """A jitted forward for models of `kind`: (state, ids, mask) -> (logits, RouterStats)."""
    graphdef, _ = nnx.split(model(kind))

    @jax.jit
    def forward_fn(state, ids, mask):
        mdl = nnx.merge(graphdef, state)
        hidden, _, stats = mdl.hidden_states_with_router(ids, mask)
        return mdl.logits_from_hidden(hidden), stats

    return forward_fn


# --------------------------------------------------------------------------------------------------
# Parity with transformers
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["v2", "v2_lite", "v3"])
def test_logits_match_transformers_with_left_padding(kind):
    m = model(kind)
    assert isinstance(m, deepseek.DeepseekDecoder)
    assert (m.cfg.q_lora_rank is None) == (kind == "v2_lite")
    ids, mask = batch()
    ours, stats = forward(kind)(nnx.state(m), jnp.asarray(ids), jnp.asarray(mask))
    ours = np.asarray(ours)
    ref = torch_logits(checkpoint(kind), ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=0)
    # Routing counts cover exactly the real tokens: K assignments each, in the one MoE layer.
    assert stats.load.shape == (1, 8)
    assert float(stats.load.sum()) == 2 * real.sum() and float(stats.dropped.sum()) == 0
    if kind == "v3":  # the score-correction bias really steers the choice (the test can fail)
        state = jax.tree.map(lambda a: a, nnx.state(m))  # a copy: the cached model stays as is
        state["layers"][1]["mlp"]["bias"][...] = jnp.zeros((8,))
        unbiased, _ = forward(kind)(state, jnp.asarray(ids), jnp.asarray(mask))
        assert np.abs(np.asarray(unbiased) - ours)[real].max() > 1e-2


# --------------------------------------------------------------------------------------------------
# The latent cache: sampler, absorbed vs naive, full recomputation, transformers generate
# --------------------------------------------------------------------------------------------------


def test_cache_holds_latent_not_keys_and_values():
    cfg = model("v3").cfg
    cache = model("v3").init_cache(2, 5)
    assert isinstance(cache, MLACache) and len(cache.latent) == cfg.num_layers
    assert cache.latent[0].shape == (2, 5, cfg.kv_lora_rank)
    with pytest.raises(ValueError, match="has 5 free slots of 5 and this call writes 6"):
        model("v3")(jnp.ones((2, 6), jnp.int32), cache=cache)  # (past the end: refused)
    assert cache.k_rope[0].shape == (2, 5, cfg.qk_rope_head_dim)
    full_kv = cfg.num_heads * (cfg.qk_head_dim + cfg.v_head_dim) * 4 * cfg.num_layers
    assert cache.bytes_per_token == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4 * cfg.num_layers
    assert cache.bytes_per_token * 3 < full_kv


def test_greedy_decode_matches_full_recomputation_and_transformers():
    import torch

    m, new = model("v3"), 5
    # Decode in two phases (the latent cache grown from 2 slots to 5 on the way).
    out = sampling.generate(
        m, PROMPTS, max_new_tokens=new, temperature=0.0, num_samples=2, first_window=2
    )
    assert out.tokens[0::2] == out.tokens[1::2]  # the G rows sharing one prefill agree
    tokens = out.tokens[0::2]
    # One sample per prompt: the prefill copied into the front of the cache, grown once as well.
    one = sampling.generate(m, PROMPTS, max_new_tokens=new, temperature=0.0, first_window=2)
    assert one.tokens == tokens
    assert len({tuple(t) for t in tokens}) == len(PROMPTS)

    # Full recomputation of all prompts at every step, right-padded to the shared [4, 12] shape
    # (causal attention: pads after the last real token cannot affect it).
    seqs = [list(p) for p in PROMPTS]
    for _ in range(new):
        ids = np.zeros((4, 12), np.int32)
        mask = np.zeros((4, 12), np.int32)
        for i, seq in enumerate(seqs):
            ids[i, : len(seq)], mask[i, : len(seq)] = seq, 1
        logits, _ = forward("v3")(nnx.state(m), jnp.asarray(ids), jnp.asarray(mask))
        for i, seq in enumerate(seqs):
            seq.append(int(jnp.argmax(logits[i, len(seq) - 1])))
    tm = torch_model(checkpoint("v3"))
    for prompt, ours, seq in zip(PROMPTS, tokens, seqs, strict=True):
        assert ours == seq[len(prompt) :]
        ref = tm.generate(
            torch.tensor([prompt]),
            do_sample=False,
            max_new_tokens=new,
            min_new_tokens=new,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
        assert ours == ref


def test_absorbed_decode_equals_naive_and_full_forward():
    m = model("v3")
    graphdef, state = nnx.split(m)
    ids, mask = left_padded_batch(batch=2, length=10, pads=(0, 4))
    g, steps = 2, 2
    rng = np.random.RandomState(1)
    new_tokens = rng.randint(0, VOCAB, size=(2 * g, steps)).astype(np.int32)

    @jax.jit
    def decode(state, ids, mask, new_tokens):
        """Prefill 2 prompts once, then decode G=2 rows each over the shared prefix, both ways."""
        mdl = nnx.merge(graphdef, state)
        _, prefill = mdl(ids, mask, cache=mdl.init_cache(2, ids.shape[1]))
        results = []
        for absorb in (True, False):

            def step(cache, token, absorb=absorb):
                logits, cache = mdl(
                    token[:, None], jnp.ones((2 * g, 1), jnp.int32), cache=cache, absorb=absorb
                )
                return cache, logits[:, 0]

            cache = mdl.init_cache(2 * g, steps).with_prefix(prefill)
            cache, logits = jax.lax.scan(step, cache, new_tokens.T)
            results.append((logits.transpose(1, 0, 2), cache))
        return results

    (absorbed, cache_a), (naive, cache_n) = decode(state, ids, mask, new_tokens)
    np.testing.assert_allclose(np.asarray(absorbed), np.asarray(naive), atol=1e-5, rtol=0)
    np.testing.assert_allclose(
        np.asarray(cache_a.latent[1]), np.asarray(cache_n.latent[1]), atol=1e-6
    )
    assert np.abs(np.asarray(cache_a.latent[1])).max() > 0  # decode wrote its latents
    full_ids = np.concatenate([np.repeat(ids, g, 0), new_tokens], 1)  # [4, 12]
    full_mask = np.concatenate([np.repeat(mask, g, 0), np.ones_like(new_tokens)], 1)
    full, _ = forward("v3")(state, jnp.asarray(full_ids), jnp.asarray(full_mask))
    np.testing.assert_allclose(
        np.asarray(absorbed), np.asarray(full)[:, -steps:], atol=1e-4, rtol=0
    )


# --------------------------------------------------------------------------------------------------
# Expert parallelism
# --------------------------------------------------------------------------------------------------


def _loss_and_grads(m, ids, mask, mesh=None):
    """Mean next-token cross-entropy over real tokens, and its gradient w.r.t. the parameters."""
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)

    def loss(params, ids, mask):
        logits = nnx.merge(graphdef, params, rest)(ids, attention_mask=mask)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        nll = -jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
        w = (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
        return jnp.sum(nll * w) / jnp.sum(w), logits

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    if mesh is None:
        return step(params, jnp.asarray(ids), jnp.asarray(mask))
    # 4 rows do not divide over fsdp x expert = 8: the rules fall back to rows over fsdp only, so
    # each expert rank routes its own share of rows that are replicated over `expert`.
    rows = sharding.logical_sharding(("batch", None), ids.shape, mesh)
    assert rows.spec == jax.sharding.PartitionSpec("fsdp", None)
    with jax.set_mesh(mesh):
        return step(params, jax.device_put(ids, rows), jax.device_put(mask, rows))


@pytest.mark.parametrize("kind", ["v3", "v2_lite"])
def test_tensors_are_read_block_by_block_in_our_layout(kind):
    """Each variable's reader gives, for random blocks, the same block of the HF tensor(s) put in
    our layout (spelled here: reshape + transpose of one tensor, or the experts' transposes
    stacked), so a device reads only its block, also of the stacked routed experts."""
    path = checkpoint(kind)
    cfg = deepseek_hf.config_from_hf(hf.read_config(path))
    files = hf._WeightFiles(path)
    rng = np.random.default_rng(0)
    for t in deepseek_hf._tensors(cfg):
        if t.experts:
            whole = np.stack([files.get(name).T for name in t.names])
        else:
            whole = files.get(t.names[0])
            whole = whole.reshape(t.view(cfg)) if t.view else whole
            whole = whole.transpose(t.perm) if t.perm else whole
        blocks = t.blocks(files, cfg)
        assert blocks.shape == whole.shape, t.names[0]
        for index in random_blocks(whole.shape, rng):
            np.testing.assert_array_equal(blocks[index], whole[index], err_msg=f"{t.names[0]}")


def test_an_expert_parallel_load_reads_each_device_block_of_the_experts(monkeypatch):
    """On fsdp=2 x expert=4, a device holding 2 of the 8 routed experts reads only those two
    experts' tensors, and only its half of their rows: each expert file is read as two halves,
    never whole (every host used to read every expert of every layer)."""
    path = checkpoint("v3_moe_only")
    _, read = load_counting_reads(monkeypatch, path, sharding.make_mesh(fsdp=2, expert=4))
    whole = 32 * 64  # one expert's gate_proj [M=32, D=64]
    for e in range(8):
        sizes = [
            size
            for name, size in read
            if name == f"model.layers.0.mlp.experts.{e}.gate_proj.weight"
        ]
        assert sorted(sizes) == [whole // 2, whole // 2], (e, sizes)


def test_expert_parallel_forward_and_gradient_equal_single_device():
    path = checkpoint("v3_moe_only")
    ids, mask = batch()
    # The single-device reference also rematerialises its layers: remat must not change anything.
    (loss1, logits1), grads1 = _loss_and_grads(hf.load(path, remat=True), ids, mask)

    mesh = sharding.make_mesh(fsdp=2, expert=4)
    m = hf.load(path, mesh=mesh)
    gate = m.layers[0].mlp.gate_edm[...]  # [E=8, D=64, M=32]: experts over `expert`, D over fsdp
    assert gate.sharding.spec == jax.sharding.PartitionSpec("expert", "fsdp", None)
    assert gate.addressable_shards[0].data.shape == (2, 32, 32)
    (loss8, logits8), grads8 = _loss_and_grads(m, ids, mask, mesh)

    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(logits8)[real], np.asarray(logits1)[real], atol=1e-5)
    np.testing.assert_allclose(float(loss8), float(loss1), rtol=1e-6)
    flat1, flat8 = dict(nnx.to_flat_state(grads1)), dict(nnx.to_flat_state(grads8))
    assert flat1.keys() == flat8.keys()
    for path_, g1 in flat1.items():
        g1, g8 = np.asarray(g1[...]), np.asarray(flat8[path_][...])
        np.testing.assert_allclose(g8, g1, atol=1e-6, rtol=1e-4, err_msg=str(path_))
    router_grad = np.asarray(flat1[("layers", 0, "mlp", "router_de")][...])
    assert np.abs(router_grad).max() > 0  # the router is trained through the routed weights


# --------------------------------------------------------------------------------------------------
# Routing, capacity and drops against float64 numpy
# --------------------------------------------------------------------------------------------------


def _np_route(x, w, bias, cfg):
    """DeepSeek routing written out per token in float64."""
    logits = x.astype(np.float64) @ w.astype(np.float64)
    e, per = cfg.num_experts, cfg.num_experts // cfg.n_group
    experts, weights = [], []
    for row in logits:
        if cfg.scoring == "sigmoid":
            scores = 1 / (1 + np.exp(-row))
            choice = scores + bias
            groups = [
                np.sort(choice[g * per : (g + 1) * per])[-2:].sum() for g in range(cfg.n_group)
            ]
        else:
            scores = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
            choice = scores.copy()
            groups = [choice[g * per : (g + 1) * per].max() for g in range(cfg.n_group)]
        if cfg.topk_method != "greedy":
            keep = np.argsort(groups)[::-1][: cfg.topk_group]
            allowed = np.zeros(e, bool)
            for g in keep:
                allowed[g * per : (g + 1) * per] = True
            choice = np.where(allowed, choice, -np.inf)
        top = np.argsort(choice)[::-1][: cfg.top_k]
        wt = scores[top]
        if cfg.norm_topk_prob:
            wt = wt / wt.sum()
        experts.append(top)
        weights.append(wt * cfg.routed_scaling_factor)
    return np.array(experts), np.array(weights)


@pytest.mark.parametrize("kind", ["v3", "v2"])
def test_routing_and_capacity_drops_match_numpy(kind):
    rng = np.random.RandomState(0)
    t, d, e, f = 40, 16, 8, 12
    if kind == "v3":
        cfg = moe.MoEConfig(
            num_experts=e,
            top_k=3,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            capacity_factor=0.6,
        )
    else:
        cfg = moe.MoEConfig(
            num_experts=e,
            top_k=2,
            scoring="softmax",
            topk_method="group_limited_greedy",
            n_group=2,
            topk_group=1,
            norm_topk_prob=False,
            capacity_factor=0.6,
        )
    x = rng.randn(t, d).astype(np.float32)
    router = rng.randn(d, e).astype(np.float32)
    bias = (0.3 * rng.randn(e)).astype(np.float32)
    gate, up = rng.randn(2, e, d, f).astype(np.float32) * 0.3
    down = rng.randn(e, f, d).astype(np.float32) * 0.3
    valid = np.ones(t, bool)
    valid[[3, 17]] = False  # padding: never dispatched, never counted

    ref_experts, ref_weights = _np_route(x, router, bias, cfg)
    experts, weights = jax.jit(moe.route, static_argnums=3)(x, router, bias, cfg)
    order = np.argsort(np.asarray(experts), -1)  # top_k order is irrelevant to the output
    np.testing.assert_array_equal(
        np.take_along_axis(np.asarray(experts), order, -1), np.sort(ref_experts, -1)
    )
    np.testing.assert_allclose(
        np.take_along_axis(np.asarray(weights), order, -1),
        np.take_along_axis(ref_weights, np.argsort(ref_experts, -1), -1),
        rtol=1e-5,
    )

    # Capacity: the first `cap` assignments to an expert, in token order, are kept.
    cap = cfg.capacity(t)
    assert cap == int(np.ceil(0.6 * t * cfg.top_k / e))
    ref = np.zeros((t, d))
    used, dropped, load = np.zeros(e, int), 0, np.zeros(e)
    for i in range(t):
        for j in range(cfg.top_k):
            if not valid[i]:
                continue
            k = ref_experts[i, j]
            load[k] += 1
            if used[k] >= cap:
                dropped += 1
                continue
            used[k] += 1
            xi = x[i].astype(np.float64)
            g, u = xi @ gate[k], xi @ up[k]
            ref[i] += ref_weights[i, j] * ((g / (1 + np.exp(-g)) * u) @ down[k])
    out, stats = jax.jit(moe.routed_experts, static_argnums=7)(
        x[None], valid[None], router, bias, gate, up, down, cfg
    )
    assert dropped > 0  # the capacity binds, so drop accounting is really tested
    np.testing.assert_allclose(np.asarray(out[0]), ref, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(stats.load), load)
    assert float(stats.dropped) == dropped


# --------------------------------------------------------------------------------------------------
# Auxiliary-loss-free load balancing
# --------------------------------------------------------------------------------------------------


def test_load_balancing_bias_moves_load_toward_uniform():
    # A skewed toy router: every token carries a constant feature that experts 0 and 1 read.
    rng = np.random.RandomState(0)
    t, d, e = 256, 16, 8
    x = rng.randn(t, d).astype(np.float32)
    x[:, 0] = 1.0
    router = 0.3 * rng.randn(d, e).astype(np.float32)
    router[0, :2] += 1.5
    cfg = moe.MoEConfig(num_experts=e, top_k=2, n_group=2, topk_group=1)

    @jax.jit
    def load(bias):
        experts, _ = moe.route(jnp.asarray(x), jnp.asarray(router), bias, cfg)
        return jnp.zeros(e).at[experts.reshape(-1)].add(1.0)

    bias, ratios = jnp.zeros(e), []
    for _ in range(30):
        counts = load(bias)
        ratios.append(float(counts.max() / counts.mean()))
        bias = moe.balance_bias(bias, counts, rate=0.01)
    assert ratios[0] > 3.0  # experts 0 and 1 take most of the load (uniform is 1)
    assert max(ratios[-5:]) < 1.25, ratios
    np.testing.assert_array_equal(moe.balance_bias(bias, counts, rate=0.0), bias)  # switched off

    # In a model: the bias lives in each MoE layer, outside the parameters, and moves by `rate`
    # against the measured load (overloaded experts down, underloaded up).
    m = hf.load(checkpoint("v3"))
    params_before = jax.tree.map(np.asarray, nnx.state(m, nnx.Param))
    ids, mask = batch()
    _, stats = forward("v3")(nnx.state(m), jnp.asarray(ids), jnp.asarray(mask))
    before = np.asarray(m.layers[1].mlp.bias[...])
    metrics = deepseek.update_router_bias(m, stats, rate=0.05)
    step = np.asarray(m.layers[1].mlp.bias[...]) - before
    load_ = np.asarray(stats.load[0])
    np.testing.assert_allclose(step, 0.05 * np.sign(load_.mean() - load_), atol=1e-7)
    assert float(metrics["router/bias_drift"]) > 0
    after = jax.tree.leaves(nnx.state(m, nnx.Param))
    for a, b in zip(jax.tree.leaves(params_before), after, strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert not isinstance(m.layers[1].mlp.bias, nnx.Param)
    summary = deepseek.router_metrics(stats)
    assert float(summary["router/max_load_ratio"]) >= 1.0
    assert float(summary["router/dropped_frac"]) == 0.0


# --------------------------------------------------------------------------------------------------
# GRPO and SFT on a DeepSeek model: rollout, update (one device = expert parallel), router bias
# --------------------------------------------------------------------------------------------------

RATE = 0.05  # router_bias_rate: large, so one step visibly moves the bias
RL = grpo.GRPOConfig(
    num_generations=4,
    num_iterations=2,  # the rollout computes old log-probs; the update scans two steps
    beta=0.04,  # the rollout runs the reference model too
    max_completion_length=5,
    num_micro_batches=2,  # 8 rows each: split over fsdp x expert = 8 devices
)
OPTIM = train.OptimConfig(learning_rate=1e-2, eps=1e-3)  # eps: see tests/test_train.py


class LowTokens:
    """Traced reward: share of completion tokens in the lower half of the vocabulary."""

    names = ("low",)

    def __call__(self, tokens, lengths):
        real = jnp.arange(tokens.shape[1])[None] < lengths[:, None]
        share = jnp.sum((tokens < VOCAB // 2) & real, -1) / jnp.maximum(lengths, 1)
        return share.astype(jnp.float32), share[None].astype(jnp.float32)


def _flat(tree) -> dict:
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(tree)}


def _grpo_step(mesh=None):
    """One GRPO step (rollout + update) on the one-MoE-layer V3 model, on `mesh` or one device.
    Returns (rollouts on the host, rollout metrics, update metrics, state before, state after)."""
    path = checkpoint("v3_moe_only")
    state = train.TrainState.create(hf.load(path, mesh=mesh, router_bias_rate=RATE), OPTIM, mesh)
    before = _flat(nnx.state(state.model))
    ids, mask = left_padded_batch(seed=4, batch=4, length=8, pads=(0, 2, 5, 1))
    rollouts, data_metrics = grpo.rollout(
        grpo.policy_for_sampling(state),
        hf.load(path, mesh=mesh),
        ids,
        mask,
        jax.random.key(3),
        LowTokens(),
        RL,
    )
    rollouts = jax.device_get(rollouts)
    return state, rollouts, jax.device_get(data_metrics), before


def _group_rollouts(ids, mask, tc: int, seed: int) -> grpo.Rollouts:
    """Rollouts of RL.num_generations random completions (1..tc tokens) of each prompt."""
    g, b = RL.num_generations, len(ids) * RL.num_generations
    rng = np.random.RandomState(seed)
    lengths = rng.randint(1, tc + 1, b)
    completion_mask = (np.arange(tc)[None] < lengths[:, None]).astype(np.int32)
    return grpo.Rollouts(
        prompt_ids=np.repeat(ids, g, 0),
        prompt_mask=np.repeat(mask, g, 0),
        completion_ids=(rng.randint(1, VOCAB, (b, tc)) * completion_mask).astype(np.int32),
        completion_mask=completion_mask,
        advantages=rng.normal(size=b).astype(np.float32),
        rewards=np.zeros(b, np.float32),
        per_reward=np.zeros((b, 1), np.float32),
        truncated=np.zeros(b, bool),
        ref_logprobs=np.full((b, tc), -np.log(VOCAB), np.float32),
    )


def test_shared_prompt_forward_equals_per_row_on_mla_and_counts_prompts_once():
    """GRPO with each prompt run once (the MLA latent cache as prefix, T > 1 completions after
    it): the scoring log-probs and the accumulated gradients equal per-row forwards', whether
    the micro-batches attend to the prompt cache in place (k = 2 divides G) or copy rows out of
    it (k = 8); the router counts each prompt token once instead of G times."""
    model = hf.load(checkpoint("v3_moe_only"), router_bias_rate=RATE)
    g, tc = RL.num_generations, 5
    ids, mask = left_padded_batch(seed=4, batch=4, length=8, pads=(0, 2, 5, 1))
    rollouts = _group_rollouts(ids, mask, tc, seed=0)
    completion_mask = rollouts.completion_mask
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, static_argnums=2)
    def run(state, rollouts, cfg):
        m = nnx.merge(graphdef, state)
        r = rollouts
        logp = grpo.scoring_logprobs(
            m, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, cfg
        )
        loss, grads, metrics = grpo.loss_and_gradients(m, r, cfg)
        return logp, loss, grads, metrics["router"], grpo.prompt_forward(m, ids, mask).router

    cfg = lambda k, shared: dataclasses.replace(  # noqa: E731
        RL, num_iterations=1, num_micro_batches=k, shared_prompt_forward=shared
    )
    want_logp, want_loss, want_grads, want_router, prompt_router = jax.device_get(
        run(state, rollouts, cfg(2, False))
    )
    real = completion_mask.astype(bool)
    for k in (2, 8):
        logp, loss, grads, router, _ = jax.device_get(run(state, rollouts, cfg(k, True)))
        np.testing.assert_allclose(logp[real], want_logp[real], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
        for x, y in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
        # Means over micro-batches: per-row counts each prompt G times, shared counts it once.
        np.testing.assert_allclose(
            want_router.load * 2 - router.load * k, (g - 1) * prompt_router.load, atol=1e-3
        )
    assert np.abs(prompt_router.load).sum() > 0


def test_shared_prompt_gradients_on_a_tensor_parallel_mesh_equal_one_device():
    """With each prompt's forward once (`shared_prompt_forward`), the prompts are a strided slice
    of the batch-sharded rows; with as many prompts as the `tensor` axis and fewer than the
    batch shards (2 prompts on fsdp=4 x tensor=2), Shardy partitioned the MLA prefix's gradient
    wrongly: layer 0, the embedding and every kv_a_dc 0.3-3% off, the loss right."""
    ids, mask = left_padded_batch(seed=4, batch=2, length=8, pads=(0, 3))
    rollouts = _group_rollouts(ids, mask, 5, seed=1)
    cfg = dataclasses.replace(RL, num_iterations=1, num_micro_batches=1, shared_prompt_forward=True)

    def gradients(mesh):
        model = hf.load(checkpoint("v3_moe_only"), mesh=mesh)
        graphdef, state = nnx.split(model)
        r = rollouts
        if mesh is not None:
            r = jax.tree.map(
                lambda x: jax.device_put(
                    x, sharding.logical_sharding(("batch",) + (None,) * (x.ndim - 1), x.shape, mesh)
                ),
                rollouts,
            )

        @jax.jit
        def run(state, r):
            _, grads, _ = grpo.loss_and_gradients(nnx.merge(graphdef, state), r, cfg)
            return grads

        with contextlib.ExitStack() as scope:
            if mesh is not None:
                scope.enter_context(jax.set_mesh(mesh))
                scope.enter_context(sharding.use_rules(sharding.RULES))
            return _flat(jax.device_get(run(state, r)))

    want = gradients(None)
    got = gradients(sharding.make_mesh(fsdp=4, tensor=2))
    for k in want:
        scale = np.abs(want[k]).max()
        assert np.abs(got[k] - want[k]).max() <= 1e-4 * scale + 1e-8, k


def test_a_skipped_update_leaves_the_router_bias_too():
    """An update skipped for non-finite gradients (here: a batch whose groups do not share their
    prompt) left the parameters but still moved the router bias, by the routing of the batch it
    refused."""
    model = deepseek.create(DeepseekConfig.tiny(router_bias_rate=RATE, num_layers=2), seed=0)
    state = train.TrainState.create(model, OPTIM)
    rng = np.random.RandomState(0)
    b, tp, tc = 4, 5, 4
    rollouts = grpo.Rollouts(
        prompt_ids=rng.randint(1, 96, (b, tp)).astype(np.int32),  # every row its own prompt
        prompt_mask=np.ones((b, tp), np.int32),
        completion_ids=rng.randint(1, 96, (b, tc)).astype(np.int32),
        completion_mask=np.ones((b, tc), np.int32),
        advantages=rng.normal(size=b).astype(np.float32),
        rewards=np.zeros(b, np.float32),
        per_reward=np.zeros((b, 1), np.float32),
        truncated=np.zeros(b, bool),
        ref_logprobs=np.zeros((b, tc), np.float32),
    )
    before = _flat(nnx.state(state.model))
    cfg = grpo.GRPOConfig(num_generations=2, beta=0.0, max_completion_length=tc)
    metrics = jax.device_get(grpo.update(state, rollouts, cfg))
    assert metrics["update_skipped"] == 1.0 and metrics["router/bias_drift"] == 0.0
    after = _flat(nnx.state(state.model))
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=str(k))


def test_grpo_step_expert_parallel_equals_single_device_and_updates_router_bias():
    state1, rollouts, data1, before = _grpo_step()
    mesh = sharding.make_mesh(fsdp=2, expert=4)
    state8, rollouts8, data8, _ = _grpo_step(mesh)
    # The rollout (sampler with the latent cache, old and reference log-probs) is the same on
    # the expert-parallel mesh: same tokens, log-probs to float noise.
    np.testing.assert_array_equal(rollouts8.completion_ids, rollouts.completion_ids)
    for field in ("old_logprobs", "ref_logprobs", "advantages"):
        a, b = getattr(rollouts8, field), getattr(rollouts, field)
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=field)
    np.testing.assert_allclose(data8["reward"], data1["reward"], rtol=1e-6)

    # The same update from the same rollouts, on one device and expert-parallel.
    metrics1 = jax.device_get(grpo.update(state1, rollouts, RL))
    metrics8 = jax.device_get(grpo.update(state8, rollouts, RL))
    after1, after8 = _flat(nnx.state(state1.model)), _flat(nnx.state(state8.model))
    assert max(np.abs(after1[k] - before[k]).max() for k in before) > 1e-3  # it did train
    for k in after1:
        assert np.linalg.norm(after8[k] - after1[k]) <= 1e-5 * np.linalg.norm(after1[k]), k
        np.testing.assert_allclose(after8[k], after1[k], rtol=1e-5, atol=1e-6, err_msg=str(k))
    assert metrics1.keys() == metrics8.keys()
    for k in metrics1:
        np.testing.assert_allclose(metrics8[k], metrics1[k], rtol=1e-5, atol=1e-7, err_msg=k)

    # Router metrics ride along, and the bias moved by the balancing rule after each of the two
    # optimizer steps: every expert by -2, -1, 0, 1 or 2 times the rate.
    e = 8
    loads = np.array([metrics1[f"router/load/e{j}"] for j in range(e)])
    np.testing.assert_allclose(loads.mean(), 1.0, rtol=1e-6)  # relative to the mean load
    assert metrics1["router/max_load_ratio"] >= loads.max() - 1e-6 > 1.0
    assert metrics1["router/dropped_frac"] == 0.0  # dropless
    bias = ("layers", 0, "mlp", "bias")
    steps = (after1[bias] - before[bias]) / RATE
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-4)
    assert 0 < np.abs(steps).max() <= 2 + 1e-4
    # bias_drift: mean |change| per step (averaged over the two), at least the net change / 2.
    drift = metrics1["router/bias_drift"]  # (float32: RATE itself when every expert moved)
    assert RATE * np.mean(np.abs(steps)) / 2 - 1e-7 <= drift <= RATE * (1 + 1e-6)

    # Every parameter, Adam moment and the bias lies where the rules declare: routed experts
    # over `expert`, every other weight's `embed` over fsdp and expert, rows over both.
    declared, actual = jax.tree.leaves(state8.shardings), jax.tree.leaves(state8.state())
    for want, x in zip(declared, actual, strict=True):
        assert x.sharding.is_equivalent_to(want, x.ndim), (x.shape, x.sharding, want)
    mlp, attn = state8.model.layers[0].mlp, state8.model.layers[0].attn
    spec = jax.sharding.PartitionSpec
    assert mlp.down_emd[...].sharding.spec == spec("expert", None, "fsdp")
    assert attn.kv_a_dc[...].sharding.spec == spec(("fsdp", "expert"), None)
    assert state8.model.embed_vd[...].sharding.spec == spec(None, ("fsdp", "expert"))
    assert mlp.router_de[...].sharding.spec == spec(("fsdp", "expert"), None)
    assert attn.kv_b_cnh[...].sharding.spec == spec(("fsdp", "expert"), None, None)  # no embed
    for path_, v in nnx.to_flat_state(nnx.state(state8.model, nnx.Param)):
        x = v[...]  # every matrix is split over all 8 devices: nothing is replicated
        assert x.ndim < 2 or x.addressable_shards[0].data.size * 8 == x.size, path_
    assert state8.batch_sharding(rollouts.prompt_ids).spec == spec(("fsdp", "expert"), None)
    # Sampling keeps experts split over `expert` but no weight over fsdp.
    rules = sharding.SAMPLING_RULES
    experts = sharding.logical_to_spec(("expert", "embed", "mlp"), (8, 64, 32), mesh, rules)
    assert experts == spec("expert", None, None)
    assert sharding.logical_to_spec(("embed", "kv_lora"), (64, 40), mesh, rules) == spec(None, None)
    assert sharding.logical_to_spec(("batch",), (16,), mesh, rules) == spec(("fsdp", "expert"))


def test_sft_step_on_deepseek_matches_cross_entropy_and_balances_router():
    m = hf.load(checkpoint("v3_moe_only"), router_bias_rate=RATE)
    rng = np.random.RandomState(7)
    prompts = [list(rng.randint(1, VOCAB, n)) for n in (3, 5, 2, 4, 3)]
    completions = [list(rng.randint(1, VOCAB, n)) for n in (4, 2, 5, 3, 6)]
    batch = pack_sft_ids(prompts, completions, seq_len=16, pad_id=0, pack=True)
    assert batch.segment_ids.max() > 1  # a packed row: attention must stay in each example

    # The reference: cross-entropy from the model's own logits (checked against transformers
    # above) in float64, and the routing counts of the same rows.
    graphdef, _ = nnx.split(m)

    @jax.jit
    def reference(state, ids, mask, positions, segments):
        model = nnx.merge(graphdef, state)
        hidden, _, stats = model.hidden_states_with_router(
            ids, mask, positions=positions, segment_ids=segments
        )
        return model.logits_from_hidden(hidden), stats

    arrays = {k: jnp.asarray(getattr(batch, k)) for k in sft.SFT_FIELDS}
    logits, stats = reference(
        nnx.state(m),
        arrays["input_ids"],
        arrays["attention_mask"],
        arrays["positions"],
        arrays["segment_ids"],
    )
    logp = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64)[:, :-1], -1))
    targets = batch.input_ids[:, 1:]
    counted = (batch.loss_mask[:, 1:] > 0) & (batch.segment_ids[:, 1:] == batch.segment_ids[:, :-1])
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    expected_loss = nll[counted].mean()
    load = np.asarray(stats.load[0])
    bias_before = np.asarray(m.layers[0].mlp.bias[...])

    state = train.TrainState.create(m, OPTIM)
    metrics = jax.device_get(sft.train_step(state, batch))
    np.testing.assert_allclose(metrics["loss"], expected_loss, rtol=1e-5)
    assert metrics["num_tokens"] == counted.sum()
    assert load.sum() == 2 * batch.attention_mask.sum()  # K = 2 assignments per real token
    for j in range(8):
        np.testing.assert_allclose(metrics[f"router/load/e{j}"], load[j] / load.mean(), rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(state.model.layers[0].mlp.bias[...]),
        bias_before + RATE * np.sign(load.mean() - load),
        atol=1e-7,
    )
    assert metrics["router/bias_drift"] > 0


def test_router_bias_rate_is_refused_for_a_router_without_bias():
    with pytest.raises(ValueError, match="router_bias_rate"):
        DeepseekConfig.deepseek_v2_lite(router_bias_rate=1e-3)
    with pytest.raises(ValueError, match="router_bias_rate"):
        DeepseekConfig.tiny(router_bias_rate=-1.0)


# --------------------------------------------------------------------------------------------------
# Checkpoints: save round trip, MTP weights, refused configs, named sizes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["v3", "v2_lite"])
def test_save_round_trip_through_transformers(kind, tmp_path):
    import transformers

    m = model(kind)
    out = str(tmp_path / "saved")
    hf.save(m, out)
    saved = json.load(open(os.path.join(out, "config.json")))
    assert saved["model_type"] == KINDS[kind][0]
    if kind == "v3":  # what vLLM and DeepSeek's code route by (transformers' class drops them)
        assert (saved["topk_method"], saved["scoring_func"]) == ("noaux_tc", "sigmoid")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids, mask = batch()
    import torch

    pos = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        got = reloaded(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            position_ids=torch.tensor(pos),
        ).logits.numpy()
    ref = torch_logits(checkpoint(kind), ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], ref[real], atol=1e-6)
    again = hf.load(out)
    pairs = zip(nnx.to_flat_state(nnx.state(m)), nnx.to_flat_state(nnx.state(again)), strict=True)
    for (p, a), (_, b) in pairs:
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(p))
    # Sharded (one expert's tensors may land in several files) and converted on the way out.
    hf.save(m, str(tmp_path / "bf16"), dtype="bfloat16", max_shard_bytes=16 * 1024)
    from safetensors import safe_open

    index = json.load(open(tmp_path / "bf16" / "model.safetensors.index.json"))["weight_map"]
    with safe_open(os.path.join(out, "model.safetensors"), "numpy") as f:
        assert sorted(index) == sorted(f.keys())
    assert len(set(index.values())) > 4
    assert json.load(open(tmp_path / "bf16" / "config.json"))["dtype"] == "bfloat16"
    again = hf.load(str(tmp_path / "bf16"))
    for (p, a), (_, b) in zip(
        nnx.to_flat_state(nnx.state(m)), nnx.to_flat_state(nnx.state(again)), strict=True
    ):
        want = np.asarray(a[...])
        if p[-1] not in ("bias", "router_de"):  # the router and its bias are kept float32
            want = want.astype(jnp.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(b[...]), want, err_msg=str(p))


def test_mtp_weights_are_skipped_with_a_log_line_or_refused(tmp_path, caplog):
    from safetensors.numpy import load_file, save_file

    path = str(tmp_path / "ckpt")
    shutil.copytree(checkpoint("v3"), path)
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    tensors["model.layers.2.eh_proj.weight"] = np.zeros((64, 128), np.float32)
    tensors["model.layers.2.enorm.weight"] = np.ones((64,), np.float32)
    save_file(tensors, file, metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="r1jax.models.deepseek_hf"):
        m = hf.load(path)
    assert "skipping 2 multi-token-prediction tensors" in caplog.text
    assert len(m.layers) == 2
    with pytest.raises(hf.CheckpointError, match="multi-token-prediction"):
        hf.load(path, mtp="error")


def test_a_tied_config_with_another_lm_head_in_its_weights_is_refused(tmp_path):
    """As for dense models (tests/test_models.py): transformers keeps a stored lm_head that
    differs from the embedding; r1jax tied them and dropped it, another model without a word."""
    path = str(tmp_path / "ckpt")
    shutil.copytree(checkpoint("v3"), path)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["tie_word_embeddings"] = True
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    assert_a_stored_head_must_equal_the_embedding(path)


def test_unsupported_configs_are_refused_with_the_field_named():
    base = json.load(open(os.path.join(checkpoint("v3"), "config.json")))
    assert isinstance(hf.config_from_hf(base), DeepseekConfig)
    bad = {
        "quantization_config": {"quant_method": "fp8"},
        "num_key_value_heads": 2,
        "attention_bias": True,
        "topk_method": "greedy",
        "moe_layer_freq": 2,
        "n_shared_experts": 0,  # (was a KeyError on the missing shared-expert tensors)
    }
    for field, value in bad.items():
        with pytest.raises(hf.CheckpointError, match=field):
            hf.config_from_hf({**base, field: value})
    # YaRN without its factor: named at load (was a KeyError in softmax_scale at the first forward).
    no_factor = {"rope_type": "yarn", "original_max_position_embeddings": 16, "mscale_all_dim": 1}
    with pytest.raises(hf.CheckpointError, match="needs factor"):
        hf.config_from_hf({**base, "rope_scaling": no_factor, "rope_parameters": None})
    v2 = json.load(open(os.path.join(checkpoint("v2"), "config.json")))
    with pytest.raises(hf.CheckpointError, match="norm_topk_prob"):
        deepseek_hf.config_from_hf({**v2, "norm_topk_prob": True})
    with pytest.raises(hf.CheckpointError, match="n_group"):
        hf.config_from_hf({**v2, "n_group": 3})
    # A null size was a TypeError from a comparison; a 0 group count silently became 1.
    for field in (
        "kv_lora_rank",
        "n_routed_experts",
        "first_k_dense_replace",
        "routed_scaling_factor",
    ):
        with pytest.raises(hf.CheckpointError, match=f"{field} is null"):
            hf.config_from_hf({**base, field: None})
    for field in ("n_group", "topk_group"):
        with pytest.raises(hf.CheckpointError, match=f"{field}=0 .* must be >= 1"):
            hf.config_from_hf({**base, field: 0})
    cfg = moe.MoEConfig(num_experts=6, top_k=2)
    with pytest.raises(ValueError, match="divisible by the mesh's expert axis"):
        with jax.set_mesh(sharding.make_mesh(fsdp=2, expert=4)):
            moe.routed_experts(
                jnp.ones((2, 3, 4)),
                jnp.ones((2, 3), bool),
                jnp.ones((4, 6)),
                None,
                jnp.ones((6, 4, 5)),
                jnp.ones((6, 4, 5)),
                jnp.ones((6, 5, 4)),
                cfg,
            )


def test_a_rope_scaling_block_takes_its_theta_as_transformers_does():
    """With a legacy `rope_scaling` block beside `rope_parameters` (every r1jax export writes
    both; every V2/V3 release has YaRN), transformers takes theta from the top-level rope_theta
    or the family's default; r1jax took rope_parameters' and loaded another model silently."""
    import transformers

    base = json.load(open(os.path.join(checkpoint("v3"), "config.json")))
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    for top in (50000.0, None):  # (an edited export's rope_theta; none: the default)
        config = {**base, "rope_parameters": {"rope_type": "default", "rope_theta": 3e4}}
        config = {**config, "rope_scaling": {**yarn, "mscale_all_dim": 1.0}}
        config.pop("rope_theta", None)
        if top is not None:
            config["rope_theta"] = top
        theirs = transformers.AutoConfig.for_model(**copy.deepcopy(config)).rope_parameters
        ours = hf.config_from_hf(config)
        assert (ours.rope_theta, dict(ours.rope_scaling)["rope_type"]) == (
            theirs["rope_theta"],
            theirs["rope_type"],
        )
        assert ours.rope_theta == (top or 10000.0)


def test_named_configs_have_the_published_sizes():
    v3, lite = DeepseekConfig.deepseek_v3(), DeepseekConfig.deepseek_v2_lite()
    assert abs(v3.num_params / 671e9 - 1) < 0.005
    assert abs(v3.num_active_params / 37e9 - 1) < 0.03  # 37B, embeddings included
    assert abs(lite.num_params / 15.7e9 - 1) < 0.005
    cache = MLACache.empty(v3, 1, 1, dtype=jnp.bfloat16)
    assert cache.bytes_per_token == 61 * (512 + 64) * 2  # 70,272 bytes per token


def test_bfloat16_load_keeps_the_router_in_float32():
    """As transformers does: the routing weights stay float32 in a bfloat16 model, so the
    experts chosen do not depend on the parameter dtype's rounding."""
    bf16 = hf.load(checkpoint("v3_moe_only"), param_dtype="bfloat16")
    mlp = bf16.layers[0].mlp
    assert mlp.router_de[...].dtype == jnp.float32 and mlp.bias[...].dtype == jnp.float32
    assert mlp.gate_edm[...].dtype == jnp.bfloat16
    f32 = hf.load(checkpoint("v3_moe_only"))
    np.testing.assert_array_equal(
        np.asarray(mlp.router_de[...]), np.asarray(f32.layers[0].mlp.router_de[...])
    )
