"""Stage: evaluation, as the DeepSeek-R1 paper reports it.

For every held-out prompt, k answers are sampled (temperature 0.6, top-p 0.95 by default) and each
is checked by the same rule that rewards it in RL (the task's exact verifier, math-verify, or code
tests):

  pass@1   = mean over prompts of (correct samples / k)             (the paper's headline number)
  pass@k   = unbiased estimate 1 - C(k - c, k) / C(k, k) = [c > 0]   (with n = k samples)
  cons@k   = the majority-voted answer is correct; a tie between equally frequent answers goes to
             the one sampled first (deterministic, and no credit for a tie the vote cannot break)
  length   = mean completion length in tokens; format = share of well-formed completions

Results go to `workdir/eval.json` (overall and per task) and a table on stdout.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from r1jax import paths
from r1jax.stages import common

log = logging.getLogger("r1jax")


# --------------------------------------------------------------------------------------------------
# Metrics on graded samples (pure; unit-tested on hand-made samples)
# --------------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_vote(answers: Sequence[str | None]) -> int | None:
    """Index of the sample whose answer wins the vote (None: no sample has an answer).

    Answers are compared after stripping whitespace; among equally frequent answers the one that
    appears first wins.
    """
    keys = [a.strip() if isinstance(a, str) and a.strip() else None for a in answers]
    counts = collections.Counter(k for k in keys if k is not None)
    if not counts:
        return None
    best = max(counts.values())
    for i, key in enumerate(keys):
        if key is not None and counts[key] == best:
            return i
    return None


def score_prompt(answers: Sequence[str | None], correct: Sequence[bool]) -> dict[str, float]:
    """pass@1, pass@k and cons@k for one prompt's k graded samples."""
    k = len(correct)
    if k == 0 or len(answers) != k:
        raise ValueError("need one answer and one correctness flag per sample")
    c = int(sum(bool(x) for x in correct))
    winner = majority_vote(answers)
    return {
        "pass@1": c / k,
        f"pass@{k}": pass_at_k(k, c, k),
        f"cons@{k}": float(winner is not None and bool(correct[winner])),
    }


