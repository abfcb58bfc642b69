"""Distil teacher traces into a smaller student (--stage=distill).

    python -m r1jax.launch --stage=distill --config.distill.source=runs/rs/rejection_sampled.jsonl \
        --config.model.path=/path/to/student [--config.distill.teacher=/path/to/teacher]

`model.path` is the student to train; `distill.source` is the JSONL of teacher traces that
`--stage=rejection_sampling` wrote. Setting `distill.teacher` (same tokenizer) switches from trace
SFT to logit distillation (forward KL to the teacher's next-token distributions).
"""

import ml_collections

from r1jax.stages import common


def get_config(arg=None):
    common.check_config_arg(arg, "distill")
    config = common.base_config()
    config.model.path = common.TOY_BASE  # the student

    d = config.distill = ml_collections.ConfigDict()
    d.source = "cold_start"  # teacher traces: JSONL from rejection_sampling, or the built-in ones
    common.completion_data_fields(d)  # d.field_map.*, d.on_bad_json, d.overflow
    d.teacher = ""  # teacher checkpoint for logit distillation ("" = trace SFT only)
    d.temperature = 1.0  # logit distillation: softmax temperature of both distributions
    d.template = "r1_zero"  # prompt template the traces were sampled with
    # End prompts with the opening think tag, as data.prefill_think does for sampling (a
    # completion that starts with the tag then trains after it, not twice).
    d.prefill_think = False
    d.system_prompt = ""  # template="chat": a system message ("r1" = R1's format instruction)
    d.num_examples = 400  # source="cold_start": built-in traces generated
    d.tasks = ("arithmetic",)  # source="cold_start": the built-in tasks they solve
    d.mistake_rate = 0.0  # source="cold_start": share of traces with a slip (see configs/sft.py)
    d.arithmetic = common.data_config().arithmetic
    d.countdown = common.data_config().countdown
    d.seq_len = 384
    d.pack = False
    d.batch_size = 16
    # On a few hundred traces the toy student needs ~100 steps (4 epochs); the pipeline, on
    # thousands, uses the paper's 2. Rounded up to whole steps as sft.epochs (configs/sft.py).
    d.epochs = 4.0
    d.num_micro_batches = 0  # gradient accumulation; 0 = automatic (see configs/rl.py)

    # Cosine decay to 0 over the run's steps: at a constant rate the student's last step landed
    # anywhere (session 20's pipeline: pass@1 0.467 at step 350, 0.258 at the final 376; with
    # the decay 0.66-0.72 on either run's traces and seeds).
    config.optim = common.optim_config(learning_rate=1e-3, warmup_steps=10, schedule="cosine")
    return config
