"""Supervised fine-tuning (offline default of --stage=sft: R1's cold start on the toy base model).

    python -m r1jax.launch --stage=sft [--config.sft.source=data.jsonl] [--workdir=runs/sft]

Cold start: a few hundred readable long chain-of-thought examples in the
<think>…</think><answer>…</answer> format. For the R1 recipe's second SFT, point `sft.source` at the
JSONL that `rejection_sampling` wrote and `model.path` at the *base* model.
"""

import ml_collections

from r1jax.stages import common


def get_config(arg=None):
    common.check_config_arg(arg, "sft")
    config = common.base_config()
    config.model.path = common.TOY_BASE
    config.ckpt.every = 100

    s = config.sft = ml_collections.ConfigDict()
    s.source = "cold_start"  # "cold_start" (built-in examples) or a JSONL/Parquet file
    common.completion_data_fields(s)  # s.field_map.*, s.on_bad_json, s.overflow
    s.num_examples = 1600  # cold_start: examples generated
    # cold_start: the built-in tasks the examples solve, at the RL stage's difficulty (the cold
    # start teaches the format and readable reasoning for the task RL then trains on).
    s.tasks = ("arithmetic",)
    # cold_start: share of chains of thought with a slip they catch and fix. 0: the toy model
    # imitates the slips, not the fixes (measured: 0.3 -> held-out pass@1 0.09, 0 -> 0.37).
    s.mistake_rate = 0.0
    s.arithmetic = common.data_config().arithmetic
    s.countdown = common.data_config().countdown
    s.template = "r1_zero"  # prompt template, the same the RL stage uses
    # End prompts with the opening think tag, as data.prefill_think does for sampling (a
    # completion that starts with the tag then trains after it, not twice).
    s.prefill_think = False
    s.system_prompt = ""  # template="chat": a system message ("r1" = R1's format instruction)
    s.seq_len = 384  # tokens per row
    s.pack = False  # pack several examples per row
    s.batch_size = 16  # rows per optimizer step
    # Passes over the data: 2, the paper's. On the toy base of 2026-12-05, 1600 examples seen once
    # (100 steps) taught the format but not the steps (pass@1 0.11; lr 3e-4: 0.02), twice 0.72,
    # four times 0.84 (README, deviations). Steps = ceil(rows x epochs / batch_size): a
    # last batch that runs past the data is filled from the next epoch's order (every step has
    # batch_size rows, one compiled step).
    s.epochs = 2.0
    # Gradient accumulation; 0 = automatic (configs/rl.py; toy cold start: 0.89 -> 0.63 s per step).
    s.num_micro_batches = 0

    # Cosine decay to 0 over the run's steps (the figures above were measured at a constant rate;
    # at one the distillation's last step landed anywhere: configs/distill.py).
    config.optim = common.optim_config(
        learning_rate=1e-3, warmup_steps=10, weight_decay=0.0, schedule="cosine"
    )
    return config
