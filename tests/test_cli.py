"""The command line itself, as a user runs it (`python -m r1jax.launch ...` in a subprocess):
config errors refused before any work, `--help`, and a GRPO run killed with SIGKILL then rerun
with the same command, which must end exactly where an uninterrupted run ends (and, once its
checkpoint is damaged, stop with one line naming it).
"""

import importlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import ml_collections
import numpy as np
import pytest
import stage_helpers as sh
from etils.epath import backend
from fake_gcs import fake_gcs  # noqa: F401  (fixture)

from r1jax import metrics, paths, sharding
from r1jax.launch import STAGES
from r1jax.models import hf
from r1jax.stages import common


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    with sh.toy_home(tmp_path_factory) as home_and_workdir:
        yield home_and_workdir


def run_cli(args, env, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(
        sh.launch_cmd(*args), env=env, cwd=sh.REPO, capture_output=True, text=True, timeout=timeout
    )


def start_cli(args, env) -> subprocess.Popen:
    """`run_cli` started, not waited for (several interpreters at once)."""
    return subprocess.Popen(
        sh.launch_cmd(*args),
        env=env,
        cwd=sh.REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


# --------------------------------------------------------------------------------------------------
# Config errors and --help
# --------------------------------------------------------------------------------------------------

CONFIG_ERRORS = {
    # override -> what the one message must name
    "logprob_chunk_zero": (["--config.rl.logprob_chunk_size=0"], ["rl.logprob_chunk_size"]),
    "unknown_key": (["--config.rl.bogus=1"], ["rl.bogus"]),
    "wrong_type": (["--config.rl.steps=abc"], ["rl.steps", "abc"]),
    "batch_not_divisible_by_mesh": (
        ["--config.rl.prompts_per_step=3", "--config.rl.num_generations=3"],
        ["rl.prompts_per_step", "rl.num_generations", "8 batch shards"],
    ),
    "bad_loss_type": (["--config.rl.loss_type=ppo"], ["rl.loss_type", "ppo"]),
    "expert_axis_not_dividing_devices": (
        ["--config.mesh.expert=3"],
        ["mesh.expert=3", "8 devices"],
    ),
    "router_bias_rate_on_a_dense_model": (
        ["--config.model.router_bias_rate=0.001"],
        ["model.router_bias_rate=0.001", "DeepSeek-V3", "toy base model"],
    ),
    "capacity_factor_on_a_dense_model": (
        ["--config.model.capacity_factor=1.25"],
        ["model.capacity_factor=1.25", "DeepSeek", "toy base model"],
    ),
    "mistyped_config_file": (["--config=configs/rll.py"], ["--config=configs/rll.py", "no such"]),
    "pipeline_config": (["--config=configs/pipeline.py"], ["not a config", "--stage=pipeline"]),
    # NaN passed every `x < 0` check: a NaN model exported with exit 0, a traceback from the loss.
    "nan_weight_decay": (["--config.optim.weight_decay=nan"], ["optim.weight_decay", "nan"]),
    "nan_beta": (["--config.rl.beta=nan"], ["rl.beta", "finite", "nan"]),
    "task_knobs": (  # (refused only once the stage ran, after its workdir was made)
        ["--config.data.arithmetic.min_digits=5", "--config.data.arithmetic.max_digits=2"],
        ["data.arithmetic", "min_digits <= max_digits"],
    ),
    # Without a stage absl called every override an unknown flag, as if the field did not exist.
    "missing_stage": (["--config.rl.steps=3"], ["--stage is missing", "rl"]),
    "misspelt_stage": (["--stage=rll", "--config.rl.steps=3"], ["--stage=rll is not a stage"]),
}


def test_config_file_and_model_folder_mistakes_are_one_line(tmp_path):
    """A --config file's misspelt field was a new field, silently unused (exit 0); a wrong-typed
    value passed validation and failed in the training loop; a file that did not load was a
    traceback; and a model.path that is not a model folder (a run's workdir, an empty folder)
    blamed "no usable tokenizer files" or was a traceback from transformers."""

    def config_file(stage, line):  # configs/<stage>.py with one more line before its return
        with open(os.path.join(sh.REPO, "configs", f"{stage}.py")) as f:
            text = f.read()
        assert text.count("    return config\n") == 1
        return text.replace("    return config\n", f"    {line}\n    return config\n")

    files = {
        "misspelt": config_file("eval", "config.eval.num_sample = 64"),
        "float_for_int": config_file("rl", "config.rl.prompts_per_step = 2.0"),
        "syntax": "def get_config(:\n",
    }
    cases = {
        name: (
            [
                f"--stage={'rl' if name == 'float_for_int' else 'eval'}",
                f"--config={tmp_path / name}.py",
            ],
            words,
        )
        for name, words in (
            ("misspelt", ["unknown field eval.num_sample (did you mean eval.num_samples?)"]),
            ("float_for_int", ["line ", "prompts_per_step", "2.0", "float"]),
            ("syntax", ["line 1", "SyntaxError"]),
        )
    }
    for name, text in files.items():
        (tmp_path / f"{name}.py").write_text(text)
    (tmp_path / "empty_model").mkdir()
    cases["empty_model"] = (
        ["--stage=eval", f"--config.model.path={tmp_path / 'empty_model'}"],
        ["has no config.json; is it a Hugging Face checkpoint folder?"],
    )
    env = sh.cli_env(str(tmp_path / "empty_home"))
    procs = {
        name: start_cli([*args, f"--workdir={tmp_path / ('w_' + name)}"], env)
        for name, (args, _) in cases.items()
    }
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=600)
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode != 0 and "Traceback" not in err, (name, err)
        assert all(w in lines[-1] for w in cases[name][1]), (name, err)  # (after "stage eval")
        assert sum(line.startswith(("error", "config error")) for line in lines) == 1, (name, err)


def test_config_errors_are_refused_before_any_work(tmp_path):
    # All at once: each is a fresh interpreter, and they must not reach the model anyway.
    env = sh.cli_env(str(tmp_path / "empty_home"))
    procs = {}
    for name, (overrides, _) in CONFIG_ERRORS.items():
        stage = [] if name.endswith("_stage") else ["--stage=rl"]
        args = [*stage, f"--workdir={tmp_path / name}", *overrides]
        procs[name] = start_cli(args, env)
    import resource

    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode != 0, f"{name}: exited 0\n{err}"
        lines = [line for line in err.splitlines() if line.strip()]
        assert "Traceback" not in err, f"{name}: a traceback instead of a message\n{err}"
        assert lines and all(word in lines[0] for word in CONFIG_ERRORS[name][1]), (name, err)
        assert len(lines) <= 2, f"{name}: more than one message\n{err}"
        assert out == ""
        # Refused before any work: no workdir, no toy base model trained.
        assert not (tmp_path / name).exists(), name
    assert not (tmp_path / "empty_home").exists()
    # Imports only, no compilation: judged by the children's CPU seconds (~2-6 s each here),
    # which the machine's load does not stretch as it does wall time (16 interpreters on 2
    # shared cores took 80-134 s of wall time under load).
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    used = (cpu.ru_utime + cpu.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    assert used < 15 * len(procs), used


def test_the_stage_may_come_from_a_flagfile(tmp_path):
    """`--flagfile` holding `--stage` with overrides on the command line: the stage's config file
    was not added, and every override was called an unknown flag."""
    from r1jax import launch

    flags = tmp_path / "flags.txt"
    flags.write_text("# eval, smaller\n--stage=eval\n\n--config.eval.num_prompts=2\n")
    argv = launch._with_flagfiles(["x", f"--flagfile={flags}", "--config.seed=1"])
    assert argv == ["x", "--stage=eval", "--config.eval.num_prompts=2", "--config.seed=1"]
    argv = launch._with_default_config(argv)
    assert argv[1] == f"--config={os.path.join(launch.CONFIG_DIR, 'eval.py')}"
    # "--flagfile F" as absl reads it; a flagfile naming itself ends (a RecursionError).
    loop = tmp_path / "loop.txt"
    loop.write_text(f"--stage=eval\n--flagfile={loop}\n")
    assert launch._with_flagfiles(["x", "--flagfile", str(loop)]) == ["x", "--stage=eval"]
    # A --config in a flagfile is the config (--help listed the default's fields; a missing
    # file there, or a missing flagfile, was a 40-line traceback).
    outer = tmp_path / "outer.txt"
    outer.write_text(f"--flagfile={flags}\n--config={tmp_path / 'mine.py'}\n")
    env = sh.cli_env("/nonexistent")
    out = run_cli([f"--flagfile={outer}", "--help"], env)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert f"config error: --config={tmp_path / 'mine.py'}: [Errno 2] No such file" in out.stderr
    out = run_cli([f"--flagfile={tmp_path / 'none'}", "--stage=eval"], env)
    assert out.returncode == 1 and out.stderr.strip().splitlines() == [
        f"error: --flagfile={tmp_path / 'none'}: No such file or directory"
    ], out.stderr


def test_help_lists_stages_and_config_fields():
    env = sh.cli_env("/nonexistent")
    out = run_cli(["--help"], env)
    assert out.returncode == 0 and all(stage in out.stdout for stage in STAGES)
    out = run_cli(["--stage=rl", "--help"], env)
    assert out.returncode == 0
    for field in (
        "rl.loss_type = 'grpo'",
        "rl.num_generations = 8",
        "ckpt.every",
        "mesh.fsdp",
        "rewards.format",
        "data.source",
        "optim.learning_rate",
    ):
        assert field in out.stdout, field
    # --help describes the config actually chosen, argument included.
    out = run_cli(["--stage=pipeline", "--config=configs/pipeline.py:smoke", "--help"], env)
    assert out.returncode == 0 and "r1_zero.rl.steps = 2 (int)" in out.stdout
    # A config file that does not load is one message there too (it was a traceback).
    out = run_cli(["--stage=rl", "--config=configs/rll.py", "--help"], env)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "config error: --config=configs/rll.py" in out.stderr


def test_a_cosine_schedule_spans_the_stage_steps_given_on_the_command_line():
    """`--config.pretrain.steps=2400` must not leave the second half at learning rate 0 because
    the config's optim.total_steps still says 1200."""
    from r1jax import train

    config = sh.load_config("pretrain")
    sh.set_fields(config, {"pretrain.steps": 2400})
    assert config.optim.schedule == "cosine" and config.optim.total_steps == 1200
    lr = train.learning_rate_schedule(common.optim(config, config.pretrain.steps))
    assert float(lr(1800)) > 0.1 * config.optim.learning_rate
    assert float(lr(2400)) == pytest.approx(0.0, abs=1e-9)
    constant = sh.load_config("rl")
    assert common.optim(constant, 7) == common.optim(constant)  # only a cosine is stretched
    # Validation judges the same schedule the run will build: GRPO's μ optimizer steps per step
    # count, and a run too short for its warmup is refused up front, naming its length.
    from r1jax.stages import rl as rl_stage

    rl = sh.load_config("rl")
    sh.set_fields(rl, {"optim.schedule": "cosine", "rl.num_iterations": 2})
    rl_stage.validate(rl)  # optim.total_steps is 0 in the config; the run takes 160
    assert common.optim(rl, rl_stage.optimizer_steps(rl)).total_steps == 160
    # SFT and distillation learn their step count from the data: no total_steps to demand.
    for stage in ("sft", "distill"):
        tuned = sh.load_config(stage)
        sh.set_fields(tuned, {"optim.schedule": "cosine", "optim.total_steps": 0})
        common.validate(tuned, stage)
    sh.set_fields(config, {"pretrain.steps": 30})
    with pytest.raises(common.ConfigError, match="warmup_steps=50; this run takes 30"):
        common.validate(config, "pretrain")
    # The copy-task warm-up has its own optimizer phase: the corpus's schedule is unchanged.
    sh.set_fields(config, {"pretrain.copy_warmup_steps": 40})
    with pytest.raises(common.ConfigError, match="warmup_steps=50; this run takes 30"):
        common.validate(config, "pretrain")
    sh.set_fields(config, {"pretrain.steps": 600, "pretrain.copy_warmup_lr": 0.0})
    with pytest.raises(common.ConfigError, match="pretrain.copy_warmup_lr must be > 0"):
        common.validate(config, "pretrain")
    sh.set_fields(config, {"pretrain.copy_warmup_lr": 1e-3})
    common.validate(config, "pretrain")
    sh.set_fields(config, {"pretrain.tag_names": "random"})
    with pytest.raises(common.ConfigError, match="pretrain.tag_names must be one of"):
        common.validate(config, "pretrain")
    sh.set_fields(config, {"pretrain.tag_names": "composed"})
    sh.set_fields(config, {"pretrain.copy_warmup_steps": -1})
    with pytest.raises(common.ConfigError, match="pretrain.copy_warmup_steps must be >= 0"):
        common.validate(config, "pretrain")
    sh.set_fields(config, {"pretrain.copy_warmup_steps": 40, "pretrain.seq_len": 32})
    with pytest.raises(common.ConfigError, match="needs pretrain.seq_len >= 33"):
        common.validate(config, "pretrain")
    sh.set_fields(config, {"pretrain.copy_warmup_steps": 0})
    sh.set_fields(config, {"pretrain.copy_rows_in_corpus": 2})
    with pytest.raises(common.ConfigError, match="copy_rows_in_corpus needs pretrain.seq_len"):
        common.validate(config, "pretrain")
    sh.set_fields(config, {"pretrain.seq_len": 256, "pretrain.copy_rows_in_corpus": 16})
    with pytest.raises(common.ConfigError, match=r"copy_rows_in_corpus must be in \[0, "):
        common.validate(config, "pretrain")
    sh.set_fields(config, {"pretrain.copy_rows_in_corpus": 2, "pretrain.tag_copy_every": -1})
    with pytest.raises(common.ConfigError, match="tag_copy_every must be >= 0"):
        common.validate(config, "pretrain")
    sh.set_fields(config, {"pretrain.tag_copy_every": 100, "pretrain.copy_task": "shuffle"})
    with pytest.raises(common.ConfigError, match="pretrain.copy_task must be one of"):
        common.validate(config, "pretrain")
    sh.set_fields(config, {"pretrain.copy_task": "repeat", "pretrain.tag_copy_restarts": -1})
    with pytest.raises(common.ConfigError, match="tag_copy_restarts must be >= 0"):
        common.validate(config, "pretrain")
    sh.set_fields(config, {"pretrain.tag_copy_restarts": 2, "pretrain.tag_copy_deadline": 600})
    with pytest.raises(common.ConfigError, match=r"tag_copy_deadline must be in \[0, pretrain.ste"):
        common.validate(config, "pretrain")
    sh.set_fields(config, {"pretrain.tag_copy_deadline": 0, "pretrain.copy_warmup_steps": 0})
    with pytest.raises(common.ConfigError, match="tag_copy_deadline=0 checks at the end of the"):
        common.validate(config, "pretrain")
    sh.set_fields(config, {"pretrain.tag_copy_restarts": 0})  # no restarts: no deadline
    common.validate(config, "pretrain")


def test_automatic_micro_batches_keep_a_few_rows_per_shard_and_bad_counts_are_named():
    import jax

    config = sh.load_config("rl")
    assert config.rl.num_micro_batches == 0  # automatic
    ways = common.batch_ways(config, jax.device_count())
    for rows in (64 * ways, 16 * ways, 4 * ways, ways):
        k = common.micro_batches(config, "rl", rows)
        assert rows % (k * ways) == 0
        assert rows // (k * ways) == min(rows // ways, common.CPU_MICRO_BATCH_ROWS)
    config.rl.num_micro_batches = 3
    with pytest.raises(common.ConfigError, match=r"rl.num_micro_batches=3 must split the 64 rows"):
        common.micro_batches(config, "rl", 64)
    config.rl.num_micro_batches = -1
    with pytest.raises(common.ConfigError, match=r"rl.num_micro_batches must be >= 0"):
        common.micro_batches(config, "rl", 64)


def test_bnpo_does_not_let_the_hardware_pick_its_objective():
    """bnpo divides by each micro-batch's token count, so the automatic count (several on a CPU,
    one on an accelerator) would give the same config two objectives: it must be chosen."""
    from r1jax.stages import rl as rl_stage

    config = sh.load_config("rl")
    config.rl.loss_type = "bnpo"
    assert common.micro_batches(config, "rl", 64) > 1  # the CPU default splits the default step
    with pytest.raises(common.ConfigError, match=r"rl.loss_type='bnpo'.*rl.num_micro_batches"):
        rl_stage.validate(config)
    config.rl.num_micro_batches = 1
    rl_stage.validate(config)
    config.rl.loss_type, config.rl.num_micro_batches = "dapo", 0
    rl_stage.validate(config)


def test_mesh_expert_and_router_bias_rate_reach_a_deepseek_model(monkeypatch, tmp_path):
    from test_deepseek import checkpoint as deepseek_checkpoint

    config = sh.load_config("rl")
    config.model.path = deepseek_checkpoint("v3")
    config.model.router_bias_rate = 0.01
    config.mesh.expert = 2
    config.mesh.fsdp = -1
    common.validate(config, "rl")
    assert common.mesh_sizes(config, 8) == {"data": 1, "fsdp": 4, "tensor": 1, "expert": 2}
    assert common.batch_ways(config, 8) == 8  # rows split over data * fsdp * expert

    monkeypatch.setattr(hf, "tokenizer", lambda path: None)  # the test checkpoint has none
    mesh = common.make_mesh(config)
    model, _ = common.load_model(config, mesh)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 1, "expert": 2}
    assert model.cfg.router_bias_rate == 0.01
    assert model.cfg.capacity_factor is None  # 0: dropless
    moe_block = next(b for b in model.layers if hasattr(b.mlp, "gate_edm"))
    spec = moe_block.mlp.gate_edm[...].sharding.spec
    assert spec[0] == "expert", spec  # routed experts split over the expert axis
    # A capacity limit (no config field reached it: every DeepSeek run computed E/K times the
    # routed experts' work, 32x for V3), for the policy and a frozen model (reference) alike.
    config.model.capacity_factor = 1.25
    common.validate(config, "rl")
    for frozen in (False, True):
        model, _ = common.load_model(config, mesh, frozen=frozen)
        assert model.cfg.capacity_factor == 1.25
        assert model.cfg.router_bias_rate == (0.0 if frozen else 0.01)
    config.model.capacity_factor = float("nan")
    with pytest.raises(common.ConfigError, match=r"capacity_factor must be a finite number >= 0"):
        common.validate(config, "rl")
    config.model.capacity_factor = 0.0

    # A DeepSeek-V2 router has no load-balancing bias: refused, naming the field.
    config.model.path = deepseek_checkpoint("v2")
    with pytest.raises(common.ConfigError, match=r"model.router_bias_rate=0.01 only applies"):
        common.validate(config, "rl")
    config.model.router_bias_rate = -1.0
    with pytest.raises(common.ConfigError, match=r"router_bias_rate must be a finite number >= 0"):
        common.validate(config, "rl")
    config.model.router_bias_rate = 0.0
    config.mesh.expert, config.mesh.fsdp = 2, 2
    with pytest.raises(common.ConfigError, match=r"mesh.data=1 \* mesh.fsdp=2 .* 8 devices"):
        common.validate(config, "rl")
    # An expert axis that does not divide the routed experts: the load warned "replicated
    # instead", then the first step failed with a traceback.
    six = tmp_path / "six_experts"
    shutil.copytree(config.model.path, six)
    settings = json.loads((six / "config.json").read_text())
    (six / "config.json").write_text(json.dumps({**settings, "n_routed_experts": 6}))
    config.model.path, config.mesh.expert, config.mesh.fsdp = str(six), 4, 2
    with pytest.raises(common.ConfigError, match=r"mesh.expert=4 does not divide the 6 routed"):
        common.validate(config, "rl")
    config.mesh.expert = -1  # (the axis known only once the mesh is made: at the load)
    with pytest.raises(common.ConfigError, match=r"mesh.expert=4 does not divide the 6 routed"):
        common.load_model(config, sharding.make_mesh(fsdp=2, expert=4))


def test_config_mistakes_found_before_any_work(tmp_path, caplog):
    """Each was accepted and failed later (a traceback, hours into a pipeline) or ran silently
    otherwise than asked."""
    # None in a config file's number field: "'<' not supported between NoneType and int".
    config = sh.load_config("rl")
    config.rl.steps = None
    with pytest.raises(common.ConfigError, match=r"rl.steps = None is a NoneType, not a int"):
        common.check_fields(config, "rl")
    # A warm-up as long as the run, under the constant schedule: it ended still warming up, at a
    # tenth of the rate, unannounced. Now warned, and a tenth of the run (as SFT's on small data).
    config = sh.load_config("rl")
    config.optim.warmup_steps = 1000
    with caplog.at_level(logging.WARNING, logger="r1jax"):
        optim = common.optim(config, 80)
    assert optim.warmup_steps == 8 and "is as long as this run's 80 optimizer steps" in caplog.text
    # A held-out file beside a built-in task (which holds out its own problems): never read.
    config = sh.load_config("eval")
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text(json.dumps({"prompt": "1 + 1?", "solution": "2"}) + "\n")
    config.data.eval_source = str(held_out)
    with pytest.raises(common.ConfigError, match=r"data.eval_source=.* is a built-in task"):
        common.validate(config, "eval")
    # Stop strings that are not text: a traceback at the first batch, or (0,) no stop at all.
    config = sh.load_config("eval")
    for stops in ((5,), (0,), ("",)):
        config.data.stop_strings = stops
        with pytest.raises(common.ConfigError, match=r"data.stop_strings must be non-empty"):
            common.validate(config, "eval")
    # No tasks for the cold-start data (both tasks at their default knobs), a mistake rate
    # clamped to 0 or 1.
    config = sh.load_config("sft")
    config.sft.tasks = ()
    with pytest.raises(common.ConfigError, match=r"sft.tasks must name at least one"):
        common.validate(config, "sft")
    config = sh.load_config("sft")
    for rate in (-1.0, 5.0, float("nan")):
        config.sft.mistake_rate = rate
        with pytest.raises(common.ConfigError, match=r"sft.mistake_rate must be in \[0, 1\]"):
            common.validate(config, "sft")
    # More held-out problems than the built-in task has: the pipeline trained every stage, then
    # its evaluations failed.
    from r1jax.stages import pipeline

    config = sh.load_config("pipeline")
    config.eval_data.num_eval = config.eval_stage.eval.num_prompts = 2000
    with pytest.raises(common.ConfigError, match=r"eval_data.num_eval: only found \d+ distinct"):
        pipeline.validate(config)


def test_reward_weights_are_numbers_and_not_negative():
    """A reward's options in `config.rewards` (the spec form `build_reward_fn` takes) ended in a
    bare TypeError; a negative weight on a penalty (already <= 0) paid for repetition."""
    config = sh.load_config("rl")
    config.rewards.repetition_penalty = -1.0
    with pytest.raises(common.ConfigError, match=r"weights must be >= 0.*repetition_penalty"):
        common.validate(config, "rl")
    spec = {"weight": 0.5, "kwargs": {"ngram_size": 3}}  # (as a config file can give it)
    with config.unlocked():
        config.rewards = ml_collections.ConfigDict({"format": 1.0, "repetition_penalty": spec})
    with pytest.raises(common.ConfigError, match=r"each entry is a reward's weight \(a number"):
        common.validate(config, "rl")


def test_unusable_workdir_is_refused_before_any_work(tmp_path):
    env = sh.cli_env(str(tmp_path / "empty_home"))
    (tmp_path / "a_file").write_text("")
    cases = {
        "ftp://host/run": ("rl", "unsupported scheme; give a local directory or a gs://..."),
        "gs://bucket/run": ("pipeline", "--stage=pipeline needs a local workdir"),
        str(tmp_path / "a_file"): ("sft", "cannot be written (File exists)"),
        str(tmp_path / "a_file" / "run"): ("eval", "cannot be written (Not a directory)"),
    }
    procs = {
        workdir: start_cli([f"--stage={stage}", f"--workdir={workdir}"], env)
        for workdir, (stage, _) in cases.items()
    }
    for workdir, proc in procs.items():
        _, err = proc.communicate(timeout=600)
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode != 0 and "Traceback" not in err, err
        assert len(lines) == 1 and lines[0].startswith("error: --workdir: "), err
        assert cases[workdir][1] in lines[0], err
    assert not (tmp_path / "empty_home").exists()


def test_a_model_folder_without_weights_is_one_line(tmp_path):
    from helpers import hf_checkpoint
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    (tmp_path / "model").mkdir()  # a config.json and a tokenizer, but the weights never arrived
    shutil.copy(os.path.join(hf_checkpoint("qwen2"), "config.json"), tmp_path / "model")
    words = Tokenizer(models.WordLevel({"<eos>": 0, "a": 1}, unk_token="<eos>"))
    PreTrainedTokenizerFast(tokenizer_object=words, eos_token="<eos>").save_pretrained(
        tmp_path / "model"
    )
    proc = subprocess.run(
        sh.launch_cmd(
            "--stage=eval", f"--config.model.path={tmp_path / 'model'}", f"--workdir={tmp_path}/w"
        ),
        env=sh.cli_env(str(tmp_path / "home")),
        cwd=sh.REPO,
        text=True,
        capture_output=True,
        timeout=600,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[-1].startswith("error: ") and "no model.safetensors" in lines[-1], proc.stderr
    # Without its tokenizer.json the folder's tokenizer holds no vocabulary (transformers 5 builds
    # an empty one, and every prompt tokenised to nothing): named.
    from r1jax.models import hf

    os.remove(tmp_path / "model" / "tokenizer.json")
    with pytest.raises(hf.CheckpointError, match=r"no vocabulary .* is tokenizer.json missing"):
        hf.tokenizer(str(tmp_path / "model"))


def test_a_stage_refuses_a_workdir_holding_another_stages_checkpoints(tmp_path):
    workdir = str(tmp_path / "run")
    os.makedirs(os.path.join(workdir, "checkpoints", "40"))
    with open(os.path.join(workdir, "config_sft.json"), "w") as f:
        f.write("{}")
    with pytest.raises(common.ConfigError, match=r"holds the checkpoints of a --stage=sft run"):
        common.run_stage("rl", sh.load_config("rl"), workdir)
    assert sorted(os.listdir(workdir)) == ["checkpoints", "config_sft.json"]  # nothing written
    common.check_workdir_owner(workdir, "sft")  # its own stage resumes
    common.check_workdir_owner(workdir, "eval")  # eval writes beside a run, no checkpoints


def test_cloud_workdir_without_its_filesystem_package_is_named(monkeypatch):
    # As on a machine without gcsfs, whether or not this one has it.
    fsspec_registry = importlib.import_module("fsspec.registry")
    monkeypatch.delitem(fsspec_registry._registry, "gcs", raising=False)
    monkeypatch.setitem(
        fsspec_registry.known_implementations,
        "gcs",
        {"class": "no_such_gcsfs.GCSFileSystem", "err": "Please install gcsfs to access GCS"},
    )
    backend.fsspec_backend._get_filesystem.cache_clear()
    try:
        with pytest.raises(ValueError, match="'gs://bucket/run' needs .*install gcsfs"):
            paths.check_workdir("gs://bucket/run")
    finally:
        backend.fsspec_backend._get_filesystem.cache_clear()


def test_gs_workdir_without_orbax_gcs_client_is_named(fake_gcs, monkeypatch):  # noqa: F811
    monkeypatch.setattr(paths, "_module_available", lambda name: name != "google.cloud.storage")
    with pytest.raises(ValueError, match="need google-cloud-storage"):
        paths.check_workdir("gs://bucket/run")
    monkeypatch.setattr(paths, "_module_available", lambda name: True)
    paths.check_workdir("gs://bucket/run")  # everything there: accepted


def test_stage_workdir_on_cloud_storage(fake_gcs, tmp_path, monkeypatch):  # noqa: F811
    """run_stage's own files (config JSON, log, write_json results) go to a gs:// workdir."""
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # a plain open/makedirs of "gs://..." would land here
    monkeypatch.setenv("R1JAX_HOME", str(home))
    run = "gs://bucket/run"

    class Stage:  # stands in for r1jax.stages.<stage>: no model, no checkpoints
        calls = 0

        @staticmethod
        def run(config, workdir):
            Stage.calls += 1
            common.log.info("inside the stage, call %d", Stage.calls)
            common.write_json(os.path.join(workdir, "result.json"), {"value": config.value})
            return config.value

    monkeypatch.setattr(common, "stage_module", lambda stage: Stage)
    logger = logging.getLogger("r1jax")
    before = list(logger.handlers)
    config = ml_collections.ConfigDict({"value": 3})

    assert common.run_stage("eval", config, run) == 3
    assert json.loads(fake_gcs.read(run + "/config_eval.json")) == {"value": 3}
    assert json.loads(fake_gcs.read(run + "/result.json")) == {"value": 3}
    text = fake_gcs.read(run + "/log_p0.txt").decode()
    assert f"stage eval, workdir {run}" in text and "inside the stage, call 1" in text
    assert logger.handlers == before  # logging is back where it was

    # Rerun on another machine: the log continues the bucket's copy.
    shutil.rmtree(home)
    config.value = 4
    assert common.run_stage("eval", config, run) == 4
    text = fake_gcs.read(run + "/log_p0.txt").decode()
    assert "call 1" in text and "inside the stage, call 2" in text
    assert json.loads(fake_gcs.read(run + "/result.json")) == {"value": 4}
    assert os.listdir(cwd) == []  # nothing went to a local "gs:" directory


# --------------------------------------------------------------------------------------------------
# Compilation reuse across runs in one process (the pipeline runs several RL stages)
# --------------------------------------------------------------------------------------------------


def test_second_rl_run_in_a_process_reuses_the_compiled_rollout(toy, tmp_path):
    """The rollout program calls the host reward bridge, so it never enters JAX's persistent
    cache; a second run with the same shapes must reuse the in-memory one, and with its own
    rewards (here: another weight for the same reward), not the first run's."""
    results = []
    for i, weight in enumerate((1.0, 0.5)):
        config = sh.set_fields(
            sh.rl_config(),
            {"rl.steps": 1, "eval.num_prompts": 1, "rewards.language_consistency": weight},
        )
        with metrics.CompileCounter(log_each=False) as compiles:
            results.append(common.run_stage("rl", config, str(tmp_path / f"run{i}")))
    assert "jit(_rollout)" not in compiles.names, compiles.by_name()
    first, second = results
    raw = "rewards/language_consistency/mean"
    assert first[raw] == second[raw] > 0  # same model, seed and prompts: the same samples
    np.testing.assert_allclose(second["reward"], 0.5 * first["reward"], rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# SIGKILL, then the same command again
# --------------------------------------------------------------------------------------------------


def test_sigkill_then_rerun_resumes_and_matches_uninterrupted_run(toy, tmp_path_factory, tmp_path):
    home = toy[0]
    reference = sh.reference_rl(tmp_path_factory)
    workdir = tmp_path / "run"
    args = ["--stage=rl", f"--workdir={workdir}", *sh.cli_overrides(sh.RL_OVERRIDES)]
    env = sh.cli_env(home)

    # 1. Start the run and kill it as soon as its first checkpoint is committed.
    first = workdir / "checkpoints" / "1"
    proc = sh.popen(args, env, str(tmp_path / "killed"))
    deadline = time.time() + 600
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, (
        f"the run ended (rc {proc.returncode}) before it could be killed:\n"
        + sh.read(str(tmp_path / "killed.err"))[-3000:]
    )
    saved = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    assert saved and saved[-1] < sh.RL_STEPS and not (workdir / "hf").exists()

    # 2. The same command again: resumes from the last complete checkpoint and finishes.
    done = run_cli(args, env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = re.search(r"resumed from step (\d+)", done.stderr)
    assert resumed and 1 <= int(resumed.group(1)) < sh.RL_STEPS, done.stderr[-3000:]

    # 3. Exactly the uninterrupted run's parameters and logged numbers.
    want = sh.hf_params(os.path.join(reference, "hf", "final"))
    got = sh.hf_params(str(workdir / "hf" / "final"))
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert sh.metric_rows(str(workdir)) == sh.metric_rows(reference)

    # 4. A checkpoint damaged afterwards: the next rerun stops with one line naming it.
    last = workdir / "checkpoints" / str(sh.RL_STEPS)
    for f in last.glob("model/**/d/*"):
        f.write_bytes(f.read_bytes()[: max(f.stat().st_size // 3, 1)])
    failed = run_cli(args, env)
    assert failed.returncode != 0 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    message = failed.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and str(last) in message, message


def test_checkpoint_settings_that_would_be_ignored_or_crash_later_are_refused():
    from r1jax.stages import common

    for stage, field, value, message in [
        ("rl", "ckpt.keep", 0, "ckpt.keep"),
        ("rl", "ckpt.best_metric", "reward", "held-out metric"),
        ("rl", "ckpt.best_metric", "eval/mean_lenght", r"one of eval/accuracy, eval/pass@1,"),
        ("sft", "ckpt.best_metric", "eval/accuracy", "only --stage=rl"),
        ("rl", "data.prefill_think", True, "data.template='plain'"),
    ]:
        config = sh.load_config(stage)
        sh.set_fields(config, {field: value})
        if field == "data.prefill_think":
            config.data.template = "plain"
        with pytest.raises(common.ConfigError, match=message):
            common.validate(config, stage)
    for stage, other in (("sft", "rl"), ("eval", "rl"), ("rl", "eval")):
        with pytest.raises(common.ConfigError, match=f"not a config for --stage={stage}"):
            common.validate(sh.load_config(other), stage)


def test_rl_saves_every_evaluated_step_when_it_keeps_the_best():
    """configs/rl.py evaluates every 20 steps and saves every 25: the steps that can be the best
    (the evaluated ones) are saved too, or the best checkpoint could only ever be the last."""
    from r1jax.stages import rl as rl_stage

    config = sh.load_config("rl")
    steps = range(1, config.rl.steps + 1)
    assert config.ckpt.best_metric and config.eval.every % config.ckpt.every != 0
    assert [s for s in steps if rl_stage.forced_save(s, config)] == [20, 40, 60, 80]
    config.ckpt.best_metric = ""
    assert [s for s in steps if rl_stage.forced_save(s, config)] == [80]


def test_every_registered_reward_can_be_weighted_from_the_command_line():
    """configs/rl.py lists every registered reward (the shaping ones at 0), and the length
    shaping measures against rl.max_completion_length."""
    from r1jax import rewards
    from r1jax.stages import rl as rl_stage

    config = sh.load_config("rl")
    assert set(config.rewards.to_dict()) == set(rewards.REWARDS)
    sh.set_fields(
        config,
        {
            "rewards.overlong_penalty": 1.0,
            "rewards.repetition_penalty": 1.0,
            "rewards.cosine_scaled": 1.0,
            "rl.max_completion_length": 10,
        },
    )
    rl_stage.validate(config)
    with rewards.build_reward_fn(rl_stage.reward_specs(config), num_workers=0) as fn:
        names = list(fn.names)
        out = fn(
            ["<think>a a a a</think><answer>3</answer>"] * 3,
            completion_ids=[[0] * 5, [0] * 9, [0] * 11],
            solution=["3"] * 3,
            task=["arithmetic"] * 3,
        )
    overlong = out.per_reward[names.index("overlong_penalty")]
    np.testing.assert_allclose(overlong, [0.0, -0.5, -1.0])  # last 2 of 10 tokens penalised
    cosine = out.per_reward[names.index("cosine_scaled")]
    assert cosine[0] > cosine[1] > 0.5  # correct: 1 -> 0.5 at L, and cut off there -1
    assert cosine[2] == -1.0


def test_ctrl_c_ends_in_one_line_saying_how_to_resume(tmp_path):
    code = (
        "import sys\n"
        "from r1jax.stages import common\n"
        "def interrupted(*args, **kwargs):\n"
        "    raise KeyboardInterrupt\n"
        "common.run_stage = interrupted\n"
        "from r1jax import launch\n"
        "launch.main(sys.argv)\n"
    )
    workdir = str(tmp_path / "w")
    proc = subprocess.run(
        [sys.executable, "-c", code, "--stage=eval", f"--workdir={workdir}"],
        env=sh.cli_env(str(tmp_path / "home")),
        cwd=sh.REPO,
        text=True,
        capture_output=True,
        timeout=600,
    )
    assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert (
        last == "interrupted; --stage=eval keeps no checkpoints: the same command starts it again"
    )


def test_sigterm_ends_a_single_process_run_like_ctrl_c(toy, tmp_path):
    """`tpu_pod.sh stop` and schedulers send SIGTERM first so that a run can commit its last
    checkpoint: one process saves the step it is on and stops (it used to die at once; then a
    KeyboardInterrupt raised wherever the signal landed lost a checkpoint orbax was writing)."""
    workdir = tmp_path / "run"
    overrides = {"sft.num_examples": 32, "sft.seq_len": 128, "sft.batch_size": 8}
    args = ["--stage=sft", f"--workdir={workdir}", "--config.sft.epochs=50.0"]
    proc = sh.popen([*args, *sh.cli_overrides(overrides)], sh.cli_env(toy[0]), str(tmp_path / "p"))
    try:
        deadline = time.time() + 600
        while not (workdir / "metrics.jsonl").exists() or len(sh.metric_rows(str(workdir))) < 2:
            assert time.time() < deadline and proc.poll() is None, sh.read(str(tmp_path / "p.err"))
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=600) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    err = sh.read(str(tmp_path / "p.err"))
    assert "SIGTERM: stopping after this step's checkpoint" in err, err[-2000:]
    last = err.strip().splitlines()[-1]
    stopped = re.fullmatch(
        r"stopped at step (\d+) \(SIGTERM / Ctrl-C / preemption\); its checkpoint is saved; "
        rf"the same command resumes from the last checkpoint in {re.escape(str(workdir))}",
        last,
    )
    assert stopped, last
    saved = sorted(os.listdir(workdir / "checkpoints"))
    assert stopped.group(1) in saved and not [d for d in saved if "tmp" in d], saved


def test_a_checkpoint_that_cannot_be_written_ends_in_one_line(toy, tmp_path, monkeypatch):
    """A full disk ended a run in ~450 lines of orbax's writer-thread tracebacks; a read-only
    checkpoints/ folder was found only at the first save (then a 5-minute hang at exit). Files are
    capped at 64 KiB here (RLIMIT_FSIZE: the writes fail as on a full disk, without a mount)."""
    # A write past the cap fails with EFBIG (SIGXFSZ ignored); set in a process that then execs
    # the launcher (a preexec_fn would fork a process that runs JAX's threads).
    cap = (
        "import os, resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))\n"
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n"
    )
    workdir = tmp_path / "run"
    overrides = {"sft.num_examples": 16, "sft.seq_len": 128, "sft.batch_size": 8, "ckpt.every": 1}
    launch = sh.launch_cmd("--stage=sft", f"--workdir={workdir}", *sh.cli_overrides(overrides))
    proc = subprocess.run(
        [sys.executable, "-c", cap, *launch[1:]],
        # (no compilation cache: entries cut at the cap would be read back, with a warning, by
        # every later test that compiles the same program)
        env=sh.cli_env(toy[0], R1JAX_COMPILATION_CACHE="0"),
        cwd=sh.REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"error: Writing a checkpoint into {workdir}/checkpoints failed: File too large ("
    ), last
    assert last.endswith("resumes from the last of them once the folder can be written again")

    # A checkpoints/ folder that cannot be written is named before any work.
    real = tempfile.TemporaryFile

    def read_only(*args, dir=None, **kwargs):
        if dir is not None and os.path.basename(dir) == "checkpoints":
            raise OSError(30, "Read-only file system")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(paths.tempfile, "TemporaryFile", read_only)
    with pytest.raises(ValueError, match=r"workdir '.*/run/checkpoints' cannot be written \(Read"):
        paths.check_workdir(str(workdir))


def test_a_diverging_run_stops_with_one_line_naming_the_learning_rate(toy, tmp_path):
    """A learning rate of 1e30 makes the forward overflow from step 2 on, so every later update
    is skipped for non-finite gradients: the run stops after optim.max_skipped_steps of them in a
    row, saying so (it used to run to its last step without learning, saving unchanged weights)."""
    workdir = tmp_path / "run"
    overrides = {
        "sft.num_examples": 48,  # 6 steps of 8
        "sft.seq_len": 128,
        "sft.batch_size": 8,
        "optim.learning_rate": 1e30,
        "optim.warmup_steps": 0,
        "optim.max_skipped_steps": 3,
        "ckpt.every": 1,
    }
    args = ["--stage=sft", f"--workdir={workdir}", *sh.cli_overrides(overrides)]
    proc = run_cli(args, sh.cli_env(toy[0]))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: steps 2-4: 3 updates in a row skipped because their gradients were not finite; "
        "the update of step 1 left a model whose gradients overflow, and checkpoints from step 1 "
        "on hold it, so resuming from them cannot recover: start the stage again with a lower "
        "optim.learning_rate, in a new workdir or after deleting its checkpoints from step 1 on "
        "(it resumes from the latest one left) (optim.max_skipped_steps=0 never stops)"
    ), proc.stderr[-3000:]
    assert [r["update_skipped"] for r in sh.metric_rows(str(workdir))] == [0, 1, 1, 1]
    assert not (workdir / "hf" / "final").exists()
    # No checkpoint during the streak (it would hold step 1's model, and push older ones out).
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1"]


def test_a_half_set_multi_host_environment_is_one_line(tmp_path):
    env = sh.cli_env(str(tmp_path / "home"), R1JAX_COORDINATOR_ADDRESS="127.0.0.1:1")
    proc = run_cli(["--stage=eval", f"--workdir={tmp_path / 'w'}"], env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: multi-host: ['R1JAX_COORDINATOR_ADDRESS'] are set but ['R1JAX_NUM_PROCESSES', "
        "'R1JAX_PROCESS_ID'] are not; set all three (or none)"
    )


@pytest.mark.parametrize(
    "env, message",
    [
        # Without the coordinator each host ran alone, all of them in one workdir.
        (
            {"R1JAX_NUM_PROCESSES": "2", "R1JAX_PROCESS_ID": "1"},
            "['R1JAX_NUM_PROCESSES', 'R1JAX_PROCESS_ID'] are set but "
            "['R1JAX_COORDINATOR_ADDRESS'] are not",
        ),
        (
            {
                "R1JAX_COORDINATOR_ADDRESS": "127.0.0.1:1",
                "R1JAX_NUM_PROCESSES": "two",
                "R1JAX_PROCESS_ID": "0",
            },
            "R1JAX_NUM_PROCESSES and R1JAX_PROCESS_ID must be whole numbers, got 'two'",
        ),
        (
            {
                "R1JAX_COORDINATOR_ADDRESS": "127.0.0.1:1",
                "R1JAX_NUM_PROCESSES": "2",
                "R1JAX_PROCESS_ID": "2",
            },
            "need 0 <= R1JAX_PROCESS_ID < R1JAX_NUM_PROCESSES, got 2 and 2",
        ),
        (  # (JAX's own IndexError from inside it, as a traceback)
            {
                "R1JAX_COORDINATOR_ADDRESS": "127.0.0.1",
                "R1JAX_NUM_PROCESSES": "2",
                "R1JAX_PROCESS_ID": "0",
            },
            "R1JAX_COORDINATOR_ADDRESS must be host:port (process 0's host and a free port, "
            "e.g. 10.0.0.2:8476), got '127.0.0.1'",
        ),
    ],
)
def test_multi_host_settings_are_all_or_none(monkeypatch, env, message):
    from r1jax import sharding

    for k in sharding._ENV:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=re.escape("multi-host: ") + ".*" + re.escape(message)):
        sharding.initialize_distributed()


def test_a_closed_output_pipe_does_not_end_the_run(tmp_path):
    """When the reader of r1jax's output goes away (a launcher's ssh session or `tee` ended by
    Ctrl-C), the next progress-bar draw raised BrokenPipeError and the run died before the
    SIGTERM that would have saved its step. Output goes to /dev/null from then on."""
    from r1jax import launch

    read, write = os.pipe()
    stream = launch._SurvivingOutput(open(write, "w", buffering=1))
    stream.write("seen\n")
    assert os.read(read, 100) == b"seen\n"
    os.close(read)  # the reader is gone
    stream.write("lost\n")  # (was: BrokenPipeError)
    stream.flush()
    assert os.path.samefile(f"/proc/self/fd/{stream.fileno()}", os.devnull)
    stream.close()
    # And `--config=~/...`, which no shell expands after "=", is the home folder's file.
    home = os.path.expanduser("~")
    assert launch._expand_config_path(["x", "--config=~/c.py:arg", "--config", "~/d.py"]) == [
        "x",
        f"--config={home}/c.py:arg",
        "--config",
        f"{home}/d.py",
    ]


def test_a_host_that_looks_like_a_tpu_vm_but_is_not_is_one_clear_error(monkeypatch):
    """A container that inherited TPU_ACCELERATOR_TYPE (or a VFIO host) was taken for a TPU VM:
    every run stopped at JAX's "coordinator_address should be defined", naming nothing of ours."""
    from r1jax import sharding

    for k in sharding._ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5litepod-8")

    def no_cluster():
        raise ValueError("coordinator_address should be defined.")

    monkeypatch.setattr(sharding.jax.distributed, "initialize", no_cluster)
    with pytest.raises(ValueError, match=r"looks like part of a cluster .*R1JAX_COORDINATOR_ADDR"):
        sharding.initialize_distributed()


def test_a_model_path_under_home_is_expanded(monkeypatch, tmp_path):
    """Launchers pass `--config.model.path=~/models/x` to every host unexpanded."""
    from helpers import hf_checkpoint

    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(hf_checkpoint("qwen2"), tmp_path / "models" / "x")
    config = sh.load_config("eval")
    config.model.path = "~/models/x"
    common.validate(config, "eval")
    assert common.resolve_model_path(config.model.path) == str(tmp_path / "models" / "x")


def test_every_rl_field_of_the_grpo_config_reaches_it():
    """Each `rl.*` field named as a GRPOConfig field is the one the stage trains with (a field
    the config offers but the stage does not pass on would be silently ignored)."""
    import dataclasses
    import types

    from r1jax import grpo
    from r1jax.stages import rl

    config = sh.load_config("rl")
    shared = [f.name for f in dataclasses.fields(grpo.GRPOConfig) if f.name in config.rl]
    changed = {"logprob_chunk_size": 64, "decode_first_window": 16, "beta": 0.5, "top_k": 7}
    config.rl.update(changed)
    cfg = rl.grpo_config(
        config,
        types.SimpleNamespace(pad_token_id=0),
        types.SimpleNamespace(stop_token_ids=(1,), num_tokens=100),
    )
    assert cfg.num_tokens == 100  # the tokenizer's length: padded ids are never sampled
    for name in shared:
        if name != "num_micro_batches":  # 0 there means automatic
            assert getattr(cfg, name) == config.rl[name], name
    assert set(changed) <= set(shared)


def test_rl_refuses_prompts_no_correctness_reward_can_score(caplog):
    """A GSM8K-shaped file with the default rewards (`task`, for the built-in tasks) used to train
    on the format rewards alone, `rewards/task/mean` NaN at every step."""
    from r1jax.stages import rl

    config = sh.load_config("rl")
    math_rows = [{"task": "math", "solution": "4"}, {"task": "math", "solution": "7"}]
    with pytest.raises(common.ConfigError, match=r"2 of 2 .* need --config.rewards.accuracy=1"):
        rl.check_correctness_rewards(config, math_rows)
    code_rows = [{"task": "code", "solution": None, "tests": [{"input": "", "output": "1"}]}]
    with pytest.raises(common.ConfigError, match=r"need --config.rewards.code=1"):
        rl.check_correctness_rewards(config, code_rows)
    mixed = [*math_rows, {"task": "arithmetic", "solution": "3"}]
    with caplog.at_level("WARNING", logger="r1jax"):
        rl.check_correctness_rewards(config, mixed)  # some prompts covered: a warning
    assert "2 of 3 training prompts" in caplog.text
    config.rewards.accuracy = 1.0
    rl.check_correctness_rewards(config, mixed)
    config.rewards.accuracy = 0.0  # a learned reward model scores every prompt
    config.reward_model.path, config.reward_model.weight = "/some/reward-model", 1.0
    rl.check_correctness_rewards(config, math_rows)


def test_code_that_could_not_run_is_refused_before_sampling(tmp_path, monkeypatch):
    """Eval and rejection sampling on code rows sampled a first batch and then died on
    SandboxUnavailableError (nothing kept), with a message naming an option no config had."""
    import types

    from r1jax.rewards import sandbox
    from r1jax.stages import eval as eval_stage
    from r1jax.stages import rl

    monkeypatch.setattr(sandbox, "_bwrap_problem", lambda python: "`bwrap` is not on PATH")
    tests = [{"input": "", "output": "1"}]
    prompt_set = types.SimpleNamespace(rows=[{"task": "code", "tests": tests}])
    config = sh.load_config("eval")
    with pytest.raises(common.ConfigError, match=r"--config.sandbox.allow_unsandboxed=True"):
        eval_stage.Grader(prompt_set, config)
    config.sandbox.timeout_s = 0.0
    with pytest.raises(common.ConfigError, match=r"sandbox.timeout_s must be > 0"):
        eval_stage.Grader(prompt_set, config)
    config.sandbox.timeout_s, config.sandbox.allow_unsandboxed = 5.0, True
    answers = [
        "<answer>```python\nprint(1)\n```</answer>",
        "<answer>```python\nprint(2)\n```</answer>",
    ]
    with eval_stage.Grader(prompt_set, config, num_workers=0) as grade:  # options reach the code
        assert grade(answers, task=["code"] * 2, tests=[tests] * 2).tolist() == [1.0, 0.0]
    # Prompts without code need no sandbox.
    eval_stage.Grader(types.SimpleNamespace(rows=[{"task": "arithmetic"}]), sh.load_config("eval"))

    def no_model(*args, **kwargs):
        raise AssertionError("loaded a model before refusing the run")

    monkeypatch.setattr(common, "load_model", no_model)
    config = sh.load_config("rl")
    config.rewards.code = 1.0
    with pytest.raises(common.ConfigError, match=r"bubblewrap cannot sandbox it here"):
        rl.run(config, str(tmp_path))
    # Code rows among the held-out prompts: the final evaluation grades them even when no other
    # is asked for (it failed there, after the last step, losing its checkpoint and export).
    from r1jax.data import tasks

    train, code_eval = tmp_path / "train.jsonl", tmp_path / "code_eval.jsonl"
    arithmetic = tasks.make_dataset(tasks.make_task("arithmetic"), 8, seed=0, split="train")
    train.write_text("".join(json.dumps(r) + "\n" for r in arithmetic))
    code_eval.write_text(json.dumps({"prompt": "Print 1.", "tests": tests}) + "\n")
    config = sh.load_config("rl")
    config.data.source, config.data.eval_source = str(train), str(code_eval)
    config.eval.every, config.eval.at_start = 0, False
    with pytest.raises(common.ConfigError, match=r"bubblewrap cannot sandbox it here"):
        rl.run(config, str(tmp_path))
    # The eval stage on those rows refuses before its model loads too (it loaded it first).
    config = sh.load_config("eval")
    config.data.source, config.data.eval_source = str(train), str(code_eval)
    with pytest.raises(common.ConfigError, match=r"bubblewrap cannot sandbox it here"):
        eval_stage.run(config, str(tmp_path / "eval"))


def test_file_rows_naming_a_builtin_task_are_checked_by_its_verifier(tmp_path):
    """`task: countdown` without Countdown's `meta` made the task reward raise KeyError at the
    first answer the model wrote for it, mid-run."""
    from r1jax.data import tasks

    good = tasks.make_dataset(tasks.make_task("countdown"), 4, seed=0, split="train")
    config = sh.load_config("rl")
    config.data.source = str(tmp_path / "rows.jsonl")
    config.data.num_eval = 1
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good))
    assert len(common.load_prompt_rows(config.data, "train", 0)) == 3
    bad = [{"prompt": "Make 0 from 1 2 3", "solution": "0", "task": "countdown"}, *good]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    with pytest.raises(
        common.ConfigError, match=r"rows.jsonl:1: task 'countdown' is a built-in task"
    ):
        common.load_prompt_rows(config.data, "train", 0)


def test_data_paths_that_name_no_file_are_refused_before_any_model_loads(tmp_path):
    """A folder passed validation (glob matched it) and failed after the model had loaded, on
    first use after the toy base's 13-minute build; SFT, distillation and rejection sampling
    refused globs the loader reads."""
    (tmp_path / "train").mkdir()
    row = json.dumps({"prompt": "q", "completion": "a", "solution": "1"}) + "\n"
    (tmp_path / "train" / "a.jsonl").write_text(row)
    (tmp_path / "train" / "b.jsonl").write_text(row)
    for stage, field in [
        ("rl", "data.source"),
        ("eval", "data.eval_source"),
        ("sft", "sft.source"),
        ("distill", "distill.source"),
        ("rejection_sampling", "rejection_sampling.non_reasoning_source"),
    ]:
        config = sh.load_config(stage)
        if field == "data.eval_source":  # (a held-out file goes with a file's training rows)
            config.data.source = str(tmp_path / "train" / "a.jsonl")
        section, name = field.split(".")
        config[section][name] = str(tmp_path / "train")
        with pytest.raises(common.ConfigError, match=f"^{field}: .* is a folder"):
            common.validate(config, stage)
        config[section][name] = str(tmp_path / "train" / "*.jsonl")
        common.validate(config, stage)
        config[section][name] = str(tmp_path / "none*.jsonl")
        with pytest.raises(common.ConfigError, match=f"^{field}: no dataset files match"):
            common.validate(config, stage)


def test_a_pipeline_flag_for_every_stage_reaches_every_stage_even_at_its_default(tmp_path):
    """`--config.mesh.fsdp=-1` (the base default) left the stages that set their own mesh on it:
    a top-level value equal to the default was dropped as not given."""
    from r1jax import launch
    from r1jax.stages import pipeline

    config = sh.load_config("pipeline")
    assert (config.eval_stage.mesh.data, config.eval_stage.mesh.fsdp) == (-1, 1)  # (its own)
    config.mesh.fsdp = -1
    pipeline.apply_shared_flags(config, launch._override_keys(["x", "--config.mesh.fsdp=-1"]))
    # The mesh is one layout: the top-level one whole (one axis of it beside eval's own asked
    # two axes for every device).
    for name in ("eval_stage", "rejection_sampling", "r1_zero"):
        assert (config[name].mesh.data, config[name].mesh.fsdp) == (1, -1), name
    pipeline.validate(config)
    (tmp_path / "flags").write_text("--config.log.every=5\n")
    given = ["--stage=rl", "--config.a.b=1", "-config.c=2", "--noconfig.d"]
    given += [f"--flagfile={tmp_path / 'flags'}"]
    keys = launch._override_keys(launch._with_flagfiles(given))
    assert keys == ["a.b", "c", "d", "log.every"]


def test_arguments_that_were_silently_ignored_are_refused_or_honoured(toy, tmp_path):
    """Overrides after a "--" (or without their dashes) were dropped and the default ran; a
    misspelt ":smoke" ran the whole recipe; "--workdir=~/x" wrote into a folder named "~"; a
    negative seed or a NaN reward weight passed validation and failed after the model loaded."""
    from r1jax import launch

    env = sh.cli_env(toy[0])
    saved = tmp_path / "config_rl.json"
    saved.write_text("{}")
    for args, message in (
        (["--stage=eval", "--", "--config.eval.num_prompts=3"], "unexpected arguments"),
        (["--stage=pipeline", "--config=configs/pipeline.py:smoek"], "takes one of ['smoke']"),
        (["--stage=eval", "--config.seed=-1"], "seed must be an integer in [0, 2**32)"),
        (["--stage=rl", f"--config.seed={2**32}"], "seed must be an integer in [0, 2**32)"),
        (["--stage=rl", "--config.rewards.format=nan"], "rewards: weights must be finite"),
        (["--stage=rl", "--config.rewards.repetition_penalty=-1"], "weights must be >= 0"),
        # A run's saved settings given as its config: a bare AttributeError.
        (["--stage=rl", f"--config={saved}"], "a config is a Python file with get_config()"),
        # The top-level one won, silently (the stage's, given beside it, was dropped).
        (
            ["--stage=pipeline", "--config.log.every=50", "--config.r1_zero.log.every=1"],
            "--config.log.every sets every stage's log.every and --config.r1_zero.log.every",
        ),
    ):
        out = run_cli([*args, f"--workdir={tmp_path / 'w'}"], env)
        assert out.returncode != 0 and message in out.stderr, (args, out.stderr[-2000:])
    # An empty --workdir (an unset $DIR) wrote into runs/<stage> of the current folder.
    out = run_cli(["--stage=eval", "--workdir="], env)
    assert out.returncode != 0 and "--workdir is empty" in out.stderr, out.stderr[-2000:]
    assert launch._stage_from_argv(["launch", "-stage=rl"]) == "rl"  # (absl takes one dash too)
    # The last one given, as absl reads them (a flagfile's --stage, then the command line's):
    # the first built another stage's config, and the run was refused for a --config not given.
    twice = ["launch", "--stage=sft", "--config=a.py", "--stage", "eval", "--config", "b.py"]
    assert (launch._stage_from_argv(twice), launch._config_spec(twice)) == ("eval", "b.py")
    # A bad row ends the SFT before any model loads; by then the workdir, ~ expanded, exists.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "completion": " "}) + "\n")
    out = run_cli(
        ["--stage=sft", "--workdir=~/sft_run", f"--config.sft.source={bad}"],
        {**env, "HOME": str(tmp_path)},
    )
    assert out.returncode == 1 and "completion must be non-empty" in out.stderr, out.stderr
    saved = tmp_path / "sft_run" / "config_sft.json"
    assert json.loads(saved.read_text())["seed"] == 0
    # A run that fails before it saves anything leaves the config already there in place.
    out = run_cli(
        ["--stage=sft", "--workdir=~/sft_run", f"--config.sft.source={bad}", "--config.seed=3"],
        {**env, "HOME": str(tmp_path)},
    )
    assert out.returncode == 1 and json.loads(saved.read_text())["seed"] == 0


def test_sampling_past_the_models_positions_is_warned(toy, tmp_path, caplog):
    """A prompt bucket and a sampling budget past max_position_embeddings sampled with positions
    the model never saw (RoPE extrapolating), unannounced."""
    config = sh.load_config("rl")
    config.model.path = os.path.join(toy[0], "toy_base")
    with caplog.at_level(logging.WARNING, logger="r1jax"):
        common.validate(config, "rl")
    assert "max_position_embeddings" not in caplog.text  # (1024 positions: 512 + 128 fit)
    short = tmp_path / "short"
    shutil.copytree(config.model.path, short)
    settings = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**settings, "max_position_embeddings": 256}))
    config.model.path = str(short)
    with caplog.at_level(logging.WARNING, logger="r1jax"):
        common.validate(config, "rl")
    assert "512 + rl.max_completion_length=96 = 608 positions, past the 256" in caplog.text
