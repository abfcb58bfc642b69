"""Stage: reinforcement learning with GRPO and rule-based rewards.

R1-Zero runs this straight on a base model; the R1 recipe runs it on a cold-start SFT checkpoint
(reasoning RL, with the language-consistency reward) and again at the end (RL for all scenarios).
Each step, as in DeepSeekMath's Algorithm 1:

  1. take P prompts from the training set, each wrapped in the R1-Zero template;
  2. sample G completions per prompt from the current policy (each prompt prefilled once);
  3. score every completion with rule rewards on the host: accuracy (the answer in <answer>, checked
     exactly), format (<think>…</think><answer>…</answer>), optionally language consistency; with
     `reward_model.path`, a learned reward model adds its weighted score (on device, after the
     rollout: it runs jitted programs, which must not start inside the rollout's host callback);
  4. advantage = (reward − group mean) / group std, per prompt;
  5. μ passes of `rl.num_mini_batches` optimizer steps each (μ x M steps) on the clipped
     importance-ratio objective, minus β·KL to the frozen reference.

Every `eval.every` steps (and before the first, `eval.at_start`) the policy is scored on held-out
prompts; checkpoints are written every `ckpt.every` steps and rerunning the command resumes from the
last one. At the end the final and the
best policies are exported as Hugging Face checkpoints under `workdir/hf/`.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from r1jax import checkpoint, grpo, metrics, rewards, sharding, train
from r1jax.data import templates
from r1jax.stages import common
from r1jax.stages import eval as eval_stage

log = logging.getLogger("r1jax")


def grpo_config(config, tokenizer, prompt_set: common.PromptSet) -> grpo.GRPOConfig:
    """The typed GRPO hyperparameters from config.rl (errors name the rl.* field)."""
    r = config.rl
    try:
        return grpo.GRPOConfig(
            num_generations=r.num_generations,
            num_iterations=r.num_iterations,
            num_mini_batches=r.num_mini_batches,
            beta=r.beta,
            epsilon_low=r.epsilon_low,
            epsilon_high=r.epsilon_high,
            loss_type=r.loss_type,
            scale_rewards=r.scale_rewards,
            max_completion_length=r.max_completion_length,
            temperature=r.temperature,
            top_k=r.top_k,
            top_p=r.top_p,
            num_tokens=prompt_set.num_tokens,
            num_micro_batches=common.micro_batches(config, "rl", step_rows(config)),
            stop_token_ids=prompt_set.stop_token_ids,
            pad_token_id=tokenizer.pad_token_id or 0,
            shared_prompt_forward=r.shared_prompt_forward,
            decode_first_window=r.decode_first_window,
            logprob_chunk_size=r.logprob_chunk_size,
        )
    except ValueError as e:
        raise common.ConfigError(_rl_field_message(e)) from e


def reward_specs(config) -> dict[str, Any]:
    """`config.rewards` (name -> weight; 0 = off) as `rewards.build_reward_fn` specs; the length
    shaping rewards measure against `rl.max_completion_length` (see configs/rl.py)."""
    length = config.rl.max_completion_length
    kwargs = {
        "code": {"sandbox": config.sandbox.to_dict() if "sandbox" in config else {}},
        # (a completion cut off at L scores as the worst wrong answer, not the mildest)
        "cosine_scaled": {"max_len": length, "exceed_length": -1.0},
        "overlong_penalty": {
            "max_completion_length": length,
            "soft_punish_cache": max(1, length // 5),
        },
    }
    specs = {
        name: {"weight": w, "kwargs": kwargs[name]} if name in kwargs else w
        for name, w in config.rewards.to_dict().items()
        if w != 0
    }
    # A reward model alone (every rule off): the format reward is still scored and logged.
    return specs or {"format": 0.0}


def optimizer_steps(config) -> int:
    """Optimizer steps in the run: μ x mini-batches per GRPO step (what a cosine spans)."""
    return config.rl.steps * config.rl.num_iterations * config.rl.num_mini_batches


def step_rows(config) -> int:
    """Rows one optimizer step takes: a mini-batch of the rollout batch (what the micro-batches
    split)."""
    r = config.rl
    return r.prompts_per_step * r.num_generations // max(1, r.num_mini_batches)


def _rl_field_message(error: ValueError) -> str:
    """A GRPOConfig error named by its config field: "loss_type must ..." -> "rl.loss_type must"."""
    message = str(error).replace("grpo.", "rl.")
    return message if message.startswith("rl.") else "rl." + message


# The rl fields a resume may not change (with the rewards and the models): what each step optimises.
_OBJECTIVE_FIELDS = (
    "num_iterations",
    "beta",
    "epsilon_low",
    "epsilon_high",
    "loss_type",
    "scale_rewards",
    "max_completion_length",
    "temperature",
    "top_k",
    "top_p",
    "ref_sync_steps",
    "ref_sync_alpha",
    "num_mini_batches",
    "dynamic_sampling",
)


def validate(config) -> None:
    """Refuse impossible combinations before any work (called by the launcher)."""
    import ml_collections  # noqa: F401

    common.validate_data(config.data)
    common.validate_eval(config.eval)
    common.warn_past_positions(
        config,
        {
            "rl.max_completion_length": config.rl.max_completion_length,
            "eval.max_new_tokens": config.eval.max_new_tokens,
        },
    )
    r = config.rl
    if r.steps < 1 or r.prompts_per_step < 1:
        raise common.ConfigError("rl.steps and rl.prompts_per_step must be >= 1")
    # The typed config checks its own fields (loss type, clipping, G >= 2 ...)
    # first; the micro-batch count (0 = automatic) is resolved and checked by common.micro_batches.
    try:
        grpo.GRPOConfig(
            **{
                k: v
                for k, v in r.to_dict().items()
                if k
                not in (
                    "steps",
                    "prompts_per_step",
                    "ref_model",
                    "num_micro_batches",
                    "ref_sync_steps",
                    "ref_sync_alpha",
                    "dynamic_sampling",
                    "max_sampling_rounds",
                )
            }
        )
    except ValueError as e:
        raise common.ConfigError(_rl_field_message(e)) from None
    if not isinstance(r.num_mini_batches, int) or r.prompts_per_step % max(r.num_mini_batches, 1):
        raise common.ConfigError(
            f"rl.num_mini_batches={r.num_mini_batches} must deal the rl.prompts_per_step="
            f"{r.prompts_per_step} prompts of a step evenly (whole groups per mini-batch)"
        )
    rollout_rows = r.prompts_per_step * r.num_generations
    ways = common.batch_ways(config, jax.device_count())
    if rollout_rows % ways:
        raise common.ConfigError(
            f"rl.prompts_per_step * rl.num_generations = {rollout_rows} rollout rows cannot be "
            f"split over the mesh's {ways} batch shards (mesh.data * mesh.fsdp * mesh.expert); "
            "make it a multiple"
        )
    if step_rows(config) % ways:
        raise common.ConfigError(
            f"a mini-batch's {step_rows(config)} rows (rl.num_mini_batches="
            f"{r.num_mini_batches}) cannot be split over the mesh's {ways} batch shards; use "
            "fewer mini-batches or more prompts"
        )
    k = common.micro_batches(config, "rl", step_rows(config))
    if r.loss_type == "bnpo" and r.num_micro_batches == 0 and k > 1:
        raise common.ConfigError(
            f"rl.loss_type='bnpo' averages over each micro-batch's tokens (as TRL's per-device "
            f"batch), so the micro-batch count is part of the objective; the automatic count "
            f"would be {k} on this CPU and 1 on an accelerator. Set rl.num_micro_batches "
            f"explicitly, or use 'dapo' (the whole batch's tokens, whatever the micro-batches)"
        )
    if r.beta > 0 and r.ref_model and not os.path.isdir(os.path.expanduser(r.ref_model)):
        raise common.ConfigError(f"rl.ref_model {r.ref_model!r} is not a folder")
    rounds = r.get("max_sampling_rounds", 1)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise common.ConfigError(
            f"rl.max_sampling_rounds must be an integer >= 1, got {r.max_sampling_rounds!r}"
        )
    if not isinstance(r.ref_sync_steps, int) or r.ref_sync_steps < 0:
        raise common.ConfigError(
            f"rl.ref_sync_steps must be an integer >= 0 (0 = a fixed reference), got "
            f"{r.ref_sync_steps!r}"
        )
    if not 0 < r.ref_sync_alpha <= 1:
        raise common.ConfigError(
            f"rl.ref_sync_alpha must be in (0, 1] (1 = the policy's copy), got {r.ref_sync_alpha}"
        )
    if r.ref_sync_steps and r.beta == 0:
        raise common.ConfigError(
            f"rl.ref_sync_steps={r.ref_sync_steps} syncs the reference model, which rl.beta=0 "
            "never loads (no KL term); set rl.beta > 0 or rl.ref_sync_steps=0"
        )
    if r.ref_sync_steps and r.ref_model:
        raise common.ConfigError(
            f"rl.ref_sync_steps={r.ref_sync_steps} makes the reference the policy, which needs "
            f"the policy's architecture: leave rl.ref_model empty (it was {r.ref_model!r})"
        )
    weights = config.rewards.to_dict()
    unknown = set(weights) - set(rewards.REWARDS)
    if unknown:
        raise common.ConfigError(
            f"rewards: unknown reward(s) {sorted(unknown)}; registered: {sorted(rewards.REWARDS)}"
        )
    not_numbers = {
        k: w for k, w in weights.items() if isinstance(w, bool) or not isinstance(w, int | float)
    }
    if not_numbers:
        raise common.ConfigError(
            f"rewards: each entry is a reward's weight (a number, 0 = off), got {not_numbers}; "
            "the RL stage sets the rewards' options itself (configs/rl.py)"
        )
    bad = {k: w for k, w in weights.items() if not math.isfinite(w)}
    if bad:
        raise common.ConfigError(f"rewards: weights must be finite numbers, got {bad}")
    negative = {k: w for k, w in weights.items() if w < 0}
    if negative:
        raise common.ConfigError(
            f"rewards: weights must be >= 0, got {negative}; every reward is higher for what is "
            "wanted, so a negative weight trains the opposite (the penalties, repetition_penalty "
            "and overlong_penalty, are already <= 0: give them a positive weight)"
        )
    common.validate_reward_model(config.reward_model)
    if not any(w != 0 for w in weights.values()) and not _reward_model_on(config):
        raise common.ConfigError(
            "rewards: every weight is 0 and there is no reward model (reward_model.path and "
            "reward_model.weight); give at least one reward a weight"
        )
    common.optim(config, optimizer_steps(config))


def _reward_model_on(config) -> bool:
    return bool(config.reward_model.path and config.reward_model.weight)


def _correctness_checks() -> dict[str, Any]:
    """Correctness reward name -> whether it can score a prompt row."""
    from r1jax.data import tasks as task_lib

    task = lambda row: row.get("task") in task_lib.TASKS  # noqa: E731
    answer = lambda row: row.get("solution") not in (None, "")  # noqa: E731
    return {
        "task": task,
        "accuracy": answer,
        "code": lambda row: bool(row.get("tests")),
        # (correctness scaled by length: the task's verifier, else the answer)
        "cosine_scaled": lambda row: task(row) or answer(row),
    }


def checked_rows(config, rows: list[dict]) -> list[bool]:
    """For each prompt row, whether a correctness reward that is on can score it (the others
    are the general prompts of R1's stage 4, for a reward model)."""
    on = [f for name, f in _correctness_checks().items() if config.rewards.get(name, 0.0)]
    return [any(f(row) for f in on) for row in rows]


def check_correctness_rewards(config, rows: list[dict]) -> None:
    """Refuse training prompts that no correctness reward which is on can score (the defaults
    score the built-in tasks, `task`; a GSM8K file's rows need `accuracy`, code rows `code`):
    GRPO would otherwise optimise the format rewards alone, with nothing but a NaN mean in the
    metrics to say so. Prompts only some of which are covered get a warning."""
    if _reward_model_on(config):
        return  # a learned reward model scores the prompts no rule checks
    applies = _correctness_checks()
    on = {name for name in applies if config.rewards.get(name, 0.0)}
    uncovered = [row for row, ok in zip(rows, checked_rows(config, rows), strict=True) if not ok]
    if not uncovered:
        return
    fits = sorted(  # (cosine_scaled, a shaping of them, is not suggested)
        name for name in ("task", "accuracy", "code") if any(applies[name](r) for r in uncovered)
    )
    fix = (
        " ".join(f"--config.rewards.{name}=1" for name in fits)
        if fits
        else "rows with a `solution` (accuracy), `tests` (code) or a built-in task"
    )
    message = (
        f"{len(uncovered)} of {len(rows)} training prompts ({config.data.source}) have no "
        f"correctness reward that is on ({', '.join(sorted(on)) or 'none'}); they need {fix}"
    )
    if len(uncovered) == len(rows):
        raise common.ConfigError(f"{message} (GRPO would optimise only the format rewards)")
    log.warning(message)


def reward_model_objective(section) -> dict[str, Any]:
    """What of the `reward_model` section is RL's objective, for the resume check: the model and
    its weight (one key, as recorded since the first version), which rows it scores, and how its
    score is scaled and its inputs cut (their own keys, which a checkpoint from before lacks and
    so is compared on the rest). The tokenizer and chat template it renders its inputs with are
    part of the model."""
    if not section.path:
        return {"reward_model": ""}
    return {
        "reward_model": [common.model_fingerprint(section.path), float(section.weight)],
        "reward_model.tokenizer": common.tokenizer_fingerprint(section.path),
        "reward_model.rows": section.get("rows", "general"),
        "reward_model.reads": section.get("reads", "all"),
        "reward_model.mean": float(section.mean),
        "reward_model.std": float(section.std),
        "reward_model.largest_bucket": int(max(section.buckets)),
        "reward_model.dtype": section.dtype,
    }


def run(config, workdir: str, *, export: bool = True) -> dict[str, Any]:
    """Train with GRPO; returns the last logged metrics (and the eval result under "eval/*")."""
    # -- the prompts, read first: a dataset the rewards cannot score is refused before any load --
    # (with a reward model, rows without an answer are general prompts it scores: kept)
    train_rows = common.load_prompt_rows(
        config.data, "train", config.seed, require_solution=not _reward_model_on(config)
    )
    check_correctness_rewards(config, train_rows)
    eval_rows = common.load_prompt_rows(config.data, "eval", config.seed)  # (evaluated at the end)
    if config.rewards.get("code", 0) or any(
        eval_stage.grading_kind(r.get("task"), r.get("tests")) == "code" for r in eval_rows
    ):
        common.sandbox_options(config)  # generated code must be able to run: refused here if not
    # Templated and tokenised with the model's tokenizer (a prompt too long for every bucket is
    # refused before any model loads).
    tokenizer = common.load_tokenizer(config)
    train_set = common.PromptSet(
        train_rows, tokenizer, config.data, seed=config.seed, split="training"
    )
    eval_set = common.PromptSet(
        eval_rows, tokenizer, config.data, seed=config.seed, split="held-out"
    )
    top = max(train_set.top_id(), eval_set.top_id())
    common.check_token_ids(common.vocab_size(config.model.path), tokenizer, top, "the prompts")

    # -- the policy, its optimizer, and the frozen reference (only when β > 0) --
    ref_config = None
    if config.rl.beta > 0:
        ref_config = config.copy_and_resolve_references()
        with ref_config.unlocked():
            ref_config.model.path = config.rl.ref_model or config.model.path
        # The KL reads the policy's token ids through the reference: another vocabulary (or a
        # smaller one, whose missing ids give NaN log-probs and skipped steps, blamed on the
        # learning rate) is refused before either model loads.
        if config.rl.ref_model:
            with common.named_model("rl.ref_model"):
                ref_vocab = common.load_tokenizer(ref_config).get_vocab()
            if ref_vocab != tokenizer.get_vocab():
                raise common.ConfigError(
                    f"rl.ref_model {config.rl.ref_model!r} uses a different tokenizer from the "
                    "policy; the KL penalty needs one vocabulary (leave rl.ref_model empty for "
                    "the starting model)"
                )
            vocab = common.vocab_size(config.rl.ref_model)
            common.check_token_ids(vocab, tokenizer, top, "the prompts", "rl.ref_model")
    # -- what each step optimises, and the resume check, before any model loads --
    cfg = grpo_config(config, tokenizer, train_set)
    reward_fn = rewards.build_reward_fn(reward_specs(config), **common.reward_pool_options(config))
    # -- resume from the last checkpoint, if any --
    ckpt = checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        save_interval_steps=config.ckpt.every,
        max_to_keep=config.ckpt.keep,
        best_metric=config.ckpt.best_metric or None,
        best_mode=config.ckpt.best_mode,
        async_save=config.ckpt.async_save,
    )
    # What fixes the prompts of each step: the prompts as tokenised (data, template, tokenizer)
    # with their answer columns, the seed, and the rows per step; and what fixes the objective:
    # the starting and reference models, the rewards, the loss and the sampling. A resume that
    # changes any of them would train a mix of two runs under the second one's name.
    r = config.rl
    data_order = {
        "seed": config.seed,
        "prompts_per_step": r.prompts_per_step,
        "num_generations": r.num_generations,
        "data.stop_strings": list(config.data.stop_strings),  # (where every completion ends)
        "stop_token_ids": list(train_set.stop_token_ids),  # (generation_config.json's eos too)
        "data": train_set.fingerprint(),
        "model.path": common.model_fingerprint(config.model.path),
        "rl.ref_model": common.model_fingerprint(r.ref_model) if r.ref_model else "",
        "rewards": {n: float(w) for n, w in zip(reward_fn.names, reward_fn.weights, strict=True)},
        **reward_model_objective(config.reward_model),
        **{f"rl.{k}": r[k] for k in _OBJECTIVE_FIELDS},
        **common.optimizer_layout(config),
    }
    if r.loss_type == "bnpo":  # its token mean is each micro-batch's: part of the objective
        data_order["rl.num_micro_batches"] = common.micro_batches(config, "rl", step_rows(config))
    if r.dynamic_sampling:  # (how many batches a step may draw: the data order)
        data_order["rl.max_sampling_rounds"] = r.max_sampling_rounds
    resumed = common.check_resume(
        ckpt,
        data_order,
        total_steps=config.rl.steps,
        steps_field=f"rl.steps={config.rl.steps}",
        # (runs from before these settings had them at these values)
        then={
            "rl.num_mini_batches": 1,
            "rl.ref_sync_steps": 0,
            "rl.ref_sync_alpha": 1.0,
            "rl.dynamic_sampling": False,
        },
    )

    mesh = common.make_mesh(config)
    model, _ = common.load_model(config, mesh)
    state = train.TrainState.create(model, common.optim(config, optimizer_steps(config)), mesh)
    ref = None
    if ref_config is not None:
        with common.named_model("rl.ref_model"):
            ref = common.load_model(ref_config, mesh, frozen=True)[0]

    # -- the rule rewards that score the completions --
    decode = functools.partial(_decode, tokenizer, train_set.completion_prefix)
    stops = train_set.stop_token_ids, train_set.stop_strings
    scorer = _reward_bridge(reward_fn, decode, train_set.columns, *stops)
    reward_model = common.load_reward_model(config.reward_model, mesh)  # None: off
    if reward_model is not None:
        # The rows it scores: by default the general prompts, those no correctness rule checks.
        rm_rows = np.array(
            [True] * len(train_set.rows)
            if config.reward_model.get("rows", "general") == "all"
            else [not ok for ok in checked_rows(config, train_set.rows)]
        )
        log.info("reward model: scores %d of %d training prompts", rm_rows.sum(), len(rm_rows))
        rm_prompts = _reward_model_prompts(reward_model, train_set.rows, rm_rows)
        if not rm_rows.any():
            log.warning(
                "reward_model.rows='general' and a correctness reward checks every training "
                "prompt: the reward model scores none (reward_model.rows='all' adds it to all)"
            )
    log.info(
        "GRPO: %d prompts x %d samples per step, %d steps, rewards %s, beta %s, %d train / "
        "%d held-out prompts",
        config.rl.prompts_per_step,
        cfg.num_generations,
        config.rl.steps,
        dict(zip(reward_fn.names, reward_fn.weights, strict=True)),
        cfg.beta,
        len(train_set),
        len(eval_set),
    )

    # The reference changes during the run when it is synced to the policy: saved and restored
    # with each step.
    synced_ref = ref if config.rl.ref_sync_steps else None
    if resumed is not None:
        resumed = ckpt.restore(state.model, state.optimizer, reference=synced_ref)
    start = resumed["step"] if resumed is not None else 0
    if start:
        log.info("resumed from step %d (%s)", start, ckpt.step_dir(start))
        common.warn_if_schedule_changed(config, resumed.get("schedule"), optimizer_steps(config))
    writer = metrics.MetricsWriter(
        workdir,
        total_steps=config.rl.steps,
        start_step=start,
        summary_every=config.log.every,
        desc="GRPO",
        postfix_keys=("reward", "accuracy", "format", "length"),
        progress=config.log.progress,
    )
    compiles = metrics.CompileCounter(log_each=False).start()
    base_key = jax.random.key(config.seed)
    # (a rerun after the last checkpoint, killed during its export, returns what it logged)
    row = metrics.logged_at(os.path.join(workdir, "metrics.jsonl"), start) if start else {}
    watch = train.SkipWatch(config.optim.max_skipped_steps)
    watch.resume(resumed and resumed.get("skips"))

    def held_out() -> dict[str, float]:
        result = eval_stage.evaluate(
            state.model,
            tokenizer,
            eval_set,
            config.eval,
            seed=config.seed,
            mesh=mesh,
            config=config,
        )
        scores = {f"eval/{k}": v for k, v in result.items() if not isinstance(v, dict)}
        return {**scores, "eval/accuracy": result["pass@1"]}

    if start == 0 and config.eval.at_start:
        # Where the held-out curve starts: the model RL begins from (for R1-Zero, the base).
        writer.write(0, held_out())

    # The prompt batches drawn so far: the step's, unless dynamic sampling drew more.
    drawn = resumed.get("prompt_batches", start) if resumed is not None else 0

    def rollout(batch: int, key) -> tuple[grpo.Rollouts, dict]:
        """Prompt batch `batch`'s completions, scored (the reward model's score added)."""
        prompt_ids, prompt_mask, row_ids = train_set.batch(
            train_set.row_ids(batch, config.rl.prompts_per_step)
        )
        rollouts, rollout_metrics = grpo.rollout(
            # Not kept in a variable: the sampling copy (the whole model per chip along fsdp) is
            # freed once the rollout has run, rather than held through the update and the next
            # step's copy.
            grpo.policy_for_sampling(state),
            ref,
            prompt_ids,
            prompt_mask,
            key,
            scorer,
            cfg,
            row_ids=row_ids,
            stop_strings=train_set.stop_strings,
        )
        if reward_model is None:
            return rollouts, rollout_metrics
        return _add_reward_model(
            reward_model,
            config.reward_model.weight,
            rollouts,
            rollout_metrics,
            [rm_prompts[i] for i in row_ids for _ in range(cfg.num_generations)],
            np.repeat(rm_rows[np.asarray(row_ids)], cfg.num_generations),
            decode,
            reward_fn.names,
            cfg,
            answer_only=config.reward_model.get("reads", "all") == "answer",
        )

    # -- the GRPO loop --
    for step in range(start, config.rl.steps):
        key = jax.random.fold_in(base_key, step)
        if config.rl.dynamic_sampling:
            rollouts, rollout_metrics, rounds = dynamic_sampling(
                lambda d, first=drawn, key=key: rollout(
                    first + d, key if d == 0 else jax.random.fold_in(key, d)
                ),
                cfg,
                config.rl.max_sampling_rounds,
                reward_fn.names + (("reward_model",) if reward_model is not None else ()),
                check=scorer.raise_error,
            )
        else:
            (rollouts, rollout_metrics), rounds = rollout(step, key), 1
        drawn += rounds
        update_metrics = grpo.update(state, rollouts, cfg)
        done = step + 1
        if synced_ref is not None and done % config.rl.ref_sync_steps == 0:
            grpo.sync_reference(synced_ref, state, config.rl.ref_sync_alpha)
            log.info("step %d: the reference model is now the policy's (rl.ref_sync_steps)", done)

        row = {**jax.device_get(rollout_metrics), **jax.device_get(update_metrics)}
        scorer.raise_error()  # (a reward's exception, held by the callback: nothing saved)
        row.update(_headline(row, reward_fn.names))
        if _due(done, config.eval.every, config.rl.steps):
            row.update(held_out())
        row["compiles"] = compiles.count
        writer.write(done, row)
        watch(done, row)
        if ckpt.save(
            done,
            state.model,
            state.optimizer,
            extra={
                "step": done,
                "prompt_batches": drawn,
                "run": data_order,
                "schedule": common.schedule_record(config, optimizer_steps(config)),
                "skips": watch.record(),
            },
            metrics={k: float(v) for k, v in row.items() if k.startswith("eval/")} or None,
            force=forced_save(done, config),
            interval=not watch.skipping,
            reference=synced_ref,
        ):
            writer.flush()  # a cloud workdir's metrics reach the saved step

    # -- wrap up: plots, HF exports of the final and best policies --
    ckpt.wait()
    compiles.stop()
    writer.close()
    reward_fn.close()
    scorer.columns = {}  # the kept bridge must not hold this run's dataset
    if jax.process_index() == 0:
        metrics.plot_metrics(
            os.path.join(workdir, "metrics.jsonl"),
            os.path.join(workdir, "rl_curves.png"),
            keys=("reward", "accuracy", "format", "completions/mean_length", "kl", "eval/accuracy"),
        )
    if export:
        source = common.resolve_model_path(config.model.path)  # its eos ids, generation config
        # The ids its rollouts stopped at (EOS, <|im_end|>, the chat template's turn end): served,
        # the policy stops there too.
        stops = train_set.stop_token_ids
        final_dir = os.path.join(workdir, "hf", "final")
        checkpoint.export_hf(state.model, final_dir, tokenizer, source, eos_ids=stops)
        # (with no best_metric orbax's best_step() is the latest step: nothing to export)
        if config.ckpt.best_metric and ckpt.best_step() is not None:
            best_dir = os.path.join(workdir, "hf", "best")
            if ckpt.best_step() == config.rl.steps:  # the final policy (a stale one was left)
                checkpoint.export_hf(state.model, best_dir, tokenizer, source, eos_ids=stops)
                best = config.rl.steps
            else:
                best = ckpt.export_best_hf(state.model, best_dir, tokenizer, source, eos_ids=stops)
            log.info(
                "best checkpoint (step %s by %s) exported to %s",
                best,
                config.ckpt.best_metric,
                best_dir,
            )
    ckpt.close()
    log.info(
        "GRPO done: %d compilations in the run; final policy in %s",
        compiles.count,
        os.path.join(workdir, "hf", "final"),
    )
    return row


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


