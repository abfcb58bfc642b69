"""Stage: the whole DeepSeek-R1 recipe at toy scale, each stage's output feeding the next.

  0. pretrain a base model (and a smaller student base) from scratch on the synthetic corpus;
  1. R1-Zero: GRPO straight from the base model, accuracy + format rewards;
  2. R1: cold-start SFT -> reasoning RL (+ language consistency) -> rejection sampling from that
     checkpoint -> SFT of the *base* model on the kept samples -> final RL;
  3. distillation: the student fine-tuned on R1's kept samples, against the same student trained
     with GRPO directly for the same compute (model FLOPs, `match_compute`);
  4. every checkpoint evaluated on the same held-out prompts (pass@1 over k samples, cons@k,
     length).

Each sub-stage runs in `workdir/<name>/` with the config in `config.<name>` (override any field,
e.g. `--config.r1_zero.rl.steps=50`). A rerun skips the sub-stages that finished and resumes the one
that did not. The results table (`results.md`, `results.json`) and plots are written to the workdir.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import os
import time
from typing import Any

import jax
import ml_collections

from r1jax import sampling
from r1jax.stages import common

log = logging.getLogger("r1jax")

# (name, stage, where its input model comes from) in the order they run.
PLAN = (
    ("base", "pretrain", None),
    ("student_base", "pretrain", None),
    ("r1_zero", "rl", "base"),
    ("cold_start", "sft", "base"),
    ("reasoning_rl", "rl", "cold_start"),
    ("rejection_sampling", "rejection_sampling", "reasoning_rl"),
    ("r1_sft", "sft", "base"),  # the base model again, on the kept samples
    ("r1", "rl", "r1_sft"),
    ("distill", "distill", "student_base"),
    ("student_rl", "rl", "student_base"),
)
# Sub-stages that train on a file another one wrote: (its config field, the writer).
DATA_FROM = {
    "r1_sft": ("sft.source", "rejection_sampling"),
    "distill": ("distill.source", "rejection_sampling"),
}
KEPT_SAMPLES = "rejection_sampled.jsonl"  # what `--stage=rejection_sampling` writes in its workdir
RL_RUNS = ("r1_zero", "reasoning_rl", "r1", "student_rl")
WELL_FORMED = 0.9  # share of well-formed held-out samples that counts as "writes the format"
# Accuracy findings (a, b): a's pass@1 against b's, paired over the held-out prompts.
COMPARED = (("r1_zero", "base"), ("r1", "r1_zero"), ("distill", "student_rl"))
NOISE_SE = 2.0  # a difference within this many standard errors is reported as within noise
TREND_KEYS = ("reward", "accuracy", "format", "length")  # training-batch means logged each step
EVALUATED = (
    "base",
    "r1_zero",
    "cold_start",
    "reasoning_rl",
    "r1_sft",
    "r1",
    "student_base",
    "distill",
    "student_rl",
)


# The pipeline-level sections every stage also has; a value set at the top level applies to all.
# (On the command line always (`apply_shared_flags`). From a config file or a caller's config a
# value equal to `common.base_config`'s cannot be told from one left unset, so it leaves each
# stage's own: `ckpt.every = 50` there keeps r1_zero's 25; set `r1_zero.ckpt.every` too.)
SHARED_SECTIONS = ("mesh", "model", "ckpt", "log", "sandbox", "reward_pool")


def shared_overrides(config) -> dict[str, dict[str, Any]]:
    """{section: {field: value}} of the pipeline's shared sections that differ from the defaults
    (`common.base_config`), i.e. what the user set for the whole pipeline. Not `model.path`: the
    pipeline chains each stage's input model itself."""
    base = common.base_config()
    out = {}
    for section in SHARED_SECTIONS:
        changed = {
            k: v
            for k, v in config[section].items()
            if v != base[section].get(k) and (section, k) != ("model", "path")
        }
        if section == "mesh" and changed:  # (one layout: `apply_shared_flags`)
            changed = dict(config.mesh)
        if changed:
            out[section] = changed
    return out


def apply_shared_flags(config, given) -> None:
    """Apply the shared-section fields the command line set for the whole pipeline (`given`:
    "log.every", ...) to every stage's section, also when equal to the default (as
    `shared_overrides` alone, which compares with it, would not: `--config.mesh.fsdp=-1` left the
    sections' own values). A stage's own flag for such a field as well is refused: which of
    the two would win was not said (the top-level one did)."""
    given = list(given)
    top = {k for k in given if k.count(".") == 1 and k.split(".")[0] in SHARED_SECTIONS}
    top.discard("model.path")  # (refused by `validate`: the pipeline wires every model)
    for key in given:
        name, _, rest = key.partition(".")
        if rest in top and name not in SHARED_SECTIONS:
            raise common.ConfigError(
                f"--config.{rest} sets every stage's {rest} and --config.{key} the {name} "
                f"stage's: give one of them (the stage's own alone, or the top-level one alone)"
            )
    for key in sorted(top):
        section, field = key.split(".")
        # (the mesh is one setting: eval and rejection sampling lay theirs out over data, and
        # one axis of the top-level layout beside theirs would ask two axes for every device)
        fields = config.mesh.keys() if section == "mesh" else [field]
        for name, sub in config.items():
            if name not in SHARED_SECTIONS and hasattr(sub, "keys") and section in sub:
                for f in fields:
                    sub[section][f] = config[section][f]


