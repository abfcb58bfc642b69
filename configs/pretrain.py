"""Pretrain the built-in toy base model from scratch (offline default of --stage=pretrain).

    python -m r1jax.launch --stage=pretrain [--workdir=runs/pretrain]

A synthetic corpus of arithmetic and Countdown problems, solved tersely and step by step, with no
<think> or <answer> tag anywhere (its instruction-following documents use other tag names), a
byte-level BPE tokenizer trained on it, and a small Qwen2-architecture decoder trained first on a
copy task, then on next-token prediction over the corpus (~13 minutes on 2 CPU cores). The result
is a genuine Hugging Face checkpoint folder (config.json + safetensors + tokenizer) that every other
stage loads with `hf.load`.
"""

import ml_collections

from r1jax.data import corpus
from r1jax.stages import common


def get_config(arg=None):
    common.check_config_arg(arg, "pretrain")
    config = common.base_config()
    config.model.path = ""  # unused: pretraining builds the model from config.pretrain.arch
    config.ckpt.every = 200

    p = config.pretrain = ml_collections.ConfigDict()
    p.corpus_docs = 12000  # synthetic documents generated for the corpus (~2.5M tokens)
    p.tasks = ("arithmetic",)  # built-in tasks the corpus solves (train split only; + "countdown")
    # Document kinds (see r1jax/data/corpus.py): terse and step-by-step solutions, dialogues, and
    # instruction-following with other tag names (never <think>/<answer>).
    p.mix = ml_collections.ConfigDict(dict(corpus.DEFAULT_MIX))
    # Share of "format" documents whose tags are think/answer: 0, as the recipe asks (the base
    # follows the R1-Zero template by copying its tag names). A value > 0 gives a base without the
    # copy warm-up a prior for the tags instead (the recipe's default until the warm-up existed;
    # README, deviations).
    p.r1_tag_rate = 0.0
    # Optimizer steps of a copy task before the corpus (strings of word and punctuation pieces, each
    # repeated; see r1jax/stages/pretrain.py): how the toy model learns to copy from its context at
    # all (copying starts after ~550-700 steps at copy_warmup_lr; 0 = no warm-up).
    p.copy_warmup_steps = 800
    p.copy_warmup_lr = 1e-3  # constant after optim.warmup_steps; 3e-3 never starts the copying
    # The copy task: "repeat" (each string followed by itself), "recall" (a string, then some of
    # its tokens each followed by its successor there: a match by content for every scored token,
    # as a tag name after "<" needs) or "mixed" (half the rows each).
    p.copy_task = "repeat"
    # Copy-task rows in every corpus batch (of batch_size), so the copying goes on being trained
    # (the corpus phase's logged loss then covers their repetitions too).
    p.copy_rows_in_corpus = 0
    # Steps between checks that the model copies tag names named earlier in a document (held-out
    # format documents; metric "tag_copy", a probability; 0 = never). The R1-Zero template
    # relies on it: a base below ~0.3 never writes <think>/<answer>, and the stage warns.
    p.tag_copy_every = 100
    # Whether the model learns to copy tag names is decided by its initialisation, during the copy
    # warm-up (README): one none of whose checks reached 0.05 (no copying: <= 0.005) by the
    # deadline, `tag_copy_deadline` corpus steps after the warm-up (0: at its end), never does, so
    # pretraining starts over from a new initialisation (the corpus and tokenizer stay; the
    # abandoned run is kept), at most `tag_copy_restarts` times (0 = never; the last attempt always
    # runs to the end).
    p.tag_copy_restarts = 4
    p.tag_copy_deadline = 0
    # Tag names of the format documents: "composed" (one or two words joined by "_", think and
    # answer among them only as parts, e.g. <think_total>), so that no word is barred from following
    # "<" and the base copies <think>/<answer> from the template; "words": one tag word each, never
    # think/answer (the base then never writes <think>, README, deviations).
    p.tag_names = "composed"
    p.arithmetic = common.data_config().arithmetic  # same difficulty as the RL stage's default
    p.countdown = common.data_config().countdown
    p.vocab_size = 768  # BPE vocabulary incl. bytes and special tokens (tag words: one token)
    p.seq_len = 256  # tokens per training row (documents are packed, EOS-separated)
    p.batch_size = 16  # rows per optimizer step
    p.num_micro_batches = 0  # gradient accumulation; 0 = automatic (see configs/rl.py)
    # Optimizer steps on the corpus after the warm-up (~2.8 epochs; 600 left the base's arithmetic
    # weak: held-out pass@1 0.10 against 0.51, README).
    p.steps = 1200
    p.arch = ml_collections.ConfigDict()  # Qwen2-style architecture of the toy base model
    p.arch.hidden_size = 128
    p.arch.intermediate_size = 384
    p.arch.num_layers = 4
    p.arch.num_heads = 4
    p.arch.num_kv_heads = 2
    p.arch.head_dim = 32
    p.arch.max_position_embeddings = 1024
    p.arch.tie_word_embeddings = True

    config.optim = common.optim_config(
        learning_rate=3e-3,
        warmup_steps=50,
        schedule="cosine",
        total_steps=p.steps,  # the cosine spans pretrain.steps even when that is overridden
        weight_decay=0.1,
    )
    return config
