"""Stage: supervised fine-tuning (R1's cold start, and the SFT on rejection-sampled data).

1. read (prompt, completion) pairs: the built-in readable long-CoT cold-start examples, or a JSONL /
   Parquet file of prompt/completion rows (what `rejection_sampling` writes) or chat `messages`
   (ShareGPT `conversations` too);
2. wrap each prompt in the template the RL stage will use, so SFT and RL see the same prompt;
3. tokenise, append EOS to each completion (the model learns to stop), lay out fixed-length rows
   (optionally packed, attention kept within each example);
4. minimise the cross-entropy of completion tokens only (prompt tokens get no gradient) for
   `sft.epochs` epochs;
5. save the result as a Hugging Face checkpoint folder, with its tokenizer.
"""

from __future__ import annotations

import json
import logging
import math
import os

import jax

from r1jax import checkpoint, metrics, sft, train
from r1jax.data import corpus, templates
from r1jax.data import tokenizer as toks
from r1jax.data.batching import tokenize_sft
from r1jax.stages import common

log = logging.getLogger("r1jax")


def validate(config) -> None:
    s = config.sft
    if s.source != "cold_start":
        common.check_data_files(s.source, "sft.source", "'cold_start' or ")
    if s.on_bad_json not in ("error", "skip"):
        raise common.ConfigError(
            f"sft.on_bad_json must be 'error' or 'skip', got {s.on_bad_json!r}"
        )
    if s.source == "cold_start":
        common.builtin_tasks(s, "sft")
    common.check_prompt_format(s, "sft")
    common.check_epochs_and_sizes(s, "sft")
    ways = common.batch_ways(config, jax.device_count())
    if s.batch_size % ways:
        raise common.ConfigError(
            f"sft.batch_size={s.batch_size} must be a multiple of the mesh's {ways} batch shards"
        )
    common.micro_batches(config, "sft", s.batch_size)
    common.optim(config, steps_later=True)  # the data gives the step count