def validate(config) -> None:
    """Every section checked as its stage will check it, before the first stage starts (a bad
    field in the last section would otherwise end the run after half an hour of the others)."""
    if config.model.path:
        raise common.ConfigError(
            f"model.path={config.model.path!r}: the pipeline pretrains its own base models and "
            f"wires each stage's model from the one before; set the bases with "
            f"--config.base.pretrain.* (or run the stages one by one from a real model)"
        )
    for name, stage, _ in PLAN:
        if name not in config:
            raise common.ConfigError(f"pipeline config lacks the section {name!r} ({stage})")
        seed = config[name].get("seed", 0)
        if seed not in (0, config.seed):  # run() gives every stage the pipeline's seed
            raise common.ConfigError(
                f"{name}.seed={seed}: the pipeline runs every stage with its own seed; set "
                f"--config.seed instead"
            )
        # A field the pipeline sets from an earlier stage: a flag for it would be ignored.
        default = common.default_config(stage)
        for field, (writer, _) in _wiring("", name).items():
            section, _, key = field.partition(".")
            if config[name][section][key] != default[section][key]:
                raise common.ConfigError(
                    f"{name}.{field}={config[name][section][key]!r}: the pipeline sets it to "
                    f"what {writer} made; run --stage={stage} alone to train on another"
                )
        if (
            name == "student_rl"
            and config.get("match_distill_compute", False)
            and config[name].rl.steps != default.rl.steps
        ):
            raise common.ConfigError(
                f"student_rl.rl.steps={config[name].rl.steps}: with match_distill_compute the "
                "pipeline sets it to the GRPO steps whose FLOPs match the distillation's; add "
                "--config.match_distill_compute=False to choose it"
            )
        # As run() will give it, except the model and data paths earlier stages write.
        try:
            common.validate(_stage_config(config, name), stage)
            _check_task_rows(config[name], config.seed)
        except common.ConfigError as e:
            raise common.ConfigError(f"{name} (--stage={stage}): {e}") from None
    default = common.default_config("eval")
    if config.eval_stage.data.to_dict() != default.data.to_dict():
        raise common.ConfigError(
            "eval_stage.data: every evaluation reads eval_data (the pipeline's held-out prompts); "
            "set --config.eval_data.* instead"
        )
    if config.eval_stage.model.path != default.model.path:
        raise common.ConfigError(
            f"eval_stage.model.path={config.eval_stage.model.path!r}: the pipeline evaluates each "
            "stage's own model; run --stage=eval alone for another"
        )
    if config.eval_data.num_eval > config.eval_stage.eval.num_prompts:
        raise common.ConfigError(
            f"eval_data.num_eval={config.eval_data.num_eval} holds out more problems than "
            f"eval_stage.eval.num_prompts={config.eval_stage.eval.num_prompts} evaluates; set "
            f"--config.eval_stage.eval.num_prompts={config.eval_data.num_eval} too, or hold "
            f"out fewer with --config.eval_data.num_eval={config.eval_stage.eval.num_prompts}"
        )
    if config.eval_stage.get("seed", 0) not in (0, config.seed):
        raise common.ConfigError(
            f"eval_stage.seed={config.eval_stage.seed}: the pipeline evaluates with its own seed; "
            "set --config.seed instead"
        )
    try:
        common.validate(_eval_config(config, common.TOY_BASE), "eval")
        _check_task_rows(config, config.seed, section="eval_data", splits=("eval",))
    except common.ConfigError as e:
        raise common.ConfigError(f"eval_stage / eval_data (--stage=eval): {e}") from None


def _check_task_rows(sub, seed: int, section: str = "data", splits=("train", "eval")) -> None:
    """A built-in task's problems for `sub[section]`: enough distinct ones, found now rather than
    when its stage reads them, after the stages before it have trained."""
    from r1jax.data import tasks

    data = sub.get(section)
    if data is not None and data.get("source") in tasks.TASKS:
        for split in splits:
            try:
                _task_rows_found(data.to_json_best_effort(sort_keys=True), split, seed)
            except common.ConfigError as e:
                raise common.ConfigError(f"{section}.{str(e).removeprefix('data.')}") from None


@functools.lru_cache(maxsize=64)
def _task_rows_found(data_json: str, split: str, seed: int) -> None:
    """(`_check_task_rows`, once per data section's settings: most stages share one task)"""
    common._prompt_rows(ml_collections.ConfigDict(json.loads(data_json)), split, seed)


def _eval_config(config, model_path: str):
    """The eval stage's config for one checkpoint: `eval_stage` on the `eval_data` prompts."""
    sub = config.eval_stage.copy_and_resolve_references()
    with sub.unlocked():
        sub.seed = config.seed
        sub.model.path = model_path
        sub.data = config.eval_data
        for section, fields in shared_overrides(config).items():
            sub[section].update(fields)  # e.g. --config.sandbox.allow_unsandboxed
    return sub


def _stage_config(config, name: str):
    """A copy of section `name` with the pipeline's seed and shared settings applied."""
    sub = copy.deepcopy(config[name])
    with sub.unlocked():
        sub.seed = config.seed
        for section, fields in shared_overrides(config).items():
            sub[section].update(fields)  # e.g. --config.mesh.fsdp, --config.model.dtype
    return sub


