"""Compile r1jax's GRPO programs for a TPU v5e 2x4 slice (8 chips) without a TPU, and report what
XLA:TPU made of them: per-chip memory and the collectives inside and outside their while loops.

Run by `test_tpu_programs.py` in a subprocess whose PYTHONPATH holds libtpu (installed into a
private folder: installed next to jax it would make every JAX program probe for a TPU). The real
code paths run on abstract arrays (`jax.ShapeDtypeStruct` with the training shardings): only the
final call of each program is replaced by `lower().compile()`.

usage: python tpu_programs.py DATA FSDP TENSOR [EXPERT] > report.json (EXPERT > 1: the MoE model)
"""

import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import topologies

from r1jax import grpo, sharding, train
from r1jax.models import deepseek, deepseek_hf, hf
from r1jax.models.transformer import Decoder

# A Qwen2-shaped model, untied, float32 master weights computing in bfloat16 (the TPU set-up).
HF_CONFIG = dict(
    model_type="qwen2",
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)
# A DeepSeek-V3-shaped MoE (MLA attention, 8 routed experts, one dense layer first).
DEEPSEEK_CONFIG = dict(
    model_type="deepseek_v3",
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=512,
    moe_intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=8,
    kv_lora_rank=128,
    q_lora_rank=192,
    qk_rope_head_dim=32,
    qk_nope_head_dim=64,
    v_head_dim=64,
    n_group=2,
    topk_group=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)