def load_pairs(config, tokenizer, section: str = "sft") -> list[tuple[str, str, str]]:
    """(templated prompt, completion, end) triples from config.sft.source (`section`: the name
    errors give the section, for a stage that reads its data through this one). `end` is the
    special-token text that closes the completion: the chat template's end of turn for a prompt
    it rendered (`templates.turn_end`), "" (the EOS) for the R1-Zero and plain templates."""
    s = config.sft
    if s.source == "cold_start":
        rows = corpus.cold_start_examples(
            s.num_examples,
            seed=config.seed,
            tasks=common.builtin_tasks(s, "sft"),
            mistake_rate=s.mistake_rate,
        )
    else:
        try:
            rows, stats = common.load_completion_rows(
                s.source,
                # ("source": the file's own column, rejection sampling's "reasoning" or
                # "non_reasoning", in place of the loader's shape name)
                keep=("completion", "task", "meta", "source"),
                field_map=s.field_map.to_dict(),
                on_bad_json=s.on_bad_json,
            )
        except (OSError, ValueError) as e:
            hint = ""  # the loader names its own arguments; these are their config fields
            if "field_map" in str(e) or "shape" in str(e):
                hint = (
                    f" (from the command line: --config.{section}.field_map.prompt=COLUMN "
                    f"--config.{section}.field_map.completion=COLUMN)"
                )
            elif "on_bad_json" in str(e):
                hint = f" (from the command line: --config.{section}.on_bad_json=skip)"
            raise common.ConfigError(f"{section}.source: {e}{hint}") from e
        log.info("SFT data %s: %s", s.source, stats.summary())
    system = templates.system_prompt(s.get("system_prompt", ""))
    chat_end = templates.turn_end(tokenizer) if getattr(tokenizer, "chat_template", None) else ""
    if s.template in ("r1_zero", "chat"):  # (once for the file, not once per row)
        questions = [r["prompt"] for r in rows if isinstance(r.get("prompt"), str)]
        templates.warn_if_templated(questions, s.template, tokenizer)
    pairs, conversations = [], 0
    controls = toks.control_texts(tokenizer) if tokenizer is not None else []
    written_ends, spelled = 0, []  # completions that ended with end text; that hold such text
    context_answers, earlier_trained, earlier_empty = 0, 0, 0  # (assistant turns before answers)
    made, repeated = [], 0  # ((prompt, completion, end), from an earlier turn); their repeats
    ends = (chat_end, getattr(tokenizer, "eos_token", None))
    every_turn = s.get("turns", "all") == "all"
    for i, row in enumerate(rows):
        where = f"{section}.source {row.get('where') or f'{s.source}, row {i}'}"
        messages = row.get("messages") or []
        completion = row.get("completion")
        if messages and messages[-1].get("role") == "assistant" and completion in (None, ""):
            completion = messages[-1].get("content")  # (the answer: a completion column first)
        if completion is None:
            raise common.ConfigError(
                f"{where} has neither a completion nor a final message with role 'assistant' "
                f"(name the file's column to train on with "
                f"--config.{section}.field_map.completion=COLUMN)"
            )
        turns = templates.turns_before_answer(row)
        answers = [(turns, completion, where)]
        # (a rejection-sampled row's earlier turns are its prompt's, neither sampled nor graded:
        # context only, as with turns='last')
        sampled = row.get("source") == "reasoning"
        earlier = [j for j, t in enumerate(turns) if t.get("role") == "assistant" and not sampled]
        context_answers += bool(earlier)
        if every_turn:  # each earlier answer after its own context, as the model would see it
            with_text = [j for j in earlier if _has_text(turns[j].get("content"))]
            earlier_empty += len(earlier) - len(with_text)  # (e.g. a tool call: context only)
            answers[:0] = [
                (turns[:j], turns[j]["content"], f"{where}, turn {j + 1}") for j in with_text
            ]
        # One question in the template RL samples with (so SFT and RL see the same prompt); a
        # conversation, which has no R1-Zero or plain form, by the model's chat template, its
        # first answer too (one conversation is not trained in two formats).
        conversation = templates.is_conversation(turns)
        for context, text, at in answers:
            # (the turns and answer as the file has them, end text aside: the text is fitted to
            # its prompt below, which may open a think block)
            bare = _without_end_text(text, ends) if isinstance(text, str) else text
            said = json.dumps([context, bare], sort_keys=True, default=repr)
            prompt = common.render_turns(
                context, s, section, tokenizer, system=system, where=at,
                template="chat" if conversation else None,
            )  # fmt: skip
            end = chat_end if conversation or s.template == "chat" else ""
            if isinstance(text, str):
                text = _without_opened_think(prompt, text)
                trimmed = _without_end_text(text, (end, getattr(tokenizer, "eos_token", None)))
                written_ends += trimmed != text
                text = trimmed
                if any(t in text for t in controls):
                    spelled.append(at)
            if not isinstance(text, str) or not text.strip():
                raise common.ConfigError(
                    f"{at}: the completion must be non-empty text (after the think tag its "
                    f"prompt opened, if any), got {text!r:.80}"
                )
            made.append(((prompt, text, end), said, at != where, conversation))
    # An earlier answer that is also a row's own answer, after the same turns (a file holding
    # each turn of a conversation as a row, as `turns='last'` needed), trains as that row, not
    # again for each longer one (repeated conversations, upsampled, keep their weight).
    answered = {said for _, said, earlier, _ in made if not earlier}
    for pair, said, earlier, conversation in made:
        if earlier and said in answered:
            repeated += 1
            continue
        pairs.append(pair)
        earlier_trained += earlier
        conversations += conversation
    common.log_conversations(conversations, len(pairs), section, s.template)
    if context_answers and every_turn:
        log.info(
            "%s: %d rows have assistant turns before their last: %d of those turns train as "
            "examples of their own (after the turns before them)%s%s; %d examples in all",
            section,
            context_answers,
            earlier_trained,
            f", {earlier_empty} without text are context only" if earlier_empty else "",
            f", {repeated} are examples already (rows of their own)" if repeated else "",
            len(pairs),
        )
    elif context_answers:
        log.info(
            "%s: %d rows have assistant turns before their last: those are the prompt's context, "
            "only the last turn is trained (%s.turns='last'; 'all' trains each)",
            section,
            context_answers,
            section,
        )
    if written_ends:
        log.info(
            "%s: %d completions ended with their end-of-turn text written out (data saved with "
            "its special tokens); it is dropped, the end token itself is appended",
            section,
            written_ends,
        )
    if spelled:
        log.warning(
            "%s: %d of %d completions hold a special token's text (one of %s; first: %s); a "
            "completion is text, so the model learns to write those characters one by one, not "
            "the token. Clean the data if that is not meant",
            section,
            len(spelled),
            len(pairs),
            sorted(controls),
            spelled[0],
        )
    return pairs


def _has_text(content) -> bool:
    return not isinstance(content, str) or bool(content.strip())  # (not text: refused below)


def _without_end_text(completion: str, ends) -> str:
    """`completion` without end-of-turn / EOS text written at its end (the real token is
    appended after it; as text it would be learned as characters before the stop)."""
    ends = [e for e in ends if e]
    body = completion.rstrip()
    while (end := next((e for e in ends if body.endswith(e)), None)) is not None:
        body = body[: -len(end)].rstrip()
    return body if body != completion.rstrip() else completion