def run(config, workdir: str) -> dict[str, Any]:
    # (local only: launch refuses a cloud workdir) Absolute, so that what the stages record of
    # each other's outputs does not depend on the directory the pipeline was started from.
    workdir = os.path.abspath(workdir)
    results: dict[str, Any] = {"seed": config.seed, "stages": {}, "eval": {}}
    model_of: dict[str, str] = {}
    started = time.time()
    matched = bool(config.get("match_distill_compute", False))  # student_rl's steps: distill's
    for name, stage, _ in PLAN:
        sub = _stage_config(config, name)
        subdir = os.path.join(workdir, name)
        # the fields this loop sets from earlier sub-stages' outputs
        wired = {field: path for field, (_, path) in _wiring(workdir, name).items()}
        with sub.unlocked():
            for key, value in wired.items():
                section, field = key.split(".")
                sub[section][field] = value
            if name == "student_rl" and matched:
                results["compute"] = _matched_compute(
                    config, sub, workdir, results["stages"], tuple(wired)
                )
                sub.rl.steps = results["compute"]["student_rl_steps"]
        # Models named by path inside this workdir (a logit-distillation teacher, a reference
        # or reward model): compared by content too, as the wired ones.
        watched = tuple(
            k
            for k in _NAMED_MODELS
            if (value := sub.get(k.split(".")[0], {}).get(k.split(".")[1]))
            and os.path.abspath(os.path.expanduser(value)).startswith(workdir + os.sep)
        )
        results["stages"][name] = _run_once(
            stage, sub, subdir, name, tuple(wired), watched=watched, matched=matched
        )
        if stage == "pretrain" and config.get("require_tag_copy", True):
            _check_copies_tags(name, results["stages"][name], subdir)
        model_of[name] = _output(workdir, name)
        log.info("pipeline: %s done (%.1f min so far)", name, (time.time() - started) / 60)

    # Every checkpoint on the same held-out prompts.
    for name in EVALUATED:
        results["eval"][name] = _evaluate(
            config, model_of[name], os.path.join(workdir, "eval", name)
        )
    results["trends"] = {
        name: _trend(os.path.join(workdir, name, "metrics.jsonl")) for name in RL_RUNS
    }
    results["paired"] = {
        f"{a} - {b}": paired_difference(
            *(os.path.join(workdir, "eval", n, "eval_samples.jsonl") for n in (a, b))
        )
        for a, b in COMPARED
    }
    # Minutes of the work itself, as first run (a rerun that resumes or only rewrites the report
    # adds its own wall time to nothing), and of this invocation.
    timed = [r.get("minutes") for r in (*results["stages"].values(), *results["eval"].values())]
    results["minutes"] = sum(m for m in timed if m is not None)
    results["untimed"] = timed.count(None)  # e.g. an evaluation killed before its time was saved
    results["wall_minutes"] = (time.time() - started) / 60
    if jax.process_index() == 0:
        common.write_json(os.path.join(workdir, "results.json"), results)
        report = results_markdown(results, config)
        with open(os.path.join(workdir, "results.md"), "w") as f:
            f.write(report)
        _plots(workdir, results)
        print(report)
    return results


def _check_copies_tags(name: str, out: dict[str, Any], subdir: str) -> None:
    """Stop before the RL stages when a base does not copy tag names from an instruction.

    Every R1-Zero run starts from the template's instruction alone; such a base never writes
    <think>/<answer>, so its RL gets no reward and every later stage stays near zero (seed 2 before
    this check: 34 minutes for pass@1 0.00-0.05 everywhere).
    """
    from r1jax.stages import pretrain

    copied = out.get("tag_copy")
    if copied is not None and not copied >= pretrain.TAG_COPY_WARNING:  # (NaN: not measured)
        raise common.ConfigError(
            f"the {name} model gives a tag name named earlier in a document probability "
            f"{copied:.2f} (< {pretrain.TAG_COPY_WARNING}; bases that follow the R1-Zero template: "
            f"~0.7), so it will not write the template's <think>/<answer> and RL from it gets no "
            f"reward ({out.get('restarts', 0):.0f} restarts from a new initialisation, "
            f"pretrain.tag_copy_restarts). Pretrain with another --config.seed or more restarts "
            f"(in a new --workdir), or go on anyway "
            f"with --config.require_tag_copy=False (the model is kept in {subdir})."
        )


def _inputs(sub, wired: tuple[str, ...]) -> dict[str, str]:
    """Fingerprints of the `wired` inputs of a sub-stage (the model and data files earlier
    sub-stages wrote), by content: a finished stage whose inputs were made again since is not
    skipped as done, and a workdir moved elsewhere still is."""
    out = {}
    for key in wired:
        section, field = key.split(".")
        fingerprint = _fingerprint(key, os.path.expanduser(sub[section][field]))
        if fingerprint is not None:
            out[key] = fingerprint
    return out


def _fingerprint(key: str, path: str) -> str | None:
    """A wired input `key`'s content at `path` (a model folder or a data file; None: not there)."""
    if key in ("model.path", *_NAMED_MODELS) and os.path.isdir(path):
        return common.model_fingerprint(path)
    return common.file_fingerprint(path) if os.path.isfile(path) else None


def _output(workdir: str, name: str) -> str:
    """What sub-stage `name` leaves for the next ones: its kept samples or its final model."""
    return os.path.join(workdir, name, KEPT_SAMPLES if name == "rejection_sampling" else "hf/final")


def _wiring(workdir: str, name: str) -> dict[str, tuple[str, str]]:
    """The fields of sub-stage `name` the pipeline sets from earlier ones: {field: (the sub-stage
    that writes it, its output)}."""
    writers = {"model.path": _source(name)}
    if name in DATA_FROM:
        field, writer = DATA_FROM[name]
        writers[field] = writer
    return {k: (w, _output(workdir, w)) for k, w in writers.items() if w is not None}


# Model fields a user may point at a sub-stage's output (distill.teacher=<workdir>/r1/hf/final).
_NAMED_MODELS = ("distill.teacher", "rl.ref_model", "reward_model.path")


def _dependents(name: str, matched: bool = False) -> list[str]:
    """The sub-stages trained, directly or through others, on `name`'s output (model or data);
    `matched`: with match_distill_compute, whose step count student_rl takes from distill's."""
    out = []
    for other, _, source in PLAN:
        inputs = {source, DATA_FROM[other][1] if other in DATA_FROM else None}
        if matched and other == "student_rl":
            inputs.add("distill")
        if inputs & {name, *out}:
            out.append(other)
    return out


