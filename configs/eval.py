"""Evaluate a checkpoint on held-out prompts (offline default of --stage=eval: the toy base model).

    python -m r1jax.launch --stage=eval --config.model.path=runs/rl/hf/final

pass@1 averaged over k samples (temperature 0.6, top-p 0.95, as the paper), pass@k, cons@k majority
vote, mean response length, per-task tables. Writes eval.json and eval_samples.jsonl to the workdir.
"""

from r1jax.stages import common


def get_config(arg=None):
    common.check_config_arg(arg, "eval")
    config = common.base_config()
    config.model.path = common.TOY_BASE
    config.mesh.fsdp = 1
    config.mesh.data = -1  # sampling: replicate the weights, split the prompts
    config.data = common.data_config(source="arithmetic", template="r1_zero")
    config.eval = common.eval_config(num_prompts=128)
    config.eval.num_samples = 4
    return config
