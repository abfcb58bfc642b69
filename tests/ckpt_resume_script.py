"""A tiny resumable training loop, run in a subprocess by tests/test_checkpoint.py and SIGKILLed.

Every source of state a real stage has is here: parameters, Adam moments, a JAX key split each step,
a numpy Generator drawing the data, and a data position. `train` resumes from the newest
checkpoint in `workdir/checkpoints` and writes the final parameters to `workdir/final.npz`.

Usage: python tests/ckpt_resume_script.py WORKDIR NUM_STEPS [SECONDS_PER_STEP]
"""

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from r1jax.checkpoint import Checkpointer, jax_key_from_json, jax_key_to_json

# The same matmul precision as tests/conftest.py, so this subprocess and the test process compute
# bit-identical steps.
jax.config.update("jax_default_matmul_precision", "highest")


class TinyNet(nnx.Module):
    """Two linear layers, [B, 8] -> [B, 8]."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(8, 16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 8, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.tanh(self.fc1(x)))


# One transformation object for every optimizer: nnx.jit keys its cache on the optimizer's static
# parts, and two `optax.adam(...)` calls build unequal closures, which would mean a compile per run.
TX = optax.adam(1e-2)


@nnx.jit
def train_step(model, optimizer, x, y, key):
    """One Adam step on a noisy regression target; `key` makes the step depend on RNG state."""

    def loss_fn(model):
        noise = 0.01 * jax.random.normal(key, y.shape)
        return jnp.mean((model(x) - y - noise) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def train(workdir: str, num_steps: int, seconds_per_step: float = 0.0) -> int:
    """Run (or resume) the loop to `num_steps`; return the step it resumed from (0 if fresh)."""
    model = TinyNet(rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, TX, wrt=nnx.Param)
    key = jax.random.key(1)
    data_rng = np.random.default_rng(2)
    position = {"examples_seen": 0}
    start = 0
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_interval_steps=2, max_to_keep=2)
    if ckpt.latest_step() is not None:
        extra = ckpt.restore(model, optimizer)
        start = extra["step"]
        key = jax_key_from_json(extra["jax_key"])
        data_rng.bit_generator.state = extra["numpy_rng"]
        position = extra["data"]
    for step in range(start + 1, num_steps + 1):
        x = data_rng.normal(size=(4, 8)).astype(np.float32)
        y = np.roll(x, 1, axis=1)
        key, step_key = jax.random.split(key)
        train_step(model, optimizer, x, y, step_key)
        position = {"examples_seen": position["examples_seen"] + 4}
        extra = {
            "step": step,
            "jax_key": jax_key_to_json(key),
            "numpy_rng": data_rng.bit_generator.state,
            "data": position,
            "config": {"num_steps": num_steps},
        }
        ckpt.save(step, model, optimizer, extra, force=step == num_steps)
        time.sleep(seconds_per_step)
    ckpt.close()
    params = {
        ".".join(map(str, path)): np.asarray(v)
        for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    np.savez(os.path.join(workdir, "final.npz"), **params)
    return start


if __name__ == "__main__":
    resumed = train(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else 0)
    print(json.dumps({"resumed_from": resumed}), flush=True)
