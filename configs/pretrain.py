"""Pretrain the built-in toy base model from scratch (offline default of --stage=pretrain).

    python -m r1jax.launch --stage=pretrain [--workdir=runs/pretrain]

A synthetic corpus of arithmetic and Countdown problems, solved tersely and step by step (<think>
and <answer> tags only in 10% of its instruction-following documents), a byte-level BPE tokenizer
trained on it, and a small Qwen2-architecture decoder trained on next-token prediction. The result
is a genuine Hugging Face checkpoint folder (config.json + safetensors + tokenizer) that every other
stage loads with `hf.load`.
"""

import ml_collections

from r1jax.data import corpus
from r1jax.stages import common


def get_config(arg=None):
    config = common.base_config()
    config.model.path = ""  # unused: pretraining builds the model from config.pretrain.arch
    config.ckpt.every = 200

    p = config.pretrain = ml_collections.ConfigDict()
    p.corpus_docs = 12000  # synthetic documents generated for the corpus (~2.5M tokens)
    p.tasks = ("arithmetic",)  # built-in tasks the corpus solves (train split only; + "countdown")
    # Document kinds (see r1jax/data/corpus.py): terse and step-by-step solutions, dialogues, and
    # instruction-following with other tag names (never <think>/<answer>).
    p.mix = ml_collections.ConfigDict(dict(corpus.DEFAULT_MIX))
    # Share of "format" documents whose tags are think/answer (a documented deviation: the toy model
    # does not copy *these* tag names from its prompt, so it needs this prior; 0 = no such tag in
    # the corpus; see the README's deviations).
    p.r1_tag_rate = 0.1
    # Optimizer steps of a copy task before the corpus (strings of word and punctuation pieces, each
    # repeated; see r1jax/stages/pretrain.py): how the toy model learns to copy from its context at
    # all (~600 steps at copy_warmup_lr). Off by default: with it (and tag_names="composed") the
    # base copies think/answer from the R1-Zero prompt, but so far its arithmetic is weaker and
    # R1-Zero gains nothing on it, so it does not yet replace r1_tag_rate (README, deviations).
    p.copy_warmup_steps = 0
    p.copy_warmup_lr = 1e-3  # constant after optim.warmup_steps; 3e-3 never starts the copying
    # Tag names of the format documents: "words" (one tag word each) or "composed" (one or two
    # words, think and answer among them only as parts): with "composed", r1_tag_rate 0 and the
    # copy warm-up, the base follows the R1-Zero template by copying its tags (README).
    p.tag_names = "words"
    p.arithmetic = common.data_config().arithmetic  # same difficulty as the RL stage's default
    p.countdown = common.data_config().countdown
    p.vocab_size = 768  # BPE vocabulary incl. bytes and special tokens (tag words: one token)
    p.seq_len = 256  # tokens per training row (documents are packed, EOS-separated)
    p.batch_size = 16  # rows per optimizer step
    p.num_micro_batches = 0  # gradient accumulation; 0 = automatic (see configs/rl.py)
    p.steps = 600  # optimizer steps (~1.4 epochs; about 4 minutes on 2 CPU cores)
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
