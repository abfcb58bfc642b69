"""The stages end to end, in-process: each default config (shrunk by overrides) runs a few steps,
the smoke pipeline runs once, checkpoints that are half-written or damaged are handled inside a
stage, and the pure pieces (rejection filters, eval metrics) are checked on hand-made samples.

The toy base model and the reference GRPO run come from tests/stage_helpers.py (built once per
session, shared with test_cli.py and test_multiprocess.py).
"""

import copy
import glob
import itertools
import json
import logging
import math
import os
import re
import shutil
import time
import types

import numpy as np
import pytest
import safetensors.numpy
import stage_helpers as sh

from r1jax import data
from r1jax.checkpoint import CheckpointError
from r1jax.stages import common, pipeline
from r1jax.stages.eval import aggregate, majority_vote, pass_at_k, score_prompt
from r1jax.stages.rejection_sampling import DROP_REASONS, filter_samples


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """(R1JAX_HOME with the tiny toy base, the pretrain stage's workdir)."""
    with sh.toy_home(tmp_path_factory) as home_and_workdir:
        yield home_and_workdir


@pytest.fixture(scope="session")
def reference_rl(toy, tmp_path_factory):
    return sh.reference_rl(tmp_path_factory)


def run(stage: str, config, workdir) -> dict:
    common.validate(config, stage)
    return common.run_stage(stage, config, str(workdir))


def toy_params(toy) -> dict[str, np.ndarray]:
    return sh.hf_params(os.path.join(toy[0], "toy_base"))


def assert_hf_folder(path: str) -> None:
    for name in ("config.json", "tokenizer.json"):
        assert os.path.exists(os.path.join(path, name)), f"{name} missing in {path}"
    assert glob.glob(os.path.join(path, "*.safetensors")), f"no weights in {path}"


# --------------------------------------------------------------------------------------------------
# Each stage's default config, a few steps
# --------------------------------------------------------------------------------------------------


def test_toy_base_is_built_once_per_recipe_and_rebuilt_when_the_recipe_changes(
    tmp_path, monkeypatch
):
    from r1jax.stages import pretrain

    runs = []

    def fake_pretrain(config, workdir, *, export_to):  # records the call, writes a stand-in
        runs.append(workdir)
        os.makedirs(export_to, exist_ok=True)
        with open(os.path.join(export_to, "config.json"), "w") as f:
            f.write("{}")

    monkeypatch.setenv("R1JAX_HOME", str(tmp_path))
    monkeypatch.setattr(pretrain, "run", fake_pretrain)
    target = common.resolve_model_path(common.TOY_BASE)
    assert target == common.toy_base_path() and len(runs) == 1
    assert common.resolve_model_path(common.TOY_BASE) == target and len(runs) == 1  # cached
    # A base model left by an older recipe (other stamp, or none) is rebuilt in a fresh run dir.
    common.mark_toy_base(target, "older")
    common.resolve_model_path(common.TOY_BASE)
    os.remove(os.path.join(target, "r1jax_toy_recipe.txt"))
    common.resolve_model_path(common.TOY_BASE)
    assert len(runs) == 3 and runs[0] == runs[1] and common.toy_recipe() in runs[0]
    monkeypatch.setattr(common, "TOY_RECIPE_VERSION", common.TOY_RECIPE_VERSION + 1)
    common.resolve_model_path(common.TOY_BASE)
    assert len(runs) == 4 and runs[3] != runs[0]

    # An interrupted build whose data changed since (a tokenizers upgrade, the same recipe)
    # cannot resume: the way out is deleting that build, not "other settings or --workdir".
    def refused(config, workdir, *, export_to):
        why = f"{workdir}/checkpoints/50 was saved by a run with other settings (data: ...)"
        raise common.ResumeRefused(why + "; ... or another --workdir", why)

    monkeypatch.setattr(pretrain, "run", refused)
    os.remove(os.path.join(target, "r1jax_toy_recipe.txt"))
    with pytest.raises(common.ConfigError) as error:
        common.resolve_model_path(common.TOY_BASE)
    message = str(error.value)
    assert "--workdir" not in message and f"Delete {tmp_path}/toy_base_run-" in message
    assert "checkpoints/50 was saved by a run with other settings (data: ...)" in message


def test_a_damaged_toy_base_says_to_delete_it(toy, tmp_path, monkeypatch):
    """Its weights truncated (a full disk): the model's error said "re-download or re-save it"."""
    home = tmp_path / "home"
    shutil.copytree(os.path.join(toy[0], "toy_base"), home / "toy_base")
    monkeypatch.setenv("R1JAX_HOME", str(home))
    weights = home / "toy_base" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    config = sh.load_config("eval")
    assert common.load_tokenizer(config) is not None  # (its tokenizer is intact)
    with pytest.raises(common.ConfigError, match=rf"damaged .* delete {home}/toy_base and the"):
        common.load_model(config, mesh=None)
    (home / "toy_base" / "tokenizer.json").write_text("{")
    with pytest.raises(common.ConfigError, match=rf"damaged .* delete {home}/toy_base and the"):
        common.load_tokenizer(config)


def test_pretrain_default_makes_a_loadable_base_model(toy):
    home, workdir = toy
    base = os.path.join(home, "toy_base")
    assert_hf_folder(base)
    rows = sh.metric_rows(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(np.isfinite(r["loss"]) for r in rows)
    # Two copy-task warm-up steps, then the corpus. The loss of an untrained model starts near
    # log(vocab), and the corpus's next-token loss goes down.
    assert [("copy_loss" in r, "lm_loss" in r) for r in rows] == [(True, False)] * 2 + [
        (False, True)
    ] * 3
    with open(os.path.join(base, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    assert abs(rows[0]["copy_loss"] - np.log(vocab)) < 0.5
    assert abs(rows[2]["lm_loss"] - np.log(vocab)) < 1.0
    assert rows[-1]["lm_loss"] < rows[2]["lm_loss"]
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "5"))
    # The folder is a real HF checkpoint: transformers reads the config and the tokenizer.
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(base)
    assert (cfg.hidden_size, cfg.num_hidden_layers) == (32, 2)
    tok = transformers.AutoTokenizer.from_pretrained(base)
    assert tok.decode(tok("<think>1+2</think>")["input_ids"]) == "<think>1+2</think>"
    # The later stages read the base's text as pretraining did (tokenizer.json): transformers 5
    # builds qwen2 folders' tokenizers with Qwen's own pre-tokenizer and NFC, which split a third
    # of the corpus's documents otherwise ("x\n\ny": one "\n\n" token, not two).
    import tokenizers

    from r1jax.models import hf

    written = tokenizers.Tokenizer.from_file(os.path.join(base, "tokenizer.json"))
    loaded = hf.tokenizer(base)
    for text in ("x\n\ny", "Cafe\u0301 12 + 3 = 15.\n\n<answer>15</answer>"):
        ids = loaded(text, add_special_tokens=False)["input_ids"]
        assert ids == written.encode(text, add_special_tokens=False).ids, text
    # Its tokenizer_config.json is one transformers 4.x reads too (5.x writes "TokenizersBackend"
    # and a list of extra special tokens, which 4.x refuses).
    with open(os.path.join(base, "tokenizer_config.json")) as f:
        written_config = json.load(f)
    assert written_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert not isinstance(written_config.get("extra_special_tokens"), list)


@pytest.mark.parametrize("resume_at", [1, 2, 3])  # inside the warm-up, at its end, after it
def test_pretrain_resumed_across_the_copy_warm_up_matches_an_uninterrupted_run(
    toy, tmp_path, resume_at
):
    """The warm-up and the corpus have separate optimizers: a run resumed from any checkpoint must
    rebuild the right one (and the corpus phase's fresh one exactly at the boundary)."""
    config = sh.pretrain_config()  # 2 warm-up steps, then 3 corpus steps
    config.ckpt.every, config.ckpt.keep = 1, 10
    run("pretrain", config, tmp_path / "run")
    for step in range(resume_at + 1, 6):  # as if killed right after saving step `resume_at`
        shutil.rmtree(tmp_path / "run" / "checkpoints" / str(step))
    shutil.rmtree(tmp_path / "run" / "hf")
    out = run("pretrain", config, tmp_path / "run")
    resumed = sh.hf_params(str(tmp_path / "run" / "hf" / "final"))
    for name, value in toy_params(toy).items():
        np.testing.assert_allclose(resumed[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    assert [r["step"] for r in sh.metric_rows(str(tmp_path / "run"))] == [1, 2, 3, 4, 5]
    # Stopped after saving its last step, before exporting (Ctrl-C there saves, then stops): the
    # rerun exports, and still reports the tag-copy check the pipeline's gate reads (it had none).
    shutil.rmtree(tmp_path / "run" / "hf")
    again = run("pretrain", config, tmp_path / "run")
    assert again["tag_copy"] == pytest.approx(out["tag_copy"], abs=1e-6)
    assert (tmp_path / "run" / "hf" / "final" / "model.safetensors").exists()
    if resume_at != 3:
        return
    # A resume that would read other rows at each step, or that asks for fewer steps than were
    # run, is refused (it resumed: another batch size read rows twice, and the model trained
    # past the steps asked for was exported as final).
    shutil.rmtree(tmp_path / "run" / "hf")
    for field, value, named in (
        ("pretrain.batch_size", 2 * config.pretrain.batch_size, "batch_size: "),
        ("pretrain.corpus_docs", config.pretrain.corpus_docs + 8, "data: "),
        ("pretrain.steps", config.pretrain.steps - 1, "past the 4 steps"),
    ):
        changed = sh.set_fields(copy.deepcopy(config), {field: value})
        with pytest.raises(common.ConfigError, match=rf"checkpoints/5 .*{named}"):
            run("pretrain", changed, tmp_path / "run")


@pytest.mark.parametrize("warm", [0, 2])
def test_pretrain_learning_rates_follow_each_phase_schedule(tmp_path, warm):
    """The corpus phase runs optim.* over pretrain.steps whether or not a warm-up came first; the
    warm-up runs at copy_warmup_lr."""
    from r1jax import train

    config = sh.pretrain_config()
    config.pretrain.copy_warmup_steps = warm
    run("pretrain", config, tmp_path)
    lrs = [r["learning_rate"] for r in sh.metric_rows(str(tmp_path))]
    corpus = train.learning_rate_schedule(common.optim(config, config.pretrain.steps))
    expected = [float(corpus(i)) for i in range(config.pretrain.steps)]
    np.testing.assert_allclose(lrs[warm:], expected, rtol=1e-6)
    if warm:
        assert lrs[warm - 1] == pytest.approx(config.pretrain.copy_warmup_lr)


def test_copy_task_rows_repeat_each_string_and_score_only_the_predictable_repetition():
    from r1jax.stages import pretrain

    alphabet = np.arange(100, 160, dtype=np.int32)
    for shape in [(4, 256), (3, 64), (2, 33)]:
        ids, mask = pretrain.copy_rows(alphabet, step=7, shape=shape, seed=1)
        assert ids.shape == mask.shape == shape and set(np.unique(ids)) <= set(alphabet)
        for r in range(shape[0]):
            # Each run of scored positions [s, e) is a string's repetition minus its first token:
            # the string is ids[s - 1 - k : s - 1] with k = e - s + 1, repeated at [s - 1, e).
            edges = np.flatnonzero(np.diff(np.r_[0, mask[r], 0]))
            assert len(edges) >= 2
            for s, e in zip(edges[::2], edges[1::2], strict=True):
                k = e - s + 1
                assert pretrain.COPY_MIN <= k <= pretrain.COPY_MAX
                np.testing.assert_array_equal(ids[r, s - 1 : e], ids[r, s - 1 - k : s - 1])
    same = pretrain.copy_rows(alphabet, step=7, shape=(4, 256), seed=1)
    other = pretrain.copy_rows(alphabet, step=8, shape=(4, 256), seed=1)
    np.testing.assert_array_equal(same[0], pretrain.copy_rows(alphabet, 7, (4, 256), 1)[0])
    assert not np.array_equal(same[0], other[0])


def test_recall_rows_score_only_a_tokens_successor_in_its_string():
    from r1jax.stages import pretrain

    alphabet = np.arange(100, 400, dtype=np.int32)
    ids, mask = pretrain.recall_rows(alphabet, step=3, shape=(4, 256), seed=1)
    assert ids.shape == mask.shape == (4, 256) and set(np.unique(ids)) <= set(alphabet)
    for r in range(4):
        scored = np.flatnonzero(mask[r])
        assert len(scored) >= 8
        for t in scored:
            # The query token ids[t-1] occurred earlier, in a string, followed by ids[t] there.
            earlier = np.flatnonzero(ids[r, : t - 1] == ids[r, t - 1])
            assert any(ids[r, e + 1] == ids[r, t] for e in earlier), (r, t)
    mixed, mixed_mask = pretrain.warm_up_rows("mixed", alphabet, 3, (4, 256), 1)
    np.testing.assert_array_equal(mixed[:2], pretrain.recall_rows(alphabet, 3, (2, 256), 1)[0])
    np.testing.assert_array_equal(mixed[2:], pretrain.copy_rows(alphabet, 3, (2, 256), 1)[0])


def test_pretrain_tag_copy_check_matches_transformers(tmp_path):
    """The stage's "tag_copy" metric is the mean probability, under the saved checkpoint run by
    transformers in float64, of each tag name's first token where the document named it before;
    copy-task rows in the corpus batches leave the stage's outputs intact."""
    import torch
    import transformers

    from r1jax.stages import pretrain

    config = sh.pretrain_config()
    p = config.pretrain
    p.copy_rows_in_corpus, p.tag_copy_every = 2, 2
    run("pretrain", config, tmp_path)
    rows = sh.metric_rows(str(tmp_path))
    assert [r["step"] for r in rows if "tag_copy" in r] == [2, 4, 5]  # every 2 steps and the last
    path = str(tmp_path / "hf" / "final")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    ids, mask = pretrain.tag_copy_rows(
        tok, p.seq_len, pretrain.TAG_COPY_DOCS, config.seed, p.tag_names
    )
    assert mask.sum() >= pretrain.TAG_COPY_DOCS  # most documents repeat a tag within 64 tokens
    for r, t in zip(*np.nonzero(mask), strict=True):
        # A tag opened here whose name the document's text already opened a tag with.
        name = tok.decode(ids[r, t : t + 1])
        assert tok.decode(ids[r, t - 1 : t]).endswith("<")
        assert "<" + name in tok.decode(ids[r, :t]).replace("< ", "<"), (name, r, t)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float64)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.from_numpy(ids[:, :-1]).long()).logits, -1)
    probs = torch.gather(logp, -1, torch.from_numpy(ids[:, 1:, None]).long()).exp()[..., 0]
    expected = probs.numpy()[mask[:, 1:] > 0].mean()
    assert rows[-1]["tag_copy"] == pytest.approx(expected, rel=1e-4)


def test_a_tag_copy_check_that_cannot_measure_is_refused(tmp_path):
    """No held-out document repeats a tag name within 24 tokens: the check read NaN, which the
    stage's warning and the pipeline's gate (both `< 0.3`) let pass."""
    config = sh.pretrain_config()
    config.pretrain.seq_len, config.pretrain.copy_warmup_steps = 24, 0
    with pytest.raises(common.ConfigError, match=r"seq_len=24 is too short for the tag-copy"):
        run("pretrain", config, tmp_path / "run")
    with pytest.raises(common.ConfigError, match=r"probability nan"):
        pipeline._check_copies_tags("base", {"tag_copy": float("nan")}, "base")


@pytest.mark.parametrize("deadline", [0, 1])  # at the end of the warm-up, or a corpus step later
def test_pretrain_starts_over_from_a_new_initialisation_when_copying_never_starts(
    tmp_path, deadline
):
    """An attempt still at the no-copying level at the deadline is abandoned, its records kept; the
    next starts from a new seed in workdir/restart1, and the last attempt runs to the end. A rerun
    continues that restart rather than beginning again."""
    from r1jax import checkpoint
    from r1jax.stages import pretrain

    config = sh.pretrain_config()  # 2 warm-up steps, then 3 corpus steps
    p = config.pretrain
    p.tag_copy_restarts, p.tag_copy_deadline = 1, deadline  # nothing copies this early
    checked = p.copy_warmup_steps + deadline
    out = run("pretrain", config, tmp_path)
    assert out["restarts"] == 1
    marker = json.loads((tmp_path / "restart1" / pretrain.RESTART_FILE).read_text())
    assert marker["seed"] == pretrain.attempt_seed(config.seed, 1) != config.seed
    assert (
        marker["abandoned"]["step"] == checked
        and marker["abandoned"]["tag_copy"] < pretrain.TAG_COPY_START
    )
    first, second = sh.metric_rows(str(tmp_path)), sh.metric_rows(str(tmp_path / "restart1"))
    assert [r["step"] for r in first] == list(range(1, checked + 1))
    assert [r["step"] for r in second] == [1, 2, 3, 4, 5]
    assert first[0]["loss"] != second[0]["loss"]  # another initialisation and copy-task data
    assert checkpoint.Checkpointer(str(tmp_path / "checkpoints")).latest_step() == checked
    final = safetensors.numpy.load_file(str(tmp_path / "hf" / "final" / "model.safetensors"))

    again = run("pretrain", config, tmp_path)
    assert again["restarts"] == 1 and not (tmp_path / "restart2").exists()
    assert [r["step"] for r in sh.metric_rows(str(tmp_path / "restart1"))] == [1, 2, 3, 4, 5]
    resumed = safetensors.numpy.load_file(str(tmp_path / "hf" / "final" / "model.safetensors"))
    for name, value in final.items():
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)


def test_pretrain_restart_decision_takes_the_best_check_up_to_the_deadline(tmp_path, monkeypatch):
    """A base whose checks swing (one of seed 2's students: 0.34, 0.18, then 0.050 at the deadline,
    0.87 in the end) has started to copy and is kept, also across a resume (the best check is in
    the checkpoints); one whose checks never reach the bar is abandoned, its best recorded."""
    from r1jax.stages import pretrain

    class Interrupted(Exception):
        pass

    def checks(*values):  # the tag-copy check's results, in order; None: the run dies there
        it = iter(values + (0.0,) * 10)

        def check(*args):
            value = next(it)
            if value is None:
                raise Interrupted
            return value

        monkeypatch.setattr(pretrain, "tag_copy_probability", check)

    config = sh.pretrain_config()  # 2 warm-up steps, then 3 corpus steps
    p = config.pretrain
    p.tag_copy_every, p.tag_copy_restarts, p.tag_copy_deadline = 1, 1, 1  # deadline: step 3
    config.ckpt.every, config.ckpt.async_save = 1, False
    start = pretrain.TAG_COPY_START
    checks(2 * start, start / 2, None)  # dies at step 3's check, after step 2's checkpoint
    with pytest.raises(Interrupted):
        run("pretrain", config, tmp_path / "kept")
    checks(start / 2)  # step 3 again, then the rest
    assert run("pretrain", config, tmp_path / "kept")["restarts"] == 0
    assert not (tmp_path / "kept" / "restart1").exists()

    checks(float("nan"), start * 0.9, start / 4)  # a NaN check (diverged) counts as none
    out = run("pretrain", config, tmp_path / "abandoned")
    marker = json.loads((tmp_path / "abandoned" / "restart1" / pretrain.RESTART_FILE).read_text())
    assert out["restarts"] == 1
    assert marker["abandoned"] == {"tag_copy": start / 4, "best_tag_copy": start * 0.9, "step": 3}


def test_pretrain_refuses_restarts_it_could_not_decide(tmp_path):
    """Rows too short to reach a repeated tag name give the check nothing to measure (NaN): with
    restarts on, that is a config error before any training, not a run that never restarts."""
    from r1jax.stages import common

    config = sh.pretrain_config()
    p = config.pretrain
    p.seq_len, p.copy_warmup_steps = 16, 0
    p.tag_copy_restarts, p.tag_copy_deadline = 1, 1
    common.validate(config, "pretrain")  # fine as a config: the lengths are known only tokenized
    with pytest.raises(common.ConfigError, match=r"pretrain.seq_len=16 is too short for the tag"):
        run("pretrain", config, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_a_corpus_shorter_than_one_row_is_refused(tmp_path):
    from r1jax.stages import common

    config = sh.pretrain_config()
    config.pretrain.corpus_docs, config.pretrain.seq_len = 1, 512  # (a ZeroDivisionError)
    with pytest.raises(common.ConfigError, match=r"corpus_docs=1 documents make no row"):
        run("pretrain", config, tmp_path)


def test_one_run_at_a_time_builds_the_toy_base(tmp_path, monkeypatch):
    """Two runs needing the toy base at once both trained it in one folder (interleaved metrics)
    and both swapped their export into place (one lost its folder mid-write)."""
    import threading
    import time

    from r1jax.stages import common

    monkeypatch.setenv("R1JAX_HOME", str(tmp_path / "home"))
    entered = []

    def second():
        with common._toy_base_lock():
            entered.append(time.monotonic())

    with common._toy_base_lock():
        waiting = threading.Thread(target=second)
        waiting.start()
        time.sleep(0.5)
        assert not entered  # it waits for the first
        released = time.monotonic()
    waiting.join(timeout=10)
    assert entered and entered[0] >= released
    # A file system without locks (NFS without its lock daemon): built without, warned (it was a
    # traceback for every run with model.path='toy').
    import errno
    import fcntl

    def no_locks(f, op):
        raise OSError(errno.ENOLCK, "No locks available")

    with monkeypatch.context() as m:
        m.setattr(fcntl, "flock", no_locks)
        with common._toy_base_lock():
            entered.append("without a lock")
    assert entered[-1] == "without a lock"
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("R1JAX_HOME", str(tmp_path / "file" / "home"))  # cannot be made
    with pytest.raises(common.ConfigError, match=r"R1JAX_HOME .* cannot be written"):
        with common._toy_base_lock():
            pass


def test_copy_alphabet_is_the_tokenizers_word_and_punctuation_pieces(toy):
    import transformers

    from r1jax.stages import pretrain

    tok = transformers.AutoTokenizer.from_pretrained(os.path.join(toy[0], "toy_base"))
    pieces = [tok.decode([i]) for i in pretrain.copy_alphabet(tok)]
    # The R1-Zero template's tag names and what surrounds them; no digits, no lone bytes.
    assert {"think", "answer", " <", " </", ">"} <= set(pieces)
    for p in pieces:
        assert (p.removeprefix(" ").isalpha() and len(p.strip()) >= 2) or (
            p.isprintable() and not any(c.isalnum() for c in p)
        ), p
    assert not set(pretrain.copy_alphabet(tok)) & set(tok.all_special_ids)


def test_sft_default_runs(toy, tmp_path):
    config = sh.load_config("sft")
    s = config.sft
    s.num_examples, s.epochs, s.batch_size, s.seq_len = 16, 1.0, 8, 256
    out = run("sft", config, tmp_path)
    rows = sh.metric_rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]  # 16 examples / 8 per step
    assert np.isfinite(out["loss"]) and out["num_tokens"] > 0
    assert_hf_folder(tmp_path / "hf" / "final")
    # 2 steps: the 10-step warm-up shortened to a tenth of the run (none), then the cosine decay.
    assert rows[0]["learning_rate"] == pytest.approx(1e-3) and rows[1]["learning_rate"] > 0
    assert sh.max_param_change(sh.hf_params(tmp_path / "hf" / "final"), toy_params(toy)) > 0


