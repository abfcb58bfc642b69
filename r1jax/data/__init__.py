"""r1jax.data: synthetic reasoning tasks, text corpora, tokenizer, loaders, templates, batching.

Everything here runs on the host; nothing imports JAX.

- ``tasks`` (+ ``arithmetic``, ``countdown``): deterministic synthetic tasks with exact verifiers
  and a hash-based held-out split.
- ``corpus``: the toy pretraining corpus (no think/answer tags) and long-CoT cold-start examples.
- ``tokenizer``: the toy byte-level BPE, saved as an HF tokenizer folder.
- ``templates``: the R1-Zero prompt, chat prompts, the think/answer completion format.
- ``loaders``: local JSONL/Parquet datasets (GSM8K, MATH, AIME, code-contest shapes) -> rows.
- ``batching``: bucketed left-padded prompt batches and right-padded / packed SFT batches.
"""

from r1jax.data.arithmetic import ArithmeticTask
from r1jax.data.batching import (
    DEFAULT_BUCKETS,
    PromptBatch,
    SFTBatch,
    batch_prompt_ids,
    bucket_length,
    left_pad,
    pack_sft_ids,
    tokenize_prompts,
    tokenize_sft,
)
from r1jax.data.corpus import cold_start_examples, default_tasks, pretrain_corpus
from r1jax.data.countdown import CountdownTask, check_answer, evaluate_expression
from r1jax.data.loaders import (
    LoadStats,
    detect_shape,
    extract_boxed,
    gsm8k_answer,
    load_rows,
    parse_tests,
    sample_path,
    shard_rows,
)
from r1jax.data.tasks import TASKS, make_dataset, make_task, split_of, verify
from r1jax.data.templates import (
    R1_SYSTEM_PROMPT,
    R1_ZERO_TEMPLATE,
    chat_prompt,
    completion_prefix,
    format_prompts,
    r1_zero_prompt,
    think_answer,
)
from r1jax.data.tokenizer import (
    StopStrings,
    load_tokenizer,
    stop_token_ids,
    train_tokenizer,
    train_toy_tokenizer,
)

__all__ = [
    "StopStrings",
    "DEFAULT_BUCKETS",
    "R1_SYSTEM_PROMPT",
    "R1_ZERO_TEMPLATE",
    "TASKS",
    "ArithmeticTask",
    "CountdownTask",
    "LoadStats",
    "PromptBatch",
    "SFTBatch",
    "batch_prompt_ids",
    "bucket_length",
    "chat_prompt",
    "check_answer",
    "cold_start_examples",
    "completion_prefix",
    "default_tasks",
    "detect_shape",
    "evaluate_expression",
    "extract_boxed",
    "format_prompts",
    "gsm8k_answer",
    "left_pad",
    "load_rows",
    "load_tokenizer",
    "make_dataset",
    "make_task",
    "pack_sft_ids",
    "parse_tests",
    "pretrain_corpus",
    "r1_zero_prompt",
    "sample_path",
    "shard_rows",
    "split_of",
    "stop_token_ids",
    "think_answer",
    "tokenize_prompts",
    "tokenize_sft",
    "train_tokenizer",
    "train_toy_tokenizer",
    "verify",
]
