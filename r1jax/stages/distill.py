"""Stage: distillation — train a smaller student on the teacher's reasoning traces.

The paper fine-tunes small dense models (Qwen2.5, Llama 3) on ~800k samples curated with DeepSeek-R1
(the rejection-sampled data), plain SFT with no RL, and finds it beats running RL on the small
model.

  1. read the teacher's traces: the JSONL `rejection_sampling` wrote from the teacher;
  2. fine-tune the student on them exactly as `sft` does (cross-entropy on completion tokens);
  3. optionally (`distill.teacher` set, same tokenizer): match the teacher's whole next-token
     distribution on those traces instead (forward KL, logit distillation);
  4. save the student as a Hugging Face checkpoint folder.
"""

from __future__ import annotations

import logging
import os

import jax

from r1jax.stages import common
from r1jax.stages import sft as sft_stage

log = logging.getLogger("r1jax")


def validate(config) -> None:
    d = config.distill
    if d.source != "cold_start":
        common.check_data_files(
            d.source,
            "distill.source",
            "'cold_start' (the built-in long-CoT traces) or the JSONL --stage=rejection_sampling "
            "wrote from the teacher: ",
        )
    if d.on_bad_json not in ("error", "skip"):
        raise common.ConfigError(
            f"distill.on_bad_json must be 'error' or 'skip', got {d.on_bad_json!r}"
        )
    if d.source == "cold_start":
        common.builtin_tasks(d, "distill")
    common.check_prompt_format(d, "distill")
    teacher = os.path.expanduser(d.teacher)
    if d.teacher and d.teacher != common.TOY_BASE:
        if not os.path.isdir(teacher):
            raise common.ConfigError(f"distill.teacher {d.teacher!r} is not a folder")
        if not os.path.isfile(os.path.join(teacher, "config.json")):
            final = os.path.join(teacher, "hf", "final")
            hint = f" (a stage's workdir: its model is {final})" if os.path.isdir(final) else ""
            raise common.ConfigError(
                f"distill.teacher {d.teacher!r} has no config.json: it must be a Hugging Face "
                f"model folder{hint}"
            )
    if not 0 < d.get("temperature", 1.0) < float("inf"):
        raise common.ConfigError(f"distill.temperature must be > 0, got {d.temperature}")
    common.check_epochs_and_sizes(d, "distill")
    ways = common.batch_ways(config, jax.device_count())
    if d.batch_size % ways:
        raise common.ConfigError(
            f"distill.batch_size={d.batch_size} must be a multiple of the mesh's {ways} batch "
            "shards"
        )
    common.micro_batches(config, "distill", d.batch_size)
    common.optim(config, steps_later=True)  # the data gives the step count


def run(config, workdir: str) -> dict:
    """Train the student `model.path` on `distill.source`; writes workdir/hf/final."""
    d = config.distill
    mesh = common.make_mesh(config)
    # The traces (read and tokenised) and the teacher's tokenizer first: a bad row, a seq_len that
    # fits none or another vocabulary is named before minutes go into loading two models.
    tokenizer = common.load_tokenizer(config)
    pairs = sft_stage.load_pairs(_as_sft(config), tokenizer, section="distill")
    rows = sft_stage.tokenized_pairs(config, "distill", tokenizer, pairs)
    teacher_config = None
    if d.teacher:
        teacher_config = config.copy_and_resolve_references()
        with teacher_config.unlocked():
            teacher_config.model.path = os.path.expanduser(d.teacher)
        with common.named_model("distill.teacher"):
            teacher_tokenizer = common.load_tokenizer(teacher_config)
        if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise common.ConfigError(
                "distill.teacher uses a different tokenizer from the student; "
                "logit distillation needs one vocabulary (leave "
                "distill.teacher empty for trace SFT)"
            )
        top = int(rows.input_ids.max())
        with common.named_model("distill.teacher"):
            vocab = common.vocab_size(teacher_config.model.path)
        common.check_token_ids(vocab, tokenizer, top, "the distill data", "distill.teacher")
    student, tokenizer = common.load_model(config, mesh)
    teacher = None
    if teacher_config is not None:
        with common.named_model("distill.teacher"):
            teacher = common.load_model(teacher_config, mesh, frozen=True)[0]
    log.info(
        "distilling %s into %s: %d traces%s",
        d.source,
        config.model.path,
        len(pairs),
        " with logit distillation" if teacher is not None else "",
    )
    return sft_stage.train_on_pairs(
        config, "distill", workdir, student, tokenizer, pairs, rows, mesh, teacher=teacher
    )


def _as_sft(config):
    """A config whose `sft` section reads the distillation traces."""
    view = config.copy_and_resolve_references()
    with view.unlocked():
        view.sft = view.distill
    return view
