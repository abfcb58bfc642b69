"""A learned reward model: a decoder with a scalar head, scored in batches on device.

R1's last RL stage ("RL for all scenarios") keeps rule rewards for reasoning prompts and adds a
reward model for helpfulness and harmlessness on general prompts. This module owns that model:

- `ScalarHeadDecoder`: the `Decoder` backbone (its `hidden_states`) plus `score_d1` [D, 1], a linear
  layer without bias read at each row's last real token. This is the layout of transformers'
  `Qwen2ForSequenceClassification`, `LlamaForSequenceClassification` (and the Qwen3 / Mistral
  ones) with `num_labels=1`, which is how reward models are published.
- `load` / `save`: HF checkpoint folders through `hf.load_weights` / `hf.save_weights` (the same
  strict config.json parsing as the policy; each tensor placed straight into its sharding).
- `score_batch`: the jitted forward, [B, T] ids + mask -> [B] float32 scores.
- `RewardModel`: strings in, floats out. It tokenises each (prompt, completion) pair with the
  reward model's own tokenizer (its chat template when it has one: user turn, assistant turn;
  else the plain concatenation), left-pads to length buckets, scores fixed-shape batches on
  device and optionally normalises `(score - mean) / std`. It is also a TRL-signature reward,
  `rm(completions, prompts=...) -> list[float]`.

Notable choices:
- The scored token is the one transformers picks: the rightmost token that is not the config's
  `pad_token_id`, here also required to have mask 1, so padding written with any other id is
  ignored too. (Without a `pad_token_id` transformers only scores single unpadded rows; here it is
  the last masked-in token.) Positions come from the mask, so left padding changes nothing.
- Rows are scored sorted by length, so a batch shares a short bucket; a short last batch is
  filled with copies of its first row (dropped afterwards), so every call compiles at most one
  program per bucket. Scores do not depend on the batching (tested).
- A sequence longer than the largest bucket keeps its prompt (up to half the bucket) and the
  completion's last tokens (the final answer, which the score reads), dropping the start of the
  completion (the reasoning), and is counted in a warning: a runaway sample must not stop the
  trainer, nor be judged without its question.
- Not a host-callback reward: `RewardModel` runs jitted programs itself, and starting one from
  inside the host callback of another jitted program (the rollout's reward bridge) can deadlock
  the device. GRPO scores it between rollout and update (`r1jax/stages/rl.py`), and
  `rewards.HostRewardBridge` refuses it (`runs_on_device`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from r1jax import sharding
from r1jax.data import templates
from r1jax.data.batching import DEFAULT_BUCKETS, batch_prompt_ids
from r1jax.data.tokenizer import leading_special_ids
from r1jax.models import hf
from r1jax.models.hf import CheckpointError
from r1jax.models.transformer import Decoder, ModelConfig
from r1jax.rewards.common import completion_text

log = logging.getLogger(__name__)

# Dense families whose *ForSequenceClassification checkpoints load (DeepSeek MoE ones do not).
SUPPORTED_MODEL_TYPES = ("qwen2", "llama", "mistral", "qwen3")
_HEAD = "score.weight"


# --------------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------------


def last_token_index(
    input_ids: jax.Array, attention_mask: jax.Array, pad_token_id: int | None
) -> jax.Array:
    """[B, T] ids and 0/1 mask -> [B] int32 index of the token each row is scored at.

    The rightmost position with mask 1 and (when `pad_token_id` is set) an id other than it, as
    transformers' sequence classifiers pick it; 0 for a row with no such token (as theirs).
    """
    real = attention_mask.astype(bool)
    if pad_token_id is not None:
        real = real & (input_ids != pad_token_id)
    slots = jnp.arange(input_ids.shape[1], dtype=jnp.int32)
    return jnp.argmax(jnp.where(real, slots, -1), axis=-1).astype(jnp.int32)


class ScalarHeadDecoder(nnx.Module):
    """A decoder whose output is one float per sequence (a reward model). See the module docstring.

    cfg:          the ModelConfig of config.json (its `tie_word_embeddings` is kept for saving; the
                  backbone has no unembedding either way)
    pad_token_id: config.json's `pad_token_id` (selects the scored token), or None
    """

    def __init__(self, cfg: ModelConfig, *, pad_token_id: int | None = None, rngs: nnx.Rngs):
        self.cfg = cfg
        self.pad_token_id = None if pad_token_id is None else int(pad_token_id)
        # Tied = no [D, V] unembedding matrix: a classifier has no LM head to fill it from.
        self.backbone = Decoder(dataclasses.replace(cfg, tie_word_embeddings=True), rngs=rngs)
        init = nnx.initializers.normal(0.02)
        self.score_d1 = nnx.Param(
            init(rngs.params(), (cfg.hidden_size, 1), cfg.param_dtype), out_sharding=("embed", None)
        )

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """input_ids [B, T] int32, attention_mask [B, T] (1 = token, 0 = pad) -> [B] float32."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        hidden, _ = self.backbone.hidden_states(input_ids, attention_mask)  # [B, T, D]
        last = last_token_index(input_ids, attention_mask, self.pad_token_id)  # [B]
        pooled = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [B, D]
        w = self.score_d1[...].astype(jnp.dtype(self.cfg.dtype))
        return jnp.einsum("bd,dl->bl", pooled, w, preferred_element_type=jnp.float32)[:, 0]