def test_batches_cover_each_epoch_once_and_depend_on_the_step_alone():
    n, size, seed = 10, 4, 3
    steps = [common.batch_indices(n, step, size, seed) for step in range(10)]  # 4 epochs
    flat = [i for batch in steps for i in batch]
    for epoch in range(4):
        assert sorted(flat[epoch * n : (epoch + 1) * n]) == list(range(n))
    assert flat[:n] != flat[n : 2 * n]  # (each epoch its own order)
    assert common.batch_indices(n, 7, size, seed) == steps[7]  # (no state: a resume reads it)
    assert common.batch_indices(n, 7, size, seed + 1) != steps[7]
    more = common.batch_indices(3, 0, 8, seed)  # a batch larger than the data: whole epochs
    assert sorted(more[:3]) == sorted(more[3:6]) == [0, 1, 2] and len(set(more[6:])) == 2


def test_sft_resumed_mid_epoch_matches_an_uninterrupted_run(toy, tmp_path):
    """Killed after a step whose batch ran across an epoch's end, a rerun continues with the
    batches, optimizer state and schedule of the run that was not stopped."""
    config = sh.load_config("sft")
    s = config.sft
    s.num_examples, s.epochs, s.batch_size, s.seq_len = 12, 2.0, 8, 128  # 3 steps; 2 crosses
    config.ckpt.every, config.ckpt.keep = 1, 10
    first = run("sft", config, tmp_path / "run")
    final = sh.hf_params(str(tmp_path / "run" / "hf" / "final"))
    losses = [r["loss"] for r in sh.metric_rows(str(tmp_path / "run"))]
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "3")  # as if killed after saving step 2
    shutil.rmtree(tmp_path / "run" / "hf")
    again = run("sft", config, tmp_path / "run")
    resumed = sh.hf_params(str(tmp_path / "run" / "hf" / "final"))
    assert sh.max_param_change(final, toy_params(toy)) > 0
    for name, value in final.items():
        np.testing.assert_allclose(resumed[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    rows = sh.metric_rows(str(tmp_path / "run"))
    assert [r["step"] for r in rows] == [1, 2, 3]
    np.testing.assert_allclose([r["loss"] for r in rows], losses, rtol=1e-5)
    assert again["loss"] == pytest.approx(first["loss"], rel=1e-5)


def test_sft_data_errors_name_the_field_to_fix(toy, caplog):
    """A tokenizer without an EOS token was blamed on sft.seq_len; a dataset smaller than one
    batch trained ~batch_size/rows epochs, unevenly, without a word."""
    from r1jax.models import hf
    from r1jax.stages import sft as sft_stage

    config = sh.load_config("sft")
    config.sft.seq_len, config.sft.batch_size = 64, 8
    tokenizer = hf.tokenizer(os.path.join(toy[0], "toy_base"))
    pairs = [("What is 1 + 1?", "<think>1 + 1</think><answer>2</answer>", "")] * 3
    with caplog.at_level(logging.WARNING, logger="r1jax"):
        batch = sft_stage.tokenized_pairs(config, "sft", tokenizer, pairs)
    assert batch.input_ids.shape[0] == 3
    assert "3 rows for a batch of sft.batch_size=8" in caplog.text
    tokenizer.eos_token = None
    with pytest.raises(common.ConfigError, match=r"^model.path: append_eos=True but .* no EOS"):
        sft_stage.tokenized_pairs(config, "sft", tokenizer, pairs)


def test_a_skipped_update_streak_carries_on_across_a_resume(toy, tmp_path):
    """The streak of skipped updates (`optim.max_skipped_steps`) restarted at 0 on a resume: a
    run stopped mid-streak needed the whole limit again to stop, and then blamed the model it
    resumed from instead of the update that diverged."""
    from r1jax.train import Diverged

    config = sh.load_config("sft")
    s = config.sft
    s.num_examples, s.epochs, s.batch_size, s.seq_len = 24, 1.0, 8, 128  # 3 steps
    config.optim.learning_rate, config.optim.warmup_steps = 1e30, 0  # (steps 2 on overflow)
    config.optim.max_skipped_steps = 3
    run("sft", config, tmp_path)  # steps 2 and 3 skipped; the last step's checkpoint saved
    assert [r["update_skipped"] for r in sh.metric_rows(tmp_path)] == [0, 1, 1]
    s.epochs = 3.0  # 9 steps: the third skipped update in a row is step 4's
    with pytest.raises(Diverged, match=r"^steps 2-4: 3 updates in a row .* step 1 left"):
        run("sft", config, tmp_path)


def test_token_ids_past_the_models_embeddings_are_refused(toy, tmp_path):
    """Format tags added to a tokenizer as special tokens, the embeddings not resized: their ids
    looked past the table (NaN), every SFT update was skipped, and a run shorter than
    optim.max_skipped_steps exported the model unchanged as its result."""
    import transformers

    folder = tmp_path / "added"
    shutil.copytree(os.path.join(toy[0], "toy_base"), folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<think>", "</think>", "<answer>", "</answer>"]}
    )
    tokenizer.save_pretrained(folder)
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    assert len(tokenizer) > vocab
    for stage in ("sft", "rl", "eval", "rejection_sampling"):
        config = sh.load_config(stage)
        config.model.path = str(folder)
        if stage == "sft":
            s = config.sft
            s.num_examples, s.epochs, s.batch_size, s.seq_len = 16, 1.0, 8, 256
        what = "sft data" if stage == "sft" else "prompts"
        with pytest.raises(
            common.ConfigError, match=rf"the {what} holds token id \d+ .* vocab_size {vocab}"
        ):
            run(stage, config, tmp_path / stage)
    assert not (tmp_path / "sft" / "hf").exists()


def test_a_resume_with_settings_that_change_the_data_order_is_refused(toy, tmp_path, caplog):
    """The data position is a function of the step, seed, rows per step and the data: a resume
    with another batch size or seed read rows twice and skipped others, and one with fewer epochs
    than already run exported the model trained past them. Only the step was checked."""
    from r1jax import checkpoint

    config = sh.load_config("sft")
    s = config.sft
    s.num_examples, s.epochs, s.batch_size, s.seq_len = 16, 1.0, 8, 256
    config.ckpt.every = 1
    first = run("sft", config, tmp_path)  # 2 steps, checkpoints 1 and 2
    # Rerun when complete (as after a kill during its export): it exports again and returns its
    # last step's metrics (it returned no loss).
    assert run("sft", config, tmp_path) == first and np.isfinite(first["loss"])
    for field, value, named in (
        ("batch_size", 16, "batch_size: 8 then, 16 now"),
        ("num_examples", 24, "data: "),
        ("mistake_rate", 0.5, "data: "),
    ):
        changed = copy.deepcopy(config)
        changed.sft[field] = value
        with pytest.raises(common.ConfigError, match=rf"checkpoints/2 was saved by .*{named}"):
            run("sft", changed, tmp_path)
    changed = copy.deepcopy(config)
    changed.seed = 1
    with pytest.raises(common.ConfigError, match=r"seed: 0 then, 1 now"):
        run("sft", changed, tmp_path)
    changed = copy.deepcopy(config)
    changed.sft.epochs = 0.5
    with pytest.raises(common.ConfigError, match=r"at step 2, past the 1 steps .*sft.epochs=0.5"):
        run("sft", changed, tmp_path)
    changed = copy.deepcopy(config)
    changed.model.path = str(tmp_path / "hf" / "final")  # another start (the trained model)
    with pytest.raises(common.ConfigError, match=r"model.path: '\w+' then"):
        run("sft", changed, tmp_path)
    changed = copy.deepcopy(config)  # clipping off: another optimizer state (108 state paths)
    changed.optim.max_grad_norm = 0.0
    with pytest.raises(common.ConfigError, match=r"optim.max_grad_norm: '> 0' then, '0 \(no c"):
        run("sft", changed, tmp_path)
    changed = copy.deepcopy(config)  # (refused by 26 arrays' dtypes, not naming the field)
    changed.model.param_dtype = "bfloat16"  # (warned: bfloat16 weights lose small updates)
    with caplog.at_level(logging.WARNING, logger="r1jax"):
        common.validate(changed, "sft")
    assert "an update smaller than 1/256 of its weight rounds away" in caplog.text
    with pytest.raises(common.ConfigError, match=r"model.param_dtype: 'float32' then, 'bfloat16"):
        run("sft", changed, tmp_path)
    changed = copy.deepcopy(config)
    changed.sft.epochs, changed.optim.learning_rate = 2.0, 1e-4  # more steps, another rate: fine
    run("sft", changed, tmp_path)
    # ... but the cosine now spans them: the rate jumps back up at the resume, which is said.
    said = (tmp_path / "log_p0.txt").read_text()
    assert "'cosine' now spans 4 optimizer steps (the checkpoint's run: 'cosine' over 2)" in said
    assert [r["step"] for r in sh.metric_rows(tmp_path)] == [1, 2, 3, 4]
    assert checkpoint.Checkpointer(str(tmp_path / "checkpoints")).latest_step() == 4


def test_a_checkpoint_from_before_a_setting_was_recorded_still_resumes():
    """Distillation checkpoints from before the teacher was recorded (no "teacher" key) were
    refused ("teacher: 'absent' then"): a value the checkpoint does not have is not compared."""

    class Saved:  # a checkpoint at step 2 with the older record
        def latest_step(self):
            return 2

        def step_dir(self, step):
            return f"checkpoints/{step}"

        def read_extra(self):
            return {"step": 2, "run": {"seed": 0, "batch_size": 8}}

        def restore(self, model, optimizer):
            return {"step": 2}

    now = {"seed": 0, "batch_size": 8, "teacher": "none (trace SFT)"}
    assert common.resume(Saved(), types.SimpleNamespace(model=None, optimizer=None), now,
                         total_steps=4, steps_field="distill.epochs")["step"] == 2  # fmt: skip
    with pytest.raises(common.ConfigError, match="batch_size: 8 then, 16 now"):
        common.resume(Saved(), types.SimpleNamespace(model=None, optimizer=None),
                      {**now, "batch_size": 16}, total_steps=4, steps_field="")  # fmt: skip
    # Nor a record retired since: the teacher's path, recorded by content now.
    Saved.read_extra = lambda self: {"step": 2, "run": {"seed": 0, "teacher": "/moved/teacher"}}
    now = {"seed": 0, "teacher model": "0123456789abcdef"}
    assert common.resume(Saved(), types.SimpleNamespace(model=None, optimizer=None), now,
                         total_steps=4, steps_field="distill.epochs")["step"] == 2  # fmt: skip
    # But a record this run does not write is compared (SFT resuming a distillation checkpoint).
    Saved.read_extra = lambda self: {"step": 2, "run": {"seed": 0, "teacher model": "01ab"}}
    with pytest.raises(common.ConfigError, match="teacher model: '01ab' then, 'absent' now"):
        common.resume(Saved(), types.SimpleNamespace(model=None, optimizer=None), {"seed": 0},
                      total_steps=4, steps_field="sft.epochs")  # fmt: skip
    # A setting recorded since a release, whose value runs from before it had (RL's mini-batches:
    # 1): compared as that value, so such a run resumed with 16 is refused.
    Saved.read_extra = lambda self: {"step": 2, "run": {"seed": 0}}
    then = {"rl.num_mini_batches": 1}
    assert common.check_resume(Saved(), {"seed": 0, "rl.num_mini_batches": 1}, total_steps=4,
                               steps_field="", then=then)["step"] == 2  # fmt: skip
    with pytest.raises(common.ConfigError, match="rl.num_mini_batches: 1 then, 16 now"):
        common.check_resume(Saved(), {"seed": 0, "rl.num_mini_batches": 16}, total_steps=4,
                            steps_field="", then=then)  # fmt: skip


def test_sft_rows_with_a_completion_that_is_not_text_are_refused_by_name(toy, tmp_path):
    """`completion: 42` crashed in the tokenizer with a traceback, `["a", "b"]` trained on "ab"
    and blank text on an EOS alone; distillation's errors named `sft.source`. The error names the
    file's line (it named the row's index among the rows kept, one less here)."""
    from r1jax.models import hf
    from r1jax.stages import distill
    from r1jax.stages import sft as sft_stage

    tokenizer = hf.tokenizer(os.path.join(toy[0], "toy_base"))
    for i, bad in enumerate([42, ["a", "b"], "   ", {"text": "x"}]):
        path = tmp_path / f"bad{i}.jsonl"
        path.write_text(
            json.dumps({"prompt": "q", "completion": "fine"}) + "\n"
            + json.dumps({"prompt": "q", "completion": bad}) + "\n"
        )  # fmt: skip
        config = sh.load_config("sft")
        config.sft.source = str(path)
        with pytest.raises(
            common.ConfigError, match=rf"sft.source .*bad{i}.jsonl:2: .* non-empty text"
        ):
            sft_stage.load_pairs(config, tokenizer)
    config = sh.load_config("distill")
    config.distill.source = str(tmp_path / "bad0.jsonl")
    with pytest.raises(common.ConfigError, match=r"^distill.source .*bad0.jsonl:2: "):
        sft_stage.load_pairs(distill._as_sft(config), tokenizer, section="distill")


def test_sft_trains_after_a_think_tag_its_prompt_already_opened(toy, tmp_path):
    """Rejection sampling writes the whole "<think>…" format; a chat template that opens the
    block itself (DeepSeek-R1-Distill's) or sft.prefill_think put the tag in the prompt, and SFT
    trained a second one (a model that then writes <think> twice fails every format check)."""
    import copy

    from r1jax.models import hf
    from r1jax.stages import sft as sft_stage

    tokenizer = copy.deepcopy(hf.tokenizer(os.path.join(toy[0], "toy_base")))
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
    )
    generated = "I add 2 and 2.\n</think>\n<answer>4</answer>"
    path = tmp_path / "rs.jsonl"
    path.write_text(json.dumps({"prompt": "What is 2 + 2?", "completion": "<think>\n" + generated}))
    config = sh.load_config("sft")
    config.sft.source, config.sft.template = str(path), "chat"
    [(prompt, completion, _)] = sft_stage.load_pairs(config, tokenizer)
    assert prompt.endswith("assistant\n<think>\n") and completion == generated
    # The R1-Zero template with prefill_think: the sampled sequence " <think>" + generation.
    path.write_text(json.dumps({"prompt": "What is 2 + 2?", "completion": "<think> " + generated}))
    config.sft.template, config.sft.prefill_think = "r1_zero", True
    [(prompt, completion, _)] = sft_stage.load_pairs(config, tokenizer)
    assert prompt.endswith("Assistant: <think>") and completion == " " + generated
    config.sft.prefill_think = False  # the tag stays in the completion, once
    [(prompt, completion, _)] = sft_stage.load_pairs(config, tokenizer)
    assert prompt.endswith("Assistant:") and completion == "<think> " + generated
    # A row with no reasoning (non-reasoning data) closes the block its prompt opened, empty, as
    # R1's do; it trained the model to answer, and stop, inside the block.
    path.write_text(json.dumps({"prompt": "Say hello.", "completion": "Hello!"}))
    config.sft.template = "chat"
    [(prompt, completion, _)] = sft_stage.load_pairs(config, tokenizer)
    assert prompt + completion == prompt[: -len("<think>\n")] + "<think>\n\n</think>\n\nHello!"
    # Nothing but the tag its prompt opened: no text to learn, refused (it trained on EOS alone).
    path.write_text(json.dumps({"prompt": "What is 2 + 2?", "completion": "<think>\n"}))
    config.sft.template = "chat"
    with pytest.raises(
        common.ConfigError, match=r"rs.jsonl:1: .* must be non-empty text \(after the"
    ):
        sft_stage.load_pairs(config, tokenizer)
    config.sft.template, config.sft.prefill_think = "plain", True  # (did nothing)
    with pytest.raises(common.ConfigError, match=r"sft.prefill_think needs a template"):
        common.validate(config, "sft")


# Llama 3.1's chat template, abridged: it writes the BOS itself, a system turn with a date always.
LLAMA31_TEMPLATE = (
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{%- set system_message = "
    "messages[0]['content']|trim %}{%- set messages = messages[1:] %}{%- else %}{%- set "
    'system_message = "" %}{%- endif %}{%- if not date_string is defined %}{%- set date_string = '
    '"26 Jul 2024" %}{%- endif %}{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}'
    '{{- "Cutting Knowledge Date: December 2023\\n" }}{{- "Today Date: " + date_string + '
    '"\\n\\n" }}{{- system_message }}{{- "<|eot_id|>" }}{%- for message in messages %}{{- '
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | "
    "trim + '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}{{- "
    "'<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def test_sft_rows_are_the_chat_templates_own_tokens(toy, tmp_path):
    """An SFT row is transformers' apply_chat_template of the conversation, for a template that
    writes the BOS and a system turn itself (Llama 3.1's, over a tokenizer that also adds a BOS):
    its prompt the very ids generation starts from (the template's generation prompt), its text
    the whole conversation's up to the answer's turn end, the BOS once, the turn end trained.
    (The ids across the prompt's end are the prompt's and the completion's own: a BPE merge
    across it would train a token the sampler never continues a prompt with.)"""
    from tokenizers import AddedToken, processors

    from r1jax.data import templates
    from r1jax.data.batching import tokenize_sft
    from r1jax.models import hf
    from r1jax.stages import sft as sft_stage

    tok = copy.deepcopy(hf.tokenizer(os.path.join(toy[0], "toy_base")))  # (a cached object)
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"]
    tok.add_tokens([AddedToken(t, special=True) for t in [*names, "<|eot_id|>"]])
    tok.bos_token, tok.eos_token = names[0], names[1]
    bos = tok.convert_tokens_to_ids(names[0])
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{names[0]} $A", special_tokens=[(names[0], bos)]
    )
    tok.chat_template = LLAMA31_TEMPLATE
    answer = "<think>\nadd them\n</think>\n<answer>5</answer>"
    conversations = [
        [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": answer}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": answer},
        ],
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    config = sh.load_config("sft")
    config.sft.source, config.sft.template = str(path), "chat"
    pairs = sft_stage.load_pairs(config, tok)
    batch = tokenize_sft(
        tok, [p for p, _, _ in pairs], [c for _, c, _ in pairs], ends=[e for *_, e in pairs],
        seq_len=256,
    )  # fmt: skip

    def ids_of(turns, **kwargs):
        out = templates.apply_chat_template(tok, turns, tokenize=True, **kwargs)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    for i, turns in enumerate(conversations):
        n = int(batch.attention_mask[i].sum())
        ids, trained = batch.input_ids[i, :n].tolist(), batch.loss_mask[i, :n].tolist()
        start = trained.index(1)
        assert ids[:start] == ids_of(turns[:-1], add_generation_prompt=True)
        assert tok.decode(ids) == tok.decode(ids_of(turns))
        assert ids.count(bos) == 1 and all(trained[start:])
        assert tok.decode(ids[start:]) == answer + "<|eot_id|>"


# DeepSeek-R1(-Distill)'s way with history: an earlier answer's reasoning is not shown again.
HISTORY_WITHOUT_REASONING = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant\n"
    "{{ m['content'].split('</think>')[-1].lstrip() }}<|im_end|>\n{% else %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_sft_trains_every_assistant_turn_after_the_turns_before_it(toy, tmp_path, caplog):
    """A conversation trained its last answer only: the earlier ones were context, a multi-turn
    file taught one turn per row. Each answer is now an example after the turns before it, as
    the template renders them when the model answers there (R1's drops earlier reasoning), its
    ids the template's own; a turn without text (a tool call) stays context."""
    from r1jax.data import templates
    from r1jax.data.batching import tokenize_sft
    from r1jax.models import hf
    from r1jax.stages import sft as sft_stage

    tok = copy.deepcopy(hf.tokenizer(os.path.join(toy[0], "toy_base")))
    tok.chat_template = HISTORY_WITHOUT_REASONING
    user = [{"role": "user", "content": q} for q in ("2 + 3?", "Times 4?", "Minus 1?", "Halve?")]
    said = [
        {"role": "assistant", "content": f"<think>\nstep {i}\n</think>\n<answer>{a}</answer>"}
        for i, a in enumerate(("5", "20", "19"))
    ]
    tool = {"role": "assistant", "content": "\n"}  # (a tool call's turn: no text to learn)
    conversation = [user[0], said[0], user[1], said[1], user[2], tool, user[3], said[2]]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": conversation}) + "\n")
    config = sh.load_config("sft")
    config.sft.source, config.sft.template = str(path), "chat"
    with caplog.at_level(logging.INFO, logger="r1jax"):
        pairs = sft_stage.load_pairs(config, tok)
    assert "2 of those turns train as examples of their own" in caplog.text
    assert "1 without text are context only; 3 examples in all" in caplog.text
    answered = [1, 3, 7]  # the turns trained, each after conversation[:j]
    assert [c for _, c, _ in pairs] == [conversation[j]["content"] for j in answered]
    assert "step 0" not in pairs[1][0] and "<answer>5</answer>" in pairs[1][0]
    batch = tokenize_sft(
        tok, [p for p, _, _ in pairs], [c for _, c, _ in pairs], ends=[e for *_, e in pairs],
        seq_len=256,
    )  # fmt: skip
    for i, j in enumerate(answered):
        n = int(batch.attention_mask[i].sum())
        ids, trained = batch.input_ids[i, :n].tolist(), batch.loss_mask[i, :n].tolist()
        start = trained.index(1)
        context = templates.apply_chat_template(
            tok, conversation[:j], tokenize=True, add_generation_prompt=True
        )
        assert ids[:start] == list(context["input_ids"] if hasattr(context, "keys") else context)
        assert all(trained[start:])
        assert tok.decode(ids[start:]) == conversation[j]["content"] + "<|im_end|>"
    # A file holding each turn as a row of its own (as turns="last" needed): an earlier answer
    # that is a row's own trains once, as that row (in any template; twice, in two formats,
    # with R1-Zero's); a conversation repeated (upsampled) keeps its weight.
    prefix_rows = [conversation[:2], conversation[:4]]
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in prefix_rows))
    for template, prefill in (("chat", False), ("r1_zero", False), ("r1_zero", True)):
        config.sft.template, config.sft.prefill_think = template, prefill
        got = [c.removeprefix("\n") for _, c, _ in sft_stage.load_pairs(config, tok)]
        want = [said[0]["content"], said[1]["content"]]
        assert got == ([w.removeprefix("<think>\n") for w in want] if prefill else want), template
    config.sft.prefill_think = False
    path.write_text(json.dumps({"messages": conversation[:4]}) + "\n" * 1)
    path.write_text(path.read_text() * 3)
    assert len(sft_stage.load_pairs(config, tok)) == 6
    config.sft.template = "chat"
    path.write_text(json.dumps({"messages": conversation}) + "\n")
    # A conversation's answers need the chat template, its first one too (the error said "a
    # conversation of 1 turns" and named sft.template, which could not help).
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    with pytest.raises(common.ConfigError, match=r"turn 2: an answer of a conversation .* chat t"):
        sft_stage.load_pairs(config, plain)
    # turns="last": the earlier answers are the prompt's context only.
    config.sft.turns = "last"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="r1jax"):
        [(prompt, completion, _)] = sft_stage.load_pairs(config, tok)
    assert (prompt, completion) == (pairs[-1][0], said[2]["content"])
    assert "only the last turn is trained (sft.turns='last'" in caplog.text
    # A rejection-sampled row (`source: reasoning`): the earlier turns are the prompt's, neither
    # sampled nor graded; they trained as examples, once per kept sample.
    config.sft.turns = "all"
    sampled = {"messages": conversation[:-1], "completion": said[2]["content"]}
    path.write_text(json.dumps({**sampled, "source": "reasoning"}) + "\n")
    assert [c for _, c, _ in sft_stage.load_pairs(config, tok)] == [said[2]["content"]]
    path.write_text(json.dumps(sampled) + "\n")  # (any other row: each answer)
    assert len(sft_stage.load_pairs(config, tok)) == 3
    config.sft.turns = "each"
    with pytest.raises(common.ConfigError, match="sft.turns must be 'all' or 'last'"):
        common.validate(config, "sft")


