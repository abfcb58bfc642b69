"""The jitted GRPO step on tiny models: sharding, accumulation, policy gradient, skipping, learning.

Compiling is most of the cost here, so the tests share programs: one GRPO configuration and one
rollout shape serve the sharding, non-finite and learning tests (one update program per mesh),
and every gradient comparison comes from one jitted function. Models are built from numpy.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from r1jax import grpo, sharding, train
from r1jax.metrics import CompileCounter
from r1jax.models.transformer import Decoder, ModelConfig
from r1jax.rewards.compose import HostRewardBridge, build_reward_fn

CFG = ModelConfig(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    tie_word_embeddings=True,
    qkv_bias=True,
)
MESHES = {
    "fsdp8": dict(fsdp=8),
    "fsdp4_tp2": dict(fsdp=4, tensor=2),
    "dp2_fsdp2_tp2": dict(data=2, fsdp=2, tensor=2),
}
P, G, TP, TC = 4, 4, 4, 6  # prompts, samples per prompt, prompt and completion lengths
B = P * G
GRPO = grpo.GRPOConfig(
    num_generations=G,
    num_iterations=2,
    beta=0.0,
    epsilon_high=0.28,
    loss_type="dapo",
    max_completion_length=TC,
    num_micro_batches=2,
)
# Adam's step g / (sqrt(v) + eps) turns float noise in a near-zero (or, over two steps, nearly
# cancelling) gradient into a large relative change; eps = 1e-3 keeps the step well conditioned,
# so "sharded == single device" is a fair comparison, and still learns fast.
OPTIM = train.OptimConfig(
    learning_rate=2e-2,
    warmup_steps=1,
    schedule="cosine",
    total_steps=200,
    weight_decay=0.01,
    eps=1e-3,
)


def tiny_model(seed: int = 0, std: float = 0.02, **overrides) -> Decoder:
    """A tiny Decoder with numpy-initialised weights (norm scales near 1, the rest N(0, std))."""
    cfg = dataclasses.replace(CFG, **overrides)
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.RandomState(seed)

    def init(path, v):
        noise = rng.normal(0, std, v.shape)
        value = 1.0 + noise if path[-1] == "scale" else noise
        return v.replace(jnp.asarray(value, v.dtype))

    flat = [(path, init(path, v)) for path, v in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def synthetic_rollouts(seed: int = 0, old: bool = True, ref: bool = False) -> grpo.Rollouts:
    """Random rollouts shaped like `grpo.rollout`'s for (P, G, TP, TC) (each prompt repeated for
    its G rows), with log-probs near a tiny model's (so ratios sit inside the clip range) and one
    full and one empty completion."""
    rng = np.random.RandomState(seed)
    lengths = rng.randint(0, TC + 1, B)
    lengths[:2] = TC, 0
    completion_mask = (np.arange(TC)[None] < lengths[:, None]).astype(np.int32)
    prompt_mask = (np.arange(TP)[None] >= rng.randint(0, TP, P)[:, None]).astype(np.int32)
    near = lambda: (-np.log(CFG.vocab_size) + rng.normal(0, 0.1, (B, TC))).astype(np.float32)
    rewards = rng.normal(size=B).astype(np.float32)
    return grpo.Rollouts(
        prompt_ids=np.repeat(rng.randint(1, 96, (P, TP)) * prompt_mask, G, 0).astype(np.int32),
        prompt_mask=np.repeat(prompt_mask, G, 0),
        completion_ids=(rng.randint(1, 96, (B, TC)) * completion_mask).astype(np.int32),
        completion_mask=completion_mask,
        advantages=np.asarray(grpo.group_advantages(rewards, G)),
        rewards=rewards,
        per_reward=rewards[:, None],
        truncated=lengths == TC,
        old_logprobs=near() if old else None,
        ref_logprobs=near() if ref else None,
    )


def params_of(model) -> dict:
    return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def single_device_update():
    """Parameters and metrics after one GRPO update on one device (the reference)."""
    state = train.TrainState.create(tiny_model(), OPTIM)
    before = params_of(state.model)
    metrics = jax.device_get(grpo.update(state, synthetic_rollouts(), GRPO))
    return before, params_of(state.model), metrics


# --------------------------------------------------------------------------------------------------
# Sharding
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_sharded_update_equals_single_device_and_keeps_layout(mesh_name, single_device_update):
    before, expected, expected_metrics = single_device_update
    mesh = sharding.make_mesh(**MESHES[mesh_name])
    state = train.TrainState.create(tiny_model(), OPTIM, mesh)
    metrics = jax.device_get(grpo.update(state, synthetic_rollouts(), GRPO))

    after = params_of(state.model)
    moved = max(np.abs(expected[k] - before[k]).max() for k in before)
    assert moved > 1e-3  # the update really changed the weights
    for k in expected:  # within 1e-5 of each tensor's norm, and elementwise to float noise
        assert np.linalg.norm(after[k] - expected[k]) <= 1e-5 * np.linalg.norm(expected[k]), k
        np.testing.assert_allclose(after[k], expected[k], rtol=1e-5, atol=1e-6, err_msg=str(k))
    for k in ("loss", "grad_norm", "entropy", "clip_ratio/region_mean", "learning_rate"):
        np.testing.assert_allclose(metrics[k], expected_metrics[k], rtol=1e-5, atol=1e-7)

    # Every parameter and optimizer leaf sits where the logical names and rules say ...
    declared = jax.tree.leaves(state.shardings)
    actual = jax.tree.leaves(state.state())
    assert len(declared) == len(actual)
    for want, x in zip(declared, actual, strict=True):
        assert x.sharding.is_equivalent_to(want, x.ndim), (x.shape, x.sharding, want)
    # ... and that layout is really split: Adam's first moment of q [D, N, H] like q itself.
    fsdp, tp = mesh.shape["fsdp"], mesh.shape["tensor"]
    spec = jax.sharding.PartitionSpec("fsdp", "tensor" if tp > 1 else None, None)
    q_mu = next(
        v[...]
        for path, v in nnx.to_flat_state(nnx.state(state.optimizer))
        if path[-5:] == ("mu", "layers", 0, "attn", "q_dnh")
    )
    assert q_mu.sharding.spec == spec
    assert q_mu.addressable_shards[0].data.shape == (32 // fsdp, 4 // tp, 8)
    assert state.model.layers[0].attn.q_dnh[...].sharding.spec == spec


# --------------------------------------------------------------------------------------------------
# Gradients (one compiled function computes every gradient compared below)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gradients():
    """Losses and gradients of the first-iteration (μ = 1) GRPO loss on a tiny model, accumulated
    over 4 micro-batches, for loss types grpo and dapo; and the gradients of the whole-batch plain
    policy-gradient objectives the two reduce to at ratio 1, written independently (full logits,
    a gather): -mean_b A_b mean_t log p (grpo) and -sum_bt A_b log p / tokens (dapo)."""
    model = tiny_model(std=0.1)
    graphdef, params = nnx.split(model)
    rollouts = jax.tree.map(jnp.asarray, synthetic_rollouts(2, old=False))
    rollouts = rollouts.replace(
        advantages=jnp.asarray(np.random.RandomState(3).normal(size=B), jnp.float32)
    )

    def plain_logprobs(p):
        r = rollouts
        ids = jnp.concatenate([r.prompt_ids, r.completion_ids], 1)
        mask = jnp.concatenate([r.prompt_mask, r.completion_mask], 1)
        logits = nnx.merge(graphdef, p)(ids, attention_mask=mask)[:, TP - 1 : -1]
        logp = jax.nn.log_softmax(logits, -1)
        return jnp.take_along_axis(logp, r.completion_ids[..., None], -1)[..., 0]

    m = rollouts.completion_mask.astype(jnp.float32)
    adv = rollouts.advantages[:, None]
    weights = {  # d objective / d log p[b, t] of each plain objective
        "grpo": -adv * m / jnp.maximum(m.sum(-1, keepdims=True), 1) / B,
        "dapo": -adv * m / m.sum(),
    }

    @jax.jit
    def compute(params):
        model = nnx.merge(graphdef, params)
        _, vjp = jax.vjp(plain_logprobs, params)  # both plain gradients from one forward
        out = {}
        for loss_type, w in weights.items():
            # Each row its own prompt; each prompt's forward once with micro-batches holding
            # G / k = 2 rows of every prompt in order (the prefix cache as it is), or 2 rows of
            # two different prompts (k = 8 > G: the cache rows copied out per completion).
            for shared, k in ((False, 4), (True, 2), (True, 8)):
                cfg = dataclasses.replace(
                    GRPO,
                    loss_type=loss_type,
                    num_iterations=1,
                    num_micro_batches=k,
                    shared_prompt_forward=shared,
                )
                loss, grads, metrics = grpo.loss_and_gradients(model, rollouts, cfg)
                assert shared == ("shared_prompt_mismatch" in metrics)
                out[loss_type, shared, k] = (loss, grads, vjp(w)[0], metrics["entropy"])
        return out

    return rollouts, jax.device_get(compute(params))


@pytest.mark.parametrize(
    "shared,k", [(False, 4), (True, 2), (True, 8)], ids=["per_row", "shared_k2", "shared_k8"]
)
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_accumulated_gradient_equals_the_whole_batch_policy_gradient(
    gradients, loss_type, shared, k
):
    """μ = 1 (old log-probs = current, ratio 1): summing micro-batch gradients (means for grpo,
    whole-batch token counts for dapo) gives the plain policy gradient of the whole batch; also
    with each prompt's forward run once and its gradient pulled back once (shared_prompt_forward,
    micro-batches in the prefix cache's layout or gathering from it)."""
    rollouts, out = gradients
    loss, grads, plain, _ = out[loss_type, shared, k]
    m, adv = np.asarray(rollouts.completion_mask), np.asarray(rollouts.advantages)
    if loss_type == "grpo":  # ratio 1 everywhere: -mean A over non-empty completions
        expected = -np.mean(adv * (m.sum(-1) > 0))
    else:
        expected = -np.sum(adv[:, None] * m) / m.sum()
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-7)
    assert max(np.abs(x).max() for x in jax.tree.leaves(plain)) > 1e-3  # not vacuous
    for x, y in zip(jax.tree.leaves(grads), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-7)