def _without_opened_think(prompt: str, completion: str) -> str:
    """`completion` continuing the think block `prompt` opened, when it ends with one.

    Reasoning rows carry the whole format, "<think>…</think><answer>…</answer>" (as
    rejection sampling writes them, whatever its prompt opened); a chat template that opens the
    block itself (DeepSeek-R1-Distill's) or `prefill_think` puts the tag in the prompt, and the
    model must learn to continue after it, not to write a second one. A row with no reasoning
    (non-reasoning data: a plain answer) closes the opened block empty first, as R1's own
    non-reasoning answers do ("<think>\n\n</think>\n\n"), rather than training the model to
    answer, and stop, inside its reasoning.
    """
    opened = templates.completion_prefix("", False, prompt)  # "<think>\n", "<think>" or ""
    body = completion.lstrip()
    if not opened or not body:
        return completion
    if not body.startswith("<think>"):
        return completion if "</think>" in completion else f"\n</think>\n\n{body}"
    body = body[len("<think>") :]
    return body[1:] if opened.endswith("\n") and body.startswith("\n") else body


def run_steps(rows: int, epochs: float, batch_size: int) -> int:
    """Optimizer steps that see `rows` rows `epochs` times (the last batch filled from the next
    epoch's order). Rounded before the ceiling: 100 rows x 2.2 epochs / 20 is 11.000000000000002
    in floating point, and took a twelfth step."""
    return math.ceil(round(rows * epochs / batch_size, 9))


def run(config, workdir: str) -> dict:
    """Fine-tune `model.path` on `sft.source`; writes workdir/hf/final."""
    mesh = common.make_mesh(config)
    # The data first: a bad row is named before minutes go into loading a large model.
    # (and tokenised: a seq_len that fits no example is refused then too)
    tokenizer = common.load_tokenizer(config)
    pairs = load_pairs(config, tokenizer)
    rows = tokenized_pairs(config, "sft", tokenizer, pairs)
    model, tokenizer = common.load_model(config, mesh)
    return train_on_pairs(config, "sft", workdir, model, tokenizer, pairs, rows, mesh)


def tokenized_pairs(config, section: str, tokenizer, pairs):
    """(prompt, completion, end) triples (`load_pairs`) as the stage's training rows, `section`'s
    seq_len, packing and overflow applied; examples cut or left out are counted in a warning."""
    s = config[section]
    try:
        batch_all = tokenize_sft(
            tokenizer,
            [p for p, _, _ in pairs],
            [c for _, c, _ in pairs],
            ends=[e for _, _, e in pairs],
            seq_len=s.seq_len,
            pack=s.pack,
            overflow=s.get("overflow", "truncate"),
        )
    except ValueError as e:  # e.g. every prompt longer than seq_len: nothing left to learn
        # (or a tokenizer without the EOS or pad token the rows need: not seq_len's doing)
        field = f"{section}.seq_len={s.seq_len}" if "seq_len" in str(e) else "model.path"
        raise common.ConfigError(f"{field}: {e}") from None
    rows = batch_all.input_ids.shape[0]
    top = int(batch_all.input_ids.max())  # (before the model loads: its config.json)
    common.check_token_ids(
        common.vocab_size(config.model.path), tokenizer, top, f"the {section} data"
    )
    log.info(
        "%d examples -> %d rows of %d tokens (%d truncated, %d skipped); %d steps",
        len(pairs),
        rows,
        s.seq_len,
        batch_all.num_truncated,
        batch_all.num_skipped,
        run_steps(rows, s.epochs, s.batch_size),
    )
    if rows < s.batch_size:
        log.warning(
            "%d rows for a batch of %s.batch_size=%d: each step fills its batch from the next "
            "epochs' orders, so the run trains on some rows more often than others, and on "
            "more epochs than %s.epochs asks; lower batch_size or add data",
            rows,
            section,
            s.batch_size,
            section,
        )
    if batch_all.num_truncated:
        log.warning(
            "%d of %d examples are longer than %s.seq_len=%d and train without the end of "
            "their completion (its answer and EOS): raise seq_len, or leave them out with "
            "--config.%s.overflow=skip",
            batch_all.num_truncated,
            len(pairs),
            section,
            s.seq_len,
            section,
        )
    if batch_all.num_skipped:
        why = (
            f"--config.{section}.overflow=skip"
            if s.get("overflow", "truncate") == "skip"
            else "their prompt alone fills it"
        )
        log.warning(
            "%d of %d examples are left out, longer than %s.seq_len=%d (%s)",
            batch_all.num_skipped,
            len(pairs),
            section,
            s.seq_len,
            why,
        )
    return batch_all


