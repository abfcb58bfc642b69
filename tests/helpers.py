"""Tiny random Hugging Face checkpoints shared by the model, sampler and trainer tests.

Each family is built by transformers itself (`AutoModelForCausalLM.from_config`, seeded), saved as a
real checkpoint folder, and cached per test session, so r1jax is always compared with an independent
implementation of the same weights.
"""

import atexit
import functools
import os
import shutil
import tempfile

import numpy as np
import pytest

VOCAB = 96

FAMILIES = {
    # Qwen2 / Qwen2.5: q/k/v bias, tied embeddings, GQA.
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True),
    # Llama 3.1: llama3 rope scaling (a short original context so the scaling bites), untied, GQA.
    "llama3": dict(
        model_type="llama",
        tie_word_embeddings=False,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    # Qwen3: per-head q/k RMSNorm and an explicit head_dim that differs from hidden / heads.
    "qwen3": dict(model_type="qwen3", head_dim=24, tie_word_embeddings=True),
    # Mistral: a sliding window shorter than the test sequences, MQA.
    "mistral": dict(model_type="mistral", sliding_window=5, num_key_value_heads=1),
    # Llama with linear rope scaling and attention/MLP biases.
    "llama_linear": dict(
        model_type="llama",
        attention_bias=True,
        mlp_bias=True,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    ),
    # Llama with dynamic NTK scaling (max positions shorter than the test sequences).
    "llama_dynamic": dict(
        model_type="llama",
        max_position_embeddings=8,
        rope_scaling={"rope_type": "dynamic", "factor": 2.0},
    ),
    # Qwen2 with large random weights, so greedy decoding does not just repeat (sampler tests).
    "qwen2_sharp": dict(model_type="qwen2", tie_word_embeddings=True, initializer_range=0.3),
    # Qwen2 with YaRN scaling.
    "qwen2_yarn": dict(
        model_type="qwen2",
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    ),
}


def hf_config(family: str, **overrides):
    """A tiny transformers config of `family` (see FAMILIES)."""
    import transformers

    spec = dict(FAMILIES[family])
    model_type = spec.pop("model_type")
    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
    )
    base.update(spec)
    base.update(overrides)
    return transformers.AutoConfig.for_model(model_type, **base)


@functools.cache
def _scratch_root() -> str:
    """One folder per test process for the session's checkpoints, removed when the process exits
    (so repeated runs do not pile checkpoints up in the system's temp folder)."""
    root = tempfile.mkdtemp(prefix="r1jax_tests_")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


def scratch_dir(prefix: str) -> str:
    """A new empty folder under this test process's scratch root."""
    return tempfile.mkdtemp(prefix=prefix, dir=_scratch_root())


@functools.cache
def hf_checkpoint(family: str, seed: int = 0) -> str:
    """Path of a saved random transformers checkpoint of `family` (built once per session)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family)).eval()
    with torch.no_grad():  # (transformers starts biases at 0: Qwen2's q/k/v biases would be
        for name, p in model.named_parameters():  # untested against it, added before RoPE)
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    path = os.path.join(scratch_dir(f"{family}_"), "ckpt")
    model.save_pretrained(path)
    return path


@functools.cache
def torch_model(path: str):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def torch_logits(path: str, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """transformers' float32 logits [B, T, V] with positions counted over real tokens only."""
    import torch

    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        out = torch_model(path)(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions),
        )
    return out.logits.float().numpy()


def left_padded_batch(seed: int = 0, batch: int = 3, length: int = 12, pads=(0, 3, 7)):
    """Random token ids [B, T] and a mask [B, T] with `pads[i]` left pads on row i."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, VOCAB, size=(batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    for i, p in enumerate(pads[:batch]):
        mask[i, :p] = 0
        ids[i, :p] = 0
    return ids, mask


def random_blocks(shape: tuple[int, ...], rng: np.random.Generator, count: int = 3):
    """`count` random non-empty blocks of an array of `shape`, as tuples of slices."""
    for _ in range(count):
        index = []
        for n in shape:
            a = int(rng.integers(0, n))
            index.append(slice(a, int(rng.integers(a + 1, n + 1))))
        yield tuple(index)


def load_counting_reads(monkeypatch, path: str, mesh):
    """`hf.load(path, mesh=mesh)` and the (tensor name, values read) of every file read it made."""
    from r1jax.models import hf

    read = []
    get = hf._WeightFiles.get

    def counting(self, name, index=None):
        out = get(self, name, index)
        read.append((name, out.size))
        return out

    monkeypatch.setattr(hf._WeightFiles, "get", counting)
    return hf.load(path, mesh=mesh), read


def assert_a_stored_head_must_equal_the_embedding(path: str) -> None:
    """A checkpoint folder of a tied config loads with an lm_head.weight equal to its embedding
    (as some exports write it) and is refused with a different one (transformers keeps that one
    untied: another model). The folder's weights are rewritten."""
    from safetensors.numpy import load_file, save_file

    from r1jax.models import hf

    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    save_file(tensors, file, metadata={"format": "pt"})
    hf.load(path)
    tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1.0
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(hf.CheckpointError, match="set tie_word_embeddings to false"):
        hf.load(path)
