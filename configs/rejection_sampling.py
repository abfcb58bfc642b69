"""Rejection sampling from an RL checkpoint (offline default: the toy base model, for a smoke run).

    python -m r1jax.launch --stage=rejection_sampling --config.model.path=runs/rl/hf/final

Writes rejection_sampled.jsonl (rows `--stage=sft` reads) and rejection_sampling_summary.json;
each batch's graded samples are saved in rejection_sampling_batches/ as it finishes (a rerun
resumes from them).
"""

import ml_collections

from r1jax.stages import common


def get_config(arg=None):
    common.check_config_arg(arg, "rejection_sampling")
    config = common.base_config()
    config.model.path = common.TOY_BASE
    config.mesh.fsdp = 1
    config.mesh.data = -1  # sampling: replicate the weights, split the prompts
    config.data = common.data_config(source="arithmetic", template="r1_zero")

    r = config.rejection_sampling = ml_collections.ConfigDict()
    r.num_prompts = 256  # training prompts to sample from
    r.num_samples = 4  # k answers per prompt
    r.temperature = 0.6  # DeepSeek's recommended sampling for R1 models (also the eval setting)
    r.top_p = 0.95
    r.max_new_tokens = 128
    r.batch_prompts = 64  # prompts per sampling call (changes no sample: a key per row)
    r.require_correct = True  # keep only answers the task's rule accepts
    r.require_format = True  # keep only <think>…</think><answer>…</answer>
    r.drop_truncated = True  # drop answers cut off at max_new_tokens (before a stop or EOS)
    r.min_language_consistency = 0.9  # share of reasoning words in data.language
    # The paper's other two chain-of-thought filters. It gives no length; 2000 characters (a few
    # hundred words between blank lines) is our choice (0 = off).
    r.max_paragraph_chars = 2000
    r.drop_code_blocks = True  # a ``` fence inside <think>…</think> (code answers go after it)
    r.max_per_prompt = 2  # answers kept per prompt (0 = no cap)
    r.non_reasoning_source = ""  # JSONL/Parquet of prompt/completion rows to mix in ("" = none)
    r.non_reasoning_ratio = 0.33  # non-reasoning rows per reasoning row (0 = all of the file)
    return config
