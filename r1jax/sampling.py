"""The rollout engine: KV-cached sampling in pure JAX, one jitted program per shape bucket.

GRPO spends most of its time here. One call samples G completions for each of P prompts:

  1. prefill  the P left-padded prompts run once through the model into a [P, Tp] cache;
  2. share    with G > 1, a per-sample cache of [P*G, W] slots is created whose *prefix* is
              that prefill: the G rows of a prompt read the same prompt keys and values (no copy,
              no recomputation). With G = 1 there is nothing to share, and the prefill is copied
              into the front of one [P, Tp + W] cache (one attention segment per step);
  3. decode   a `lax.while_loop` feeds one token per row per step, writes it into the cache,
              samples the next token, and stops as soon as every row has emitted a stop token
              or written a stop string ("</answer>", found in the text by an automaton over
              the tokens, `data.StopStrings`, however they spell it). The
              per-row cache starts at W = `first_window` slots and doubles as it fills, up to
              max_new (one loop per phase, `decode_windows`): once past the first window a step
              attends over less than 3x the slots written so far (2x between doublings), not
              the whole budget from the first token.

Everything in 1-3 is one jitted function of (params, prompts, rng); shapes are static per (P, Tp, G,
max_new, first_window, sampling config), and `generate` pads prompts into length buckets so a run
compiles a handful of programs. Each new shape or sampling config is logged (a new mesh or
sharding compiles too, unlogged).

Choosing tokens (measured on CPU in bench/NOTES.md):
- Inverse-CDF sampling with two uniforms per row and step (the block, then the token inside
  it), all drawn before the loop in one [2T, B] draw: no PRNG call and no [B, V] Gumbel noise
  inside the loop. The uniforms come from a
  counter-based PRNG, so a key gives the same samples on any mesh.
- The CDF is searched in two levels (blocks of 128 vocabulary entries, then within one block), so
  no prefix sum over the whole vocabulary is built.
- Top-k and top-p cut-offs are found by an exact 32-step bisection over the logits' bit patterns
  instead of a sort (XLA's CPU sort costs milliseconds per step even at V = 512).

Log-probabilities: `logprobs[b, t]` is log p(token | prefix) under the model's *unmodified*
distribution, i.e. log_softmax of the raw logits (temperature 1, no top-k/top-p truncation),
whatever the sampling settings: what the model's plain forward gives the same tokens. GRPO scores
completions at the sampling temperature instead (`grpo.completion_logprobs(temperature=...)`, TRL's
convention), so at a temperature other than 1 these are *not* its old log-probs; the rollout
computes those with its own forward (μ > 1) and never reads these.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import numbers
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from r1jax import sharding
from r1jax.data.batching import DEFAULT_BUCKETS, batch_prompt_ids
from r1jax.data.tokenizer import StopStrings
from r1jax.models.transformer import KVCache

log = logging.getLogger(__name__)

STOP_TOKEN, LENGTH = 0, 1  # values of SampleOutput.stop_reason
DEFAULT_FIRST_WINDOW = 32  # per-row cache slots of the first decode phase (`decode_windows`)
# The smallest temperature other than 0 (greedy): below ~1e-37 a logit divided by it overflows
# float32 and the row's draw is NaN (token 0); far above that it is already greedy.
MIN_TEMPERATURE = 1e-6


# --------------------------------------------------------------------------------------------------
# Choosing the next token
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is drawn from the logits. Static: one compiled program per distinct value.

    - temperature: 0.0 is greedy (argmax); otherwise (>= MIN_TEMPERATURE) logits are divided
      by it.
    - top_k: keep the k most likely tokens (0 = off); tokens tied with the k-th are kept too.
    - top_p: keep the smallest set of most likely tokens whose probability reaches top_p
      (1.0 = off), after top-k.
    - num_tokens: ids at or past it are never drawn (0 = every id): the tokenizer's length when
      the embedding is padded past it (Qwen2.5: 151936 rows for 151665 tokens), so no id that
      is no token is sampled. Log-probs stay the model's, over every row.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_tokens: int = 0

    def __post_init__(self):
        t = self.temperature
        if not (t == 0 or MIN_TEMPERATURE <= t < float("inf")):  # (NaN, inf: NaN logits)
            raise ValueError(
                f"temperature must be a finite number >= {MIN_TEMPERATURE} (smaller ones "
                f"overflow the scaled logits), or 0 for greedy decoding; got {t}"
            )
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0 (0 = every id), got {self.num_tokens}")

    def _tokens_only(self, logits: jax.Array) -> jax.Array:
        """[B, V] logits with the ids past `num_tokens` at -inf."""
        if not 0 < self.num_tokens < logits.shape[-1]:
            return logits
        return jnp.where(jnp.arange(logits.shape[-1]) < self.num_tokens, logits, -jnp.inf)

    def truncate(self, logits: jax.Array) -> jax.Array:
        """[B, V] float32 logits -> temperature-scaled logits with dropped tokens at -inf.

        The reference definition of what `choose` samples from (it never builds this array).
        """
        logits = self._tokens_only(logits) / self.temperature
        if 0 < self.top_k < logits.shape[-1]:  # as `choose`: a k of V or more keeps them all
            kth = jax.lax.top_k(logits, self.top_k)[0][:, -1:]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        if self.top_p < 1.0:
            sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
            probs = jax.nn.softmax(sorted_logits, axis=-1)
            # A token is kept if the mass strictly before it is below top_p (so at least one is
            # kept).
            before = jnp.cumsum(probs, axis=-1) - probs
            kept = jnp.where(before < self.top_p, sorted_logits, jnp.inf)
            threshold = jnp.min(kept, axis=-1, keepdims=True)
            logits = jnp.where(logits < threshold, -jnp.inf, logits)
        return logits

    def sample(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        """[B, V] float32 logits -> [B] int32 token ids, drawn with `key`."""
        return self.choose(logits, jax.random.uniform(key, (logits.shape[0], 2), jnp.float32))

    def choose(self, logits: jax.Array, u: jax.Array) -> jax.Array:
        """[B, V] float32 logits, [B, 2] uniforms in [0, 1) -> [B] int32 token ids.

        Inverse-CDF sampling (`_blocked_inverse_cdf`): a row needs two uniforms (the sampler
        draws all of them before its loop) instead of a Gumbel draw per vocabulary entry. Top-k
        and top-p find their cut-off logit by bisection instead of sorting the vocabulary (XLA's
        CPU sort is two orders of magnitude slower); the kept set is `truncate`'s, ties at the
        cut-off included (up to float32 rounding of the cumulative mass at the cut).
        """
        logits = self._tokens_only(logits)
        if self.temperature == 0.0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logits = logits.astype(jnp.float32) / self.temperature
        if self.top_k and self.top_k < logits.shape[-1]:
            keys = _order_keys(logits)
            # Smallest key held by fewer than k logits; one below it is the k-th largest logit.
            first_short = _bisect(
                keys, lambda v: jnp.sum(keys >= v[:, None], -1) < self.top_k, upper_inclusive=False
            )
            logits = jnp.where(keys >= first_short[:, None] - 1, logits, -jnp.inf)
        if self.top_p < 1.0:
            keys = _order_keys(logits)
            probs = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
            budget = self.top_p * jnp.sum(probs, axis=-1)
            # Keep a token iff the mass of strictly larger logits is below top_p; the smallest kept
            # logit is the smallest key where that holds (the predicate only flips at a logit).
            cut = _bisect(
                keys,
                lambda v: jnp.sum(jnp.where(keys > v[:, None], probs, 0.0), -1) < budget,
                upper_inclusive=True,
            )
            logits = jnp.where(keys >= cut[:, None], logits, -jnp.inf)
        return _blocked_inverse_cdf(logits, u)


def _order_keys(x: jax.Array) -> jax.Array:
    """float32 -> uint32 keys in the same order (for -inf and finite values; -0.0 and +0.0 get
    one key, as they compare equal)."""
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0.0, 0.0, x), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _bisect(keys: jax.Array, holds, *, upper_inclusive: bool) -> jax.Array:
    """[B, V] uint32 keys and a predicate on [B] candidate keys, false at each row's smallest key
    and true at its largest (`upper_inclusive`) or one above it -> the smallest [B] key where it
    holds. 32 halvings cover the whole uint32 range, so the answer is exact."""
    lo = jnp.min(keys, axis=-1)
    hi = jnp.max(keys, axis=-1) + (0 if upper_inclusive else 1)

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        ok = holds(mid)
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    return jax.lax.fori_loop(0, 32, halve, (lo, hi))[1]


def _first_above(cum: jax.Array, probs: jax.Array, target: jax.Array) -> jax.Array:
    """[B, N] cumulative and plain probabilities, [B] targets -> [B] index of the first entry with
    non-zero probability whose cumulative value exceeds the target, else (the target at or past
    the end, which rounding makes possible: `cum` may end a few ulps below the total the target
    was scaled by) the last entry with non-zero probability. Zero-probability entries are never
    chosen."""
    possible = probs > 0
    hit = (cum > target[:, None]) & possible
    last = probs.shape[-1] - 1 - jnp.argmax(possible[:, ::-1], axis=-1)
    return jnp.where(hit.any(axis=-1), jnp.argmax(hit, axis=-1), last).astype(jnp.int32)


_BLOCK = 128  # vocabulary entries per block in `_blocked_inverse_cdf`


def _blocked_inverse_cdf(logits: jax.Array, u: jax.Array) -> jax.Array:
    """Sample [B] tokens from softmax([B, V] logits) with [B, 2] uniforms, in two levels.

    A prefix sum over all V entries is a log-depth tree of passes on CPU; instead sum blocks of
    128, pick the block from the prefix sum of V / 128 block masses with `u[:, 0]`, then the token
    inside the one chosen block from its own prefix sum with `u[:, 1]`. Same distribution, about
    the cost of one softmax. Two uniforms, not one: a float32 uniform is a multiple of 2^-23, so
    one of them over the whole vocabulary could never draw most tokens under ~1e-7 (at V = 152k,
    tokens holding 5e-4 of the mass at every step) and drew a few others up to 70x too often;
    the second resolves inside the block, leaving only blocks under 2^-23 of the mass.
    """
    b, v = logits.shape
    probs = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))  # [B, V], max entry is 1
    blocks = -(-v // _BLOCK)
    probs = jnp.pad(probs, ((0, 0), (0, blocks * _BLOCK - v))).reshape(b, blocks, _BLOCK)
    mass = probs.sum(-1)  # [B, blocks]
    cum = jnp.cumsum(mass, axis=-1)
    block = _first_above(cum, mass, u[:, 0] * cum[:, -1])  # [B]
    inner = jnp.take_along_axis(probs, block[:, None, None], axis=1)[:, 0]  # [B, BLOCK]
    inner_mass = jnp.take_along_axis(mass, block[:, None], axis=1)[:, 0]
    offset = _first_above(jnp.cumsum(inner, axis=-1), inner, u[:, 1] * inner_mass)
    # A row with no possible entry (NaN logits) would land in the block padding, past the
    # vocabulary: it gets id 0 instead (what greedy's argmax gives such a row).
    return jnp.where(mass.sum(-1) > 0, block * _BLOCK + offset, 0).astype(jnp.int32)


# --------------------------------------------------------------------------------------------------
# Device-level sampling
# --------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class SampleOutput:
    """What one sampling call returns, on device. B = P * G rows, prompt-major (rows p*G .. p*G+G-1
    belong to prompt p); completions are left-aligned in [B, max_new].

    - tokens: [B, max_new] int32 completion ids, `pad_id` after the end.
    - logprobs: [B, max_new] float32 log p(token) under the raw model distribution (0 after the
      end).
    - mask: [B, max_new] int32, 1 on completion tokens (including the stop token).
    - lengths: [B] int32 number of completion tokens.
    - stop_reason: [B] int32, STOP_TOKEN (0) or LENGTH (1, truncated at max_new).
    """

    tokens: jax.Array
    logprobs: jax.Array
    mask: jax.Array
    lengths: jax.Array
    stop_reason: jax.Array


@flax.struct.dataclass
class _LoopState:
    step: jax.Array  # [] int32: completion tokens produced so far (all rows in lockstep)
    last: jax.Array  # [B] int32: token produced at step - 1
    tokens: jax.Array  # [B, max_new]
    logprobs: jax.Array  # [B, max_new]
    done: jax.Array  # [B] bool: row has produced a stop token
    lengths: jax.Array  # [B]
    stop_state: jax.Array  # [B] int32: each row's state in the stop-string automaton
    cache: KVCache


def _stop_table(table: jax.Array, vocab: int) -> jax.Array:
    """`StopStrings.table` [Q, V'] as [Q, vocab] int32: ids past the tokenizer's vocabulary (an
    embedding padded beyond it) leave the state as it is, ids past the embedding are never
    sampled."""
    table = table.astype(jnp.int32)[:, :vocab]
    q, width = table.shape
    if width < vocab:
        same = jnp.broadcast_to(jnp.arange(q, dtype=jnp.int32)[:, None], (q, vocab - width))
        table = jnp.concatenate([table, same], axis=1)
    return table


def _record(
    state: _LoopState,
    logits: jax.Array,
    u: jax.Array,
    cfg: SamplingConfig,
    stop_ids: tuple[int, ...],
    stop_table: jax.Array | None,
    pad_id: int,
) -> _LoopState:
    """Sample the token at `state.step` from logits [B, V] with uniforms u [B, 2] and append it to
    rows still running; a row is done after a stop token, or once its text holds a stop string
    (`stop_table` [Q, V]: the automaton of `data.StopStrings`; None = no stop strings)."""
    token = cfg.choose(logits, u)
    # log p(token) without materialising a [B, V] log_softmax: logit - logsumexp.
    logp = jnp.take_along_axis(logits, token[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(
        logits, axis=-1
    )
    live = ~state.done
    token = jnp.where(live, token, pad_id)
    step = state.step
    stop = jnp.isin(token, jnp.asarray(stop_ids or (-1,), jnp.int32))
    stop_state = state.stop_state
    if stop_table is not None:
        stop_state = jnp.where(live, stop_table[stop_state, token], stop_state)
        stop = stop | (stop_state == stop_table.shape[0] - 1)
    return state.replace(
        step=step + 1,
        last=token,
        tokens=state.tokens.at[:, step].set(token),
        logprobs=state.logprobs.at[:, step].set(jnp.where(live, logp, 0.0)),
        lengths=state.lengths + live.astype(jnp.int32),
        stop_state=stop_state,
        done=state.done | (live & stop),
    )


def _extend(empty, filled):
    """Copy a filled cache into the front of a longer empty one of the same class.

    Layout-agnostic (KVCache, MLACache): every array leaf of the per-row segment is written at the
    origin (only its sequence axis differs), scalar leaves (the write index) come from the filled
    cache, and a shared prefix segment (absent from `empty`) is carried over as it is.
    """

    def one(big, small):
        if big.ndim == 0:
            return small
        return jax.lax.dynamic_update_slice(big, small.astype(big.dtype), (0,) * big.ndim)

    fields = {}
    for field in dataclasses.fields(filled):
        big, small = getattr(empty, field.name), getattr(filled, field.name)
        fields[field.name] = small if big is None else jax.tree.map(one, big, small)
    return empty.replace(**fields)


def decode_windows(max_new_tokens: int, first_window: int) -> tuple[int, ...]:
    """Slots of the per-row cache segment in each decode phase: `first_window`, doubling, capped
    at `max_new_tokens` (which is always the last); `first_window` 0 means one phase.

    Decode attends over every slot of the cache it is given, filled or not. Growing the cache as
    it fills (one copy into a cache twice as long per phase) keeps the slots read per step below
    3x the tokens written once past the first window (2x between doublings), instead of
    max_new_tokens from the first step: at long completion lengths attention is most of a decode
    step. Costs: each phase is its own compiled loop body (so the count is kept logarithmic:
    11 bodies for a 32K budget from 32), and while a phase's cache is copied into the next one
    both are alive, so the cache's peak is up to 5/3 of one max_new_tokens cache (use 0 when
    accelerator memory, not speed, is the limit).
    E.g. (128, 32) -> (32, 64, 128); (65, 32) -> (32, 65); (3, 2) -> (3,).
    """
    # Every window at least 1.5x shorter than the decode steps (max_new_tokens - 1: the last
    # token is never fed back): a last phase of a few more slots would cost a compiled loop body
    # and a copy and save next to nothing.
    windows = []
    while first_window > 0 and 3 * first_window <= 2 * (max_new_tokens - 1):
        windows.append(first_window)
        first_window *= 2
    return (*windows, max_new_tokens)


@functools.partial(
    jax.jit,
    static_argnames=(
        "graphdef",
        "num_samples",
        "max_new_tokens",
        "cfg",
        "stop_ids",
        "pad_id",
        "first_window",
    ),
)
def sample(
    graphdef,
    state,
    prompt_ids,
    prompt_mask,
    key,
    *,
    num_samples: int,
    max_new_tokens: int,
    cfg: SamplingConfig,
    stop_ids: tuple[int, ...] = (),
    stop_table: jax.Array | None = None,
    pad_id: int = 0,
    first_window: int = DEFAULT_FIRST_WINDOW,
) -> SampleOutput:
    """Sample `num_samples` completions for each left-padded prompt. Pure and jitted.

    graphdef, state:  the model split with `nnx.split` (state may be sharded on the ambient mesh)
    prompt_ids:       [P, Tp] int32, left-padded
    prompt_mask:      [P, Tp] int32, 1 = token, 0 = pad
    key:              PRNG key; the same key gives the same samples on any mesh. Or [P] keys,
                      one per prompt: a prompt's samples then depend on its own key alone, not
                      on which prompts share the batch
    stop_ids:         tokens that end a row (EOS, ...)
    stop_table:       [Q, V'] `data.StopStrings.table` (replicated): a row ends after the token
                      that completes one of its strings in the text (e.g. "</answer>" however it
                      is tokenised); included in the output. None = no stop strings
    first_window:     completion slots of the per-row cache in the first decode phase; the cache
                      doubles as it fills (`decode_windows`); 0 = max_new_tokens slots throughout
    Returns a SampleOutput over B = P * num_samples rows.
    """
    model = nnx.merge(graphdef, state)
    p = prompt_ids.shape[0]
    b = p * num_samples

    # 1. Prefill every prompt once. Only the last position's logits are needed (left padding
    # puts every prompt's end there): [P, V], not the [P, Tp, V] a full forward would build.
    prefill = model.init_cache(p, prompt_ids.shape[1])
    hidden, prefill = model.hidden_states(prompt_ids, prompt_mask, cache=prefill)
    last = model.logits_from_hidden(hidden[:, -1:])[:, 0]
    first_logits = jnp.repeat(last, num_samples, axis=0)  # [B, V]
    first_logits = sharding.constrain(first_logits, ("batch", "vocab"))

    # 2. The G samples of a prompt share its prefill as the cache prefix. With one sample per
    # prompt there is nothing to share: the prefill goes to the front of one longer cache, so
    # each decode step attends over one segment instead of two. Either way the per-row segment
    # starts with the first decode window's slots and grows as it fills (3).
    windows = decode_windows(max_new_tokens, first_window)
    front = prompt_ids.shape[1] if num_samples == 1 else 0  # the prefill's slots in the segment

    def grow(cache, slots):  # the same cache with `slots` per-row slots for completion tokens
        return _extend(model.init_cache(b, front + slots), cache)

    if num_samples == 1:
        cache = grow(prefill, windows[0])
    else:
        cache = model.init_cache(b, windows[0]).with_prefix(prefill)

    # Every uniform the loop will need, drawn at once: one [2T, B] draw instead of a PRNG call
    # (and a [B, V] Gumbel draw) per step. Counter-based, so identical on any mesh.
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):  # a raw uint32 PRNGKey
        key = jax.random.wrap_key_data(key)
    if key.shape not in ((), (p,)):
        raise ValueError(
            f"key: one key for every prompt, or one per prompt ([{p}]; its samples share it), "
            f"got keys of shape {key.shape}"
        )
    if key.ndim == 0:
        uniforms = jax.random.uniform(key, (2 * max_new_tokens, b), jnp.float32)
    else:  # prompt p's G rows (rows p*G ... p*G + G - 1) draw from key p alone
        draw = jax.vmap(lambda k: jax.random.uniform(k, (2 * max_new_tokens, num_samples)))
        uniforms = jnp.swapaxes(draw(key), 0, 1).reshape(2 * max_new_tokens, b)
    uniforms = sharding.constrain(uniforms, (None, "batch"))
    # [T, B, 2]. (Drawn as [2T, B], batch last: a [T, B, 2] draw sharded over two processes gave
    # other values than on one process, whose runs must match token for token.)
    uniforms = jnp.stack([uniforms[:max_new_tokens], uniforms[max_new_tokens:]], -1)
    if stop_table is not None:
        stop_table = _stop_table(stop_table, first_logits.shape[-1])
    zeros = jnp.zeros((b,), jnp.int32)
    loop = _LoopState(
        step=jnp.zeros((), jnp.int32),
        last=zeros,
        tokens=jnp.full((b, max_new_tokens), pad_id, jnp.int32),
        logprobs=jnp.zeros((b, max_new_tokens), jnp.float32),
        done=jnp.zeros((b,), bool),
        lengths=zeros,
        stop_state=zeros,
        cache=cache,
    )
    loop = _record(loop, first_logits, uniforms[0], cfg, stop_ids, stop_table, pad_id)

    # 3. Decode one token per row per step until every row stopped or the budget is spent, in
    # phases: each runs until its cache is full, then the cache is copied into one twice as long.
    def cond(s: _LoopState):
        room = s.cache.index < s.cache.mask.shape[1]
        return room & (s.step < max_new_tokens) & ~jnp.all(s.done)

    def body(s: _LoopState):
        logits, new_cache = model(
            s.last[:, None], (~s.done).astype(jnp.int32)[:, None], cache=s.cache
        )
        s = s.replace(cache=new_cache)
        return _record(s, logits[:, 0], uniforms[s.step], cfg, stop_ids, stop_table, pad_id)

    for i, slots in enumerate(windows):
        if i:
            loop = loop.replace(cache=grow(loop.cache, slots))
        loop = jax.lax.while_loop(cond, body, loop)
    mask = (jnp.arange(max_new_tokens)[None, :] < loop.lengths[:, None]).astype(jnp.int32)
    return SampleOutput(
        tokens=loop.tokens,
        logprobs=loop.logprobs,
        mask=mask,
        lengths=loop.lengths,
        stop_reason=jnp.where(loop.done, STOP_TOKEN, LENGTH).astype(jnp.int32),
    )


# --------------------------------------------------------------------------------------------------
# Host-level convenience
# --------------------------------------------------------------------------------------------------

_compiled: set[tuple] = set()


@dataclasses.dataclass
class GenerateOutput:
    """Host-side result of `generate`, per sample, prompt-major (sample g of prompt p at p*G + g).

    tokens:   list of completion token-id lists (stop token included when one was produced)
    logprobs: list of float32 arrays, log p of each token under the raw model distribution
    device:   the full device-level SampleOutput (padded arrays, masks, lengths, stop reasons)
    prompt_ids, prompt_mask: the left-padded prompts [P, T] actually used
    """

    tokens: list[list[int]]
    logprobs: list[np.ndarray]
    stop_reason: list[int]
    device: SampleOutput
    prompt_ids: np.ndarray
    prompt_mask: np.ndarray


def _token_ids(ids, name: str, vocab: int | None = None) -> tuple[int, ...]:
    """`ids` as a tuple of ints (in [0, vocab) when given); a ValueError naming `name`
    otherwise."""
    if isinstance(ids, numbers.Integral | str | bytes) or not isinstance(
        ids, Sequence | np.ndarray | jax.Array
    ):  # (a string is a sequence: "12" read as ids 1 and 2)
        raise ValueError(
            f"{name} must be a sequence of token ids (tokenize text first), got {ids!r}"
        )
    out = tuple(int(t) for t in ids)
    bad = [t for t in out if vocab is not None and not 0 <= t < vocab]
    if bad:
        raise ValueError(f"{name} holds token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
    return out


def generate(
    model,
    prompts,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_token_ids: Sequence[int] = (),
    num_samples: int = 1,
    seed: int = 0,
    *,
    stop_strings: StopStrings | None = None,
    pad_id: int = 0,
    mesh=None,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    first_window: int = DEFAULT_FIRST_WINDOW,
    prompt_keys: Sequence[int] | None = None,
    num_tokens: int = 0,
) -> GenerateOutput:
    """Sample completions for a list of prompts (ragged token-id lists, or a [P, T] array whose
    every entry is a prompt token: strip a padded batch's padding first).

    A row ends at any of `stop_token_ids` or once its text holds one of `stop_strings`
    (`r1jax.data.StopStrings.for_tokenizer(tokenizer, ["</answer>"])`: found however the
    tokens spell it); the stop is kept in the output.
    Prompts are left-padded to the smallest bucket length that fits (longer prompts are an error);
    with `mesh`, the batch is sharded over its batch axes when P divides by them (else it runs
    unsharded, with the same results), and the model should already be placed on it.
    `first_window`: see `sample`.
    `num_tokens`: the tokenizer's length; ids past it (an embedding padded beyond the tokenizer)
    are never drawn (0 = every id).
    `prompt_keys`: one integer per prompt (e.g. its row in the dataset); prompt i's samples are
    then drawn from `fold_in(key(seed), prompt_keys[i])`, so they do not change with the other
    prompts in its batch (up to the float rounding of a differently shaped forward). Without
    them one key serves the whole batch.
    """
    for name, value, least in (
        ("max_new_tokens", max_new_tokens, 1),
        ("num_samples", num_samples, 1),
        ("first_window", first_window, 0),
    ):
        if not isinstance(value, numbers.Integral) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if isinstance(prompts, np.ndarray | jax.Array):
        if np.ndim(prompts) != 2:
            raise ValueError(f"prompts must be [P, T] token ids, got shape {np.shape(prompts)}")
        prompts = [list(map(int, row)) for row in np.asarray(prompts)]
    if isinstance(prompts, str | bytes) or not all(
        isinstance(p, Sequence | np.ndarray | jax.Array) and not isinstance(p, str | bytes)
        for p in prompts
    ):
        raise ValueError(
            "prompts must be a list of token-id lists (one per prompt), or [P, T]; text is "
            "tokenized first"
        )
    if isinstance(stop_strings, list | tuple) and not stop_strings:
        stop_strings = None  # (an empty list: none, as before)
    if stop_strings is not None and not isinstance(stop_strings, StopStrings):
        raise ValueError(  # (transformers takes a list of strings; the automaton needs the vocab)
            "stop_strings must be a data.StopStrings, built with its tokenizer: "
            f"StopStrings.for_tokenizer(tokenizer, [...]); got {type(stop_strings).__name__}"
        )
    vocab = model.cfg.vocab_size
    # (a stop id past the vocabulary, e.g. a tokenizer's extra special token, is never sampled:
    # harmless, so only its type is checked)
    stop_ids = _token_ids(stop_token_ids, "stop_token_ids")
    for i, p in enumerate(prompts):  # an id past the embedding would give NaN logits silently
        _token_ids(p, f"prompts[{i}]", vocab)
    batch = batch_prompt_ids(prompts, pad_id=pad_id, buckets=buckets)
    ids, mask = batch.input_ids, batch.attention_mask
    cfg = SamplingConfig(temperature, top_k, top_p, num_tokens)
    graphdef, state = nnx.split(model)
    if not 0 <= int(seed) < 2**32:  # (jax.random.key would keep its low 32 bits)
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    key = jax.random.key(seed)
    if prompt_keys is not None:
        ints = [int(i) for i in prompt_keys]
        if len(ints) != len(prompts) or not all(0 <= i < 2**32 for i in ints):
            raise ValueError(
                f"prompt_keys must be {len(prompts)} integers in [0, 2**32) (one per prompt), "
                f"got {list(prompt_keys)[:8]}"
            )
        key = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.asarray(ints, jnp.uint32))
    static = (  # (what the program is compiled for: a new value is a new program)
        graphdef,
        tuple(x.dtype for x in jax.tree.leaves(state)),
        prompt_keys is not None,
        ids.shape,
        num_samples,
        max_new_tokens,
        cfg,
        stop_ids,
        None if not stop_strings else stop_strings.table.shape,
        pad_id,
        first_window,
    )
    if static not in _compiled:
        _compiled.add(static)
        log.info(
            "sampler: compiling for prompts %s, %d samples, %d new tokens, %s, windows %s",
            ids.shape,
            num_samples,
            max_new_tokens,
            cfg,
            decode_windows(max_new_tokens, first_window),
        )
    kwargs = dict(
        num_samples=num_samples,
        max_new_tokens=max_new_tokens,
        cfg=cfg,
        stop_ids=stop_ids,
        pad_id=pad_id,
        first_window=first_window,
    )
    if mesh is None:
        if stop_strings:
            kwargs["stop_table"] = jnp.asarray(stop_strings.table)
        out = sample(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), key, **kwargs)
    else:
        sharding.check_mesh(mesh)
        if stop_strings:
            everywhere = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            kwargs["stop_table"] = sharding.from_host(stop_strings.table, everywhere)
        with jax.set_mesh(mesh), sharding.use_rules(sharding.SAMPLING_RULES):
            batch = (
                sharding.shard_batch({"ids": ids, "mask": mask}, mesh, sharding.SAMPLING_RULES)
                if len(prompts) % _batch_ways(mesh) == 0
                else {"ids": ids, "mask": mask}
            )
            out = sample(graphdef, state, batch["ids"], batch["mask"], key, **kwargs)
    host = jax.tree.map(sharding.to_host, out)  # every process gets every row, any host's
    tokens = [row[:n].tolist() for row, n in zip(host.tokens, host.lengths, strict=False)]
    logprobs = [row[:n] for row, n in zip(host.logprobs, host.lengths, strict=False)]
    return GenerateOutput(
        tokens=tokens,
        logprobs=logprobs,
        stop_reason=host.stop_reason.tolist(),
        device=out,
        prompt_ids=ids,
        prompt_mask=mask,
    )


def _batch_ways(mesh) -> int:  # the mesh axes the `batch` rule names (sharding.RULES)
    return int(mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"])