def _stale(workdir: str, refused: str, matched: bool = False) -> list[str]:
    """The sub-stage folders to delete once `refused` found its inputs made again: every one
    trained on an output that is not there any more (its done.json's inputs against the outputs
    now), every one started on such a stage's output, and every unfinished one `refused`'s own
    inputs feed (it may have trained on the old ones). Not one trained on the new outputs, and
    all at once: a refusal per stage came after another full stage."""
    feeds = {writer for writer, _ in _wiring(workdir, refused).values()}
    stale: list[str] = []
    for name, _, _ in PLAN:
        folder = os.path.join(workdir, name)
        if not os.path.isdir(folder):
            continue
        wiring = _wiring(workdir, name)
        done = os.path.join(folder, "done.json")
        if any(writer in stale for writer, _ in wiring.values()):
            stale.append(name)
        elif os.path.exists(done):
            recorded = common.read_json(done).get("inputs", {})
            if any(recorded.get(k) != _fingerprint(k, path) for k, (_, path) in wiring.items()):
                stale.append(name)
        elif any(name in _dependents(f, matched) for f in feeds):  # (unfinished, downstream)
            stale.append(name)
        if matched and name == "student_rl" and "distill" in stale and name not in stale:
            stale.append(name)  # (its step count matched to the distillation's)
    return stale


def _source(name: str) -> str | None:
    """The sub-stage whose model sub-stage `name` starts from (PLAN)."""
    return next(source for n, _, source in PLAN if n == name)


def _to_delete(subdir: str, keep_samples: bool = False, matched: bool = False) -> str:
    """The folders to delete to train sub-stage `subdir` again: its own and its dependents'.
    `keep_samples`: rejection sampling with other filters only, which filters its saved samples
    again: its done.json instead of its folder."""
    name, workdir = os.path.basename(subdir), os.path.dirname(subdir)
    own = os.path.join(subdir, "done.json") if keep_samples else subdir
    return " ".join([own, *(os.path.join(workdir, n) for n in _dependents(name, matched))])


def _run_once(
    stage: str,
    sub,
    subdir: str,
    name: str,
    wired: tuple[str, ...] = (),
    *,
    watched: tuple[str, ...] = (),
    matched: bool = False,
) -> dict[str, Any]:
    """Run a sub-stage unless its output already exists (a rerun resumes the pipeline).
    `wired`: the fields `run` set from earlier sub-stages' outputs; `watched`: model fields the
    user pointed at them (`_NAMED_MODELS`); `matched`: match_distill_compute (`_dependents`)."""
    from r1jax.checkpoint import CheckpointError
    from r1jax.models.hf import CheckpointError as ModelFolderError
    from r1jax.train import Diverged

    done = os.path.join(subdir, "done.json")
    inputs = _inputs(sub, wired + watched)
    # Minutes of earlier attempts that stopped part way (the stage resumed from their checkpoint).
    attempts = os.path.join(subdir, "minutes_before.json")
    before = common.read_json(attempts)["minutes"] if os.path.exists(attempts) else 0.0
    output = _output(os.path.dirname(subdir), name)
    if os.path.exists(done):
        saved_config = os.path.join(subdir, f"config_{stage}.json")
        _check_same_settings(sub, saved_config, subdir, stage, wired, matched)
        finished = common.read_json(done)
        remade = [k for k, v in finished.get("inputs", {}).items() if inputs.get(k) != v]
        if remade:
            workdir = os.path.dirname(subdir)
            names = _stale(workdir, name, matched)
            if set(remade) - set(wired):  # (a watched model: this stage and what it feeds)
                names += [n for n in (name, *_dependents(name, matched)) if n not in names]
            stale = " ".join(os.path.join(workdir, n) for n in names)
            raise common.ConfigError(
                f"{name} is done, but what it was trained on ({', '.join(remade)}) was made "
                f"again or removed since; delete {stale} to train them on the new one, or give "
                f"the pipeline a new --workdir"
            )
        if os.path.exists(output):
            log.info("pipeline: %s already done, skipping (%s)", name, subdir)
            return finished
        # Its output deleted: made again from its checkpoints or its saved samples (the stages
        # trained on it then compare it by content, as after any rerun).
        log.warning("pipeline: %s is done, but its %s is gone: running it again", name, output)
        before = finished.get("minutes", 0.0)  # (its earlier attempts' minutes included)
        common.write_json(attempts, {"minutes": before})  # (process 0)
        common.sync_processes("pipeline minutes kept")  # (every process has read done.json)
        if common._is_process_zero():
            os.remove(done)
    started = time.time()
    try:
        common.validate(sub, stage)
        out = common.run_stage(stage, sub, subdir) or {}
    except BaseException as e:  # a user error, a bug, a kill (SIGTERM), Ctrl-C
        if os.path.isdir(subdir):  # the attempt's minutes, for the total once the stage finishes
            common.write_json(attempts, {"minutes": before + (time.time() - started) / 60})
        if isinstance(e, common.ConfigError | CheckpointError | ModelFolderError | Diverged):
            # Say which sub-stage: four of them are RL runs, with the same field names.
            e.args = (f"pipeline stage {name} (--stage={stage}, --config.{name}.*, {subdir}): {e}",)
        raise
    out = {k: v for k, v in out.items() if isinstance(v, int | float | str)}
    if stage == "rejection_sampling" and out.get("kept") == 0:
        # (not recorded as done: r1_sft and distill would fail on, or train on, no reasoning
        # data; a rerun with other filters filters the saved samples again, without the model)
        summary = os.path.join(subdir, "rejection_sampling_summary.json")
        dropped = common.read_json(summary).get("dropped", {}) if os.path.exists(summary) else {}
        common.write_json(attempts, {"minutes": before + (time.time() - started) / 60})
        raise common.ConfigError(
            f"pipeline stage {name}: kept none of its {out.get('samples')} samples (dropped: "
            + ", ".join(f"{k} {v}" for k, v in dropped.items() if v)
            + f"), so r1_sft and distill would have no reasoning data; check "
            f"{sub.model.path} (reasoning_rl's model) or loosen the filters "
            f"(--config.{name}.rejection_sampling.*): a rerun filters the saved samples again"
        )
    out["minutes"] = before + (time.time() - started) / 60  # kept across resumes, unlike the total
    out["inputs"] = inputs
    common.write_json(done, out)
    if os.path.exists(attempts) and common._is_process_zero():  # (counted in done.json now)
        os.remove(attempts)
    return out