def aggregate(per_prompt: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over prompts."""
    keys = per_prompt[0].keys() if per_prompt else ()
    return {k: float(np.mean([p[k] for p in per_prompt])) for k in keys}


# --------------------------------------------------------------------------------------------------
# Sampling and grading
# --------------------------------------------------------------------------------------------------


def grader(prompt_set: common.PromptSet):
    """The reward composition that decides correctness for this dataset's rows."""
    from r1jax import rewards

    first = prompt_set.rows[0] if prompt_set.rows else {}
    if first.get("task") in ("arithmetic", "countdown"):
        name = "task"
    elif first.get("tests"):
        name = "code"
    else:
        name = "accuracy"
    return rewards.build_reward_fn({name: 1.0, "format": 0.0}, num_workers=0)


def evaluate(
    model,
    tokenizer,
    prompt_set: common.PromptSet,
    eval_config,
    *,
    seed: int = 0,
    mesh=None,
    samples_path: str | None = None,
) -> dict[str, Any]:
    """Sample k answers per held-out prompt and score them; returns overall + per-task metrics.

    model: a Decoder (any layout; with `mesh`, sampling runs sharded on it).
    """
    from r1jax import rewards, sampling

    k = eval_config.num_samples
    n = min(eval_config.num_prompts, len(prompt_set))
    score = grader(prompt_set)
    per_prompt, per_task, lengths, formats, records = [], collections.defaultdict(list), [], [], []
    for start in range(0, n, eval_config.batch_prompts):
        ids = list(range(start, min(n, start + eval_config.batch_prompts)))
        out = sampling.generate(
            model,
            [prompt_set.token_ids[i] for i in ids],
            max_new_tokens=eval_config.max_new_tokens,
            temperature=eval_config.temperature,
            top_p=eval_config.top_p,
            num_samples=k,
            seed=seed + start,
            mesh=mesh,
            **prompt_set.sampling_kwargs(),
        )
        texts = [
            prompt_set.completion_prefix + t
            for t in tokenizer.batch_decode(out.tokens, skip_special_tokens=True)
        ]
        columns = {c: [v[i] for i in ids for _ in range(k)] for c, v in prompt_set.columns.items()}
        graded = score(texts, **columns).per_reward[0]
        well_formed = rewards.format_reward(texts)
        for j, i in enumerate(ids):
            rows = range(j * k, (j + 1) * k)
            answers = [rewards.extract_answer(texts[r]) for r in rows]
            correct = [bool(graded[r] == 1.0) for r in rows]
            metrics = score_prompt(answers, correct)
            per_prompt.append(metrics)
            per_task[prompt_set.rows[i].get("task") or "all"].append(metrics)
            lengths += [len(out.tokens[r]) for r in rows]
            formats += [well_formed[r] for r in rows]
            records += [
                {
                    "row": i,
                    "completion": texts[r],
                    "answer": answers[r - j * k],
                    "correct": correct[r - j * k],
                }
                for r in rows
            ]
    result = {
        **aggregate(per_prompt),
        "mean_length": float(np.mean(lengths)),
        "format": float(np.mean(formats)),
        "num_prompts": n,
        "num_samples": k,
        "per_task": {t: aggregate(v) for t, v in sorted(per_task.items())},
    }
    if samples_path:  # local or cloud (r1jax.paths)
        paths.write_text(samples_path, "".join(json.dumps(r) + "\n" for r in records))
    return result


def table(result: dict[str, Any]) -> str:
    """A plain-text table of the overall and per-task metrics."""
    keys = [k for k in result if k.startswith(("pass@", "cons@"))] + ["mean_length", "format"]
    rows = [("all", result)] + [(t, m) for t, m in result.get("per_task", {}).items()]
    head = f"{'task':<14}" + "".join(f"{k:>13}" for k in keys)
    lines = [head, "-" * len(head)]
    for name, m in rows:
        lines.append(
            f"{name:<14}" + "".join(f"{m[k]:>13.3f}" if k in m else f"{'':>13}" for k in keys)
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------


def validate(config) -> None:
    common.validate_data(config.data)
    if config.eval.num_samples < 1 or config.eval.num_prompts < 1:
        raise common.ConfigError("eval.num_samples and eval.num_prompts must be >= 1")
    if not 0 < config.eval.top_p <= 1 or config.eval.temperature < 0:
        raise common.ConfigError("eval.top_p must be in (0, 1] and eval.temperature >= 0")


def run(config, workdir: str) -> dict[str, Any]:
    """Evaluate `model.path` on the held-out split; write eval.json and print the table."""
    import jax

    from r1jax import sharding

    started = time.time()
    mesh = common.make_mesh(config)
    model, tokenizer = common.load_model(config, mesh, rules=sharding.SAMPLING_RULES)
    rows = common.load_prompt_rows(config.data, "eval", config.seed)
    prompts = common.PromptSet(rows, tokenizer, config.data, seed=config.seed)
    log.info(
        "evaluating %s on %d held-out prompts x %d samples",
        config.model.path,
        min(config.eval.num_prompts, len(prompts)),
        config.eval.num_samples,
    )
    result = evaluate(
        model,
        tokenizer,
        prompts,
        config.eval,
        seed=config.seed,
        mesh=mesh,
        samples_path=os.path.join(workdir, "eval_samples.jsonl")
        if jax.process_index() == 0
        else None,
    )
    result["model"] = config.model.path
    result["minutes"] = (time.time() - started) / 60  # the pipeline's report sums these
    common.write_json(os.path.join(workdir, "eval.json"), result)
    if jax.process_index() == 0:
        print(table(result))
    return result
