"""Scaling figures: FSDP over 8 simulated CPU devices against 1 device, for the GRPO update.

Two questions from the GRPO-step issue, answered on the WORKLOAD.md models with workload C's update
(`grpo.update`, 16 x (32 + 128) tokens, beta 0.04, AdamW):

- **Memory per device** (deterministic, so the shared machine's load does not matter):
  - parameters and optimizer state (AdamW moments, counters), summed per device over every
    array's addressable shards, i.e. what the declared shardings actually put on each device;
  - XLA's compiled memory analysis of the update program (per device for a partitioned program):
    arguments, outputs, the part of the outputs aliased onto donated arguments, and temporaries
    (activations, gradients); `peak_bytes = arguments + outputs - aliased + temporaries`.
- **Update time** on 8 simulated devices against 1, interleaved in one process. This machine has 2
  cores, so 8 "devices" share them: the figure measures the overhead of partitioning (collectives,
  smaller per-device matmuls), not a speed-up; it is expected to be no faster.

The 8 devices must exist before JAX starts, so `run()` executes this file in a subprocess with
`XLA_FLAGS=--xla_force_host_platform_device_count=8` and reads its JSON back.

    python bench/bench_scaling.py [--sizes tiny,small] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

# Run from a checkout: import this tree's r1jax (and `bench`), not another installed copy.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DEVICES = 8
ROWS = 16
MESHES = {  # name -> sharding.make_mesh arguments
    "1 device": None,
    "fsdp=8": dict(data=1, fsdp=8, tensor=1),
}


def _per_device_bytes(tree) -> dict[str, int]:
    """Bytes each device holds of the arrays in `tree` (from their addressable shards)."""
    import jax

    out: dict[str, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            key = str(shard.device)
            out[key] = out.get(key, 0) + shard.data.nbytes
    return out


def state_memory(train_state) -> dict:
    """Per-device bytes of parameters and optimizer state: max and min over devices, and the
    logical (unsharded) total."""
    import jax
    from flax import nnx

    params = nnx.state(train_state.model, nnx.Param)
    opt = nnx.state(train_state.optimizer)
    out = {}
    for name, tree in (("params", params), ("optimizer", opt)):
        per_device = _per_device_bytes(tree)
        out[name] = {
            "max_per_device_bytes": max(per_device.values()),
            "min_per_device_bytes": min(per_device.values()),
            "total_bytes": sum(x.nbytes for x in jax.tree.leaves(tree)),
            "devices": len(per_device),
        }
    both = _per_device_bytes((params, opt))
    out["params_plus_optimizer_max_per_device_bytes"] = max(both.values())
    return out


def _update_program(train_state):
    """The compiled update's jitted function and batch shardings, as `TrainState.run_step` built
    them (train.py keeps them in its program table; the bench reads it rather than rebuilding a
    twin of the step). Call after one `grpo.update` on this state."""
    from r1jax import grpo, train

    for key, entry in train._PROGRAMS.items():
        inner, graphdef, mesh, _ = key
        if (
            inner[0] is grpo._update_step
            and graphdef == train_state.graphdef
            and mesh == train_state.mesh
        ):
            return entry
    raise RuntimeError("no compiled grpo.update program for this mesh; run grpo.update first")


def compiled_memory(train_state, batch) -> dict:
    """XLA's memory analysis of the update program on this state's mesh (bytes per device)."""
    import jax

    program, batch_shardings = _update_program(train_state)
    batch = jax.device_put(batch, batch_shardings)
    with train_state.mesh_context():
        compiled = program.lower(train_state.state_leaves(), batch, []).compile()
    m = compiled.memory_analysis()
    out = {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "aliased_bytes": int(m.alias_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
        "generated_code_bytes": int(m.generated_code_size_in_bytes),
    }
    out["peak_bytes"] = (
        out["argument_bytes"] + out["output_bytes"] - out["aliased_bytes"] + out["temp_bytes"]
    )
    return out


def measure(sizes=("tiny",), repeats: int = 3) -> list[dict]:
    """In this process (which must see 8 devices): one row per (size, mesh)."""
    import jax

    from bench import bench_grpo, bench_sampling
    from r1jax import grpo, sharding, train
    from r1jax.models import hf

    if jax.device_count() < DEVICES:
        raise RuntimeError(
            f"bench_scaling needs {DEVICES} devices, found {jax.device_count()}: run it with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={DEVICES} (run() does this)"
        )
    # Whole batch (2 rows per device); the synthetic rows have distinct prompts.
    cfg = bench_grpo.grpo_config(micro_batch_rows=0, shared_prompts=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            path = bench_sampling.build_checkpoint(size, tmp)
            states, batches, first = {}, {}, {}
            for name, axes in MESHES.items():
                mesh = sharding.single_device_mesh() if axes is None else sharding.make_mesh(**axes)
                state = train.TrainState.create(
                    hf.load(path), train.OptimConfig(learning_rate=bench_grpo.LEARNING_RATE), mesh
                )
                batch = bench_grpo.synthetic_rollouts(ROWS, state.model.cfg.vocab_size)
                t0 = time.perf_counter()
                jax.device_get(grpo.update(state, batch, cfg))
                first[name] = time.perf_counter() - t0
                states[name], batches[name] = state, batch
            times = {name: [] for name in MESHES}
            for i in range(repeats + 1):  # round 0 is a warm-up after compilation
                for name in MESHES if i % 2 else list(MESHES)[::-1]:
                    t0 = time.perf_counter()
                    jax.device_get(grpo.update(states[name], batches[name], cfg))
                    if i:
                        times[name].append(time.perf_counter() - t0)
            base = float(np.median(times["1 device"]))
            print(f"scaling {size}: update s {times}", file=sys.stderr, flush=True)
            for name, state in states.items():
                rows.append(
                    {
                        "model": size,
                        "mesh": name,
                        "devices": int(state.mesh.devices.size),
                        "rows": ROWS,
                        "memory": state_memory(state),
                        "compiled": compiled_memory(state, batches[name]),
                        "update_s": bench_grpo._stats(times[name]),
                        "update_vs_1_device": float(np.median(times[name])) / base,
                        "first_call_s": first[name],
                    }
                )
    return rows


def run(sizes=("tiny",), repeats: int = 3) -> list[dict]:
    """`measure` in a fresh process with 8 simulated devices; returns its rows."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"
    ).strip()
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run(
            [
                sys.executable,
                os.path.abspath(__file__),
                "--sizes",
                ",".join(sizes),
                "--repeats",
                str(repeats),
                "--json",
                out.name,
            ],
            check=True,
            env=env,
        )
        with open(out.name) as f:
            return [{"workload": "S", **r} for r in json.load(f)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the rows here instead of stdout")
    args = parser.parse_args()
    import jax

    if jax.device_count() < DEVICES and not args.json:  # by hand: again with simulated devices
        rows = run(tuple(args.sizes.split(",")), args.repeats)
    else:
        rows = measure(tuple(args.sizes.split(",")), args.repeats)
    text = json.dumps(rows, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