def _check_same_settings(
    sub,
    saved_path: str,
    subdir: str,
    stage: str,
    wired: tuple[str, ...] = (),
    matched: bool = False,
) -> None:
    """Refuse to skip a finished stage that ran with other settings than `sub` now asks for: its
    results would stand for settings they were not made with. Fields the saved config lacks (an
    older r1jax) are not compared, nor those that cannot change what `stage` produced, nor the
    `wired` inputs (`_run_once` compares those by content)."""
    if not os.path.exists(saved_path):
        return
    with open(saved_path) as f:
        saved = _flat(json.load(f))
    now = _flat(json.loads(sub.to_json_best_effort()))
    changed = sorted(
        k
        for k in saved.keys() & now.keys()
        if not _result_neutral(k, stage) and k not in wired and not _same_value(saved[k], now[k])
    )
    if changed:
        name = os.path.basename(subdir)
        diffs = ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed[:5])
        workdir = os.path.dirname(subdir)
        keep = " ".join(
            f for f in (_keep_flag(name, k, saved[k], workdir) for k in changed[:5]) if f
        )
        delete = _to_delete(subdir, _only_filters(stage, changed), matched)
        raise common.ConfigError(
            f"{name} is done, but with other settings ({diffs}; a default of this r1jax may have "
            f"changed); "
            + (f"keep the ones it ran with ({keep}), " if keep else "")
            + f"delete {delete} to rerun it with "
            "the new ones, or give the "
            f"pipeline a new --workdir"
        )


# Rejection sampling's settings its saved samples do not depend on (`SampleStore`'s record): a
# rerun that changes only these filters the saved samples again (more prompts add batches).
_FILTERS = (
    "num_prompts",
    "batch_prompts",
    "require_correct",
    "require_format",
    "drop_truncated",
    "min_language_consistency",
    "max_paragraph_chars",
    "drop_code_blocks",
    "max_per_prompt",
    "non_reasoning_source",
    "non_reasoning_ratio",
)


def _only_filters(stage: str, changed: list[str]) -> bool:
    return stage == "rejection_sampling" and all(
        k in {f"rejection_sampling.{f}" for f in _FILTERS} for k in changed
    )


# Fields of a stage the pipeline sets itself from its other stages (no flag gives them back).
_WIRED = ("model.path", "sft.source", "distill.source", "rl.steps")


def _keep_flag(name: str, key: str, value: Any, workdir: str | None = None) -> str | None:
    """The flag that gives stage `name` its saved `value` of `key` back: the pipeline-level one
    for the seed and for a shared section's field every stage in `workdir` ran with (which the
    pipeline applies over every stage's), none for a field the pipeline wires from other stages
    or a value without a one-word spelling."""
    if key in _WIRED or not isinstance(value, int | float | str | bool) or " " in str(value):
        return None
    section, _, field = key.partition(".")
    # (a shared-section value equal to the default is not applied from the top level; one only
    # this stage ran with came from its own flag: the top-level one would change the others)
    shared = key == "seed" or (
        section in SHARED_SECTIONS
        and common.base_config()[section].get(field) != value
        and (workdir is None or _ran_everywhere_with(workdir, key, value))
    )
    return f"--config.{key if shared else f'{name}.{key}'}={value!r}"


def _ran_everywhere_with(workdir: str, key: str, value: Any) -> bool:
    """Whether every sub-stage in `workdir` that saved its config ran with `value` of `key`."""
    for name, stage, _ in PLAN:
        saved = os.path.join(workdir, name, f"config_{stage}.json")
        if os.path.exists(saved):
            with open(saved) as f:
                if not _same_value(_flat(json.load(f)).get(key, value), value):
                    return False
    return True


# Sections whose settings do not change what a stage produces (how often it logs and saves, how
# the devices are arranged, how many processes score): a resume may change them. The sandbox's
# limits can change what a stage that runs generated code gets out of it, but not whether it may
# run there at all.
_RESULT_NEUTRAL = ("log", "ckpt", "mesh", "reward_pool")
_RUNS_CODE = ("rl", "eval", "rejection_sampling")


def _result_neutral(key: str, stage: str) -> bool:
    section = key.split(".")[0]
    if section == "sandbox":
        return stage not in _RUNS_CODE or key == "sandbox.allow_unsandboxed"
    return section in _RESULT_NEUTRAL


def _same_value(a: Any, b: Any) -> bool:
    """Equal, counting two spellings of one file or folder (the pipeline wires its stages' model
    and data paths from --workdir, which a resume may give relative or absolute) as equal."""
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str) and a and b and os.path.exists(a):
        return os.path.exists(b) and os.path.samefile(a, b)
    return False


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else k))
    return out


def token_pass_flops(cfg, context: int) -> int:
    """Forward FLOPs of one token attending to `context` positions: 2 x the parameters it uses
    (a mixture of experts: the active ones) + 2 x layers x heads x (query-key + value head
    dims) x context (multi-head latent attention: its own q/k and v head sizes)."""
    params = getattr(cfg, "num_active_params", cfg.num_params)
    if hasattr(cfg, "v_head_dim"):  # DeepSeek MLA
        dims = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim
    else:
        dims = 2 * cfg.head_dim
    return 2 * params + 2 * cfg.num_layers * cfg.num_heads * dims * context


