"""Workloads B (one GRPO step) and C (update throughput) on the WORKLOAD.md models.

B: 4 prompts x group 4 = 16 completions, prompts of 32 random token ids, exactly 128 completion
tokens (no stop token), beta 0.04 with a frozen reference model, 1 policy iteration, AdamW at lr
1e-6, reward = share of even token ids in the completion. A step is what `r1jax.stages.rl` runs:
`policy_for_sampling` + `rollout` (sample, score, reference log-probs, advantages) + `update`, up to
the update's metrics on the host. The figures are the wall time of the whole step and of the update
alone, median of `repeats` steps after one warm-up step (whose time, mostly compilation, is
reported as `compile_s`). XLA compilations during the timed steps are counted and must be 0.
`step_breakdown` times the step's parts one by one (generate, reward on device and through the host
callback, reference log-probs, update), in wall and process CPU time.

C: the update alone (`grpo.update`, the same GRPOConfig but every row its own prompt,
`shared_prompt_forward=False`: the synthetic rows' prompts all differ) on a batch of 16 x 160 and
64 x 160 tokens (32 prompt + 128 completion). Its values do not change the work done, so random
completions, advantages and reference log-probs stand in for a real rollout. Figures: trained
tokens per second and model FLOP utilisation

    MFU = (6 * params * tokens + 12 * layers * heads * head_dim * T * tokens) / step time
          / f32 matmul rate (bench/limits.py, measured in the same run),

where T = 160 and the attention term counts the full T x T score matrix (the forward computes it
whole, masked) for the forward and backward passes (the usual 6N + 12LHT per token).

    python bench/bench_grpo.py [--sizes tiny] [--repeats 3]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

# Run from a checkout: import this tree's r1jax (and `bench`), not another installed copy.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import bench_sampling  # noqa: E402

PROMPTS, GROUP, PROMPT_LEN, COMPLETION_LEN = 4, 4, 32, 128
UPDATE_ROWS = (16, 64)
# Rows per micro-batch of the scoring forwards and the update (GRPOConfig.num_micro_batches =
# rows / this). 4 rows x 160 tokens keep a micro-batch's activations in this CPU's cache: the tiny
# update is 1.3x (16 rows) to 1.6x (64 rows) faster than in one piece (bench/NOTES.md, "U1").
MICRO_BATCH_ROWS = 4
LEARNING_RATE = 1e-6
BETA = 0.04


class EvenTokenReward:
    """The workload's reward, computed on device: share of even ids among completion tokens.

    The rollout's traced-side reward interface: (tokens [B, Tc] int32, lengths [B] int32) ->
    (total [B] float32, per_reward [1, B] float32), with one name.
    """

    names = ("even_tokens",)

    def __call__(self, tokens: jax.Array, lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
        valid = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
        even = jnp.sum(valid & (tokens % 2 == 0), axis=1) / jnp.maximum(lengths, 1)
        even = even.astype(jnp.float32)
        return even, even[None, :]


REWARD = EvenTokenReward()  # one instance: the rollout program is cached per reward function


class HostEvenTokenReward:
    """The same reward scored on the host through `jax.pure_callback`, as the RL stage scores its
    rule rewards (`rewards.compose.HostRewardBridge`): measures the callback round trip."""

    names = ("even_tokens",)

    @staticmethod
    def score_host(tokens: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        valid = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
        even = (valid & (tokens % 2 == 0)).sum(1) / np.maximum(lengths, 1)
        even = even.astype(np.float32)
        return even, even[None, :]

    def __call__(self, tokens: jax.Array, lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
        b = tokens.shape[0]
        shapes = (
            jax.ShapeDtypeStruct((b,), jnp.float32),
            jax.ShapeDtypeStruct((1, b), jnp.float32),
        )
        return jax.pure_callback(self.score_host, shapes, tokens, lengths, vmap_method="sequential")


HOST_REWARD = HostEvenTokenReward()


def grpo_config(
    rows: int = PROMPTS * GROUP, micro_batch_rows: int = MICRO_BATCH_ROWS, shared_prompts=True
):
    """The GRPOConfig of workloads B and C for a batch of `rows` (0 micro-batch rows: whole).

    shared_prompts: GRPOConfig.shared_prompt_forward (each prompt's forward once per batch, as
    the RL stage runs). False for synthetic batches whose rows all have different prompts (C):
    every row's 32 + 128 tokens then go through the model, as C's FLOP count assumes.
    """
    from r1jax import grpo

    return grpo.GRPOConfig(
        shared_prompt_forward=shared_prompts,
        num_micro_batches=rows // micro_batch_rows if micro_batch_rows else 1,
        num_generations=GROUP,
        num_iterations=1,
        beta=BETA,
        max_completion_length=COMPLETION_LEN,
        temperature=1.0,
        stop_token_ids=(),
        pad_token_id=0,
    )


def _train_state(path: str):
    from r1jax import train
    from r1jax.models import hf

    return train.TrainState.create(hf.load(path), train.OptimConfig(learning_rate=LEARNING_RATE))


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "median": float(np.median(values)),
        "min": float(min(values)),
        "max": float(max(values)),
    }


def grpo_step(path: str, repeats: int = 3) -> dict:
    """Workload B on the checkpoint at `path`: step and update wall times (s), compile counts."""
    from r1jax import grpo, metrics
    from r1jax.models import hf

    cfg = grpo_config()
    state = _train_state(path)
    ref = hf.load(path)
    vocab = state.model.cfg.vocab_size
    prompts = (
        np.random.RandomState(1).randint(1, vocab, size=(PROMPTS, PROMPT_LEN)).astype(np.int32)
    )
    mask = np.ones_like(prompts)

    def step(i: int) -> tuple[float, float, float, dict]:
        t0, c0 = time.perf_counter(), time.process_time()
        policy = grpo.policy_for_sampling(state)
        rollouts, rollout_metrics = grpo.rollout(
            policy, ref, prompts, mask, jax.random.key(i), REWARD, cfg
        )
        jax.block_until_ready(rollouts)
        t1 = time.perf_counter()
        update_metrics = jax.device_get(grpo.update(state, rollouts, cfg))
        t2 = time.perf_counter()
        cpu = time.process_time() - c0
        return t2 - t0, t2 - t1, cpu, {**jax.device_get(rollout_metrics), **update_metrics}

    with metrics.CompileCounter(log_each=False) as warmup_compiles:
        first, _, _, _ = step(0)
    steps, updates, cpus = [], [], []
    with metrics.CompileCounter(log_each=False) as steady:
        for i in range(repeats):
            total, update, cpu, row = step(i + 1)
            steps.append(total)
            updates.append(update)
            cpus.append(cpu)
    return {
        "micro_batch_rows": PROMPTS * GROUP // cfg.num_micro_batches,
        "shared_prompt_forward": cfg.shared_prompt_forward,
        "step_s": _stats(steps),
        "step_cpu_s": _stats(cpus),  # process CPU time, all threads
        "update_s": _stats(updates),
        "rollout_s": _stats([s - u for s, u in zip(steps, updates, strict=True)]),
        "compile_s": float(first - np.median(steps)),
        "compiles_first_step": warmup_compiles.count,
        "compiles_steady": steady.count,
        "compiles_steady_names": steady.by_name(),
        "last_reward": float(row["reward"]),
        "last_loss": float(row["loss"]),
    }


def step_breakdown(path: str, repeats: int = 3) -> dict:
    """Where workload B's step goes: each part run on its own, to completion, in rounds.

    Parts (compilation excluded: every part runs twice before timing):
    - `policy_for_sampling`: the policy weights copied into the sampling layout;
    - `generate`: `sampling.sample`, 4 prompts x G = 4 -> 128 tokens, alone;
    - `reward_device` / `reward_host`: the reward on the sampled tokens as a jitted device
      function, and through a `pure_callback` to numpy (the RL stage's path): the round trip;
    - `ref_logprobs`: the reference model's forward over the 16 x 160 tokens, alone (each
      prompt's forward once, as the rollout runs it; `..._per_row_prompts`: once per row);
    - `rollout` / `rollout_host_reward`: the whole jitted rollout with either reward;
    - `update`: `grpo.update` on that rollout batch (`update_per_row_prompts`: without
      `shared_prompt_forward`);
    - `step`: `policy_for_sampling` + `rollout` + `update` as in `grpo_step`.

    Returns {part: {"wall_s": stats, "cpu_s": stats}} (process CPU time, all threads), plus the
    rounds' loads. The parts run back to back in each round, so they see similar load.
    """
    import time as _time

    from flax import nnx

    from r1jax import grpo, sampling, sharding
    from r1jax.models import hf

    cfg = grpo_config()
    state = _train_state(path)
    ref = hf.load(path)
    vocab = state.model.cfg.vocab_size
    prompts = (
        np.random.RandomState(1).randint(1, vocab, size=(PROMPTS, PROMPT_LEN)).astype(np.int32)
    )
    mask = np.ones_like(prompts)
    policy = grpo.policy_for_sampling(state)

    def generate():
        with jax.set_mesh(policy.mesh), sharding.use_rules(sharding.SAMPLING_RULES):
            return jax.block_until_ready(
                sampling.sample(
                    policy.graphdef,
                    policy.state,
                    jnp.asarray(prompts),
                    jnp.asarray(mask),
                    jax.random.key(0),
                    num_samples=GROUP,
                    max_new_tokens=COMPLETION_LEN,
                    cfg=cfg.sampling_config(),
                )
            )

    out = generate()
    row_ids = jnp.repeat(jnp.asarray(prompts), GROUP, axis=0)
    row_mask = jnp.ones_like(row_ids)
    ref_graphdef, ref_state = nnx.split(ref)

    per_row = grpo_config(shared_prompts=False)

    @functools.partial(jax.jit, static_argnums=3)
    def ref_logprobs(ref_state, tokens, completion_mask, cfg):  # as the rollout runs it
        model = nnx.merge(ref_graphdef, ref_state)
        return grpo.scoring_logprobs(model, row_ids, row_mask, tokens, completion_mask, cfg)

    reward_device = jax.jit(REWARD)
    reward_host = jax.jit(HOST_REWARD)

    def rollout(reward_fn):
        return grpo.rollout(policy, ref, prompts, mask, jax.random.key(1), reward_fn, cfg)

    rollouts, _ = rollout(REWARD)

    def step():
        p = grpo.policy_for_sampling(state)
        r, m = grpo.rollout(p, ref, prompts, mask, jax.random.key(2), REWARD, cfg)
        jax.device_get((m, grpo.update(state, r, cfg)))

    parts = {
        "policy_for_sampling": lambda: jax.block_until_ready(grpo.policy_for_sampling(state).state),
        "generate": generate,
        "reward_device": lambda: jax.block_until_ready(reward_device(out.tokens, out.lengths)),
        "reward_host": lambda: jax.block_until_ready(reward_host(out.tokens, out.lengths)),
        "ref_logprobs": lambda: jax.block_until_ready(
            ref_logprobs(ref_state, out.tokens, out.mask, cfg)
        ),
        "ref_logprobs_per_row_prompts": lambda: jax.block_until_ready(
            ref_logprobs(ref_state, out.tokens, out.mask, per_row)
        ),
        "rollout": lambda: jax.block_until_ready(rollout(REWARD)),
        "rollout_host_reward": lambda: jax.block_until_ready(rollout(HOST_REWARD)),
        "update": lambda: jax.device_get(grpo.update(state, rollouts, cfg)),
        "update_per_row_prompts": lambda: jax.device_get(grpo.update(state, rollouts, per_row)),
        "step": step,
    }
    for fn in parts.values():  # compile, then once more warm
        fn()
        fn()
    times = {name: ([], []) for name in parts}
    for _ in range(repeats):
        for name, fn in parts.items():
            c0, w0 = _time.process_time(), _time.perf_counter()
            fn()
            times[name][0].append(_time.perf_counter() - w0)
            times[name][1].append(_time.process_time() - c0)
    return {name: {"wall_s": _stats(w), "cpu_s": _stats(c)} for name, (w, c) in times.items()}


def synthetic_rollouts(rows: int, vocab: int, seed: int = 0, group: int = 1):
    """A Rollouts batch of `rows` x (32 + 128) tokens with random contents (workload C); with
    `group` > 1, runs of `group` rows share a prompt, as a rollout's groups do (B's layout)."""
    from r1jax import grpo

    rng = np.random.RandomState(seed)
    tc = COMPLETION_LEN
    prompts = np.repeat(rng.randint(1, vocab, (rows // group, PROMPT_LEN)), group, axis=0)
    return grpo.Rollouts(
        prompt_ids=jnp.asarray(prompts, jnp.int32),
        prompt_mask=jnp.ones((rows, PROMPT_LEN), jnp.int32),
        completion_ids=jnp.asarray(rng.randint(1, vocab, (rows, tc)), jnp.int32),
        completion_mask=jnp.ones((rows, tc), jnp.int32),
        advantages=jnp.asarray(rng.randn(rows), jnp.float32),
        rewards=jnp.asarray(rng.rand(rows), jnp.float32),
        per_reward=jnp.asarray(rng.rand(rows, 1), jnp.float32),
        truncated=jnp.ones((rows,), bool),
        old_logprobs=None,
        ref_logprobs=jnp.asarray(-np.log(vocab) + 0.1 * rng.randn(rows, tc), jnp.float32),
    )


def model_flops(cfg, tokens: int, seq_len: int) -> float:
    """Training FLOPs for `tokens` tokens of sequences of `seq_len`: 6N + 12 L N_h H T per token
    (a forward and a backward: 3 forwards of `pipeline.token_pass_flops`)."""
    from r1jax.stages.pipeline import token_pass_flops

    return float(tokens * 3 * token_pass_flops(cfg, seq_len))


def update_throughput(
    path: str, matmul_gflops: float, repeats: int = 3, rows_list=UPDATE_ROWS
) -> list[dict]:
    """Workload C on the checkpoint at `path`: one row per batch size, in one piece and in
    micro-batches of `MICRO_BATCH_ROWS` rows."""
    from r1jax import grpo, metrics

    out = []
    for rows, micro_batch_rows in [(r, m) for r in rows_list for m in (0, MICRO_BATCH_ROWS)]:
        cfg = grpo_config(rows, micro_batch_rows, shared_prompts=False)
        state = _train_state(path)
        batch = synthetic_rollouts(rows, state.model.cfg.vocab_size)
        seq = PROMPT_LEN + COMPLETION_LEN
        with metrics.CompileCounter(log_each=False) as first_compiles:
            t0 = time.perf_counter()
            jax.device_get(grpo.update(state, batch, cfg))
            first = time.perf_counter() - t0
        times = []
        with metrics.CompileCounter(log_each=False) as steady:
            for _ in range(repeats):
                t0 = time.perf_counter()
                jax.device_get(grpo.update(state, batch, cfg))
                times.append(time.perf_counter() - t0)
        tokens = rows * seq
        flops = model_flops(state.model.cfg, tokens, seq)
        out.append(
            {
                "rows": rows,
                "micro_batch_rows": micro_batch_rows or rows,
                "tokens": tokens,
                "update_s": _stats(times),
                "tokens_per_s": tokens / float(np.median(times)),
                "model_gflop": flops / 1e9,
                "achieved_gflops": flops / float(np.median(times)) / 1e9,
                "mfu": flops / float(np.median(times)) / 1e9 / matmul_gflops,
                # 0 compiles on the first call: an earlier workload already compiled this shape.
                "compile_s": float(first - np.median(times)),
                "compiles_first_call": first_compiles.count,
                "compiles_steady": steady.count,
            }
        )
    return out


def run(
    sizes=("tiny",), repeats: int = 3, matmul_gflops: float | None = None, workloads=("B", "C")
) -> list[dict]:
    """Workloads B and/or C for each size; C needs the matmul rate (measured here if not given)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            path = bench_sampling.build_checkpoint(size, tmp)
            if "B" in workloads:
                row = {"workload": "B", "model": size, **grpo_step(path, repeats)}
                row["parts"] = step_breakdown(path, repeats)
                rows.append(row)
            if "C" in workloads:
                if matmul_gflops is None:
                    from bench import limits

                    matmul_gflops = limits.matmul_gflops()["median"]
                for r in update_throughput(path, matmul_gflops, repeats):
                    rows.append(
                        {"workload": "C", "model": size, "matmul_gflops": matmul_gflops, **r}
                    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workloads", default="B,C")
    args = parser.parse_args()
    print(
        json.dumps(
            run(
                tuple(args.sizes.split(",")),
                args.repeats,
                workloads=tuple(args.workloads.split(",")),
            ),
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