def test_sft_completions_saved_with_their_special_tokens(toy, tmp_path, caplog):
    """Data exported with its special tokens ("...</answer><|im_end|>") trained the model to
    spell the turn end in characters before the real one, silently."""
    from r1jax.models import hf
    from r1jax.stages import sft as sft_stage

    tokenizer = hf.tokenizer(os.path.join(toy[0], "toy_base"))
    answer = "<think>\nadd\n</think>\n<answer>4</answer>"
    path = tmp_path / "exported.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": c}]}
        for c in (answer + "<|im_end|>\n", answer + "<|im_end|><|endoftext|>", answer)
    ]
    rows.append({"prompt": "2+2?", "completion": "a <|im_start|>user b"})
    earlier = rows[2]["messages"]
    rows[2]["messages"] = [*earlier, {"role": "user", "content": "Again?"}, earlier[-1]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = sh.load_config("sft")
    config.sft.source, config.sft.template = str(path), "chat"
    with caplog.at_level(logging.INFO, logger="r1jax"):
        pairs = sft_stage.load_pairs(config, tokenizer)
    # (row 2's first answer is row 0's example: trained once)
    assert [c for _, c, _ in pairs] == [answer] * 3 + ["a <|im_start|>user b"]
    assert {e for _, _, e in pairs} == {"<|im_end|>"}  # (the token appended in their place)
    assert "sft: 2 completions ended with their end-of-turn text written out" in caplog.text
    assert "1 of 4 completions hold a special token's text" in caplog.text
    assert "exported.jsonl:4" in caplog.text
    assert "sft: 1 rows have assistant turns before their last" in caplog.text
    assert [p.count("<|im_start|>user") for p, _, _ in pairs] == [1, 1, 2, 1]
    assert "1 are examples already (rows of their own)" in caplog.text
    # The R1-Zero template ends with the EOS: its text written out is dropped alike.
    path.write_text(json.dumps({"prompt": "2+2?", "completion": answer + " <|endoftext|> "}))
    config.sft.template = "r1_zero"
    assert [c for _, c, _ in sft_stage.load_pairs(config, tokenizer)] == [answer]


def test_chat_prompts_can_carry_the_format_instruction_as_a_system_message(toy):
    """With the chat template an instruct model was never told about <think>/<answer> (no
    config field could add a system message), while the format rewards ask for them."""
    from r1jax.data import templates
    from r1jax.models import hf
    from r1jax.stages import sft as sft_stage

    tokenizer = hf.tokenizer(os.path.join(toy[0], "toy_base"))
    config = sh.load_config("rl")
    config.data.template, config.data.system_prompt = "chat", "r1"
    common.validate(config, "rl")
    rows = [{"prompt": "What is 2 + 2?", "solution": "4"}]
    prompt = common.PromptSet(rows, tokenizer, config.data, seed=0).prompts[0]
    assert prompt.startswith(f"<|im_start|>system\n{templates.R1_SYSTEM_PROMPT}<|im_end|>")
    config.data.system_prompt = "Be brief."
    assert (
        "system\nBe brief.<|im_end|>"
        in common.PromptSet(rows, tokenizer, config.data, seed=0).prompts[0]
    )
    config.data.system_prompt = ""
    assert "system" not in common.PromptSet(rows, tokenizer, config.data, seed=0).prompts[0]
    # A tokenizer with neither a pad nor an EOS token: refused with the prompts, before the model
    # loads (a TypeError at the first batch, as SFT's own check already refused it).
    import copy

    bare = copy.deepcopy(tokenizer)
    bare.eos_token = bare.pad_token = None
    with pytest.raises(common.ConfigError, match="neither a pad nor an EOS token"):
        common.PromptSet(rows, bare, config.data, seed=0)
    sft = sh.load_config("sft")
    sft.sft.num_examples, sft.sft.template, sft.sft.system_prompt = 2, "chat", "r1"
    common.validate(sft, "sft")
    assert all(templates.R1_SYSTEM_PROMPT in p for p, _, _ in sft_stage.load_pairs(sft, tokenizer))
    sft.sft.template = "r1_zero"  # no system turn to put it in
    with pytest.raises(common.ConfigError, match=r"sft.system_prompt .* needs sft.template='chat'"):
        common.validate(sft, "sft")
    # A chat template that refuses a system message (some Mistral ones) is named, not a jinja
    # traceback.
    refusing = copy.deepcopy(tokenizer)
    refusing.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}"
        "{% endfor %}"
    )
    config.data.system_prompt = "r1"
    with pytest.raises(common.ConfigError, match=r"data.template='chat': .* refused a system"):
        common.PromptSet(rows, refusing, config.data, seed=0)
    sft.sft.template = "chat"
    with pytest.raises(common.ConfigError, match=r"sft.template='chat': .* leave system_prompt"):
        sft_stage.load_pairs(sft, refusing)
    # A template error the system message did not cause is the template's own, not blamed on
    # system_prompt (leaving it empty would not help).
    alternating = copy.deepcopy(tokenizer)
    alternating.chat_template = (
        "{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]"
        "['role'] %}{{ raise_exception('roles must alternate') }}{% endif %}{{ m['content'] }}"
        "{% endfor %}"
    )
    twice = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(Exception, match=r"^roles must alternate$"):
        templates.conversation_prompt(alternating, twice, system="Be brief.")
    with pytest.raises(ValueError, match=r"refused a system message"):
        templates.conversation_prompt(refusing, twice[:1], system="Be brief.")


def test_sft_chat_rows_follow_the_template_rl_samples_with(toy, tmp_path):
    """Rows given as chat `messages` (OpenR1-Math, NuminaMath-CoT) were always rendered with the
    tokenizer's chat template: sft.template, system_prompt and prefill_think were ignored, so
    SFT trained on other prompts than the RL stage then sampled from."""
    from r1jax.data import templates
    from r1jax.models import hf
    from r1jax.stages import sft as sft_stage

    tokenizer = hf.tokenizer(os.path.join(toy[0], "toy_base"))
    question = {"role": "user", "content": "What is 2 + 2?"}
    answer = {"role": "assistant", "content": "<think> 2 + 2 = 4 </think> <answer>4</answer>"}
    rows = [
        {"problem": "What is 2 + 2?", "solution": "4", "messages": [question, answer]},
        {"messages": [{"role": "system", "content": "Be brief."}, question, answer]},
        {"messages": [question, {"role": "assistant", "content": "4"}, question, answer]},
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = sh.load_config("sft")
    config.sft.source = str(path)
    pairs = sft_stage.load_pairs(config, tokenizer)
    assert pairs[0] == (templates.r1_zero_prompt("What is 2 + 2?"), answer["content"], "")
    # A conversation has no R1-Zero form: the chat template, its own system message kept.
    assert pairs[1][0].startswith("<|im_start|>system\nBe brief.<|im_end|>")
    # (its earlier answer trains after its one question, in the chat template as the rest of its
    # conversation: not in two formats)
    assert pairs[2] == (templates.chat_prompt(tokenizer, "What is 2 + 2?"), "4", "<|im_end|>")
    assert pairs[3][0].count("<|im_start|>user") == 2
    config.sft.template, config.sft.system_prompt, config.sft.prefill_think = "chat", "r1", True
    common.validate(config, "sft")
    pairs = sft_stage.load_pairs(config, tokenizer)
    assert pairs[0][0] == templates.chat_prompt(
        tokenizer, "What is 2 + 2?", system=templates.R1_SYSTEM_PROMPT, prefill_think=True
    )
    assert templates.R1_SYSTEM_PROMPT in pairs[3][0] and pairs[3][0].endswith("<think>\n")
    assert pairs[2][1] == "\n</think>\n\n4"  # (no reasoning: the opened block closed empty)
    assert "Be brief." in pairs[1][0] and templates.R1_SYSTEM_PROMPT not in pairs[1][0]
    assert pairs[0][1] == " 2 + 2 = 4 </think> <answer>4</answer>"  # after the prefilled tag
    # Under a chat-templated prompt an answer ends as the template ends a turn, with
    # <|im_end|>, not the tokenizer's EOS (<|endoftext|>): the model must learn to close a turn.
    assert {e for _, _, e in pairs} == {"<|im_end|>"}
    batch = data.tokenize_sft(
        tokenizer, [p for p, _, _ in pairs], [c for _, c, _ in pairs],
        ends=[e for _, _, e in pairs], seq_len=256,
    )  # fmt: skip
    learned = tokenizer.decode(batch.input_ids[0][batch.loss_mask[0] == 1])
    assert learned == pairs[0][1] + "<|im_end|>", learned
    # The prompt's turns as messages and the answer in a column of its own: the whole
    # conversation is the prompt (the first question alone trained the answer to the last).
    later = {"role": "user", "content": "And times 10?"}
    row = {"messages": [question, {"role": "assistant", "content": "4"}, later], "completion": "40"}
    path.write_text(json.dumps(row))
    config.sft.field_map.completion = "completion"
    [earlier, (prompt, completion, end)] = sft_stage.load_pairs(config, tokenizer)
    assert "And times 10?" in prompt and prompt.count("<|im_start|>user") == 2
    assert earlier[1] == "\n</think>\n\n4" and "And times 10?" not in earlier[0]
    # (no reasoning: the think block the prompt opened is closed first)
    assert (completion, end) == ("\n</think>\n\n40", "<|im_end|>")


def test_rl_and_eval_prompts_render_a_conversation_row_whole(toy, tmp_path):
    """A prompt row given as chat turns was sampled from its first user message alone: its own
    system message and earlier turns dropped, and a multi-turn row asked its opening line ("Hi!")
    but graded against the answer to its last question; SFT rendered the whole conversation."""
    import copy

    from r1jax.data import templates
    from r1jax.models import hf
    from r1jax.stages import rl
    from r1jax.stages import sft as sft_stage

    tokenizer = hf.tokenizer(os.path.join(toy[0], "toy_base"))
    system = {"role": "system", "content": "Answer in French."}
    hi, hello = {"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}
    question = {"role": "user", "content": "What is 3 * 5?"}
    rows = [
        {"messages": [system, question, {"role": "assistant", "content": "15"}], "solution": "15"},
        {"prompt": [hi, hello, question], "solution": "15"},  # TRL's conversational prompt
        {"messages": [question, {"role": "assistant", "content": "15"}], "solution": "15"},
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded, _ = data.load_rows(path)
    assert [r["prompt"] for r in loaded] == ["What is 3 * 5?"] * 3  # the question answered
    config = sh.load_config("rl")

    def chat(turns):  # the template itself, independently of r1jax's rendering
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)

    prompts = common.PromptSet(loaded, tokenizer, config.data, seed=0).prompts
    assert prompts == [
        chat([system, question]),
        chat([hi, hello, question]),
        templates.r1_zero_prompt("What is 3 * 5?"),  # one question: the configured template
    ]
    # SFT renders the same rows (with answers) to the same prompts.
    sft = sh.load_config("sft")
    sft.sft.source = str(tmp_path / "sft.jsonl")
    sft.sft.turns = "last"  # (the answers' prompts; earlier turns' own rows: test above)
    reply = {"role": "assistant", "content": "<think> 3 * 5 = 15 </think> <answer>15</answer>"}
    answered = [{"messages": [*templates.turns_before_answer(r), reply]} for r in loaded]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in answered))
    assert [p for p, _, _ in sft_stage.load_pairs(sft, tokenizer)] == prompts
    # Rejection sampling writes a conversation's turns beside the completion, so the SFT on its
    # file trains the prompt the sample was drawn from (it wrote the last question alone).
    from r1jax.stages import rejection_sampling as rs

    written = [rs._sft_row(r, reply["content"]) for r in loaded]
    assert [bool(w.get("messages")) for w in written] == [True, True, False]
    (tmp_path / "rs.jsonl").write_text("".join(json.dumps(w) + "\n" for w in written))
    sft.sft.source = str(tmp_path / "rs.jsonl")
    assert [p for p, _, _ in sft_stage.load_pairs(sft, tokenizer)] == prompts
    # A prompt column the loader (or a field_map) chose wins over one-question turns, and
    # answer-only turns are no conversation of 0 turns.
    one = [{"role": "user", "content": "3*5"}, {"role": "assistant", "content": "15"}]
    assert templates.turns_before_answer({"prompt": "Solve: 3*5?", "messages": one}) == [
        {"role": "user", "content": "Solve: 3*5?"}
    ]
    assert templates.turns_before_answer({"prompt": "Q", "messages": one[1:]}) == [
        {"role": "user", "content": "Q"}
    ]
    # Training rows are left out as copies of held-out ones by their whole conversation (two
    # conversations ending in one follow-up are different prompts).
    follow = {"role": "user", "content": "Continue."}
    talk = [{"prompt": "Continue.", "messages": [{"role": "user", "content": q}, hello, follow]}
            for q in ("Tell a story.", "Count to 3.", "Tell a story.")]  # fmt: skip
    assert common._without_held_out(talk[1:], talk[:1], "f") == talk[1:2]
    # The reward model reads a conversation's turns, a question as its text.
    assert rl._turns_or_question(loaded[1]) == [hi, hello, question]
    assert rl._turns_or_question(loaded[2]) == "What is 3 * 5?"
    # Under a template that opens the think block itself, R1-Zero questions (which do not) and
    # the file's conversations (which would) cannot share one completion prefix: refused.
    opening = copy.deepcopy(tokenizer)
    opening.chat_template = tokenizer.chat_template.replace(
        "<|im_start|>assistant\n", "<|im_start|>assistant\n<think>\n"
    )
    assert chat([question]) != (opened := opening.apply_chat_template(
        [question], tokenize=False, add_generation_prompt=True))  # fmt: skip
    assert opened.endswith("<think>\n")
    with pytest.raises(common.ConfigError, match=r"--config.data.template=chat"):
        common.PromptSet(loaded, opening, config.data, seed=0)
    config.data.template = "chat"
    assert common.PromptSet(loaded, opening, config.data, seed=0).completion_prefix == "<think>\n"
    # Prefilled under r1_zero, a question opens "<think>" and a conversation "<think>\n": each
    # prompt's own is kept for its samples (`sample_and_grade`).
    config.data.template, config.data.prefill_think = "r1_zero", True
    mixed = common.PromptSet(loaded, opening, config.data, seed=0)
    assert {mixed.prefixes[i] for i in (1, 2)} == {"<think>", "<think>\n"}
    # A conversation without a chat template to render it: named.
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    config.data.template = "r1_zero"
    with pytest.raises(common.ConfigError, match=r"chat.jsonl:1: a conversation of 2 turns"):
        common.PromptSet(loaded, bare, config.data, seed=0)


def test_chat_templates_that_write_the_date_get_a_fixed_one(toy):
    """Llama 3.2/3.3 templates write today's date into the system turn: the same data made other
    prompts (and another resume fingerprint) every day."""
    import copy
    import datetime

    from r1jax.data import templates
    from r1jax.models import hf

    tokenizer = copy.deepcopy(hf.tokenizer(os.path.join(toy[0], "toy_base")))
    chat = tokenizer.chat_template
    tokenizer.chat_template = (
        '{%- if not date_string is defined %}{%- set date_string = strftime_now("%d %b %Y") %}'
        "{%- endif %}<|im_start|>system\nToday Date: {{ date_string }}<|im_end|>\n" + chat
    )
    prompt = templates.chat_prompt(tokenizer, "What is 3 * 5?")
    assert prompt.startswith("<|im_start|>system\nToday Date: 26 Jul 2024<|im_end|>"), prompt
    assert templates.turn_end(tokenizer) == "<|im_end|>"
    # Granite 3 and SmolLM3 call strftime_now themselves; the clock outside is today's.
    granite = copy.deepcopy(tokenizer)
    granite.chat_template = "Today's Date: {{ strftime_now('%B %d, %Y') }}.\n" + chat
    prompt = templates.chat_prompt(granite, "What is 3 * 5?")
    assert prompt.startswith("Today's Date: July 26, 2024.\n<|im_start|>"), prompt
    today = granite.apply_chat_template([{"role": "user", "content": "q"}], tokenize=False)
    assert datetime.date.today().strftime("%B %d, %Y") in today


def test_sft_and_distill_files_with_other_column_names_load_through_field_map(tmp_path):
    """Rows with other column names had no way in: the error pointed at a field_map and an
    on_bad_json that the sft and distill sections did not have. (Alpaca's instruction / input /
    output rows are now recognised as they are.)"""
    from r1jax.stages import distill
    from r1jax.stages import sft as sft_stage

    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text(
        "".join(json.dumps({"instruction": f"p{i}", "output": f"c{i}"}) + "\n" for i in range(3))
    )
    config = sh.load_config("sft")
    config.sft.source = str(alpaca)
    assert [c for _, c, _ in sft_stage.load_pairs(config, None)] == ["c0", "c1", "c2"]
    path = tmp_path / "renamed.jsonl"
    path.write_text(
        "".join(json.dumps({"query": f"p{i}", "response": f"c{i}"}) + "\n" for i in range(3))
    )
    config.sft.source = str(path)
    common.validate(config, "sft")
    with pytest.raises(common.ConfigError, match=r"--config.sft.field_map.prompt=COLUMN"):
        sft_stage.load_pairs(config, None)
    config.sft.field_map.prompt, config.sft.field_map.completion = "query", "response"
    pairs = sft_stage.load_pairs(config, None)
    assert [c for _, c, _ in pairs] == ["c0", "c1", "c2"] and "p1" in pairs[1][0]
    with path.open("a") as f:
        f.write("{not json\n")
    with pytest.raises(common.ConfigError, match=r"--config.sft.on_bad_json=skip"):
        sft_stage.load_pairs(config, None)
    config.sft.on_bad_json = "skip"
    assert len(sft_stage.load_pairs(config, None)) == 3
    # A row without an answer the loader knows (GSM8K's is its solution): the field to name it.
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "What is 1 + 1?", "answer": "2"}) + "\n")
    config = sh.load_config("sft")
    config.sft.source = str(gsm)
    with pytest.raises(common.ConfigError, match=r"--config.sft.field_map.completion=COLUMN"):
        sft_stage.load_pairs(config, None)
    config.sft.field_map.completion = "answer"
    assert [c for _, c, _ in sft_stage.load_pairs(config, None)] == ["2"]
    dconfig = sh.load_config("distill")
    dconfig.distill.source = str(path)
    dconfig.distill.field_map.prompt, dconfig.distill.field_map.completion = "query", "response"
    dconfig.distill.on_bad_json = "skip"
    common.validate(dconfig, "distill")
    assert len(sft_stage.load_pairs(distill._as_sft(dconfig), None, section="distill")) == 3


def test_sft_and_distill_name_a_bad_row_before_loading_a_model(toy, tmp_path, monkeypatch):
    """SFT and distillation loaded the model (and the teacher) before reading their data: a bad
    row cost the minutes of loading a large model first."""
    from r1jax.stages import distill
    from r1jax.stages import sft as sft_stage

    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "p", "completion": " "}) + "\n")

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the data was read")

    monkeypatch.setattr(common, "load_model", no_model)
    config = sh.load_config("sft")
    config.sft.source = str(path)
    with pytest.raises(common.ConfigError, match=r"the completion must be non-empty"):
        sft_stage.run(config, str(tmp_path / "sft"))
    config = sh.load_config("distill")
    config.distill.source = str(path)
    with pytest.raises(common.ConfigError, match=r"the completion must be non-empty"):
        distill.run(config, str(tmp_path / "distill"))


def test_sft_warns_once_about_questions_already_templated(tmp_path, caplog):
    """The warning came once per row (SFT templates its rows one at a time): 100k lines."""
    from r1jax.data import templates
    from r1jax.stages import sft as sft_stage

    framed = templates.r1_zero_prompt("What is 2 + 2?")
    path = tmp_path / "framed.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": framed, "completion": "4"}) + "\n" for _ in "abc")
    )
    config = sh.load_config("sft")
    config.sft.source = str(path)
    with caplog.at_level("WARNING", logger="r1jax.data.templates"):
        assert len(sft_stage.load_pairs(config, None)) == 3
    assert [r.getMessage()[:39] for r in caplog.records] == [
        "3 of 3 questions already look templated"
    ]


def test_cold_start_follows_its_tasks_difficulty_and_mistake_rate():
    import re

    from r1jax.stages import sft as sft_stage

    config = sh.load_config("sft")
    s = config.sft
    s.num_examples, s.arithmetic.max_digits = 24, 1
    pairs = sft_stage.load_pairs(config, tokenizer=None)
    assert len(pairs) == 24
    for prompt, completion, _ in pairs:
        a, b = map(int, re.search(r"What is (\d+) [-+] (\d+)\?", prompt).groups())
        assert max(a, b) < 10 and "Wait" not in completion  # 1 digit; mistake_rate 0
    s.mistake_rate = 1.0
    assert all("Wait, that is not right" in c for _, c, _ in sft_stage.load_pairs(config, None))
    s.tasks = ("arithmetic", "sudoku")
    with pytest.raises(common.ConfigError, match=r"sft.tasks: unknown task 'sudoku'"):
        common.validate(config, "sft")


def test_rl_default_runs_and_learns(toy, reference_rl):
    rows = sh.metric_rows(reference_rl)
    # First the starting model's held-out score (eval.at_start, logged as step 0), then a row per
    # step.
    start, rows = rows[0], rows[1:]
    assert start["step"] == 0 and 0 <= start["eval/accuracy"] <= 1
    assert set(start) == {"step"} | {k for k in rows[-1] if k.startswith("eval/")}
    # The names ckpt.best_metric is checked against are the ones logged.
    from r1jax.stages import eval as eval_stage

    names = eval_stage.metric_names(sh.rl_config().eval.num_samples)
    assert set(start) - {"step"} == {"eval/accuracy", *(f"eval/{n}" for n in names)}
    assert [r["step"] for r in rows] == list(range(1, sh.RL_STEPS + 1))
    for key in (
        "reward",
        "rewards/task/mean",
        "rewards/format/mean",
        "loss",
        "grad_norm",
        "completions/mean_length",
        "accuracy",
        "format",
    ):
        assert all(np.isfinite(r[key]) for r in rows), key
    # The reference run is not degenerate: some groups had unequal rewards, so the policy got a
    # gradient and its weights moved (otherwise the resume/multi-process comparisons prove nothing).
    assert min(r["frac_reward_zero_std"] for r in rows) < 1
    assert max(r["grad_norm"] for r in rows) > 0
    final = sh.hf_params(os.path.join(reference_rl, "hf", "final"))
    assert sh.max_param_change(final, toy_params(toy)) > 1e-4
    # Held-out evaluation at the end, checkpoints kept (last 2), plots and TensorBoard written.
    assert 0 <= rows[-1]["eval/accuracy"] <= 1 and "eval/pass@1" in rows[-1]
    assert not any(k.startswith("eval/") for k in rows[0])
    steps = sorted(
        int(d) for d in os.listdir(os.path.join(reference_rl, "checkpoints")) if d.isdigit()
    )
    assert steps == [sh.RL_STEPS - 1, sh.RL_STEPS]
    assert os.path.exists(os.path.join(reference_rl, "rl_curves.png"))
    assert glob.glob(os.path.join(reference_rl, "tb", "events.*"))
    assert_hf_folder(os.path.join(reference_rl, "hf", "final"))
    # Served, the policy stops where its rollouts did (EOS and <|im_end|>), not at EOS alone.
    with open(os.path.join(reference_rl, "hf", "final", "config.json")) as f:
        eos = json.load(f)["eos_token_id"]
    from r1jax.models import hf

    tokenizer = hf.tokenizer(os.path.join(toy[0], "toy_base"))
    assert eos == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    # The only evaluated checkpoint is the last: hf/best is the final policy (it was left out, so
    # a continued run's best at its last step kept the hf/best of an earlier run).
    best = sh.hf_params(os.path.join(reference_rl, "hf", "best"))
    assert all(np.array_equal(best[k], final[k]) for k in final)