def match_compute(rl_config, distill_config, distill_steps: int):
    """The fewest GRPO steps of `rl_config` whose model FLOPs reach the distillation's.

    FLOPs as compiled, on padded shapes: a token pass costs 2 x params + 4 x layers x heads x
    head_dim x the positions it attends to (dense, padding included), a backward pass two
    forwards. A distillation step is 3 passes over batch_size rows of seq_len (plus the teacher's
    forward for logit distillation). A GRPO step prefills its P prompts (padded to the step's
    bucket, as the RL stage batches them), decodes P x G x (max_completion_length - 1) tokens,
    each over the prompt and the cache window it is written in (`sampling.decode_windows`; an
    upper bound: decoding stops early once every row has ended), then runs the reference
    forward, the old-policy forward when μ > 1 or with mini-batches, and 3 x μ update passes over
    the prompts (once each with `shared_prompt_forward`, else G times) and the completions.
    Returns {"student_rl_steps", "distill_flops", "student_rl_flops", "ratio"}.
    """
    from r1jax.models import hf

    def pass_flops(model_path: str):
        c = hf.config_from_hf(hf.read_config(model_path))
        return lambda context: token_pass_flops(c, context)

    d = distill_config.distill
    student = pass_flops(rl_config.model.path)
    rows = distill_steps * d.batch_size
    budget = 3 * rows * d.seq_len * student(d.seq_len)
    if d.teacher:
        budget += rows * d.seq_len * pass_flops(common.resolve_model_path(d.teacher))(d.seq_len)
    r = rl_config.rl
    P, G, Tc, mu = r.prompts_per_step, r.num_generations, r.max_completion_length, r.num_iterations
    # (the old-policy forward when a step can be off-policy; mini-batches split a pass's rows)
    off_policy = mu > 1 or r.get("num_mini_batches", 1) > 1
    passes = (1 if r.beta > 0 else 0) + (1 if off_policy else 0) + 3 * mu
    prompts = common.PromptSet(
        common.load_prompt_rows(rl_config.data, "train", rl_config.seed),
        hf.tokenizer(rl_config.model.path),
        rl_config.data,
        seed=rl_config.seed,
    )
    # Decode step s (1 <= s < Tc) writes per-row slot s - 1, in the first window that holds it.
    windows = sampling.decode_windows(Tc, r.decode_first_window)
    step_windows = [min(w for w in windows if w >= s) for s in range(1, Tc)]
    spent, done = 0, 0
    while spent < budget:
        Tp = prompts.batch(prompts.row_ids(done, P))[0].shape[1]
        prompt = P * Tp * student(Tp) * (1 if r.shared_prompt_forward else G)
        completions = P * G * student(Tp + Tc)
        decode = P * G * sum(student(Tp + w) for w in step_windows)
        spent += P * Tp * student(Tp) + decode + passes * (prompt + Tc * completions)
        done += 1
    log.info(
        "pipeline: student_rl: %d GRPO steps, %.2fx the distillation's FLOPs", done, spent / budget
    )
    return {
        "student_rl_steps": done,
        "distill_flops": budget,
        "student_rl_flops": spent,
        "ratio": spent / budget,
    }


def _matched_compute(
    config, sub, workdir: str, stages: dict[str, Any], wired: tuple[str, ...] = ()
) -> dict[str, Any]:
    """`match_compute` for student_rl against the distillation as it ran; a student_rl already
    done with another step count (matched to a distillation since made again) is refused: the
    report's comparison at equal compute would no longer be one. (Other settings of its own
    that changed, which change the count too, are named first, as `_run_once` names them.)"""
    distill_steps = _steps_run(os.path.join(workdir, "distill"), stages["distill"])
    matched = match_compute(sub, config.distill, distill_steps)
    subdir = os.path.join(workdir, "student_rl")
    if os.path.exists(os.path.join(subdir, "done.json")):
        ran = _steps_run(subdir)
        if ran != matched["student_rl_steps"]:
            saved = os.path.join(subdir, "config_rl.json")
            _check_same_settings(sub, saved, subdir, "rl", (*wired, "rl.steps"))
            raise common.ConfigError(
                f"student_rl is done with {ran} GRPO steps, but the distillation's {distill_steps} "
                f"steps now match {matched['student_rl_steps']} (it was made again since): "
                f"delete {subdir} to run it again at the same compute, or keep it with "
                f"--config.match_distill_compute=False --config.student_rl.rl.steps={ran}"
            )
    return matched


def _steps_run(subdir: str, done: dict[str, Any] | None = None) -> int:
    """Optimizer steps a finished sub-stage ran: its done.json's count, else its config's
    (RL), else its last metrics row (SFT from before the count was recorded)."""
    from r1jax import metrics

    if done and "steps" in done:
        return int(done["steps"])
    rl_config = os.path.join(subdir, "config_rl.json")
    if os.path.exists(rl_config):
        with open(rl_config) as f:
            return int(json.load(f)["rl"]["steps"])
    return max(int(r["step"]) for r in metrics.read_metrics(os.path.join(subdir, "metrics.jsonl")))


