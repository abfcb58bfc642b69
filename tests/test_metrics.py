"""Tests for r1jax/metrics.py: JSONL + resume, TensorBoard, progress output, plots, compiles."""

import glob
import json
import os
import shutil
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fake_gcs import fake_gcs  # noqa: F401  (fixture)
from tensorboardX.proto import event_pb2

from r1jax import metrics, paths
from r1jax.metrics import CompileCounter, MetricsWriter, plot_metrics, read_metrics


def read_events(tb_dir) -> list[event_pb2.Event]:
    """Every event in every TFRecord file under `tb_dir`, file by file in name order."""
    events = []
    for path in sorted(glob.glob(os.path.join(tb_dir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            events += parse_events(f.read())
    return events


def parse_events(data: bytes) -> list[event_pb2.Event]:
    """The events of one TFRecord file's bytes.

    TFRecord framing: uint64 length, uint32 crc, payload, uint32 crc (crcs not checked here).
    """
    events, pos = [], 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        payload = data[pos + 12 : pos + 12 + length]
        pos += 12 + length + 4
        events.append(event_pb2.Event.FromString(payload))
    return events


def scalars(events, tag) -> dict[int, float]:
    return {e.step: v.simple_value for e in events for v in e.summary.value if v.tag == tag}


# --------------------------------------------------------------------------------------------------
# JSONL, TensorBoard, resume
# --------------------------------------------------------------------------------------------------


def test_jsonl_records_and_tensorboard_scalars(tmp_path, caplog):
    with MetricsWriter(tmp_path, total_steps=3, summary_every=0) as w:
        for step in (1, 2, 3):
            got = w.write(
                step,
                {"reward": jnp.float32(step / 4), "loss": np.float64(1.0 / step), "n": step},
            )
            assert got == {"reward": step / 4, "loss": 1.0 / step, "n": float(step)}
        w.write(4, {"eval/pass@1": 0.5, "eval/cons@4": 0.25})
        # Each step's scalars are in the event file when write() returns, as its JSONL line is
        # (tensorboardX's writer queued them for a thread; a kill lost the queue).
        assert scalars(read_events(tmp_path / "tb"), "eval/pass_at_1") == {4: 0.5}
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records[3]["eval/pass@1"] == 0.5
    records = records[:3]
    assert [r["reward"] for r in records] == [0.25, 0.5, 0.75]
    np.testing.assert_allclose([r["loss"] for r in records], [1.0, 0.5, 1 / 3])
    assert all(isinstance(r["time"], float) for r in records)
    assert list(records[0]) == ["step", "time", "reward", "loss", "n"]

    events = read_events(tmp_path / "tb")
    assert scalars(events, "reward") == {1: 0.25, 2: 0.5, 3: 0.75}
    assert scalars(events, "n") == {1: 1.0, 2: 2.0, 3: 3.0}
    # TensorBoard tags allow no "@": one readable spelling, not its silent "eval/pass_1".
    assert scalars(events, "eval/pass_at_1") == {4: 0.5}
    assert scalars(events, "eval/cons_at_4") == {4: 0.25}
    # NaN (a reward that applied to no row) is recorded, without a warning per value.
    with MetricsWriter(tmp_path / "nan", summary_every=0) as w:
        w.write(1, {"rewards/code/mean": float("nan"), "loss": float("inf")})
        assert w._bar.mininterval == 30.0  # stderr is no terminal here: a redraw every 30 s
    assert np.isnan(read_metrics(tmp_path / "nan" / "metrics.jsonl")[0]["rewards/code/mean"])
    assert not [r for r in caplog.records if "NaN" in r.getMessage()]

    # ... as JSON null: bare NaN / Infinity are no JSON (jq, JavaScript and strict parsers fail).
    def strict(constant):
        raise ValueError(f"not JSON: {constant}")

    line = (tmp_path / "nan" / "metrics.jsonl").read_text()
    record = json.loads(line, parse_constant=strict)
    assert record["rewards/code/mean"] is None and record["loss"] is None

    # So are the stages' result files (eval.json, done.json, results.json), whose readers in the
    # pipeline do arithmetic on them: NaN again when read back.
    from r1jax.stages import common

    result = {"pass@1": 0.5, "pass@1_se": float("nan"), "per_task": {"add": {"x": float("inf")}}}
    common.write_json(str(tmp_path / "eval.json"), {**result, "lengths": [1.0, float("nan")]})
    text = (tmp_path / "eval.json").read_text()
    assert json.loads(text, parse_constant=strict)["per_task"]["add"]["x"] is None
    back = common.read_json(str(tmp_path / "eval.json"))
    assert back["pass@1"] == 0.5 and np.isnan(back["pass@1_se"])
    assert np.isnan(back["per_task"]["add"]["x"]) and np.isnan(back["lengths"][1])


def test_a_damaged_line_before_others_loses_only_itself(tmp_path, caplog):
    """read_metrics stopped at the first line it could not read, taken to be a torn last line:
    the rows after a damaged middle line were dropped, and for good once a resume rewrote the
    file."""
    with MetricsWriter(tmp_path, summary_every=0) as w:
        for step in range(1, 4):
            w.write(step, {"reward": float(step)})
    path = tmp_path / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + '{"step": 2, "rew\n' + lines[2] + '{"step": 4')  # (4: torn)
    assert [r["step"] for r in read_metrics(path)] == [1, 3]
    assert "line 2: not a JSON record, skipped" in caplog.text
    with MetricsWriter(tmp_path, start_step=3, summary_every=0) as w:  # a resume from step 3
        w.write(4, {"reward": 4.0})
    assert [r["step"] for r in read_metrics(path)] == [1, 3, 4]


def test_resume_drops_steps_after_the_checkpoint_and_appends(tmp_path):
    with MetricsWriter(tmp_path, summary_every=0) as w:
        for step in range(1, 7):
            w.write(step, {"reward": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "rew')  # a line torn by a kill mid-write

    # The checkpoint the run resumes from is step 4: steps 5-7 are logged again by this run.
    with MetricsWriter(tmp_path, start_step=4, summary_every=0) as w:
        for step in (5, 6, 7):
            w.write(step, {"reward": 10.0 * step})
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["reward"]) for r in records] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 4.0),
        (5, 50.0),
        (6, 60.0),
        (7, 70.0),
    ]
    # TensorBoard: the second event file starts by purging steps >= 5 of the first (the first,
    # a run from scratch, purges everything an earlier attempt left).
    events = read_events(tmp_path / "tb")
    purges = [e.step for e in events if e.session_log.status == event_pb2.SessionLog.START]
    assert purges == [0, 5]


