"""Supervised fine-tuning (offline default of --stage=sft: R1's cold start on the toy base model).

    python -m r1jax.launch --stage=sft [--config.sft.source=data.jsonl] [--workdir=runs/sft]

Cold start: a few hundred readable long chain-of-thought examples in the
<think>…</think><answer>…</answer> format. For the R1 recipe's second SFT, point `sft.source` at the
JSONL that `rejection_sampling` wrote and `model.path` at the *base* model.
"""

import ml_collections

from r1jax.stages import common


def get_config(arg=None):
    config = common.base_config()
    config.model.path = common.TOY_BASE
    config.ckpt.every = 100

    s = config.sft = ml_collections.ConfigDict()
    s.source = "cold_start"  # "cold_start" (built-in examples) or a JSONL/Parquet file
    s.num_examples = 400  # cold_start: examples generated
    s.template = "r1_zero"  # prompt template, the same the RL stage uses
    s.seq_len = 384  # tokens per row
    s.pack = False  # pack several examples per row
    s.batch_size = 16  # rows per optimizer step
    s.epochs = 2.0  # passes over the data (the paper: 2 epochs for the rejection-sampling SFT)
    s.num_micro_batches = 1  # gradient accumulation

    config.optim = common.optim_config(learning_rate=5e-4, warmup_steps=10, weight_decay=0.0)
    return config