def test_logged_token_means_do_not_depend_on_the_micro_batches(gradients):
    """The logged entropy (as kl and the clip ratios) is the whole batch's token mean: each
    micro-batch's mean was averaged unweighted, so it moved with num_micro_batches (automatic:
    other on a CPU than on an accelerator), the micro-batches holding different token counts."""
    rollouts, out = gradients
    m = np.asarray(rollouts.completion_mask)
    assert len({int(m[j::4].sum()) for j in range(4)}) > 1  # micro-batch j = rows j::k
    entropies = [float(v[3]) for v in out.values()]
    np.testing.assert_allclose(entropies, entropies[0], rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Reference model, non-finite gradients
# --------------------------------------------------------------------------------------------------


class EvenTokens:
    """Traced reward: share of even completion tokens (a jnp stand-in for the host bridge)."""

    names = ("even",)

    def __call__(self, tokens, lengths, row_ids=None):
        mask = jnp.arange(tokens.shape[1])[None] < lengths[:, None]
        even = jnp.sum((tokens % 2 == 0) & mask, -1) / jnp.maximum(lengths, 1)
        return even.astype(jnp.float32), even[None].astype(jnp.float32)


def test_reference_model_is_only_run_when_beta_is_positive(monkeypatch):
    calls = []
    for name in ("completion_logprobs", "prompt_forward"):  # per-row and shared-prompt forwards
        original = getattr(grpo, name)
        monkeypatch.setattr(
            grpo,
            name,
            lambda model, *a, original=original, **k: (
                calls.append(model) or original(model, *a, **k)
            ),
        )
    policy_graphdef, policy_state = nnx.split(tiny_model())
    ref_graphdef, ref_state = nnx.split(tiny_model(seed=1))
    prompts = np.ones((2, TP), np.int32)

    def forward_passes(cfg, with_ref):
        """Training forwards in the traced rollout (tracing only: nothing is compiled)."""
        calls.clear()
        jax.make_jaxpr(
            lambda ps, rs: grpo._rollout(
                ps,
                rs,
                prompts,
                prompts,
                jax.random.key(0),
                None,
                None,
                policy_graphdef=policy_graphdef,
                ref_graphdef=ref_graphdef if with_ref else None,
                reward_fn=EvenTokens(),
                cfg=cfg,
            )
        )(policy_state, ref_state if with_ref else None)
        return len(calls)

    small = dict(num_generations=2, max_completion_length=3)
    assert forward_passes(grpo.GRPOConfig(beta=0.0, **small), with_ref=False) == 0
    assert forward_passes(grpo.GRPOConfig(beta=0.1, **small), with_ref=True) == 1
    assert (
        forward_passes(grpo.GRPOConfig(beta=0.0, num_iterations=2, **small), with_ref=False) == 1
    )  # the old-policy log-probs only
    assert (  # (mini-batches: the later ones see a policy the earlier ones moved)
        forward_passes(grpo.GRPOConfig(beta=0.0, num_mini_batches=2, **small), with_ref=False) == 1
    )

    policy = grpo.SamplingPolicy(policy_graphdef, policy_state, sharding.single_device_mesh())

    def rollout_without_reference(prompts, beta):  # (prompts and their mask alike)
        cfg = grpo.GRPOConfig(beta=beta, **small)
        return grpo.rollout(policy, None, prompts, prompts, jax.random.key(0), EvenTokens(), cfg)

    with pytest.raises(ValueError, match="needs the reference model"):
        rollout_without_reference(prompts, beta=0.1)
    # Right-padded prompts (a tokenizer's default padding) sampled after a pad: refused.
    right = np.ones((2, 4), np.int32)
    right[1, 2:] = 0
    with pytest.raises(ValueError, match=r"must be left-padded .* rows \[1\] end in padding"):
        rollout_without_reference(right, beta=0.0)


def test_rollout_scores_micro_batch_by_micro_batch_with_the_same_log_probs():
    """num_micro_batches splits the rollout's reference and old-policy forwards too, and
    shared_prompt_forward runs each (left-padded) prompt once for its G rows; every row's
    log-probs must be those of the whole-batch forward with each row's own prompt, in the right
    row. The sampler's cache grown from 1 to 2 to 6 slots (decode_first_window=1) samples the
    same completions as one 6-slot phase. Mini-batches split the scoring forwards M times more:
    with k x M pieces past G (R1's 16 mini-batches of G = 8) each row is copied out."""
    policy_graphdef, policy_state = nnx.split(tiny_model())
    policy = grpo.SamplingPolicy(policy_graphdef, policy_state, sharding.single_device_mesh())
    ref = tiny_model(seed=1)
    prompt_mask = (np.arange(TP)[None] >= np.array([[0], [1], [2], [0]])).astype(np.int32)
    prompts = np.random.RandomState(0).randint(1, CFG.vocab_size, (P, TP)).astype(np.int32)
    prompts = prompts * prompt_mask
    outs = {}
    # Shared prompts with k = 1 and 2 attend to the prefix cache in place; k = 8 > G copies rows.
    variants = (
        (1, False, 0, 1),
        (4, False, 0, 1),
        (1, True, 0, 1),
        (2, True, 0, 1),
        (8, True, 0, 1),
        (2, True, 1, 1),
        (2, True, 0, 4),
    )
    for k, shared, window, m in variants:
        cfg = grpo.GRPOConfig(
            num_generations=G, num_iterations=2, beta=0.1, max_completion_length=TC,
            num_micro_batches=k, shared_prompt_forward=shared, decode_first_window=window,
            num_mini_batches=m,
        )  # fmt: skip
        rollouts, _ = grpo.rollout(
            policy, ref, prompts, prompt_mask, jax.random.key(3), EvenTokens(), cfg
        )
        outs[k, shared, window, m] = jax.device_get(rollouts)
    want = outs[variants[0]]
    mask = want.completion_mask.astype(bool)
    for key in variants[1:]:
        np.testing.assert_array_equal(outs[key].completion_ids, want.completion_ids)
        for name in ("ref_logprobs", "old_logprobs"):
            got, expected = getattr(outs[key], name)[mask], getattr(want, name)[mask]
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5, err_msg=f"{key} {name}")
    assert np.ptp(want.ref_logprobs[mask]) > 0.1  # rows differ, so a row mix-up would show