def test_resumes_within_one_second_are_read_back_in_order(tmp_path, monkeypatch):
    """Event files are named by the second they were made and the step the run resumed from;
    TensorBoard reads a folder's files in name order, and "from_step_10" sorted before
    "from_step_4": the older file's purge then hid the newer run's steps."""
    monkeypatch.setattr(metrics.time, "time", lambda: 1_700_000_000.0)
    for start, scale in ((0, 1.0), (4, 10.0), (10, 100.0)):
        with MetricsWriter(tmp_path, start_step=start, summary_every=0) as w:
            for step in range(start + 1, start + 3 if start < 10 else 13):
                w.write(step, {"reward": scale * step})
    # Replayed as TensorBoard does: each START purges the steps at and after its own.
    seen: dict[int, float] = {}
    for e in read_events(tmp_path / "tb"):
        if e.session_log.status == event_pb2.SessionLog.START:
            seen = {k: v for k, v in seen.items() if k < e.step}
        seen.update(scalars([e], "reward"))
    assert seen == {1: 1.0, 2: 2.0, 5: 50.0, 6: 60.0, 11: 1100.0, 12: 1200.0}


def test_fresh_run_in_same_workdir_starts_a_new_history(tmp_path):
    # Step 0 (an evaluation before the first step) too: a run killed before its first checkpoint
    # starts over at 0 and must not leave its first attempt's row beside the new one.
    with MetricsWriter(tmp_path, summary_every=0, tensorboard=False) as w:
        w.write(0, {"eval/accuracy": 0.5})
        w.write(1, {"loss": 1.0})
    with MetricsWriter(tmp_path, summary_every=0, tensorboard=False) as w:
        w.write(0, {"eval/accuracy": 0.5})
        w.write(1, {"loss": 2.0})
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1] and records[1]["loss"] == 2.0
    assert not (tmp_path / "tb").exists()


