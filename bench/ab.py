"""Interleaved A/B timing of the working tree against a git revision, in one process.

The machine is shared (load 2-10 from other engineers), so wall-clock medians of one program move
by 2x between minutes. This script runs a *baseline* and a *candidate* version of the hot code in
the same process, alternating calls (A B B A A B ...), and compares process CPU time
(`time.process_time`: under time-slicing it counts the work done, not the time spent waiting for
a core) as well as wall time. Pin it to one core so that CPU time is not spread over threads that
wait for each other:

    taskset -c 0 python bench/ab.py --baseline 14e95f4 --what decode,update --sizes tiny

The baseline is `r1jax/models/transformer.py` and `r1jax/grpo.py` as of `--baseline` (a git
revision read with `git show`, so nothing in the checkout changes, or a directory holding a copy of
a tree), loaded as separate modules next to the working tree's; everything else (sampler, train
state, sharding) is shared. Both versions run the same weights (the WORKLOAD.md checkpoint, seed
0), the same inputs and the same keys.

What can be timed (`--what`):
- `decode`:    `sampling.sample`, 16 prompts x 32 tokens -> 128 new tokens, G = 1 (workload A);
- `decode_g4`: the same with 4 prompts x G = 4 (the shared-prefix cache of workload B);
- `update`:    `grpo.update` on a synthetic 16 x (32 + 128) rollout batch (workload C);
- `update_g4`: the same batch as 4 prompts x G = 4, each prompt's forward once (B's update);
- `step`:      one whole GRPO step of workload B (`policy_for_sampling` + `rollout` + `update`).

Output: per item, the CPU and wall medians of each side, the ratio of medians and the median of
per-pair ratios (candidate / baseline; < 1 means the candidate is faster); `--json` writes them.
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types

import numpy as np

# Run from a checkout: import this tree's r1jax (and `bench`), not another installed copy.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import bench_grpo, bench_sampling  # noqa: E402

WHAT = ("decode", "decode_g4", "update", "update_g4", "step")


def load_revision(rev: str, relpath: str, name: str) -> types.ModuleType:
    """`relpath` as of git revision `rev` (or under the directory `rev`, e.g. a copy of an earlier
    tree), imported as a fresh module called `name`."""
    if os.path.isdir(rev):
        with open(os.path.join(rev, relpath)) as f:
            source = f.read()
    else:
        source = subprocess.run(
            ["git", "-C", ROOT, "show", f"{rev}:{relpath}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    folder = tempfile.mkdtemp(prefix="r1jax_ab_")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    path = os.path.join(folder, os.path.basename(relpath))
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and flax.struct look their module up by name
    spec.loader.exec_module(module)
    return module


class Variant:
    """One version of the model code (and GRPO step) on the shared weights."""

    def __init__(self, label: str, transformer, grpo, path: str):
        from flax import nnx

        from r1jax.models import hf

        self.label, self.grpo = label, grpo
        loaded = hf.load(path)
        with nnx.use_eager_sharding(False):
            abstract = nnx.eval_shape(lambda: transformer.Decoder(loaded.cfg, rngs=nnx.Rngs(0)))
        graphdef, _ = nnx.split(abstract)
        self.model = nnx.merge(graphdef, nnx.state(loaded))
        self.path = path

    def fresh_model(self):
        """A new copy of the model's arrays (a train state donates its model's buffers)."""
        import jax
        from flax import nnx

        graphdef, state = nnx.split(self.model)
        return nnx.merge(graphdef, jax.tree.map(lambda x: x.copy(), state))


def _decode_fn(variant: Variant, prompts: int, group: int):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from r1jax import sampling

    graphdef, state = nnx.split(variant.model)
    vocab = variant.model.cfg.vocab_size
    ids = jnp.asarray(bench_sampling.make_prompts(vocab)[:prompts])
    mask = jnp.ones_like(ids)
    cfg = sampling.SamplingConfig(1.0)
    counter = iter(range(10**6))

    def run():
        out = sampling.sample(
            graphdef,
            state,
            ids,
            mask,
            jax.random.key(next(counter)),
            num_samples=group,
            max_new_tokens=bench_sampling.NEW_TOKENS,
            cfg=cfg,
        )
        jax.block_until_ready(out)

    return run


def _update_fn(variant: Variant, rows: int = 16, shared: bool = False):
    import jax

    from r1jax import train

    state = train.TrainState.create(
        variant.fresh_model(), train.OptimConfig(learning_rate=bench_grpo.LEARNING_RATE)
    )
    group = bench_grpo.GROUP if shared else 1
    batch = bench_grpo.synthetic_rollouts(rows, state.model.cfg.vocab_size, group=group)
    # Micro-batches of bench_grpo.MICRO_BATCH_ROWS; without `shared`, every row its own prompt.
    cfg = bench_grpo.grpo_config(rows, shared_prompts=shared)
    return lambda: jax.device_get(variant.grpo.update(state, batch, cfg))


def _step_fn(variant: Variant):
    import jax

    from r1jax import train

    grpo = variant.grpo
    state = train.TrainState.create(
        variant.fresh_model(), train.OptimConfig(learning_rate=bench_grpo.LEARNING_RATE)
    )
    ref = variant.fresh_model()
    cfg = bench_grpo.grpo_config()
    vocab = state.model.cfg.vocab_size
    prompts = (
        np.random.RandomState(1)
        .randint(1, vocab, size=(bench_grpo.PROMPTS, bench_grpo.PROMPT_LEN))
        .astype(np.int32)
    )
    mask = np.ones_like(prompts)
    counter = iter(range(10**6))

    def run():
        policy = grpo.policy_for_sampling(state)
        rollouts, rollout_metrics = grpo.rollout(
            policy, ref, prompts, mask, jax.random.key(next(counter)), bench_grpo.REWARD, cfg
        )
        jax.device_get((rollout_metrics, grpo.update(state, rollouts, cfg)))

    return run


def make_fn(what: str, variant: Variant):
    """A no-argument callable that runs one timed unit of `what` to completion."""
    if what == "decode":
        return _decode_fn(variant, bench_sampling.NUM_PROMPTS, 1)
    if what == "decode_g4":
        return _decode_fn(variant, bench_grpo.PROMPTS, bench_grpo.GROUP)
    if what == "update":
        return _update_fn(variant)
    if what == "update_g4":
        return _update_fn(variant, shared=True)
    if what == "step":
        return _step_fn(variant)
    raise ValueError(f"unknown --what {what!r}; choose from {WHAT}")


def _timed(fn) -> tuple[float, float]:
    c0, w0 = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c0, time.perf_counter() - w0


def _stats(values) -> dict[str, float]:
    return {"median": float(np.median(values)), "min": min(values), "max": max(values)}


def compare(base_fn, cand_fn, repeats: int) -> dict:
    """Alternate the two (ABBA order, so neither always runs second); CPU and wall seconds."""
    base_fn(), cand_fn()  # warm-up: compilation
    base_fn(), cand_fn()
    times = {"baseline": [], "candidate": []}
    for i in range(repeats):
        order = (("baseline", base_fn), ("candidate", cand_fn))
        for label, fn in order if i % 2 == 0 else order[::-1]:
            times[label].append(_timed(fn))
    out = {}
    for kind, k in (("cpu", 0), ("wall", 1)):
        base = [t[k] for t in times["baseline"]]
        cand = [t[k] for t in times["candidate"]]
        out[kind] = {
            "baseline_s": _stats(base),
            "candidate_s": _stats(cand),
            "ratio_of_medians": float(np.median(cand) / np.median(base)),
            "ratio_pairwise_median": float(
                np.median([c / b for b, c in zip(base, cand, strict=True)])
            ),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--baseline",
        required=True,
        help="git revision (or a tree's directory) of the baseline, e.g. 14e95f4 (before M1/M4); "
        "not HEAD once the candidate is committed, which would compare the code with itself",
    )
    parser.add_argument("--what", default="decode", help=f"comma-separated subset of {WHAT}")
    parser.add_argument("--sizes", default="tiny", help="tiny,small (update/step: tiny is B/C's)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()

    import r1jax.grpo
    import r1jax.models.transformer

    base_t = load_revision(args.baseline, "r1jax/models/transformer.py", "r1jax_ab_transformer")
    base_g = load_revision(args.baseline, "r1jax/grpo.py", "r1jax_ab_grpo")
    results = {
        "baseline": args.baseline,
        "affinity": sorted(os.sched_getaffinity(0)),
        "load_before": os.getloadavg(),
        "rows": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            path = bench_sampling.build_checkpoint(size, tmp)
            base = Variant("baseline", base_t, base_g, path)
            cand = Variant("candidate", r1jax.models.transformer, r1jax.grpo, path)
            for what in args.what.split(","):
                row = {"size": size, "what": what}
                row.update(compare(make_fn(what, base), make_fn(what, cand), args.repeats))
                results["rows"].append(row)
                c, w = row["cpu"], row["wall"]
                print(
                    f"{size:5s} {what:9s} cpu {c['baseline_s']['median']:.3f} -> "
                    f"{c['candidate_s']['median']:.3f} s ({c['ratio_of_medians']:.2f}x, pairwise "
                    f"{c['ratio_pairwise_median']:.2f}x) | wall {w['baseline_s']['median']:.3f} -> "
                    f"{w['candidate_s']['median']:.3f} s ({w['ratio_of_medians']:.2f}x)",
                    flush=True,
                )
    results["load_after"] = os.getloadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