def test_rejection_sampling_writes_each_completion_with_its_own_prompt(toy, tmp_path, monkeypatch):
    """With data.prompt_overflow=skip the sampled prompts are the rows that fit; the written rows
    were looked up in all rows, so every completion after a skipped prompt was saved with the
    next row's prompt and solution."""
    import re as regex

    from r1jax.models import hf
    from r1jax.stages import rejection_sampling as rs

    tokenizer = hf.tokenizer(os.path.join(toy[0], "toy_base"))

    def answer_every_prompt(model, prompt_ids, *, num_samples, **kwargs):  # a perfect sampler
        tokens = []
        for ids in prompt_ids:
            a, b = map(int, regex.findall(r"What is (\d+) \+ (\d+)\?", tokenizer.decode(ids))[-1])
            text = f"<think> {a} + {b} </think> <answer>{a + b}</answer>"
            tokens += [tokenizer(text, add_special_tokens=False)["input_ids"]] * num_samples
        return sh.sampled(tokens)

    monkeypatch.setattr(rs.sampling, "generate", answer_every_prompt)
    rows = [{"question": "What is 1 + 1? " + "Think hard. " * 40, "answer": "#### 2"}]
    rows += [{"question": f"What is {i} + 3?", "answer": f"#### {i + 3}"} for i in range(6)]
    path = tmp_path / "sums.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = sh.load_config("rejection_sampling")
    r = config.rejection_sampling
    r.num_prompts, r.num_samples, r.batch_prompts, r.max_per_prompt = 8, 1, 4, 0
    config.data.source, config.data.num_eval = str(path), 1
    config.data.prompt_buckets, config.data.prompt_overflow = (128,), "skip"
    summary = run("rejection_sampling", config, tmp_path / "run")
    with open(summary["path"]) as f:
        written = [json.loads(line) for line in f]
    assert len(written) == 5  # the long prompt left out, the last row held out
    for w in written:
        i = int(regex.match(r"What is (\d+) \+ 3\?", w["prompt"]).group(1))
        assert w["solution"] == str(i + 3) and f"<answer>{i + 3}</answer>" in w["completion"]


def test_rejection_sampling_resumes_from_the_batches_it_saved(toy, tmp_path, monkeypatch):
    """Samples were written once, at the end: a run stopped part way (a preemption, SIGTERM) lost
    every sample it had drawn. Each graded batch is saved now, the batch in flight at the stop
    too, and a rerun samples only the others, to the same output as a run never stopped; a rerun
    with other filters samples nothing (nor loads the model)."""
    import re as regex

    from r1jax import checkpoint
    from r1jax.models import hf
    from r1jax.stages import rejection_sampling as rs

    tokenizer = hf.tokenizer(os.path.join(toy[0], "toy_base"))
    calls, stop_after = [], [None]

    def right_and_wrong(model, prompt_ids, *, num_samples, prompt_keys, **kwargs):
        calls.append(list(prompt_keys))
        if len(calls) == stop_after[0]:
            monkeypatch.setattr(checkpoint, "_stop_asked", True)  # (SIGTERM, one process)
        tokens = []
        for ids in prompt_ids:
            a, op, b = regex.findall(r"What is (\d+) ([+-]) (\d+)\?", tokenizer.decode(ids))[-1]
            c = int(a) + int(b) if op == "+" else int(a) - int(b)
            for answer in (c, c + 1)[:num_samples]:
                text = f"<think> {a} {op} {b} </think> <answer>{answer}</answer>"
                tokens.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        return sh.sampled(tokens)

    monkeypatch.setattr(rs.sampling, "generate", right_and_wrong)
    config = sh.load_config("rejection_sampling")
    r = config.rejection_sampling
    r.num_prompts, r.num_samples, r.batch_prompts, r.max_per_prompt = 10, 2, 4, 0
    config.data.num_train, config.data.prompt_buckets = 16, (128,)
    whole = run("rejection_sampling", config, tmp_path / "whole")
    assert len(calls) == 3 and whole["samples"] == 20 and whole["kept"] == 10

    calls.clear()
    stop_after[0] = 2  # asked to stop while the second batch samples
    with pytest.raises(checkpoint.Preempted):
        run("rejection_sampling", config, tmp_path / "stopped")
    monkeypatch.setattr(checkpoint, "_stop_asked", False)
    folder = tmp_path / "stopped" / rs.SAMPLES_FOLDER
    assert sorted(p.name for p in folder.glob("prompts_*")) == [
        "prompts_000000000-000000004.jsonl",
        "prompts_000000004-000000008.jsonl",  # (the batch in flight at the stop)
    ]
    assert not (tmp_path / "stopped" / "rejection_sampled.jsonl").exists()

    # Another sampling setting is refused while the stopped run's samples are there.
    r.temperature = 0.9
    with pytest.raises(common.ResumeRefused, match=r"temperature: 0\.6 then, 0\.9 now"):
        run("rejection_sampling", config, tmp_path / "stopped")
    r.temperature = 0.6
    calls.clear()
    stop_after[0] = None
    r.batch_prompts = 3  # (e.g. for memory: the saved batches stay, the rest come in threes)
    resumed = run("rejection_sampling", config, tmp_path / "stopped")
    assert calls == [[8, 9, 9]]  # only the last batch (filled up to 3)
    assert resumed == {**whole, "path": resumed["path"]}
    assert (tmp_path / "stopped" / "rejection_sampled.jsonl").read_text() == (
        tmp_path / "whole" / "rejection_sampled.jsonl"
    ).read_text()

    # Other filters: the saved samples are filtered again, without sampling or a model.
    def no_model(*args, **kwargs):
        raise AssertionError("loaded the model to filter saved samples")

    monkeypatch.setattr(common, "load_model", no_model)
    r.require_correct = False
    again = run("rejection_sampling", config, tmp_path / "stopped")
    assert len(calls) == 1 and again["kept"] == 20
    # Fewer prompts: a saved batch that ends past them is read up to them (it was ignored, and
    # its head sampled again: a model load, and two files starting at 4 that a later rerun chose
    # between by set order). Of two such files, the longer is read.
    r.num_prompts = 5
    assert run("rejection_sampling", config, tmp_path / "stopped")["samples"] == 10
    head = folder / "prompts_000000004-000000006.jsonl"
    rows = (folder / "prompts_000000004-000000008.jsonl").read_text().splitlines()
    head.write_text("".join(line + "\n" for line in rows if json.loads(line)["row"] < 6))
    r.num_prompts = 10
    assert run("rejection_sampling", config, tmp_path / "stopped") == again
    assert len(calls) == 1
    head.unlink()
    # (one that fails part way leaves the run finished: other settings may replace it)
    monkeypatch.setattr(rs, "_filter_and_write", no_model)
    with pytest.raises(AssertionError):
        run("rejection_sampling", config, tmp_path / "stopped")
    assert json.loads((folder / "run.json").read_text())["finished"]
    # A finished run's samples give way to other sampling settings.
    monkeypatch.undo()
    monkeypatch.setattr(rs.sampling, "generate", right_and_wrong)
    r.num_samples = 1
    fresh = run("rejection_sampling", config, tmp_path / "stopped")
    assert len(calls) == 5 and fresh["samples"] == 10  # (in batches of 3 now)
    # A run stopped before its first batch was saved holds nothing to lose: not refused.
    manifest = json.loads((folder / "run.json").read_text())
    (folder / "run.json").write_text(json.dumps({**manifest, "finished": False}))
    for saved in folder.glob("prompts_*"):
        saved.unlink()
    r.num_samples = 2
    assert run("rejection_sampling", config, tmp_path / "stopped")["samples"] == 20
    # Damaged files are named, with what to delete.
    saved = folder / "prompts_000000003-000000006.jsonl"
    saved.write_text(saved.read_text()[:-20])
    with pytest.raises(common.ConfigError, match=r"000006.jsonl:6 is not a sample .*delete that"):
        run("rejection_sampling", config, tmp_path / "stopped")
    (folder / "run.json").write_text('{"run": ')
    with pytest.raises(common.ConfigError, match=r"run.json is damaged .*delete .*_batches to"):
        run("rejection_sampling", config, tmp_path / "stopped")


def test_eval_samples_name_their_held_out_row_when_prompts_are_left_out(toy, tmp_path, monkeypatch):
    """With data.prompt_overflow=skip, eval_samples.jsonl numbered the prompts that were kept:
    every sample after a skipped prompt was filed under the row before its own (and two models
    whose tokenizers skip different prompts were paired on different problems)."""
    import re as regex

    from r1jax import sampling
    from r1jax.models import hf

    tokenizer = hf.tokenizer(os.path.join(toy[0], "toy_base"))
    keys = []

    def answer_every_prompt(model, prompt_ids, *, num_samples, prompt_keys, **kwargs):
        keys.extend(prompt_keys)
        tokens = []
        for ids in prompt_ids:
            a = int(regex.findall(r"What is (\d+) \+ 3\?", tokenizer.decode(ids))[-1])
            text = f"<think> {a} + 3 </think> <answer>{a + 3}</answer>"
            tokens += [tokenizer(text, add_special_tokens=False)["input_ids"]] * num_samples
        return sh.sampled(tokens)

    monkeypatch.setattr(sampling, "generate", answer_every_prompt)
    rows = [{"prompt": f"What is {i} + 3?", "solution": str(i + 3)} for i in range(4)]
    rows[1]["prompt"] = "What is 1 + 3? " + "Think hard. " * 40
    path = tmp_path / "sums.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = sh.load_config("eval")
    config.eval.num_prompts, config.eval.num_samples, config.eval.batch_prompts = 4, 1, 2
    config.data.source = config.data.eval_source = str(path)
    config.data.num_eval, config.data.prompt_buckets = 4, (128,)
    config.data.prompt_overflow = "skip"
    result = run("eval", config, tmp_path / "run")
    with open(tmp_path / "run" / "eval_samples.jsonl") as f:
        samples = [json.loads(line) for line in f]
    # (the last batch, one prompt, is filled up with a copy of it: one program for both)
    assert result["pass@1"] == 1.0 and [s["row"] for s in samples] == [0, 2, 3]
    assert keys == [0, 2, 3, 3]
    assert [s["prompt"] for s in samples] == [rows[s["row"]]["prompt"] for s in samples]


def test_rejection_samplings_record_takes_float_tolerance_only_when_set():
    """A record saved before sandbox.float_tolerance existed lacks it: recorded at its default,
    it refused (or, once finished, discarded) every saved batch of a run with code rows. Stop ids
    likewise: recorded only when the model folder declares eos ids of its own (where sampling
    now stops, unlike the records from before)."""
    from r1jax.stages import rejection_sampling as rs

    config = sh.load_config("rejection_sampling")
    code_rows = types.SimpleNamespace(
        rows=[{"tests": [{"input": "", "output": "1"}]}],
        fingerprint=lambda: "rows",
        stop_token_ids=(0, 2),
        declared_stop_ids=(),
    )
    record = rs._sample_record(config, code_rows)
    assert "sandbox.timeout_s" in record and "sandbox.float_tolerance" not in record
    assert "stop_token_ids" not in record
    config.sandbox.float_tolerance = 1e-6
    assert rs._sample_record(config, code_rows)["sandbox.float_tolerance"] == 1e-6
    code_rows.stop_token_ids, code_rows.declared_stop_ids = (0, 2, 5), (5,)
    assert rs._sample_record(config, code_rows)["stop_token_ids"] == [0, 2, 5]


def test_eval_metrics_follow_from_designed_answers(toy, tmp_path, monkeypatch):
    """The stage's pass@1, pass@k, cons@k, format and length on answers designed per sample (right,
    right spelled otherwise, wrong, unparseable, none), 7 prompts in batches of 3, against an
    independent computation: the stage tests sampled 4 tokens, every answer None, every figure 0."""
    import collections
    import re as regex

    from r1jax import sampling
    from r1jax.models import hf

    tokenizer = hf.tokenizer(os.path.join(toy[0], "toy_base"))
    k, n = 4, 7
    rng = np.random.default_rng(3)
    kinds = ["right", "right.", "wrong", "junk", None]
    design = [[kinds[j] for j in rng.integers(0, len(kinds), k)] for _ in range(n)]
    design[0] = ["right", None, None, "wrong"]  # "no answer" wins the vote (2 to 1 to 1)
    design[1] = ["wrong", "right", "wrong", "right."]  # a 2-2 tie: the first sampled wins
    design[2] = ["junk", "right", "right.", "wrong"]  # two spellings of one answer win

    def spelled(kind, a):
        return {"right": str(a + 3), "right.": f"{a + 3:,}.", "wrong": "99", "junk": "x y"}[kind]

    def answer(model, prompt_ids, *, num_samples, prompt_keys, **kwargs):
        tokens = []
        for ids, key in zip(prompt_ids, prompt_keys, strict=True):
            a = int(regex.findall(r"What is (\d+) \+ 3\?", tokenizer.decode(ids))[-1])
            for kind in design[key]:
                text = "<think> sum </think> " + (
                    f"<answer>{spelled(kind, a)}</answer>" if kind else "I give up"
                )
                tokens.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        return sh.sampled(tokens)

    monkeypatch.setattr(sampling, "generate", answer)
    rows = [{"prompt": f"What is {i * 1000} + 3?", "solution": str(i * 1000 + 3)} for i in range(n)]
    path = tmp_path / "sums.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = sh.load_config("eval")
    config.eval.num_prompts, config.eval.num_samples, config.eval.batch_prompts = n, k, 3
    config.data.source = config.data.eval_source = str(path)
    config.data.num_eval = n
    result = run("eval", config, tmp_path / "run")

    # Independently: right = the value, however written; the vote by value (text when there is
    # none; one "no answer" group), labelled by correctness, ties to the first sampled.
    pass1, passk, cons = [], [], []
    for kinds_i in design:
        right = [kind in ("right", "right.") for kind in kinds_i]
        votes = collections.Counter()
        first = {}
        for j, (kind, r) in enumerate(zip(kinds_i, right, strict=True)):
            key = (r, "value" if r else kind)
            votes[key] += 1
            first.setdefault(key, j)
        top = max(votes.values())
        winner = min((first[key], key) for key, v in votes.items() if v == top)[1]
        pass1.append(np.mean(right))
        passk.append(float(any(right)))
        cons.append(float(winner[0]))
    assert cons[:3] == [0.0, 0.0, 1.0]
    assert result["pass@1"] == pytest.approx(np.mean(pass1))
    assert result[f"pass@{k}"] == pytest.approx(np.mean(passk))
    assert result[f"cons@{k}"] == pytest.approx(np.mean(cons))
    assert 0 < result[f"cons@{k}"] < result[f"pass@{k}"] < 1  # (the design tells them apart)
    assert result["format"] == pytest.approx(
        np.mean([kind is not None for d in design for kind in d])
    )
    with open(tmp_path / "run" / "eval_samples.jsonl") as f:
        samples = [json.loads(line) for line in f]
    assert [s["row"] for s in samples] == [i for i in range(n) for _ in range(k)]
    assert [s["correct"] for s in samples] == [
        kind in ("right", "right.") for d in design for kind in d
    ]
    lengths = [
        len(tokenizer(s["completion"], add_special_tokens=False)["input_ids"]) for s in samples
    ]
    assert result["mean_length"] == pytest.approx(np.mean(lengths))


def test_rejection_sampling_drops_traces_that_state_held_out_problems(toy, tmp_path, monkeypatch):
    """The teacher checks its sums ("Let me check by subtracting: 55 - 6 = 49"), and such a check
    is a problem of the task, held out ~10% of the time: the session-20 pipeline's traces stated
    61 of the 256 held-out problems with their answers, and R1's SFT and the distillation trained
    on them. Traces cut off at the token budget were kept when the format was not required."""
    import re as regex

    from r1jax.data import split_of
    from r1jax.data.arithmetic import key_can_hold_out
    from r1jax.models import hf
    from r1jax.stages import rejection_sampling as rs

    tokenizer = hf.tokenizer(os.path.join(toy[0], "toy_base"))
    held_out_checks = []

    def answer_and_check(model, prompt_ids, *, num_samples, **kwargs):  # a perfect sampler
        tokens = []
        for ids in prompt_ids:
            a, op, b = regex.findall(r"What is (\d+) ([+-]) (\d+)\?", tokenizer.decode(ids))[-1]
            a, b = int(a), int(b)
            c, inverse = (a + b, "-") if op == "+" else (a - b, "+")
            check = f"{c} {inverse} {b} = {a}"
            key = f"arithmetic|{min(c, b)}+{max(c, b)}" if inverse == "+" else f"arithmetic|{c}-{b}"
            held_out_checks.append(split_of(key, 0.1) == "eval" and key_can_hold_out(key))
            text = f"<think> {a} {op} {b}. Check: {check}. </think> <answer>{c}</answer>"
            tokens += [tokenizer(text, add_special_tokens=False)["input_ids"]] * num_samples
        stops = [1] + [0] * (len(tokens) - 1)  # the first sample ran out of tokens
        return sh.sampled(tokens, stops)

    monkeypatch.setattr(rs.sampling, "generate", answer_and_check)
    config = sh.load_config("rejection_sampling")
    r = config.rejection_sampling
    r.num_prompts, r.num_samples, r.batch_prompts, r.max_per_prompt = 64, 1, 64, 0
    r.require_format = False
    config.data.num_train, config.data.prompt_buckets = 64, (128,)
    summary = run("rejection_sampling", config, tmp_path / "run")
    assert summary["dropped"]["truncated"] == 1
    stated = sum(held_out_checks[1:])
    assert stated >= 2 and summary["dropped"]["states_held_out"] == stated
    assert summary["kept"] == 63 - stated
    with pytest.raises(common.ConfigError, match=r"non_reasoning_ratio must be >= 0"):
        r.non_reasoning_ratio = -0.2
        common.validate(config, "rejection_sampling")
    r.non_reasoning_ratio = 0.0
    with pytest.raises(common.ConfigError, match=r"max_per_prompt must be >= 0 .*got -1"):
        r.max_per_prompt = -1  # (sampled everything, then kept nothing: every sample over a cap)
        common.validate(config, "rejection_sampling")


def test_rejection_sampling_default_runs(toy, tmp_path, monkeypatch):
    extra = tmp_path / "chat.jsonl"
    chat = [{"prompt": f"Say hello {i}", "completion": f"Hello {i}!"} for i in range(3)]
    messages = [{"role": "user", "content": "Say bye"}, {"role": "assistant", "content": "Bye!"}]
    extra.write_text("".join(json.dumps(r) + "\n" for r in [*chat, {"messages": messages}]))
    config = sh.load_config("rejection_sampling")
    r = config.rejection_sampling
    r.num_prompts, r.num_samples, r.max_new_tokens, r.batch_prompts = 4, 2, 4, 4
    r.non_reasoning_source, r.non_reasoning_ratio = str(extra), 0.0  # 0 = all of the file
    config.data.num_train, config.data.prompt_buckets = 16, (128,)
    out_dir = tmp_path / "run"
    summary = run("rejection_sampling", config, out_dir)

    assert summary["samples"] == 4 * 2
    assert summary["kept"] + sum(summary["dropped"].values()) == summary["samples"]
    assert set(summary["dropped"]) == set(DROP_REASONS)
    with open(out_dir / "rejection_sampling_summary.json") as f:
        assert json.load(f)["dropped"] == summary["dropped"]
    with open(summary["path"]) as f:
        written = [json.loads(line) for line in f]
    assert len(written) == summary["rows_written"] == summary["kept"] + 4
    reasoning = [w for w in written if w["source"] == "reasoning"]
    assert all("<answer>" in w["completion"] and w["solution"] for w in reasoning)
    non_reasoning = [w for w in written if w["source"] == "non_reasoning"]
    assert [(w["prompt"], w["completion"]) for w in non_reasoning[:3]] == [
        (c["prompt"], c["completion"]) for c in chat
    ]
    assert non_reasoning[3]["messages"] == messages  # a chat row is mixed in, not dropped
    # The file is what --stage=sft reads.
    from r1jax.models import hf
    from r1jax.stages import sft as sft_stage

    sft_config = sh.load_config("sft")
    sft_config.sft.source = summary["path"]
    common.validate(sft_config, "sft")
    pairs = sft_stage.load_pairs(sft_config, hf.tokenizer(os.path.join(toy[0], "toy_base")))
    assert [c for _, c, _ in pairs] == [w.get("completion", "Bye!") for w in written]

    # A bad non-reasoning file is refused before any sampling (it was read after all of it).
    extra.write_text(json.dumps({"prompt": "no answer here"}) + "\n")
    from r1jax.stages import rejection_sampling

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before reading non_reasoning_source")

    monkeypatch.setattr(rejection_sampling.sampling, "generate", no_sampling)
    with pytest.raises(common.ConfigError, match=r"non_reasoning_source .*\.jsonl:1 has neither"):
        run("rejection_sampling", config, tmp_path / "bad")


def test_distill_default_runs_with_logit_distillation(toy, tmp_path):
    # Student and teacher are the same toy model, so the forward KL is 0 at every step: a check
    # that the teacher's distributions are read on the same tokens the student predicts.
    config = sh.load_config("distill")
    d = config.distill
    d.teacher = os.path.join(toy[0], "toy_base")
    d.num_examples, d.epochs, d.batch_size, d.seq_len = 16, 1.0, 8, 256
    out = run("distill", config, tmp_path)
    rows = sh.metric_rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(abs(r["loss"]) < 1e-5 for r in rows), rows
    assert np.isfinite(out["loss"])
    assert_hf_folder(tmp_path / "hf" / "final")
    # Continued as trace SFT, its loss series would switch from KL to cross-entropy unnoticed.
    d.teacher, d.epochs = "", 2.0
    with pytest.raises(
        common.ConfigError, match=r"teacher model: .* then, 'none \(trace SFT\)' now"
    ):
        run("distill", config, tmp_path)


def test_distill_teachers_that_cannot_serve_are_named_before_a_model_loads(
    toy, tmp_path, monkeypatch
):
    """A stage's workdir given as the teacher, a teacher with another vocabulary, or one whose
    tokenizer does not load were found after the student's weights (and the teacher's) had loaded,
    in errors that did not say which field chose the folder."""
    base = os.path.join(toy[0], "toy_base")
    config = sh.load_config("distill")
    d = config.distill
    d.num_examples, d.epochs, d.batch_size, d.seq_len = 16, 1.0, 8, 256
    shutil.copytree(base, tmp_path / "sft_run" / "hf" / "final")
    d.teacher = str(tmp_path / "sft_run")
    with pytest.raises(
        common.ConfigError, match=r"no config.json.*its model is .*sft_run/hf/final"
    ):
        run("distill", config, tmp_path / "run")

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the teacher's tokenizer was checked")

    monkeypatch.setattr(common, "load_model", no_model)
    other = shutil.copytree(base, tmp_path / "other")
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = list(vocab)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two tokens' ids swapped
    (other / "tokenizer.json").write_text(json.dumps(spec))
    d.teacher = str(other)
    with pytest.raises(common.ConfigError, match="distill.teacher uses a different tokenizer"):
        run("distill", config, tmp_path / "run")
    (other / "tokenizer.json").unlink()
    with pytest.raises(common.ConfigError, match=r"^distill.teacher: .*other"):
        run("distill", config, tmp_path / "run")