PROMPTS, GROUP, PROMPT_LEN, COMPLETION_LEN = 8, 4, 32, 64
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {"f32": 4, "bf16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1}


def result_bytes(shape: str) -> int:
    """Bytes of an HLO result shape such as `bf16[256,4096]{1,0}` or a tuple of them."""
    total = 0
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", shape):
        total += int(np.prod([int(d) for d in dims.split(",") if d])) * DTYPE_BYTES.get(dtype, 4)
    return total


def collectives(hlo: str) -> dict[str, list]:
    """The collectives of an optimized HLO module as [op, result bytes] lists: `in_loops` (inside
    the body or condition of a while loop, at any depth) and `outside`. XLA:TPU writes a
    reduce-scatter as a fusion calling an `all-reduce-scatter` computation (an all-reduce and a
    slice inside): counted once, as "reduce-scatter" with the fusion's (sliced) result."""
    calls, ops, loops = {}, {}, []
    current = None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if current is None and header and "=" not in line.split("(")[0]:
            current = header.group(1)
            calls[current], ops[current] = [], []
            continue
        if line.strip() == "}":
            current = None
            continue
        instr = re.match(r"^\s*(?:ROOT )?%?[\w.\-]+ = (.+?) ([\w\-]+)\((.*)$", line)
        if current is None or not instr or current.startswith("all-reduce-scatter"):
            continue
        shape, op, rest = instr.groups()
        called = re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", rest)
        calls[current] += called
        if op == "while":
            loops += called
        if op == "fusion" and any(c.startswith("all-reduce-scatter") for c in called):
            ops[current].append(["reduce-scatter", result_bytes(shape)])
        elif op.removesuffix("-start") in COLLECTIVES:
            ops[current].append([op.removesuffix("-start"), result_bytes(shape)])

    def reach(roots):
        seen, stack = set(), list(roots)
        while stack:
            c = stack.pop()
            if c not in seen and c in calls:
                seen.add(c)
                stack += calls[c]
        return seen

    in_loops = reach(loops)
    return {
        "in_loops": [x for c in in_loops for x in ops[c]],
        "outside": [x for c in set(calls) - in_loops for x in ops[c]],
    }


def main(data: int, fsdp: int, tensor: int, expert: int = 1) -> None:
    topology = topologies.get_topology_desc(topology_name="v5e:2x4", platform="tpu")
    mesh = sharding.make_mesh(data, fsdp, tensor, expert, devices=list(topology.devices))
    if expert > 1:
        cfg = deepseek_hf.config_from_hf(DEEPSEEK_CONFIG, param_dtype="float32", dtype="bfloat16")
        build = lambda: deepseek.DeepseekDecoder(cfg, rngs=nnx.Rngs(0))  # noqa: E731
    else:
        cfg = hf.config_from_hf(HF_CONFIG, param_dtype="float32", dtype="bfloat16")
        build = lambda: Decoder(cfg, rngs=nnx.Rngs(0))  # noqa: E731
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(build)
        optimizer = nnx.eval_shape(lambda m: train.Optimizer(m, train.OptimConfig(1e-6)), model)
    state = train.TrainState(model, optimizer, mesh)
    for v, s in zip(state._variables, jax.tree.leaves(state.shardings), strict=True):
        a = v.get_raw_value()  # the training layout TrainState.create would place
        v.set_raw_value(jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s))
    report = {"params": sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nnx.state(model)))}

    def compile_(name, lowered):
        """Compile; add its memory and collectives to report[name] (a name compiled several
        times, as the sampling copy's programs: argument and output bytes summed, the largest
        temporaries, all collectives)."""
        compiled = lowered.compile()
        if os.environ.get("TPU_PROGRAMS_DUMP"):  # for reading the HLO by hand
            with open(os.path.join(os.environ["TPU_PROGRAMS_DUMP"], f"{name}.hlo.txt"), "a") as f:
                f.write(compiled.as_text())
        memory = compiled.memory_analysis()
        found = collectives(compiled.as_text())
        entry = report.setdefault(
            name,
            {
                "argument_bytes": 0,
                "output_bytes": 0,
                "temp_bytes": 0,
                "in_loops": [],
                "outside": [],
            },
        )
        entry["argument_bytes"] += memory.argument_size_in_bytes
        entry["output_bytes"] += memory.output_size_in_bytes
        entry["temp_bytes"] = max(entry["temp_bytes"], memory.temp_size_in_bytes)
        entry["in_loops"] += found["in_loops"]
        entry["outside"] += found["outside"]

    real_program = state.program

    def lowering(name):
        """A stand-in for `TrainState.program` whose step compiles instead of running."""

        def program(key, build):
            jitted, batch_shardings = build()

            def call(*args):
                compile_(name, jitted.lower(*args))
                return args[0], {}

            return call, batch_shardings

        return program

    # 1. The sampling copy of the policy: each of its programs, on its share of the weights.
    model_state = state.model_state()
    leaves, treedef = jax.tree.flatten(model_state)
    copied = list(leaves)
    for group, program in grpo.sampling_copy_plan(model_state, mesh, jnp.dtype(cfg.dtype)):
        args = [leaves[i] for i in group]
        compile_("policy_for_sampling", program.lower(args))
        for i, out in zip(group, jax.eval_shape(program, args), strict=True):
            copied[i] = out
    policy = grpo.SamplingPolicy(state.model_graphdef, jax.tree.unflatten(treedef, copied), mesh)
    # 2. The rollout (beta = 0, one policy iteration: sampling and rewards only).
    gcfg = grpo.GRPOConfig(
        num_generations=GROUP,
        beta=0.0,
        max_completion_length=COMPLETION_LEN,
        decode_first_window=16,
        num_micro_batches=2,
    )

    def even_tokens(tokens, lengths):
        valid = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
        share = jnp.sum(valid & (tokens % 2 == 0), 1) / jnp.maximum(lengths, 1)
        return share.astype(jnp.float32), share[None].astype(jnp.float32)

    even_tokens.names = ("even",)
    program = grpo._rollout_program(
        mesh, policy.graphdef, None, even_tokens, gcfg, (PROMPTS, PROMPT_LEN), False, True
    )
    rows, _ = grpo._prompt_shardings(mesh, (PROMPTS, PROMPT_LEN))
    ids = jax.ShapeDtypeStruct((PROMPTS, PROMPT_LEN), jnp.int32, sharding=rows)
    everywhere = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    key = jax.ShapeDtypeStruct(
        (), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=everywhere
    )
    # The stop-string automaton ("</answer>": 10 states), replicated like the sampler's.
    stop_table = jax.ShapeDtypeStruct((10, cfg.vocab_size), jnp.int8, sharding=everywhere)
    with jax.set_mesh(mesh), sharding.use_rules(sharding.SAMPLING_RULES):
        args = (policy.state, None, ids, ids, key, None, stop_table)
        compile_("rollout", program.lower(*args))
        rollouts, _ = jax.eval_shape(program, *args)
    # 3. The update: its batch placed abstractly.
    state.program = lowering("update")
    real_put = train.jax.device_put
    train.jax.device_put = lambda x, s: jax.tree.map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), x, s
    )
    try:
        grpo.update(state, rollouts, gcfg)
    finally:
        train.jax.device_put = real_put
        state.program = real_program
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main(*map(int, sys.argv[1:5]))
