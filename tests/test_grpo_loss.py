"""GRPO array math against an independent float64 numpy reference (values and gradients)."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import grpo

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
MAX_LEN = 9  # max_completion_length for dr_grpo (> T, as when completions are padded to a bucket)


# --------------------------------------------------------------------------------------------------
# Float64 numpy reference, written from the formulas (TRL GRPOTrainer semantics), not from r1jax.
# --------------------------------------------------------------------------------------------------


def np_token_weights(mask, loss_type, n_items=None):
    """d loss / d per_token_loss[b, t] per aggregation: the loss is sum(weights * per_token)."""
    b = mask.shape[0]
    if loss_type == "grpo":
        return mask / np.maximum(mask.sum(1, keepdims=True), 1.0) / b
    if loss_type == "bnpo":
        return mask / max(mask.sum(), 1.0)
    if loss_type == "dr_grpo":
        return mask / (b * MAX_LEN)
    return mask / max(mask.sum() if n_items is None else n_items, 1.0)


def np_loss_and_grad(lp, old, ref, adv, mask, loss_type, eps_low, eps_high, beta, n_items=None):
    """Loss and its analytic gradient w.r.t. lp, float64."""
    lp, old, adv, mask = (np.asarray(x, np.float64) for x in (lp, old, adv, mask))
    a = adv[:, None]
    ratio = np.exp(lp - old)
    lo, hi = 1.0 - eps_low, 1.0 + eps_high
    per_token = -np.minimum(ratio * a, np.clip(ratio, lo, hi) * a)
    # The clipped branch is the minimum (and flat) only past the bound on the side A points to.
    flat = ((a > 0) & (ratio > hi)) | ((a < 0) & (ratio < lo))
    d_per_token = np.where(flat, 0.0, -a * ratio)
    if beta:
        ref = np.asarray(ref, np.float64)
        per_token = per_token + beta * (np.exp(ref - lp) - (ref - lp) - 1.0)
        d_per_token = d_per_token + beta * (1.0 - np.exp(ref - lp))
    w = np_token_weights(mask, loss_type, n_items)
    return float(np.sum(w * per_token)), w * d_per_token


def np_loss_only(*args, **kwargs):
    return np_loss_and_grad(*args, **kwargs)[0]


def np_fd_grad(f, x, h=1e-6):
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        g[idx] = (f(xp) - f(xm)) / (2 * h)
    return g


# --------------------------------------------------------------------------------------------------
# Data: ratios that straddle 0.8, 1.2 and 1.28 (symmetric and clip-higher bounds) but never sit on
# a bound, so the gradient is well defined and finite differences are valid.
# --------------------------------------------------------------------------------------------------

B, T = 4, 6


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    lp = rng.uniform(-3.0, -0.2, (B, T))
    # Row 0 (A > 0) holds a ratio above both upper bounds and one between them; row 1 (A < 0) one
    # below the lower bound and one far above (unclipped on that side); row 2 has A = 0.
    ratio = np.array(
        [
            [1.0, 1.0, 1.4, 1.24, 0.75, 1.05],
            [0.5, 1.4, 0.9, 1.15, 1.24, 0.75],
            [0.5, 0.75, 0.9, 1.05, 1.15, 1.4],
            [0.9, 1.1, 1.3, 0.6, 1.0, 1.19],
        ]
    )
    ratio = ratio * rng.uniform(0.995, 1.005, (B, T))
    old = lp - np.log(ratio)
    ref = lp + rng.normal(0.0, 0.3, (B, T))
    adv = np.array([1.3, -0.7, 0.0, -1.1])
    # Row 0: prompt then completion; row 1: completion then padding; row 2: full; row 3: empty.
    mask = np.array(
        [[0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], float
    )
    return dict(lp=lp, old=old, ref=ref, adv=adv, mask=mask)


def jax_loss(lp, old, ref, adv, mask, **kw):
    f32 = lambda x: None if x is None else jnp.asarray(x, jnp.float32)
    return grpo.policy_loss(f32(lp), f32(old), f32(ref), f32(adv), f32(mask), **kw)


def jax_value_and_grad(b, loss_type, eps, beta, old=None, n_items=None):
    kw = dict(
        loss_type=loss_type,
        epsilon_low=eps[0],
        epsilon_high=eps[1],
        beta=beta,
        max_completion_length=MAX_LEN,
    )
    if n_items is not None:
        kw["num_items_in_batch"] = n_items
    ref = b["ref"] if beta else None

    def f(lp):
        return jax_loss(lp, old, ref, b["adv"], b["mask"], **kw)[0]

    value, grad = jax.value_and_grad(f)(jnp.asarray(b["lp"], jnp.float32))
    return float(value), np.asarray(grad, np.float64)


# --------------------------------------------------------------------------------------------------
# policy_loss: value and gradient for every loss type, with/without KL, both clip shapes, μ = 1, > 1
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss_type,beta,eps",
    # (10, 10: a wide clip, no lower bound since a ratio is > 0)
    list(itertools.product(LOSS_TYPES, (0.0, 0.04), ((0.2, 0.2), (0.2, 0.28), (10.0, 10.0)))),
)
def test_policy_loss_matches_numpy_when_old_differs(batch, loss_type, beta, eps):
    b = batch
    want, want_grad = np_loss_and_grad(
        b["lp"], b["old"], b["ref"], b["adv"], b["mask"], loss_type, *eps, beta
    )
    # The analytic reference gradient is itself checked against finite differences.
    fd = np_fd_grad(
        lambda lp: np_loss_only(lp, b["old"], b["ref"], b["adv"], b["mask"], loss_type, *eps, beta),
        b["lp"].copy(),
    )
    np.testing.assert_allclose(want_grad, fd, atol=1e-8)

    got, got_grad = jax_value_and_grad(b, loss_type, eps, beta, old=b["old"])
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(got_grad, want_grad, rtol=2e-5, atol=1e-7)
    assert np.all(got_grad[b["mask"] == 0] == 0.0)


def test_clip_higher_changes_the_gradient(batch):
    """A token with ratio ~1.24 and A > 0 is clipped at epsilon_high=0.2 but not at 0.28."""
    b = batch
    _, sym = jax_value_and_grad(b, "bnpo", (0.2, 0.2), 0.0, old=b["old"])
    _, asym = jax_value_and_grad(b, "bnpo", (0.2, 0.28), 0.0, old=b["old"])
    ratio = np.exp(b["lp"] - b["old"])
    between = (ratio > 1.2) & (ratio < 1.28) & (b["adv"][:, None] > 0) & (b["mask"] > 0)
    assert between.any(), "test data must contain a token between the two upper bounds"
    assert np.all(sym[between] == 0.0) and np.all(asym[between] < 0.0)


@pytest.mark.parametrize(
    "loss_type,beta,eps",
    list(itertools.product(LOSS_TYPES, (0.0, 0.04), ((0.2, 0.2), (0.2, 0.28)))),
)
def test_policy_loss_matches_numpy_when_old_equals_current(batch, loss_type, beta, eps):
    """μ = 1: old_logprobs == logprobs (given explicitly, or None meaning 'detached current')."""
    b = batch
    want, want_grad = np_loss_and_grad(
        b["lp"], b["lp"], b["ref"], b["adv"], b["mask"], loss_type, *eps, beta
    )
    for old in (None, b["lp"]):
        got, got_grad = jax_value_and_grad(b, loss_type, eps, beta, old=old)
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)
        np.testing.assert_allclose(got_grad, want_grad, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_ratio_one_gives_plain_policy_gradient(batch, loss_type):
    """Without KL and with ratio 1 the gradient is -A * mask / normaliser, written out per type."""
    b = batch
    a, m = b["adv"][:, None], b["mask"]
    n_seq = np.maximum(m.sum(1, keepdims=True), 1.0)
    normaliser = {
        "grpo": n_seq * B,
        "bnpo": m.sum(),
        "dr_grpo": B * MAX_LEN,
        "dapo": m.sum(),
    }[loss_type]
    want_grad = -a * m / normaliser
    # A clip bound of 0 puts ratio 1 on it: still the whole gradient, as torch's clamp gives
    # TRL (jnp.minimum's tie split gave 0.75 or 0.625 of it).
    for eps in ((0.2, 0.28), (0.0, 0.2), (0.2, 0.0), (0.0, 0.0)):
        value, grad = jax_value_and_grad(b, loss_type, eps, 0.0, old=None)
        np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-9, err_msg=str(eps))
        np.testing.assert_allclose(value, np.sum(want_grad), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_kl_and_its_gradient_vanish_when_policy_equals_reference(batch, loss_type):
    b = batch
    kw = dict(loss_type=loss_type, max_completion_length=MAX_LEN)
    grad = lambda f: np.asarray(jax.grad(f)(jnp.asarray(b["lp"], jnp.float32)))

    # Only the KL term: zero advantages, reference == policy.
    def kl_only(lp):  # the reference is a constant equal to the current policy's values
        return jax_loss(lp, b["old"], b["lp"], jnp.zeros(B), b["mask"], beta=0.5, **kw)[0]

    kl_loss, metrics = jax_loss(b["lp"], b["old"], b["lp"], jnp.zeros(B), b["mask"], beta=0.5, **kw)
    assert float(kl_loss) == 0.0 and float(metrics["kl"]) == 0.0
    assert np.all(grad(kl_only) == 0.0)

    # Reference held fixed (not traced) at the current policy: same as no KL at all.
    def with_ref(lp):
        return jax_loss(lp, b["old"], b["lp"], b["adv"], b["mask"], beta=0.5, **kw)[0]

    def without_ref(lp):
        return jax_loss(lp, b["old"], None, b["adv"], b["mask"], beta=0.0, **kw)[0]

    np.testing.assert_allclose(grad(with_ref), grad(without_ref), atol=1e-7)


def test_kl_metric_and_clip_metrics_match_numpy(batch):
    b = batch
    eps_low, eps_high = 0.2, 0.28
    ent = np.random.default_rng(1).uniform(0.0, 2.0, (B, T))
    _, m = jax_loss(
        b["lp"], b["old"], b["ref"], b["adv"], b["mask"], beta=0.04,
        epsilon_low=eps_low, epsilon_high=eps_high, entropy=jnp.asarray(ent, jnp.float32),
    )  # fmt: skip
    mask, n = b["mask"], b["mask"].sum()
    ratio, a = np.exp(b["lp"] - b["old"]), b["adv"][:, None]
    low = (ratio < 1 - eps_low) & (a < 0)
    high = (ratio > 1 + eps_high) & (a > 0)
    d = b["ref"] - b["lp"]
    want = {
        "kl": np.sum((np.exp(d) - d - 1) * mask) / n,
        "clip_ratio/low_mean": np.sum(low * mask) / n,
        "clip_ratio/high_mean": np.sum(high * mask) / n,
        "clip_ratio/region_mean": np.sum((low | high) * mask) / n,
        "entropy": np.sum(ent * mask) / n,
        "completions/mean_length": 13 / 4,
        "completions/min_length": 0.0,
        "completions/max_length": 6.0,
    }
    assert set(m) == set(want)
    for k, v in want.items():
        np.testing.assert_allclose(float(m[k]), v, rtol=1e-5, atol=1e-7, err_msg=k)
    assert want["clip_ratio/low_mean"] > 0 and want["clip_ratio/high_mean"] > 0


# --------------------------------------------------------------------------------------------------
# Aggregation edge cases: gradient accumulation, empty completions, garbage in padding, jit
# --------------------------------------------------------------------------------------------------


def test_dapo_micro_batch_losses_sum_to_full_batch(batch):
    b = batch
    kw = dict(loss_type="dapo", beta=0.04, epsilon_high=0.28)
    full, full_grad = jax.value_and_grad(
        lambda lp: jax_loss(lp, b["old"], b["ref"], b["adv"], b["mask"], **kw)[0]
    )(jnp.asarray(b["lp"], jnp.float32))

    @jax.jit  # one compile per micro-batch shape; the token count is a traced scalar
    def micro(lp, old, ref, adv, mask, total_tokens):
        return jax.value_and_grad(
            lambda lp: grpo.policy_loss(
                lp, old, ref, adv, mask, num_items_in_batch=total_tokens, **kw
            )[0]
        )(lp)

    parts, grads = [], []
    for rows in (slice(0, 1), slice(1, 4)):  # unequal micro-batches on purpose
        args = [jnp.asarray(b[k][rows], jnp.float32) for k in ("lp", "old", "ref", "adv", "mask")]
        v, g = micro(*args, jnp.float32(b["mask"].sum()))
        parts.append(float(v))
        grads.append(np.asarray(g))
    np.testing.assert_allclose(sum(parts), float(full), rtol=1e-6)
    np.testing.assert_allclose(np.concatenate(grads), np.asarray(full_grad), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_empty_completions_and_garbage_padding_give_no_nan(batch, loss_type):
    b = batch
    garbage = lambda x: np.where(b["mask"] > 0, x, np.nan)
    kw = dict(loss_type=loss_type, beta=0.04, max_completion_length=MAX_LEN)
    for mask in (b["mask"], np.zeros((B, T))):
        old = np.where(mask > 0, b["old"], -np.inf)

        def f(lp, mask=mask, old=old):
            return jax_loss(lp, old, garbage(b["ref"]), b["adv"], mask, **kw)

        (value, metrics), grad = jax.value_and_grad(f, has_aux=True)(garbage(b["lp"]))
        assert np.isfinite(float(value))
        assert np.all(np.isfinite(np.asarray(grad))) and np.all(np.asarray(grad)[mask == 0] == 0)
        assert all(np.isfinite(float(v)) for v in metrics.values())
        if not mask.any():  # nothing to learn from: exactly zero loss
            assert float(value) == 0.0


def test_policy_loss_under_jit_matches_eager(batch):
    b = batch
    kw = dict(loss_type="dr_grpo", epsilon_high=0.28, beta=0.04, max_completion_length=MAX_LEN)
    fn = functools.partial(grpo.policy_loss, **kw)
    args = [jnp.asarray(b[k], jnp.float32) for k in ("lp", "old", "ref", "adv", "mask")]
    eager, _ = fn(*args)
    jitted, _ = jax.jit(fn)(*args)
    np.testing.assert_allclose(float(jitted), float(eager), rtol=1e-6)


def test_policy_loss_takes_lists_numpy_ints_an_empty_batch_and_names_traced_options(batch):
    b = batch
    lists = [np.asarray(b[k]).tolist() for k in ("lp", "old", "ref", "adv", "mask")]
    arrays = [jnp.asarray(b[k], jnp.float32) for k in ("lp", "old", "ref", "adv", "mask")]
    kw = dict(loss_type="dr_grpo", max_completion_length=np.int64(MAX_LEN))
    np.testing.assert_allclose(
        float(grpo.policy_loss(*lists, **kw)[0]), float(grpo.policy_loss(*arrays, **kw)[0])
    )
    np.testing.assert_array_equal(
        grpo.group_advantages(jnp.ones(4), np.int64(2)), np.zeros(4, np.float32)
    )
    for loss_type in grpo.LOSS_TYPES:  # an empty batch: 0, not NaN or a reduction error
        loss, metrics = grpo.policy_loss(
            np.zeros((0, T)),
            None,
            None,
            np.zeros(0),
            np.zeros((0, T)),
            beta=0.0,
            loss_type=loss_type,
            max_completion_length=MAX_LEN,
        )
        assert float(loss) == 0.0 and float(metrics["completions/max_length"]) == 0.0
    with pytest.raises(ValueError, match="beta must be Python numbers .*static_argnames"):
        jax.jit(grpo.policy_loss)(arrays[0], None, None, arrays[3], arrays[4], beta=0.0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(loss_type="ppo"), "loss_type"),
        (dict(beta=0.04, ref=None), "ref_logprobs"),
        (dict(loss_type="dr_grpo"), "max_completion_length"),
        (dict(loss_type="grpo", num_items_in_batch=10.0), "num_items_in_batch"),
        (dict(epsilon_low=-0.1), "epsilon_low must be >= 0"),
        (dict(epsilon_low=float("nan")), "epsilon_low must be >= 0"),
        (dict(epsilon_high=float("nan")), "epsilon_high must be >= 0 \\(not NaN\\)"),
        (dict(beta=float("nan")), "beta must be a finite number"),  # (passed every check)
        (dict(adv=np.zeros(B + 1)), "advantages"),
        (dict(mask=np.ones((B, T + 1))), "mask"),
    ],
)
def test_policy_loss_rejects_bad_input_clearly(batch, kwargs, match):
    b, kwargs = batch, dict(kwargs)
    args = dict(lp=b["lp"], old=b["old"], ref=b["ref"], adv=b["adv"], mask=b["mask"])
    for k in ("ref", "adv", "mask"):
        if k in kwargs:
            args[k] = kwargs.pop(k)
    with pytest.raises(ValueError, match=match):
        jax_loss(args["lp"], args["old"], args["ref"], args["adv"], args["mask"], **kwargs)


# --------------------------------------------------------------------------------------------------
# group_advantages and reward_metrics: hand-computed examples
# --------------------------------------------------------------------------------------------------


def test_group_advantages_uses_bessel_corrected_group_std():
    # mean 0.25; deviations (0.75, -0.25, -0.25, -0.25); sample variance 0.75 / 3 = 0.25 -> std 0.5.
    # (The population std would be 0.433, giving 1.732 rather than 1.4997 below.)
    got = grpo.group_advantages(jnp.array([1.0, 0.0, 0.0, 0.0]), group_size=4)
    want = np.array([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-4)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


def test_group_advantages_two_groups_and_all_equal_group():
    rewards = jnp.array([1.0, 2.0, 3.0, 0.1, 0.1, 0.1])
    got = np.asarray(grpo.group_advantages(rewards, group_size=3))
    # Group 1: mean 2, sample std sqrt((1 + 0 + 1) / 2) = 1. Group 2: all equal -> exactly 0.
    np.testing.assert_allclose(got[:3], np.array([-1.0, 0.0, 1.0]) / 1.0001, rtol=1e-6)
    assert np.all(got[3:] == 0.0)


def test_group_advantages_batch_and_none_scaling():
    rewards = jnp.array([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    centred = np.array([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0])  # minus each group's mean
    # Batch mean 3.5; squared deviations 6.25 + 2.25 + 0.25 + 3 * 2.25 = 15.5; / (6 - 1) = 3.1.
    batch_std = np.sqrt(3.1)
    got = grpo.group_advantages(rewards, group_size=3, scale="batch")
    np.testing.assert_allclose(np.asarray(got), centred / (batch_std + 1e-4), rtol=1e-6)
    got = grpo.group_advantages(rewards, group_size=3, scale="none")
    np.testing.assert_allclose(np.asarray(got), centred, atol=1e-7)


def test_group_advantages_degenerate_cases_and_errors():
    assert np.all(np.asarray(grpo.group_advantages(jnp.array([3.0, -1.0]), group_size=1)) == 0.0)
    assert np.all(np.asarray(grpo.group_advantages(jnp.zeros(8), group_size=4)) == 0.0)
    jitted = jax.jit(grpo.group_advantages, static_argnames=("group_size", "scale"))
    np.testing.assert_allclose(
        np.asarray(jitted(jnp.array([1.0, 0.0, 0.0, 0.0]), group_size=4)),
        np.array([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-4),
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match="multiple of group_size"):
        grpo.group_advantages(jnp.zeros(5), group_size=2)
    with pytest.raises(ValueError, match="scale"):
        grpo.group_advantages(jnp.zeros(4), group_size=2, scale="global")
    # TRL's older boolean spelling of scale_rewards carries over into a GRPOConfig.
    assert grpo.GRPOConfig(scale_rewards=True).scale_rewards == "group"
    assert grpo.GRPOConfig(scale_rewards=False).scale_rewards == "none"
    with pytest.raises(ValueError, match="grpo.scale_rewards must be one of"):
        grpo.GRPOConfig(scale_rewards="global")


def _advantages_f64(rewards, group_size, scale):
    """float64 reference: unscored (NaN) samples get 0 and are dropped from every statistic."""
    r = np.asarray(rewards, np.float64)
    out = np.zeros_like(r)
    scored = r[~np.isnan(r)]
    batch_std = np.std(scored, ddof=1) if scored.size > 1 else 0.0
    for start in range(0, r.size, group_size):
        g = r[start : start + group_size]
        keep = ~np.isnan(g)
        if not keep.any():
            continue
        dev = g[keep] - g[keep].mean()
        std = {"group": np.std(g[keep], ddof=1) if keep.sum() > 1 else 0.0, "batch": batch_std}
        out[start : start + group_size][keep] = (
            dev / (std[scale] + 1e-4) if scale != "none" else dev
        )
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_unscored_samples_get_zero_advantage_and_leave_the_statistics(scale):
    # A reward worker that died twice leaves NaN totals (rewards.compose): those samples must not
    # pull their group's mean towards a made-up 0, nor carry a NaN into the loss.
    nan = np.nan
    rewards = np.array([1.0, nan, 0.0, 0.0, nan, nan, nan, nan, 2.0, 2.0, nan, 2.0, 3.0, nan, 1, 1])
    got = np.asarray(grpo.group_advantages(jnp.asarray(rewards, jnp.float32), 4, scale))
    np.testing.assert_allclose(got, _advantages_f64(rewards, 4, scale), rtol=1e-6, atol=1e-7)
    assert np.all(got[np.isnan(rewards)] == 0.0) and np.all(got[8:12] == 0.0)
    # With every sample scored the reference is plain GRPO.
    full = np.nan_to_num(rewards, nan=0.5)
    np.testing.assert_allclose(
        np.asarray(grpo.group_advantages(jnp.asarray(full, jnp.float32), 4, scale)),
        _advantages_f64(full, 4, scale),
        rtol=1e-6,
        atol=1e-7,
    )
    m = grpo.reward_metrics(
        jnp.asarray(rewards, jnp.float32), jnp.zeros((1, 16)), ["r"], 4, scale=scale
    )
    scored = rewards[~np.isnan(rewards)]
    np.testing.assert_allclose(float(m["reward"]), scored.mean(), rtol=1e-6)
    assert float(m["frac_reward_unscored"]) == 7 / 16
    if scale == "group":  # groups' stds: (1, 0, 0), (), (2, 2, 2), (3, 1, 1)
        want = np.mean([np.std([1, 0, 0], ddof=1), 0.0, 0.0, np.std([3, 1, 1], ddof=1)])
        np.testing.assert_allclose(float(m["reward_std"]), want, rtol=1e-6)
        assert float(m["frac_reward_zero_std"]) == 0.5


def test_reward_metrics_hand_computed():
    rewards = jnp.array([1.0, 0.0, 1.0, 1.0, 2.0, 0.0])  # groups (1, 0, 1), (1, 2, 0) ... G = 3
    per_reward = jnp.array([[1.0, 0.0, 1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0, jnp.nan]])
    # Under jit, as the step may call it (names and group size are static).
    jitted = jax.jit(grpo.reward_metrics, static_argnames=("names", "group_size"))
    m = jitted(rewards, per_reward, names=("accuracy", "format"), group_size=3)
    # Group stds: (1, 0, 1): mean 2/3, squared deviations 1/9 + 4/9 + 1/9 = 6/9, / 2 -> var 1/3.
    # (1, 2, 0): mean 1, squared deviations 2, / 2 -> var 1.
    np.testing.assert_allclose(float(m["reward"]), 5 / 6, rtol=1e-6)
    np.testing.assert_allclose(float(m["reward_std"]), (np.sqrt(1 / 3) + 1.0) / 2, rtol=1e-6)
    assert float(m["frac_reward_zero_std"]) == 0.0
    np.testing.assert_allclose(float(m["rewards/accuracy/mean"]), 4 / 6, rtol=1e-6)
    # accuracy: four 1s and two 0s, mean 2/3: squared deviations 4 * (1/9) + 2 * (4/9) = 12/9.
    np.testing.assert_allclose(float(m["rewards/accuracy/std"]), np.sqrt(12 / 9 / 5), rtol=1e-6)
    # format ignores the NaN: (0, 0, 0, 0, 1): mean 0.2, sq dev 4 * 0.04 + 0.64 = 0.8, / 4 = 0.2.
    np.testing.assert_allclose(float(m["rewards/format/mean"]), 0.2, rtol=1e-6)
    np.testing.assert_allclose(float(m["rewards/format/std"]), np.sqrt(0.2), rtol=1e-6)

    equal = grpo.reward_metrics(jnp.array([1.0, 1.0, 0.0, 1.0]), jnp.zeros((1, 4)), ["r"], 2)
    assert float(equal["frac_reward_zero_std"]) == 0.5
    # scale="batch" divides by the batch std, so that is what is logged (as TRL does).
    batch = grpo.reward_metrics(rewards, per_reward, ("accuracy", "format"), 3, scale="batch")
    np.testing.assert_allclose(float(batch["reward_std"]), np.std(rewards, ddof=1), rtol=1e-6)
    assert float(batch["frac_reward_zero_std"]) == 0.0
    ones = grpo.reward_metrics(jnp.ones(4), jnp.zeros((1, 4)), ["r"], 2, scale="batch")
    assert float(ones["reward_std"]) == 0.0 and float(ones["frac_reward_zero_std"]) == 1.0
    with pytest.raises(ValueError, match="names"):
        grpo.reward_metrics(rewards, per_reward, ["only_one"], group_size=3)


def test_masked_mean():
    x = jnp.array([[1.0, 2.0, jnp.nan], [4.0, jnp.inf, 6.0]])
    mask = jnp.array([[1, 1, 0], [0, 0, 0]])
    assert float(grpo.masked_mean(x, mask)) == 1.5
    np.testing.assert_array_equal(np.asarray(grpo.masked_mean(x, mask, axis=-1)), [1.5, 0.0])


# --------------------------------------------------------------------------------------------------
# Token log-probs: full logits vs numpy, chunked vs full (value and gradient), no [B, T, V] buffer
# --------------------------------------------------------------------------------------------------

D, V, TL = 8, 13, 7  # TL = 7 positions, chunks of 3: exercises the padded last chunk


@pytest.fixture(scope="module")
def hidden_batch():
    rng = np.random.default_rng(2)
    hidden = jnp.asarray(rng.normal(0, 1, (2, TL, D)), jnp.float32)
    w = jnp.asarray(rng.normal(0, 1, (D, V)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, (2, TL)), jnp.int32)
    return hidden, w, targets


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@functools.partial(jax.jit, static_argnums=2)
def logprobs_and_entropy(logits, targets, temperature):
    return (
        grpo.token_logprobs(logits, targets, temperature=temperature),
        grpo.token_entropy(logits, temperature=temperature),
    )


def test_token_logprobs_and_entropy_match_numpy(hidden_batch):
    hidden, w, targets = hidden_batch
    logits = np.asarray(hidden, np.float64) @ np.asarray(w, np.float64) * 10.0  # large: stability
    for temp in (1.0, 0.7):
        ls = np_log_softmax(logits / temp)
        want = np.take_along_axis(ls, np.asarray(targets)[..., None], -1)[..., 0]
        got, ent = logprobs_and_entropy(jnp.asarray(logits, jnp.float32), targets, temp)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(np.asarray(ent), -np.sum(np.exp(ls) * ls, -1), atol=1e-4)


@functools.partial(jax.jit, static_argnames="chunk_size")
def outputs_and_grads(h, w, targets, c1, c2, chunk_size=None):
    """Log-probs, entropies and the gradient of a generic linear functional of both.

    chunk_size=None: through the full [B, T, V] logits; otherwise the chunked path.
    """

    def outputs(h, w):
        if chunk_size is None:
            logits = h @ w
            lp = grpo.token_logprobs(logits, targets, temperature=0.8)
            return lp, grpo.token_entropy(logits, temperature=0.8)
        return grpo.chunked_token_logprobs(
            h, w, targets, chunk_size=chunk_size, temperature=0.8, with_entropy=True
        )

    def scalar(h, w):
        lp, ent = outputs(h, w)
        return jnp.sum(c1 * lp) + jnp.sum(c2 * ent), (lp, ent)

    return jax.grad(scalar, argnums=(0, 1), has_aux=True)(h, w)


@pytest.mark.parametrize("chunk_size", (3, 64))
def test_chunked_logprobs_equal_full_logits_with_gradient(hidden_batch, chunk_size):
    hidden, w, targets = hidden_batch
    rng = np.random.default_rng(3)
    c1, c2 = (jnp.asarray(rng.normal(0, 1, (2, TL)), jnp.float32) for _ in range(2))
    grads_full, outs_full = outputs_and_grads(hidden, w, targets, c1, c2)
    grads_chunk, outs_chunk = outputs_and_grads(hidden, w, targets, c1, c2, chunk_size)
    for a, b in zip(outs_full + grads_full, outs_chunk + grads_chunk, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, rtol=1e-6)
    lp_only, ent = jax.eval_shape(
        lambda: grpo.chunked_token_logprobs(hidden, w, targets, chunk_size=chunk_size)
    )
    assert ent is None and lp_only.shape == (2, TL)


def _all_avals(jaxpr):
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            yield v.aval
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _all_avals(inner)


def test_chunked_backward_never_holds_full_logits():
    b, t, d, v, chunk = 2, 32, 4, 97, 4
    hidden = jnp.ones((b, t, d))
    w = jnp.ones((d, v))
    targets = jnp.zeros((b, t), jnp.int32)

    def loss(h, w):
        return jnp.sum(grpo.chunked_token_logprobs(h, w, targets, chunk_size=chunk)[0])

    avals = list(_all_avals(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(hidden, w).jaxpr))
    biggest = max(a.size for a in avals if a.shape and a.shape[-1] == v)
    assert biggest <= b * chunk * v, f"a {biggest}-element vocab-sized buffer exists"
