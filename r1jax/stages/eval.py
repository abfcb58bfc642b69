"""Stage: evaluation, as the DeepSeek-R1 paper reports it.

For every held-out prompt, k answers are sampled (temperature 0.6, top-p 0.95 by default) and each
is checked by the same rule that rewards it in RL (the task's exact verifier, math-verify, or code
tests):

  pass@1   = mean over prompts of (correct samples / k)             (the paper's headline number)
  pass@k   = unbiased estimate 1 - C(k - c, k) / C(k, k) = [c > 0]   (with n = k samples)
  cons@k   = the majority-voted answer is correct; answers vote together when the grader deems
             them one answer ("1/2" and "0.5"; "1,234" and "1234") and it grades them alike,
             samples without an answer vote together for "no answer" (wrong: a model that
             rarely finishes cannot win on its few answers), and a tie between equally frequent
             answers goes to the one sampled first (deterministic; right or wrong, whichever
             that is)
  length   = mean completion length in tokens; format = share of well-formed completions

Results go to `workdir/eval.json` (overall and per task) and a table on stdout.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from r1jax import paths
from r1jax.data.tokenizer import decode_completions
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


def majority_vote(
    answers: Sequence[str | None],
    same: Callable[[str, str], bool] | None = None,
    labels: Sequence[Any] | None = None,
) -> int | None:
    """Index of the sample whose answer wins the vote (None: no samples).

    Answers are stripped of surrounding whitespace and grouped in sample order: each joins the
    first group whose first answer it is `same` as (default: equal strings; the eval stage passes
    the grader's own equivalence, so "1/2", "0.5" and "\\frac{1}{2}" vote together). Samples
    without an answer (None, blank) are one group, "no answer". The largest group wins, a tie
    going to the group sampled first; the winner is that group's first sample. `labels`
    (score_prompt: the grades): answers labelled differently never vote together, whatever
    `same` says (its equivalence is not transitive: "0.5" ~ "50%" ~ "50").
    """
    keys = [a.strip() if isinstance(a, str) and a.strip() else None for a in answers]
    firsts: list[int] = []  # each group's first sample
    sizes: list[int] = []
    group_of: dict[tuple, int] = {}  # answers seen -> their group (equal strings never re-checked)
    label = (lambda i: None) if labels is None else (lambda i: labels[i])
    for i, key in enumerate(keys):
        group = group_of.get((label(i), key))
        if group is None and same is not None and key is not None:
            group = next(
                (
                    g
                    for g, f in enumerate(firsts)
                    if label(f) == label(i) and keys[f] is not None and same(keys[f], key)
                ),
                None,
            )
        if group is None:
            group = len(firsts)
            firsts.append(i)
            sizes.append(0)
        group_of[(label(i), key)] = group
        sizes[group] += 1
    if not sizes:
        return None
    return firsts[sizes.index(max(sizes))]


def score_prompt(
    answers: Sequence[str | None],
    correct: Sequence[bool | float],
    same: Callable[[str, str], bool] | None = None,
) -> dict[str, float]:
    """pass@1, pass@k and cons@k for one prompt's k graded samples (`same`: see
    `majority_vote`). `correct`: per sample a bool, or a grade (1.0 = correct; NaN = unscored,
    counted wrong, and in the vote graded as the first scored sample with the same answer, or
    one `same` deems it, is, so that it cannot split its answer's votes). With `same`, the
    answers graded correct are one answer, the reference's, and vote together however they are
    written ("Option B", "\\text{B}" and "B) 42" for "B": `same` need not see it, nor be asked);
    without it (code) every answer votes as its text, or the passing programs alone would."""
    k = len(correct)
    if k == 0 or len(answers) != k:
        raise ValueError("need one answer and one correctness flag per sample")
    right = [bool(x == 1) for x in correct]  # (NaN == 1 is False; partial code credit is wrong)
    keys = [a.strip() if isinstance(a, str) else a for a in answers]
    scored = {}  # answer -> the grade of its first scored sample
    for key, x, r in zip(keys, correct, right, strict=True):
        if not (isinstance(x, float) and math.isnan(x)):
            scored.setdefault(key, r)
    labels = [
        scored[key]
        if key in scored
        else next(
            (
                grade
                for other, grade in scored.items()
                if same is not None and key and other and same(other, key)
            ),
            r,  # (no graded twin: wrong)
        )
        for key, r in zip(keys, right, strict=True)
    ]
    c = sum(right)
    voted = answers
    if same is not None:  # (code: programs vote as their text, the right and the wrong alike)
        reference = next((key for key, label in zip(keys, labels, strict=True) if label), None)
        voted = [reference if label else a for a, label in zip(answers, labels, strict=True)]
    winner = majority_vote(voted, same, labels=labels)
    return {
        "pass@1": c / k,
        f"pass@{k}": pass_at_k(k, c, k),
        f"cons@{k}": float(winner is not None and labels[winner]),
    }


def metric_names(num_samples: int) -> tuple[str, ...]:
    """The scalar metrics `evaluate` returns for `num_samples` samples per prompt (the RL stage
    logs them as `eval/<name>`, with `eval/accuracy` = pass@1)."""
    k = num_samples
    return tuple(
        dict.fromkeys(
            ["pass@1", f"pass@{k}", f"cons@{k}", "mean_length", "format", "num_prompts",
             "num_samples"]
        )
    )  # fmt: skip


def aggregate(per_prompt: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over prompts."""
    keys = per_prompt[0].keys() if per_prompt else ()
    return {k: float(np.mean([p[k] for p in per_prompt])) for k in keys}


# --------------------------------------------------------------------------------------------------
# Sampling and grading
# --------------------------------------------------------------------------------------------------


def grading_kind(task: Any, tests: Any) -> str:
    """The reward that decides a row's correctness: its task's verifier, code tests, or
    math-verify."""
    if task in ("arithmetic", "countdown"):
        return "task"
    return "code" if tests else "accuracy"


def same_answer(task: Any, tests: Any) -> Callable[[str, str], bool] | None:
    """When two extracted answers to a row are one answer, for cons@k: by the rule that grades
    the row (`grading_kind`): math-verify equivalence, the same integer (arithmetic), the same
    value (Countdown: every equation that solves the row is one answer, whatever its order,
    brackets or numbers left out where the row allows that; one breaking the row's rules is
    graded apart); None (equal strings) for code."""
    from r1jax import rewards
    from r1jax.data.arithmetic import parse_int_answer
    from r1jax.data.countdown import evaluate_expression

    kind = grading_kind(task, tests)
    if kind == "accuracy":  # answers too long to grade (scored wrong) match only themselves
        # Asked both ways: math-verify's verify(gold, answer) is not symmetric ("2, 1" matches
        # "(1, 2)", not the reverse), and the vote's groups must not follow the sampling order.
        return lambda a, b: (
            max(len(a), len(b)) <= rewards.accuracy.MAX_ANSWER_CHARS
            and (rewards.answers_match(a, b) or rewards.answers_match(b, a))
        )
    if task == "arithmetic":
        return lambda a, b: (
            parse_int_answer(a) is not None and (parse_int_answer(a) == parse_int_answer(b))
        )
    if task == "countdown":

        def reached(answer: str):  # ("expr" or "expr = n") -> its value, or the text
            found = evaluate_expression(answer.strip().removesuffix(".").split("=")[0])
            return found[0] if found else "".join(answer.split())

        return lambda a, b: reached(a) == reached(b)
    return None


def voted_answer(text: str, task: Any, tests: Any) -> str | None:
    """What a sample's cons@k vote counts: the final answer, or for a code row the program the
    tests run (`code.extract_code`: the last ```python block after the last </think>, or
    anywhere without one; chat models rarely wrap it in answer tags)."""
    from r1jax import rewards

    if grading_kind(task, tests) == "code":
        return rewards.code.extract_code(text)
    return rewards.extract_answer(text)


class Grader:
    """`grade(texts, **columns) -> [B] float` (1.0 = correct; NaN = unscored: the worker grading
    it died twice, e.g. killed for memory or past `reward_pool.timeout_s`): each sample checked by
    the reward
    its row calls for (`grading_kind`), so a dataset mixing math, code and built-in tasks (e.g. a
    glob over several files) grades every row by its own rule. Code rows run under
    `config.sandbox` (`common.sandbox_options`: refused here, before any sampling, when they
    could not run).

    Code tests and math-verify are slow (a sandboxed run per test, a symbolic comparison per
    answer), so they are scored in a pool of worker processes (`num_workers`, None =
    `config.reward_pool.workers`, as RL scores them); the built-in tasks' checks are cheap and
    run in-process.
    `submit` grades on a background thread, so that a loop can sample its next batch on the
    device meanwhile (`sample_and_grade`). Close it (or use it as a context manager) to stop
    the workers.
    """

    _POOLED = ("accuracy", "code")

    def __init__(
        self, prompt_set: common.PromptSet, config=None, *, num_workers: int | None = None
    ):
        from r1jax import rewards

        kinds = {grading_kind(r.get("task"), r.get("tests")) for r in prompt_set.rows}
        options = (
            {"code": {"sandbox": common.sandbox_options(config or {})}} if "code" in kinds else {}
        )
        pool = common.reward_pool_options(config)
        if num_workers is not None:
            pool["num_workers"] = num_workers
        self._by_kind = {
            kind: rewards.build_reward_fn(
                {kind: {"weight": 1.0, "kwargs": options.get(kind, {})}, "format": 0.0},
                **(pool if kind in self._POOLED else {**pool, "num_workers": 0}),
            )
            for kind in sorted(kinds)
        }
        self._thread: concurrent.futures.ThreadPoolExecutor | None = None

    def __call__(self, texts: Sequence[str], **columns: Sequence[Any]) -> np.ndarray:
        n = len(texts)
        kinds = [
            grading_kind(task, tests)
            for task, tests in zip(
                columns.get("task", [None] * n), columns.get("tests", [None] * n), strict=True
            )
        ]
        correct = np.zeros(n, np.float64)
        for kind, score in self._by_kind.items():
            rows = [i for i, k in enumerate(kinds) if k == kind]
            if rows:
                subset = {c: [v[i] for i in rows] for c, v in columns.items()}
                out = score([texts[i] for i in rows], **subset)
                # (a reward that does not apply, e.g. malformed tests, grades 0; NaN = unscored)
                correct[rows] = np.where(
                    np.isnan(out.total), np.nan, np.nan_to_num(out.per_reward[0])
                )
        return correct

    def submit(self, texts: Sequence[str], **columns: Sequence[Any]) -> concurrent.futures.Future:
        """`self(texts, **columns)` on a background thread; the future's result is its [B]."""
        if self._thread is None:
            self._thread = concurrent.futures.ThreadPoolExecutor(1, "r1jax-grader")
        return self._thread.submit(self, texts, **columns)

    def close(self, wait: bool = True) -> None:
        """Wait for grading in flight, then stop the worker processes (idempotent); `wait=False`
        (leaving on an error or Ctrl-C) ends them at once."""
        if self._thread is not None:
            self._thread.shutdown(wait=wait, cancel_futures=True)
            self._thread = None
        for score in self._by_kind.values():
            score.close(wait=wait)

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, kind, error, trace) -> None:
        self.close(wait=kind is None)