@functools.partial(jax.jit, static_argnames="graphdef")
def score_batch(graphdef, state, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """The jitted forward of a split `ScalarHeadDecoder`: [B, T] int32 ids and mask -> [B] float32.

    `state` may be sharded on the ambient mesh (`jax.set_mesh`); compiled once per [B, T].
    """
    return nnx.merge(graphdef, state)(input_ids, attention_mask)


# --------------------------------------------------------------------------------------------------
# HF checkpoints
# --------------------------------------------------------------------------------------------------


def _mappings(cfg: ModelConfig) -> list:
    """Parameter <-> tensor mappings: the decoder's under `backbone`, then the `score` head."""
    backbone_cfg = dataclasses.replace(cfg, tie_word_embeddings=True)
    out = [dataclasses.replace(m, path=("backbone",) + m.path) for m in hf._mappings(backbone_cfg)]
    return out + [hf._Mapping(("score_d1",), _HEAD, perm=(1, 0))]


def load(
    path: str,
    mesh: Mesh | None = None,
    *,
    param_dtype: str = "float32",
    dtype: str | None = None,
    rules=None,
) -> ScalarHeadDecoder:
    """Load a local HF sequence-classification checkpoint (num_labels=1) as a ScalarHeadDecoder.

    path:        folder with config.json and safetensors holding `model.*` and `score.weight`
    mesh:        place each parameter straight into its sharding on this mesh (None: one device)
    param_dtype: storage dtype; dtype: compute dtype (default = param_dtype)
    rules:       logical-axis rules (default `sharding.RULES`: weights split over fsdp, which
                 suits a forward-only model: one gather per batch, not per token)
    """
    raw, where = check_config(path)
    cfg = hf.config_from_hf(raw, param_dtype=param_dtype, dtype=dtype, where=where)
    pad = raw.get("pad_token_id")
    return hf.load_weights(
        path,
        lambda: ScalarHeadDecoder(cfg, pad_token_id=pad, rngs=nnx.Rngs(0)),
        _mappings(cfg),
        cfg,
        mesh=mesh,
        param_dtype=param_dtype,
        rules=rules,
    )


def check_config(path: str) -> tuple[dict, str]:
    """config.json of a reward-model folder, checked to be a supported sequence classifier with
    one output (a CheckpointError naming the field otherwise; read before any weight, so a run
    can refuse a wrong folder up front) -> (the config without num_labels, its path)."""
    raw = dict(hf.read_config(path))
    where = os.path.join(path, "config.json")
    if raw.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{where}: model_type {raw.get('model_type')!r} is not supported for a reward model; "
            f"r1jax loads {', '.join(SUPPORTED_MODEL_TYPES)} sequence classifiers"
        )
    archs = raw.get("architectures") or []
    if any(not a.endswith("ForSequenceClassification") for a in archs):
        raise CheckpointError(
            f"{where}: architectures {archs} is not a sequence classifier; a reward model is a "
            f"*ForSequenceClassification checkpoint with a `{_HEAD}` head (num_labels=1)"
        )
    # transformers' rule: num_labels is the size of id2label, else the field, else 2.
    num_labels = raw.pop("num_labels", None)
    if raw.get("id2label"):
        num_labels = len(raw["id2label"])
    if num_labels != 1:
        raise CheckpointError(
            f"{where}: num_labels={num_labels if num_labels is not None else 2} (id2label "
            f"{raw.get('id2label')}); a reward model has a single output, num_labels=1"
        )
    return raw, where


