"""Stage: pretrain the toy base model from scratch.

The real recipe starts from a pretrained base model (DeepSeek-V3-Base, Qwen2.5, Llama 3); offline we
make one, so every later stage runs through exactly the code a real run uses:

  1. generate a corpus of synthetic problems, solved tersely and step by step, with no <think> or
     <answer> tag (instruction-following documents name other tags; `r1_tag_rate` > 0 puts the R1
     tags in a share of them, a prior for bases without the copy warm-up: r1jax/data/corpus.py);
  2. train a byte-level BPE tokenizer on it and save it as a Hugging Face tokenizer folder;
  3. pack the documents, EOS-separated, into rows of `seq_len` tokens;
  4. train a small Qwen2-architecture decoder on next-token prediction, after a
     copy-task warm-up (`copy_warmup_steps`: strings of word tokens, each followed by itself, at
     its own, lower learning rate), which is how a model this small learns to copy from its
     context (induction heads) at all;
  5. check, every `tag_copy_every` steps, that it copies tag names an instruction named
     (`tag_copy_probability`): the R1-Zero template relies on it, and some initialisations never
     learn it; one none of whose checks shows a start by the end of the warm-up
     (`tag_copy_deadline`) is abandoned and pretraining starts over from a new one
     (`tag_copy_restarts`, workdir/restart<k>);
  6. save it as a genuine HF checkpoint folder (config.json + safetensors + tokenizer).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from r1jax import checkpoint, grpo, metrics, paths, sft, sharding, train
from r1jax.data import corpus
from r1jax.data import tokenizer as toy_tokenizer
from r1jax.models.transformer import Decoder, ModelConfig
from r1jax.stages import common

log = logging.getLogger("r1jax")


def model_config(config, vocab_size: int) -> ModelConfig:
    """The toy base's shape: a Qwen2 decoder (q/k/v biases) of `pretrain.arch`; a key of
    `arch` that this sets itself is an error (a TypeError naming it)."""
    arch = config.pretrain.arch.to_dict()
    fixed = {"model_type", "qkv_bias", "param_dtype", "dtype", "remat", "vocab_size"}
    if fixed & set(arch):
        raise TypeError(f"sets {sorted(fixed & set(arch))} itself (model.* for the dtypes)")
    return ModelConfig(
        vocab_size=vocab_size,
        param_dtype=config.model.param_dtype,
        dtype=config.model.dtype,
        remat=config.model.remat,
        model_type="qwen2",
        qkv_bias=True,
        **arch,
    )


def validate(config) -> None:
    p = config.pretrain
    if min(p.corpus_docs, p.seq_len, p.batch_size, p.steps) < 1:
        raise common.ConfigError("pretrain.corpus_docs, seq_len, batch_size and steps must be >= 1")
    ways = common.batch_ways(config, jax.device_count())
    if p.batch_size % ways:
        raise common.ConfigError(
            f"pretrain.batch_size={p.batch_size} must be a multiple of the "
            f"mesh's {ways} batch shards (mesh.data * mesh.fsdp * mesh.expert)"
        )
    common.micro_batches(config, "pretrain", p.batch_size)
    m = config.model
    if m.path or m.get("router_bias_rate", 0.0) or m.get("capacity_factor", 0.0):
        raise common.ConfigError(
            "pretraining trains the toy base from scratch (pretrain.arch); model.path, "
            "model.router_bias_rate and model.capacity_factor do not apply (to train from a "
            f"checkpoint, use --stage=sft), got {m.path!r}, {m.get('router_bias_rate')}, "
            f"{m.get('capacity_factor')}"
        )
    if not p.tasks:  # (the corpus would fall back to every built-in task)
        raise common.ConfigError("pretrain.tasks must name at least one built-in task")
    common.builtin_tasks(p, "pretrain")
    mix = p.mix.to_dict()
    if (
        set(mix) - set(corpus.DOC_KINDS)
        or not all(
            isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
            for w in mix.values()
        )
        or not any(mix.values())
    ):
        raise common.ConfigError(
            f"pretrain.mix must give finite non-negative weights to {corpus.DOC_KINDS} with a "
            f"positive sum, got {mix}"
        )
    if not 0.0 <= p.r1_tag_rate <= 1.0:
        raise common.ConfigError(f"pretrain.r1_tag_rate must be in [0, 1], got {p.r1_tag_rate}")
    if p.tag_names not in corpus.TAG_NAMES:
        raise common.ConfigError(
            f"pretrain.tag_names must be one of {corpus.TAG_NAMES}, got {p.tag_names!r}"
        )
    if p.copy_warmup_steps < 0:
        raise common.ConfigError(
            f"pretrain.copy_warmup_steps must be >= 0, got {p.copy_warmup_steps}"
        )
    if p.copy_warmup_steps and not p.copy_warmup_lr > 0:
        raise common.ConfigError(f"pretrain.copy_warmup_lr must be > 0, got {p.copy_warmup_lr}")
    if p.copy_task not in COPY_TASKS:
        raise common.ConfigError(
            f"pretrain.copy_task must be one of {COPY_TASKS}, got {p.copy_task!r}"
        )
    if not 0 <= p.copy_rows_in_corpus < p.batch_size:
        raise common.ConfigError(
            f"pretrain.copy_rows_in_corpus must be in [0, pretrain.batch_size={p.batch_size}), "
            f"got {p.copy_rows_in_corpus}"
        )
    if p.tag_copy_every < 0:
        raise common.ConfigError(f"pretrain.tag_copy_every must be >= 0, got {p.tag_copy_every}")
    for field in ("copy_warmup_steps", "copy_rows_in_corpus"):
        if p[field] and p.seq_len < 2 * COPY_MIN + 1:
            raise common.ConfigError(
                f"pretrain.{field} needs pretrain.seq_len >= {2 * COPY_MIN + 1} (a copy string "
                f"of at least {COPY_MIN} tokens and its repetition), got {p.seq_len}"
            )
    from r1jax.data.tokenizer import SPECIAL_TOKENS

    if p.vocab_size < 256 + len(SPECIAL_TOKENS):  # (checked by the trainer after the corpus)
        raise common.ConfigError(
            f"pretrain.vocab_size must be >= {256 + len(SPECIAL_TOKENS)} (the 256 byte tokens "
            f"and the special tokens), got {p.vocab_size}"
        )
    try:  # the model the run builds, and that it can be exported as a Qwen2 checkpoint
        from r1jax.models import hf

        hf.config_to_hf(model_config(config, p.vocab_size))
    except Exception as e:  # (transformers' own config checks raise their own kinds too)
        raise common.ConfigError(f"pretrain.arch: {' '.join(str(e).split())}") from e
    common.optim(config, p.steps)
    if p.tag_copy_restarts < 0:
        raise common.ConfigError(
            f"pretrain.tag_copy_restarts must be >= 0, got {p.tag_copy_restarts}"
        )
    if p.tag_copy_restarts and not 0 <= p.tag_copy_deadline < p.steps:
        raise common.ConfigError(
            f"pretrain.tag_copy_deadline must be in [0, pretrain.steps={p.steps}) for restarts "
            f"(or pretrain.tag_copy_restarts=0), got {p.tag_copy_deadline}"
        )
    if p.tag_copy_restarts and p.tag_copy_deadline == 0 and not p.copy_warmup_steps:
        raise common.ConfigError(
            "pretrain.tag_copy_deadline=0 checks at the end of the copy warm-up, and "
            "pretrain.copy_warmup_steps=0 has none: set a deadline >= 1 (corpus steps)"
        )


COPY_MIN, COPY_MAX = 16, 48  # tokens per copy-task string
RECALL_MIN, RECALL_MAX = 8, 24  # tokens per associative-recall string
COPY_TASKS = ("repeat", "recall", "mixed")
TAG_COPY_DOCS = 64  # held-out format documents of the tag-copy check (300 repeated tag names)
TAG_COPY_WARNING = 0.3  # below this the base does not follow the R1-Zero template's tags
# The restart decision compares the best check up to the deadline with this. In the default
# architecture's copy warm-up (checks every 100 steps), every base that went on to copy tag names
# reached 0.10-0.36 at some check, and every one that never did stayed at <= 0.005 (0.009 at the
# end). The best, not the last check: a copying base's checks swing (0.31, 0.07, 0.32; and one
# seed-2 student's 0.34, 0.18, then 0.050 at the warm-up's end, which copied 0.87 later).
TAG_COPY_START = 0.05


def copy_alphabet(tokenizer) -> np.ndarray:
    """Token ids of whole-word pieces (letters only, >= 2 of them, with or without a leading
    space) and of printable punctuation pieces (" <", " </", ">", ...): what a prompt names a tag
    with and writes around it. Copying is learned per token (a copy head matches the token before
    the one it copies), so the warm-up strings are drawn from these rather than from the whole
    vocabulary (bytes, digits), which takes the model far longer to start copying. (Lone bytes
    of a character decode to U+FFFD, which counts as punctuation here: the toy base was trained
    with them in the alphabet, so they stay, as its recipe.)
    """
    special = set(tokenizer.all_special_ids)
    ids = []
    for i in range(len(tokenizer)):
        text = tokenizer.decode([i])
        word = text.removeprefix(" ")
        punct = text.strip() and text.isprintable() and not any(c.isalnum() for c in text)
        if i not in special and ((word.isalpha() and len(word) >= 2) or punct):
            ids.append(i)
    return np.asarray(ids, np.int32)


def copy_rows(alphabet: np.ndarray, step: int, shape: tuple[int, int], seed: int):
    """One copy-task batch: ([N, L] ids, [N, L] loss mask over the predictable tokens).

    Each row is strings of COPY_MIN..COPY_MAX tokens (at most half the row) drawn uniformly from
    `alphabet`, each followed at once by itself, with random filler between; the loss covers the
    repetitions (from their second token: the first is not predictable), so the loss falls from
    ln(len(alphabet)) towards 0 only once the model copies by content. Seeded by (seed, step),
    so a resumed run sees the same batches.
    """
    rng = np.random.default_rng([seed, step, 1])
    n, length = shape
    longest = min(COPY_MAX, (length - 1) // 2)
    ids = rng.choice(alphabet, size=shape).astype(np.int32)
    mask = np.zeros(shape, np.int32)
    for r in range(n):
        pos = int(rng.integers(0, 1 + min(8, length - 1 - 2 * longest)))
        while (k := int(rng.integers(COPY_MIN, longest + 1))) and pos + 2 * k <= length:
            ids[r, pos + k : pos + 2 * k] = ids[r, pos : pos + k]
            mask[r, pos + k + 1 : pos + 2 * k] = 1
            pos += 2 * k + int(rng.integers(1, 8))
    return ids, mask


def recall_rows(alphabet: np.ndarray, step: int, shape: tuple[int, int], seed: int):
    """One associative-recall batch: ([N, L] ids, [N, L] loss mask on the recalled tokens).

    Each row is strings of RECALL_MIN..RECALL_MAX distinct tokens from `alphabet`, each followed by
    2-5 queries: a token of the string, then the token that followed it there (scored), with random
    filler between strings. Unlike a repeated string, whose later tokens a model can copy from a
    fixed offset, every recalled token needs a match by content, as a tag name after "<" does.
    Seeded by (seed, step).
    """
    rng = np.random.default_rng([seed, step, 2])
    n, length = shape
    ids = rng.choice(alphabet, size=shape).astype(np.int32)
    mask = np.zeros(shape, np.int32)
    for r in range(n):
        pos = int(rng.integers(0, 8))
        while True:
            k, q = int(rng.integers(RECALL_MIN, RECALL_MAX + 1)), int(rng.integers(2, 6))
            if pos + k + 2 * q > length:
                break
            string = rng.choice(alphabet, size=k, replace=False)
            ids[r, pos : pos + k] = string
            pos += k
            for j in rng.integers(0, k - 1, size=q):
                ids[r, pos : pos + 2] = string[j : j + 2]
                mask[r, pos + 1] = 1
                pos += 2
            pos += int(rng.integers(1, 8))
    return ids, mask


def warm_up_rows(task: str, alphabet: np.ndarray, step: int, shape: tuple[int, int], seed: int):
    """A copy-task batch of `pretrain.copy_task`: "repeat" (`copy_rows`), "recall"
    (`recall_rows`) or "mixed" (the first half of the rows recall, the rest repeat)."""
    if task == "repeat":
        return copy_rows(alphabet, step, shape, seed)
    if task == "recall":
        return recall_rows(alphabet, step, shape, seed)
    half = shape[0] // 2
    a, b = (
        recall_rows(alphabet, step, (half, shape[1]), seed),
        copy_rows(alphabet, step, (shape[0] - half, shape[1]), seed),
    )
    return np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]])


def tag_copy_rows(tokenizer, seq_len: int, num_docs: int, seed: int, tag_names: str):
    """Held-out format documents for `tag_copy_probability`: ([N, L] ids, [N, L] mask).

    The mask is 1 on each tag name's first token after "<" where that tag was already named earlier
    in the document (by the instruction or an earlier reply), i.e. where copying predicts it.
    """
    docs = corpus.pretrain_corpus(
        num_docs,
        seed=-1 - seed,  # documents no training run with a non-negative seed saw
        tasks=(corpus.default_tasks()[0],),
        mix={"format": 1.0},
        tag_names=tag_names,
    )
    opens = {i for i in range(len(tokenizer)) if tokenizer.decode([i]).endswith("<")}
    ids = np.full((num_docs, seq_len), tokenizer.eos_token_id, np.int32)
    mask = np.zeros((num_docs, seq_len), np.int32)
    for r, doc in enumerate(tokenizer(docs, add_special_tokens=False)["input_ids"]):
        doc = doc[:seq_len]
        ids[r, : len(doc)] = doc
        named = set()
        for t in range(1, len(doc)):
            if doc[t - 1] in opens:  # a closing tag's "/" is part of the " </" token
                mask[r, t] = doc[t] in named
                named.add(doc[t])
    return ids, mask


@nnx.jit
def _masked_token_prob(model, ids, mask):
    """[N, L] ids, mask -> (sum, count) over the masked positions of each token's probability."""
    hidden, _ = train.hidden_states(model, ids[:, :-1])
    logp, _ = grpo.chunked_token_logprobs(hidden, model.unembedding(), ids[:, 1:])
    m = mask[:, 1:] > 0
    return jnp.where(m, jnp.exp(logp), 0.0).sum(), m.sum()