def _evaluate(config, model_path: str, subdir: str) -> dict[str, Any]:
    """The evaluation of `model_path` in `subdir`, reused when a rerun finds one of the same
    checkpoint under the same settings (`_eval_stamp`), else made (again)."""
    from r1jax.stages import eval as eval_stage

    done = os.path.join(subdir, "eval.json")
    sub = _eval_config(config, model_path)
    stamp, stamp_path = _eval_stamp(sub, model_path), os.path.join(subdir, "eval_stamp.json")
    if os.path.exists(done):
        if os.path.exists(stamp_path):
            with open(stamp_path) as f:
                reuse = json.load(f) == stamp
        else:  # (an evaluation from before the stamps: reused unless the model is newer)
            reuse = os.path.getmtime(done) >= max(stamp["model"].values(), default=0)
        if reuse:
            return common.read_json(done)
        log.info("pipeline: %s was evaluated as another checkpoint or settings: again", subdir)
    os.makedirs(subdir, exist_ok=True)
    if common._is_process_zero():  # (a kill mid-run must not leave the old results stamped)
        for old in (stamp_path, done):
            if os.path.exists(old):
                os.remove(old)
    # The stamp first: eval.json, written last, marks the evaluation finished (stamped after
    # it, a kill or a full disk between the two left an unstamped one, which the rule for
    # evaluations from before the stamps then reused under any settings).
    common.write_json(stamp_path, stamp)
    common.sync_processes(f"evaluation {subdir} cleared")
    # eval.json, with its minutes for a later rerun's report
    out = eval_stage.run(sub, subdir)
    # Process 0 alone wrote eval_samples.jsonl, which every process reads for the report
    # (paired_difference); eval_stage.run ends without a barrier (common.run_stage has one).
    common.sync_processes(f"evaluation {subdir} written")
    return out


def _eval_stamp(sub, model_path: str) -> dict[str, Any]:
    """What an evaluation stands for: its settings (but where the model is and what does not
    change a result) and its checkpoint's files, by modification time (a stage run again writes
    new ones)."""
    settings = {
        k: v
        for k, v in _flat(json.loads(sub.to_json_best_effort())).items()
        if k != "model.path" and not _result_neutral(k, "eval")
    }
    files = sorted(os.listdir(model_path)) if os.path.isdir(model_path) else []
    model = {f: os.path.getmtime(os.path.join(model_path, f)) for f in files}
    # 2: eval_samples.jsonl's "row" is the held-out row, before prompts left out (session 24);
    # the paired differences must not pair files of the two numberings. 3: no single-digit
    # held-out arithmetic, and cons@k's "no answer" vote (session 28): evaluated anew.
    return {"settings": settings, "model": model, "samples_format": 3}


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def paired_difference(samples_a: str, samples_b: str) -> dict[str, float]:
    """pass@1 of a minus b over the prompts both scored, with its standard error (the spread of
    the per-prompt differences: both checkpoints answer the same prompts, so prompt difficulty
    cancels). Reads the eval stage's `eval_samples.jsonl` files (one line per sample)."""
    import numpy as np

    def per_prompt(path: str) -> dict[int, float]:
        hits: dict[int, list[float]] = {}
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                hits.setdefault(row["row"], []).append(float(row["correct"]))
        return {k: sum(v) / len(v) for k, v in hits.items()}

    a, b = per_prompt(samples_a), per_prompt(samples_b)
    diff = np.array([a[k] - b[k] for k in sorted(a.keys() & b.keys())])
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan")
    return {"diff": float(diff.mean()), "se": se, "prompts": len(diff)}


