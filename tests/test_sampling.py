"""The sampler against full recomputation, transformers generate, the training forward, and itself
on a mesh."""

import functools
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import VOCAB, hf_checkpoint, torch_model

from r1jax import data, grpo, sampling, sharding
from r1jax.models import hf

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [40, 41, 42, 43, 44], [1, 2]]


@functools.cache
def model():
    return hf.load(hf_checkpoint("qwen2_sharp"))


def test_greedy_matches_transformers_generate():
    import torch

    out = sampling.generate(model(), PROMPTS, max_new_tokens=12, temperature=0.0)
    tm = torch_model(hf_checkpoint("qwen2_sharp"))
    for prompt, ours in zip(PROMPTS, out.tokens, strict=True):
        ref = tm.generate(
            torch.tensor([prompt]),
            do_sample=False,
            max_new_tokens=12,
            min_new_tokens=12,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
        assert ours == ref


def test_greedy_cached_equals_full_recomputation():
    out = sampling.generate(model(), PROMPTS, max_new_tokens=10, temperature=0.0)
    # Recompute the whole forward at every step; right padding to one length keeps it one compile
    # (causal attention means the pads after the last real token cannot affect it).
    length = max(map(len, PROMPTS)) + 10
    forward = jax.jit(lambda ids, mask: model()(ids, attention_mask=mask))
    for prompt, ours in zip(PROMPTS, out.tokens, strict=True):
        seq = list(prompt)
        for _ in range(10):
            ids = np.zeros((1, length), np.int32)
            ids[0, : len(seq)] = seq
            mask = (np.arange(length) < len(seq)).astype(np.int32)[None]
            logits = forward(jnp.asarray(ids), jnp.asarray(mask))
            seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
        assert ours == seq[len(prompt) :]


def _assert_logprobs_equal_training_forward(m, out, num_samples):
    """The sampler's per-token log-probs (KV-cached decode) against one uncached forward."""
    dev = jax.device_get(out.device)
    prompt_ids = np.repeat(out.prompt_ids, num_samples, axis=0)
    prompt_mask = np.repeat(out.prompt_mask, num_samples, axis=0)
    ids = np.concatenate([prompt_ids, dev.tokens], axis=1)
    mask = np.concatenate([prompt_mask, dev.mask], axis=1)
    logits = m(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    logp = jax.nn.log_softmax(logits, axis=-1)
    t = prompt_ids.shape[1]
    # Token t+i is predicted by position t+i-1.
    ref = jnp.take_along_axis(logp[:, t - 1 : -1], jnp.asarray(dev.tokens)[..., None], -1)[..., 0]
    ref = np.asarray(ref) * dev.mask
    np.testing.assert_allclose(dev.logprobs, ref, atol=1e-5)
    assert dev.mask.sum() > 0


def test_logprobs_equal_training_forward():
    out = sampling.generate(
        model(), PROMPTS, max_new_tokens=10, temperature=1.0, top_k=20, num_samples=2, seed=3
    )
    _assert_logprobs_equal_training_forward(model(), out, 2)


# MQA with a sliding window shorter than the sequences, per-head q/k norm with head_dim 24, llama3
# rope scaling: the cached decode (one cache segment with G = 1, a shared prefix with G = 2)
# against the uncached forward. (Dynamic NTK is left out: like HF, it rescales rope by the longest
# position of each call, so cached and uncached calls differ by design.)
@pytest.mark.parametrize("family", ["mistral", "qwen3", "llama3"])
@pytest.mark.parametrize("num_samples", [1, 2])
def test_cached_decode_equals_uncached_forward_across_families(family, num_samples):
    m = hf.load(hf_checkpoint(family))
    out = sampling.generate(
        m, PROMPTS, max_new_tokens=8, temperature=1.0, num_samples=num_samples, seed=1
    )
    _assert_logprobs_equal_training_forward(m, out, num_samples)


def test_decode_windows_double_and_end_at_the_budget():
    assert sampling.decode_windows(128, 32) == (32, 64, 128)
    assert sampling.decode_windows(4096, 512) == (512, 1024, 2048, 4096)
    assert sampling.decode_windows(100, 32) == (32, 64, 100)
    assert sampling.decode_windows(65, 32) == (32, 65)  # no 64-slot phase for one more slot
    assert sampling.decode_windows(48, 32) == (48,)  # 47 decode steps: too few to split
    assert sampling.decode_windows(128, 0) == (128,)
    assert sampling.decode_windows(8, 32) == (8,)
    assert sampling.decode_windows(3, 2) == (3,)  # a second phase would never run a step
    assert sampling.decode_windows(3, 1) == (1, 3)
    assert sampling.decode_windows(1, 32) == (1,)


@pytest.mark.parametrize("num_samples", [1, 2])
def test_growing_decode_cache_changes_nothing(num_samples):
    """Decode in phases of 2, 4 then 10 cache slots (the cache copied into a longer one twice)
    against one 10-slot phase, sampling at temperature 1 (a step off in the uniforms or a slot
    lost in a copy changes the tokens), with a stop token ending some rows in the first and
    some in the last phase."""
    kw = dict(max_new_tokens=10, temperature=1.0, num_samples=num_samples, seed=5)
    free = sampling.generate(model(), PROMPTS, first_window=0, **kw)
    stop = free.tokens[0][1]
    assert stop not in free.tokens[0][:1]
    kw["stop_token_ids"] = (stop,)
    one = sampling.generate(model(), PROMPTS, first_window=0, **kw)
    grown = sampling.generate(model(), PROMPTS, first_window=2, **kw)
    assert grown.tokens == one.tokens and grown.stop_reason == one.stop_reason
    lengths = sorted(map(len, one.tokens))
    assert lengths[0] <= 2 and lengths[-1] > 6  # rows end in the first and in the last phase
    for a, b in zip(grown.logprobs, one.logprobs, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    _assert_logprobs_equal_training_forward(model(), grown, num_samples)


def test_kv_cache_layout():
    """Keys [B, K, H, S], values [B, K, S, H] (the layout the attention products read in place)."""
    cfg = model().cfg
    cache = model().init_cache(3, 11)
    assert cache.k[0].shape == (3, cfg.num_kv_heads, cfg.head_dim, 11)
    assert cache.v[0].shape == (3, cfg.num_kv_heads, 11, cfg.head_dim)
    # A write past the end overwrote the last slots silently (dynamic_update_slice clamps its
    # start) and moved the index on: an eager call is refused.
    ids = jnp.ones((3, 8), jnp.int32)
    _, cache = model()(ids, cache=cache)
    with pytest.raises(ValueError, match="has 3 free slots of 11 and this call writes 8"):
        model()(ids, cache=cache)


def test_padding_amount_does_not_change_tokens():
    short = sampling.generate(model(), PROMPTS, max_new_tokens=8, temperature=0.0, buckets=(8,))
    long = sampling.generate(model(), PROMPTS, max_new_tokens=8, temperature=0.0, buckets=(32,))
    assert short.prompt_ids.shape[1] == 8 and long.prompt_ids.shape[1] == 32
    assert short.tokens == long.tokens
    for a, b in zip(short.logprobs, long.logprobs, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_a_pad_id_past_the_embedding_changes_nothing():
    """A tokenizer's pad id the embedding was not resized for gave NaN embeddings in the padding,
    which the masked attention still multiplied (0 * NaN) into every real token: all rows NaN,
    tokens 0, in sampling and in the training forward alike."""
    vocab = model().cfg.vocab_size
    kw = dict(max_new_tokens=6, temperature=0.0, buckets=(8,))
    ours = sampling.generate(model(), PROMPTS, pad_id=vocab, **kw)
    want = sampling.generate(model(), PROMPTS, **kw)
    assert ours.tokens == want.tokens
    for a, b in zip(ours.logprobs, want.logprobs, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    ids = jnp.asarray([[vocab, vocab, 5, 6], [7, 8, 9, vocab]])
    mask = (ids < vocab).astype(jnp.int32)
    logits = np.asarray(model()(ids, attention_mask=mask))
    assert np.isfinite(logits[np.asarray(mask) > 0]).all()
    np.testing.assert_allclose(logits[0, 2:], np.asarray(model()(ids[:1, 2:]))[0], atol=1e-4)


def test_group_samples_share_prefill_and_match_single_sample():
    one = sampling.generate(model(), PROMPTS, max_new_tokens=6, temperature=0.0)
    four = sampling.generate(model(), PROMPTS, max_new_tokens=6, temperature=0.0, num_samples=4)
    for p, tokens in enumerate(one.tokens):
        assert four.tokens[4 * p : 4 * p + 4] == [tokens] * 4


def test_stop_tokens_end_rows_and_truncation_is_marked():
    free = sampling.generate(model(), PROMPTS, max_new_tokens=8, temperature=0.0)
    stop = free.tokens[0][3]  # make row 0 stop at its 4th token
    assert stop not in free.tokens[0][:3]
    out = sampling.generate(
        model(), PROMPTS, max_new_tokens=8, temperature=0.0, stop_token_ids=(stop, VOCAB + 5)
    )
    dev = jax.device_get(out.device)
    assert out.tokens[0] == free.tokens[0][:4]
    assert dev.lengths[0] == 4 and dev.stop_reason[0] == sampling.STOP_TOKEN
    assert dev.mask[0].tolist() == [1] * 4 + [0] * 4
    assert (dev.tokens[0, 4:] == 0).all() and (dev.logprobs[0, 4:] == 0).all()
    for i, tokens in enumerate(free.tokens):
        if stop not in tokens:
            assert dev.stop_reason[i] == sampling.LENGTH and dev.lengths[i] == 8


def test_stop_strings_end_rows_after_the_token_that_completes_them():
    """A row ends once its completion's text holds a stop string, wherever the string starts:
    inside a token, across several, never in the prompt."""
    free = sampling.generate(model(), PROMPTS, max_new_tokens=8, temperature=0.0)
    vocab = model().cfg.vocab_size
    texts = [f"<{i}>" for i in range(vocab - 3)]  # narrower than the embedding, like Qwen's

    def text(ids):
        return "".join(texts[t] if t < len(texts) else "" for t in ids)

    strings = (
        text(free.tokens[0][2:4])[2:],  # starts inside row 0's 3rd token, ends with its 4th
        text(free.tokens[1][4:7]),  # three tokens of row 1
        text([PROMPTS[2][-1], free.tokens[2][0]]),  # straddles the prompt: must not stop row 2
    )
    found = data.StopStrings(texts, strings)
    out = sampling.generate(model(), PROMPTS, max_new_tokens=8, temperature=0.0, stop_strings=found)
    dev = jax.device_get(out.device)
    for i, tokens in enumerate(free.tokens):
        ends = [n for n in range(1, 9) if any(s in text(tokens[:n]) for s in strings)]
        n = ends[0] if ends else None
        assert out.tokens[i] == tokens[: n or 8], i
        assert dev.stop_reason[i] == (sampling.LENGTH if n is None else sampling.STOP_TOKEN)
    assert len(out.tokens[0]) <= 4 and len(out.tokens[1]) <= 7 and len(out.tokens[2]) > 1
    # transformers' spellings: one string is one stop string (each character stopped), and a
    # list of strings is refused by name (it failed with AttributeError inside the call).
    assert data.StopStrings(texts, strings[1]).strings == (strings[1],)
    with pytest.raises(ValueError, match=r"StopStrings.for_tokenizer"):
        sampling.generate(model(), PROMPTS, max_new_tokens=8, stop_strings=list(strings))
    empty = sampling.generate(model(), PROMPTS, max_new_tokens=8, temperature=0.0, stop_strings=[])
    assert empty.tokens == free.tokens  # (an empty list is none, as it was)


def test_early_exit_when_every_row_stopped():
    free = sampling.generate(model(), [PROMPTS[0]], max_new_tokens=8, temperature=0.0)
    out = sampling.generate(
        model(),
        [PROMPTS[0]],
        max_new_tokens=8,
        temperature=0.0,
        stop_token_ids=(free.tokens[0][0],),
        first_window=2,  # every row stops in the first of three phases
    )
    assert out.tokens == [free.tokens[0][:1]]


def _empirical(cfg, logits, n=40000, seed=0):
    draws = cfg.sample(jnp.broadcast_to(logits, (n, logits.shape[-1])), jax.random.key(seed))
    return np.bincount(np.asarray(draws), minlength=logits.shape[-1]) / n


def _reference(logits, temperature, top_k, top_p):
    z = np.asarray(logits, np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    keep = np.ones_like(p, bool)
    order = np.argsort(-p)
    if top_k:
        keep[order[top_k:]] = False
    if top_p < 1.0:
        q = np.where(keep, p, 0)
        q /= q.sum()
        cum = np.cumsum(q[order])
        cutoff = np.searchsorted(cum, top_p) + 1  # smallest prefix reaching top_p
        drop = np.zeros_like(keep)
        drop[order[cutoff:]] = True
        keep &= ~drop
    p = np.where(keep, p, 0)
    return p / p.sum()


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.7), (0.8, 6, 0.9)],
)
def test_sampling_distribution_matches_truncated_distribution(temperature, top_k, top_p):
    logits = jnp.asarray(np.random.RandomState(1).normal(size=(1, 16)) * 1.5, jnp.float32)
    cfg = sampling.SamplingConfig(temperature, top_k, top_p)
    empirical = _empirical(cfg, logits)
    expected = _reference(logits[0], temperature, top_k, top_p)
    tv = 0.5 * np.abs(empirical - expected).sum()
    assert tv < 0.015, (tv, empirical, expected)
    assert (empirical[expected == 0] == 0).all()  # truncated tokens are never drawn


@pytest.mark.parametrize("top_k,top_p", [(2, 1.0), (0, 0.75)])
def test_signed_zero_logits_are_one_tie(top_k, top_p):
    """-0.0 == +0.0: a token at -0.0 tied with a kept +0.0 is kept, as `truncate` keeps it (the
    bisection's bit-pattern keys once ordered -0.0 below +0.0)."""
    logits = jnp.array([[1.0, 0.0, -0.0, -5.0]], jnp.float32)
    cfg = sampling.SamplingConfig(1.0, top_k, top_p)
    kept = np.isfinite(np.asarray(cfg.truncate(logits)[0]))
    assert kept.tolist() == [True, True, True, False]
    u = jnp.repeat(jnp.linspace(0.0, 1.0, 512, endpoint=False)[:, None], 2, 1)
    drawn = np.asarray(jax.jit(cfg.choose)(jnp.repeat(logits, 512, 0), u))
    assert set(drawn.tolist()) == {0, 1, 2}


def test_every_token_of_a_block_can_be_drawn_however_unlikely():
    """One float32 uniform is a multiple of 2^-23: with it alone, a token whose slice of the CDF
    held no such multiple could never be drawn (a Qwen-sized vocabulary: tokens holding 5e-4 of
    the mass at every step), and one that held a multiple was drawn with probability 2^-23. The
    block is chosen with one uniform, the token inside it with another, so each of a block's
    tokens is reachable in proportion to its share of the block."""
    logits = np.full((1, 2 * sampling._BLOCK), -18.4, np.float32)  # block 1: 128 x 1e-8
    logits[0, 0] = 0.0  # block 0: one token with all but 1.3e-6 of the mass
    rows = sampling._BLOCK * 4
    u = np.stack([np.full(rows, 1 - 2**-24), (np.arange(rows) + 0.5) / rows], -1)
    drawn = np.asarray(
        jax.jit(sampling._blocked_inverse_cdf)(jnp.repeat(jnp.asarray(logits), rows, 0), u)
    )
    counts = np.bincount(drawn, minlength=2 * sampling._BLOCK)[sampling._BLOCK :]
    assert (counts == 4).all(), counts  # the block's tokens are equally likely: 4 draws each


def test_rounding_at_a_block_boundary_never_draws_an_impossible_token():
    """The block is chosen from the block masses' prefix sum, the token from a prefix sum inside
    the block, which can end a few ulps lower: a uniform just below a block boundary can then
    land past every entry of the chosen block. That draw must stay on a possible token (once, it
    fell back to the block's first token, here token 0, whose probability is 0)."""
    rng = np.random.RandomState(0)
    rows, vocab = 4096, 256
    logits = rng.normal(size=(rows, vocab)).astype(np.float32) * 2
    logits[:, 0] = -np.inf  # token 0: probability exactly 0 (cut by top-k / top-p, say)
    probs = jnp.exp(logits - logits.max(-1, keepdims=True))
    cum = jnp.cumsum(probs.reshape(rows, 2, sampling._BLOCK).sum(-1), -1)  # as the sampler sums
    u = cum[:, 0] / cum[:, 1]  # then the largest u whose target stays below block 1
    for _ in range(4):
        u = jnp.where(u * cum[:, 1] >= cum[:, 0], jnp.nextafter(u, 0.0), u)
    # (and the largest second uniform: the token inside block 0 at the end of its prefix sum)
    u = jnp.stack([u, jnp.full_like(u, np.nextafter(np.float32(1), np.float32(0)))], -1)
    tokens = np.asarray(jax.jit(sampling._blocked_inverse_cdf)(jnp.asarray(logits), u))
    assert (tokens != 0).all(), int((tokens == 0).sum())
    assert (tokens < sampling._BLOCK).mean() > 0.5  # (mostly block 0: it tests what it says)
    # A row with no possible entry (NaN logits: a diverged model) fell into the block padding,
    # past the vocabulary (id 127 of 96), and went on into the embedding and the host's decode.
    nan_rows = np.full((2, 96), np.nan, np.float32)
    drawn = np.asarray(
        sampling._blocked_inverse_cdf(jnp.asarray(nan_rows), jnp.asarray([[0.3, 0.5], [0.9, 0.1]]))
    )
    assert drawn.tolist() == [0, 0]


@pytest.mark.parametrize("mesh_axes", [dict(fsdp=4, tensor=2), dict(data=2, fsdp=2, tensor=2)])
def test_sharded_sampling_equals_single_device(mesh_axes):
    single = sampling.generate(
        model(), PROMPTS, max_new_tokens=8, temperature=1.0, num_samples=2, seed=7
    )
    mesh = sharding.make_mesh(**mesh_axes)
    sharded_model = hf.load(hf_checkpoint("qwen2_sharp"), mesh=mesh, rules=sharding.SAMPLING_RULES)
    out = sampling.generate(
        sharded_model,
        PROMPTS,
        max_new_tokens=8,
        temperature=1.0,
        num_samples=2,
        seed=7,
        mesh=mesh,
        first_window=2,  # the cache grown twice on the mesh, against one phase on one device
    )
    assert out.tokens == single.tokens
    for a, b in zip(out.logprobs, single.logprobs, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert len(out.device.tokens.sharding.device_set) == 8


def test_sharded_decode_moves_no_weights_or_cache():
    """On a mesh, the sampler's collectives are the tensor-parallel activation all-reduces and the
    logits gather for the vocabulary-wide draw, never a weight or a KV cache (either would be
    moved at every decode step). Checked on the compiled program: no collective is larger than the
    larger of those two legitimate ones."""
    mesh = sharding.make_mesh(fsdp=4, tensor=2)
    on_mesh = hf.load(hf_checkpoint("qwen2_sharp"), mesh=mesh, rules=sharding.SAMPLING_RULES)
    graphdef, state = nnx.split(on_mesh)
    prompts, samples, new = 4, 2, 24  # the final window's per-device cache outgrows the bound
    ids = np.ones((prompts, 8), np.int32)
    with jax.set_mesh(mesh), sharding.use_rules(sharding.SAMPLING_RULES):
        batch = sharding.shard_batch({"ids": ids, "mask": ids}, mesh, sharding.SAMPLING_RULES)
        hlo = (
            sampling.sample.lower(
                graphdef,
                state,
                batch["ids"],
                batch["mask"],
                jax.random.key(0),
                num_samples=samples,
                max_new_tokens=new,
                cfg=sampling.SamplingConfig(1.0, 0, 1.0),
                first_window=4,
            )
            .compile()
            .as_text()
        )
    collectives = re.findall(
        r"= \w+\[([\d,]*)\]\S* (all-gather|all-reduce|all-to-all|reduce-scatter)(?:-start)?\(", hlo
    )
    assert any(kind == "all-gather" for _, kind in collectives)  # the logits, at least
    batch_ways = sampling._batch_ways(mesh)
    vocab = -(-on_mesh.cfg.vocab_size // sampling._BLOCK) * sampling._BLOCK  # the draw's padding
    logits = prompts * samples // batch_ways * vocab  # [B / batch ways, V] gathered per step
    prefill = prompts // batch_ways * ids.shape[1] * on_mesh.cfg.hidden_size  # its all-reduces
    for dims, kind in collectives:
        size = int(np.prod([int(d) for d in dims.split(",") if d]))
        assert size <= max(logits, prefill), (kind, dims)


def test_bfloat16_model_samples():
    bf16 = hf.load(hf_checkpoint("qwen2_sharp"), param_dtype="bfloat16")
    out = sampling.generate(bf16, PROMPTS, max_new_tokens=6, temperature=0.0)
    ref = sampling.generate(model(), PROMPTS, max_new_tokens=6, temperature=0.0)
    assert all(len(t) == 6 for t in out.tokens)
    assert out.device.logprobs.dtype == jnp.float32
    # bfloat16 rounding may flip a late near-tie, but the first tokens agree.
    assert [t[0] for t in out.tokens] == [t[0] for t in ref.tokens]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="top_p"):
        sampling.generate(model(), PROMPTS, max_new_tokens=4, top_p=0.0)
    # (inf and NaN gave NaN logits; 1e-38 overflowed them: every row drew token 0)
    for temperature in (float("inf"), float("nan"), -1.0, 1e-38):
        with pytest.raises(ValueError, match=r"temperature must be a finite number >= 1e-06"):
            sampling.generate(model(), PROMPTS, max_new_tokens=4, temperature=temperature)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sampling.generate(model(), PROMPTS, max_new_tokens=0)
    with pytest.raises(ValueError, match="first_window"):
        sampling.generate(model(), PROMPTS, max_new_tokens=4, first_window=-1)
    with pytest.raises(ValueError, match="grpo.decode_first_window must be >= 0"):
        grpo.GRPOConfig(decode_first_window=-1)
    with pytest.raises(ValueError, match="empty"):
        sampling.generate(model(), [[]], max_new_tokens=4)
    # Ids past the embedding gave NaN logits (token 0, NaN log-probs) and negative ones wrapped.
    vocab = model().cfg.vocab_size
    for bad in ([[1, vocab]], [[1, -5]]):
        with pytest.raises(ValueError, match=r"prompts\[0\] holds token ids outside"):
            sampling.generate(model(), bad, max_new_tokens=4)
    # Simple mistakes name the argument instead of failing deep inside.
    with pytest.raises(ValueError, match="prompts must be a list of token-id lists"):
        sampling.generate(model(), [1, 2, 3], max_new_tokens=4)
    with pytest.raises(ValueError, match=r"prompts must be \[P, T\]"):
        sampling.generate(model(), np.array([1, 2, 3]), max_new_tokens=4)
    with pytest.raises(ValueError, match="stop_token_ids must be a sequence"):
        sampling.generate(model(), PROMPTS, max_new_tokens=4, stop_token_ids=5)
    # Text is a sequence too: "12" was read as the ids 1 and 2, other text as a bare int() error.
    for text in (["12", "345"], ["What is 2+2?"], "12"):
        with pytest.raises(ValueError, match="prompts must be a list of token-id lists"):
            sampling.generate(model(), text, max_new_tokens=4)
    with pytest.raises(ValueError, match="stop_token_ids must be a sequence of token ids"):
        sampling.generate(model(), PROMPTS, max_new_tokens=4, stop_token_ids="7")
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1, got 3.0"):
        sampling.generate(model(), PROMPTS, max_new_tokens=3.0)
    graphdef, _ = nnx.split(model())
    assert graphdef is not None


def test_prompt_keys_make_samples_independent_of_the_batch():
    kw = dict(max_new_tokens=8, temperature=1.0, num_samples=2, seed=3, buckets=(8,))
    whole = sampling.generate(model(), PROMPTS, prompt_keys=[10, 11, 12, 13], **kw)
    halves = [
        sampling.generate(model(), PROMPTS[2:], prompt_keys=[12, 13], **kw),
        sampling.generate(model(), PROMPTS[:2], prompt_keys=[10, 11], **kw),
    ]
    assert whole.tokens == halves[1].tokens + halves[0].tokens
    # a prompt's samples are its own key's: another key (or one key for the batch) differs
    moved = sampling.generate(model(), PROMPTS, prompt_keys=[11, 10, 12, 13], **kw)
    assert moved.tokens[:2] != whole.tokens[:2] and moved.tokens[4:] == whole.tokens[4:]
    assert sampling.generate(model(), PROMPTS, **kw).tokens != whole.tokens
    with pytest.raises(ValueError, match="prompt_keys must be 4 integers"):
        sampling.generate(model(), PROMPTS, prompt_keys=[1, 2], **kw)
    # `sample` takes a raw uint32 key as well (not as per-prompt keys): the typed key's draws.
    graphdef, state = nnx.split(model())
    ids = jnp.asarray(whole.prompt_ids)
    args = dict(num_samples=1, max_new_tokens=4, cfg=sampling.SamplingConfig(1.0))
    raw = sampling.sample(graphdef, state, ids, ids > 0, jax.random.PRNGKey(5), **args)
    typed = sampling.sample(graphdef, state, ids, ids > 0, jax.random.key(5), **args)
    np.testing.assert_array_equal(raw.tokens, typed.tokens)
    # One key per sample instead of per prompt: named (it failed reshaping the draw).
    per_sample = jax.random.split(jax.random.key(5), 2 * len(ids))
    with pytest.raises(ValueError, match=r"or one per prompt \(\[4\]; .* shape \(8,\)"):
        sampling.sample(graphdef, state, ids, ids > 0, per_sample, **{**args, "num_samples": 2})
    # The G samples of a prompt differ at temperature > 0.
    groups = [whole.tokens[g : g + 2] for g in range(0, len(whole.tokens), 2)]
    assert all(a != b for a, b in groups), groups


def test_a_new_program_is_logged_whatever_made_it_new(caplog):
    """Per-prompt keys or another model (dtype) compile a program of their own: unlogged."""
    kw = dict(max_new_tokens=3, temperature=1.0, buckets=(24,))  # (no other test's program)
    other = hf.load(hf_checkpoint("qwen2_sharp"), dtype="bfloat16")
    with caplog.at_level(logging.INFO, logger="r1jax.sampling"):
        for call in (dict(seed=1), dict(prompt_keys=[1, 2, 3, 4]), dict(seed=2)):
            sampling.generate(model(), PROMPTS, **kw, **call)
        sampling.generate(other, PROMPTS, **kw)
    assert caplog.text.count("sampler: compiling for prompts (4, 24)") == 3, caplog.text


def test_ids_past_the_tokenizer_are_never_drawn():
    """A checkpoint's embedding padded past its tokenizer (Qwen2.5: 151936 rows, 151665 tokens)
    sampled ids that are no token: decoded to nothing, trained on by GRPO."""
    kw = dict(max_new_tokens=16, temperature=1.5, num_samples=8, seed=0)
    half = VOCAB // 2
    free = sampling.generate(model(), PROMPTS, **kw)
    assert max(max(t) for t in free.tokens) >= half  # the rows past `half` do get drawn
    out = sampling.generate(model(), PROMPTS, num_tokens=half, **kw)
    assert max(max(t) for t in out.tokens) < half
    greedy = sampling.generate(model(), PROMPTS, max_new_tokens=4, temperature=0.0, num_tokens=half)
    assert max(max(t) for t in greedy.tokens) < half
    # The log-probs stay the model's (its softmax over every row), as training computes them.
    logits = model()(jnp.asarray([PROMPTS[0] + out.tokens[0][:1]]))[0, len(PROMPTS[0]) - 1]
    want = jax.nn.log_softmax(logits)[out.tokens[0][0]]
    np.testing.assert_allclose(out.logprobs[0][0], want, rtol=1e-5, atol=1e-5)