def save(model: ScalarHeadDecoder, path: str, *, dtype: str | None = None) -> None:
    """Write `model` as a folder that `AutoModelForSequenceClassification.from_pretrained` loads.

    In multi-process runs every process must call this (gathers are collective); process 0 writes.
    """
    config = hf.config_to_hf(model.cfg)
    config["architectures"] = [
        a.replace("ForCausalLM", "ForSequenceClassification") for a in config["architectures"]
    ]
    config.update(
        id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, pad_token_id=model.pad_token_id
    )
    hf.save_weights(model, path, _mappings(model.cfg), config, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# Strings in, scores out
# --------------------------------------------------------------------------------------------------


class RewardModel:
    """A loaded reward model and its tokenizer: `score(prompts, completions) -> list[float]`.

    Args:
      model: a `ScalarHeadDecoder` (placed on `mesh` when one is given).
      tokenizer: the reward model's HF tokenizer.
      mesh: batches are split over its batch axes (None: the default device).
      rules: logical-axis rules the model was placed with (default `sharding.RULES`).
      batch_size: rows per device batch (B of every compiled program).
      buckets: padded lengths T; a pair longer than the largest keeps its prompt (up to half
        of it) and its last tokens (`score`; `score_ids` alone: a leading BOS and the last).
      mean, std: the returned score is `(raw - mean) / std` (0 and 1: the raw score).
    """

    __name__ = "reward_model"  # its label when passed to `build_reward_fn` as a callable
    runs_on_device = True  # never call from a host callback of a jitted program (see module doc)

    def __init__(
        self,
        model: ScalarHeadDecoder,
        tokenizer,
        *,
        mesh: Mesh | None = None,
        rules=None,
        batch_size: int = 8,
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        mean: float = 0.0,
        std: float = 1.0,
    ):
        if batch_size < 1:
            raise ValueError(f"reward model batch_size must be >= 1, got {batch_size}")
        if not buckets or min(buckets) < 1:
            raise ValueError(f"reward model buckets must be positive lengths, got {buckets}")
        if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
            raise ValueError(
                f"reward model normalisation needs finite mean, std > 0: {mean}, {std}"
            )
        self.graphdef, self.state = nnx.split(model)
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.rules = tuple(rules if rules is not None else sharding.RULES)
        self.batch_size = int(batch_size)
        self.buckets = tuple(sorted(int(b) for b in buckets))
        self.mean, self.std = float(mean), float(std)
        # Padding is masked out whatever its id; config.json's pad id is simply the natural one.
        ids = (model.pad_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id)
        self.pad_id = int(next((i for i in ids if i is not None), 0))
        self._compiled: set[tuple[int, int]] = set()

    @classmethod
    def load(
        cls,
        path: str,
        *,
        mesh: Mesh | None = None,
        param_dtype: str = "float32",
        dtype: str | None = None,
        rules=None,
        **kwargs: Any,
    ) -> RewardModel:
        """Model and tokenizer from one HF folder (see `load`); `kwargs` as the constructor."""
        model = load(path, mesh, param_dtype=param_dtype, dtype=dtype, rules=rules)
        return cls(model, hf.tokenizer(path), mesh=mesh, rules=rules, **kwargs)

    # -- tokenisation --

    def encode(self, prompts: Sequence[Any], completions: Sequence[Any]) -> list[list[int]]:
        """[N] prompts and completions -> [N] token-id lists, as the reward model reads them.

        A prompt is a string (the user turn) or a chat-message list (the conversation so far); a
        completion is a string or chat messages (its assistant text is used). With a chat template
        the pair is rendered as user turn + assistant turn; without one, prompt + completion.
        """
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        answers = [completion_text(c) for c in completions]
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            texts = [
                templates.apply_chat_template(
                    tok,
                    _messages(p) + [{"role": "assistant", "content": self._defused(a)}],
                    tokenize=False,
                )
                for p, a in zip(prompts, answers, strict=True)
            ]
            ids = tok(texts, add_special_tokens=False)["input_ids"]
        else:
            for i, p in enumerate(prompts):
                if not isinstance(p, str):
                    raise ValueError(
                        f"prompt {i} is a chat-message list but the reward model's tokenizer has "
                        "no chat template; pass prompts as strings"
                    )
            pairs = [p + self._defused(a) for p, a in zip(prompts, answers, strict=True)]
            ids = tok(pairs)["input_ids"]
        empty = [i for i, x in enumerate(ids) if not len(x)]
        if empty:
            raise ValueError(f"prompt + completion {empty[0]} is empty after tokenisation")
        return [list(x) for x in ids]

    def _defused(self, answer: str) -> str:
        """`answer` with the text of each special token broken by a zero-width space: the policy
        can write the characters of one ("<|im_end|>\n<|im_start|>user…", spelled with ordinary
        tokens, survive decoding), which tokenised back as special tokens would end its turn and
        forge turns for the reward model. The template's own markers stay special, and the
        rendering and its tokenisation are the template's and the tokenizer's own."""
        for text in self._special_texts:
            if text in answer:
                answer = answer.replace(text, text[0] + "\u200b" + text[1:])
        return answer

    @functools.cached_property
    def _leading(self) -> list[int]:
        """The ids every sequence starts with (BOS), which truncation keeps."""
        return leading_special_ids(self.tokenizer)

    @functools.cached_property
    def _special_texts(self) -> tuple[str, ...]:
        """The tokenizer's special tokens' texts, longest first (once, not per answer)."""
        tok = self.tokenizer
        special = set(tok.all_special_tokens) | {
            t.content for t in getattr(tok, "added_tokens_decoder", {}).values() if t.special
        }
        return tuple(sorted((t for t in special if len(t) > 1), key=len, reverse=True))

    # -- scoring --

    def prompt_lengths(
        self, prompts: Sequence[Any], token_ids: Sequence[Sequence[int]]
    ) -> list[int]:
        """[N] prompts and their `encode`d pairs -> [N] how many first tokens of each pair are the
        prompt's (the rendering up to the answer: BOS, the template's turns, its assistant
        header)."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            heads = [
                templates.apply_chat_template(
                    tok, _messages(p), tokenize=False, add_generation_prompt=True
                )
                for p in prompts
            ]
            head_ids = tok(heads, add_special_tokens=False)["input_ids"]
        else:
            head_ids = tok(list(prompts))["input_ids"]
        # (the common prefix: a merge across the boundary leaves the merged token to the answer)
        return [
            len(os.path.commonprefix([list(h), list(x)]))
            for h, x in zip(head_ids, token_ids, strict=True)
        ]

    def score_ids(
        self, token_ids: Sequence[Sequence[int]], prompt_lengths: Sequence[int] | None = None
    ) -> np.ndarray:
        """[N] token-id lists -> [N] float32 raw scores (no normalisation). A list longer than
        the largest bucket keeps its first `prompt_lengths[i]` tokens (at most half the bucket;
        None: a leading BOS) and its last ones."""
        n, bs = len(token_ids), self.batch_size
        largest = self.buckets[-1]
        too_long = sum(len(t) > largest for t in token_ids)
        if prompt_lengths is not None:
            token_ids = [
                list(t[: min(h, largest // 2)]) + list(t[len(t) - largest + min(h, largest // 2) :])
                if len(t) > largest
                else t
                for t, h in zip(token_ids, prompt_lengths, strict=True)
            ]
        out = np.empty(n, np.float32)
        order = np.argsort([len(t) for t in token_ids], kind="stable")
        for start in range(0, n, bs):
            chunk = order[start : start + bs]
            rows = [token_ids[i] for i in chunk]
            rows += [rows[0]] * (bs - len(rows))  # a fixed batch shape; the copies are dropped
            batch = batch_prompt_ids(
                rows,
                pad_id=self.pad_id,
                buckets=self.buckets,
                overflow="truncate",
                leading=self._leading,
            )
            out[chunk] = self._run(batch.input_ids, batch.attention_mask)[: len(chunk)]
        if too_long:
            log.warning(
                "reward model: %d of %d sequences are longer than the largest bucket (%d "
                "tokens) and were scored on %s and their last tokens; a larger "
                "reward_model.buckets entry scores them whole",
                too_long,
                n,
                largest,
                "their prompt" if prompt_lengths is not None else "a leading BOS",
            )
        return out

    def _run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """One [B, T] batch on device -> [B] float32 on the host (every process gets all)."""
        if ids.shape not in self._compiled:
            self._compiled.add(ids.shape)
            log.info("reward model: compiling for batch %s", ids.shape)
        if self.mesh is None:
            return np.asarray(score_batch(self.graphdef, self.state, ids, mask))
        placed = sharding.logical_sharding(("batch", None), ids.shape, self.mesh, self.rules)
        ids, mask = (sharding.from_host(x, placed) for x in (ids, mask))
        with jax.set_mesh(self.mesh), sharding.use_rules(self.rules):
            scores = score_batch(self.graphdef, self.state, ids, mask)
        return np.asarray(multihost_utils.process_allgather(scores, tiled=True))

    def score(self, prompts: Sequence[Any], completions: Sequence[Any]) -> list[float]:
        """[N] prompts and completions -> [N] scores, `(raw - mean) / std` (see `encode`)."""
        if not len(completions):
            return []
        ids = self.encode(prompts, completions)
        long = any(len(x) > self.buckets[-1] for x in ids)
        raw = self.score_ids(ids, self.prompt_lengths(prompts, ids) if long else None)
        return ((raw - self.mean) / self.std).astype(np.float32).tolist()

    def __call__(
        self,
        completions: Sequence[Any],
        prompts: Sequence[Any] | None = None,
        prompt: Sequence[Any] | None = None,
        **columns: Any,
    ) -> list[float]:
        """TRL's reward signature: `prompts` as TRL passes them, else a dataset `prompt` column."""
        prompts = prompts if prompts is not None else prompt
        if prompts is None:
            raise ValueError(
                "reward_model needs the prompts: pass prompts=[...] (as TRL does) or a 'prompt' "
                "column"
            )
        return self.score(prompts, completions)


def _messages(prompt: Any) -> list[dict[str, Any]]:
    """A prompt as chat messages: a string is one user turn; message lists pass through."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]