@dataclasses.dataclass
class GradedBatch:
    """One batch of prompts' samples, graded: `texts`, `columns` and `correct` hold a row per
    sample (prompt ids[j]'s k samples at j*k ... j*k + k - 1)."""

    ids: list[int]
    out: Any  # sampling.GenerateOutput: tokens, log-probs, stop reasons
    texts: list[str]  # the completion prefix (e.g. "<think>") + the decoded tokens
    columns: dict[str, list[Any]]  # the dataset's columns, repeated per sample
    correct: np.ndarray  # [len(ids) * k] float, 1.0 = correct


def sample_and_grade(
    grade: Grader,
    model,
    tokenizer,
    prompt_set: common.PromptSet,
    batches: Iterable[list[int]],
    *,
    batch: int,
    num_samples: int,
    **sample_kwargs,
) -> Iterator[GradedBatch]:
    """Sample `num_samples` answers to each batch of prompt ids (`PromptSet.generate`, with
    `sample_kwargs`) and grade them. A batch is graded on the host while the next one samples on
    the device, so grading costs no device time unless it is the slower of the two."""

    from r1jax import checkpoint

    def finish(ids, out, texts, columns, future) -> GradedBatch:
        return GradedBatch(ids, out, texts, columns, future.result())

    pending = None
    try:
        for ids in batches:
            out = prompt_set.generate(
                model, ids, batch=batch, num_samples=num_samples, **sample_kwargs
            )
            texts = [  # (num_samples per prompt, each after its prompt's own opened tag)
                prompt_set.prefixes[ids[j // num_samples]] + t
                for j, t in enumerate(decode_completions(tokenizer, out.tokens))
            ]
            columns = {
                c: [v[i] for i in ids for _ in range(num_samples)]
                for c, v in prompt_set.columns.items()
            }
            ready, pending = pending, (ids, out, texts, columns, grade.submit(texts, **columns))
            if ready is not None:
                yield finish(*ready)  # (graded while this batch sampled)
    except (Exception, checkpoint.Preempted):
        # A stop point (SIGTERM, a preemption) or an error while the next batch was drawn or
        # sampled: the batch in flight is sampled, its grades on the way; hand it over first
        # (rejection sampling saves it). Not on a second Ctrl-C, which stops at once.
        if pending is not None:
            ready, pending = pending, None
            yield finish(*ready)
        raise
    if pending is not None:
        yield finish(*pending)


def evaluate(
    model,
    tokenizer,
    prompt_set: common.PromptSet,
    eval_config,
    *,
    seed: int = 0,
    mesh=None,
    samples_path: str | None = None,
    progress: bool = False,
    stoppable: bool = False,
    config=None,
    grader: Grader | None = None,
) -> dict[str, Any]:
    """Sample k answers per held-out prompt and score them; returns overall + per-task metrics.

    model: a Decoder (any layout; with `mesh`, sampling runs sharded on it).
    config: the stage config, for its `sandbox` section (code rows; defaults without one).
    grader: the `Grader` of `prompt_set` (made here when None; closed either way).
    progress, stoppable: a progress bar, and SIGTERM stops a multi-process run between batches
    (`common.prompt_batches`).
    """

    k = eval_config.num_samples
    n = min(eval_config.num_prompts, len(prompt_set))
    per_prompt, per_task, lengths, formats, records = [], collections.defaultdict(list), [], [], []
    unscored = 0
    batches = common.prompt_batches(
        common.batches_of(n, eval_config.batch_prompts),
        desc="evaluation",
        progress=progress,
        stoppable=stoppable,
    )
    # The vote compares answers by the grader's rule (math-verify: k^2 / 2 comparisons of
    # distinct answers at worst, seconds each): on a thread of its own, while the next batch
    # samples, rather than between batches with the device idle.
    voter = concurrent.futures.ThreadPoolExecutor(1, "r1jax-vote")
    votes = []  # per prompt, in order: the future of its `score_prompt` metrics
    # (a Grader refuses code it could not run, before sampling)
    with grader if grader is not None else Grader(prompt_set, config) as grade:
        graded_batches = sample_and_grade(
            grade,
            model,
            tokenizer,
            prompt_set,
            batches,
            batch=min(eval_config.batch_prompts, n),
            num_samples=k,
            max_new_tokens=eval_config.max_new_tokens,
            temperature=eval_config.temperature,
            top_p=eval_config.top_p,
            seed=seed,
            mesh=mesh,
        )
        try:
            for b in graded_batches:
                _score_batch(b, prompt_set, k, voter, votes, lengths, formats, records)
                unscored += int(np.isnan(b.correct).sum())
            for task, vote in votes:
                per_prompt.append(vote.result())
                per_task[task].append(per_prompt[-1])
        finally:
            voter.shutdown(wait=False, cancel_futures=True)  # (leaving on an error: at once)

    # The vote compares answers by the grader's rule on each process (math-verify under a time
    # limit, as grading): process 0's outcome, as for the grades.
    cons = _process_0s(np.array([m[f"cons@{k}"] for m in per_prompt], np.float64))
    for m, won in zip(per_prompt, cons, strict=True):  # (per_task holds the same dicts)
        m[f"cons@{k}"] = float(won)
    result = {
        **aggregate(per_prompt),
        "mean_length": float(np.mean(lengths)),
        "format": float(np.mean(formats)),
        "num_prompts": n,
        "num_samples": k,
        "per_task": {t: aggregate(v) for t, v in sorted(per_task.items())},
    }
    if unscored:
        result["unscored"] = unscored
        log.warning(
            "%d of %d samples could not be graded (the worker grading them died twice, e.g. "
            "killed for memory) and count as incorrect (in the vote, as graded samples with "
            "the same answer are)",
            unscored,
            n * k,
        )
    if samples_path:  # local or cloud (r1jax.paths)
        paths.write_text(samples_path, "".join(json.dumps(r) + "\n" for r in records))
    return result


def _score_batch(b: GradedBatch, prompt_set, k, voter, votes, lengths, formats, records) -> None:
    """`evaluate`'s bookkeeping for one graded batch: its grades made process 0's, each prompt's
    vote submitted to `voter` (appended to `votes` as (task, future)), the samples' lengths,
    format scores and records appended."""
    from r1jax import rewards

    b.correct = _process_0s(b.correct)
    well_formed = rewards.format_reward(b.texts)
    for j, i in enumerate(b.ids):
        rows = range(j * k, (j + 1) * k)
        row = prompt_set.rows[i]
        answers = [voted_answer(b.texts[r], row.get("task"), row.get("tests")) for r in rows]
        same = same_answer(row.get("task"), row.get("tests"))
        grades = [float(b.correct[r]) for r in rows]
        votes.append((row.get("task") or "all", voter.submit(score_prompt, answers, grades, same)))
        lengths += [len(b.out.tokens[r]) for r in rows]
        formats += [well_formed[r] for r in rows]
        records += [
            {
                "row": prompt_set.indices[i],  # in the held-out rows, before any left out
                "prompt": row.get("prompt"),
                "completion": b.texts[r],
                "answer": answers[r - j * k],
                "correct": grades[r - j * k] == 1.0,
                "unscored": bool(np.isnan(grades[r - j * k])),  # (its grading worker died)
            }
            for r in rows
        ]


def _process_0s(correct: np.ndarray) -> np.ndarray:
    """[N] grades (or votes) -> process 0's, on every process. Each process grades every sample,
    and not always alike (a code test's or math-verify's time limit, a worker killed for
    memory): the RL stage's processes would keep different best checkpoints, then export
    different ones."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return correct
    # (float32: without x64, JAX would narrow float64 anyway; grades are 0, 1, fractions or NaN)
    shared = multihost_utils.broadcast_one_to_all(correct.astype(np.float32))
    return np.asarray(shared, np.float64)


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
    common.validate_eval(config.eval)
    common.warn_past_positions(config, {"eval.max_new_tokens": config.eval.max_new_tokens})


def run(config, workdir: str) -> dict[str, Any]:
    """Evaluate `model.path` on the held-out split; write eval.json and print the table."""
    import jax

    from r1jax import sharding

    started = time.time()
    rows = common.load_prompt_rows(config.data, "eval", config.seed)
    tokenizer = common.load_tokenizer(config)  # the prompts are checked before the model loads
    prompts = common.PromptSet(rows, tokenizer, config.data, seed=config.seed, split="held-out")
    common.check_token_ids(
        common.vocab_size(config.model.path), tokenizer, prompts.top_id(), "the prompts"
    )
    grader = Grader(prompts, config)  # (refuses code it cannot run, before the model loads)
    try:
        mesh = common.make_mesh(config)
        model, _ = common.load_model(config, mesh, rules=sharding.SAMPLING_RULES)
    except BaseException:
        grader.close(wait=False)
        raise
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
        progress=config.log.progress,
        stoppable=True,
        config=config,
        grader=grader,
    )
    result["model"] = config.model.path
    result["minutes"] = (time.time() - started) / 60  # the pipeline's report sums these
    common.write_json(os.path.join(workdir, "eval.json"), result)
    if jax.process_index() == 0:
        print(table(result))
    return result