def test_bad_metrics_are_refused_by_name(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        with pytest.raises(ValueError, match=r"'per_token' has shape \(2,\)"):
            w.write(1, {"per_token": np.ones(2)})
        with pytest.raises(ValueError, match=r"\['step'\] are reserved"):
            w.write(1, {"step": 3})
        # (float() of each named no metric, or took a string; a name not a string was written
        # to the JSONL file before TensorBoard refused it)
        for value in (None, {"a": 1.0}, "abc", "1.5"):
            with pytest.raises(ValueError, match=r"Metric 'v' is .*, not a number"):
                w.write(1, {"v": value})
        with pytest.raises(ValueError, match=r"Metric name 3 is not a string"):
            w.write(1, {3: 1.0})
        w.write(1, {"ok": np.float32(1.0), "n": 3, "flag": True, "bf16": jnp.bfloat16(1.5)})
    [row] = read_metrics(tmp_path / "metrics.jsonl")
    assert sorted(row) == ["bf16", "flag", "n", "ok", "step", "time"] and row["bf16"] == 1.5


def test_progress_bar_postfix_and_summary_lines(tmp_path, capsys):
    with MetricsWriter(tmp_path, total_steps=4, summary_every=2, desc="rl", tensorboard=False) as w:
        for step in range(1, 5):
            w.write(step, {"reward": 0.5 * step, "accuracy": 0.25, "loss": 3.0})
    captured = capsys.readouterr()
    # Summary lines are the lasting record, on stdout; the bar redraws itself on stderr.
    lines = captured.out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("step 2/4 | reward 1 | accuracy 0.25 | loss 3 | ")
    assert lines[1].startswith("step 4/4 | reward 2 | accuracy 0.25 | loss 3 | ")
    assert lines[1].endswith(" s/step")
    err = captured.err
    # In a log file (stderr no terminal) a summary line is not wrapped in an erase and a redraw
    # of the bar: the bar is drawn at its start and end only.
    assert err.count("rl:") == 2, err
    final_bar = err.replace("\r", "\n").strip().splitlines()[-1]
    assert final_bar.startswith("rl: 100%") and "4/4" in final_bar
    assert "reward=2" in final_bar and "accuracy=0.25" in final_bar and "loss" not in final_bar
    # log.progress=False: the same summary lines, no bar.
    with MetricsWriter(
        tmp_path / "quiet", total_steps=4, summary_every=2, tensorboard=False, progress=False
    ) as w:
        for step in range(1, 5):
            w.write(step, {"reward": 0.5 * step})
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 2 and "%" not in captured.err


def test_summary_lines_start_their_own_line_in_a_shared_log(tmp_path):
    """`> log 2>&1` (nohup, Slurm, a detached TPU run): the bar is drawn without a newline, and
    the next summary line was glued to it."""
    script = (
        "from r1jax.metrics import MetricsWriter\n"
        f"with MetricsWriter({str(tmp_path / 'run')!r}, total_steps=3, summary_every=1, "
        "desc='rl', tensorboard=False) as w:\n"
        "    for step in (1, 2, 3):\n"
        "        w.write(step, {'reward': 0.5})\n"
    )
    with open(tmp_path / "log", "w") as log:
        subprocess.run([sys.executable, "-c", script], stdout=log, stderr=log, check=True)
    lines = (tmp_path / "log").read_text().replace("\r", "\n").splitlines()
    summaries = [x for x in lines if "step " in x and " | reward" in x]
    assert len(summaries) == 3 and all(x.startswith("step ") for x in summaries), lines


def test_other_processes_write_and_print_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    with MetricsWriter(tmp_path / "run", total_steps=2, summary_every=1) as w:
        assert w.write(1, {"reward": 1.0}) == {}
        w.log("hello")
    assert not (tmp_path / "run").exists()
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


# --------------------------------------------------------------------------------------------------
# Cloud workdirs (gs://), through r1jax.paths
# --------------------------------------------------------------------------------------------------


def test_cloud_workdir_is_written_through_the_path_layer(fake_gcs, tmp_path, monkeypatch):  # noqa: F811
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # a plain open/makedirs of "gs://..." would land here
    monkeypatch.setenv("R1JAX_HOME", str(home))
    run = "gs://bucket/run"
    jsonl = run + "/metrics.jsonl"

    with MetricsWriter(run, summary_every=0, sync_secs=0.0) as w:
        w.write(1, {"reward": 0.5})
        # Uploaded as the run goes (sync_secs=0): the bucket already has step 1.
        assert [r["step"] for r in read_metrics(jsonl)] == [1]
        w.write(2, {"reward": 0.75})
    assert [(r["step"], r["reward"]) for r in read_metrics(jsonl)] == [(1, 0.5), (2, 0.75)]
    (tb_file,) = fake_gcs.names(run + "/tb")
    assert scalars(parse_events(fake_gcs.read(tb_file)), "reward") == {1: 0.5, 2: 0.75}
    # The working copy of the growing files lives under $R1JAX_HOME.
    assert paths.staging_dir(run) == str(home / "staging" / "gs" / "bucket" / "run")
    assert read_metrics(home / "staging/gs/bucket/run/metrics.jsonl") == read_metrics(jsonl)

    # Resumed from the step-1 checkpoint on another machine (no working copy): the bucket's
    # history is cut after step 1 and continued.
    shutil.rmtree(home)
    with MetricsWriter(run, start_step=1, summary_every=0, sync_secs=1e9) as w:
        w.write(2, {"reward": 7.0})
        w.write(3, {"reward": 8.0})
    assert [(r["step"], r["reward"]) for r in read_metrics(jsonl)] == [(1, 0.5), (2, 7.0), (3, 8.0)]
    tb_files = fake_gcs.names(run + "/tb")
    assert len(tb_files) == 2
    events = [e for f in tb_files for e in parse_events(fake_gcs.read(f))]
    purges = [e.step for e in events if e.session_log.status == event_pb2.SessionLog.START]
    assert sorted(purges) == [0, 2]  # the first run's (from scratch) and the resumed one's

    # Killed between uploads (the bucket misses steps 4-5), resumed from the step-4 checkpoint on
    # the same machine: the working copy, which reaches further, supplies step 4.
    w = MetricsWriter(run, start_step=3, summary_every=0, sync_secs=1e9, tensorboard=False)
    w.write(4, {"reward": 9.0})
    w.write(5, {"reward": 10.0})
    monkeypatch.setattr(w._staged, "sync", lambda **kw: 0)  # the kill: no final upload
    w.close()
    assert [r["step"] for r in read_metrics(jsonl)] == [1, 2, 3]
    with MetricsWriter(run, start_step=4, summary_every=0, tensorboard=False) as w:
        w.write(5, {"reward": 11.0})
    assert [(r["step"], r["reward"]) for r in read_metrics(jsonl)][3:] == [(4, 9.0), (5, 11.0)]
    # A stage flushes when it saves a checkpoint: the bucket then has every row up to that step,
    # however far the next timed upload is.
    with MetricsWriter(run, start_step=5, summary_every=0, sync_secs=1e9, tensorboard=False) as w:
        w.write(6, {"reward": 12.0})
        assert [r["step"] for r in read_metrics(jsonl)][-1] == 5
        w.flush()
        assert [r["step"] for r in read_metrics(jsonl)][-1] == 6

    # Plots read and write the bucket too.
    png = run + "/plots/curves.png"
    assert plot_metrics(jsonl, png, keys=("reward",)) == ["reward"]
    assert fake_gcs.read(png)[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(cwd) == []  # nothing went to a local "gs:" directory


def test_a_cloud_workdir_run_on_several_machines_keeps_every_machines_rows_and_log(
    fake_gcs,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    """A machine's copies left by an earlier run replaced what other machines wrote since: the
    log of a run resumed elsewhere (A, then B, then A again: B's lines gone), and rows of another
    history chosen for having more of them. Two runs on one machine were not refused."""
    import logging

    from r1jax.stages import common

    run = "gs://bucket/run"
    jsonl = run + "/metrics.jsonl"
    home_a, home_b = tmp_path / "a", tmp_path / "b"

    def log_line(home, line):
        monkeypatch.setenv("R1JAX_HOME", str(home))
        handler = common.WorkdirLogFile(run, "log_p0.txt")
        handler.emit(logging.LogRecord("r1jax", logging.INFO, __file__, 1, line, None, None))
        handler.close()

    log_line(home_a, "A: steps 1-20")
    log_line(home_b, "B: steps 21-40")
    log_line(home_a, "A: steps 41-60")
    assert (
        paths.read_text(run + "/log_p0.txt").split()
        == "A: steps 1-20 B: steps 21-40 A: steps 41-60".split()
    )

    kw = dict(summary_every=0, tensorboard=False, progress=False)
    monkeypatch.setenv("R1JAX_HOME", str(home_a))
    with MetricsWriter(run, **kw) as w:  # A, with an eval row at step 0
        w.write(0, {"eval/accuracy": 0.1})
        for step in range(1, 6):
            w.write(step, {"reward": 100.0 + step})
    fake_gcs.rm("/bucket/run", recursive=True)  # wiped, started over on B
    monkeypatch.setenv("R1JAX_HOME", str(home_b))
    with MetricsWriter(run, **kw) as w:
        for step in range(1, 6):
            w.write(step, {"reward": float(step)})
    monkeypatch.setenv("R1JAX_HOME", str(home_a))  # resumed on A from B's step-4 checkpoint
    with MetricsWriter(run, start_step=4, **kw) as w:
        w.write(5, {"reward": 5.5})
    got = [(r["step"], r.get("reward")) for r in read_metrics(jsonl)]
    assert got == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.5)]

    held = common.lock_workdir(run)  # (on this machine's working copies)
    with pytest.raises(common.ConfigError, match=r"in use by another r1jax run"):
        common.lock_workdir(run)
    held.close()
    common.lock_workdir(run).close()
    # $R1JAX_HOME as an env file may spell it: expanded, absolute.
    monkeypatch.setenv("R1JAX_HOME", "~/r1")
    assert paths.r1jax_home() == os.path.join(os.path.expanduser("~"), "r1")


def test_unsupported_workdir_schemes_are_refused():
    with pytest.raises(ValueError, match="unsupported scheme"):
        paths.check_workdir("memory://run")
    paths.check_workdir("runs/rl")  # local: fine
    # One slash lost (pathlib and normpath drop one): was a local folder named "gs:".
    for typo in ("gs:/bucket/run", "gs:bucket/run"):
        with pytest.raises(ValueError, match="a cloud URI takes two slashes: 'gs://bucket/run'"):
            paths.check_workdir(typo)


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------


def test_plot_written_with_present_keys_only(tmp_path):
    with MetricsWriter(tmp_path, summary_every=0, tensorboard=False) as w:
        for step in range(1, 41):
            w.write(step, {"reward": np.sin(step / 5), "kl": 0.01 * step, "loss": float("nan")})
    out = tmp_path / "plots" / "curves.png"
    assert plot_metrics(tmp_path / "metrics.jsonl", out) == ["reward", "kl"]
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(out) > 5000  # two panels with lines, not an empty canvas
    # A key whose every value is NaN is skipped like a missing one; nothing matches -> no file.
    none = tmp_path / "none.png"
    assert plot_metrics(tmp_path / "metrics.jsonl", none, keys=("loss", "absent")) == []
    assert not none.exists()


# --------------------------------------------------------------------------------------------------
# Compile counter
# --------------------------------------------------------------------------------------------------


def test_compile_counter_counts_new_shapes_not_repeats(caplog):
    @jax.jit
    def scaled_sum(x):
        return (2.0 * x).sum()

    x3, x3b, x4 = np.ones(3, np.float32), np.zeros(3, np.float32), np.ones(4, np.float32)
    with caplog.at_level("INFO", logger=metrics.__name__):
        with CompileCounter() as compiles:
            scaled_sum(x3).block_until_ready()
            assert compiles.count == 1
            scaled_sum(x3b).block_until_ready()  # same shape: cached, no compile
            assert compiles.count == 1
            scaled_sum(x4).block_until_ready()  # new shape: one more
            assert compiles.count == 2
    assert compiles.by_name() == {"jit(scaled_sum)": 2}
    assert all(s >= 0 for s in compiles.seconds)
    assert "XLA compile #2: jit(scaled_sum)" in caplog.text
    # Stopped: a further compile is not counted.
    scaled_sum(np.ones(5, np.float32)).block_until_ready()
    assert compiles.count == 2
