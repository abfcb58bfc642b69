"""What every stage shares: the base config, validation, workdir set-up, meshes and model loading.

Each stage module (`r1jax/stages/<stage>.py`) exposes `validate(config)` (raise `ConfigError` naming
the field) and `run(config, workdir)`. `configs/<stage>.py` builds its config from `base_config()`
here, so every stage has the same `seed`, `mesh`, `model`, `ckpt` and `log` sections.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from r1jax import paths

log = logging.getLogger("r1jax")

# The built-in offline base model: made by `--stage=pretrain` with its default config.
TOY_BASE = "toy"


class ConfigError(ValueError):
    """A config the run cannot start with; the message names the field to fix."""


class ResumeRefused(ConfigError):
    """A workdir's checkpoint that this config would not continue (`check_resume`); `why`: what
    differs, without the advice."""

    def __init__(self, message: str, why: str = ""):
        super().__init__(message)
        self.why = why or message


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


def base_config() -> ml_collections.ConfigDict:
    """Sections shared by all stages. Stage configs add their own section and override fields."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # seeds data order, initialisation and sampling

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1  # pure data-parallel replicas
    c.mesh.fsdp = -1  # weight-sharded data parallelism; -1 = all remaining devices
    c.mesh.tensor = 1  # tensor parallelism (heads, MLP, vocab)
    c.mesh.expert = 1  # expert parallelism: MoE routed experts split over it (rows and weights
    #                    otherwise split like fsdp); must divide the device count

    c.model = ml_collections.ConfigDict()
    c.model.path = TOY_BASE  # HF checkpoint folder, or "toy" = the built-in toy base model
    c.model.param_dtype = "float32"  # storage dtype of parameters (master weights)
    c.model.dtype = "float32"  # compute dtype ("bfloat16" for mixed precision)
    c.model.remat = False  # rematerialise layers in the backward pass to save memory
    # DeepSeek-V3 only: step size (gamma) of the auxiliary-loss-free load-balancing bias update
    # after each optimizer step (0 = off; the V3 paper used 0.001). No auxiliary balance loss is
    # applied (V3's sequence-wise one, V2's aux_loss_alpha / seq_aux): a V2 router fine-tunes
    # without a balancing term; `router/max_load_ratio` in the metrics shows its load.
    c.model.router_bias_rate = 0.0
    # DeepSeek only: slots per routed expert = factor x tokens x top-k / experts (GShard; tokens
    # past an expert's slots skip it), where tokens are those of one device's forward (of one
    # expert rank's share under expert parallelism), padding included: which tokens are dropped
    # depends on the mesh and the batch layout. 0 = dropless: exact, but every expert computes a
    # slot for every token, n_routed_experts / top-k times the useful work (32x for V3); 1.25 is
    # typical for training. It applies to sampling too, where a decode step's B tokens get few
    # slots: with V3's routing ~10% of the expert assignments of each generated token are dropped,
    # in token order, so mostly from the batch's last rows (up to 25% for row 32 of 32). Keep 0
    # for RL and evaluation unless memory demands it.
    c.model.capacity_factor = 0.0

    c.ckpt = ml_collections.ConfigDict()
    c.ckpt.every = 50  # save every N steps (and at the end)
    c.ckpt.keep = 2  # keep the last N checkpoints (plus the best one)
    c.ckpt.best_metric = ""  # metric that picks the best checkpoint ("" = none)
    c.ckpt.best_mode = "max"  # "max" or "min"
    c.ckpt.async_save = True  # write checkpoints in the background

    c.log = ml_collections.ConfigDict()
    c.log.every = 10  # summary line every N steps (metrics go to JSONL every step)
    c.log.progress = True  # tqdm progress bar with rate and ETA

    # Limits for running generated code: the code reward (RL), grading code rows (eval, rejection
    # sampling). allow_unsandboxed=True runs it without bubblewrap (rlimits only) where bwrap
    # cannot work; the run refuses to start otherwise.
    c.sandbox = sandbox_config()

    # The worker processes that score rule rewards (RL) and grade answers (eval, rejection
    # sampling). A worker still scoring its chunk after timeout_s per sample of it is ended: the
    # chunk is retried once, then left unscored (RL: advantage 0), so a reward that never returns
    # costs samples, not the run.
    c.reward_pool = ml_collections.ConfigDict()
    c.reward_pool.workers = -1  # -1 = the cores this process may use (at most 16); 0 = in-process
    c.reward_pool.timeout_s = 120.0  # seconds per sample of a chunk; 0 = no deadline
    return c


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """Import a config file and return its `get_config()`; "file.py:arg" calls `get_config(arg)`
    (the same spelling as --config=file.py:arg)."""
    path, _, arg = path.partition(":")
    spec = importlib.util.spec_from_file_location("r1jax_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def describe(config: ml_collections.ConfigDict, prefix: str = "") -> str:
    """One line per leaf field: `section.field = value (type)`."""
    lines = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            lines.append(describe(value, name + "."))
        else:
            lines.append(f"  {name} = {value!r} ({type(value).__name__})")
    return "\n".join(lines)


MESH_AXES = ("data", "fsdp", "tensor", "expert")


def validate(config: ml_collections.ConfigDict, stage: str) -> None:
    """Refuse configs that cannot work, before any work is done. Raises ConfigError."""
    import jax

    own = ("rl", "sft", "pretrain", "distill", "rejection_sampling")
    if stage == "pipeline" and "r1_zero" not in config:  # the pipeline's sections: recipe steps
        other = next((s for s in (*own, "eval") if s in config), None)
        raise ConfigError(
            "--config is not a config for --stage=pipeline"
            + (f" but for --stage={other}" if other else "")
            + "; use configs/pipeline.py or pass the stage the config is for"
        )
    if stage == "pipeline":  # (its sections are checked as their stages; here its own fields)
        import difflib

        known = default_config("pipeline").keys()
        for key in config.keys():
            if key not in known:
                close = difflib.get_close_matches(key, list(known), n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ConfigError(f"unknown field {key}{hint} in the pipeline config")
    if stage != "pipeline":  # --config of another stage (its own section names it)
        other = next((s for s in own if s != stage and s in config), None)
        if "r1_zero" in config:
            other = "pipeline"
        if stage not in config or other:
            raise ConfigError(
                f"--config is not a config for --stage={stage}"
                + (f" but for --stage={other}" if other else f" (it has no {stage} section)")
                + f"; use configs/{stage}.py or pass the stage the config is for"
            )
        check_fields(config, stage)

    seed = config.get("seed", 0)
    # (jax.random.key keeps a seed's low 32 bits without x64: seeds 2**32 apart drew alike)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise ConfigError(f"seed must be an integer in [0, 2**32), got {config.seed!r}")
    mesh_sizes(config, jax.device_count())
    for field in ("param_dtype", "dtype"):
        if config.model[field] not in ("float32", "bfloat16"):
            raise ConfigError(
                f"model.{field} must be 'float32' or 'bfloat16', got {config.model[field]!r}"
            )
    if config.model.param_dtype == "bfloat16" and stage in CHECKPOINTING_STAGES:
        log.warning(
            "model.param_dtype='bfloat16' trains bfloat16 weights: an update smaller than 1/256 "
            "of its weight rounds away (at RL's learning rates of ~1e-6 most do; Adam's moments "
            "stay float32). Keep float32 weights and compute in bfloat16 with "
            "model.dtype='bfloat16' unless memory leaves no choice"
        )
    if (
        stage not in ("pretrain", "pipeline")
        and config.model.path != TOY_BASE
        and not os.path.isdir(os.path.expanduser(config.model.path))
    ):
        raise ConfigError(
            f"model.path {config.model.path!r} is not a folder; give a Hugging Face "
            f"checkpoint folder or 'toy' for the built-in toy base model"
        )
    if stage not in ("pretrain", "pipeline"):
        check_deepseek_options(
            config.model,
            os.path.expanduser(config.model.path),
            expert_ways=config.get("mesh", {}).get("expert", 1),
        )
    reward_pool_options(config)  # (refuses bad values)
    if config.ckpt.best_mode not in ("max", "min"):
        raise ConfigError(f"ckpt.best_mode must be 'max' or 'min', got {config.ckpt.best_mode!r}")
    for field in ("ckpt.every", "ckpt.keep", "log.every"):
        section, name = field.split(".")
        if config[section][name] < 1:
            raise ConfigError(f"{field} must be >= 1, got {config[section][name]}")
    if config.ckpt.best_metric and stage != "rl":
        raise ConfigError(
            f"ckpt.best_metric={config.ckpt.best_metric!r}: only --stage=rl keeps a best "
            f"checkpoint (by a held-out eval/* metric); leave it empty for --stage={stage}"
        )
    if config.ckpt.best_metric:
        from r1jax.stages import eval as eval_stage

        names = ["eval/accuracy"] + [
            f"eval/{k}" for k in eval_stage.metric_names(config.eval.num_samples)
        ]
        if config.ckpt.best_metric not in names:  # (a misspelt one ranked every step alike)
            raise ConfigError(
                f"ckpt.best_metric={config.ckpt.best_metric!r}: the best checkpoint is picked "
                f"by a held-out metric the evaluation logs, one of {', '.join(names)}"
            )
    stage_module(stage).validate(config)


def _same_kind(value: Any, default: Any) -> bool:
    """Whether a config file's `value` has the type of the stage default's `default` (None only
    where the default is None: elsewhere it failed in a comparison, e.g. rl.steps = None, or a
    path operation, distill.teacher = None; "" is the off value of a text field; a bool for a
    switch the stage maps, e.g. rl.scale_rewards=False)."""
    if value is None:
        return default is None
    if default is None or isinstance(value, bool):
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(default, tuple | list):
        return isinstance(value, tuple | list)
    return isinstance(value, type(default))


# Fields a config file may set to None for "off" (their stages read them with `or`).
_NONE_IS_OFF = frozenset({"ckpt.best_metric"})

# Sections whose keys are names or optional, not fixed fields (the stages check them: reward
# names, document kinds, column names, SandboxConfig's fields).
_OPEN_SECTIONS = ("rewards", "pretrain.mix", "data.field_map", "sandbox")


def check_fields(config: ml_collections.ConfigDict, stage: str) -> None:
    """Refuse a --config file's fields that configs/<stage>.py does not have (a misspelt field
    was a new one, silently unused), sections it lacks, and values of another type (a float
    rl.prompts_per_step passed validation and failed in the training loop)."""
    import difflib

    default = default_config(stage)
    problems = []

    def walk(have, want, prefix):
        for key in have.keys():
            name = prefix + key
            if name in _OPEN_SECTIONS:
                continue  # (its stage checks it)
            if key not in want:
                close = difflib.get_close_matches(key, list(want.keys()), n=1)
                hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
                problems.append(f"unknown field {name}{hint}")
                continue
            value, ref = have[key], want[key]
            if isinstance(ref, ml_collections.ConfigDict):
                if isinstance(value, ml_collections.ConfigDict):
                    walk(value, ref, name + ".")
                else:
                    problems.append(f"{name} must be a section, got {value!r}")
            elif not (_same_kind(value, ref) or (value is None and name in _NONE_IS_OFF)):
                problems.append(
                    f"{name} = {value!r} is a {type(value).__name__}, not a "
                    f"{type(ref).__name__} (configs/{stage}.py: {ref!r})"
                )
        for key in want.keys():
            if key not in have:
                problems.append(f"missing field {prefix}{key}")

    walk(config, default, "")
    if problems:
        shown = "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else "")
        raise ConfigError(f"--config: {shown}")


def mesh_sizes(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """{axis: size} of config.mesh on `num_devices` devices, the one -1 resolved. Raises
    ConfigError naming the mesh.* field when the sizes cannot make a mesh of those devices."""
    sizes = {axis: config.mesh[axis] for axis in MESH_AXES}
    for axis, size in sizes.items():
        if not isinstance(size, int) or isinstance(size, bool) or size == 0 or size < -1:
            raise ConfigError(f"mesh.{axis} must be a positive integer or -1, got {size!r}")
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ConfigError(f"mesh: at most one of {', '.join('mesh.' + a for a in free)} may be -1")
    if num_devices % abs(sizes["expert"]):
        raise ConfigError(
            f"mesh.expert={sizes['expert']} must divide the {num_devices} devices (it splits the "
            f"routed experts over groups of devices)"
        )
    fixed = 1
    for size in sizes.values():
        fixed *= size if size != -1 else 1
    if free and num_devices % fixed == 0:
        sizes[free[0]] = num_devices // fixed
    total = sizes["data"] * sizes["fsdp"] * sizes["tensor"] * sizes["expert"]
    if -1 in sizes.values() or total != num_devices:
        shown = " * ".join(f"mesh.{a}={config.mesh[a]}" for a in MESH_AXES)
        raise ConfigError(
            f"{shown} cannot cover the {num_devices} devices; make the product {num_devices} "
            "(one axis may be -1 to take the remaining devices)"
        )
    return sizes


def batch_ways(config: ml_collections.ConfigDict, num_devices: int) -> int:
    """How many ways the batch is split: data * fsdp * expert, the mesh axes `sharding.RULES`
    put the batch on (resolving a -1 against the device count)."""
    sizes = mesh_sizes(config, num_devices)
    return sizes["data"] * sizes["fsdp"] * sizes["expert"]


# Rows per micro-batch and batch shard that `num_micro_batches = 0` picks on a CPU (bench/NOTES.md,
# "U1": a micro-batch of a few rows keeps its activations in cache; the tiny GRPO update runs 1.3x
# (16 rows) to 1.6x (64 rows) faster in micro-batches of 4 rows than in one piece).
CPU_MICRO_BATCH_ROWS = 4


def fingerprint(*arrays) -> str:
    """A short hash of arrays' bytes (e.g. a stage's tokenised data): equal only for equal data."""
    import hashlib

    import numpy as np

    digest = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(f"{a.dtype}{a.shape}".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()[:16]


def _digest_file(digest, path: str, name: str) -> None:
    """Feed `name`, the size and the first and last MiB of the file at `path` into `digest`."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(0)
        head = f.read(1 << 20)
        f.seek(max(size - (1 << 20), len(head)))
        digest.update(f"{name}:{size};".encode() + head + f.read())


def model_fingerprint(path: str) -> str:
    """A checkpoint folder by what survives moving or copying it: its config.json, and each weight
    file's name, size and first and last MiB (any two trained models differ there; the whole of
    a large model would take minutes to read). The path itself for one not on local disk. A run
    records the model it starts from, so a resume from another one is refused."""
    import hashlib

    folder = toy_base_path() if path == TOY_BASE else os.path.expanduser(path)
    if not os.path.isdir(folder):
        return path
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name == "config.json" or name.endswith(".safetensors"):
            _digest_file(digest, os.path.join(folder, name), name)
    return digest.hexdigest()[:16]


# The files a tokenizer (and its chat template) is read from.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)


def tokenizer_fingerprint(path: str) -> str:
    """A checkpoint folder's tokenizer and chat template files (`model_fingerprint` reads the
    weights and config only), for a model that reads text through its own tokenizer."""
    import hashlib

    folder = os.path.expanduser(path)
    digest = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            _digest_file(digest, os.path.join(folder, name), name)
    return digest.hexdigest()[:16]


def file_fingerprint(path: str) -> str:
    """A local file by its size and first and last MiB (see `model_fingerprint`)."""
    import hashlib

    digest = hashlib.sha256()
    _digest_file(digest, path, "")
    return digest.hexdigest()[:16]


def check_same_on_every_process(
    what: str,
    fingerprint: Callable[[], Any],
    fix: str = "each host reads its own copy; copy the same files to every host (or use a "
    "folder they all share)",
) -> None:
    """Refuse, on every process alike, inputs that the hosts read differently (a data file or
    model folder copied to each host's own disk, stale on one of them): every host places its own
    copy's rows and weight blocks on its own devices, so a mismatch mixes the copies silently.
    `fingerprint()`: a str, or rows (dicts) hashed one at a time, of what this process read;
    called only with several processes. Every process must call this. `fix`: what to do."""
    import hashlib

    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return
    value, digest = fingerprint(), hashlib.sha256()
    for part in [value] if isinstance(value, str) else value:
        text = part if isinstance(part, str) else json.dumps(part, sort_keys=True, default=str)
        digest.update(text.encode("utf-8", "surrogatepass") + b"\n")
    mine = np.frombuffer(digest.digest()[:8], np.int64)
    seen = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1)
    differ = [i for i, d in enumerate(seen) if d != seen[0]]
    if differ:
        raise ConfigError(f"{what} differs on process(es) {differ} from process 0's: {fix}")


def resume(
    ckpt, state, run: dict[str, Any], *, total_steps: int, steps_field: str
) -> dict[str, Any]:
    """The `extra` of the latest checkpoint, restored into `state` once `check_resume` finds that
    it continues this run (its "step" is where the training loop starts); {"step": 0} without
    one."""
    if check_resume(ckpt, run, total_steps=total_steps, steps_field=steps_field) is None:
        return {"step": 0}
    return ckpt.restore(state.model, state.optimizer)


def schedule_record(config: ml_collections.ConfigDict, optimizer_steps: int) -> list:
    """The learning-rate schedule's kind and span, saved beside each step (not a resume check:
    more steps or epochs are allowed; `warn_if_schedule_changed` reads it back)."""
    return [config.optim.schedule, optimizer_steps]


def warn_if_schedule_changed(config, saved, optimizer_steps: int) -> None:
    """A cosine is spread over the run's optimizer steps: resumed with more (or fewer) steps or
    epochs, it is recomputed over the new total, and the learning rate jumps at the resume.
    `saved`: the checkpoint's `schedule_record` (None: saved before it was recorded)."""
    now = schedule_record(config, optimizer_steps)
    if config.optim.schedule == "cosine" and saved is not None and list(saved) != now:
        log.warning(
            "optim.schedule='cosine' now spans %d optimizer steps (the checkpoint's run: %s over "
            "%d): the learning rate does not continue that run's schedule from this resume",
            now[1],
            repr(saved[0]),
            saved[1],
        )


def optimizer_layout(config: ml_collections.ConfigDict) -> dict[str, str]:
    """The settings that shape the saved model and optimizer state, for a run's resume record:
    clipping on or off chains one more transformation (`train.make_tx`), and the parameters'
    storage dtype is every saved array's, so a checkpoint saved with others cannot be restored;
    the refusal names the field instead of the state's paths."""
    return {
        "optim.max_grad_norm": "> 0" if config.optim.max_grad_norm > 0 else "0 (no clipping)",
        "model.param_dtype": config.model.param_dtype,
    }


# Resume records no run writes any more: distillation's teacher by path (by content since, as
# "teacher model"; a moved teacher is the same one).
_RETIRED = frozenset({"teacher"})


def changes(then: dict[str, Any], now: dict[str, Any], keys) -> list[str]:
    """ "k: <then> then, <now> now" for each of `keys` whose values differ (a run's record)."""
    return [
        f"{k}: {then.get(k, 'absent')!r} then, {now.get(k, 'absent')!r} now"
        for k in keys
        if then.get(k, "absent") != now.get(k, "absent")
    ]


def check_resume(
    ckpt,
    run: dict[str, Any],
    *,
    total_steps: int,
    steps_field: str,
    then: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """The latest checkpoint's `extra` (None without one) once it is known to continue this run.

    `run` is what fixes the run's data order and batches (seed, a fingerprint of the tokenised
    data, rows per step ...); the loops save it in every checkpoint's `extra` beside the step. A
    checkpoint saved with other values is refused, naming them: resumed, the data position would
    point into another order (rows seen twice, others never). More steps or epochs, another
    learning rate, mesh or logging are fine; a checkpoint past `total_steps` (`steps_field`
    lowered) is refused rather than exported as the final model. `then`: the values of settings
    recorded since some release, as runs from before it had them (compared like the others).
    """
    from r1jax import checkpoint

    if ckpt.latest_step() is None:
        return None
    step_dir = ckpt.step_dir(ckpt.latest_step())
    extra = ckpt.read_extra()
    if not isinstance(extra.get("step"), int):
        raise checkpoint.CheckpointError(
            f"Checkpoint {step_dir} is damaged: its extra/ JSON has no step. Move or delete that "
            "directory to resume from the previous checkpoint; no other checkpoint was touched."
        )
    saved = extra.get("run")
    if saved is not None:
        saved = {**(then or {}), **saved}
    now = json.loads(json.dumps(run))  # as it reads back (tuples become lists)
    # Checkpoints from before a setting was recorded have no value for it (none at all before
    # this check existed): those are not compared; nor the records retired since (`_RETIRED`).
    diffs = changes(saved or {}, now, sorted(set(saved or ()) - _RETIRED))
    if diffs:
        why = f"{step_dir} was saved by a run with other settings ({'; '.join(diffs)})"
        raise ResumeRefused(
            f"{why}; resuming would continue its data position in another order (or with "
            "another objective or optimizer). Use the settings it was started with, or another "
            "--workdir",
            why,
        )
    if extra["step"] > total_steps:
        raise ResumeRefused(
            f"{step_dir} is at step {extra['step']}, past the {total_steps} steps this config asks "
            f"for ({steps_field}); raise it to continue, or use another --workdir"
        )
    return extra


def micro_batches(config: ml_collections.ConfigDict, section: str, rows: int) -> int:
    """`<section>.num_micro_batches` for a batch of `rows` rows, resolved and checked.

    0 (the default) is automatic: on a CPU, micro-batches of about `CPU_MICRO_BATCH_ROWS` rows per
    batch shard; on an accelerator one micro-batch (the whole batch; raise it only to fit memory).
    An explicit k must split the rows into k equal micro-batches that each split over the mesh's
    batch shards; otherwise a ConfigError names the field.
    """
    import jax

    k = config[section].num_micro_batches
    ways = batch_ways(config, jax.device_count())
    if k < 0:
        raise ConfigError(f"{section}.num_micro_batches must be >= 0 (0 = automatic), got {k}")
    if k == 0:
        per_shard = rows // ways
        if jax.default_backend() != "cpu" or per_shard <= CPU_MICRO_BATCH_ROWS:
            return 1
        k = per_shard // CPU_MICRO_BATCH_ROWS
        while per_shard % k:
            k -= 1
        return k
    if rows % (k * ways):
        raise ConfigError(
            f"{section}.num_micro_batches={k} must split the {rows} rows of a step into equal "
            f"micro-batches that each split over the mesh's {ways} batch shards "
            "(mesh.data * mesh.fsdp * mesh.expert)"
        )
    return k


def check_deepseek_options(
    model_config: ml_collections.ConfigDict,
    path: str,
    *,
    frozen: bool = False,
    expert_ways: int = 1,
) -> None:
    """Refuse `model.router_bias_rate` unless it is >= 0 and the checkpoint at `path` is a
    DeepSeek-V3 model (the only router with a load-balancing bias), `model.capacity_factor`
    unless it is >= 0 and the checkpoint is a DeepSeek (mixture-of-experts) one, and a mesh
    `expert` axis of `expert_ways` devices that does not divide its routed experts (the first
    step failed, after the load). A folder that does not exist yet (a pipeline stage's input) is
    checked when it is loaded. `frozen`: a model that is never trained (reference, teacher),
    which takes no router bias updates."""
    experts = _routed_experts(path)
    if experts and expert_ways > 1 and experts % expert_ways:
        raise ConfigError(
            f"mesh.expert={expert_ways} does not divide the {experts} routed experts of "
            f"model.path {path!r} (each expert-parallel device holds whole experts): choose an "
            f"expert axis that divides {experts}"
        )
    rate = 0.0 if frozen else model_config.router_bias_rate
    factor = model_config.get("capacity_factor", 0.0)
    for name, value in (("router_bias_rate", rate), ("capacity_factor", factor)):
        if not isinstance(value, int | float) or not 0 <= value < float("inf"):
            raise ConfigError(f"model.{name} must be a finite number >= 0, got {value!r}")
    if rate == 0 and factor == 0:
        return
    if path == TOY_BASE:
        model_type, topk = "qwen2 (the toy base model)", None
    elif os.path.isfile(os.path.join(path, "config.json")):
        with open(os.path.join(path, "config.json")) as f:
            raw = json.load(f)
        model_type, topk = raw.get("model_type"), raw.get("topk_method", "noaux_tc")
    else:
        return
    if rate and (model_type != "deepseek_v3" or topk != "noaux_tc"):
        raise ConfigError(
            f"model.router_bias_rate={rate} only applies to DeepSeek-V3 models (their router's "
            f"load-balancing bias); model.path {path!r} is {model_type}"
            + (f" with topk_method {topk!r}" if model_type == "deepseek_v3" else "")
            + "; set model.router_bias_rate=0"
        )
    if factor and model_type not in ("deepseek_v2", "deepseek_v3"):
        raise ConfigError(
            f"model.capacity_factor={factor} only applies to DeepSeek (mixture-of-experts) "
            f"models; model.path {path!r} is {model_type}; set model.capacity_factor=0"
        )


def _routed_experts(path: str) -> int | None:
    """n_routed_experts of the DeepSeek checkpoint at `path` (None: another model, or no folder)."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return None  # (a missing or malformed config is named where the model loads)
    experts = raw.get("n_routed_experts") if isinstance(raw, dict) else None
    return experts if isinstance(experts, int) and experts > 0 else None


# --------------------------------------------------------------------------------------------------
# Running a stage
# --------------------------------------------------------------------------------------------------


def stage_module(stage: str):
    return importlib.import_module(f"r1jax.stages.{stage}")


def run_stage(stage: str, config: ml_collections.ConfigDict, workdir: str) -> Any:
    """Set up the workdir (local or a cloud URI, see `r1jax.paths`) and logging, then run the
    stage. Returns what the stage returns.

    Logging goes to this workdir while the stage runs and back to where it went before afterwards
    (so the pipeline's own lines land in its log, not in its last sub-stage's).
    """
    import jax

    paths.makedirs(workdir)
    check_workdir_owner(workdir, stage)
    lock = lock_workdir(workdir)
    previous = setup_logging(workdir)
    saved_config = os.path.join(workdir, f"config_{stage}.json")
    # A run that fails or stops before it saves anything (a resume refused for other settings, a
    # bad data row, Ctrl-C while a model loads) leaves the config of the run whose outputs the
    # workdir holds in place.
    kept = paths.read_text(saved_config) if paths.exists(saved_config) else None
    saved_steps = _checkpoint_steps(workdir)
    saved_output = _final_output_time(workdir, stage)
    try:
        if jax.process_index() == 0:
            paths.write_text(saved_config, config.to_json_best_effort(indent=2, sort_keys=True))
        log.info(
            "stage %s, workdir %s, %d process(es), %d device(s) (%s)",
            stage,
            workdir,
            jax.process_count(),
            jax.device_count(),
            jax.devices()[0].platform,
        )
        result = stage_module(stage).run(config, workdir)
        # What process 0 wrote (hf/final, a dataset) is read by every process in the next stage.
        sync_processes(f"stage {stage} done")
        return result
    except BaseException as e:
        # The stage failed (or was interrupted) midway: let the checkpoint it was saving commit,
        # and the metrics reach the workdir, instead of being cut off at interpreter exit.
        for error in paths.close_open_writers():
            log.error("while stopping: %s", error)
        # (a checkpointing stage saved nothing when it wrote no step; the others write their
        # outputs once, at the end: an earlier run's are still there, with its config)
        unsaved = (
            isinstance(e, ResumeRefused)
            or (
                stage in CHECKPOINTING_STAGES
                and saved_steps is not None
                and _checkpoint_steps(workdir) == saved_steps
            )
            or (stage in FINAL_OUTPUT and _final_output_time(workdir, stage) == saved_output)
        )
        if kept is not None and unsaved and jax.process_index() == 0:
            try:
                paths.write_text(saved_config, kept)
            except OSError as again:  # (a full disk: the first error is the one to report)
                log.error("could not restore %s: %s", saved_config, again)
        raise
    finally:
        restore_logging(previous)  # closes this stage's log file (uploading a cloud one)
        if lock is not None:
            lock.close()  # (releases it)


def lock_workdir(workdir: str):
    """Hold `<workdir>/.r1jax.lock` while a stage runs there (process 0, local workdir; the
    open file, to close when done, or None): the same command started again while the first
    still ran (its ssh session gone, the run not) resumed the first one's checkpoint, and orbax
    then deleted the first run's checkpoint in flight, which died blaming the folder."""
    import fcntl
    import socket

    import jax

    if jax.process_index() > 0:
        return None
    # A cloud workdir takes no lock: its working copies on this machine do (`paths.staging_dir`;
    # two runs here would append to one metrics copy; on two machines nothing can tell).
    folder = paths.staging_dir(workdir) if paths.is_remote(workdir) else workdir
    os.makedirs(folder, exist_ok=True)
    f = open(os.path.join(folder, ".r1jax.lock"), "a+")  # noqa: SIM115 (held while it runs)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # (any other error: the file system has no locks, below)
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ConfigError(
            f"workdir {workdir} is in use by another r1jax run ({holder}); wait for it to end "
            "or stop it (Ctrl-C or SIGTERM saves its step), then run this again"
        ) from None
    except OSError as e:  # NFS without its lock daemon (ENOLCK), Lustre mounted noflock (ENOSYS)
        f.close()
        log.warning(
            "cannot lock workdir %s (%s): its file system takes no locks; make sure no other "
            "r1jax run uses it",
            workdir,
            e,
        )
        return None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}")
    f.flush()
    return f


def _checkpoint_steps(workdir: str) -> set[str] | None:
    """The committed step folders in a local workdir's checkpoints/ (None for a cloud workdir:
    unknown). Not an uncommitted `<step>.orbax-checkpoint-tmp*` folder: orbax deletes one a
    killed save left when the next run starts, which is no save of that run."""
    if paths.is_remote(workdir):
        return None
    folder = os.path.join(workdir, "checkpoints")
    return {n for n in os.listdir(folder) if n.isdigit()} if os.path.isdir(folder) else set()


# Stages that checkpoint into <workdir>/checkpoints and resume from whatever is there.
CHECKPOINTING_STAGES = ("pretrain", "sft", "rl", "distill")
# Stages that write their outputs once, when done: the file written last.
FINAL_OUTPUT = {"eval": "eval.json", "rejection_sampling": "rejection_sampling_summary.json"}


def _final_output_time(workdir: str, stage: str) -> float | None:
    """When a local workdir's final output of `stage` was written (None: none; always None in
    a cloud workdir, where a failure is taken to come before the output, as it almost always
    does)."""
    path = os.path.join(workdir, FINAL_OUTPUT.get(stage, ""))
    if stage not in FINAL_OUTPUT or paths.is_remote(workdir) or not os.path.exists(path):
        return None
    return os.stat(path).st_mtime_ns


def check_workdir_owner(workdir: str, stage: str) -> None:
    """Refuse to run a checkpointing stage in a workdir whose checkpoints another one wrote: it
    would resume them as its own (an RL run in an SFT workdir restored SFT's last step, ran 0 GRPO
    steps and exited as done)."""
    if stage not in CHECKPOINTING_STAGES or not paths.exists(os.path.join(workdir, "checkpoints")):
        return
    for other in CHECKPOINTING_STAGES:
        if other != stage and paths.exists(os.path.join(workdir, f"config_{other}.json")):
            raise ConfigError(
                f"workdir {workdir} holds the checkpoints of a --stage={other} run "
                f"(config_{other}.json, checkpoints/), which this {stage} run would resume as "
                f"its own; give it another --workdir"
            )


def setup_logging(workdir: str) -> tuple:
    """INFO to stderr on process 0 only; every process logs to its own file `log_p<i>.txt` in the
    workdir. Returns the logger's previous set-up for `restore_logging`."""
    import jax

    logger = logging.getLogger("r1jax")
    previous = (list(logger.handlers), logger.level, logger.propagate)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    file_handler = WorkdirLogFile(workdir, f"log_p{jax.process_index()}.txt")
    file_handler.setFormatter(fmt)
    logger.addHandler(file_handler)
    if jax.process_index() == 0:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(fmt)
        logger.addHandler(console)
    return previous


def restore_logging(previous: tuple) -> None:
    """Close the handlers `setup_logging` installed and put back what it returned."""
    logger = logging.getLogger("r1jax")
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    handlers, level, propagate = previous
    for h in handlers:
        logger.addHandler(h)
    logger.setLevel(level)
    logger.propagate = propagate


class WorkdirLogFile(logging.FileHandler):
    """A log file in the workdir.

    `logging.FileHandler` appends to a local file, which a cloud workdir cannot offer: there the
    handler writes a local working copy (`paths.staging_dir`, which keeps the full log on this
    machine) and uploads it at most every 30 s as records arrive, and when closed. It starts from
    the workdir's copy, so a resumed run's log continues the killed run's.
    """

    def __init__(self, workdir: str, name: str):
        self.staged = paths.Staged(workdir, (name,))
        local = self.staged.local_path(name)
        remote = os.path.join(workdir, name)
        if self.staged.remote and paths.exists(remote):
            # This machine's copy, when it reaches further than the workdir's (lines logged
            # after the last upload); else the workdir's: a copy left by an earlier run here
            # lacks what runs on other machines logged since, and would replace it.
            text = paths.read_text(remote)
            mine = paths.read_text(local) if os.path.exists(local) else ""
            if not mine.startswith(text):
                paths.write_text(local, text)
        super().__init__(local)

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        if self.staged.due():
            try:
                self.staged.sync()
            except Exception:  # a network hiccup must not end the run; the next sync retries
                self.handleError(record)

    def close(self) -> None:
        super().close()
        try:
            self.staged.sync(force=True)
        except Exception as e:  # runs in `finally` blocks: report, never mask the real error
            print(f"r1jax: could not upload the log to {self.staged.workdir}: {e}", file=sys.stderr)


def make_mesh(config: ml_collections.ConfigDict):
    from r1jax import sharding

    try:
        return sharding.make_mesh(**{axis: config.mesh[axis] for axis in MESH_AXES})
    except ValueError as e:
        raise ConfigError(str(e)) from e


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def r1jax_home() -> str:
    """Where the built-in toy base model lives ($R1JAX_HOME, default ~/.cache/r1jax)."""
    return paths.r1jax_home()


def enable_compilation_cache() -> None:
    """Persist compiled XLA programs in $R1JAX_HOME/xla_cache (or where JAX_COMPILATION_CACHE_DIR
    already points), so a rerun (a resume, the next stage of a pipeline with the same shapes)
    does not compile again. R1JAX_COMPILATION_CACHE=0 disables. Off for a multi-process run on
    CPUs: JAX writes entries from process 0 only, so in a rerun process 0 loads each program
    while the others compile it, and the CPU collectives (gloo) wait only 30 s for a late peer
    before failing the run."""
    import jax

    if os.environ.get("R1JAX_COMPILATION_CACHE", "1") == "0":
        return
    if jax.process_count() > 1 and jax.default_backend() == "cpu":
        log.info("no persistent compilation cache: a multi-process run on CPUs (gloo)")
        return
    if not jax.config.jax_compilation_cache_dir:  # (else the user's JAX_COMPILATION_CACHE_DIR)
        jax.config.update("jax_compilation_cache_dir", os.path.join(r1jax_home(), "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def toy_base_path() -> str:
    return os.path.join(r1jax_home(), "toy_base")


# Bump when the corpus or tokenizer code changes what the default pretraining produces (the config
# itself is fingerprinted), so a toy base model cached by an older r1jax is rebuilt, not reused.
TOY_RECIPE_VERSION = 3  # 3: weight decay no longer reaches the q/k/v biases (session 15)
_TOY_STAMP = "r1jax_toy_recipe.txt"


def toy_recipe(pretrain_config=None) -> str:
    """Fingerprint of the recipe that builds the toy base model: the default pretraining config's
    fields that shape the model (seed, `pretrain`, `optim`, the model's dtypes and remat) and
    TOY_RECIPE_VERSION. Only those: a new option elsewhere (logging, checkpoints, the mesh, the
    sandbox) must not rebuild every user's toy base."""
    import hashlib

    if pretrain_config is None:
        pretrain_config = default_config("pretrain")
    full = json.loads(pretrain_config.to_json(sort_keys=True))
    settings = {k: full[k] for k in ("seed", "pretrain", "optim")}
    settings["model"] = {k: full["model"][k] for k in ("param_dtype", "dtype", "remat")}
    text = f"{TOY_RECIPE_VERSION}|{json.dumps(settings, sort_keys=True)}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def mark_toy_base(target: str, recipe: str | None = None) -> None:
    """Record which recipe built the toy base model in `target`."""
    paths.write_text(os.path.join(target, _TOY_STAMP), (recipe or toy_recipe()) + "\n")


def resolve_model_path(path: str) -> str:
    """The checkpoint folder for `path`; for "toy", train the toy base model first if it is missing
    or was built by another recipe."""
    if path != TOY_BASE:
        return os.path.expanduser(path)  # "~/models/x" from a launcher's command line
    _check_home_is_shared()
    target = toy_base_path()
    pretrain_config = default_config("pretrain")
    recipe = toy_recipe(pretrain_config)
    if _toy_stamp(target) == recipe:
        return target
    with _toy_base_lock():  # another run building it now: wait for it, then use its base
        if _toy_stamp(target) != recipe:
            _build_toy_base(target, pretrain_config, recipe)
    return target


def _toy_stamp(target: str) -> str | None:
    stamp = os.path.join(target, _TOY_STAMP)
    return open(stamp).read().strip() if os.path.exists(stamp) else None


@contextlib.contextmanager
def _toy_base_lock():
    """An exclusive lock on building the toy base in R1JAX_HOME across the runs of one machine
    (fcntl: released when its process dies). With several processes they build it together
    (collectives), so none of them locks (`_check_home_is_shared` has checked the folder); such
    a run beside another one building in the same R1JAX_HOME is not guarded."""
    import fcntl

    import jax

    if jax.process_count() > 1:
        yield
        return
    home = r1jax_home()
    try:
        os.makedirs(home, exist_ok=True)
        f = open(os.path.join(home, "toy_base.lock"), "w")
    except OSError as e:
        raise ConfigError(
            f"R1JAX_HOME ({home}) cannot be written ({e.strerror}), and model.path='toy' builds "
            "the toy base model there: set R1JAX_HOME to a writable folder, or model.path to a "
            "checkpoint folder"
        ) from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another run is building the toy base model in %s: waiting for it", home)
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:  # NFS without its lock daemon (ENOLCK), Lustre noflock (ENOSYS)
            log.warning(
                "cannot lock %s (%s): its file system takes no locks; make sure one run at a "
                "time builds the toy base model there",
                home,
                e,
            )
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_toy_base(target: str, pretrain_config, recipe: str) -> None:
    from r1jax.stages import pretrain

    log.info(
        "%s toy base model at %s: training it first with --stage=pretrain's default config "
        "(%d copy-task + %d corpus steps, ~13 minutes on a 2-core CPU; done once).",
        "No" if not os.path.exists(target) else "An outdated",
        target,
        pretrain_config.pretrain.copy_warmup_steps,
        pretrain_config.pretrain.steps,
    )
    run_dir = os.path.join(r1jax_home(), f"toy_base_run-{recipe}")  # resumable, per recipe
    try:
        pretrain.run(pretrain_config, run_dir, export_to=target)
    except ResumeRefused as e:  # (the recipe's config is the same: its data changed, e.g. a
        # tokenizers upgrade tokenised the corpus otherwise; the advice to use other settings or
        # another --workdir would not apply)
        raise ConfigError(
            f"an interrupted build of the toy base model cannot be resumed: {e.why}. Delete "
            f"{run_dir} and run again to build it anew"
        ) from None
    if _is_process_zero():
        mark_toy_base(target, recipe)
    sync_processes("toy base model written")  # process 0 wrote it; every process reads it


_home_checked = False


def _check_home_is_shared() -> None:
    """With several processes, the toy base model is built once, by all of them, into
    R1JAX_HOME: refuse (on every process alike) when the processes do not share that folder, as
    on a TPU slice's hosts, where each would wait for checkpoint files only its own disk has."""
    import jax

    global _home_checked
    if jax.process_count() == 1 or _home_checked:
        return
    home = r1jax_home()
    seen, total = processes_sharing(home)
    if seen == total:
        _home_checked = True  # (once per process: every model load comes here)
        return
    raise ConfigError(
        f"model.path='toy' builds the toy base model once into R1JAX_HOME ({home}), which "
        f"{total - seen} of the {total} processes do not share; give "
        "model.path a checkpoint folder every host can read, or set R1JAX_HOME to a shared "
        "folder"
    )


def processes_sharing(folder: str) -> tuple[int, int]:
    """(how many processes see a file process 0 writes into local `folder`, how many there are);
    every process must call it. A folder on each host's own disk is seen by process 0's host
    only: files one process writes there (a checkpoint's shards, an export) never reach the
    others, which then wait for them forever."""
    import time

    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return 1, 1
    os.makedirs(folder, exist_ok=True)
    token = int(multihost_utils.broadcast_one_to_all(np.int32(time.time_ns() % 2**31)))
    probe = os.path.join(folder, f".shared_probe_{token}")
    if _is_process_zero():
        open(probe, "w").close()
    sync_processes("shared-folder probe written")  # (names must match: not the folder)
    seen = multihost_utils.process_allgather(np.int32(os.path.exists(probe)))
    sync_processes("shared-folder probe read")
    if _is_process_zero():
        os.remove(probe)
    return int(np.sum(seen)), len(seen)


def sync_processes(what: str) -> None:
    """Wait until every process reaches this point (a no-op with one process): after process 0
    writes files the others are about to read (an exported model, a stage's outputs)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(what)


def _is_process_zero() -> bool:
    import jax

    return jax.process_index() == 0


def _configs_dir() -> str:
    from r1jax import launch

    return launch.CONFIG_DIR


def default_config(stage: str) -> ml_collections.ConfigDict:
    """configs/<stage>.py's config, as a run without --config gets it."""
    return load_config_file(os.path.join(_configs_dir(), stage + ".py"))


def load_tokenizer(config: ml_collections.ConfigDict):
    """config.model's tokenizer alone: the prompts can be templated and checked before any
    model is loaded (minutes for a large one)."""
    from r1jax.models import hf

    path = resolve_model_path(config.model.path)
    # config.json first, by r1jax's own reader: transformers' tokenizer loader parses it too, and
    # its errors (an empty folder, a field missing or mistyped) blamed the tokenizer files or
    # were a traceback.
    with _toy_base_damaged(config.model.path):
        hf.config_from_hf(hf.read_config(path), where=os.path.join(path, "config.json"))
        return hf.tokenizer(path)


@contextlib.contextmanager
def _toy_base_damaged(model_path: str):
    """The cached toy base model's files do not load (a full disk, a stray edit): the way out
    is deleting it, not "re-download or re-save it"."""
    from r1jax.models import hf

    try:
        yield
    except hf.CheckpointError as e:
        if model_path != TOY_BASE:
            raise
        raise ConfigError(
            f"the cached toy base model is damaged ({e}); delete {toy_base_path()} and the next "
            "run builds it anew"
        ) from None


@contextlib.contextmanager
def named_model(field: str):
    """A second model's folder (a teacher, a reference) that does not load: the error names the
    config field that chose it."""
    from r1jax.models import hf

    try:
        yield
    except hf.CheckpointError as e:
        raise ConfigError(f"{field}: {e}") from None


def load_model(config: ml_collections.ConfigDict, mesh, rules=None, *, frozen: bool = False):
    """(model, tokenizer) from config.model, parameters placed on `mesh`. `frozen`: a model that
    is never trained (a reference or teacher), which ignores the training-only
    `model.router_bias_rate`."""
    from r1jax.models import hf

    path = resolve_model_path(config.model.path)
    rate = 0.0 if frozen else config.model.router_bias_rate
    factor = config.model.get("capacity_factor", 0.0)  # (a frozen model computes as trained)
    ways = mesh.shape.get("expert", 1) if mesh is not None else 1
    check_deepseek_options(config.model, path, frozen=frozen, expert_ways=ways)  # (it exists now)
    # Only given when set: dense checkpoints refuse DeepSeek-only options.
    deepseek = {"router_bias_rate": rate} if rate else {}
    if factor:
        deepseek["capacity_factor"] = float(factor)
    with _toy_base_damaged(config.model.path):
        model = hf.load(
            path,
            mesh=mesh,
            param_dtype=config.model.param_dtype,
            dtype=config.model.dtype,
            remat=config.model.remat,
            rules=rules,
            **deepseek,
        )
    check_same_on_every_process(f"model.path {config.model.path}", lambda: model_fingerprint(path))
    return model, hf.tokenizer(path)


def vocab_size(model_path: str) -> int:
    """The embedding rows of the model at `model_path`, from its config.json (before a load)."""
    from r1jax.models import hf

    path = resolve_model_path(model_path)
    return hf.config_from_hf(hf.read_config(path)).vocab_size


def check_token_ids(
    vocab: int, tokenizer, top_id: int, what: str, name: str = "model.path"
) -> None:
    """Refuse token ids past the `vocab` embedding rows of model `name` (`top_id`: the largest
    of `what`'s ids, pad included): tokens added to a tokenizer (`add_special_tokens`: the
    format tags, a pad token) without resizing the model's embeddings. The lookup past the
    table reads NaN, every update was skipped for non-finite gradients, and a run shorter than
    `optim.max_skipped_steps` exported the model unchanged as its result."""
    if top_id >= vocab:
        raise ConfigError(
            f"{what} holds token id {top_id} (the tokenizer has {len(tokenizer)} tokens), past "
            f"{name}'s vocab_size {vocab}: tokens were added to the tokenizer without resizing "
            "the model's embeddings (resize them, e.g. transformers' "
            "`model.resize_token_embeddings(len(tokenizer))`, and save the model)"
        )


def load_reward_model(section: ml_collections.ConfigDict, mesh):
    """The learned reward model of a `reward_model` section on `mesh`, or None when its path is
    "" (off)."""
    if not section.path:
        return None
    from r1jax.rewards.reward_model import RewardModel

    log.info("reward model: %s (weight %s)", section.path, section.weight)
    path = os.path.expanduser(section.path)
    model = RewardModel.load(
        path,
        mesh=mesh,
        param_dtype=section.dtype,
        batch_size=section.batch_size,
        buckets=tuple(section.buckets),
        mean=section.mean,
        std=section.std,
    )
    check_same_on_every_process(  # (its tokenizer too: each host renders its own inputs)
        f"reward_model.path {section.path} (its weights, config or tokenizer files)",
        lambda: model_fingerprint(path) + tokenizer_fingerprint(path),
    )
    return model


def write_json(path: str, obj: Any) -> None:
    """Write JSON atomically, locally or to cloud storage (process 0 only), so a kill never
    leaves half a file. NaN and infinities (a standard error over one prompt) are written as
    null, which `read_json` reads back as NaN."""
    import jax

    from r1jax import metrics

    if jax.process_index() != 0:
        return
    text = json.dumps(metrics.json_safe(obj), indent=2, sort_keys=True, allow_nan=False)
    paths.write_text(path, text)


def read_json(path: str) -> Any:
    """A file `write_json` wrote, its nulls as NaN."""
    from r1jax import metrics

    with open(path) as f:
        return metrics.nan_from_null(json.load(f))


# --------------------------------------------------------------------------------------------------
# Config sections shared by several stages
# --------------------------------------------------------------------------------------------------


def check_config_arg(arg: str | None, name: str, allowed: tuple[str, ...] = ()) -> None:
    """Refuse a `--config=configs/<name>.py:ARG` argument the config does not take (a misspelt
    ":smoke" ran the whole recipe)."""
    if arg not in (None, "", *allowed):
        takes = f"one of {list(allowed)}" if allowed else "no argument"
        raise ValueError(f"configs/{name}.py takes {takes} after ':', got {arg!r}")


def optim_config(**overrides) -> ml_collections.ConfigDict:
    """The `optim` section: the fields of `r1jax.train.OptimConfig` (AdamW, schedule, clipping)."""
    c = ml_collections.ConfigDict()
    c.learning_rate = 1e-6  # peak learning rate
    c.schedule = "constant"  # "constant" or "cosine" (to 0 at total_steps)
    c.warmup_steps = 0  # linear warmup from 0
    c.total_steps = 0  # for "cosine"; stages that know their step count use that instead
    c.weight_decay = 0.0  # decoupled, on matrices only
    c.b1 = 0.9
    c.b2 = 0.999
    c.eps = 1e-8
    c.max_grad_norm = 1.0  # global-norm clipping (0 = off)
    c.max_skipped_steps = 10  # stop after this many updates in a row skipped (non-finite grads)
    c.update(overrides)
    return c


def optim(
    config: ml_collections.ConfigDict,
    run_steps: int | None = None,
    *,
    steps_later: bool = False,
    from_data: bool = False,
):
    """The typed OptimConfig of a stage config (errors name the optim.* field).

    run_steps: the optimizer steps the stage will take, when it knows them; a "cosine" schedule
    then decays to 0 over exactly those steps (`optim.total_steps` is ignored), so overriding the
    stage's step count on the command line cannot leave the run at learning rate 0.
    steps_later: only checking, for a stage that learns its step count from its data (SFT,
    distillation) and passes it as `run_steps` then: a cosine schedule needs no total_steps here.
    from_data: `run_steps` comes from the data (SFT, distillation): a run no longer than the
    warm-up warms up over a tenth of it (warned) instead of being refused (cosine) or of never
    reaching the learning rate (constant).
    """
    from r1jax.train import OptimConfig

    fields = config.optim.to_dict()
    if steps_later and run_steps is None and fields["schedule"] == "cosine":
        run_steps = fields["warmup_steps"] + 1  # stands in for the count the data will give
    spans_run = run_steps is not None and fields["schedule"] == "cosine"
    if spans_run:
        fields["total_steps"] = run_steps
    if spans_run and run_steps <= fields["warmup_steps"] and not from_data:
        raise ConfigError(
            f"optim.schedule='cosine' needs more optimizer steps than optim.warmup_steps="
            f"{fields['warmup_steps']}; this run takes {run_steps}"
        )
    constant = fields["schedule"] == "constant"
    if (from_data or constant) and run_steps is not None and run_steps <= fields["warmup_steps"]:
        # (an SFT on a small file: its step count comes from the data, not from the config; a
        # short RL run, e.g. student_rl's steps matched to a distillation's) A warm-up as long as
        # the run would leave the decay no step, or end the run still warming up, below the
        # rate, unannounced: a tenth of the run instead.
        log.warning(
            "optim.warmup_steps=%d is as long as this run's %d optimizer steps: warming up over "
            "%d (a tenth of the run), then the %s rate",
            fields["warmup_steps"],
            run_steps,
            run_steps // 10,
            "cosine's decaying" if fields["schedule"] == "cosine" else "constant",
        )
        fields["warmup_steps"] = run_steps // 10
    try:
        return OptimConfig(**fields)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def check_epochs_and_sizes(section: ml_collections.ConfigDict, where: str) -> None:
    """The sizes of a stage that trains on completions (sft, distill): a finite number of epochs
    > 0, rows and lengths > 0, and some built-in examples when it reads those."""
    if not (0 < section.epochs < float("inf")) or min(section.batch_size, section.seq_len) <= 0:
        raise ConfigError(
            f"{where}.epochs (a finite number), {where}.batch_size and {where}.seq_len must be "
            f"> 0, got {section.epochs}, {section.batch_size} and {section.seq_len}"
        )
    if section.get("overflow", "truncate") not in ("truncate", "skip"):
        raise ConfigError(
            f"{where}.overflow must be 'truncate' or 'skip', got {section.overflow!r}"
        )
    if section.get("turns", "all") not in ("all", "last"):
        raise ConfigError(f"{where}.turns must be 'all' or 'last', got {section.turns!r}")
    if section.source == "cold_start" and section.num_examples < 1:
        raise ConfigError(
            f"{where}.num_examples must be >= 1 for the built-in examples, got "
            f"{section.num_examples}"
        )


def builtin_tasks(section: ml_collections.ConfigDict, where: str) -> list:
    """The built-in tasks named by `section.tasks`, with the difficulty knobs of its per-task
    sub-sections (`section.arithmetic`, `section.countdown`). A bad name or knob is a ConfigError
    naming `<where>.tasks`; so is none (the generators fall back to every task, at its default
    knobs), and a `mistake_rate` outside [0, 1]."""
    import math

    if not section.tasks:
        raise ConfigError(f"{where}.tasks must name at least one built-in task")
    rate = section.get("mistake_rate", 0.0)
    if not (isinstance(rate, int | float) and math.isfinite(rate) and 0 <= rate <= 1):
        raise ConfigError(f"{where}.mistake_rate must be in [0, 1], got {rate!r}")
    return [_task_from_section(section, name, f"{where}.tasks") for name in section.tasks]


def _task_from_section(section: ml_collections.ConfigDict, name: str, field: str):
    """Built-in task `name` with the knobs of `section.<name>` (if any); errors name `field`."""
    from r1jax.data import tasks

    knobs = section[name].to_dict() if name in section else {}
    knobs = {k: tuple(v) if isinstance(v, list) else v for k, v in knobs.items()}
    try:
        return tasks.make_task(name, **knobs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{field}: {e}") from e


def data_config(source: str = "arithmetic", template: str = "r1_zero") -> ml_collections.ConfigDict:
    """The `data` section of prompt-driven stages (rl, rejection_sampling, eval)."""
    c = ml_collections.ConfigDict()
    c.source = source  # built-in task ("arithmetic", "countdown") or a .jsonl/.parquet path/glob
    c.template = template  # "r1_zero" (paper template), "chat" (tokenizer template), "plain"
    c.prefill_think = False  # end the prompt with "<think>" so the model starts reasoning
    # template="chat": a system message before the question ("" = none; "r1" = the R1-Zero
    # template's instruction to answer in <think>/<answer> tags, `data.R1_SYSTEM_PROMPT`; any
    # other text as it is). Instruct models are otherwise never told about the format.
    c.system_prompt = ""
    # Text that ends a completion (besides EOS / end of turn): the closing answer tag, and a new
    # "User:" turn, where a base model prompted with the R1-Zero template writes the next exchange.
    c.stop_strings = ("</answer>", "\nUser:")
    # The language the chain of thought should be in (the language-consistency reward's target,
    # rejection sampling's filter) for rows that do not name theirs in a `language` column:
    # "en", "zh", "ja", "ko", "ru" (or "English", "zh-CN", ...).
    c.language = "en"
    c.num_train = 4000  # built-in tasks: distinct training problems generated
    c.num_eval = 256  # held-out problems (built-in tasks: from the held-out split)
    c.eval_source = ""  # file data: held-out file ("" = hold out num_eval rows of source)
    c.prompt_buckets = (64, 128, 256, 512)  # padded prompt lengths (few shapes = few compiles)
    # A prompt longer than the largest bucket: "error" (refused before any model loads, naming
    # it) or "skip" (left out and counted).
    c.prompt_overflow = "error"
    # File data: the column holding each field when the loader does not recognise the dataset's
    # shape ("" = found by shape), and what a malformed JSON line does ("error" or "skip").
    c.field_map = ml_collections.ConfigDict(
        {"prompt": "", "solution": "", "tests": "", "language": ""}
    )
    c.on_bad_json = "error"
    c.arithmetic = ml_collections.ConfigDict(
        {"ops": ("+", "-"), "min_digits": 1, "max_digits": 2}
    )  # difficulty of the built-in task
    c.countdown = ml_collections.ConfigDict({"min_numbers": 3, "max_numbers": 3, "max_target": 100})
    return c


def eval_config(every: int = 0, num_prompts: int = 256) -> ml_collections.ConfigDict:
    """The `eval` section: how checkpoints are scored on held-out prompts (paper defaults)."""
    c = ml_collections.ConfigDict()
    c.every = every  # evaluate every N steps during training (0 = only at the end)
    c.at_start = False  # the RL stage: also evaluate the starting model, logged as step 0
    c.num_prompts = num_prompts  # held-out prompts scored
    c.num_samples = 1  # k samples per prompt (pass@1 averages them; cons@k votes over them)
    c.temperature = 0.6  # the paper's evaluation sampling
    c.top_p = 0.95
    c.max_new_tokens = 128
    # prompts per sampling call; each row draws from its own key, so this changes no sample in
    # float32 (with bfloat16, a differently shaped forward rounds differently: a few differ)
    c.batch_prompts = 64
    return c


REWARD_MODEL_ROWS = ("general", "all")
REWARD_MODEL_READS = ("all", "answer")


def reward_model_config() -> ml_collections.ConfigDict:
    """The `reward_model` section: a learned reward model (R1's last stage), off by default."""
    c = ml_collections.ConfigDict()
    c.path = ""  # HF *ForSequenceClassification folder (num_labels=1) + tokenizer; "" = off
    # Its weight in the total reward. 0 = scored and logged only, on the rows trained anyway: a
    # file's rows without an answer (general prompts) are kept for it only with a weight.
    c.weight = 0.0
    # Which rollouts it scores: "general", the prompts no correctness reward that is on can check
    # (no built-in task, `solution` or `tests` for it: R1's stage 4, where reasoning prompts keep
    # their rule rewards alone), or "all" (the reward model adds to every row's rule rewards).
    c.rows = "general"
    # What of a completion it reads: "all", or "answer", the text after its last </think> (R1
    # judges helpfulness on the summary alone; none when the reasoning never closed).
    c.reads = "all"
    c.mean = 0.0  # the score used is (raw - mean) / std
    c.std = 1.0
    c.batch_size = 16  # rows per scoring batch on device
    c.buckets = (128, 256, 512, 1024, 2048)  # padded lengths (prompt + completion, its tokens)
    c.dtype = "float32"  # parameter and compute dtype ("bfloat16" halves its memory)
    return c


# --------------------------------------------------------------------------------------------------
# Prompt datasets
# --------------------------------------------------------------------------------------------------


def batch_indices(n: int, step: int, size: int, seed: int) -> list[int]:
    """Indices of batch `step` of `size` items drawn from n without replacement per epoch.

    Each epoch is a fresh permutation seeded by (seed, epoch), so the data position is a function of
    the step alone: a resumed run reads exactly the batches an uninterrupted one would.
    """
    import numpy as np

    out, perms = [], {}
    for i in range(step * size, (step + 1) * size):
        epoch, pos = divmod(i, n)
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        out.append(int(perms[epoch][pos]))
    return out


def batches_of(n: int, size: int) -> list[list[int]]:
    """The first n prompt ids in batches of `size` (the last one shorter)."""
    return [list(range(start, min(n, start + size))) for start in range(0, n, size)]


def prompt_batches(batches: Sequence[Sequence[int]], *, desc: str, progress: bool, stoppable: bool):
    """The `batches` of prompt ids (`batches_of`) one at a time, for the loops that sample a
    dataset once (evaluation, rejection sampling): a progress bar in prompts with rate and ETA
    (process 0, when `progress`), and, when `stoppable`, a stop point before each batch, so that
    SIGTERM stops a multi-process run there (`checkpoint.stop_if_preempted`; one process gets
    SIGTERM as Ctrl-C). Loops inside a checkpointing stage (RL's held-out evaluations) are not
    `stoppable`: their run stops at its next checkpoint."""
    import jax
    from tqdm.auto import tqdm

    from r1jax import checkpoint, metrics

    n = sum(len(ids) for ids in batches)
    bar = tqdm(
        total=n,
        desc=desc,
        unit="prompt",
        dynamic_ncols=True,
        mininterval=metrics.bar_interval(),
        disable=not progress or jax.process_index() > 0,
    )
    try:
        for ids in batches:
            if stoppable:
                checkpoint.stop_if_preempted(f"prompt {ids[0]} of {n} ({desc})")
            yield list(ids)
            bar.update(len(ids))
    finally:
        bar.close()


def render_turns(
    turns: list[dict],
    section,
    name: str,
    tokenizer,
    *,
    system: str | None,
    where: str,
    template: str | None = None,
) -> str:
    """`templates.turns_prompt` for a row of the `name` config section (its template, or
    `template`, and its prefill_think), its errors named: a template the tokenizer lacks or
    refuses by the section's field, a conversation that needs the chat template by the row
    (`where`)."""
    from r1jax.data import templates

    try:
        return templates.turns_prompt(
            turns,
            template or section.template,
            tokenizer=tokenizer,
            system=system,
            prefill_think=section.get("prefill_think", False),
        )
    except Exception as e:  # no chat template, or one that refuses these turns
        if not templates.is_conversation(turns) and template is None:
            raise ConfigError(f"{name}.template={section.template!r}: {e}") from None
        if not templates.is_conversation(turns):  # (an answer of a conversation row)
            raise ConfigError(
                f"{where}: an answer of a conversation (several turns, or a system message of "
                f"its own) needs model.path's chat template, which failed: {e}"
            ) from None
        raise ConfigError(
            f"{where}: a conversation of {len(turns)} turns before the answer needs "
            f"model.path's chat template, which failed: {e}"
        ) from None


def log_conversations(count: int, total: int, name: str, template: str) -> None:
    """Say how many of a file's rows are conversations, rendered by the chat template whatever
    `<name>.template` (a no-op when none are, or when that template is the chat one)."""
    if count and template != "chat":
        log.info(
            "%d of %d %s rows are conversations (several turns or their own system message): "
            "rendered with the chat template, the others with %s.template=%r",
            count,
            total,
            name,
            name,
            template,
        )


class PromptSet:
    """Rows of a prompt dataset, templated and tokenised, served in deterministic batches.

    rows:       dataset rows (prompt, solution, task, meta, tests, language, ...)
    token_ids:  tokenised templated prompt of each row
    columns:    {column: [N] values}, what reward functions look up by row id
    stop_token_ids, stop_strings: what ends a completion (EOS / end of turn; `data.stop_strings`
                found in the text, `data.StopStrings`), for the sampler
    Batch b of an epoch is a slice of a permutation seeded by (seed, epoch), so the data position
    is a function of the step number alone and resuming needs nothing more.
    """

    def __init__(self, rows: list[dict], tokenizer, data_config, *, seed: int, split: str = ""):
        from r1jax.data import batching, templates
        from r1jax.data import tokenizer as toks

        self.rows = rows
        # Each kept row's position in `rows` as given (rows with prompts too long may be left out
        # below): what names a prompt in eval_samples.jsonl and seeds its samples.
        self.indices = list(range(len(rows)))
        self.seed = seed
        self.template = data_config.template
        self.prefill_think = data_config.prefill_think
        self.buckets = tuple(data_config.prompt_buckets)
        # A row's turns before its answer, rendered as SFT renders them: one question in the
        # template, a conversation (several turns, its own system message) by the chat template.
        system = templates.system_prompt(data_config.get("system_prompt", ""))
        turns = [templates.turns_before_answer(r) for r in rows]
        questions = [t[0]["content"] for t in turns if not templates.is_conversation(t)]
        if self.template in ("r1_zero", "chat"):
            templates.warn_if_templated(questions, self.template, tokenizer)
        self.prompts = [
            render_turns(
                row_turns,
                data_config,
                "data",
                tokenizer,
                system=system,
                where=rows[i].get("where") or f"row {i}",
            )
            for i, row_turns in enumerate(turns)
        ]
        log_conversations(len(rows) - len(questions), len(rows), "data", self.template)
        self.token_ids = toks.with_leading_specials(
            tokenizer, tokenizer(self.prompts, add_special_tokens=False)["input_ids"]
        )
        longest = max(self.buckets)
        too_long = [i for i, ids in enumerate(self.token_ids) if len(ids) > longest]
        if too_long and data_config.get("prompt_overflow", "error") == "skip":
            log.info(
                "%d of %d %sprompts are longer than the largest of data.prompt_buckets=%s: left "
                "out (data.prompt_overflow='skip')",
                len(too_long),
                len(rows),
                split + " " if split else "",
                self.buckets,
            )
            keep = sorted(set(range(len(rows))) - set(too_long))
            if not keep:
                raise ConfigError(
                    f"every {split + ' ' if split else ''}prompt is longer than the largest of "
                    f"data.prompt_buckets={self.buckets}; add a larger bucket"
                )
            rows = self.rows = [rows[i] for i in keep]
            self.indices = keep
            self.prompts = [self.prompts[i] for i in keep]
            self.token_ids = [self.token_ids[i] for i in keep]
            too_long = []
        if too_long:  # refused now, not when a batch first draws one (steps into a run)
            i = too_long[0]
            raise ConfigError(
                f"{len(too_long)} of {len(rows)} {split + ' ' if split else ''}prompts are "
                f"longer than the largest of "
                f"data.prompt_buckets={self.buckets} ({rows[i].get('where') or f'row {i}'}, "
                f"{len(self.token_ids[i])} tokens "
                f"with the template: {rows[i]['prompt'][:60]!r}...); add a larger bucket, or "
                f"leave them out with --config.data.prompt_overflow=skip"
            )
        try:
            self.pad_id = batching.pad_token_id(tokenizer)
        except ValueError as e:  # (refused before the model loads, not at the first batch)
            raise ConfigError(f"the model's {e}") from None
        # (not "where", a file row's file:line: it names the row in errors, and it moves with the
        # file, where the columns are data the rewards read and a resume checks)
        keys = sorted({k for r in rows for k in r} - {"where"})
        self.columns = {k: [r.get(k) for r in rows] for k in keys}
        # Each prompt's own (a conversation under the chat template opens "<think>\n", a question
        # under r1_zero "<think>": a sample is written with its own, for the SFT that reads it)
        self.prefixes = [
            templates.completion_prefix(self.template, self.prefill_think, p) for p in self.prompts
        ]
        # (whether they open it at all: one for the set, as the reward callback sees completions)
        if len({p.strip() for p in self.prefixes}) > 1:
            raise ConfigError(
                f"the {split + ' ' if split else ''}prompts disagree on whether they open the "
                f"think block: data.template={self.template!r} renders questions one way and the "
                "chat template renders the file's conversations the other; use "
                "--config.data.template=chat (or data.prefill_think, to open it in both)"
            )
        self.completion_prefix = templates.completion_prefix(
            self.template, self.prefill_think, self.prompts[0] if self.prompts else None
        )
        self.stop_token_ids = toks.stop_token_ids(tokenizer)
        self.declared_stop_ids = toks.declared_stop_ids(tokenizer)  # (the model folder's extras)
        self.num_tokens = len(tokenizer)  # ids past it (a padded embedding) are never sampled
        self.stop_strings = toks.StopStrings.for_tokenizer(tokenizer, data_config.stop_strings)
        # Each host templates and tokenises with its own copy of the tokenizer files, which the
        # model folder's check (its weights and config) does not cover: a chat template or
        # tokenizer that differs on one host would mix two prompt formats into every batch.
        check_same_on_every_process(
            f"the {split + ' ' if split else ''}prompts as templated and tokenised, and the stop "
            "ids (the model folder's tokenizer or generation_config.json files, or the "
            "tokenizers library)",
            lambda: [
                self.fingerprint(),
                self.completion_prefix,
                self.stop_token_ids,
                self.num_tokens,
                self.pad_id,
            ],  # fmt: skip
        )

    def __len__(self) -> int:
        return len(self.rows)

    def generate(self, model, ids: Sequence[int], *, batch: int, num_samples: int, **kwargs):
        """`sampling.generate(model, <prompts ids>, **kwargs)` with these prompts' stops, padding
        and buckets, each prompt's samples drawn from its row's own key (`indices`: they depend
        neither on the other prompts of the batch nor on rows left out).

        A batch of fewer than `batch` prompts (a dataset's last) is filled up with copies of its
        last prompt, whose samples are dropped: it runs the program the full batches compiled
        instead of compiling another, and is sharded over a mesh as they are (a length that
        does not divide over the mesh's batch axes runs unsharded, every device holding every
        row's cache). Returns the `GenerateOutput` of `ids`' samples (tokens, log-probs, stop
        reasons; its device arrays include the copies)."""
        from r1jax import sampling

        filled = list(ids) + [ids[-1]] * (batch - len(ids))
        out = sampling.generate(
            model,
            [self.token_ids[i] for i in filled],
            num_samples=num_samples,
            prompt_keys=[self.indices[i] for i in filled],
            stop_token_ids=self.stop_token_ids,
            num_tokens=self.num_tokens,
            stop_strings=self.stop_strings,
            pad_id=self.pad_id,
            buckets=self.buckets,
            **kwargs,
        )
        n = len(ids) * num_samples
        return dataclasses.replace(
            out, tokens=out.tokens[:n], logprobs=out.logprobs[:n], stop_reason=out.stop_reason[:n]
        )

    def fingerprint(self) -> str:
        """The prompts as tokenised with their answer columns, for a run's record."""
        import numpy as np

        answers = json.dumps(self.columns, sort_keys=True, default=str).encode()
        return fingerprint(
            *(np.asarray(ids, np.int32) for ids in self.token_ids),
            np.frombuffer(answers, np.uint8),
        )

    def top_id(self) -> int:
        """The largest token id its batches hold (the prompts' and padding's)."""
        return max([self.pad_id, *(max(ids, default=0) for ids in self.token_ids)])

    def row_ids(self, step: int, size: int) -> list[int]:
        """The `size` row ids of batch `step` (see `batch_indices`)."""
        return batch_indices(len(self.rows), step, size, self.seed)

    def batch(self, row_ids):
        """([P, T] ids, [P, T] mask, [P] row ids) for the given rows, left-padded to a bucket."""
        import numpy as np

        from r1jax.data.batching import batch_prompt_ids

        b = batch_prompt_ids(
            [self.token_ids[i] for i in row_ids], pad_id=self.pad_id, buckets=self.buckets
        )
        return b.input_ids, b.attention_mask, np.asarray(row_ids, np.int32)


def load_prompt_rows(
    data_config, split: str, seed: int, *, require_solution: bool = True
) -> list[dict]:
    """Rows for `split` ("train" or "eval") from a built-in task or a dataset file, each with
    the `language` its chain of thought should be in. `require_solution=False` keeps a file's
    rows without a solution or tests too (general prompts, for a reward model)."""
    rows = _prompt_rows(data_config, split, seed, require_solution)
    check_same_on_every_process(
        f"the {split} rows of data.source={data_config.source!r}", lambda: rows
    )
    for row in rows:  # (a file's rows name their own, or got data.language from the loader)
        row["language"] = row.get("language") or data_config.language
    return rows


def _builtin_task(data_config):
    """The built-in task `data.source` names, with the knobs of its `data.<task>` section."""
    return _task_from_section(data_config, data_config.source, f"data.{data_config.source}")


def _prompt_rows(data_config, split: str, seed: int, require_solution: bool = True) -> list[dict]:
    from r1jax.data import loaders, tasks

    source = data_config.source
    n = data_config.num_train if split == "train" else data_config.num_eval
    if source in tasks.TASKS:
        task = _builtin_task(data_config)
        try:
            return tasks.make_dataset(task, n, seed=seed, split=split)
        except ValueError as e:  # (unique= is the library's argument, no config field)
            message = str(e).replace(", or pass unique=False", "")
            raise ConfigError(
                f"data.num_{'train' if split == 'train' else 'eval'}: {message}"
            ) from e
    held_out_file = split == "eval" and bool(data_config.eval_source)
    path = data_config.eval_source if held_out_file else source
    try:
        # Every process reads all rows: a rollout batch is small and every host feeds the same
        # global batch, of which each device then keeps its own slice.
        field_map = {k: v for k, v in data_config.field_map.items() if v}
        rows, stats = loaders.load_rows(
            path,
            field_map=field_map,
            on_bad_json=data_config.on_bad_json,
            language=data_config.language,
            require_solution=require_solution,
        )
    except (OSError, ValueError) as e:
        field = "eval_source" if held_out_file else "source"
        hint = ""  # the loader names its own arguments; these are their config fields
        if "field_map" in str(e):
            hint = (
                " (from the command line: --config.data.field_map.prompt=COLUMN "
                "--config.data.field_map.solution=COLUMN)"
            )
        elif "on_bad_json" in str(e):
            hint = " (from the command line: --config.data.on_bad_json=skip)"
        raise ConfigError(f"data.{field}: {e}{hint}") from e
    (log.warning if stats.language_defaulted else log.info)(
        "loaded %d rows from %s (%s)", len(rows), path, stats.summary()
    )
    field = "eval_source" if held_out_file else "source"
    if split == "eval" and not data_config.eval_source:
        log.info(
            "held-out prompts: the last %d of the %d rows of %s (data.num_eval; give "
            "data.eval_source to evaluate another file whole)",
            min(n, len(rows)),
            len(rows),
            path,
        )
        rows = rows[-n:]
    elif split == "train" and not data_config.eval_source:
        # The last num_eval rows are held out; training on them too would score the held-out
        # curve (and pick the best checkpoint, or filter rejection samples) on training prompts.
        if len(rows) <= data_config.num_eval:
            raise ConfigError(
                f"data.source {path} has {len(rows)} rows, not more than data.num_eval="
                f"{data_config.num_eval} held out for evaluation, so no training row would be "
                f"left; lower data.num_eval, or give the held-out rows as data.eval_source"
            )
        if require_solution:
            log.info(
                "training prompts: the first %d of the %d rows of %s (the last data.num_eval=%d "
                "are held out for evaluation)",
                len(rows) - data_config.num_eval,
                len(rows),
                path,
                data_config.num_eval,
            )
            held_out, rows = rows[-data_config.num_eval :], rows[: -data_config.num_eval]
        else:  # the evaluation's rows are the last of those with answers; every other row trains
            log.info(
                "training prompts: the %d rows of %s but the last data.num_eval=%d of those with "
                "an answer (held out for evaluation)",
                len(rows),
                path,
                data_config.num_eval,
            )
            try:
                held_out = _prompt_rows(data_config, "eval", seed)
            except ConfigError as e:
                raise ConfigError(
                    f"data.source {path}: no held-out rows with an answer to evaluate on ({e}); "
                    "give them as data.eval_source"
                ) from None
    elif split == "train":
        held_out = _prompt_rows(data_config, "eval", seed)
    if split == "train":
        rows = _without_held_out(rows, held_out, path)
    _check_builtin_task_rows(rows, path, field)  # the rows used (1M Countdown rows: ~13 s)
    return rows


def _without_held_out(rows: list[dict], held_out: list[dict], path: str) -> list[dict]:
    """Training rows whose prompt is not also a held-out prompt (datasets repeat rows: the
    held-out score would count problems trained on)."""
    from r1jax.data import templates

    def key(row: dict) -> str:  # what the model is asked: a conversation's every turn
        turns = templates.turns_before_answer(row)
        if not templates.is_conversation(turns):
            return " ".join(turns[0]["content"].split())
        return json.dumps([[t["role"], " ".join(t["content"].split())] for t in turns])

    seen = {key(r) for r in held_out}
    kept = [r for r in rows if key(r) not in seen]
    if len(kept) < len(rows):
        log.info(
            "training prompts: %d of the %d rows of %s left out, their prompt being also a "
            "held-out one",
            len(rows) - len(kept),
            len(rows),
            path,
        )
    if not kept:
        raise ConfigError(f"data.source {path}: every training prompt is also a held-out one")
    return kept


def _check_builtin_task_rows(rows: list[dict], path: str, field: str) -> None:
    """A file row naming a built-in task (`task: countdown`) is scored by that task's verifier,
    which needs what the task's own rows carry (Countdown's `meta` numbers, an integer answer):
    check now, with the row's own solution, rather than crash at the first answer the model
    writes for it."""
    from r1jax.data import tasks

    for i, row in enumerate(rows):
        name = row.get("task")
        if name not in tasks.TASKS:
            continue
        try:
            ok = tasks.verify(name, str(row.get("solution")), row)
        except Exception as e:  # the verifier's own error, whatever the row lacks
            ok, why = False, f"{type(e).__name__}: {e}"
        else:
            why = "its solution does not pass the verifier"
        if not ok:
            raise ConfigError(
                f"data.{field} {row.get('where') or f'{path}, row {i}'}: task {name!r} is a "
                f"built-in task, whose reward cannot check this row ({why}); write such rows as "
                f"the built-in datasets do (r1jax.data.tasks.make_dataset) or give the task "
                f"column another name"
            )


def completion_data_fields(section: ml_collections.ConfigDict) -> None:
    """Add the file-data fields of a stage that trains on completions (sft, distill)."""
    # The column holding each field, for files whose columns have other names ("" = found by
    # shape: prompt/completion, chat messages, Alpaca's instruction/input/output, TRL's
    # conversational rows), and what a malformed JSON line does ("error" or "skip").
    section.field_map = ml_collections.ConfigDict({"prompt": "", "completion": "", "messages": ""})
    section.on_bad_json = "error"
    # An example longer than seq_len: "truncate" (its completion's end is cut: a long chain of
    # thought then trains without its answer and EOS) or "skip" (left out and counted).
    section.overflow = "truncate"
    # A conversation's assistant turns before its answer: "all" trains each (with text) as an
    # example of its own, after the turns before it as the chat template renders them when the
    # model answers there (R1's drops earlier turns' reasoning); "last": they are context only.
    # (Rejection sampling's rows, `source: reasoning`: context only either way; the model
    # sampled and was graded on the last answer alone.)
    section.turns = "all"


def load_completion_rows(
    path: str, keep=("completion",), field_map=None, on_bad_json: str = "error"
) -> tuple[list[dict], Any]:
    """(rows, stats) of an SFT-style file: prompt/completion pairs or chat `messages`.

    Files in a shape the loaders recognise (e.g. what `rejection_sampling` writes: prompt,
    solution, completion) load as such; plain prompt/completion rows have no answer column to
    recognise a shape by, so they load as the "generic" shape with the solution left empty (each
    file of a glob on its own). `field_map`: field -> column ("" = by shape), `completion`
    included.
    """
    from r1jax.data import loaders

    columns = {k: v for k, v in (field_map or {}).items() if v}
    completion = columns.pop("completion", "completion")
    keep = tuple(completion if k == "completion" else k for k in keep)
    rows, stats = loaders.load_rows(
        path,
        require_solution=False,
        keep=keep,
        field_map=columns,
        on_bad_json=on_bad_json,
        fallback_shape="generic",
    )
    check_same_on_every_process(f"the rows of {path}", lambda: rows)
    if completion != "completion" and all(row.get(completion) is None for row in rows):
        # (else every row was refused for want of a completion, and the hint named field_map)
        raise ValueError(
            f"{path}: field_map {{'completion': {completion!r}}} names a column no row of the "
            "file has a value in"
        )
    for row in rows:
        if completion != "completion":
            row["completion"] = row.pop(completion, None)
        answer = loaders.parse_messages(row["completion"]) if row["completion"] else None
        if answer and [m["role"] for m in answer] == ["assistant"]:
            row["completion"] = answer[0]["content"]  # TRL's conversational rows: one message
    return rows, stats


def check_data_files(pattern: str, field: str, alternatives: str = "") -> None:
    """Refuse, before any model is loaded, a data path that names no file: missing, a glob
    matching nothing, or only folders (a folder is not read, but for one `datasets` saved;
    `folder/*.parquet` is)."""
    from r1jax.data import loaders

    try:
        loaders.expand_paths(pattern)  # as the loader will read it
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{field}: {e} ({field} must be {alternatives}a file or a glob)") from e


def validate_data(data_config) -> None:
    from r1jax.data import tasks
    from r1jax.rewards.language import normalize_language

    check_prompt_format(data_config, "data")
    try:
        normalize_language(data_config.language)
    except ValueError as e:
        raise ConfigError(f"data.language: {e}") from None
    source = data_config.source
    if source not in tasks.TASKS:
        check_data_files(source, "data.source", f"a built-in task {sorted(tasks.TASKS)} or ")
    else:
        _builtin_task(data_config)  # its knobs (min_digits > max_digits ...), before any work
    if data_config.eval_source:
        check_data_files(data_config.eval_source, "data.eval_source")
        if source in tasks.TASKS:
            raise ConfigError(
                f"data.eval_source={data_config.eval_source!r} holds out a file's rows, but "
                f"data.source={source!r} is a built-in task, which holds out its own problems; "
                "give data.source as a file too, or evaluate the file with data.source"
            )
    stops = data_config.get("stop_strings", ())
    if not isinstance(stops, tuple | list) or not all(isinstance(s, str) and s for s in stops):
        raise ConfigError(f"data.stop_strings must be non-empty strings, got {stops!r}")
    if data_config.get("prompt_overflow", "error") not in ("error", "skip"):
        raise ConfigError(
            f"data.prompt_overflow must be 'error' or 'skip', got {data_config.prompt_overflow!r}"
        )
    if data_config.num_eval < 1 or data_config.num_train < 1:
        raise ConfigError("data.num_train and data.num_eval must be >= 1")
    if data_config.on_bad_json not in ("error", "skip"):
        raise ConfigError(
            f"data.on_bad_json must be 'error' or 'skip', got {data_config.on_bad_json!r}"
        )
    buckets = tuple(data_config.prompt_buckets)
    if not buckets or not all(isinstance(b, int) and b >= 1 for b in buckets):
        raise ConfigError(
            f"data.prompt_buckets must be prompt lengths in tokens (integers >= 1), got {buckets!r}"
        )


def warn_past_positions(config: ml_collections.ConfigDict, budgets: dict[str, int]) -> None:
    """Warn when the longest prompt bucket and a sampling budget (`budgets`: {field: tokens})
    reach past the positions model.path was trained on (its config.json's
    max_position_embeddings, times a rope_scaling factor): RoPE then extrapolates, unannounced.
    Read without loading the model; the toy base's only once built."""
    path = config.model.path
    path = toy_base_path() if path == TOY_BASE else os.path.expanduser(path)
    try:
        with open(os.path.join(path, "config.json")) as f:
            raw = json.load(f)
        limit = int(raw["max_position_embeddings"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # (no folder yet, or another layout: the load names what is wrong)
    scaling = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    factor = scaling.get("factor") if isinstance(scaling, dict) else None
    if isinstance(factor, int | float) and factor > 1:
        limit = int(limit * factor)
    longest = max(config.data.prompt_buckets)
    for field, budget in budgets.items():
        if longest + budget > limit:
            log.warning(
                "data.prompt_buckets' longest %d + %s=%d = %d positions, past the %d that "
                "model.path was trained on (max_position_embeddings): tokens past them sample "
                "with positions it never saw",
                longest,
                field,
                budget,
                longest + budget,
                limit,
            )


def check_prompt_format(section, name: str) -> None:
    """`<name>.template`, `prefill_think` and `system_prompt` (the data, sft and distill
    sections): a known template, a prefill only where the prompt ends in the model's turn, a
    system message only with the chat template (the others have no system turn)."""
    from r1jax.data import templates

    if section.template not in templates.TEMPLATES:
        raise ConfigError(
            f"{name}.template must be one of {templates.TEMPLATES}, got {section.template!r}"
        )
    if section.template == "plain" and section.get("prefill_think"):
        raise ConfigError(
            f"{name}.prefill_think needs a template that ends in the model's turn ('r1_zero' or "
            f"'chat'); {name}.template='plain' passes the question unchanged"
        )
    if section.get("system_prompt") and section.template != "chat":
        raise ConfigError(
            f"{name}.system_prompt is a chat template's system message; it needs "
            f"{name}.template='chat' (the {section.template!r} template has no system turn)"
        )


def sandbox_config() -> ml_collections.ConfigDict:
    """`config.sandbox`: the limits generated code runs under (the code reward, and grading code
    rows in eval and rejection sampling); the fields of `rewards.SandboxConfig` that have a
    value by default."""
    import dataclasses

    from r1jax.rewards.sandbox import SandboxConfig

    return ml_collections.ConfigDict(
        {f.name: f.default for f in dataclasses.fields(SandboxConfig) if f.default is not None}
    )


def reward_pool_options(config) -> dict[str, Any]:
    """`config.reward_pool` as `rewards.build_reward_fn`'s `num_workers` and `timeout_s` (the
    library's defaults for a config without the section); a ConfigError names a bad value."""
    pool = config.get("reward_pool") if config is not None else None
    if pool is None:
        return {}
    workers, timeout = pool.workers, pool.timeout_s
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < -1:
        raise ConfigError(
            f"reward_pool.workers must be an integer >= -1 (-1 = the cores, at most 16; 0 = "
            f"score in the trainer's process), got {workers!r}"
        )
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 <= timeout < 1e9:
        raise ConfigError(
            f"reward_pool.timeout_s must be a number of seconds per sample >= 0 (0 = no "
            f"deadline), got {timeout!r}"
        )
    return {"num_workers": None if workers == -1 else workers, "timeout_s": float(timeout)}


def sandbox_options(config) -> dict[str, Any]:
    """`config.sandbox` as `code_reward`'s `sandbox=` dict, checked: a ConfigError names a bad
    value, and code that would have to run where bubblewrap cannot sandbox it is refused here,
    before any sampling, unless `sandbox.allow_unsandboxed` accepts the risk."""
    from r1jax.rewards import sandbox

    options = config.sandbox.to_dict() if "sandbox" in config else {}
    try:
        cfg = sandbox.SandboxConfig(**options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"sandbox: {e}".replace("SandboxConfig.", "sandbox.")) from e
    if not cfg.allow_unsandboxed:
        problem = sandbox._bwrap_problem(sandbox._interpreter(cfg.python))
        if problem is not None:
            raise ConfigError(
                f"this run executes generated code, and bubblewrap cannot sandbox it here: "
                f"{problem}. Install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap), or "
                "accept the risk with --config.sandbox.allow_unsandboxed=True (rlimits and a "
                "private uid only)"
            )
    # A trivial program under these very limits: bubblewrap itself needs ~10 open files (and 3
    # processes before Linux 5.14), so e.g. max_open_files=8 would fail every run and train on a
    # code reward of 0.
    trial = sandbox.run_python("print(6 * 7)", cfg=dataclasses.replace(cfg, timeout_s=30.0))
    if trial.stdout != b"42\n":
        raise ConfigError(
            f"sandbox: a program that prints 42 fails under these limits (exit "
            f"{trial.returncode}: {trial.stderr.decode(errors='replace').strip()[-300:]!r}); "
            "raise sandbox.max_open_files (bubblewrap uses ~10), max_processes or memory_bytes"
        )
    return options


def validate_eval(section) -> None:
    """Refuse an `eval` section (`eval_config`) that cannot work; errors name the field."""
    for field in ("num_prompts", "num_samples", "max_new_tokens", "batch_prompts"):
        if not isinstance(section[field], int) or section[field] < 1:
            raise ConfigError(f"eval.{field} must be an integer >= 1, got {section[field]!r}")
    if section.every < 0:
        raise ConfigError(f"eval.every must be >= 0 (0 = only at the end), got {section.every}")
    check_sampling(section, "eval")


def check_sampling(section: ml_collections.ConfigDict, name: str) -> None:
    """Refuse `name`'s temperature and top_p as the sampler would, naming the fields."""
    from r1jax import sampling

    try:
        sampling.SamplingConfig(temperature=section.temperature, top_p=section.top_p)
    except ValueError as e:
        raise ConfigError(f"{name}.{e}") from None


def validate_reward_model(section) -> None:
    """Refuse a `reward_model` section that cannot work (errors name the field)."""
    import math

    if not section.path:
        if section.weight != 0:
            raise ConfigError(
                f"reward_model.weight={section.weight} but reward_model.path is empty; give the "
                "reward model's checkpoint folder"
            )
        return
    if not os.path.isdir(os.path.expanduser(section.path)):
        raise ConfigError(f"reward_model.path {section.path!r} is not a folder")
    from r1jax.models import hf
    from r1jax.rewards import reward_model

    path = os.path.expanduser(section.path)
    try:  # its config.json and tokenizer, before the policy loads
        raw, _ = reward_model.check_config(path)
        vocab, tokenizer = hf.config_from_hf(raw).vocab_size, hf.tokenizer(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"reward_model.path: {e}") from None
    # (any of its ids can occur: the template's markers, the policy's text tokenised anew)
    top = max(tokenizer.get_vocab().values())
    check_token_ids(vocab, tokenizer, top, "the reward model's tokenizer", "reward_model.path")
    if section.get("reads", "all") not in REWARD_MODEL_READS:
        raise ConfigError(
            f"reward_model.reads must be one of {REWARD_MODEL_READS}, got {section.reads!r}"
        )
    if section.get("rows", "general") not in REWARD_MODEL_ROWS:
        raise ConfigError(
            f"reward_model.rows must be one of {REWARD_MODEL_ROWS}, got {section.rows!r}"
        )
    if not (math.isfinite(section.weight) and section.weight >= 0):
        raise ConfigError(  # (as the rule rewards' weights)
            f"reward_model.weight must be finite and >= 0, got {section.weight}: a higher score "
            "is what is wanted, and a negative weight would train away from it"
        )
    if not (math.isfinite(section.mean) and math.isfinite(section.std) and section.std > 0):
        raise ConfigError("reward_model.mean must be finite and reward_model.std > 0")
    if section.batch_size < 1 or not section.buckets or min(section.buckets) < 1:
        raise ConfigError("reward_model.batch_size and every reward_model.buckets must be >= 1")
    if section.dtype not in ("float32", "bfloat16"):
        raise ConfigError(
            f"reward_model.dtype must be 'float32' or 'bfloat16', got {section.dtype!r}"
        )
