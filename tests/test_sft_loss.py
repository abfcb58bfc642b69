"""SFT losses against an independent float64 numpy reference (values and gradients)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import sft

B, T, D, V = 3, 5, 6, 11


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    hidden = rng.normal(0, 1, (B, T, D))
    w = rng.normal(0, 1, (D, V))
    targets = rng.integers(0, V, (B, T))
    # Row 0: 2 prompt positions then completion; row 1: completion then padding; row 2: all prompt.
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]], float)
    return dict(hidden=hidden, w=w, logits=hidden @ w, targets=targets, mask=mask)


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_ce_and_grad(logits, targets, mask, n_items=None):
    """Masked mean CE and its analytic gradient w.r.t. logits, float64."""
    ls = np_log_softmax(np.asarray(logits, np.float64))
    nll = -np.take_along_axis(ls, targets[..., None], -1)[..., 0]
    n = max(mask.sum() if n_items is None else n_items, 1.0)
    onehot = np.eye(ls.shape[-1])[targets]
    grad = (np.exp(ls) - onehot) * (mask / n)[..., None]
    return float(np.sum(nll * mask) / n), grad


def np_kl_and_grad(student, teacher, mask, temperature):
    """Masked mean KL(teacher || student) and its analytic gradient w.r.t. student logits."""
    ls = np_log_softmax(np.asarray(student, np.float64) / temperature)
    lt = np_log_softmax(np.asarray(teacher, np.float64) / temperature)
    kl = np.sum(np.exp(lt) * (lt - ls), -1)
    n = max(mask.sum(), 1.0)
    grad = (np.exp(ls) - np.exp(lt)) / temperature * (mask / n)[..., None]
    return float(np.sum(kl * mask) / n), grad


f32 = functools.partial(jnp.asarray, dtype=jnp.float32)


@jax.jit
def ce_value_and_grad(logits, targets, mask, n_items=None):
    def loss(logits):
        return sft.masked_cross_entropy(logits, targets, mask, num_items_in_batch=n_items)

    return jax.value_and_grad(loss, has_aux=True)(logits)


def test_masked_cross_entropy_matches_numpy_and_ignores_prompt(data):
    want, want_grad = np_ce_and_grad(data["logits"], data["targets"], data["mask"])
    (got, metrics), grad = ce_value_and_grad(f32(data["logits"]), data["targets"], data["mask"])
    np.testing.assert_allclose(float(got), want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), want_grad, atol=1e-7, rtol=1e-5)
    assert float(metrics["num_tokens"]) == 6.0
    # Prompt and padding positions: exactly zero gradient on every logit,
    assert np.all(np.asarray(grad)[data["mask"] == 0] == 0.0)
    # and the loss does not depend on what the model predicts there.
    scrambled = np.where(data["mask"][..., None] > 0, data["logits"], 1e3)
    (again, _), _ = ce_value_and_grad(f32(scrambled), data["targets"], data["mask"])
    np.testing.assert_allclose(float(again), want, rtol=1e-6)


def test_cross_entropy_micro_batches_sum_to_full_batch(data):
    (full, _), full_grad = ce_value_and_grad(f32(data["logits"]), data["targets"], data["mask"])
    total = jnp.float32(data["mask"].sum())
    parts, grads = [], []
    for rows in (slice(0, 1), slice(1, 3)):
        (v, _), g = ce_value_and_grad(
            f32(data["logits"][rows]), data["targets"][rows], data["mask"][rows], total
        )
        parts.append(float(v))
        grads.append(np.asarray(g))
    np.testing.assert_allclose(sum(parts), float(full), rtol=1e-6)
    np.testing.assert_allclose(np.concatenate(grads), np.asarray(full_grad), atol=1e-9)


@functools.partial(jax.jit, static_argnames="chunk_size")
def ce_grads_from_hidden(h, w, targets, mask, chunk_size=None):
    """CE and its gradient w.r.t. (hidden, unembedding): full logits if chunk_size is None."""

    def loss(h, w):
        if chunk_size is None:
            return sft.masked_cross_entropy(h @ w, targets, mask)[0]
        return sft.chunked_cross_entropy(h, w, targets, mask, chunk_size=chunk_size)[0]

    return jax.value_and_grad(loss, argnums=(0, 1))(h, w)


@pytest.mark.parametrize("chunk_size", (2, 128))
def test_chunked_cross_entropy_equals_full_with_gradient(data, chunk_size):
    args = f32(data["hidden"]), f32(data["w"]), data["targets"], f32(data["mask"])
    full, (gh_full, gw_full) = ce_grads_from_hidden(*args)
    chunk, (gh_chunk, gw_chunk) = ce_grads_from_hidden(*args, chunk_size=chunk_size)
    np.testing.assert_allclose(float(chunk), float(full), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(gh_chunk), np.asarray(gh_full), atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(gw_chunk), np.asarray(gw_full), atol=1e-6, rtol=1e-6)
    want, _ = np_ce_and_grad(data["logits"], data["targets"], data["mask"])
    np.testing.assert_allclose(float(chunk), want, rtol=1e-5)
    assert np.all(np.asarray(gh_chunk)[data["mask"] == 0] == 0.0)


@functools.partial(jax.jit, static_argnums=3)
def distillation_grads(student, teacher, mask, temperature):
    def loss(student, teacher):
        return sft.logit_distillation_loss(student, teacher, mask, temperature)[0]

    return jax.value_and_grad(loss, argnums=(0, 1))(student, teacher)


@pytest.mark.parametrize("temperature", (1.0, 2.0))
def test_logit_distillation_matches_numpy(data, temperature):
    rng = np.random.default_rng(1)
    teacher = rng.normal(0, 2, (B, T, V))
    want, want_grad = np_kl_and_grad(data["logits"], teacher, data["mask"], temperature)

    got, (g_student, g_teacher) = distillation_grads(
        f32(data["logits"]), f32(teacher), f32(data["mask"]), temperature
    )
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g_student), want_grad, atol=1e-7, rtol=1e-5)
    assert np.all(np.asarray(g_teacher) == 0.0)  # the teacher is a fixed target
    assert np.all(np.asarray(g_student)[data["mask"] == 0] == 0.0)


@functools.partial(jax.jit, static_argnames=("chunk_size", "vocab"))
def chunked_distillation_grads(h, w, teacher_h, teacher_w, mask, chunk_size, vocab=0):
    def loss(h, w, teacher_h, teacher_w):
        return sft.chunked_distillation_loss(
            h, w, teacher_h, teacher_w, mask, 2.0, vocab=vocab, chunk_size=chunk_size
        )[0]

    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(h, w, teacher_h, teacher_w)


@pytest.mark.parametrize("chunk_size", (2, 128))
def test_chunked_distillation_matches_numpy_with_gradient(data, chunk_size):
    """The distillation step's KL from hidden states, a chunk of positions' logits at a time (two
    whole [N, L, V] logits did not fit a device at Qwen's vocabulary): the float64 loss, and the
    gradients of the full-logits loss; the teacher (another width) gets none."""
    rng = np.random.default_rng(2)
    teacher_h, teacher_w = rng.normal(0, 1, (B, T, 5)), rng.normal(0, 1, (5, V))
    mask = f32(data["mask"])
    args = f32(data["hidden"]), f32(data["w"]), f32(teacher_h), f32(teacher_w), mask
    got, (gh, gw, gth, gtw) = chunked_distillation_grads(*args, chunk_size)
    want, _ = np_kl_and_grad(data["hidden"] @ data["w"], teacher_h @ teacher_w, data["mask"], 2.0)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)

    def full(h, w):
        return sft.logit_distillation_loss(h @ w, f32(teacher_h @ teacher_w), mask, 2.0)[0]

    _, (want_gh, want_gw) = jax.value_and_grad(full, argnums=(0, 1))(*args[:2])
    np.testing.assert_allclose(np.asarray(gh), np.asarray(want_gh), atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gw), np.asarray(want_gw), atol=1e-6, rtol=1e-5)
    assert not np.any(np.asarray(gth)) and not np.any(np.asarray(gtw))
    # `vocab`: embedding rows past the tokenizer are no tokens (of either distribution).
    cut, _ = chunked_distillation_grads(*args, chunk_size, vocab=V - 2)
    want, _ = np_kl_and_grad(
        data["hidden"] @ data["w"][:, :-2], teacher_h @ teacher_w[:, :-2], data["mask"], 2.0
    )
    np.testing.assert_allclose(float(cut), want, rtol=1e-5)


def test_distillation_is_zero_for_identical_models_and_handles_forbidden_tokens(data):
    logits, mask = f32(data["logits"]), f32(data["mask"])
    same, (grad, _) = distillation_grads(logits, logits, mask, 1.0)
    assert abs(float(same)) < 1e-6 and np.max(np.abs(np.asarray(grad))) < 1e-7
    # A teacher that rules tokens out entirely (-inf logits) must not produce NaN.
    teacher = logits.at[..., :3].set(-jnp.inf)
    loss, (grad, _) = distillation_grads(logits, teacher, mask, 1.0)
    assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad)))
    # Reference: the sum over the allowed tokens only, with the student normalised over all of V.
    ls = np_log_softmax(data["logits"])
    lt = np_log_softmax(data["logits"][..., 3:])
    kl = np.sum(np.exp(lt) * (lt - ls[..., 3:]), -1)
    want = np.sum(kl * data["mask"]) / data["mask"].sum()
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_sft_losses_reject_bad_shapes(data):
    logits = f32(data["logits"])
    with pytest.raises(ValueError, match="loss_mask"):
        sft.masked_cross_entropy(logits, data["targets"], data["mask"][:, :-1])
    with pytest.raises(ValueError, match="teacher_logits"):
        sft.logit_distillation_loss(logits, logits[..., :-1], data["mask"])
    with pytest.raises(ValueError, match="unembedding"):
        sft.chunked_cross_entropy(
            f32(data["hidden"]), f32(data["w"]).T, data["targets"], data["mask"]
        )
    # The chunked distillation too (a raw broadcasting or reshape error before): the two
    # vocabularies, or the first `vocab` ids of both, and the positions must agree.
    h, w, mask = f32(data["hidden"]), f32(data["w"]), data["mask"]
    for teacher_h, teacher_w, vocab in (
        (h, w[:, :-1], 0),
        (h, w, V + 1),
        (h[:, :-1], w, 0),
    ):
        with pytest.raises(ValueError, match="must share"):
            sft.chunked_distillation_loss(h, w, teacher_h, teacher_w, mask, vocab=vocab)
    sft.chunked_distillation_loss(h, w, h, w[:, :-1], mask, vocab=V - 1)  # (the first ids: fine)