def test_rl_reference_with_another_vocabulary_is_refused_before_a_model_loads(
    toy, tmp_path, monkeypatch
):
    """A reference model of another (smaller) vocabulary gave NaN log-probs for the ids it lacks:
    each step that sampled one was skipped, until SkipWatch stopped the run asking for a lower
    learning rate."""
    other = shutil.copytree(os.path.join(toy[0], "toy_base"), tmp_path / "other")
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = list(vocab)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two tokens' ids swapped
    (other / "tokenizer.json").write_text(json.dumps(spec))

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the reference's tokenizer was checked")

    monkeypatch.setattr(common, "load_model", no_model)
    config = sh.load_config("rl")
    config.rl.ref_model = str(other)
    config.data.num_eval = 4
    with pytest.raises(common.ConfigError, match="rl.ref_model .* different tokenizer"):
        run("rl", config, tmp_path / "run")
    (other / "tokenizer.json").unlink()
    with pytest.raises(common.ConfigError, match=r"^rl.ref_model: .*other"):
        run("rl", config, tmp_path / "run")


def test_no_compilation_cache_for_a_multi_process_run_on_cpus(monkeypatch, tmp_path):
    """JAX writes cache entries from process 0 only: in a rerun of a multi-process CPU job,
    process 0 loaded its programs while process 1 compiled, and gloo's 30 s wait for the late
    peer failed the run (tests/test_multiprocess.py, under load)."""
    import jax

    monkeypatch.setenv("R1JAX_HOME", str(tmp_path))
    monkeypatch.delenv("R1JAX_COMPILATION_CACHE", raising=False)
    before = jax.config.jax_compilation_cache_dir
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    common.enable_compilation_cache()
    assert jax.config.jax_compilation_cache_dir == before
    monkeypatch.setattr(jax, "process_count", lambda: 1)
    try:
        common.enable_compilation_cache()  # (one the user set, JAX_COMPILATION_CACHE_DIR, stays)
        assert jax.config.jax_compilation_cache_dir == before
        jax.config.update("jax_compilation_cache_dir", None)
        common.enable_compilation_cache()
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla_cache")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_eval_default_runs(toy, tmp_path, capsys):
    config = sh.load_config("eval")
    e = config.eval
    e.num_prompts, e.num_samples, e.max_new_tokens, e.batch_prompts = 4, 2, 4, 4
    config.data.num_eval, config.data.prompt_buckets = 4, (128,)
    result = run("eval", config, tmp_path)
    with open(tmp_path / "eval.json") as f:
        assert json.load(f) == json.loads(json.dumps(result))
    assert "pass@1" in capsys.readouterr().out  # the table
    assert (result["num_prompts"], result["num_samples"]) == (4, 2)
    # The summary numbers follow from the graded samples written beside them.
    with open(tmp_path / "eval_samples.jsonl") as f:
        samples = [json.loads(line) for line in f]
    assert len(samples) == 8
    by_row = {}
    for s in samples:
        by_row.setdefault(s["row"], []).append(s)
    assert len(by_row) == 4 and all(len(v) == 2 for v in by_row.values())
    expected = np.mean([np.mean([s["correct"] for s in v]) for v in by_row.values()])
    assert result["pass@1"] == pytest.approx(expected)
    assert set(result["per_task"]) == {"arithmetic"}
    assert 0 < result["mean_length"] <= 4
    # A row's samples are drawn from its own key: eval.batch_prompts does not change them.
    e.batch_prompts = 2
    pairs = run("eval", config, tmp_path / "pairs")
    assert {**pairs, "minutes": 0} == {**result, "minutes": 0}
    with open(tmp_path / "pairs" / "eval_samples.jsonl") as f:
        assert [json.loads(line) for line in f] == samples


def test_compute_matching_counts_a_deepseek_token_by_its_active_parameters_and_mla():
    """`match_distill_compute` crashed on a DeepSeek student or teacher (no head_dim) and would
    have counted all 671B parameters of V3 per token, not the 37B a token uses."""
    from r1jax.models.deepseek import DeepseekConfig
    from r1jax.models.transformer import ModelConfig

    dense = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=8)  # fmt: skip
    assert pipeline.token_pass_flops(dense, 10) == 2 * dense.num_params + 4 * 2 * 4 * 8 * 10
    v3 = DeepseekConfig.deepseek_v3()
    attention = 2 * 61 * 128 * (128 + 64 + 128) * 1000  # q.k over 192 dims, p.v over 128
    assert pipeline.token_pass_flops(v3, 1000) == 2 * v3.num_active_params + attention
    assert abs(pipeline.token_pass_flops(v3, 0) / (2 * 37e9) - 1) < 0.03


def test_pipeline_smoke(toy, tmp_path):
    config = sh.load_config("pipeline:smoke")
    for name in ("base", "student_base"):  # the tiny test architecture, for speed
        config[name].pretrain.arch.update(sh.TINY_ARCH)
        config[name].pretrain.seq_len = 64
    for name, _, _ in pipeline.PLAN:
        if "data" in config[name]:
            config[name].data.prompt_buckets = (128,)
    config.eval_data.prompt_buckets = (128,)
    results = run("pipeline", config, tmp_path)

    assert set(results["stages"]) == {name for name, _, _ in pipeline.PLAN}
    assert list(results["eval"]) == list(pipeline.EVALUATED)
    for name, stage, _ in pipeline.PLAN:
        assert os.path.exists(tmp_path / name / "done.json"), name
        if stage != "rejection_sampling":
            assert_hf_folder(tmp_path / name / "hf" / "final")
    with open(tmp_path / "results.json") as f:
        assert set(json.load(f)["eval"]) == set(pipeline.EVALUATED)
    table = (tmp_path / "results.md").read_text()
    rows = [
        line.split("|")[1].strip()
        for line in table.splitlines()
        if line.startswith("| ") and not line.startswith(("| checkpoint", "| finding"))
    ]
    assert rows[: len(pipeline.EVALUATED)] == list(pipeline.EVALUATED)
    for png in ("rl_curves.png", "comparison.png"):
        assert os.path.getsize(tmp_path / png) > 0
    # Each RL run's trend: the first and the last logged step (a 2-step run's tenths).
    logged = [json.loads(line) for line in open(tmp_path / "r1_zero" / "metrics.jsonl")]
    logged = [r for r in logged if "reward" in r]
    for key in pipeline.TREND_KEYS:
        assert results["trends"]["r1_zero"][key] == [logged[0][key], logged[-1][key]], key
    assert "R1-Zero's responses grow longer over training" in table
    copied = ", ".join(
        f"{n} {results['stages'][n]['tag_copy']:.2f}" for n in ("base", "student_base")
    )
    assert f"held-out format documents): {copied}" in table
    assert f"{results['minutes']:.1f} minutes of stages and evaluations" in table
    assert results["minutes"] == pytest.approx(
        sum(r["minutes"] for r in (*results["stages"].values(), *results["eval"].values()))
    )
    # Student RL gets the distillation's FLOPs, counted here from the student's own files: its
    # parameters from the safetensors, a token pass 2 x params + 4 L N H x context. 2 SFT steps
    # of 8 x 256 tokens (3 passes) against GRPO steps of 4 prompts (bucket 128) x 2 samples x 16
    # tokens: prefill, 15 decode steps over the 144-slot cache, then the reference forward and the
    # update (3 passes) over the prompts once and the completions.
    student = tmp_path / "student_base" / "hf" / "final"
    params = sum(
        t.size for t in safetensors.numpy.load_file(student / "model.safetensors").values()
    )
    arch = json.loads((student / "config.json").read_text())
    heads, layers = arch["num_attention_heads"], arch["num_hidden_layers"]
    head_dim = arch.get("head_dim") or arch["hidden_size"] // heads

    def flops(context):
        return 2 * params + 4 * layers * heads * head_dim * context

    distill = 3 * 2 * 8 * 256 * flops(256)
    grpo_step = (
        4 * 128 * flops(128)
        + 15 * 8 * flops(144)
        + 4 * (4 * 128 * flops(128) + 8 * 16 * flops(144))
    )
    steps = math.ceil(distill / grpo_step)
    assert results["compute"]["student_rl_steps"] == steps
    assert results["compute"]["ratio"] == pytest.approx(steps * grpo_step / distill)
    with open(tmp_path / "student_rl" / "config_rl.json") as f:
        assert json.load(f)["rl"]["steps"] == steps
    assert f"RL's FLOPs {steps * grpo_step / distill:.2f}x the distillation's" in table
    # Stage wiring: R1's SFT and the distillation read the rejection-sampled file.
    with open(tmp_path / "r1_sft" / "config_sft.json") as f:
        assert json.load(f)["sft"]["source"] == results["stages"]["rejection_sampling"]["path"]

    # A rerun finds every sub-stage done and rewrites the same report without retraining, with
    # the first run's minutes.
    stamp = os.path.getmtime(tmp_path / "r1" / "hf" / "final" / "config.json")
    again = run("pipeline", config, tmp_path)
    assert again["eval"] == results["eval"]
    assert again["minutes"] == results["minutes"]
    assert again["compute"] == results["compute"]  # the steps student_rl ran, read back
    assert set(results["paired"]) == {f"{a} - {b}" for a, b in pipeline.COMPARED}
    assert "paired over 8 prompts" in table
    assert os.path.getmtime(tmp_path / "r1" / "hf" / "final" / "config.json") == stamp
    # Resuming with settings that change no result (logging), or the workdir spelled relatively
    # (the stages' model paths with it), skips the finished stages as before ...
    config.log.progress = False
    relative = os.path.relpath(tmp_path)
    assert run("pipeline", config, relative)["eval"] == results["eval"]
    # A student_rl matched to a distillation since made again no longer compares at equal compute.
    saved = tmp_path / "student_rl" / "config_rl.json"
    ran = json.loads(saved.read_text())
    common.write_json(saved, {**ran, "rl": {**ran["rl"], "steps": steps + 1}})
    with pytest.raises(common.ConfigError, match=rf"student_rl is done with {steps + 1} GRPO"):
        run("pipeline", config, tmp_path)
    common.write_json(saved, ran)
    # ... and asking a finished stage for other settings is refused, not silently skipped.
    config.cold_start.sft.epochs = 3.0
    with pytest.raises(common.ConfigError, match=r"cold_start is done, but with other settings"):
        run("pipeline", config, tmp_path)
    assert os.path.getmtime(tmp_path / "r1" / "hf" / "final" / "config.json") == stamp


class _StubStages:
    """Sub-stages that train nothing: each writes hf/final/config.json naming what it was given
    (rejection sampling: its kept-samples file, naming its model), and `evaluate` a fixed score;
    `fail[name]` is raised by sub-stage `name`; each call advances `clock` by a minute."""

    def __init__(self):
        self.calls, self.fail, self.clock, self.kept = [], {}, [0.0], 1

    def module(self, stage):
        def run(config, workdir):
            name = os.path.basename(workdir)
            self.calls.append(name)
            self.clock[0] += 60
            if name in self.fail:
                raise self.fail.pop(name)
            if stage == "rejection_sampling":
                path = os.path.join(workdir, pipeline.KEPT_SAMPLES)
                with open(path, "w") as f:
                    f.write(json.dumps({"from": config.model.path}) + "\n")
                return {"path": path, "kept": self.kept, "samples": 4}
            os.makedirs(os.path.join(workdir, "hf", "final"), exist_ok=True)
            common.write_json(
                os.path.join(workdir, "hf", "final", "config.json"),
                {"from": config.model.path, "call": len(self.calls)},
            )
            return {"steps": 2}

        return types.SimpleNamespace(run=run, validate=lambda config: None)

    def evaluate(self, config, model_path, subdir):
        return {"pass@1": 0.5, "format": 1.0, "minutes": 0.0}


@pytest.fixture
def stub_stages(monkeypatch):
    stubs = _StubStages()
    monkeypatch.setattr(common, "stage_module", stubs.module)
    monkeypatch.setattr(common, "validate", lambda config, stage: None)
    monkeypatch.setattr(pipeline, "_evaluate", stubs.evaluate)
    monkeypatch.setattr(pipeline, "time", types.SimpleNamespace(time=lambda: stubs.clock[0]))
    for name in ("_trend", "paired_difference", "_plots"):
        monkeypatch.setattr(pipeline, name, lambda *a: None)
    monkeypatch.setattr(pipeline, "results_markdown", lambda results, config: "")
    return stubs


def test_pipeline_resume_follows_what_each_stage_was_trained_on(stub_stages, tmp_path, monkeypatch):
    config = sh.load_config("pipeline:smoke")
    config.require_tag_copy = config.match_distill_compute = False
    first = tmp_path / "first"
    pipeline.run(config, str(first))
    every = [name for name, _, _ in pipeline.PLAN]
    assert stub_stages.calls == every
    # The workdir moved, and given relatively from elsewhere: every stage still counts as done.
    os.rename(first, tmp_path / "moved")
    stub_stages.calls.clear()
    monkeypatch.chdir(tmp_path)
    pipeline.run(config, "moved")
    assert stub_stages.calls == []
    # cold_start trained again (its folder deleted): the stages trained on its old model, or on
    # the samples drawn from them, are not skipped as if trained on the new one.
    shutil.rmtree(tmp_path / "moved" / "cold_start")
    later = " ".join(
        str(tmp_path / "moved" / n)
        for n in ("reasoning_rl", "rejection_sampling", "r1_sft", "r1", "distill")
    )
    with pytest.raises(
        common.ConfigError,
        match=re.escape(
            f"trained on (model.path) was made again or removed since; delete {later} "
        ),
    ):
        pipeline.run(config, str(tmp_path / "moved"))
    assert stub_stages.calls == ["cold_start"]
    # A settings change names the same folders.
    config.reasoning_rl.rl.beta = 0.5
    with pytest.raises(
        common.ConfigError,
        match=re.escape("rl.beta: 0.2 -> 0.5; ") + ".*" + re.escape(f"delete {later} to rerun"),
    ):
        pipeline.run(config, str(tmp_path / "moved"))
    config.reasoning_rl.rl.beta = 0.2
    for folder in later.split():
        shutil.rmtree(folder)
    pipeline.run(config, str(tmp_path / "moved"))  # (trained again from reasoning_rl on)
    # Other rejection-sampling filters: its samples are kept, filtered again.
    rs = tmp_path / "moved" / "rejection_sampling"
    after = " ".join(str(tmp_path / "moved" / n) for n in ("r1_sft", "r1", "distill"))
    config.rejection_sampling.rejection_sampling.max_per_prompt = 1
    config.rejection_sampling.rejection_sampling.num_prompts += 8  # (more batches, same samples)
    with pytest.raises(common.ConfigError, match=re.escape(f"delete {rs / 'done.json'} {after} ")):
        pipeline.run(config, str(tmp_path / "moved"))
    config.rejection_sampling.rejection_sampling.temperature = 1.0
    with pytest.raises(common.ConfigError, match=re.escape(f"delete {rs} {after} ")):
        pipeline.run(config, str(tmp_path / "moved"))
    # A finished stage's output deleted (its done.json left): it runs again, from its own saved
    # work, where the stages trained on it were refused ("made again or removed") and deleting
    # them as advised left the run no way on. Same output, so they stand; minutes add up.
    config.rejection_sampling.rejection_sampling.temperature = 0.6
    config.rejection_sampling.rejection_sampling.max_per_prompt = 2
    config.rejection_sampling.rejection_sampling.num_prompts -= 8
    (rs / pipeline.KEPT_SAMPLES).unlink()
    stub_stages.calls.clear()
    results = pipeline.run(config, str(tmp_path / "moved"))
    assert stub_stages.calls == ["rejection_sampling"]
    assert results["stages"]["rejection_sampling"]["minutes"] == 2
    # ... but not with other settings: refused as when its output is there.
    beta = config.r1.rl.beta
    config.r1.rl.beta = beta + 0.1
    shutil.rmtree(tmp_path / "moved" / "r1" / "hf")
    with pytest.raises(common.ConfigError, match=r"r1 is done, but with other settings"):
        pipeline.run(config, str(tmp_path / "moved"))
    config.r1.rl.beta = beta
    pipeline.run(config, str(tmp_path / "moved"))
    assert stub_stages.calls[-1] == "r1"
    # Both bases made again: every finished stage trained on either is named at once (r1_zero's
    # refusal named r1_zero alone, and cold_start's came after another full stage) ...
    shutil.rmtree(tmp_path / "moved" / "base")
    shutil.rmtree(tmp_path / "moved" / "student_base")
    later = [n for n, _, _ in pipeline.PLAN if n not in ("base", "student_base")]
    folders = " ".join(str(tmp_path / "moved" / n) for n in later)
    with pytest.raises(common.ConfigError, match=re.escape(f"since; delete {folders} to train")):
        pipeline.run(config, str(tmp_path / "moved"))
    # ... and none trained on the new ones: r1_zero deleted alone and trained again on the new
    # base, cold_start's refusal leaves it.
    shutil.rmtree(tmp_path / "moved" / "r1_zero")
    folders = " ".join(str(tmp_path / "moved" / n) for n in later if n != "r1_zero")
    with pytest.raises(common.ConfigError, match=re.escape(f"since; delete {folders} to train")):
        pipeline.run(config, str(tmp_path / "moved"))
    assert stub_stages.calls[-1] == "r1_zero"  # (cold_start refused before it ran)


def test_pipeline_follows_models_named_inside_it_and_what_student_rl_matches(stub_stages, tmp_path):
    """A teacher (reference, reward model) pointed at a sub-stage's output was compared by its
    path: distill was skipped as done after r1 was trained again. With match_distill_compute,
    student_rl's step count comes from distill's, but no "delete" list named it. A stage flag's
    value was advised back as the pipeline-wide flag, which then changed every stage. A
    rejection sampling that kept nothing was recorded as done, and r1_sft failed on its file."""
    config = sh.load_config("pipeline:smoke")
    config.require_tag_copy = config.match_distill_compute = False
    work = tmp_path / "run"
    config.distill.distill.teacher = str(work / "r1" / "hf" / "final")
    stub_stages.kept = 0
    with pytest.raises(common.ConfigError, match=r"rejection_sampling: kept none of its"):
        pipeline.run(config, str(work))
    assert not (work / "rejection_sampling" / "done.json").exists()
    stub_stages.kept, stub_stages.calls[:] = 1, []
    pipeline.run(config, str(work))  # (sampled again: the stub saves no samples)
    assert stub_stages.calls[0] == "rejection_sampling"
    shutil.rmtree(work / "r1")  # r1 trained again: distill learnt from the old one
    with pytest.raises(
        common.ConfigError,
        match=re.escape(
            f"(distill.teacher) was made again or removed since; delete {work}/distill "
        ),
    ):
        pipeline.run(config, str(work))
    # student_rl follows distill when its steps are matched to it.
    rs = str(work / "rejection_sampling")
    assert pipeline._to_delete(rs, matched=True).endswith(f"{work}/distill {work}/student_rl")
    assert pipeline._to_delete(rs).endswith(f"{work}/distill")
    assert pipeline._dependents("distill", matched=True) == ["student_rl"]
    assert pipeline._dependents("distill") == []
    # A stage's own value is given back with the stage's flag; one every stage ran with, with the
    # pipeline-wide one.
    assert pipeline._keep_flag("r1", "model.dtype", "bfloat16", str(work)) == (
        "--config.r1.model.dtype='bfloat16'"
    )
    assert pipeline._keep_flag("r1", "model.dtype", "float32", str(work)) == (
        "--config.r1.model.dtype='float32'"  # (the default: not applied from the top level)
    )
    assert pipeline._keep_flag("r1", "model.dtype", "bfloat16", str(tmp_path / "none")) == (
        "--config.model.dtype='bfloat16'"
    )


def test_pipeline_errors_name_the_sub_stage_and_resumed_minutes_add_up(stub_stages, tmp_path):
    config = sh.load_config("pipeline:smoke")
    config.require_tag_copy = config.match_distill_compute = False
    stub_stages.fail["r1"] = common.ConfigError("data.path 'x.jsonl' row 3: no prompt")
    with pytest.raises(common.ConfigError) as e:
        pipeline.run(config, str(tmp_path))
    assert str(e.value) == (
        f"pipeline stage r1 (--stage=rl, --config.r1.*, {tmp_path / 'r1'}): data.path 'x.jsonl' "
        "row 3: no prompt"
    )
    stub_stages.fail["student_rl"] = KeyboardInterrupt()  # stopped a minute in, then resumed
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(config, str(tmp_path))
    results = pipeline.run(config, str(tmp_path))
    assert results["stages"]["r1"]["minutes"] == results["stages"]["student_rl"]["minutes"] == 2
    assert results["stages"]["base"]["minutes"] == 1
    # Its output deleted, made again: the interrupted attempt was counted twice (2 + 1 + 1).
    shutil.rmtree(tmp_path / "student_rl" / "hf")
    results = pipeline.run(config, str(tmp_path))
    assert results["stages"]["student_rl"]["minutes"] == 3


def test_match_compute_reads_a_teacher_named_as_distill_takes_it(toy):
    config = sh.load_config("pipeline:smoke")
    rl, d = pipeline._stage_config(config, "student_rl"), copy.deepcopy(config.distill)
    with rl.unlocked(), d.unlocked():
        rl.model.path = os.path.join(toy[0], "toy_base")
        d.distill.teacher = ""
        alone = pipeline.match_compute(rl, d, distill_steps=2)
        d.distill.teacher = rl.model.path
        taught = pipeline.match_compute(rl, d, distill_steps=2)
        d.distill.teacher = "toy"  # (as `--stage=distill` takes it; was read as a folder "toy")
        assert pipeline.match_compute(rl, d, distill_steps=2) == taught
    assert taught["distill_flops"] > alone["distill_flops"]


def test_pipeline_refuses_settings_no_stage_would_use():
    config = sh.load_config("pipeline:smoke")
    config.model.path = "/some/model"  # each stage's model is wired from the one before
    with pytest.raises(common.ConfigError, match=r"^model.path='/some/model': the pipeline"):
        pipeline.validate(config)
    for stage in ("rl", "sft"):
        with pytest.raises(common.ConfigError, match=rf"pipeline but for --stage={stage};"):
            common.validate(sh.load_config(stage), "pipeline")
    # Giving back a shared setting the default already holds: the stage's own flag.
    assert (
        pipeline._keep_flag("r1", "model.dtype", "float32") == "--config.r1.model.dtype='float32'"
    )
    assert pipeline._keep_flag("r1", "model.dtype", "bfloat16") == "--config.model.dtype='bfloat16'"


def test_pipeline_checks_every_section_before_the_first_stage():
    config = sh.load_config("pipeline:smoke")
    pipeline.validate(config)
    with config.unlocked():  # (a --config file's misspelt switch did nothing)
        config.match_distil_compute = True
    with pytest.raises(common.ConfigError, match=r"match_distil_compute \(did you mean match_di"):
        common.validate(config, "pipeline")
    del config["match_distil_compute"]
    config.r1.rl.loss_type = "foo"  # the ninth stage's
    with pytest.raises(common.ConfigError, match=r"^r1 \(--stage=rl\): .*loss_type"):
        pipeline.validate(config)
    config.r1.rl.loss_type = "grpo"
    config.eval_stage.eval.num_samples = 0  # the evaluations after every stage
    with pytest.raises(common.ConfigError, match=r"^eval_stage / eval_data .*eval.num_samples"):
        pipeline.validate(config)
    config.eval_stage.eval.num_samples = 2
    # Fields the pipeline sets from earlier stages: a flag for one was accepted and ignored.
    for field, value, message in (
        ("r1_zero.model.path", "/models/mine", r"r1_zero.model.path='/models/mine': the pipeline"),
        ("r1_sft.sft.source", "mine.jsonl", r"sets it to what rejection_sampling made"),
        ("distill.distill.source", "mine.jsonl", r"^distill.distill.source='mine.jsonl'"),
        ("eval_stage.data.num_eval", 16, r"^eval_stage.data: .* set --config.eval_data"),
        ("eval_stage.model.path", "/models/mine", r"^eval_stage.model.path='/models/mine'"),
        ("eval_stage.seed", 7, r"^eval_stage.seed=7: .* set --config.seed"),
        # student_rl's steps, set from the distillation's FLOPs; held-out problems not evaluated
        ("student_rl.rl.steps", 300, r"^student_rl.rl.steps=300: .*match_distill_compute=False"),
        ("eval_data.num_eval", 16, r"num_eval=16 .* --config.eval_stage.eval.num_prompts=16 too"),
    ):
        changed = copy.deepcopy(config)
        sh.set_fields(changed, {field: value})
        with pytest.raises(common.ConfigError, match=message):
            pipeline.validate(changed)
    pipeline.validate(config)