def train_on_pairs(
    config, section: str, workdir: str, model, tokenizer, pairs, batch_all, mesh, teacher=None
) -> dict:
    """The SFT loop shared with `distill`: epochs over `batch_all`, the rows `tokenized_pairs`
    made of `pairs` (`load_pairs`; their turn ends are written into the export).

    section: the stage's section name, "sft" or "distill" (seq_len, pack, batch_size, epochs,
    num_micro_batches). With `teacher`, each step is logit distillation (KL to the teacher)
    instead of cross-entropy on the tokens.
    """
    s = config[section]
    rows = batch_all.input_ids.shape[0]
    steps = run_steps(rows, s.epochs, s.batch_size)
    state = train.TrainState.create(model, common.optim(config, steps, from_data=True), mesh)
    step_cfg = sft.SFTConfig(
        num_micro_batches=common.micro_batches(config, section, s.batch_size),
        # Logit distillation compares the tokenizer's ids (the two embedding tables may be
        # padded to different sizes past it).
        distill_temperature=s.get("temperature", 1.0),  # (sft has none)
        distill_vocab=len(tokenizer) if teacher is not None else 0,
    )

    ckpt = checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        save_interval_steps=config.ckpt.every,
        max_to_keep=config.ckpt.keep,
        async_save=config.ckpt.async_save,
    )
    # What fixes the data order: the rows as tokenised (data, template, seq_len, packing,
    # tokenizer), the seed and the rows per step.
    data_order = {
        "seed": config.seed,
        "batch_size": s.batch_size,
        "data": common.fingerprint(batch_all.input_ids, batch_all.loss_mask, batch_all.segment_ids),
        "model.path": common.model_fingerprint(config.model.path),  # (the model it trains)
        **common.optimizer_layout(config),
    }
    # (each host tokenises with its own copy of the tokenizer files, which the model folder's
    # check does not cover: rows tokenised differently would be mixed into every batch)
    common.check_same_on_every_process(
        f"the {section} examples as tokenised (the model folder's tokenizer files, or the "
        "tokenizers library)",
        lambda: data_order["data"],
    )
    if section == "distill":  # the loss: trace SFT or KL to a teacher (one series, not both)
        # By content, as RL's reference model: a moved teacher is the same one, a replaced one
        # is not. (A new key: checkpoints that recorded the teacher's path are not compared.)
        data_order["teacher model"] = (
            common.model_fingerprint(s.teacher) if s.teacher else "none (trace SFT)"
        )
        data_order["temperature"] = s.temperature if s.teacher else None
    resumed = common.resume(
        ckpt, state, data_order, total_steps=steps, steps_field=f"{section}.epochs={s.epochs}"
    )
    start = resumed["step"]
    if start:
        common.warn_if_schedule_changed(config, resumed.get("schedule"), steps)
    writer = metrics.MetricsWriter(
        workdir,
        total_steps=steps,
        start_step=start,
        summary_every=config.log.every,
        desc="distill" if teacher else "SFT",
        postfix_keys=("loss",),
        progress=config.log.progress,
    )
    # (a rerun after the last checkpoint, killed during its export, returns what it logged)
    row = metrics.logged_at(os.path.join(workdir, "metrics.jsonl"), start) if start else {}
    watch = train.SkipWatch(config.optim.max_skipped_steps)
    watch.resume(resumed.get("skips"))
    for step in range(start, steps):
        idx = common.batch_indices(rows, step, s.batch_size, config.seed)
        batch = {k: getattr(batch_all, k)[idx] for k in sft.SFT_FIELDS}
        out = (
            sft.distill_step(state, teacher, batch, step_cfg)
            if teacher is not None
            else sft.train_step(state, batch, step_cfg)
        )
        row = jax.device_get(out)
        writer.write(step + 1, row)
        watch(step + 1, row)
        if ckpt.save(
            step + 1,
            state.model,
            state.optimizer,
            extra={
                "step": step + 1,
                "run": data_order,
                "schedule": common.schedule_record(config, steps),
                "skips": watch.record(),
            },
            force=step + 1 == steps,
            interval=not watch.skipping,
        ):
            writer.flush()  # a cloud workdir's metrics reach the saved step
    ckpt.wait()
    writer.close()
    ckpt.close()
    out_dir = os.path.join(workdir, "hf", "final")
    source = common.resolve_model_path(config.model.path)  # its eos ids, generation config
    # The answers end as the pairs say (a chat template's end of turn): serving stops there too.
    turn_ends = {e for _, _, e in pairs if e}
    eos_ids = sorted({tokenizer(e, add_special_tokens=False)["input_ids"][-1] for e in turn_ends})
    checkpoint.export_hf(state.model, out_dir, tokenizer, source, eos_ids=eos_ids)
    log.info("done: model saved to %s", out_dir)
    return {**{k: float(v) for k, v in row.items()}, "steps": steps}