def tag_copy_probability(state: train.TrainState, ids, mask) -> float:
    """Mean probability the model gives a repeated tag name's first token (`tag_copy_rows`).

    Whether the base copies tag names from an instruction: the R1-Zero template names <think> and
    <answer> only in its instruction, and a base that does not copy them never writes the format
    (the pipeline's bases of seeds 0 and 1: 0.73 and 0.65; seed 2's first, never writing it: 0.01).
    Reduced on the devices: the rows are sharded over the batch, across processes on a multi-host
    mesh, and only the two scalars come back.
    """
    with state.mesh_context():  # host arrays, or already placed (then device_put is a no-op)
        ids = jax.device_put(ids, state.batch_sharding(ids))
        mask = jax.device_put(mask, state.batch_sharding(mask))
        total, count = jax.device_get(_masked_token_prob(state.model, ids, mask))
    return float(total / count) if count else float("nan")


def token_rows(docs: list[str], tokenizer, seq_len: int) -> np.ndarray:
    """Documents -> [N, seq_len] int32 rows of one EOS-separated token stream."""
    eos = tokenizer.eos_token_id
    stream = []
    for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(eos)
    n = len(stream) // seq_len
    return np.asarray(stream[: n * seq_len], np.int32).reshape(n, seq_len)


RESTART_FILE = "restart.json"  # in a restart's directory: its seed and the abandoned run's check