def test_pipeline_stops_after_a_base_that_does_not_copy_tags(tmp_path):
    """A base below the tag-copy threshold ends the pipeline before any RL, naming the way out."""
    config = sh.load_config("pipeline:smoke")
    config.require_tag_copy = True
    config.base.pretrain.arch.update(sh.TINY_ARCH)
    config.base.pretrain.seq_len = 64
    with pytest.raises(common.ConfigError, match="require_tag_copy=False") as e:
        run("pipeline", config, tmp_path)
    assert "the base model gives a tag name" in str(e.value)
    assert os.path.exists(tmp_path / "base" / "done.json")  # kept for a run that goes on anyway
    assert not os.path.exists(tmp_path / "student_base")


def _pipeline_results(base_format, zero_format, *, base=0.1, zero=0.3, r1=0.3, lengths=(60, 62)):
    evals = {
        "base": {"pass@1": base, "format": base_format},
        "r1_zero": {"pass@1": zero, "format": zero_format},
        "r1": {"pass@1": r1, "format": 1.0},
        "distill": {"pass@1": 0.2, "format": 1.0},
        "student_rl": {"pass@1": 0.25, "format": 1.0},
    }
    trends = {"r1_zero": {"length": list(lengths), "format": [0.4, 0.9]}}
    stages = {"distill": {"minutes": 1.84}, "student_rl": {"minutes": 2.0}}
    compute = {"ratio": 1.003}
    return {"eval": evals, "trends": trends, "stages": stages, "compute": compute}


def test_paired_difference_and_noise_verdicts(tmp_path):
    # Two checkpoints on the same 3 prompts, 2 samples each (prompt 2 only scored by a).
    rows_a = [(0, 1), (0, 1), (1, 1), (1, 0), (2, 0), (2, 0), (3, 1)]
    rows_b = [(0, 0), (0, 1), (1, 0), (1, 0), (2, 0), (2, 1)]
    for name, rows in (("a", rows_a), ("b", rows_b)):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for row, correct in rows:
                f.write(
                    json.dumps({"row": row, "completion": "x", "correct": bool(correct)}) + "\n"
                )
    p = pipeline.paired_difference(str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"))
    # per-prompt differences over rows 0-2: 0.5, 0.5, -0.5 (row 3 has no pair)
    diffs = np.array([0.5, 0.5, -0.5])
    assert p["prompts"] == 3
    assert p["diff"] == pytest.approx(1 / 6)
    assert p["se"] == pytest.approx(np.sqrt(np.var(diffs, ddof=1) / 3))

    results = _pipeline_results(1.0, 1.0, base=0.1, zero=0.3)
    results["paired"] = {
        "r1_zero - base": {"diff": 0.2, "se": 0.05, "prompts": 128},  # 4 SE: a clear win
        "r1 - r1_zero": {"diff": 0.0, "se": 0.02, "prompts": 128},
        "distill - student_rl": {"diff": -0.05, "se": 0.03, "prompts": 128},
    }
    found = {t: (v, n) for t, v, n in pipeline.findings(results)}
    assert found["R1-Zero beats the base model"] == (
        "yes",
        "pass@1 0.100 -> 0.300 (+0.200 +- 0.050, paired over 128 prompts)",
    )
    assert found["R1 >= R1-Zero in accuracy"][0] == "yes (within noise)"  # a tie counts
    assert found["distillation beats RL on the student"][0] == "NO (within noise)"
    results["paired"]["distill - student_rl"]["se"] = 0.02  # 2.5 SE
    found = {t: v for t, v, _ in pipeline.findings(results)}
    assert found["distillation beats RL on the student"] == "NO"
    # Format: a binomial error over every sample. One malformed sample in 1024 is within noise
    # (SE sqrt(0.999 x 0.001 / 1024) = 0.001); 5% malformed is not.
    better_formed = "R1 is better formed than R1-Zero"
    results["eval"]["r1"].update(format=0.999, num_prompts=256, num_samples=4)
    results["eval"]["r1_zero"].update(format=1.0, num_prompts=256, num_samples=4)
    assert {t: v for t, v, _ in pipeline.findings(results)}[better_formed] == "NO (within noise)"
    results["eval"]["r1"]["format"] = 0.95
    assert {t: v for t, v, _ in pipeline.findings(results)}[better_formed] == "NO"
    results["eval"]["r1"]["format"] = 1.0  # both perfect: equal, not better (it read "yes")
    assert {t: v for t, v, _ in pipeline.findings(results)}[better_formed] == "NO"


def test_pipeline_findings_judge_the_numbers_they_print():
    verdicts = {
        text: (verdict, numbers)
        for text, verdict, numbers in pipeline.findings(_pipeline_results(0.014, 0.986))
    }
    assert verdicts["R1-Zero beats the base model"] == ("yes", "pass@1 0.100 -> 0.300")
    assert verdicts["R1-Zero learns the format"] == (
        "yes",
        "format 0.014 -> 0.986; training batches (T 1.0) 0.400 -> 0.900",
    )
    assert verdicts["R1-Zero's responses grow longer over training"][0] == "yes"
    assert verdicts["R1 >= R1-Zero in accuracy"][0] == "yes"  # ties count
    assert verdicts["R1 is better formed than R1-Zero"] == ("yes", "format 1.000 vs 0.986")
    assert verdicts["distillation beats RL on the student"] == (
        "NO",
        "pass@1 distilled 0.200 vs RL 0.250; RL's FLOPs 1.00x the distillation's; minutes: "
        "distillation 1.8, RL 2.0 (with its held-out evaluations)",
    )

    def verdict(results, text):
        return {t: v for t, v, _ in pipeline.findings(results)}[text]

    # A base that already writes the format (it copies the template's tags): kept, not learned;
    # lost is NO, and so is a rise that stays short.
    fmt = "R1-Zero learns the format"
    assert verdict(_pipeline_results(1.0, 1.0), fmt) == "kept: the base already writes it"
    assert verdict(_pipeline_results(0.9, 0.8), fmt) == "NO"
    assert verdict(_pipeline_results(0.2, 0.6), fmt) == "NO"
    assert verdict(_pipeline_results(0.5, 1.0), fmt) == "yes"
    # A clear rise from a base that mostly writes it already (seed 2: 0.725 -> 0.976 over 1024
    # samples each, 17 standard errors): partly learned; the same rise within noise: NO.
    partly = _pipeline_results(0.7, 0.95)
    assert verdict(partly, fmt) == "partly: the base writes it in 70% of its samples"
    for name in ("base", "r1_zero"):
        partly["eval"][name].update(num_prompts=2, num_samples=1)  # SE ~0.3 each
    assert verdict(partly, fmt) == "NO"
    longer = "R1-Zero's responses grow longer over training"
    assert verdict(_pipeline_results(0.0, 1.0, lengths=(62, 60)), longer) == "NO"
    assert verdict(_pipeline_results(0.0, 1.0, base=0.3), "R1-Zero beats the base model") == "NO"
    assert verdict(_pipeline_results(0.0, 1.0, r1=0.29), "R1 >= R1-Zero in accuracy") == "NO"


# --------------------------------------------------------------------------------------------------
# Half-written and damaged checkpoints inside a stage
# --------------------------------------------------------------------------------------------------


def test_half_written_checkpoint_is_ignored_and_the_run_resumes(reference_rl, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference_rl, workdir)
    ckpts = workdir / "checkpoints"
    last = sh.RL_STEPS
    # What a kill during the save of the last step leaves: an uncommitted orbax tmp directory
    # with part of the files (and no final export).
    half = ckpts / f"{last}.orbax-checkpoint-tmp-1234"
    os.rename(ckpts / str(last), half)
    for f in glob.glob(str(half / "optimizer" / "**" / "*"), recursive=True)[::2]:
        if os.path.isfile(f):
            os.remove(f)
    shutil.rmtree(workdir / "hf")

    config = sh.rl_config()
    config.ckpt.best_metric = ""  # (no best kept: changes no result, and no hf/best is written)
    run("rl", config, workdir)
    assert f"resumed from step {last - 1}" in (workdir / "log_p0.txt").read_text()
    assert not half.exists()  # orbax removed the uncommitted directory
    assert sh.metric_rows(workdir) == sh.metric_rows(reference_rl)
    want = sh.hf_params(os.path.join(reference_rl, "hf", "final"))
    got = sh.hf_params(workdir / "hf" / "final")
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert os.listdir(workdir / "hf") == ["final"]  # orbax's best_step() is the latest then


def test_dynamic_sampling_fills_the_batch_with_groups_whose_rewards_differ():
    """DAPO's dynamic sampling: groups whose rewards are all equal (advantages 0) are replaced
    by groups of further prompt batches, up to max_sampling_rounds; then filled with them."""
    import jax.numpy as jnp

    from r1jax import grpo
    from r1jax.stages import rl

    P, G, T = 4, 2, 3
    same, differ = [1.0, 1.0], [0.0, 1.0]
    rewards_of = [  # per round, per group (one scored sample of two: nothing to compare)
        [same, differ, same, same],
        [differ, [0.5, 0.5], differ, [np.nan, 1.0]],
        [differ, differ, differ, differ],
    ]
    rounds_run = []

    def rollout(d):  # (round d's prompts in a bucket of T + d tokens: a width of their own)
        rounds_run.append(d)
        rewards = jnp.asarray(np.concatenate(rewards_of[d]), jnp.float32)
        ids = np.arange(P * G * T, dtype=np.int32).reshape(P * G, T) + 1000 * d
        prompts = np.pad(ids, ((0, 0), (d, 0)), constant_values=-1)
        batch = grpo.Rollouts(
            prompt_ids=jnp.asarray(prompts), prompt_mask=jnp.asarray(prompts >= 0, jnp.int32),
            completion_ids=jnp.asarray(ids + 500), completion_mask=jnp.ones_like(ids),
            advantages=grpo.group_advantages(rewards, G, scale),
            rewards=rewards, per_reward=jnp.stack([rewards, code_of(d)], 1),
            truncated=jnp.zeros(P * G, bool),
        )  # fmt: skip
        lengths = {"completions/min_length": 1.0 + d, "completions/max_length": 3.0 + d}
        return batch, {"reward": jnp.float32(d), "rewards/code/mean": 9.0, **lengths}

    def code_of(d):  # [P * G] a code reward on no row of round 0, one of round 1, all of round 2
        return jnp.asarray(
            [np.nan] * 8 if d == 0 else [1.0] + [np.nan] * 7 if d == 1 else [0.0] * 8
        )

    for scale in ("group", "batch"):
        cfg = grpo.GRPOConfig(num_generations=G, scale_rewards=scale)
        rounds_run.clear()
        batch, metrics, rounds = rl.dynamic_sampling(rollout, cfg, 3, ("accuracy", "code"))
        assert rounds == 3 and rounds_run == [0, 1, 2]  # 1 + 2 + 4 groups that differ
        picks = [(0, 1), (1, 0), (1, 2), (2, 0)]
        rows = [1000 * d + (g * G + j) * T for d, g in picks for j in range(G)]
        # The prompts left-padded to the widest bucket picked from (their concatenation failed).
        prompt_ids, prompt_mask = np.asarray(batch.prompt_ids), np.asarray(batch.prompt_mask)
        assert prompt_ids.shape == (P * G, T + 2) and prompt_mask.sum(-1).tolist() == [T] * 8
        assert prompt_ids[prompt_mask == 1].reshape(-1, T)[:, 0].tolist() == rows
        assert set(prompt_ids[prompt_mask == 0].tolist()) == {cfg.pad_token_id, -1}
        assert np.asarray(batch.completion_ids)[:, 0].tolist() == [r + 500 for r in rows]
        want = np.concatenate([rewards_of[d][g] for d, g in picks])
        np.testing.assert_array_equal(np.asarray(batch.rewards), want)
        np.testing.assert_allclose(  # (over the new batch when the scale is the batch's)
            np.asarray(batch.advantages), grpo.group_advantages(want, G, scale), rtol=1e-6
        )
        # Reward statistics over every row drawn (not the rounds' mean: code's 1 of round 1
        # would weigh as much as round 2's eight 0s), the rest the rounds' mean.
        drawn = np.concatenate([np.concatenate(r) for r in rewards_of])
        assert metrics["reward"] == pytest.approx(np.nanmean(drawn))
        assert metrics["rewards/accuracy/mean"] == pytest.approx(np.nanmean(drawn))
        assert metrics["rewards/code/mean"] == pytest.approx(1 / 9)
        assert metrics["rewards/code/std"] == pytest.approx(np.std([1.0] + [0.0] * 8, ddof=1))
        assert metrics["frac_reward_unscored"] == pytest.approx(1 / 24)
        assert metrics["dynamic_sampling/rounds"] == 3.0
        assert metrics["completions/min_length"] == 1.0
        assert metrics["completions/max_length"] == 5.0
        assert metrics["dynamic_sampling/filled"] == 0.0
    # One round allowed: the groups that do not differ fill the batch, in the order drawn.
    batch, metrics, rounds = rl.dynamic_sampling(rollout, cfg, 1, ("accuracy", "code"))
    assert rounds == 1 and metrics["dynamic_sampling/filled"] == 0.75
    assert metrics["reward"] == 0.0  # (one round: its own metrics)
    np.testing.assert_array_equal(np.asarray(batch.rewards), np.concatenate(rewards_of[0]))

    # A reward that raised (held by the reward bridge, its rows NaN, which never differ) is
    # raised after the first round, not after every round was drawn.
    def failed():
        raise RuntimeError("the reward's backend is down")

    rounds_run.clear()
    with pytest.raises(RuntimeError, match="backend is down"):
        rl.dynamic_sampling(rollout, cfg, 3, ("accuracy", "code"), check=failed)
    assert rounds_run == [0]


def test_a_dynamically_sampled_run_resumes_at_its_prompt_batch(toy, tmp_path):
    """With dynamic sampling a step draws a varying number of prompt batches: the data position
    is no longer the step, so it is saved, and a resume continues from it."""
    from r1jax import checkpoint

    config = sh.rl_config()
    config.rl.dynamic_sampling, config.rl.max_sampling_rounds = True, 3
    run("rl", config, tmp_path / "whole")
    rows = sh.metric_rows(tmp_path / "whole")[1:]
    rounds = [int(r["dynamic_sampling/rounds"]) for r in rows]
    assert max(rounds) > 1 and all(1 <= n <= 3 for n in rounds), rounds
    # A step of a number of rounds seen before compiles nothing; of a new number, its gather and
    # its pooled reward statistics at most. (Not the last step: the evaluation compiles there.)
    with open(tmp_path / "whole" / "metrics.jsonl") as f:
        counts = [r["compiles"] for r in map(json.loads, f) if "dynamic_sampling/rounds" in r]
    new = [int(b - a) for a, b in zip(counts, counts[1:], strict=False)]
    for i, n in enumerate(new[:-1], start=1):
        assert n <= (2 if rounds[i] not in rounds[:i] else 0), (rounds, new)
    with checkpoint.Checkpointer(str(tmp_path / "whole" / "checkpoints")) as ckpt:
        assert ckpt.read_extra()["prompt_batches"] == sum(rounds)
    # Killed after step 2's checkpoint: step 3 samples the batches the whole run's did.
    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / str(sh.RL_STEPS))
    shutil.rmtree(tmp_path / "resumed" / "hf")
    run("rl", config, tmp_path / "resumed")
    assert sh.metric_rows(tmp_path / "resumed") == sh.metric_rows(tmp_path / "whole")
    want = sh.hf_params(tmp_path / "whole" / "hf" / "final")
    got = sh.hf_params(tmp_path / "resumed" / "hf" / "final")
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    config.rl.max_sampling_rounds = 0
    with pytest.raises(common.ConfigError, match="rl.max_sampling_rounds must be an integer >= 1"):
        common.validate(config, "rl")


def test_a_reference_synced_to_the_policy_is_saved_and_resumed(reference_rl, tmp_path):
    """rl.ref_sync_steps: the KL pulls towards the policy of the last sync, not the start; a
    resume continues from the synced reference (kept in the checkpoint), not the starting one."""
    config = sh.rl_config()
    config.rl.ref_sync_steps, config.rl.ref_sync_alpha = 1, 0.5
    run("rl", config, tmp_path / "synced")
    synced, fixed = sh.metric_rows(tmp_path / "synced"), sh.metric_rows(reference_rl)
    assert [r["step"] for r in synced] == [0, 1, 2, 3]  # (0: the evaluation at the start)
    assert synced[:2] == fixed[:2]  # (the first step's reference is the start either way)
    assert 0 < synced[2]["kl"] < fixed[2]["kl"]  # (halfway to the policy after step 1)
    # Killed after step 2's checkpoint: the resumed step 3 computes its KL as the whole run did.
    shutil.copytree(tmp_path / "synced", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / str(sh.RL_STEPS))
    shutil.rmtree(tmp_path / "resumed" / "hf")
    run("rl", config, tmp_path / "resumed")
    log = (tmp_path / "resumed" / "log_p0.txt").read_text()
    assert f"resumed from step {sh.RL_STEPS - 1}" in log
    assert sh.metric_rows(tmp_path / "resumed") == synced
    want = sh.hf_params(tmp_path / "synced" / "hf" / "final")
    got = sh.hf_params(tmp_path / "resumed" / "hf" / "final")
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    for field, value, message in (
        ("rl.ref_sync_steps", -1, "rl.ref_sync_steps must be an integer >= 0"),
        ("rl.ref_sync_alpha", 0.0, r"rl.ref_sync_alpha must be in \(0, 1\]"),
        ("rl.beta", 0.0, "rl.ref_sync_steps=1 syncs the reference model, which rl.beta=0"),
        ("rl.ref_model", str(tmp_path), "leave rl.ref_model empty"),
    ):
        bad = copy.deepcopy(config)
        sh.set_fields(bad, {field: value})
        with pytest.raises(common.ConfigError, match=message):
            common.validate(bad, "rl")


def test_rl_with_mini_batches_runs_and_refuses_uneven_ones(toy, tmp_path):
    """rl.num_mini_batches (R1's 16 per rollout): M optimizer steps per pass over a rollout,
    off-policy from the second on (the rollout keeps the sampling policy's log-probs)."""
    config = sh.rl_config()
    sh.set_fields(config, {"rl.prompts_per_step": 8, "rl.num_mini_batches": 2, "rl.steps": 2})
    sh.set_fields(config, {"eval.num_prompts": 2, "ckpt.every": 2})
    result = run("rl", config, tmp_path / "run")
    assert math.isfinite(result["loss"]) and result["update_skipped"] == 0.0
    rows = sh.metric_rows(tmp_path / "run")
    assert rows[-1]["step"] == 2 and all("clip_ratio/region_mean" in r for r in rows[1:])
    for value, message in (
        (3, "rl.num_mini_batches=3 must deal the rl.prompts_per_step=8 prompts"),
        (4, r"a mini-batch's 4 rows \(rl.num_mini_batches=4\) cannot be split over the mesh's 8"),
        (0, "rl.num_mini_batches must be >= 1"),
    ):
        bad = copy.deepcopy(config)
        bad.rl.num_mini_batches = value
        with pytest.raises(common.ConfigError, match=message):
            common.validate(bad, "rl")


def test_an_rl_resume_with_another_objective_or_model_is_refused(
    reference_rl, tmp_path, monkeypatch
):
    """Only the data order was recorded: a resume with other rewards, beta or iterations went on
    as one run (config_rl.json then named only the new settings), and one from another starting
    model of the same shape ran 0 steps and exported the old policy as its own. Other stop
    strings end every completion elsewhere. Each is refused before any model loads (minutes,
    for a real one)."""
    workdir = tmp_path / "run"
    shutil.copytree(reference_rl, workdir)
    first_config = (workdir / "config_rl.json").read_text()
    config = sh.rl_config()
    changes = {
        "rl.beta": (config.rl.beta + 0.1, "rl.beta: "),
        "rl.num_iterations": (2, "rl.num_iterations: 1 then, 2 now"),
        "rewards.format": (config.rewards.format + 1.0, "rewards: "),
        "model.path": (str(workdir / "hf" / "final"), "model.path: "),  # the trained policy
        "data.stop_strings": ((" ",), "data.stop_strings: "),
    }

    def no_load(*args, **kwargs):
        raise AssertionError("loaded a model before refusing the resume")

    # The same model whose folder now declares another eos id (generation_config.json): sampling
    # stops there too, so the completions end elsewhere.
    declared = tmp_path / "declared"
    shutil.copytree(common.resolve_model_path(config.model.path), declared)
    (declared / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 5]}))
    stops = r"stop_token_ids: \[0.*\] then, \[0, .*5.*\] now"
    monkeypatch.setattr(common, "load_model", no_load)
    for field, (value, named) in [*changes.items(), ("model.path", (str(declared), stops))]:
        changed = sh.set_fields(copy.deepcopy(config), {field: value})
        with pytest.raises(common.ConfigError, match=rf"was saved by a run .*{named}"):
            run("rl", changed, workdir)
        # The refused run's settings did not replace those the checkpoints were made with.
        assert (workdir / "config_rl.json").read_text() == first_config, field


def test_a_cosine_resumed_over_another_span_says_so(reference_rl, caplog):
    """More rl.steps are allowed at a resume, but a cosine schedule is then recomputed over the
    new total and the learning rate jumps back up, without a word (SFT and pretraining too:
    `test_a_resume_with_settings_that_change_the_data_order_is_refused`)."""
    from r1jax import checkpoint
    from r1jax.stages import rl

    with checkpoint.Checkpointer(os.path.join(reference_rl, "checkpoints")) as ckpt:
        saved = ckpt.read_extra()["schedule"]  # (each step records its schedule)
    config = sh.rl_config()
    assert saved == [config.optim.schedule, rl.optimizer_steps(config)]
    config.optim.schedule = "cosine"
    steps = rl.optimizer_steps(config)
    common.warn_if_schedule_changed(config, ["cosine", steps], steps)
    assert "does not continue" not in caplog.text  # the same span: it continues
    common.warn_if_schedule_changed(config, ["cosine", 2], rl.optimizer_steps(config))
    assert f"now spans {rl.optimizer_steps(config)} optimizer steps" in caplog.text
    assert "'cosine' over 2): the learning rate does not continue" in caplog.text


