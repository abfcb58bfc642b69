"""The SFT and distillation steps on tiny models: packing, prompt masking, learning, bf16 compute.

References are float64 numpy computations on logits from the model's plain forward. Every batch
here is [8, 16] (packed rows are padded with empty rows), so each program compiles once.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_train import CFG, tiny_model

from r1jax import sft, train
from r1jax.data.batching import pack_sft_ids

ROWS, L = 8, 16
OPTIM = train.OptimConfig(learning_rate=1e-2)


def examples(seed: int = 0):
    rng = np.random.RandomState(seed)
    prompts = [rng.randint(1, 96, rng.randint(1, 6)).tolist() for _ in range(ROWS)]
    completions = [rng.randint(1, 96, rng.randint(2, 7)).tolist() for _ in range(ROWS)]
    return prompts, completions


def as_rows(batch, rows: int = ROWS) -> dict:
    """SFTBatch -> dict of [rows, L] arrays, padded with empty rows (nothing to learn)."""
    out = {}
    for k in sft.SFT_FIELDS:
        x = getattr(batch, k)
        out[k] = np.concatenate([x, np.zeros((rows - len(x), L), x.dtype)])
    return out


@pytest.fixture(scope="module")
def batches():
    prompts, completions = examples()
    unpacked = pack_sft_ids(prompts, completions, seq_len=L, pad_id=0)
    packed = pack_sft_ids(prompts, completions, seq_len=L, pad_id=0, pack=True)
    assert len(packed.input_ids) < ROWS and packed.segment_ids.max() > 1  # really packed
    return prompts, completions, as_rows(unpacked), as_rows(packed)


def forward_and_loss(params, batch, graphdef):
    model = nnx.merge(graphdef, params)
    logits = model(
        batch["input_ids"],
        batch["attention_mask"],
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
    )
    return logits, sft.sft_loss(model, batch, chunk_size=5)[0]  # 15 positions: 3 chunks


_forward_and_loss = jax.jit(forward_and_loss, static_argnums=2)


def run_forward(model, batch):
    graphdef, params = nnx.split(model)
    return jax.device_get(_forward_and_loss(params, batch, graphdef))


def completion_logprobs(logits, batch, completions):
    """float64 log p of every completion token, per example (examples are laid out in order:
    rows top to bottom, segments left to right), read from the logits of the row holding it."""
    logp = np.asarray(logits, np.float64)
    logp = logp - logp.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    starts = [
        (r, int(np.argmax(batch["segment_ids"][r] == s)))
        for r in range(ROWS)
        for s in range(1, batch["segment_ids"][r].max() + 1)
    ]
    out = []
    for (r, start), c in zip(starts, completions, strict=True):
        end = start + int(np.sum(batch["segment_ids"][r] == batch["segment_ids"][r, start]))
        assert batch["input_ids"][r, end - len(c) : end].tolist() == c
        out.append([logp[r, t - 1, batch["input_ids"][r, t]] for t in range(end - len(c), end)])
    return out


# --------------------------------------------------------------------------------------------------
# Packing and the loss value
# --------------------------------------------------------------------------------------------------


def test_packed_rows_score_each_example_as_if_alone(batches):
    _, completions, unpacked, packed = batches
    model = tiny_model(std=0.1)
    logits_u, loss_u = run_forward(model, unpacked)
    logits_p, loss_p = run_forward(model, packed)
    per_example_u = completion_logprobs(logits_u, unpacked, completions)
    per_example_p = completion_logprobs(logits_p, packed, completions)
    for a, b in zip(per_example_p, per_example_u, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # The loss: mean cross-entropy over completion tokens only (prompt targets excluded).
    reference = -np.mean(np.concatenate(per_example_u))
    np.testing.assert_allclose(loss_u, reference, rtol=1e-5)
    np.testing.assert_allclose(loss_p, reference, rtol=1e-5)


def test_segment_ids_need_positions_and_no_cache():
    model = tiny_model()
    ids = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="explicit positions"):
        model(ids, segment_ids=jnp.ones((1, 4), jnp.int32))


# --------------------------------------------------------------------------------------------------
# The SFT step: bfloat16 compute on float32 master weights
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_state():
    return train.TrainState.create(tiny_model(std=0.1, dtype="bfloat16"), OPTIM)


def test_prompt_tokens_get_no_gradient(bf16_state, batches):
    _, _, _, packed = batches
    prompt_only = dict(packed, loss_mask=np.zeros_like(packed["loss_mask"]))
    before = [np.asarray(x) for x in jax.tree.leaves(nnx.state(bf16_state.model))]
    metrics = jax.device_get(sft.train_step(bf16_state, prompt_only))
    assert metrics["num_tokens"] == 0 and metrics["loss"] == 0 and metrics["grad_norm"] == 0
    after = [np.asarray(x) for x in jax.tree.leaves(nnx.state(bf16_state.model))]
    for a, b in zip(after, before, strict=True):
        np.testing.assert_array_equal(a, b)  # a zero gradient moves nothing (no weight decay)


def test_sft_loss_decreases_with_bf16_compute_and_f32_master_weights(bf16_state, batches):
    _, completions, unpacked, packed = batches
    f32_logits, _ = run_forward(tiny_model(std=0.1), unpacked)  # same weights, float32 compute
    reference = -np.mean(np.concatenate(completion_logprobs(f32_logits, unpacked, completions)))
    losses = [float(sft.train_step(bf16_state, packed)["loss"]) for _ in range(8)]
    np.testing.assert_allclose(losses[0], reference, rtol=2e-2)  # bfloat16 matmuls
    assert losses[-1] < 0.7 * losses[0], losses
    for x in jax.tree.leaves(nnx.state(bf16_state.model)):
        assert x.dtype == jnp.float32  # master weights
    for x in jax.tree.leaves(nnx.state(bf16_state.optimizer.opt_state)):
        assert x.dtype in (jnp.float32, jnp.int32)  # moments (and counters)


# --------------------------------------------------------------------------------------------------
# Distillation
# --------------------------------------------------------------------------------------------------


def test_distillation_step_matches_numpy_kl_and_moves_towards_the_teacher(batches):
    _, _, unpacked, _ = batches
    student, teacher = tiny_model(std=0.1), tiny_model(seed=1, std=0.3)
    s_logits, _ = run_forward(student, unpacked)
    t_logits, _ = run_forward(teacher, unpacked)
    ls = s_logits - np.log(np.exp(s_logits.astype(np.float64)).sum(-1, keepdims=True))
    lt = t_logits - np.log(np.exp(t_logits.astype(np.float64)).sum(-1, keepdims=True))
    kl = np.sum(np.exp(lt) * (lt - ls), -1)[:, :-1]  # position t predicts token t + 1
    targets, mask = jax.device_get(sft.next_token_targets(unpacked))
    reference = np.sum(kl * mask) / mask.sum()

    teacher_before = [np.asarray(x) for x in jax.tree.leaves(nnx.state(teacher))]
    state = train.TrainState.create(student, OPTIM)
    losses = [float(sft.distill_step(state, teacher, unpacked)["loss"]) for _ in range(6)]
    np.testing.assert_allclose(losses[0], reference, rtol=1e-5)
    assert losses[-1] < 0.7 * losses[0], losses
    for a, b in zip(jax.tree.leaves(nnx.state(teacher)), teacher_before, strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)  # read, never donated or trained

    other_vocab = tiny_model(vocab_size=CFG.vocab_size + 1)
    with pytest.raises(ValueError, match="distill_vocab to the tokenizer's size"):
        sft.distill_step(state, other_vocab, unpacked)


def test_distillation_on_packed_rows_at_a_temperature_in_micro_batches_matches_numpy(batches):
    """KL(teacher || student) of both distributions at temperature T (no T^2 factor), over
    completion tokens only, from packed rows cut into 2 micro-batches and logits chunks of 5:
    the reference is each example alone in its row (the unpacked batch), in float64."""
    _, _, unpacked, packed = batches
    student, teacher = tiny_model(std=0.1), tiny_model(seed=1, std=0.3)
    temperature = 2.0

    def log_softmax(logits):
        x = np.asarray(logits, np.float64) / temperature
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    ls = log_softmax(run_forward(student, unpacked)[0])
    lt = log_softmax(run_forward(teacher, unpacked)[0])
    kl = np.sum(np.exp(lt) * (lt - ls), -1)[:, :-1]  # position t predicts token t + 1
    _, mask = jax.device_get(sft.next_token_targets(unpacked))
    reference = np.sum(kl * mask) / mask.sum()
    cfg = sft.SFTConfig(num_micro_batches=2, distill_temperature=temperature, logits_chunk_size=5)
    state = train.TrainState.create(student, OPTIM)
    got = float(sft.distill_step(state, teacher, packed, cfg)["loss"])
    np.testing.assert_allclose(got, reference, rtol=1e-5)


def test_distillation_compares_the_tokenizer_ids_of_a_differently_padded_teacher(batches):
    """One tokenizer, two embedding tables padded to different sizes (Qwen2.5-7B's 152064 rows,
    1.5B's 151936, for 151665 tokens): distillation stopped at its first step, saying the two
    models need one tokenizer. With `distill_vocab`, the distributions over the tokenizer's ids
    are compared: the padded teacher's extra rows change nothing."""
    _, _, unpacked, _ = batches
    teacher = tiny_model(seed=1, std=0.3)
    padded = tiny_model(seed=2, std=0.3, vocab_size=CFG.vocab_size + 8)
    flat = dict(nnx.to_flat_state(nnx.state(teacher)))
    for path, v in nnx.to_flat_state(nnx.state(padded)):
        src = np.asarray(flat[path].get_value())
        v.set_value(v.get_value().at[tuple(slice(n) for n in src.shape)].set(src))
    padded_logits = run_forward(padded, unpacked)[0]
    np.testing.assert_allclose(  # the same model on the tokenizer's ids, ...
        padded_logits[..., : CFG.vocab_size], run_forward(teacher, unpacked)[0], atol=1e-5
    )
    assert np.abs(padded_logits[..., CFG.vocab_size :]).max() > 0.1  # ... mass on the padding
    cfg = sft.SFTConfig(distill_vocab=CFG.vocab_size)
    losses = []
    for t in (teacher, padded):
        state = train.TrainState.create(tiny_model(std=0.1), OPTIM)
        losses.append(float(sft.distill_step(state, t, unpacked, cfg)["loss"]))
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-6)
    with pytest.raises(ValueError, match="exceeds"):
        sft.distill_step(state, padded, unpacked, sft.SFTConfig(distill_vocab=CFG.vocab_size + 1))


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def test_bad_batches_and_configs_fail_clearly(batches):
    _, _, unpacked, _ = batches
    with pytest.raises(ValueError, match="lacks"):
        sft.sft_arrays({k: v for k, v in unpacked.items() if k != "positions"})
    with pytest.raises(ValueError, match=r"\[N, L\]"):
        sft.sft_arrays(dict(unpacked, loss_mask=unpacked["loss_mask"][:, :-1]))
    with pytest.raises(ValueError, match="num_micro_batches"):
        sft.SFTConfig(num_micro_batches=0)
    with pytest.raises(ValueError, match="total_steps"):
        dataclasses.replace(OPTIM, schedule="cosine")