# One reward bridge per set of reward names, kept for the life of the process (see below).
_BRIDGES: dict[tuple[str, ...], rewards.HostRewardBridge] = {}


def _reward_bridge(
    reward_fn, decode, columns, stop_token_ids, stop_strings
) -> rewards.HostRewardBridge:
    """The host reward bridge of this run, re-pointed at its rewards, tokenizer and dataset.

    The compiled rollout program (`grpo._rollout_program`) is cached per bridge object, and its
    host callback calls the bridge it was traced with. A new bridge per run therefore compiled
    the rollout again in every run of a process (the pipeline's RL stages, tests), and JAX's
    persistent compilation cache never stores programs with host callbacks. Reusing the bridge
    object, whose callback reads `reward_fn`, `decode` and `columns` when it runs, lets runs with
    the same reward names and shapes share one compiled rollout. Runs are sequential (each run
    has fetched its last rollout's metrics before the next starts), so re-pointing is safe.
    """
    fresh = rewards.HostRewardBridge(reward_fn, decode, columns, stop_token_ids, stop_strings)
    bridge = _BRIDGES.setdefault(reward_fn.names, fresh)
    bridge.reward_fn, bridge.decode, bridge.columns = fresh.reward_fn, fresh.decode, fresh.columns
    bridge.stop_token_ids, bridge.stop_strings = fresh.stop_token_ids, fresh.stop_strings
    bridge.error = None
    return bridge


