"""Stage: rejection sampling — turn an RL checkpoint into SFT data (R1's stage 3).

1. sample k answers for each training prompt from the checkpoint;
2. keep an answer only if it ended before the token budget, is correct (the task's rule),
   well-formed (<think>…</think><answer>…</answer>), and its chain of thought is in one language
   (language-consistency reward above a threshold), without long paragraphs and without code
   blocks — the filters the paper describes ("we filter out chain-of-thought with mixed languages,
   long paragraphs, and code blocks"), each switchable; for the built-in tasks, an answer that
   states a held-out problem with its answer (a check "49 + 6 = 55" whose problem is held out) is
   dropped too, or the SFT data would give evaluation answers away;
3. drop duplicates and cap the answers kept per prompt;
4. mix in non-reasoning data (prompt/completion rows from a file), as the paper adds ~200k such
   samples to ~600k reasoning ones;
5. write `workdir/rejection_sampled.jsonl` (rows that `--stage=sft` reads) and a summary of what was
   kept and why the rest was dropped.

Each batch's graded samples are written as soon as it is graded (`SampleStore`): a run stopped
part way (SIGTERM, a preemption, Ctrl-C, a crash) resumes from the batches it wrote when rerun,
and a rerun with other filters (steps 2-4) filters the samples again without loading the model.

Each completion holds the whole "<think>…</think><answer>…</answer>" format, whatever the prompt
opened; SFT drops the opening tag when its own prompt ends with one (a reasoning chat template, or
`sft.prefill_think`: set it when `data.prefill_think` sampled these, to train on the sequence as
it was sampled).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath

from r1jax import paths, rewards, sampling, sharding
from r1jax.data import arithmetic, tasks, templates
from r1jax.rewards.common import think_region
from r1jax.rewards.language import word_scripts
from r1jax.stages import common
from r1jax.stages import eval as eval_stage

log = logging.getLogger("r1jax")

DROP_REASONS = (
    "empty",
    "truncated",
    "unscored",
    "incorrect",
    "malformed",
    "states_held_out",
    "mixed_language",
    "long_paragraph",
    "code_block",
    "duplicate",
    "over_cap",
)
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


def longest_paragraph(text: str) -> int:
    """Characters in the longest paragraph (blank-line separated) of `text`."""
    return max((len(p.strip()) for p in _PARAGRAPH_BREAK.split(text)), default=0)


def filter_samples(
    samples: Sequence[dict[str, Any]],
    *,
    require_correct: bool = True,
    require_format: bool = True,
    drop_truncated: bool = True,
    min_language_consistency: float = 0.0,
    max_paragraph_chars: int = 0,
    drop_code_blocks: bool = False,
    max_per_prompt: int = 0,
) -> tuple[list[dict], collections.Counter]:
    """Apply the rejection filters to graded samples; returns (kept, Counter of drop reasons).

    Each sample has `row` (prompt id), `completion`, `correct` (bool), `format` (float, 1.0 =
    well-formed) and `language` (share of the reasoning's words in the target language; None when
    it has no words, e.g. only arithmetic: nothing in another language), and optionally
    `prompt` (the prompt as sampled: duplicates and the cap count by it, so that one problem on
    several rows of a file is one prompt), `empty` (nothing sampled after the prompt: nothing to
    learn, and SFT refuses such a row; always dropped), `truncated` (it reached the token
    budget: cut off; dropped unless `drop_truncated` is off), `unscored` (its grading worker
    died twice: not known to be correct; dropped when `require_correct`) and `states_held_out`
    (its text states a held-out problem with the answer: always dropped).
    The paragraph and code filters read the chain of thought (`rewards.think_region`); 0 / False
    turn them off. Filters apply in the order of DROP_REASONS, and a sample is counted under the
    first one it fails.
    """
    kept, dropped = [], collections.Counter()
    seen: set[tuple[Any, str]] = set()
    per_prompt: collections.Counter = collections.Counter()
    for s in samples:
        prompt = s.get("prompt", s["row"])  # (a file may hold one problem on several rows)
        answer = s["completion"].strip()
        # (samples saved before `empty` was recorded: an empty answer, or only the think tag)
        if s.get("empty", not answer.removeprefix("<think>").strip()):
            dropped["empty"] += 1
        elif drop_truncated and s.get("truncated"):
            dropped["truncated"] += 1
        elif require_correct and s.get("unscored"):
            dropped["unscored"] += 1
        elif require_correct and not s["correct"]:
            dropped["incorrect"] += 1
        elif require_format and s["format"] < 1.0:
            dropped["malformed"] += 1
        elif s.get("states_held_out"):
            dropped["states_held_out"] += 1
        elif s["language"] is not None and s["language"] < min_language_consistency:
            dropped["mixed_language"] += 1
        elif max_paragraph_chars and longest_paragraph(think_region(s["completion"])) > (
            max_paragraph_chars
        ):
            dropped["long_paragraph"] += 1
        elif drop_code_blocks and "```" in think_region(s["completion"]):
            dropped["code_block"] += 1
        elif (prompt, answer) in seen:
            dropped["duplicate"] += 1
        elif max_per_prompt and per_prompt[prompt] >= max_per_prompt:
            dropped["over_cap"] += 1
        else:
            seen.add((prompt, answer))
            per_prompt[prompt] += 1
            kept.append(s)
    return kept, dropped


def states_held_out(text: str) -> bool:
    """Whether `text` states a held-out problem of the built-in arithmetic task with its answer
    (`arithmetic.equation_keys`; Countdown's steps are such problems too)."""
    return not tasks.all_train(arithmetic.equation_keys(text))


def validate(config) -> None:
    common.validate_data(config.data)
    r = config.rejection_sampling
    common.warn_past_positions(config, {"rejection_sampling.max_new_tokens": r.max_new_tokens})
    if min(r.num_prompts, r.num_samples, r.max_new_tokens, r.batch_prompts) < 1:
        raise common.ConfigError(
            "rejection_sampling.num_prompts, num_samples, max_new_tokens and batch_prompts must "
            "be >= 1"
        )
    common.check_sampling(r, "rejection_sampling")
    if r.non_reasoning_source:
        common.check_data_files(r.non_reasoning_source, "rejection_sampling.non_reasoning_source")
    if not 0.0 <= r.min_language_consistency <= 1.0:
        raise common.ConfigError("rejection_sampling.min_language_consistency must be in [0, 1]")
    if r.max_per_prompt < 0:
        raise common.ConfigError(
            f"rejection_sampling.max_per_prompt must be >= 0 (0 = no cap), got {r.max_per_prompt}"
        )
    if r.max_paragraph_chars < 0:
        raise common.ConfigError("rejection_sampling.max_paragraph_chars must be >= 0 (0 = off)")
    if not 0 <= r.non_reasoning_ratio < float("inf"):
        raise common.ConfigError(
            f"rejection_sampling.non_reasoning_ratio must be >= 0 (non-reasoning rows per kept "
            f"sample; 0 = all of the file), got {r.non_reasoning_ratio}"
        )


def _sft_row(row: dict, completion: str) -> dict:
    """The SFT row of a kept sample: its prompt row's question, solution, task and meta, and the
    turns it answered when the row is a conversation (SFT renders them as sampling did)."""
    turns = templates.turns_before_answer(row)
    return {
        **{k: v for k, v in row.items() if k in ("prompt", "solution", "task", "meta")},
        **({"messages": turns} if templates.is_conversation(turns) else {}),
        "completion": completion,
        "source": "reasoning",
    }


def _non_reasoning_rows(r) -> list[dict[str, Any]]:
    """The rows of `non_reasoning_source` as SFT rows tagged `source: non_reasoning`: prompt/
    completion pairs as they are, chat rows as their messages (the SFT stage renders them as it
    does its own source's: one question in sft.template, a conversation with the chat template).
    [] when there is none."""
    if not r.non_reasoning_source:
        return []
    try:
        extra, _ = common.load_completion_rows(r.non_reasoning_source)
    except (OSError, ValueError) as e:
        why = str(e).replace(", or load with on_bad_json='skip'", "")  # (this file cannot)
        raise common.ConfigError(f"rejection_sampling.non_reasoning_source: {why}") from e

    def written(value) -> bool:  # (SFT refuses an answer of white space, after the sampling)
        return isinstance(value, str) and bool(value.strip())

    rows = []
    for i, x in enumerate(extra):
        last = (x.get("messages") or [{}])[-1]
        if written(x.get("completion")) and x.get("messages"):  # the answer to these turns (as
            turns = x["messages"]  # sft.load_pairs: a last assistant turn is what it replaces)
            turns = turns[:-1] if turns[-1].get("role") == "assistant" else turns
            row = {"messages": [*turns, {"role": "assistant", "content": x["completion"]}]}
        elif written(x.get("completion")):
            row = {"prompt": x["prompt"], "completion": x["completion"]}
        elif last.get("role") == "assistant" and written(last.get("content")):
            row = {"messages": x["messages"]}
        else:
            raise common.ConfigError(
                f"rejection_sampling.non_reasoning_source "
                f"{x.get('where') or f'{r.non_reasoning_source}, row {i}'} has neither a "
                "completion nor a final assistant message (with text)"
            )
        rows.append({**row, "source": "non_reasoning"})
    return rows


SAMPLES_FOLDER = "rejection_sampling_batches"  # in the workdir: `SampleStore`'s files


class SampleStore:
    """The graded samples of each batch of prompts: one JSONL file per batch in `folder`
    (`prompts_<first>-<end>.jsonl`), written (atomically, by process 0) once the batch is graded,
    so that a stopped run loses at most the batches in flight.

    `folder/run.json` holds `record`, what fixes the samples (model, data, seed, sampling, the
    sandbox of code rows); a rerun with the same record skips the batches written, one with
    another record is refused while a stopped run's batches are there (they may be hours of
    sampling), and starts afresh once that run finished. The batches of the first `n` prompts
    are `batches`: the saved ones, and batches of at most `size` prompts between them (a rerun
    may change `batch_prompts`: each row's samples come from its own key). Every process must
    create it (process 0 reads the folder, which need not be shared, and tells the others).
    """

    def __init__(self, folder: str, record: dict[str, Any], n: int, size: int):
        from jax.experimental import multihost_utils

        self.folder = folder
        self._record = json.loads(json.dumps(record))  # (as it reads back: tuples are lists)
        self._files: dict[int, str] = {}  # first id -> file, of the saved batches (process 0)
        # [failed, then per prompt id: 0, or the first of a batch (1) or of a saved batch (2)]
        plan = np.zeros(n + 1, np.int32)
        error = None
        if jax.process_index() == 0:
            try:
                plan[1:] = self._plan(n, size)
            except Exception as e:  # (refused, or unreadable: the others must not wait)
                plan[0], error = 1, e
        if jax.process_count() > 1:
            plan = np.asarray(multihost_utils.broadcast_one_to_all(plan))
        if error is not None:
            raise error
        if plan[0]:
            raise common.ConfigError(f"process 0 could not resume from {folder} (see its output)")
        starts = [int(i) for i in np.flatnonzero(plan[1:])]
        self.batches = [list(range(a, b)) for a, b in zip(starts, [*starts[1:], n], strict=True)]
        self.written = plan[1:][starts] == 2
        self._saved = {b[0] for b, w in zip(self.batches, self.written, strict=True) if w}

    @staticmethod
    def name(ids: Sequence[int]) -> str:
        return f"prompts_{ids[0]:09d}-{ids[-1] + 1:09d}.jsonl"

    def _path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def _plan(self, n: int, size: int) -> np.ndarray:
        """Process 0: check `run.json` against this run's record (or start the folder); returns
        per prompt id 1 where a batch to sample starts, 2 where a saved one does, else 0."""
        folder = epath.Path(self.folder)
        names = {f.name for f in folder.iterdir()} if folder.exists() else set()  # (one listing)
        saved = {}
        if "run.json" in names:
            saved = self._read_manifest()
            if saved.get("run") != self._record:
                old, now = saved.get("run") or {}, self._record
                diffs = "; ".join(common.changes(old, now, sorted(old.keys() | now.keys())))
                batches = sorted(x for x in names if x.startswith("prompts_"))
                if batches and not saved.get("finished"):
                    raise common.ResumeRefused(
                        f"{self.folder} holds {len(batches)} batches of a rejection sampling run "
                        f"that stopped part way with other settings ({diffs}): rerun with those "
                        "to resume it, or delete that folder (or use another --workdir) to sample "
                        "afresh with these"
                    )
                log.info("rejection sampling: new settings (%s); sampling afresh", diffs)
                for name in batches:
                    (folder / name).unlink()
                names, saved = names - set(batches), {}
        # first id -> end, of the saved batches that start inside the first n prompts (the
        # longest of those starting at one id: a run with fewer prompts may have sampled a head
        # of one again; one ending past n is read up to n)
        ranges: dict[int, int] = {}
        for name in sorted(names):
            match = re.fullmatch(r"prompts_(\d+)-(\d+)\.jsonl", name)
            if match and int(match[1]) < min(n, int(match[2])):
                first, end = int(match[1]), int(match[2])
                if end > ranges.get(first, 0):
                    ranges[first], self._files[first] = end, name
        plan, start = np.zeros(n, np.int32), 0
        while start < n:
            if ranges.get(start):
                plan[start], start = 2, min(n, ranges[start])
                continue
            later = [a for a in ranges if a > start]
            plan[start], start = 1, min(n, start + size, *later)
        if not (saved.get("finished") and (plan != 1).all()):  # (a filter-only rerun stays so)
            paths.write_text(self._path("run.json"), self._manifest(finished=False))
        done = int((plan == 2).sum())
        if done:
            log.info(
                "rejection sampling: resuming, %d of %d batches already sampled and graded (%s)",
                done,
                int((plan > 0).sum()),
                self.folder,
            )
        return plan

    def _read_manifest(self) -> dict[str, Any]:
        path = self._path("run.json")
        try:
            saved = json.loads(paths.read_text(path))
            if not isinstance(saved, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            raise common.ConfigError(
                f"{path} is damaged ({e}); delete {self.folder} to sample afresh"
            ) from None
        return saved

    def _manifest(self, finished: bool) -> str:
        return json.dumps({"run": self._record, "finished": finished})

    def done(self, ids: Sequence[int]) -> bool:
        return ids[0] in self._saved

    def write(self, ids: Sequence[int], samples: Sequence[dict[str, Any]]) -> None:
        """Save one graded batch (process 0)."""
        if jax.process_index() == 0:
            text = "".join(json.dumps(s) + "\n" for s in samples)
            paths.write_text(self._path(self.name(ids)), text)

    def samples(self) -> Iterator[dict[str, Any]]:
        """Every batch's samples, in prompt order (process 0)."""
        for ids in self.batches:
            path = self._path(self._files.get(ids[0]) or self.name(ids))
            for i, line in enumerate(paths.read_text(path).splitlines()):
                try:
                    sample = json.loads(line)
                    if sample["row"] <= ids[-1]:  # (a saved batch read up to this run's n)
                        yield sample
                except (json.JSONDecodeError, TypeError, KeyError) as e:
                    raise common.ConfigError(
                        f"{path}:{i + 1} is not a sample ({e!r}); delete that file to sample its "
                        "batch again"
                    ) from None

    def finish(self) -> None:
        """Mark the run finished (process 0; once its outputs are written): a rerun with other
        settings then replaces these samples instead of being refused."""
        if jax.process_index() == 0:
            paths.write_text(self._path("run.json"), self._manifest(finished=True))


def _sample_record(config, prompts: common.PromptSet) -> dict[str, Any]:
    """What fixes each batch's samples and grades: the prompts as tokenised with their answer
    columns, the model, the seed, the sampling, and the sandbox code rows run in. Not the
    filters, nor `num_prompts` (more prompts add batches), nor the batch and bucket shapes
    (each row's samples come from its own key)."""
    r = config.rejection_sampling
    code = any(
        eval_stage.grading_kind(row.get("task"), row.get("tests")) == "code" for row in prompts.rows
    )
    sandbox = config.sandbox.to_dict() if code and "sandbox" in config else {}
    return {
        "seed": config.seed,
        "model.path": common.model_fingerprint(config.model.path),
        "data": prompts.fingerprint(),
        "data.stop_strings": list(config.data.stop_strings),
        # (only when the model folder declares eos ids of its own: records from before sampling
        # stopped there compare equal where it changed nothing)
        **({"stop_token_ids": list(prompts.stop_token_ids)} if prompts.declared_stop_ids else {}),
        **{k: r[k] for k in ("num_samples", "max_new_tokens", "temperature", "top_p")},
        # (float_tolerance only when set: records saved before it existed compare equal)
        **{
            f"sandbox.{k}": v
            for k, v in sorted(sandbox.items())
            if k != "allow_unsandboxed" and not (k == "float_tolerance" and not v)
        },
    }


def run(config, workdir: str) -> dict[str, Any]:
    r = config.rejection_sampling
    non_reasoning = _non_reasoning_rows(r)
    tokenizer = common.load_tokenizer(config)  # the prompts are checked before the model loads
    prompts = common.PromptSet(
        common.load_prompt_rows(config.data, "train", config.seed),
        tokenizer,
        config.data,
        seed=config.seed,
        split="training",
    )
    rows = prompts.rows  # (those that fit data.prompt_buckets: sample ids index these)
    common.check_token_ids(
        common.vocab_size(config.model.path), tokenizer, prompts.top_id(), "the prompts"
    )
    grader = eval_stage.Grader(prompts, config)  # (refuses code it cannot run, before the load)
    n = min(r.num_prompts, len(prompts))
    folder = os.path.join(workdir, SAMPLES_FOLDER)
    store = SampleStore(folder, _sample_record(config, prompts), n, r.batch_prompts)
    mesh = common.make_mesh(config)
    model = None  # (not loaded when every batch was sampled before: a rerun to filter again)
    if not store.written.all():
        model, _ = common.load_model(config, mesh, rules=sharding.SAMPLING_RULES)
    log.info(
        "rejection sampling: %d prompts x %d samples from %s", n, r.num_samples, config.model.path
    )

    # 1. Sample and grade, saving each batch as it is graded.
    batches = common.prompt_batches(
        store.batches, desc="rejection sampling", progress=config.log.progress, stoppable=True
    )
    with grader as grade:
        graded_batches = eval_stage.sample_and_grade(
            grade,
            model,
            tokenizer,
            prompts,
            (ids for ids in batches if not store.done(ids)),
            batch=min(r.batch_prompts, n),
            num_samples=r.num_samples,
            max_new_tokens=r.max_new_tokens,
            temperature=r.temperature,
            top_p=r.top_p,
            seed=config.seed,
            mesh=mesh,
        )
        for b in graded_batches:
            store.write(b.ids, _graded_samples(b, prompts, r.num_samples))
    summary = error = None
    if jax.process_index() == 0:  # (the others wait for its counts: they must hear of an error)
        try:
            summary = _filter_and_write(config, workdir, store, rows, non_reasoning, n)
        except Exception as e:
            error = e
    summary = _share_summary(summary, error, config, n)
    store.finish()
    summary["path"] = os.path.join(workdir, "rejection_sampled.jsonl")
    return summary


def _graded_samples(b, prompts: common.PromptSet, num_samples: int) -> list[dict[str, Any]]:
    """A graded batch (`eval.GradedBatch`) as the samples `filter_samples` reads (JSON-able)."""
    well_formed = rewards.format_reward(b.texts)
    # Each row's target language: its own when the data names one, else data.language (as the
    # RL reward reads it).
    language = rewards.language_consistency_reward(b.texts, language=b.columns["language"])
    samples = []
    for j, text in enumerate(b.texts):
        i = b.ids[j // num_samples]
        samples.append(
            {
                "row": i,
                "prompt": prompts.prompts[i],
                "completion": text,
                "empty": not text[len(prompts.prefixes[i]) :].strip(),
                "correct": bool(b.correct[j] == 1.0),
                "unscored": bool(np.isnan(b.correct[j])),
                "format": float(well_formed[j]),
                # None: no words in the reasoning (e.g. only arithmetic), so none mixed.
                "language": float(language[j]) if word_scripts(think_region(text)) else None,
                "truncated": bool(b.out.stop_reason[j] == sampling.LENGTH),
                "states_held_out": prompts.rows[i].get("task") in tasks.TASKS
                and states_held_out(text),
            }
        )
    return samples


def _filter_and_write(config, workdir, store, rows, non_reasoning, n) -> dict[str, Any]:
    """Process 0: steps 2-5 over every batch's saved samples; returns the summary."""
    r = config.rejection_sampling
    # 2-3. Filter, de-duplicate, cap.
    kept, dropped = filter_samples(
        store.samples(),
        require_correct=r.require_correct,
        require_format=r.require_format,
        drop_truncated=r.get("drop_truncated", True),
        min_language_consistency=r.min_language_consistency,
        max_paragraph_chars=r.max_paragraph_chars,
        drop_code_blocks=r.drop_code_blocks,
        max_per_prompt=r.max_per_prompt,
    )
    out_rows = [_sft_row(rows[s["row"]], s["completion"]) for s in kept]
    samples = len(kept) + sum(dropped.values())  # (each sample kept or dropped once)

    # 4. Non-reasoning data (read before sampling, so a bad file costs no sampling).
    want = int(round(len(out_rows) * r.non_reasoning_ratio)) if r.non_reasoning_ratio else None
    mixed = len(non_reasoning[:want])
    out_rows += non_reasoning[:want]

    # 5. Write the dataset and the summary.
    summary = _summary(
        config,
        n,
        samples=samples,
        kept=len(kept),
        non_reasoning=mixed,
        rows_written=len(out_rows),
        prompts_with_a_kept_sample=len({s["row"] for s in kept}),
        dropped=[dropped.get(reason, 0) for reason in DROP_REASONS],
    )
    path = os.path.join(workdir, "rejection_sampled.jsonl")
    if not kept:
        log.warning(
            "rejection sampling kept no sample of %d (dropped: %s): an SFT on %s has no "
            "reasoning data; check the checkpoint (model.path) and the filters",
            samples,
            ", ".join(f"{k} {v}" for k, v in dropped.items()),
            path,
        )
    paths.write_text(path, "".join(json.dumps(x) + "\n" for x in out_rows))  # atomic
    print(
        f"kept {len(kept)} of {samples} samples ({summary['keep_rate']:.1%}) from "
        f"{summary['prompts_with_a_kept_sample']} of {n} prompts; dropped: "
        + ", ".join(f"{k} {v}" for k, v in summary["dropped"].items())
        + f"; + {mixed} non-reasoning rows -> {path}"
    )
    common.write_json(os.path.join(workdir, "rejection_sampling_summary.json"), summary)
    return summary


_COUNTS = ("samples", "kept", "non_reasoning", "rows_written", "prompts_with_a_kept_sample")


def _summary(config, n: int, *, dropped: Sequence[int], **counts: int) -> dict[str, Any]:
    """The run's summary from its counts (`_COUNTS`) and drops (in `DROP_REASONS` order)."""
    return {
        "model": config.model.path,
        "prompts": n,
        **{k: int(counts[k]) for k in _COUNTS},
        "dropped": {reason: int(c) for reason, c in zip(DROP_REASONS, dropped, strict=True)},
        "keep_rate": counts["kept"] / max(1, counts["samples"]),
    }


def _share_summary(summary: dict[str, Any] | None, error, config, n: int) -> dict[str, Any]:
    """Process 0's summary (or `error`) on every process (only it reads the samples)."""
    from jax.experimental import multihost_utils

    if jax.process_count() > 1:
        counts = np.zeros(1 + len(_COUNTS) + len(DROP_REASONS), np.int32)  # [failed, counts...]
        if summary is not None:
            counts[1:] = [*(summary[k] for k in _COUNTS), *summary["dropped"].values()]
        counts[0] = error is not None
        counts = np.asarray(multihost_utils.broadcast_one_to_all(counts)).tolist()
        if counts[0] and error is None:
            raise common.ConfigError(
                "process 0 could not filter the saved samples (see its output)"
            )
        ours, dropped = counts[1 : 1 + len(_COUNTS)], counts[1 + len(_COUNTS) :]
        summary = summary or _summary(
            config, n, dropped=dropped, **dict(zip(_COUNTS, ours, strict=True))
        )
    if error is not None:
        raise error
    return summary
