"""GRPO with rule-based rewards (offline default of --stage=rl: R1-Zero on the toy base model).

    python -m r1jax.launch --stage=rl [--workdir=runs/rl] [--config.rl.beta=0.0 ...]

R1-Zero: the base model is prompted with the paper's template (reason in <think>, answer in
<answer>) and trained with GRPO on accuracy + format rewards, no SFT. For the R1 recipe's
reasoning-RL stage, point `model.path` at a cold-start SFT checkpoint and add the
language-consistency reward. Real data: `--config.data.source=/path/to/train.jsonl` (GSM8K / MATH /
AIME / code-contest shapes) with `--config.rewards.task=0 --config.rewards.accuracy=1` (or `code`
for code tests).
"""

import ml_collections

from r1jax.stages import common


def get_config(arg=None):
    common.check_config_arg(arg, "rl")
    config = common.base_config()
    config.model.path = common.TOY_BASE
    config.ckpt.every = 25
    config.ckpt.best_metric = "eval/accuracy"
    config.log.every = 5

    config.data = common.data_config(source="arithmetic", template="r1_zero")

    # Reward name -> weight (names from r1jax.rewards.REWARDS; 0 = off). "task" is the exact
    # verifier of the built-in tasks; "accuracy" checks math answers with math-verify.
    config.rewards = ml_collections.ConfigDict(
        {
            "task": 1.0,
            "accuracy": 0.0,
            # Format: all-or-nothing, plus tag_count's partial credit per correct tag (open-r1's
            # shaping; a deviation from the paper, whose models find the format without it).
            "format": 0.25,
            "tag_count": 0.25,
            "language_consistency": 0.0,
            "code": 0.0,
            # Length shaping (r1jax.rewards.shaping), off by default. Their lengths follow
            # rl.max_completion_length (L): cosine_scaled reaches its end point at L (a
            # completion cut off there scores -1, the worst wrong answer);
            # overlong_penalty punishes the last L/5 tokens before L (DAPO's 4K of 20K), -1 beyond.
            "cosine_scaled": 0.0,
            "repetition_penalty": 0.0,
            "overlong_penalty": 0.0,
        }
    )

    r = config.rl = ml_collections.ConfigDict()
    r.steps = 80  # GRPO steps (one rollout batch each); ~2 s each on 2 CPU cores
    r.prompts_per_step = 8  # P: prompts per rollout batch
    r.num_generations = 8  # G: completions per prompt
    r.num_iterations = 1  # μ: passes over each rollout batch
    # Optimizer steps per pass: the batch's prompts dealt into this many mini-batches, one step
    # each (R1 split each rollout into 16); P must divide by it. > 1 is off-policy, as μ > 1.
    # optim.warmup_steps counts optimizer steps: μ x M of them per GRPO step.
    r.num_mini_batches = 1
    # KL weight to the reference model (0 = reference not loaded). The toy model needs a strong
    # anchor: at 0 it collapses to short constant answers (README, "Deviations from the paper").
    r.beta = 0.2
    r.epsilon_low = 0.2  # clip ratio below at 1 - epsilon_low (>= 1: no lower clip)
    r.epsilon_high = 0.2  # clip ratio above at 1 + epsilon_high (> low: DAPO clip-higher)
    r.loss_type = "grpo"  # grpo | bnpo | dr_grpo | dapo
    r.scale_rewards = "group"  # group | batch | none
    r.max_completion_length = 96  # tokens sampled per completion
    r.temperature = 1.0
    r.top_k = 0
    r.top_p = 1.0
    # Gradient accumulation per optimizer step (the reference forward takes the same micro-batches;
    # with mini-batches, the micro-batches split each mini-batch).
    # 0 = automatic: on a CPU, micro-batches of 4 rows per batch shard, whose activations stay in
    # cache (toy default: 2.6 -> 1.9 s per step); on an accelerator the whole batch at once.
    r.num_micro_batches = 0
    # Each prompt's forward once per rollout batch, shared by its G completions (same loss; the
    # scoring and training forwards skip (G - 1) / G of the prompt tokens).
    r.shared_prompt_forward = True
    # Completion slots of the sampler's KV cache at first; it doubles as it fills, so decode
    # attends over fewer than 3x the tokens written (0 = the whole budget from the first step:
    # one compiled decode loop, and a lower memory peak).
    r.decode_first_window = 32
    # Completion positions whose [rows, chunk, vocab] float32 logits are made at once when the
    # policy and reference log-probs are taken (per chip: rows of a micro-batch on it x chunk x
    # vocab x 4 bytes, about twice over); lower it for large vocabularies on small chips.
    r.logprob_chunk_size = 256
    r.ref_model = ""  # reference checkpoint ("" = the starting model.path)
    # Every N steps the reference becomes the policy (DeepSeekMath's iterative GRPO; TRL's
    # sync_ref_model), so a long run's KL pulls towards a recent policy, not the start:
    # reference <- alpha * policy + (1 - alpha) * reference. 0 = never (a fixed reference).
    r.ref_sync_steps = 0
    r.ref_sync_alpha = 1.0
    # DAPO's dynamic sampling: groups whose completions all got one reward (every answer right,
    # or every one wrong: advantages of 0) are replaced by those of further prompt batches,
    # sampled until the step has prompts_per_step groups that differ, or max_sampling_rounds
    # batches were drawn (then the batch is filled with the others). Each round costs a rollout.
    r.dynamic_sampling = False
    r.max_sampling_rounds = 4

    # A learned reward model (R1's "RL for all scenarios"), added to the rule rewards with
    # `weight`; e.g. --config.reward_model.path=/ckpt/reward-model --config.reward_model.weight=1
    config.reward_model = common.reward_model_config()

    config.eval = common.eval_config(every=20, num_prompts=64)
    config.eval.at_start = True  # the curve's starting point: the model RL begins from
    config.optim = common.optim_config(learning_rate=1e-4, warmup_steps=5)
    return config