def _reward_model_prompts(reward_model, rows: list[dict], scored) -> list[str | list[dict]]:
    """What the reward model reads before each row's answer: the question, or a conversation's
    turns, which only a chat template renders (refused now, not at the first step drawing one)."""
    prompts = [_turns_or_question(row) for row in rows]
    talks = [i for i, p in enumerate(prompts) if scored[i] and not isinstance(p, str)]
    if talks and not getattr(reward_model.tokenizer, "chat_template", None):
        raise common.ConfigError(
            f"reward_model.path: its tokenizer has no chat template to render the {len(talks)} "
            f"conversation rows it would score ({rows[talks[0]].get('where') or 'a row'}); give "
            "it one (tokenizer_config.json's chat_template) or leave those rows out"
        )
    return prompts


def _turns_or_question(row: dict) -> str | list[dict]:
    """A prompt row as the reward model takes it: its question, or its turns when a conversation."""
    turns = templates.turns_before_answer(row)
    return turns if templates.is_conversation(turns) else turns[0]["content"]


def _decode(tokenizer, prefix: str, ids: list[list[int]]) -> list[str]:
    """Completion ids -> text as the reward functions see it (with any prefilled "<think>")."""
    from r1jax.data.tokenizer import decode_completions

    return [prefix + t for t in decode_completions(tokenizer, ids)]