def test_shared_prompt_update_equals_per_row_update(single_device_update):
    """μ = 2 with clipping and dapo (the fixture's GRPO config, shared prompts by default): the
    same parameters as running every row's prompt through the model."""
    _, expected, expected_metrics = single_device_update
    state = train.TrainState.create(tiny_model(), OPTIM)
    cfg = dataclasses.replace(GRPO, shared_prompt_forward=False)
    metrics = jax.device_get(grpo.update(state, synthetic_rollouts(), cfg))
    after = params_of(state.model)
    for k in expected:
        np.testing.assert_allclose(after[k], expected[k], rtol=1e-5, atol=1e-6, err_msg=str(k))
    for k in ("loss", "grad_norm", "clip_ratio/region_mean"):
        np.testing.assert_allclose(metrics[k], expected_metrics[k], rtol=1e-5, atol=1e-7)
    assert expected_metrics["shared_prompt_mismatch"] == 0.0


def test_shared_prompt_update_refuses_groups_with_different_prompts():
    """A hand-built batch whose G rows do not share one prompt must not be trained on row p*G's
    prompt: the update is skipped and the metric says why."""
    state = train.TrainState.create(tiny_model(), OPTIM)
    rollouts = synthetic_rollouts()
    ids = rollouts.prompt_ids.copy()
    ids[5, -1] = ids[5, -1] % 95 + 1  # row 5 (group 1) now differs from its group's first row
    before = params_of(state.model)
    metrics = jax.device_get(grpo.update(state, rollouts.replace(prompt_ids=ids), GRPO))
    assert metrics["shared_prompt_mismatch"] == 1.0 and metrics["update_skipped"] == 1.0
    after = params_of(state.model)
    assert all(np.array_equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("family", ["qwen2", "deepseek_v3"])
def test_sampling_copy_computes_what_the_training_forward_does(family):
    """Mixed precision (float32 weights, bfloat16 compute): the sampling copy is in bfloat16
    except what the forward reads in float32 (norm scales, the MoE router and its bias), so its
    log-probs (μ > 1: the old policy's) equal the training forward's exactly; rounding the norm
    scales too moved them by up to 0.17 nats."""
    from r1jax.models.deepseek import DeepseekConfig, DeepseekDecoder

    if family == "qwen2":
        model = tiny_model(std=0.3, param_dtype="float32", dtype="bfloat16")
    else:
        with nnx.use_eager_sharding(False):
            cfg = DeepseekConfig.tiny(param_dtype="float32", dtype="bfloat16")
            model = DeepseekDecoder(cfg, rngs=nnx.Rngs(0))
    state = train.TrainState.create(model, OPTIM)
    policy = grpo.policy_for_sampling(state)
    kept = {
        jnp.dtype(x.dtype).name
        for x in jax.tree.leaves(policy.state)
        if jnp.issubdtype(x.dtype, jnp.floating)
    }
    assert kept == {"bfloat16", "float32"}  # matrices cast, the float32-read leaves kept
    r = synthetic_rollouts(old=False)
    cfg = dataclasses.replace(GRPO, num_iterations=2)
    score = jax.jit(
        lambda g, s: grpo.scoring_logprobs(
            nnx.merge(g, s), r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, cfg
        ),
        static_argnums=0,
    )
    old = score(policy.graphdef, policy.state)
    now = score(state.model_graphdef, state.model_state())
    np.testing.assert_array_equal(np.asarray(old), np.asarray(now))
    with pytest.raises(ValueError, match="old_logprobs"):  # μ > 1 needs them
        grpo.update(state, r, cfg)


def test_non_finite_gradients_skip_the_update():
    state = train.TrainState.create(tiny_model(), OPTIM)
    rollouts = synthetic_rollouts()
    bad = rollouts.replace(advantages=np.where(np.arange(B) == 3, np.nan, rollouts.advantages))
    before = params_of(state.model)
    opt_before = [np.asarray(x) for x in jax.tree.leaves(nnx.state(state.optimizer))]

    metrics = jax.device_get(grpo.update(state, bad, GRPO))
    assert not np.isfinite(metrics["grad_norm"])
    assert metrics["update_skipped"] == 1.0 and metrics["skipped_updates"] == GRPO.num_iterations
    for k, v in params_of(state.model).items():
        np.testing.assert_array_equal(v, before[k])
    opt_after = [np.asarray(x) for x in jax.tree.leaves(nnx.state(state.optimizer))]
    changed = [
        i
        for i, (a, b) in enumerate(zip(opt_before, opt_after, strict=True))
        if not np.array_equal(a, b)
    ]
    assert len(changed) == 1 and opt_after[changed[0]] == GRPO.num_iterations  # only `skipped`
    assert int(state.optimizer.step[...]) == 0

    metrics = jax.device_get(grpo.update(state, rollouts, GRPO))  # a finite batch applies again
    assert metrics["update_skipped"] == 0.0 and metrics["skipped_updates"] == GRPO.num_iterations
    assert int(state.optimizer.step[...]) == GRPO.num_iterations
    assert any(not np.array_equal(v, before[k]) for k, v in params_of(state.model).items())


# --------------------------------------------------------------------------------------------------
# Learning, end to end (sampler, host reward callback, update), compiled once
# --------------------------------------------------------------------------------------------------


def even_token_reward(completions, completion_ids, **_):
    """TRL-signature reward: share of even token ids in the completion."""
    return [float(np.mean([t % 2 == 0 for t in ids])) if ids else 0.0 for ids in completion_ids]


def test_a_reward_that_raises_inside_the_sharded_rollout_is_raised_after_it():
    """The host callback runs on one device of the mesh: an exception there left the other
    devices' collectives waiting, and XLA:CPU aborted the process 40 s later with no Python error
    (no message, nothing closed). The bridge holds it, the rows go unscored, and raise_error()
    raises it once the outputs are fetched."""

    def broken(completions, **_):
        raise RuntimeError("the reward's backend is down")

    reward_fn = HostRewardBridge(
        build_reward_fn([{"name": "broken", "fn": broken}], num_workers=0),
        decode=lambda ids: [" ".join(map(str, row)) for row in ids],
    )
    mesh = sharding.make_mesh(fsdp=8)
    graphdef, state = nnx.split(tiny_model())
    policy = grpo.SamplingPolicy(graphdef, state, mesh)
    prompts = np.ones((8, TP), np.int32)
    cfg = dataclasses.replace(GRPO, num_generations=2, beta=0.0, num_iterations=1)
    rollouts, metrics = grpo.rollout(
        policy, None, prompts, prompts, jax.random.key(0), reward_fn, cfg
    )
    assert np.isnan(jax.device_get(rollouts.rewards)).all()
    with pytest.raises(RuntimeError, match="backend is down"):
        reward_fn.raise_error()
    reward_fn.raise_error()  # (raised once)


def test_grpo_raises_the_reward_and_compiles_once():
    state = train.TrainState.create(tiny_model(seed=5, std=0.05), OPTIM)
    reward_fn = HostRewardBridge(
        build_reward_fn([{"name": "even", "fn": even_token_reward}], num_workers=0),
        decode=lambda ids: [" ".join(map(str, row)) for row in ids],
    )
    prompts = np.random.RandomState(0).randint(1, 96, (P, TP)).astype(np.int32)
    mask = np.ones_like(prompts)
    key = jax.random.key(0)
    rewards, steady = [], CompileCounter(log_each=False)
    for step in range(20):
        if step == 2:
            steady.start()  # every program exists after the first step
        key, sample_key = jax.random.split(key)
        policy = grpo.policy_for_sampling(state)
        # beta == 0: no reference model is loaded at all.
        rollouts, data_metrics = grpo.rollout(
            policy, None, prompts, mask, sample_key, reward_fn, GRPO
        )
        step_metrics = grpo.update(state, rollouts, GRPO)
        rewards.append(float(data_metrics["reward"]))
    steady.stop()
    assert rollouts.ref_logprobs is None and rollouts.old_logprobs.shape == (B, TC)
    assert np.isfinite(float(step_metrics["loss"]))
    np.testing.assert_allclose(float(data_metrics["rewards/even/mean"]), rewards[-1], rtol=1e-6)
    first, last = np.mean(rewards[:3]), np.mean(rewards[-5:])
    assert 0.3 < first < 0.75, rewards  # a near-random policy: about half the tokens are even
    assert last > first + 0.25, rewards
    assert steady.count == 0, steady.by_name()
    # The sampling copy is of the trained weights: the model's split read from the state's own
    # Variables equals a fresh walk of the model.
    graphdef, fresh = nnx.split(state.model)
    assert state.model_graphdef == graphdef
    for ours, theirs in zip(
        jax.tree.leaves(grpo.policy_for_sampling(state).state), jax.tree.leaves(fresh), strict=True
    ):
        np.testing.assert_array_equal(ours, theirs)


def test_weight_decay_reaches_matrices_only():
    """Decoupled weight decay on matrices; norm scales and biases (q/k/v biases are 2-D
    [heads, head_dim]) keep their values under a zero gradient."""
    model = tiny_model(qkv_bias=True)
    attn = model.layers[0].attn
    attn.k_bias[...] = jnp.ones_like(attn.k_bias[...])
    before = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    optimizer = train.Optimizer(
        model, train.OptimConfig(learning_rate=0.1, weight_decay=0.5, max_grad_norm=0)
    )
    optimizer.apply_gradients(model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = "/".join(map(str, path))
        decayed = not np.array_equal(np.asarray(v[...]), before[path])
        matrix = v[...].ndim >= 2 and not name.endswith("bias")
        assert decayed == matrix, name


def test_adam_moments_of_bfloat16_weights_are_float32():
    """optax keeps Adam's moments in the weights' dtype: in bfloat16, 0.999 x v rounds back to
    v, and a gradient spike's second moment never decayed (0.000999 after 100 zero gradients,
    against 0.000905)."""
    import optax

    model = tiny_model(param_dtype="bfloat16")
    cfg = train.OptimConfig(learning_rate=1e-3, max_grad_norm=0)
    optimizer = train.Optimizer(model, cfg)
    params = nnx.state(model, nnx.Param)
    optimizer.apply_gradients(model, jax.tree.map(jnp.ones_like, params))
    for _ in range(100):
        optimizer.apply_gradients(model, jax.tree.map(jnp.zeros_like, params))
    state = nnx.as_pure(optimizer.opt_state)
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    [adam] = [s for s in jax.tree.leaves(state, is_leaf=is_adam) if is_adam(s)]
    moments = jax.tree.leaves(adam.mu) + jax.tree.leaves(adam.nu)
    assert {x.dtype for x in moments} == {jnp.dtype(jnp.float32)}
    want = (1 - cfg.b2) * cfg.b2**100  # (float64; the gradient's square term is bfloat16's)
    for nu in jax.tree.leaves(adam.nu):
        np.testing.assert_allclose(np.asarray(nu), want, rtol=1e-3)
    weights = jax.tree.leaves(nnx.as_pure(nnx.state(model, nnx.Param)))
    assert {x.dtype for x in weights} == {jnp.dtype(jnp.bfloat16)}  # (the weights stay)


def test_shard_local_batch_names_a_batch_the_mesh_cannot_split():
    mesh = sharding.make_mesh(fsdp=8)
    rows = sharding.shard_local_batch({"x": np.arange(16).reshape(8, 2)}, mesh)
    assert rows["x"].shape == (8, 2) and len(rows["x"].sharding.device_set) == 8
    with pytest.raises(ValueError, match="cannot be split over mesh axes"):
        sharding.shard_local_batch({"x": np.zeros((3, 2))}, mesh)


def test_skip_watch_stops_only_after_the_limit_of_fully_skipped_steps_in_a_row():
    watch = train.SkipWatch(3)
    for step, skipped in enumerate([1.0, 1.0, 0.0, 1.0, 0.5, 1.0, 1.0], start=1):
        watch(step, {"update_skipped": skipped})  # a good step (0) or a partial one resets
    assert watch.skipping and watch.last_applied == 5
    with pytest.raises(train.Diverged, match=r"^steps 6-8: 3 updates in a row .* step 5 left"):
        watch(8, {"update_skipped": 1.0})
    fresh = train.SkipWatch(2)
    fresh(1, {"update_skipped": 1.0})
    with pytest.raises(train.Diverged, match=r"started \(or resumed\) from gives non-finite"):
        fresh(2, {"update_skipped": 1.0})
    never = train.SkipWatch(0)
    for step in range(1, 50):
        never(step, {"update_skipped": 1.0})
    with pytest.raises(ValueError, match="optim.max_skipped_steps must be >= 0"):
        train.OptimConfig(max_skipped_steps=-1)
    # NaN passed every `x < 0` check: weight_decay=nan trained a NaN model and exited 0.
    nan, inf = float("nan"), float("inf")
    for field, value in (("weight_decay", nan), ("max_grad_norm", nan), ("learning_rate", nan),
                         ("learning_rate", inf), ("eps", nan), ("eps", inf)):  # fmt: skip
        with pytest.raises(ValueError, match=rf"optim.* finite .*{value}"):
            train.OptimConfig(**{field: value})


def test_sync_reference_moves_the_reference_to_the_policy():
    """rl.ref_sync_steps: reference <- alpha * policy + (1 - alpha) * reference, every variable,
    in the reference's own arrays (the policy untouched)."""
    state = train.TrainState.create(tiny_model(seed=0, std=0.1), OPTIM)
    ref = tiny_model(seed=1, std=0.1)
    policy = {
        p: np.asarray(v.get_value(), np.float64)
        for p, v in nnx.to_flat_state(nnx.state(state.model))
    }
    before = {
        p: np.asarray(v.get_value(), np.float64) for p, v in nnx.to_flat_state(nnx.state(ref))
    }
    grpo.sync_reference(ref, state, alpha=0.25)
    for path, v in nnx.to_flat_state(nnx.state(ref)):
        want = 0.25 * policy[path] + 0.75 * before[path]
        np.testing.assert_allclose(np.asarray(v.get_value()), want, rtol=1e-6, atol=1e-7)
    grpo.sync_reference(ref, state)  # alpha 1: the policy's copy
    for path, v in nnx.to_flat_state(nnx.state(ref)):
        np.testing.assert_array_equal(np.asarray(v.get_value()), policy[path].astype(np.float32))
    after = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(state.model))}
    assert all(np.array_equal(after[p], policy[p].astype(np.float32)) for p in policy)
    with pytest.raises(ValueError, match="needs one architecture"):
        grpo.sync_reference(tiny_model(num_layers=CFG.num_layers + 1), state)


