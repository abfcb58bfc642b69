"""The whole R1 recipe at toy scale on the built-in offline tasks (--stage=pipeline).

    python -m r1jax.launch --stage=pipeline [--workdir=runs/pipeline]
    python -m r1jax.launch --stage=pipeline --config=configs/pipeline.py:smoke   # minutes, for CI

Each section is a full config of its stage (see configs/<stage>.py); override any field, e.g.
`--config.r1_zero.rl.steps=50`. Model paths, the second SFT's and the distillation's data, and
the evaluations' prompts (`eval_data`) are wired by the pipeline itself: a flag for a wired field
is refused.
"""

import os

from r1jax.stages import common

HERE = os.path.dirname(os.path.abspath(__file__))
LONG_BUDGET = 192  # tokens a long-CoT completion may take (R1 branch, evaluation)


def _stage(name):
    return common.load_config_file(os.path.join(HERE, name + ".py"))


def get_config(arg=None):
    common.check_config_arg(arg, "pipeline", ("smoke",))
    smoke = arg == "smoke"
    config = common.base_config()
    config.model.path = ""  # every section names its own model

    # 0. Base models: the policy's and a smaller student's (same corpus and tokenizer).
    config.base = _stage("pretrain")
    config.student_base = _stage("pretrain")
    # The student is smaller (half the layers) and its base weaker than the teacher's, as the
    # paper's Qwen/Llama bases are weaker than DeepSeek-V3-Base: 700 steps on the corpus instead
    # of 1200. Trained as long as the teacher's base, the 2-layer model ends *stronger* than the
    # 4-layer one (held-out pass@1 0.71 against 0.51), and its own RL then beats distillation
    # from a teacher below it (README, "What the findings rest on").
    config.student_base.pretrain.steps = 700
    s = config.student_base.pretrain.arch
    s.hidden_size, s.intermediate_size, s.num_layers, s.num_heads = 128, 384, 2, 4

    # 1. R1-Zero: accuracy + format rewards straight on the base model.
    config.r1_zero = _stage("rl")
    # 2. R1: cold start, reasoning RL with language consistency, rejection sampling, SFT, final RL.
    config.cold_start = _stage("sft")
    config.reasoning_rl = _stage("rl")
    config.reasoning_rl.rewards.language_consistency = 0.2
    config.rejection_sampling = _stage("rejection_sampling")
    # Half the training prompts: the second SFT learns from what is kept (2 per prompt at most),
    # and 512 prompts (608 kept, 152 steps over 4 epochs) left it far below the cold start (held-out
    # pass@1 0.36 against 0.72; README).
    config.rejection_sampling.rejection_sampling.num_prompts = 2048
    config.r1_sft = _stage("sft")  # 2 epochs, as the cold start and the paper
    config.r1 = _stage("rl")
    # The R1 branch writes the cold start's long chains of thought (~100-180 tokens here), so it
    # samples with a longer budget.
    for name in ("reasoning_rl", "r1"):
        config[name].rl.max_completion_length = LONG_BUDGET
        config[name].eval.max_new_tokens = LONG_BUDGET
    config.rejection_sampling.rejection_sampling.max_new_tokens = LONG_BUDGET
    # 3. Distillation vs RL on the student for the same compute: with match_distill_compute the
    # pipeline sets student_rl.rl.steps, once the distillation has run, to the fewest GRPO steps
    # whose model FLOPs reach the distillation's (both counted on padded shapes as compiled; the
    # report prints the ratio and both stages' minutes). Here 2 epochs over 2409-3565 kept samples
    # (302-446 steps of 16 x 384 tokens) match 179-264 GRPO steps of 8 prompts x 8 samples.
    config.distill = _stage("distill")
    config.distill.distill.epochs = 2.0  # the paper's, as the second SFT (thousands of traces here)
    config.student_rl = _stage("rl")
    config.match_distill_compute = True  # False: student_rl.rl.steps as set
    # Stop after pretraining when a base does not copy tag names (pretrain's "tag_copy" check):
    # it would not follow the R1-Zero template, and nothing after it could learn (README, seed 2).
    config.require_tag_copy = True

    # 4. One held-out evaluation for every checkpoint.
    config.eval_stage = _stage("eval")
    config.eval_stage.eval.max_new_tokens = LONG_BUDGET  # the same budget for every checkpoint
    # All 256 held-out problems x 4 samples: the paired standard error of a difference between
    # two checkpoints is ~0.02-0.03 (~0.03-0.045 on 128 problems).
    config.eval_data = common.data_config(source="arithmetic", template="r1_zero")
    config.eval_stage.eval.num_prompts = config.eval_data.num_eval

    if smoke:  # the same pipeline in minutes: tiny corpora, few steps
        for name in ("base", "student_base"):
            p = config[name].pretrain
            p.corpus_docs, p.steps, p.batch_size, p.seq_len = 600, 4, 8, 128
            p.copy_warmup_steps = min(p.copy_warmup_steps, 2)
            p.tag_copy_restarts = 0  # 4 corpus steps teach no copying: nothing to restart for
            config[name].optim.warmup_steps = 1
        for name in ("r1_zero", "reasoning_rl", "r1", "student_rl"):
            r = config[name].rl
            r.prompts_per_step, r.num_generations, r.max_completion_length = 4, 2, 16
            if name != "student_rl":  # (its steps match the distillation's compute)
                r.steps = 2
            config[name].eval.num_prompts, config[name].eval.max_new_tokens = 4, 16
            config[name].data.num_train, config[name].data.num_eval = 64, 8
        for name in ("cold_start", "r1_sft", "distill"):
            section = config[name].sft if "sft" in config[name] else config[name].distill
            section.epochs, section.batch_size, section.seq_len = 1.0, 8, 256
            section.num_examples = 16
        rs = config.rejection_sampling.rejection_sampling
        rs.num_prompts, rs.num_samples, rs.max_new_tokens = 8, 2, 16
        rs.require_correct = rs.require_format = rs.drop_truncated = False  # (16 tokens: any)
        rs.min_language_consistency = 0.0
        config.rejection_sampling.data.num_train = 64
        config.eval_stage.eval.num_prompts = 8
        config.eval_stage.eval.num_samples = 2
        config.eval_stage.eval.max_new_tokens = 16
        config.eval_data.num_eval = 8
        config.require_tag_copy = False  # 4 corpus steps teach no copying
    return config