def test_damaged_latest_checkpoint_gives_one_clear_error(reference_rl, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference_rl, workdir)
    step_dir = workdir / "checkpoints" / str(sh.RL_STEPS)
    chunks = [
        f
        for f in glob.glob(str(step_dir / "model" / "**" / "*"), recursive=True)
        if os.path.isfile(f) and "/d/" in f
    ]
    assert chunks, "no array data files found to damage"
    for f in chunks:
        with open(f, "r+b") as fh:
            fh.truncate(max(os.path.getsize(f) // 3, 1))
    before = sorted(os.listdir(workdir / "checkpoints"))

    with pytest.raises(CheckpointError) as info:
        run("rl", sh.rl_config(), workdir)
    message = str(info.value)
    assert str(step_dir) in message and "\n" not in message
    assert sorted(os.listdir(workdir / "checkpoints")) == before  # nothing deleted


# --------------------------------------------------------------------------------------------------
# Rejection-sampling filters on hand-made samples
# --------------------------------------------------------------------------------------------------


def sample(row, completion, correct=True, fmt=1.0, language=1.0, **flags):
    return {
        "row": row,
        "completion": completion,
        "correct": correct,
        "format": fmt,
        "language": language,
        **flags,  # prompt, truncated, unscored, states_held_out
    }


def test_filter_samples_drops_each_reason_once_in_order():
    samples = [
        sample(0, "<think>a</think><answer>1</answer>"),  # kept
        sample(0, "<think>cut", correct=False, fmt=0.0, truncated=True),  # truncated (first)
        sample(0, "wrong", correct=False, fmt=0.0, language=0.0),  # incorrect
        sample(0, "no tags", fmt=0.0, language=0.0),  # malformed
        sample(0, "<think>4 + 5 = 9</think><answer>1</answer>", states_held_out=True),
        sample(0, "<think>混合</think><answer>1</answer>", language=0.5),  # mixed language
        sample(0, "<think>" + "word " * 30 + "</think><answer>1</answer>"),  # long paragraph
        sample(0, "<think>a\n```\nx = 1\n```</think><answer>1</answer>"),  # code block
        sample(0, "<think>" + "w " * 8 + "\n\n" + "w " * 8 + "</think><answer>1</answer>"),  # kept
        sample(0, "<think>12 + 30 = 42</think><answer>42</answer>", language=None),  # no words
        sample(0, "  <think>a</think><answer>1</answer>\n"),  # duplicate (stripped)
        sample(0, "<think>b</think><answer>1</answer>"),  # kept (2nd of row 0)
        sample(0, "<think>c</think><answer>1</answer>"),  # over the cap of 2
        sample(1, "<think>a</think><answer>1</answer>"),  # same text, other row
    ]
    kept, dropped = filter_samples(
        samples,
        min_language_consistency=0.9,
        max_paragraph_chars=100,
        drop_code_blocks=True,
        max_per_prompt=4,
    )
    assert [samples.index(s) for s in kept] == [0, 8, 9, 11, 13]
    assert dropped == {
        "truncated": 1,
        "incorrect": 1,
        "malformed": 1,
        "states_held_out": 1,
        "mixed_language": 1,
        "long_paragraph": 1,
        "code_block": 1,
        "duplicate": 1,
        "over_cap": 1,
    }
    assert len(kept) + sum(dropped.values()) == len(samples)


def test_filter_samples_count_one_problem_on_several_rows_once_and_drop_unscored_samples():
    """A file with one problem on several rows wrote the same (prompt, answer) once per row
    past the de-duplication and the per-prompt cap; a sample whose grading worker died twice
    was dropped as "incorrect"."""
    same = "<think>a</think><answer>4</answer>"
    samples = [sample(r, same, prompt="What is 2 + 2?") for r in range(3)]
    samples += [sample(3, "<think>b</think><answer>4</answer>", prompt="What is 2 + 2?")]
    samples += [sample(4, same, correct=False, unscored=True)]
    kept, dropped = filter_samples(samples, max_per_prompt=1)
    assert [samples.index(s) for s in kept] == [0]
    assert dropped == {"duplicate": 2, "over_cap": 1, "unscored": 1}
    # Not asked to be correct, a sample need not be graded (it was dropped all the same).
    kept, dropped = filter_samples(samples, require_correct=False)
    assert [samples.index(s) for s in kept] == [0, 3, 4] and dropped == {"duplicate": 2}


def test_filter_samples_switches():
    samples = [
        sample(0, "x", correct=False, fmt=0.0, language=0.2),
        sample(0, "y", correct=False, fmt=0.5, language=1.0, truncated=True),
        sample(0, "x", correct=True, fmt=1.0, language=1.0),
    ]
    assert filter_samples(samples)[1]["truncated"] == 1
    kept, dropped = filter_samples(
        samples, require_correct=False, require_format=False, drop_truncated=False
    )
    # No filter but de-duplication; the later "x" is the duplicate even though it is correct.
    assert [samples.index(s) for s in kept] == [0, 1] and dropped == {"duplicate": 1}
    kept, dropped = filter_samples(
        samples, require_correct=False, require_format=True, drop_truncated=False
    )
    assert [samples.index(s) for s in kept] == [2] and dropped == {"malformed": 2}
    kept, dropped = filter_samples(
        samples,
        require_correct=False,
        require_format=False,
        drop_truncated=False,
        min_language_consistency=0.5,
    )
    assert [samples.index(s) for s in kept] == [1, 2] and dropped == {"mixed_language": 1}
    assert filter_samples([]) == ([], {})
    # Nothing sampled (an untrained model's EOS first): kept with the filters off, and SFT then
    # refused the whole file after all the sampling.
    nothing = {**sample(1, "", correct=False, fmt=0.0, language=None), "empty": True}
    kept, dropped = filter_samples(
        [nothing], require_correct=False, require_format=False, drop_truncated=False
    )
    assert kept == [] and dropped == {"empty": 1}
    del nothing["empty"]  # (saved before it was recorded)
    nothing["completion"] = "<think>\n"
    assert filter_samples([nothing], require_correct=False, require_format=False)[0] == []


# --------------------------------------------------------------------------------------------------
# Eval metrics on hand-made samples
# --------------------------------------------------------------------------------------------------


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of all k-subsets of n samples (c of them correct) that contain a correct one."""
    flags = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(flags, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)
    assert pass_at_k(n, 0, 1) == 0.0 and pass_at_k(n, n, 1) == 1.0


@pytest.mark.parametrize("args", [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_refuses_impossible_counts(args):
    with pytest.raises(ValueError, match="n="):
        pass_at_k(*args)


def test_majority_vote_and_ties():
    assert majority_vote(["3", "4", "4", "3"]) == 0  # a tie goes to the answer sampled first
    assert majority_vote(["4", "3", "3", "4"]) == 0
    assert majority_vote(["5", "3", "3", "4"]) == 1  # the most frequent answer wins
    assert majority_vote([None, " 7 ", "7", "8"]) == 1  # whitespace ignored
    # Samples without an answer vote for "no answer": a model that rarely finishes does not
    # win the vote on its one answer (63 unanswered and one right answer gave cons@64 = 1).
    assert majority_vote([None, "", "  ", "7"]) == 0 and majority_vote([None, "7", "7"]) == 1
    assert majority_vote([]) is None  # nothing to vote on


def test_majority_vote_groups_answers_the_grader_deems_equal():
    from r1jax.stages.eval import same_answer

    math = same_answer("math", None)
    answers = ["3", "3", "0.5", "1/2", "\\frac{1}{2}"]
    assert majority_vote(answers) == 0  # as strings, "3" is the most frequent
    assert majority_vote(answers, math) == 2  # three ways of writing one half outvote it
    correct = [False, False, True, True, True]
    assert score_prompt(answers, correct, math)["cons@5"] == 1.0
    arithmetic = same_answer("arithmetic", None)
    assert majority_vote(["1233", "1233", "1234", "1,234", "1234."], arithmetic) == 2
    assert majority_vote(["x", "x", "1234", " 1234"], arithmetic) == 0  # unparsed: strings
    countdown = same_answer("countdown", None)
    assert majority_vote(["1+2", "(3*4)", "( 3 * 4 )"], countdown) == 1
    # Every equation reaching the target from the row's numbers is one answer: three correct
    # ones outvote a wrong one written twice (they split 1-1-1 against 2 before).
    votes = ["25 - 4 * 2", "25 - 4 * 2", "(75 - 3) / 4 + 1", "1 + (75 - 3) / 4", "1+((75-3)/4)"]
    assert score_prompt(votes, [False, False, True, True, True], countdown)["cons@5"] == 1.0
    # One value, one answer (a row may leave numbers out; one breaking its rules is graded
    # apart): two right equations from other numbers split the vote against a wrong one.
    assert countdown("3 + 4", "2 + 5") and not countdown("3 + 4", "2 + 6")
    votes = ["75 + 3", "75 + 3", "25 * 4", "75 + 25", "(75 + 25) * 1"]
    assert score_prompt(votes, [False, False, True, True, True], countdown)["cons@5"] == 1.0
    assert countdown("3 + 4 = 7", "4+3") and countdown("x", " x ")
    assert same_answer("code", [{"input": "", "output": ""}]) is None
    # math-verify's verify(gold, answer) is not symmetric: "2, 1" matches "(1, 2)", not the
    # reverse, and the same seven samples won or lost the vote by which came first.
    votes = ["2, 1", "(1, 2)", "2, 1", "(1, 2)", "7", "7", "7"]
    grades = [True, True, True, True, False, False, False]
    for order in (votes, votes[1:4] + votes[:1] + votes[4:]):
        assert score_prompt(order, grades, math)["cons@7"] == 1.0, order
    # The answers graded correct are one answer (each equals the reference), however written:
    # "Option B", "\text{B}" and "B) 42" are B to the grader but not to one another, and lost
    # 1-1-1 to two "C"s; a right minority still loses.
    letters = ["Option B", "\\text{B}", "B) 42", "C", "C"]
    assert score_prompt(letters, [True, True, True, False, False], math)["cons@5"] == 1.0
    letters = ["B", "B", "C", "C", "C"]
    assert score_prompt(letters, [True, True, False, False, False], math)["cons@5"] == 0.0


def test_code_rows_vote_on_the_program_the_tests_ran():
    """cons@k voted on the <answer>/\\boxed{} answer, which code completions (graded on their
    last ```python block) rarely have: cons@k was 0 with every sample passing the tests."""
    from r1jax.stages.eval import voted_answer

    tests = [{"input": "", "output": "1"}]
    texts = [f"Here:\n```python\nprint({x})\n```\n" for x in ("1", "1", "2")]
    answers = [voted_answer(t, "code", tests) for t in texts]
    assert answers[0] == "print(1)\n"
    assert score_prompt(answers, [True, True, False])["cons@3"] == 1.0
    assert voted_answer("<answer>\\boxed{7}</answer>", "math", None) == "7"
    # Programs vote as their text, the passing ones too: two different passing programs
    # against three copies of a failing one lose (they were one answer, as graded: cons@k was
    # "two pass").
    programs = ["print(1)", "print(0 + 1)", "print(2)", "print(2)", "print(2)"]
    assert score_prompt(programs, [True, True, False, False, False])["cons@5"] == 0.0


def test_answers_too_long_to_grade_are_not_compared_for_the_vote(monkeypatch):
    """Two answers of 600 kB took seconds per math-verify comparison, k^2 / 2 comparisons per
    prompt: answers longer than accuracy_reward grades match only an identical string."""
    from r1jax import rewards
    from r1jax.stages.eval import same_answer

    compared = []
    monkeypatch.setattr(rewards, "answers_match", lambda a, b: compared.append((a, b)) or False)
    long = "1+" * 300_000 + "1"
    math = same_answer("math", None)
    assert majority_vote([long, long + " ", "2", "3"], math) == 0
    assert compared == [("2", "3"), ("3", "2")]  # (both ways: math-verify is not symmetric)


def test_score_prompt_pass_and_cons_with_ties():
    # Two answers tie 2-2: the first sampled ("3", wrong) wins, so cons@4 is 0.
    m = score_prompt(["3", "4", "4", "3"], [False, True, True, False])
    assert m == {"pass@1": 0.5, "pass@4": 1.0, "cons@4": 0.0}
    m = score_prompt(["4", "3", "3", "4"], [True, False, False, True])
    assert m["cons@4"] == 1.0
    # A wrong majority beats a right minority; pass@k still credits the right one.
    m = score_prompt(["9", "9", "9", "2"], [False, False, False, True])
    assert m == {"pass@1": 0.25, "pass@4": 1.0, "cons@4": 0.0}
    # No answers at all: "no answer" wins, wrong.
    assert score_prompt([None, None], [False, False]) == {
        "pass@1": 0.0,
        "pass@2": 0.0,
        "cons@2": 0.0,
    }
    # 63 samples without an answer, one right: pass@64 credits it, the vote does not.
    assert score_prompt([None] * 63 + ["7"], [False] * 63 + [True])["cons@64"] == 0.0
    # Unscored samples (NaN: their worker died) count as wrong, and vote as graded samples of
    # the same answer are: two unscored "7"s split the 7s 2-2 against three 8s before.
    nan = float("nan")
    m = score_prompt(list("7777888"), [1.0, nan, 1.0, nan, 0.0, 0.0, 0.0])
    assert m == {"pass@1": pytest.approx(2 / 7), "pass@7": 1.0, "cons@7": 1.0}
    m = score_prompt(["7", "7", "8"], [nan, nan, 0.0])  # (no graded twin: wrong)
    assert m["cons@3"] == 0.0 and m["pass@1"] == 0.0
    assert score_prompt(["7", "7", "8"], [0.5, 0.5, 1.0])["pass@1"] == pytest.approx(1 / 3)
    # ... and an unscored answer without an identical twin, as one it is `same` as.
    from r1jax.stages.eval import same_answer

    math = same_answer("math", None)
    answers = ["1/2", "0.5", "0.5", "3", "3"]
    assert score_prompt(answers, [1.0, 1.0, 1.0, 0.0, 0.0], math)["cons@5"] == 1.0
    assert score_prompt(answers, [1.0, nan, nan, 0.0, 0.0], math)["cons@5"] == 1.0
    with pytest.raises(ValueError):
        score_prompt(["1"], [True, False])
    assert aggregate([{"pass@1": 0.5, "cons@2": 1.0}, {"pass@1": 0.0, "cons@2": 0.0}]) == {
        "pass@1": 0.25,
        "cons@2": 0.5,
    }


def test_file_data_holds_out_its_last_rows_and_refuses_to_train_on_them():
    from r1jax import data

    config = common.data_config(source=str(data.sample_path("gsm8k_sample.jsonl")))  # 5 rows
    config.num_eval = 2
    train = common.load_prompt_rows(config, "train", seed=0)
    held_out = common.load_prompt_rows(config, "eval", seed=0)
    assert len(train) == 3 and len(held_out) == 2
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    config.num_eval = 5  # every row held out: nothing left to train on without scoring on it
    with pytest.raises(common.ConfigError, match="data.num_eval=5.*data.eval_source"):
        common.load_prompt_rows(config, "train", seed=0)
    config.eval_source = str(data.sample_path("math_sample.jsonl"))  # a separate file
    assert len(common.load_prompt_rows(config, "train", seed=0)) == 5


def test_training_rows_repeating_a_held_out_prompt_are_left_out(tmp_path):
    """Datasets repeat rows: a copy of a held-out row among the training rows was trained on,
    and the held-out score counted it (10 of 10 held-out prompts in a file of duplicates)."""

    def write(name, questions):
        rows = [{"question": q, "answer": "#### 1"} for q in questions]
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(tmp_path / name)

    questions = ["New?"] + [f"What is {i % 4} + 1?" for i in range(8)] + ["What is  0 +  1?"]
    config = common.data_config(source=write("all.jsonl", questions))
    config.num_eval = 3  # 2 + 1, 3 + 1 and 0 + 1 (spaced otherwise, the same question)
    train = common.load_prompt_rows(config, "train", seed=0)
    assert [r["prompt"] for r in train] == ["New?", "What is 1 + 1?", "What is 1 + 1?"]
    config.eval_source = write("held_out.jsonl", ["What is 1 + 1?"])  # held out in a file
    train = common.load_prompt_rows(config, "train", seed=0)
    assert len(train) == 8 and "What is 1 + 1?" not in {r["prompt"] for r in train}
    config.source = config.eval_source
    with pytest.raises(common.ConfigError, match="every training prompt is also a held-out one"):
        common.load_prompt_rows(config, "train", seed=0)


def test_rows_carry_the_language_their_reasoning_should_be_in(tmp_path):
    """The loader gave every row without a language column "en", so a Chinese dataset's
    rejection sampling dropped every Chinese chain of thought as mixed-language (its
    `rejection_sampling.language` was never read) and RL's language reward pulled towards
    English; a code dataset's `language: python` column crashed the reward mid-run."""
    from r1jax.rewards import language_consistency_reward

    path = tmp_path / "zh.jsonl"
    rows = [{"question": f"{i} 加 1 是多少？", "answer": f"#### {i + 1}"} for i in range(4)]
    rows[1]["language"] = "English"  # a row's own column wins
    rows[2]["language"] = "python"  # a column of another meaning: the default
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = common.data_config(source=str(path))
    config.num_eval, config.language = 1, "zh"
    common.validate_data(config)
    train = common.load_prompt_rows(config, "train", seed=0)
    assert [r["language"] for r in train] == ["zh", "en", "zh"]
    from r1jax.data import loaders

    summary = loaders.load_rows(str(path), language="zh")[1].summary()
    assert "1 rows' language column names no language the language reward tells" in summary
    assert "'python' x1" in summary  # (a real but unsupported one, "fr", is named the same way)
    chinese = "<think>三加一等于四</think><answer>4</answer>"
    assert language_consistency_reward([chinese], language=[train[0]["language"]]) == [1.0]
    config.field_map.language = "language"  # named by the user: a bad value is an error
    with pytest.raises(common.ConfigError, match=r"zh.jsonl:3: .*unsupported language 'python'"):
        common.load_prompt_rows(config, "train", seed=0)
    config.language = "klingon"
    with pytest.raises(common.ConfigError, match="data.language: .*unsupported language"):
        common.validate_data(config)
    builtin = common.data_config()
    builtin.num_train, builtin.language = 2, "ru"
    assert {r["language"] for r in common.load_prompt_rows(builtin, "train", seed=0)} == {"ru"}


def test_file_data_with_other_column_names_and_bad_lines_loads_from_config_fields(tmp_path):
    """What the loader takes as arguments (a column map, skipping malformed lines) is reachable
    from the command line, and its error says how."""
    rows = [{"q": f"What is {i} + 1?", "a": str(i + 1)} for i in range(6)]
    path = tmp_path / "own_columns.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    config = common.data_config(source=str(path))
    config.num_eval = 2
    config.on_bad_json = "skip"
    with pytest.raises(common.ConfigError, match=r"--config.data.field_map.prompt=COLUMN"):
        common.load_prompt_rows(config, "train", seed=0)
    config.field_map.prompt, config.field_map.solution = "q", "a"
    train = common.load_prompt_rows(config, "train", seed=0)
    assert [(r["prompt"], r["solution"]) for r in train] == [(r["q"], r["a"]) for r in rows[:4]]
    config.on_bad_json = "error"
    with pytest.raises(
        common.ConfigError, match=r"jsonl:7: malformed JSON.*--config.data.on_bad_json=skip\)$"
    ):
        common.load_prompt_rows(config, "train", seed=0)


def test_grader_checks_each_row_by_its_own_rule():
    """A dataset mixing built-in tasks, math and code (e.g. a glob over several files): every
    sample is graded by the rule its row calls for, not the first row's."""
    import types

    from r1jax import data
    from r1jax.data import loaders, tasks
    from r1jax.stages.eval import Grader

    arithmetic = tasks.make_dataset(tasks.make_task("arithmetic"), 1, seed=0, split="eval")[0]
    math = loaders.load_rows(str(data.sample_path("gsm8k_sample.jsonl")))[0][0]
    code = loaders.load_rows(str(data.sample_path("code_contests_sample.jsonl")))[0][0]
    rows = [math, code, arithmetic]
    answer = lambda body: f"<think>x</think><answer>{body}</answer>"  # noqa: E731
    program = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    texts = [
        answer(math["solution"]),
        answer(program),
        answer(arithmetic["solution"]),
        answer("-1"),  # a wrong answer to the math row
        answer("```python\nprint(-987654321)\n```"),  # a wrong program
    ]
    keys = sorted({k for r in rows for k in r})
    columns = {k: [r.get(k) for r in [*rows, math, code]] for k in keys}
    expected = [1.0, 1.0, 1.0, 0.0, 0.0]
    # In-process, and with math and code scored in two worker processes (`submit`: on the
    # grader's background thread), as evaluation and rejection sampling grade.
    with Grader(types.SimpleNamespace(rows=rows), num_workers=0) as grade:
        np.testing.assert_array_equal(grade(texts, **columns), expected)
    with Grader(types.SimpleNamespace(rows=rows), num_workers=2) as grade:
        np.testing.assert_array_equal(grade.submit(texts, **columns).result(), expected)
        pools = [f._pool for f in grade._by_kind.values()]
        assert sum(p is not None for p in pools) == 2  # math and code; the task rule in-process
    assert all(f._pool is None for f in grade._by_kind.values())  # workers stopped


def test_a_sample_whose_grading_worker_died_is_unscored_not_incorrect():
    """Pooled grading gives NaN for a sample whose worker died twice (killed for memory): it
    was graded incorrect; a reward that does not apply (malformed tests) grades 0 as before."""
    import types

    from r1jax.rewards.compose import RewardOutput
    from r1jax.stages.eval import Grader

    class Pooled:  # as the pool returns them: the second sample's worker died twice
        def __call__(self, texts, **columns):
            total, values = [1.0, np.nan, 0.0], [1.0, np.nan, np.nan]  # the third: no answer
            per_reward = np.array([values, [1.0] * 3], np.float32)
            return RewardOutput(
                np.array(total, np.float32), per_reward, ("accuracy", "format"), (1, 0)
            )

        def close(self, wait=True):
            pass

    with Grader(types.SimpleNamespace(rows=[{"task": None}]), num_workers=0) as grade:
        grade._by_kind["accuracy"] = Pooled()
        np.testing.assert_array_equal(grade(["a", "b", "c"], task=[None] * 3), [1.0, np.nan, 0.0])


def test_an_unscored_sample_is_marked_so_in_eval_samples():
    """eval_samples.jsonl wrote a sample whose grading worker died as an ordinary wrong answer
    (the same answer then read graded both ways); it says unscored, as rejection sampling's
    records do."""
    import concurrent.futures
    import types

    from r1jax.stages import eval as eval_stage

    batch = eval_stage.GradedBatch(
        ids=[0],
        out=types.SimpleNamespace(tokens=[[1, 2], [1, 2]]),
        texts=["<answer>1</answer>"] * 2,
        columns={},
        correct=np.array([1.0, np.nan]),
    )
    prompts = types.SimpleNamespace(rows=[{"prompt": "q", "solution": "1"}], indices=[7])
    votes, records = [], []
    with concurrent.futures.ThreadPoolExecutor(1) as voter:
        eval_stage._score_batch(batch, prompts, 2, voter, votes, [], [], records)
        assert votes[0][1].result()["pass@1"] == 0.5
    assert [(r["row"], r["correct"], r["unscored"]) for r in records] == [
        (7, True, False),
        (7, False, True),
    ]


def test_sample_and_grade_grades_a_batch_while_the_next_one_samples():
    """Evaluation and rejection sampling grade batch i on the host (code tests, math-verify)
    while batch i + 1 samples on the device; each batch keeps its own samples and grades."""
    import types

    from r1jax.stages import eval as eval_stage

    events, in_flight = [], []

    class Prompts:  # (row 1: a conversation under a chat template that opens "<think>\n")
        prefixes = ["<think>", "<think>\n", "<think>"]
        columns = {"answer": ["a", "b", "c"]}

        def generate(self, model, ids, *, batch, num_samples, **kwargs):
            assert (batch, num_samples, kwargs) == (2, 2, {"seed": 3})
            events.append(("sample", ids, [f.done() for f in in_flight]))
            tokens = [[i, s] for i in ids for s in range(num_samples)]
            return types.SimpleNamespace(tokens=tokens)

    class Tokenizer:
        def batch_decode(self, tokens, skip_special_tokens):
            return [f"{i}.{s}" for i, s in tokens]

    class Grade:  # grades finish when asked for, as a slow pool would
        def submit(self, texts, **columns):
            events.append(("grade", texts[0]))
            future = eval_stage.concurrent.futures.Future()
            correct = np.array([c == "a" for c in columns["answer"]], float)
            future.result = lambda: (events.append(("wait", texts[0])), correct)[1]
            future.done = lambda: False
            in_flight.append(future)
            return future

    out = []
    for b in eval_stage.sample_and_grade(
        Grade(), None, Tokenizer(), Prompts(), [[0, 1], [2]], batch=2, num_samples=2, seed=3
    ):
        events.append(("use", b.ids))
        out.append(b)
    assert events == [
        ("sample", [0, 1], []),
        ("grade", "<think>0.0"),
        ("sample", [2], [False]),  # batch 0 still grading
        ("grade", "<think>2.0"),
        ("wait", "<think>0.0"),
        ("use", [0, 1]),
        ("wait", "<think>2.0"),
        ("use", [2]),
    ]
    # Each sample after its own prompt's opened tag (the first prompt's for all: SFT on the
    # rejection-sampled file trained a "\n" the question's samples never had)
    assert out[0].texts == ["<think>0.0", "<think>0.1", "<think>\n1.0", "<think>\n1.1"]
    assert out[0].columns == {"answer": ["a", "a", "b", "b"]}
    np.testing.assert_array_equal(out[0].correct, [1, 1, 0, 0])
    np.testing.assert_array_equal(out[1].correct, [0, 0])


def test_pipeline_settings_made_at_the_top_level_reach_every_stage():
    config = sh.load_config("pipeline")
    assert pipeline.shared_overrides(config) == {}
    sh.set_fields(config, {"mesh.data": -1, "mesh.fsdp": 1, "model.dtype": "bfloat16"})
    assert pipeline.shared_overrides(config) == {
        "mesh": {"data": -1, "fsdp": 1, "tensor": 1, "expert": 1},  # (one layout: all of it)
        "model": {"dtype": "bfloat16"},
    }
    sh.set_fields(config, {"r1_zero.seed": 7})  # run() would give every stage config.seed
    with pytest.raises(common.ConfigError, match="r1_zero.seed=7.*--config.seed"):
        pipeline.validate(config)
    # The sandbox reaches the stages and the final evaluations (which missed it), and accepting
    # unsandboxed code does not mark finished stages as run with other settings.
    config = sh.load_config("pipeline")
    sh.set_fields(config, {"sandbox.allow_unsandboxed": True, "sandbox.timeout_s": 7.0})
    assert pipeline._stage_config(config, "r1_zero").sandbox.allow_unsandboxed
    final_eval = pipeline._eval_config(config, "/some/model")
    assert final_eval.sandbox.allow_unsandboxed and final_eval.sandbox.timeout_s == 7.0
    assert pipeline._result_neutral("sandbox.allow_unsandboxed", "rl")
    assert pipeline._result_neutral("sandbox.timeout_s", "sft")  # runs no code
    assert not pipeline._result_neutral("sandbox.timeout_s", "rl")
    assert not pipeline._result_neutral("sft.epochs", "sft")


def test_fields_that_would_fail_mid_run_are_refused_up_front(toy, tmp_path, caplog, monkeypatch):
    """Each of these once ended a run steps in (or after its sampling) with a traceback."""
    from r1jax.models import hf
    from r1jax.stages import rl as rl_stage
    from r1jax.stages import sft as sft_stage

    cases = [
        ("eval", "num_samples", 0, r"eval.num_samples must be an integer >= 1"),
        ("eval", "max_new_tokens", 0, r"eval.max_new_tokens must be an integer >= 1"),
        ("eval", "batch_prompts", 0, r"eval.batch_prompts must be an integer >= 1"),
        ("eval", "temperature", 1e-38, r"eval.temperature must be a finite number >= 1e-06"),
        ("rl", "temperature", 1e-38, r"rl.temperature must be a finite number >= 1e-06"),
        ("data", "prompt_buckets", (64, "abc"), r"data.prompt_buckets must be prompt lengths"),
        (
            "data",
            "eval_source",
            str(tmp_path / "nope.jsonl"),
            r"data.eval_source: dataset file not found",
        ),
    ]
    for section, field, value, message in cases:
        config = sh.load_config("rl")
        config[section][field] = value
        with pytest.raises(common.ConfigError, match=message):
            rl_stage.validate(config)
    from r1jax.stages import rejection_sampling as rs

    config = sh.load_config("rejection_sampling")
    config.rejection_sampling.temperature = 1e-38
    with pytest.raises(common.ConfigError, match=r"rejection_sampling.temperature must be a fin"):
        rs.validate(config)
    # A prompt longer than every bucket: refused when the prompts are tokenised, naming the field.
    config = sh.load_config("rl")
    config.data.prompt_buckets = (8,)
    tokenizer = hf.tokenizer(os.path.join(toy[0], "toy_base"))
    rows = [{"prompt": "What is 12 + 30?", "solution": "42"}] * 3
    with pytest.raises(common.ConfigError, match=r"3 of 3 prompts are longer than the largest"):
        common.PromptSet(rows, tokenizer, config.data, seed=0)
    # ... or left out and counted: one long prompt in a big file need not refuse the run.
    config.data.prompt_overflow, config.data.prompt_buckets = "skip", (8,)
    config.data.template = "plain"
    short = [{"prompt": "1 + 2?", "solution": "3"}, {"prompt": "3 + 4?", "solution": "7"}]
    prompts = common.PromptSet([rows[0], *short], tokenizer, config.data, seed=0)
    assert prompts.rows == short and prompts.columns["solution"] == ["3", "7"]
    assert len(prompts.token_ids) == len(prompts.prompts) == 2
    with pytest.raises(common.ConfigError, match=r"every prompt is longer"):
        common.PromptSet(rows, tokenizer, config.data, seed=0)
    config.data.prompt_overflow = "truncate"
    with pytest.raises(common.ConfigError, match=r"data.prompt_overflow must be 'error' or 'skip'"):
        common.validate_data(config.data)
    # ... in the RL stage before any model loads (it loaded the policy and the reference first).
    from r1jax.models import hf as hf_module

    config = sh.load_config("rl")
    config.model.path, config.data.prompt_buckets = os.path.join(toy[0], "toy_base"), (8,)
    loads = []
    real_load = hf_module.load
    monkeypatch.setattr(hf_module, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    with pytest.raises(common.ConfigError, match=r"4000 of 4000 training prompts are longer"):
        rl_stage.run(config, str(tmp_path / "rl"))
    # SFT examples none of which fits seq_len: refused before the model loads too.
    config = sh.load_config("sft")
    config.sft.seq_len = 4
    with pytest.raises(common.ConfigError, match=r"sft.seq_len=4: no SFT example fits"):
        sft_stage.run(config, str(tmp_path / "sft"))
    assert loads == []
    monkeypatch.undo()
    # Examples left out (here: a prompt that fills seq_len by itself) are warned of, as cut ones.
    pairs = [("a b c d e f g h", "i", ""), ("a", "b", "")]
    with caplog.at_level(logging.WARNING, logger="r1jax"):
        rows = sft_stage.tokenized_pairs(config, "sft", tokenizer, pairs)
    assert rows.num_skipped == 1
    assert "1 of 2 examples are left out, longer than sft.seq_len=4" in caplog.text
    config.sft.overflow = "cut"
    with pytest.raises(common.ConfigError, match=r"sft.overflow must be 'truncate' or 'skip'"):
        sft_stage.validate(config)


def test_non_reasoning_turns_with_an_answer_column_keep_the_whole_conversation(tmp_path):
    """A row whose prompt is a message history and whose answer is a column kept only the first
    question: the answer to the last turn was trained as the answer to the first."""
    from r1jax.stages import rejection_sampling

    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
             {"role": "user", "content": "Bye?"}]  # fmt: skip
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": turns, "completion": "Bye!"}) + "\n")
    r = types.SimpleNamespace(non_reasoning_source=str(path))
    [row] = rejection_sampling._non_reasoning_rows(r)
    assert row["messages"] == [*turns, {"role": "assistant", "content": "Bye!"}]
    # Turns that already end with the answer, and the answer column: one answer turn, not two.
    answered = [*turns, {"role": "assistant", "content": "Bye!"}]
    path.write_text(json.dumps({"messages": answered, "completion": "Bye!"}) + "\n")
    assert rejection_sampling._non_reasoning_rows(r)[0]["messages"] == answered
    # An answer of white space was accepted here, and SFT refused the file after all the sampling.
    for row in (
        {"prompt": "Hi", "completion": "   "},
        {"messages": [*turns, {**answered[-1], "content": ""}]},
    ):
        path.write_text(json.dumps(row) + "\n")
        with pytest.raises(common.ConfigError, match="neither a completion nor a final assistant"):
            rejection_sampling._non_reasoning_rows(r)
    # A malformed line: fixed or removed (on_bad_json='skip' was suggested, which it cannot take).
    path.write_text('{"prompt": "Hi", "completion": "Hello"\n')
    with pytest.raises(common.ConfigError, match=r"chat\.jsonl:1: malformed JSON .*that line\)?$"):
        rejection_sampling._non_reasoning_rows(r)


def test_pretrain_arch_the_run_cannot_build_or_export_is_refused_up_front():
    """`pretrain.arch` was checked without the fields the run adds: qkv_bias crashed the run at
    its start, a sliding window only at the export after the whole pretraining; an odd head_dim
    and a vocabulary smaller than the byte tokens ended in tracebacks."""
    from r1jax.stages import pretrain

    for extra, message in (
        ({"qkv_bias": False}, r"pretrain.arch: sets \['qkv_bias'\] itself"),
        ({"sliding_window": 64}, r"pretrain.arch: .* cannot express sliding_window"),
    ):
        config = sh.load_config("pretrain")
        with config.pretrain.arch.unlocked():
            config.pretrain.arch.update(extra)
        with pytest.raises(common.ConfigError, match=message):
            pretrain.validate(config)
    # An odd head_dim (transformers' own check: a traceback) and a vocabulary smaller than the
    # byte tokens (refused by the tokenizer trainer after the corpus was built).
    config = sh.load_config("pretrain")
    config.pretrain.arch.head_dim = 15
    with pytest.raises(common.ConfigError, match=r"pretrain.arch: .*head_dim"):
        pretrain.validate(config)
    config = sh.load_config("pretrain")
    config.pretrain.vocab_size = 10
    with pytest.raises(common.ConfigError, match=r"pretrain.vocab_size must be >= 259"):
        pretrain.validate(config)
    # Accepted and ignored before: a model.path (the run trained the toy from scratch), an
    # empty task list (the corpus took every task) and an infinite mix weight (a traceback
    # after the tokenizer was trained).
    for field, value, message in (
        ("model.path", "/ckpt/Qwen2.5-0.5B", "model.path, model.router_bias_rate and"),
        ("model.capacity_factor", 1.25, "use --stage=sft"),
        ("pretrain.tasks", (), "pretrain.tasks must name at least one built-in task"),
        ("pretrain.mix.terse", float("inf"), "pretrain.mix must give finite non-negative"),
    ):
        config = sh.load_config("pretrain")
        sh.set_fields(config, {field: value})
        with pytest.raises(common.ConfigError, match=message):
            pretrain.validate(config)
    pretrain.validate(sh.load_config("pretrain"))
    # The cached toy base's recipe is what shapes the model: logging, checkpointing, the mesh
    # or a DeepSeek-only option rebuilt every user's base (a new field anywhere did).
    same = sh.load_config("pretrain")
    sh.set_fields(same, {"log.progress": False, "ckpt.keep": 3, "mesh.fsdp": 2})
    with same.unlocked():
        same.log.new_option = 1
    assert common.toy_recipe(same) == common.toy_recipe()
    for field, value in (("seed", 1), ("pretrain.steps", 7), ("optim.weight_decay", 0.5)):
        other = sh.load_config("pretrain")
        sh.set_fields(other, {field: value})
        assert common.toy_recipe(other) != common.toy_recipe(), field


def test_a_config_file_is_checked_against_its_stages_fields():
    """A --config file is a whole config: a misspelt field was a new one (silently unused), a
    section rebuilt with a float where an int belongs passed validation and failed mid-run."""
    import ml_collections

    config = sh.load_config("eval")
    with config.unlocked():
        config.data.sorce = "/x.jsonl"
    with pytest.raises(
        common.ConfigError, match=r"unknown field data.sorce \(did you mean data.source\?\)"
    ):
        common.validate(config, "eval")
    config = sh.load_config("rl")
    config.rl = ml_collections.ConfigDict({**config.rl.to_dict(), "prompts_per_step": 2.0})
    with pytest.raises(
        common.ConfigError, match=r"rl.prompts_per_step = 2.0 is a float, not a int"
    ):
        common.validate(config, "rl")
    del config.rl["prompts_per_step"]
    with pytest.raises(common.ConfigError, match=r"missing field rl.prompts_per_step"):
        common.validate(config, "rl")
    common.validate(sh.load_config("rl"), "rl")
    # What the stages take though configs/<stage>.py spells it otherwise: None for off, a
    # subset of the document kinds, SandboxConfig's optional fields.
    config = sh.load_config("rl")
    config.ckpt.best_metric = None
    with config.unlocked():
        config.sandbox.cpu_time_s = 4
    common.validate(config, "rl")
    config = sh.load_config("pretrain")
    config.pretrain.mix = ml_collections.ConfigDict({"steps": 1.0})
    common.check_fields(config, "pretrain")


def test_one_workdir_runs_one_stage_at_a_time(tmp_path, monkeypatch, caplog):
    """The same command started again while the first still ran (its ssh session gone) resumed
    the first one's checkpoint, and orbax deleted the first run's checkpoint in flight."""
    ran = []
    monkeypatch.setattr(
        common, "stage_module", lambda stage: types.SimpleNamespace(run=lambda c, w: ran.append(w))
    )
    config = sh.load_config("eval")
    held = common.lock_workdir(str(tmp_path))
    with pytest.raises(
        common.ConfigError, match=rf"in use by another r1jax run \(pid {os.getpid()} on"
    ):
        common.run_stage("eval", config, str(tmp_path))
    held.close()
    common.run_stage("eval", config, str(tmp_path))
    common.run_stage("eval", config, str(tmp_path))  # (released when each run ends)
    assert ran == [str(tmp_path)] * 2
    # A file system without locks (NFS without its lock daemon, Lustre mounted noflock) is no
    # other run: the run goes on, warned (every run there was refused as "in use").
    import errno
    import fcntl

    def no_locks(f, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level("WARNING", logger="r1jax"):
        common.run_stage("eval", config, str(tmp_path))
    assert ran == [str(tmp_path)] * 3
    assert "its file system takes no locks" in caplog.text


def test_a_failed_run_keeps_the_config_of_what_the_workdir_holds(tmp_path, monkeypatch):
    """A failure before a checkpointing stage saved anything leaves the workdir's config; so
    does one before evaluation or rejection sampling wrote its outputs, which they write once at
    the end (a failed rerun left the new config beside the old run's samples, which an SFT then
    trained on). And the pipeline's refusal names flags that give a stage its old value."""
    written = []

    class Failing:
        @staticmethod
        def run(config, workdir):
            written.append(config.seed)
            if config.get("write_output"):  # fails after writing its output
                common.write_json(os.path.join(workdir, common.FINAL_OUTPUT[stage]), {})
            raise RuntimeError("stopped")

    monkeypatch.setattr(common, "stage_module", lambda stage: Failing)
    for stage, write, kept in (
        ("sft", False, 0),
        ("eval", False, 0),
        ("rejection_sampling", False, 0),
        ("rejection_sampling", True, 5),
    ):
        workdir = tmp_path / stage
        config = sh.load_config(stage)
        common.write_json(str(workdir / f"config_{stage}.json"), {"seed": 0})
        if stage in common.FINAL_OUTPUT:
            common.write_json(str(workdir / common.FINAL_OUTPUT[stage]), {"seed": 0})
            os.utime(workdir / common.FINAL_OUTPUT[stage], ns=(0, 0))  # (an earlier run's)
        config.seed = 5
        with config.unlocked():
            config.write_output = write
        with pytest.raises(RuntimeError, match="stopped"):
            common.run_stage(stage, config, str(workdir))
        assert json.loads((workdir / f"config_{stage}.json").read_text())["seed"] == kept, stage
    assert pipeline._keep_flag("base", "seed", 0) == "--config.seed=0"
    assert pipeline._keep_flag("cold_start", "optim.schedule", "constant") == (
        "--config.cold_start.optim.schedule='constant'"
    )
    assert pipeline._keep_flag("r1_sft", "sft.source", "/x.jsonl") is None  # (wired)


def test_pipeline_evaluation_stands_for_its_checkpoint_and_settings(tmp_path, monkeypatch):
    """A rerun reused any eval.json it found: after a stage was retrained (its folder deleted, as
    the refusal to skip it asks) or with other evaluation settings, the report showed the old
    checkpoint's scores."""
    from r1jax.stages import eval as eval_stage

    def fake_eval(sub, subdir):
        out = {"pass@1": len(calls), "num_samples": sub.eval.num_samples}
        calls.append(out)
        common.write_json(os.path.join(subdir, "eval.json"), out)
        return out

    calls = []
    monkeypatch.setattr(eval_stage, "run", fake_eval)
    config = sh.load_config("pipeline:smoke")
    model = tmp_path / "r1" / "hf" / "final"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"weights")
    now = os.path.getmtime(model / "model.safetensors")
    os.utime(model / "model.safetensors", (now - 1000, now - 1000))
    subdir = str(tmp_path / "eval" / "r1")

    def evaluate():
        return pipeline._evaluate(config, str(model), subdir)["pass@1"]

    assert (evaluate(), evaluate(), len(calls)) == (0, 0, 1)  # made, then reused
    config.log.progress = not config.log.progress  # (changes no result)
    assert evaluate() == 0
    os.utime(model / "model.safetensors", (now - 500, now - 500))  # the stage trained again
    assert evaluate() == 1
    config.eval_stage.eval.num_samples += 1
    assert evaluate() == 2 and calls[-1]["num_samples"] == config.eval_stage.eval.num_samples
    # An evaluation from before the stamps: reused unless the checkpoint is newer than it.
    os.remove(os.path.join(subdir, "eval_stamp.json"))
    assert evaluate() == 2
    os.utime(os.path.join(subdir, "eval.json"), (now - 800, now - 800))
    assert evaluate() == 3
    # A full disk (or a kill) between eval.json and its stamp left an unstamped evaluation, which
    # the rule above then reused under any settings, for good.
    real_write = common.write_json

    def full_disk(path, obj):
        if path.endswith("eval_stamp.json"):
            raise OSError(28, "No space left on device")
        return real_write(path, obj)

    config.eval_stage.eval.num_samples += 1
    monkeypatch.setattr(common, "write_json", full_disk)
    with pytest.raises(OSError, match="No space"):
        evaluate()
    monkeypatch.setattr(common, "write_json", real_write)
    config.eval_stage.eval.num_samples += 1
    assert evaluate() == len(calls) - 1
    assert calls[-1]["num_samples"] == config.eval_stage.eval.num_samples


def test_answers_the_grader_scores_differently_never_vote_together():
    """`same` is not transitive ("0.5" ~ "50%" ~ "50"; Countdown's value-and-numbers key ignores
    a wrong right-hand side and forbidden operators): a group led by a wrong answer took the
    cons@k credit of the right answers that joined it."""
    from r1jax.stages.eval import same_answer

    math = same_answer("math", None)
    # gold "50" (a percentage question): "0.5" is wrong, "50%" right, and they are `same`
    assert score_prompt(["0.5", "50%", "50%", "7"], [False, True, True, False], math)["cons@4"] == 1
    countdown = same_answer("countdown", None)
    votes = ["3+4 = 8", "4+3", "3+4", "5+3"]
    assert score_prompt(votes, [False, True, True, False], countdown)["cons@4"] == 1.0
    # a trailing period, which the verifier accepts, votes with the same expression without one
    assert majority_vote(["3+4.", "4+3.", "3+4", "5+3-1", "5+3-1"], countdown) == 0


def test_a_bnpo_run_records_its_micro_batch_count(toy, tmp_path, monkeypatch):
    """bnpo's token mean is each micro-batch's, so the count is part of its objective: a resume
    with another rl.num_micro_batches trained another objective under the same run."""
    from r1jax.stages import rl

    recorded = []

    def capture(ckpt, data_order, **kwargs):
        recorded.append(data_order)
        raise KeyboardInterrupt  # (stop before any training)

    monkeypatch.setattr(rl.common, "check_resume", capture)
    for loss_type, k in (("bnpo", 1), ("bnpo", 2), ("grpo", 2)):
        config = sh.set_fields(sh.rl_config(), {"rl.loss_type": loss_type})
        config.rl.num_micro_batches = k
        config.rl.prompts_per_step *= 2  # 16 rows: 1 or 2 micro-batches over 8 batch shards
        with pytest.raises(KeyboardInterrupt):
            rl.run(config, str(tmp_path / f"{loss_type}{k}"))
    assert [r.get("rl.num_micro_batches") for r in recorded] == [1, 2, None]


def test_a_run_that_saved_nothing_keeps_the_config_past_a_killed_saves_leftover(
    toy, tmp_path, monkeypatch
):
    """A run stopped before it saves leaves config_<stage>.json as it was; orbax deleting the
    uncommitted folder a killed save left (at the checkpointer's start) counted as a save, so the
    file then named settings no checkpoint was made with."""
    from r1jax.stages import rl

    workdir = tmp_path / "rl"
    leftover = workdir / "checkpoints" / "3.orbax-checkpoint-tmp-1234"

    def stop(ckpt, data_order, **kwargs):
        for _ in range(600):  # (orbax's clean-up runs in the background; a real run goes on)
            if not leftover.exists():
                break
            time.sleep(0.05)
        raise KeyboardInterrupt  # (after the checkpointer started, before any training)

    monkeypatch.setattr(rl.common, "check_resume", stop)
    leftover.mkdir(parents=True)
    (workdir / "config_rl.json").write_text('{"the run": "whose outputs are here"}')
    with pytest.raises(KeyboardInterrupt):
        common.run_stage("rl", sh.rl_config(), str(workdir))
    assert os.listdir(workdir / "checkpoints") == []  # (orbax's clean-up ran)
    assert (workdir / "config_rl.json").read_text() == '{"the run": "whose outputs are here"}'


def test_sft_step_count_and_a_short_runs_warm_up():
    """100 rows x 2.2 epochs / 20 per step took 12 steps (11.000000000000002 rounded up); a run
    from data shorter than the warm-up never reached the learning rate with the constant
    schedule (only the cosine's warm-up was shortened)."""
    from r1jax.stages import sft as sft_stage

    assert sft_stage.run_steps(100, 2.2, 20) == 11 and sft_stage.run_steps(100, 2.21, 20) == 12
    config = sh.load_config("sft")
    config.optim.schedule, config.optim.warmup_steps = "constant", 10
    optim = common.optim(config, run_steps=5, from_data=True)
    assert optim.warmup_steps == 0


def test_the_same_data_file_in_another_folder_gives_the_same_prompt_columns(toy, tmp_path):
    """A row's file:line names it in errors; as a column it went into the RL resume's data
    fingerprint, so the same file moved (or named relative vs absolute) refused to resume, as did
    every checkpoint saved before the rows carried it."""
    from r1jax.models import hf

    tokenizer = hf.tokenizer(os.path.join(toy[0], "toy_base"))
    config = sh.load_config("rl")
    config.data.num_eval = 4
    rows = [{"prompt": f"What is {i} + {i}?", "solution": str(2 * i)} for i in range(20)]
    columns = []
    for folder in ("a", "b"):
        path = tmp_path / folder / "rows.jsonl"
        path.parent.mkdir()
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        config.data.source = str(path)
        read = common.load_prompt_rows(config.data, "train", 0)
        assert read[0]["where"].endswith(f"{folder}/rows.jsonl:{read[0]['where'].split(':')[-1]}")
        columns.append(common.PromptSet(read, tokenizer, config.data, seed=0).columns)
    assert columns[0] == columns[1] and "where" not in columns[0]