def test_mini_batches_are_successive_steps_on_their_prompts():
    """num_mini_batches=M: each pass over the rollout batch takes M optimizer steps, mini-batch j
    holding prompts j, j + M, ... with their G rows (R1's 16 mini-batches per rollout): the same
    as updating on each mini-batch in turn, as its own batch, with the sampling policy's
    log-probs for the ratio."""
    rollouts = synthetic_rollouts()
    cfg = dataclasses.replace(GRPO, num_mini_batches=2)  # (μ = 2 passes, 2 micro-batches each)
    state = train.TrainState.create(tiny_model(), OPTIM)
    metrics = jax.device_get(grpo.update(state, rollouts, cfg))

    by_hand = train.TrainState.create(tiny_model(), OPTIM)
    one = dataclasses.replace(GRPO, num_iterations=1)
    losses = []
    for _ in range(cfg.num_iterations):
        for j in range(2):
            rows = np.concatenate([np.arange(p * G, (p + 1) * G) for p in range(j, P, 2)])
            mini = jax.tree.map(lambda x: np.asarray(x)[rows], rollouts)  # noqa: B023
            losses.append(float(grpo.update(by_hand, mini, one)["loss"]))
    assert int(state.optimizer.step[...]) == int(by_hand.optimizer.step[...]) == 4
    np.testing.assert_allclose(metrics["loss"], np.mean(losses), rtol=1e-5, atol=1e-7)
    want, got = params_of(by_hand.model), params_of(state.model)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=str(k))
    with pytest.raises(ValueError, match="num_mini_batches=3 must deal the 4 prompts"):
        grpo.update(state, rollouts, dataclasses.replace(GRPO, num_mini_batches=3))
    with pytest.raises(ValueError, match="needs the sampling policy's log-probs"):
        grpo.update(
            state, synthetic_rollouts(old=False), dataclasses.replace(one, num_mini_batches=2)
        )