def attempt_seed(seed: int, attempt: int) -> int:
    """Initialisation (and copy-task) seed of pretraining attempt `attempt`; 0 is `seed` itself."""
    if attempt == 0:
        return seed
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, attempt]).generate_state(1)[0] >> 1)


def attempt_dir(workdir: str, attempt: int) -> str:
    """Where attempt `attempt` keeps its checkpoints and metrics: the workdir for the first, then
    workdir/restart<k>, so an abandoned run stays as it was."""
    return workdir if attempt == 0 else os.path.join(workdir, f"restart{attempt}")


def current_attempt(workdir: str, restarts: int) -> int:
    """The attempt a (resumed) run continues: the last restart begun, at most `restarts`."""
    attempt = 0
    while attempt < restarts and paths.exists(
        os.path.join(attempt_dir(workdir, attempt + 1), RESTART_FILE)
    ):
        attempt += 1
    return attempt


def _best_check(best: float | None, value: float) -> float | None:
    """The best tag-copy check so far, given a new one; a NaN check (a diverged model) is none."""
    if np.isnan(value):
        return best
    return value if best is None else max(best, value)


def _train(config, workdir, attempt, tokenizer, rows, cfg, mesh, tag_rows):
    """Train attempt `attempt` from its seed, resuming from its own checkpoints: the copy-task
    warm-up, then the corpus. Returns (state, last metrics row), or (None, {"tag_copy",
    "best_tag_copy", "step"}) when it is abandoned at the tag-copy deadline (every attempt but the
    last has one): none of its tag-copy checks so far reached TAG_COPY_START."""
    p = config.pretrain
    run_dir = attempt_dir(workdir, attempt)
    seed = attempt_seed(config.seed, attempt)
    warm = p.copy_warmup_steps
    deadline = warm + p.tag_copy_deadline if attempt < p.tag_copy_restarts else None
    model = sharding.create_sharded(lambda: Decoder(cfg, rngs=nnx.Rngs(seed)), mesh)
    # Two optimizer phases: the copy task at a constant, lower learning rate (at the corpus's
    # 3e-3 the copying never starts), then the corpus with a fresh AdamW on optim.* over
    # pretrain.steps, as without a warm-up.
    corpus_optim = common.optim(config, p.steps)
    warm_optim = dataclasses.replace(
        corpus_optim,
        learning_rate=p.copy_warmup_lr,
        schedule="constant",
        warmup_steps=min(corpus_optim.warmup_steps, warm // 2),
    )
    step_cfg = sft.SFTConfig(
        num_micro_batches=common.micro_batches(config, "pretrain", p.batch_size)
    )
    ckpt = checkpoint.Checkpointer(
        os.path.join(run_dir, "checkpoints"),
        save_interval_steps=config.ckpt.every,
        max_to_keep=config.ckpt.keep,
        async_save=config.ckpt.async_save,
    )
    # What fixes the data of each step (the corpus as tokenised, the seeds, the rows per step and
    # the copy task's share): a resume with others is refused (`common.check_resume`).
    run = {
        "seed": seed,
        "batch_size": p.batch_size,
        "copy_warmup_steps": warm,
        "copy_task": p.copy_task,
        "copy_rows_in_corpus": p.copy_rows_in_corpus,
        "data": common.fingerprint(rows),
        **common.optimizer_layout(config),
    }
    common.check_resume(
        ckpt, run, total_steps=warm + p.steps, steps_field=f"pretrain.steps={p.steps}"
    )
    # A checkpoint at step <= warm holds the warm-up's optimizer (the corpus phase starts fresh).
    start = ckpt.latest_step() or 0
    in_warm_up = warm > 0 and start <= warm
    state = train.TrainState.create(model, warm_optim if in_warm_up else corpus_optim, mesh)
    best = None  # the best tag-copy check up to the deadline; kept in the checkpoints
    watch = train.SkipWatch(config.optim.max_skipped_steps)
    if ckpt.latest_step() is not None:
        extra = ckpt.restore(state.model, state.optimizer)
        start, best = extra["step"], extra.get("tag_copy_best")
        watch.resume(extra.get("skips"))
        log.info("resumed from step %d", start)
        common.warn_if_schedule_changed(config, extra.get("schedule"), p.steps)  # (the corpus')
    if attempt:
        log.info("restart %d: initialisation and copy-task seed %d", attempt, seed)
    # One segment per row (documents in a row may attend to earlier ones, as in GPT pretraining).
    shape = (p.batch_size, p.seq_len)
    fixed = {
        "loss_mask": np.ones(shape, np.int32),
        "segment_ids": np.ones(shape, np.int32),
        "attention_mask": np.ones(shape, np.int32),
        "positions": np.broadcast_to(np.arange(p.seq_len, dtype=np.int32), shape),
    }
    kept_copy_rows = p.copy_rows_in_corpus
    corpus_rows = p.batch_size - kept_copy_rows
    alphabet = copy_alphabet(tokenizer) if warm or kept_copy_rows else None
    tag_ids, tag_mask = tag_rows
    tag_ids = jax.device_put(tag_ids, state.batch_sharding(tag_ids))  # once, not at every check
    tag_mask = jax.device_put(tag_mask, state.batch_sharding(tag_mask))
    if warm:
        log.info(
            "copy-task warm-up: %d steps over %d word and punctuation tokens (not copying, "
            "the loss stays >= ln %d = %.2f)",
            warm,
            len(alphabet),
            len(alphabet),
            np.log(len(alphabet)),
        )
    writer = metrics.MetricsWriter(
        run_dir,
        total_steps=warm + p.steps,
        start_step=start,
        summary_every=config.log.every,
        desc="pretrain" if not attempt else f"pretrain, restart {attempt}",
        postfix_keys=("loss",),
        progress=config.log.progress,
    )
    row, abandoned = {}, None
    for step in range(start, warm + p.steps):
        # At the top of the loop, so a run resumed from the deadline's checkpoint checks too.
        if step == deadline:
            copied = row.get("tag_copy")
            if copied is None:
                copied = tag_copy_probability(state, tag_ids, tag_mask)
            best = _best_check(best, copied)
            if best is None or best < TAG_COPY_START:  # abandoned, and kept as it is now
                extra = {
                    "step": step,
                    "tag_copy_best": best,
                    "run": run,
                    "skips": watch.record(),
                    "schedule": common.schedule_record(config, p.steps),
                }
                ckpt.save(step, state.model, state.optimizer, extra=extra, force=True)
                best = float("nan") if best is None else best
                abandoned = {"tag_copy": float(copied), "best_tag_copy": best, "step": step}
                break
        if step == warm and warm:
            state = train.TrainState.create(state.model, corpus_optim, mesh)
        if step < warm:  # copy task: the same shapes, so the same compiled step
            ids, loss_mask = warm_up_rows(p.copy_task, alphabet, step, shape, seed)
            batch = {**fixed, "input_ids": ids, "loss_mask": loss_mask}
        else:
            idx = common.batch_indices(len(rows), step - warm, corpus_rows, config.seed)
            batch = {**fixed, "input_ids": rows[idx]}
            if kept_copy_rows:  # the copy task goes on in the last rows of every corpus batch
                ids, mask = warm_up_rows(
                    p.copy_task, alphabet, step, (kept_copy_rows, p.seq_len), seed
                )
                batch["input_ids"] = np.concatenate([batch["input_ids"], ids])
                batch["loss_mask"] = np.concatenate([fixed["loss_mask"][:corpus_rows], mask])
        row = jax.device_get(sft.train_step(state, batch, step_cfg))
        row["copy_loss" if step < warm else "lm_loss"] = row["loss"]
        if p.tag_copy_every and ((step + 1) % p.tag_copy_every == 0 or step + 1 == warm + p.steps):
            row["tag_copy"] = tag_copy_probability(state, tag_ids, tag_mask)
            if deadline is not None and step + 1 <= deadline:
                best = _best_check(best, row["tag_copy"])
        writer.write(step + 1, row)
        # The rate of the update a divergence would come from: the last one applied.
        last = watch.last_applied if watch.last_applied is not None else step + 1
        watch.learning_rate_field = (
            "pretrain.copy_warmup_lr" if last <= warm else "optim.learning_rate"
        )
        watch(step + 1, row)
        if ckpt.save(
            step + 1,
            state.model,
            state.optimizer,
            extra={
                "step": step + 1,
                "tag_copy_best": best,
                "run": run,
                "skips": watch.record(),
                "schedule": common.schedule_record(config, p.steps),
            },
            force=step + 1 == warm + p.steps,
            interval=not watch.skipping,
        ):
            writer.flush()  # a cloud workdir's metrics reach the saved step
    if not abandoned and p.tag_copy_every and "tag_copy" not in row:
        # Resumed from the last step's checkpoint (stopped after saving it, before exporting):
        # the last step's check again, for the warning and the pipeline's gate.
        row["tag_copy"] = tag_copy_probability(state, tag_ids, tag_mask)
    ckpt.wait()
    writer.close()
    ckpt.close()
    return (None, abandoned) if abandoned else (state, row)


def run(config, workdir: str, *, export_to: str | None = None) -> dict:
    """Pretrain; writes the HF checkpoint to workdir/hf/final (and to `export_to` if given)."""
    p = config.pretrain
    os.makedirs(workdir, exist_ok=True)

    # 1-2. Corpus and tokenizer.
    def train_tokenizer(folder):
        return toy_tokenizer.train_toy_tokenizer(
            folder, seed=config.seed, vocab_size=p.vocab_size, tag_names=p.tag_names
        )

    if jax.process_index() == 0:
        tokenizer = train_tokenizer(os.path.join(workdir, "tokenizer"))
    else:  # every process trains the same one; only process 0 keeps its files
        with tempfile.TemporaryDirectory(prefix="r1jax_tokenizer_") as scratch:
            tokenizer = train_tokenizer(scratch)
    special = set(tokenizer.all_special_ids)
    pieces = [tokenizer.decode([i]) for i in range(len(tokenizer)) if i not in special]
    docs = corpus.pretrain_corpus(
        p.corpus_docs,
        seed=config.seed,
        tasks=common.builtin_tasks(p, "pretrain"),
        mix=p.mix.to_dict(),
        copy_pieces=[t for t in pieces if "\ufffd" not in t],  # not lone bytes of a character
        r1_tag_rate=p.r1_tag_rate,
        tag_names=p.tag_names,
    )
    # 3. Packed rows; the loss covers every token that has a predecessor.
    rows = token_rows(docs, tokenizer, p.seq_len)
    # Every process trains its own tokenizer and tokenises the corpus itself: another version of
    # the tokenizers library on one host would give it another vocabulary (a model of another
    # shape) or other rows, mixed into every batch.
    common.check_same_on_every_process(
        "the pretraining corpus as tokenised, or the tokenizer trained for it",
        lambda: [str(len(tokenizer)), common.fingerprint(rows)],
        "install the same versions of the tokenizers and transformers libraries on every host",
    )
    if not len(rows):
        raise common.ConfigError(
            f"pretrain.corpus_docs={p.corpus_docs} documents make no row of "
            f"pretrain.seq_len={p.seq_len} tokens: raise corpus_docs or lower seq_len"
        )
    log.info(
        "pretraining corpus: %d documents, %d tokens, %d rows of %d (%.1f epochs)",
        len(docs),
        rows.size,
        len(rows),
        p.seq_len,
        p.steps * p.batch_size / len(rows),
    )

    # 4. The model's shape, and the held-out documents of the tag-copy check.
    mesh = common.make_mesh(config)
    cfg = model_config(config, len(tokenizer))
    log.info("toy base model: %.2fM parameters (%s)", cfg.num_params / 1e6, cfg)
    tag_rows = tag_copy_rows(tokenizer, p.seq_len, TAG_COPY_DOCS, config.seed, p.tag_names)
    if (p.tag_copy_restarts or p.tag_copy_every) and not tag_rows[1].any():
        raise common.ConfigError(  # (the check would read NaN, which every threshold lets pass)
            f"pretrain.seq_len={p.seq_len} is too short for the tag-copy check (no held-out "
            "document repeats a tag name within it): use a longer seq_len, or check nothing "
            "with pretrain.tag_copy_every=0 and pretrain.tag_copy_restarts=0"
        )
    # 5. Train. Whether the model learns to copy tag names is decided by its initialisation, not by
    # the corpus (README): one that has not started to by the end of the copy warm-up (plus
    # `tag_copy_deadline` corpus steps) never does, so pretraining starts over from a new
    # initialisation, at most `tag_copy_restarts` times.
    attempt = current_attempt(workdir, p.tag_copy_restarts)
    while True:
        state, row = _train(config, workdir, attempt, tokenizer, rows, cfg, mesh, tag_rows)
        if state is not None:
            break
        attempt += 1
        seed = attempt_seed(config.seed, attempt)
        log.warning(
            "tag_copy at most %.3f in the checks up to step %d (< %.2f): this initialisation is "
            "not learning to copy tag names, and would not by the end. Starting over from a new "
            "one (restart %d of at most %d, seed %d) in %s; the abandoned run stays where it is.",
            row["best_tag_copy"],
            row["step"],
            TAG_COPY_START,
            attempt,
            p.tag_copy_restarts,
            seed,
            attempt_dir(workdir, attempt),
        )
        if jax.process_index() == 0:
            paths.write_text(
                os.path.join(attempt_dir(workdir, attempt), RESTART_FILE),
                json.dumps({"attempt": attempt, "seed": seed, "abandoned": row}, indent=1),
            )

    # 6. A genuine HF checkpoint folder.
    out = os.path.join(workdir, "hf", "final")
    for path in filter(None, (out, export_to)):
        checkpoint.export_hf(state.model, path, tokenizer)
        log.info("toy base model saved to %s", path)
    if row.get("tag_copy", 1.0) < TAG_COPY_WARNING:
        log.warning(
            "this base gives a tag name it has seen earlier in a document only probability %.2f "
            "(bases that follow the R1-Zero template: ~0.7): it will not copy <think>/<answer> "
            "from the template, so R1-Zero gets no format reward. This was initialisation %d of "
            "at most %d (pretrain.tag_copy_restarts = %d): allow more restarts, or pretrain with "
            "another seed (README: what decides whether a base copies).",
            row["tag_copy"],
            attempt + 1,
            p.tag_copy_restarts + 1,
            p.tag_copy_restarts,
        )
    return {**{k: float(v) for k, v in row.items()}, "restarts": float(attempt)}