def _add_reward_model(
    reward_model,
    weight: float,
    rollouts: grpo.Rollouts,
    rollout_metrics: dict[str, jax.Array],
    prompts: list[str | list[dict]],
    scored: np.ndarray,
    decode,
    names: tuple[str, ...],
    cfg: grpo.GRPOConfig,
    answer_only: bool = False,
) -> tuple[grpo.Rollouts, dict[str, jax.Array]]:
    """Score the B rollouts with the learned reward model and fold it in as one more reward.

    prompts: [B] dataset questions (a conversation's turns), each repeated G times (the reward
    model renders them with its own chat template, not the policy's); scored: [B] bool, the rows
    it scores (the others get NaN, "not applicable"); decode: completion ids -> text, as the
    rule rewards saw it; answer_only: the reward model reads the text after the last </think>
    alone (`reward_model.reads="answer"`; none without one). The score joins `per_reward` as
    "reward_model", `weight * score` joins the total where it applies, and advantages and reward
    metrics (`rewards/reward_model/mean` ...) are recomputed.
    """
    ids = multihost_utils.process_allgather(rollouts.completion_ids, tiled=True)  # [B, Tc]
    mask = multihost_utils.process_allgather(rollouts.completion_mask, tiled=True)
    host = np.full(len(prompts), np.nan, np.float32)  # [B]
    rows = np.flatnonzero(scored)  # (the same on every process: prompts and texts are global)
    if rows.size:
        texts = decode([ids[i][mask[i] > 0].tolist() for i in rows])
        if answer_only:  # (R1: helpfulness judged on the summary, not the reasoning)
            texts = [t.rpartition("</think>")[2] if "</think>" in t else "" for t in texts]
        host[rows] = reward_model.score([prompts[i] for i in rows], texts)
    scores = sharding.from_host(host, rollouts.rewards.sharding)
    applies = sharding.from_host(np.asarray(scored, bool), rollouts.rewards.sharding)
    total, per_reward, advantages, reward_metrics = _fold_reward(
        rollouts.rewards,
        rollouts.per_reward,
        scores,
        applies,
        weight=float(weight),
        names=tuple(names) + ("reward_model",),
        group_size=cfg.num_generations,
        scale=cfg.scale_rewards,
    )
    rollouts = rollouts.replace(rewards=total, per_reward=per_reward, advantages=advantages)
    return rollouts, {**rollout_metrics, **reward_metrics}