def _trend(metrics_path: str) -> dict[str, list[float]]:
    """Each of TREND_KEYS as [mean over the first tenth of the run's steps, over the last tenth]."""
    from r1jax import metrics

    if not os.path.exists(metrics_path):
        return {}
    rows = [r for r in metrics.read_metrics(metrics_path) if "reward" in r]
    if not rows:
        return {}
    window = max(1, len(rows) // 10)

    def mean(part, key):
        values = [r[key] for r in part if key in r]
        return sum(values) / len(values) if values else float("nan")

    return {k: [mean(rows[:window], k), mean(rows[-window:], k)] for k in TREND_KEYS}


def findings(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The paper's findings as (finding, verdict, the numbers it rests on), judged on the held-out
    evaluation (pass@1, format) and the R1-Zero run's training-batch trend (length)."""
    e = results["eval"]
    nan2 = [float("nan")] * 2
    zero = results.get("trends", {}).get("r1_zero", {})
    length, batch_format = zero.get("length", nan2), zero.get("format", nan2)

    def format_se(name: str) -> float:  # binomial, over every held-out sample
        r = e[name]
        n = r.get("num_prompts", 0) * r.get("num_samples", 0)
        return math.sqrt(r["format"] * (1 - r["format"]) / n) if n else 0.0

    base_format, zero_format = e["base"]["format"], e["r1_zero"]["format"]
    rise = zero_format - base_format
    if zero_format >= WELL_FORMED and rise >= 0.3:
        format_verdict = "yes"
    elif zero_format >= WELL_FORMED and base_format >= WELL_FORMED:
        # The base follows the template already (it copies the tags from the prompt): there is
        # nothing left to learn at the evaluation's temperature, only to keep.
        format_verdict = "kept: the base already writes it"
    elif zero_format >= WELL_FORMED and rise > NOISE_SE * math.hypot(
        format_se("base"), format_se("r1_zero")
    ):
        format_verdict = f"partly: the base writes it in {base_format:.0%} of its samples"
    else:
        format_verdict = "NO"

    def yes(ok: bool) -> str:
        return "yes" if ok else "NO"

    paired = results.get("paired", {})

    def beats(a: str, b: str, ties: bool = False) -> tuple[str, str]:
        """Verdict on "a's pass@1 > b's" (>= with ties), qualified when the paired difference is
        within NOISE_SE standard errors; and the difference as measured."""
        diff = e[a]["pass@1"] - e[b]["pass@1"]
        p = paired.get(f"{a} - {b}")
        if not p:
            return yes(diff >= 0 if ties else diff > 0), ""
        return qualified(diff, p["se"], ties), (
            f" ({p['diff']:+.3f} +- {p['se']:.3f}, paired over {p['prompts']} prompts)"
        )

    def qualified(diff: float, se: float, ties: bool) -> str:
        verdict = yes(diff >= 0 if ties else diff > 0)
        return verdict + (" (within noise)" if abs(diff) < NOISE_SE * se else "")

    def metric(name: str, key: str = "pass@1") -> str:
        return f"{e[name][key]:.3f}"

    compute = results.get("compute")  # RL's model FLOPs matched to the distillation's
    flops = f" RL's FLOPs {compute['ratio']:.2f}x the distillation's;" if compute else ""

    def minutes(stage: str) -> str:  # the stage's wall time on first run (teacher's not counted)
        return f"{results['stages'].get(stage, {}).get('minutes', float('nan')):.1f}"

    zero_base, r1_zero, distill_rl = (
        beats("r1_zero", "base"),
        beats("r1", "r1_zero", ties=True),
        beats("distill", "student_rl"),
    )
    return [
        (
            "R1-Zero beats the base model",
            zero_base[0],
            f"pass@1 {metric('base')} -> {metric('r1_zero')}{zero_base[1]}",
        ),
        (
            "R1-Zero learns the format",
            format_verdict,
            f"format {base_format:.3f} -> {zero_format:.3f}; training batches (T 1.0) "
            f"{batch_format[0]:.3f} -> {batch_format[1]:.3f}",
        ),
        (
            "R1-Zero's responses grow longer over training",
            yes(length[1] > length[0]),
            f"{length[0]:.1f} -> {length[1]:.1f} tokens (training batches, first -> last tenth)",
        ),
        (
            "R1 >= R1-Zero in accuracy",
            r1_zero[0],
            f"pass@1 {metric('r1')} vs {metric('r1_zero')}{r1_zero[1]}",
        ),
        (
            "R1 is better formed than R1-Zero",
            qualified(
                e["r1"]["format"] - e["r1_zero"]["format"],
                math.hypot(format_se("r1"), format_se("r1_zero")),
                ties=False,  # "better": equal formats (both 1.000) are not
            ),
            f"format {metric('r1', 'format')} vs {metric('r1_zero', 'format')}",
        ),
        (
            "distillation beats RL on the student",
            distill_rl[0],
            f"pass@1 distilled {metric('distill')} vs RL {metric('student_rl')}{distill_rl[1]};"
            f"{flops} "
            f"minutes: distillation {minutes('distill')}, RL {minutes('student_rl')} (with its "
            "held-out evaluations)",
        ),
    ]


def results_markdown(results: dict[str, Any], config) -> str:
    """The comparison table and the findings, as printed by the run."""
    k = config.eval_stage.eval.num_samples
    lines = [
        f"| checkpoint | pass@1 | cons@{k} | pass@{k} | format | mean length |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results["eval"].items():
        lines.append(
            f"| {name} | {r['pass@1']:.3f} | {r.get(f'cons@{k}', float('nan')):.3f} | "
            f"{r.get(f'pass@{k}', float('nan')):.3f} | {r['format']:.3f} | "
            f"{r['mean_length']:.1f} |"
        )
    trends = results.get("trends", {})
    lines += [
        "",
        "| RL run (train batches, first tenth -> last tenth) | " + " | ".join(TREND_KEYS) + " |",
        "|---|" + "---|" * len(TREND_KEYS),
    ]
    for name, t in trends.items():
        if t:
            cells = [f"{t[k][0]:.3f} -> {t[k][1]:.3f}" for k in TREND_KEYS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| finding (paper) | reproduced here | measured |", "|---|---|---|"]
    lines += [f"| {text} | {verdict} | {numbers} |" for text, verdict, numbers in findings(results)]
    untimed = f", {results['untimed']} of them not timed" if results.get("untimed") else ""
    lines += [
        "",
        f"seed {results['seed']}, {results['minutes']:.1f} minutes of stages and evaluations"
        f"{untimed} (this invocation: {results['wall_minutes']:.1f})",
    ]
    copies = {n: r["tag_copy"] for n, r in results["stages"].items() if "tag_copy" in r}
    if copies:  # pretraining's check that a base copies tag names (README: below 0.3, it does not)
        lines.append(
            "tag names copied by the bases (probability, held-out format documents): "
            + ", ".join(
                f"{n} {v:.2f}" + _restarts(results["stages"][n].get("restarts", 0))
                for n, v in copies.items()
            )
        )
    timed = {n: r["minutes"] for n, r in results["stages"].items() if "minutes" in r}
    timed["evaluations"] = sum(r.get("minutes", 0.0) for r in results["eval"].values())
    lines.append("minutes per stage: " + ", ".join(f"{n} {m:.1f}" for n, m in timed.items()))
    return "\n".join(lines) + "\n"


def _restarts(n: float) -> str:
    return f" (after {n:.0f} restart{'s' if n > 1 else ''})" if n else ""


def _plots(workdir: str, results: dict[str, Any]) -> None:
    """RL curves of each RL run and a bar chart of the final comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from r1jax import metrics

    keys = ("reward", "accuracy", "completions/mean_length", "eval/accuracy")
    fig, axes = plt.subplots(1, len(keys), figsize=(20, 4))
    for name in RL_RUNS:
        path = os.path.join(workdir, name, "metrics.jsonl")
        if not os.path.exists(path):
            continue
        rows = metrics.read_metrics(path)
        for ax, key in zip(axes, keys, strict=True):
            logged = [r for r in rows if key in r]  # eval/ keys: only every eval.every steps
            ax.plot([r["step"] for r in logged], [r[key] for r in logged], label=name, marker=".")
            ax.set_title(key if key.startswith("eval/") else f"{key} (training batches)")
            ax.set_xlabel("GRPO step")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "rl_curves.png"), dpi=100)
    plt.close(fig)

    names = list(results["eval"])
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.bar(names, [results["eval"][n]["pass@1"] for n in names])
    ax.set_ylabel("held-out pass@1")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "comparison.png"), dpi=100)
    plt.close(fig)