@functools.partial(jax.jit, static_argnames=("weight", "names", "group_size", "scale"))
def _fold_reward(total, per_reward, scores, applies, *, weight, names, group_size, scale):
    """[B] total, [B, R] per-reward values, [B] new scores, [B] where they apply (NaN elsewhere:
    not applicable; a NaN score where it applies leaves the row unscored) -> the same with
    the new reward appended ([B], [B, R + 1]), [B] advantages, and the reward metrics of
    `grpo.reward_metrics`. With weight 0 the scores are only logged: a NaN among them leaves its
    row scored."""
    if weight:
        total = total + weight * jnp.where(applies, scores, 0.0)
    per_reward = jnp.concatenate([per_reward, scores[:, None]], axis=1)
    advantages = grpo.group_advantages(total, group_size, scale)
    return (
        total,
        per_reward,
        advantages,
        grpo.reward_metrics(total, per_reward.T, names, group_size, scale),
    )


def dynamic_sampling(
    rollout, cfg: grpo.GRPOConfig, max_rounds: int, names: Sequence[str], check=None
):
    """DAPO's dynamic sampling: a step's batch of groups whose rewards differ.

    `rollout(d)` samples the d-th prompt batch of the step (`Rollouts`, metrics). Batches are
    drawn until P groups have rewards that differ (`grpo.informative_groups`; the first P drawn
    are used), or `max_rounds` were drawn; then the batch is filled with the groups that do not
    differ, first drawn first. The groups keep the order they were drawn in. `names`: the R
    reward names of `Rollouts.per_reward`'s columns. Returns (rollouts of P groups, metrics,
    rounds drawn): the reward statistics (`grpo.reward_metrics`) are over every row drawn, the
    other metrics the mean over the rounds (the lengths' minimum and maximum over them), with
    `dynamic_sampling/rounds` and `dynamic_sampling/filled` (the share of the batch filled with
    groups whose rewards do not differ). `check()` runs after each round's results are fetched
    (the reward bridge's `raise_error`: a failing reward's NaN rows never differ, and every round
    would be drawn first).
    """
    G = cfg.num_generations
    draws, rows, kept, spare = [], [], [], []
    drawn_rewards = []  # [B] per round, on the host (read once: a collective across processes)
    P = 0
    while not draws or (len(kept) < P and len(draws) < max_rounds):
        d = len(draws)
        rollouts, rollout_metrics = rollout(d)
        P = rollouts.rewards.shape[0] // G
        draws.append(rollouts)
        rows.append(jax.device_get(rollout_metrics))
        if check is not None:
            check()
        drawn_rewards.append(sharding.to_host(rollouts.rewards))
        differ = grpo.informative_groups(drawn_rewards[-1], G)
        kept += [(d, int(g)) for g in np.flatnonzero(differ)]
        spare += [(d, int(g)) for g in np.flatnonzero(~differ)]
    picks = sorted(kept[:P] + spare[: max(0, P - len(kept))])  # (in the order drawn)
    filled = max(0, P - len(kept))
    if filled and max_rounds > 1:
        log.info(
            "dynamic sampling: %d of %d groups after %d rounds (rl.max_sampling_rounds) have "
            "rewards that differ; %d are filled with groups that do not",
            len(kept),
            P,
            len(draws),
            filled,
        )
    batch = (
        draws[0] if picks == [(0, g) for g in range(P)] else grpo.select_groups(draws, picks, cfg)
    )
    with warnings.catch_warnings():  # (a reward no round's rows had: NaN, as in one round)
        warnings.simplefilter("ignore", RuntimeWarning)
        merged = {k: np.nanmean([r[k] for r in rows]) for k in rows[0]}
    for k, pick in (("completions/min_length", np.min), ("completions/max_length", np.max)):
        if k in merged:
            merged[k] = pick([r[k] for r in rows])
    if len(draws) > 1:  # (pooled: a mean of the rounds' means would weigh a reward's rows by
        # the round they fell in, one code row of one round as much as 15 of another)
        pooled = _pooled_reward_metrics(
            np.concatenate(drawn_rewards),
            np.concatenate([sharding.to_host(d.per_reward) for d in draws]).T,
            names=tuple(names),
            group_size=G,
            scale=cfg.scale_rewards,
        )
        merged.update({k: float(v) for k, v in jax.device_get(pooled).items()})
    merged["dynamic_sampling/rounds"] = float(len(draws))
    merged["dynamic_sampling/filled"] = filled / P
    return batch, merged, len(draws)


@functools.partial(jax.jit, static_argnames=("names", "group_size", "scale"))
def _pooled_reward_metrics(rewards, per_reward, *, names, group_size, scale):
    """`grpo.reward_metrics` as one program per number of rounds (run eagerly, its ~40 small
    operations each compiled once per shape)."""
    return grpo.reward_metrics(rewards, per_reward, names, group_size, scale)


def _headline(row: dict[str, Any], names: tuple[str, ...]) -> dict[str, float]:
    """Short names for the progress line: accuracy (task/accuracy/code reward), format, length."""
    out = {"length": row.get("completions/mean_length", np.nan)}
    for name in ("task", "accuracy", "code"):
        if name in names:
            out["accuracy"] = row[f"rewards/{name}/mean"]
            break
    if "format" in names:
        out["format"] = row["rewards/format/mean"]
    return out


def forced_save(done: int, config) -> bool:
    """Whether step `done` is saved whatever `ckpt.every` says: the last step, and with best
    tracking every evaluated step (only a saved step can be kept as the best one, and
    `eval.every` need not be a multiple of `ckpt.every`)."""
    evaluated = _due(done, config.eval.every, config.rl.steps)
    return done == config.rl.steps or (evaluated and bool(config.ckpt.best_metric))


def _due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)
