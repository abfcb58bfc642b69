"""Workload A (sampling): r1jax `sampling.generate` against transformers `generate`, same weights.

WORKLOAD.md, A: 16 prompts x 32 random token ids, exactly 128 new tokens each, temperature 1.0,
KV cache. The figure is generated tokens per second, median of `repeats` runs after one warm-up
run; the first r1jax call (tracing + XLA compilation + one run) is reported separately as
`compile_s` (first-call time minus the steady-state median).

Identical models: the checkpoint is built by transformers itself (`Qwen2Config` from the WORKLOAD.md
table, `torch.manual_seed(0)`, `AutoModelForCausalLM.from_config`), saved, and loaded into r1jax
with `r1jax.models.hf.load`; one forward of both on the prompts is compared before timing, so a
weight-mapping error cannot produce a flattering number.

Fairness choices, both sides:
- transformers gets `torch.set_num_threads(2)` (this machine's cores), `use_cache=True`,
  `do_sample=True`, `min_new_tokens=max_new_tokens=128`, and explicit `temperature=1.0, top_k=0,
  top_p=1.0` (its generation defaults would otherwise add a top-50 filter that r1jax does not do);
- r1jax goes through the public host API (`sampling.generate`: host batching, device call, and
  fetching tokens and log-probs back to numpy), not the bare jitted function;
- runs alternate r1jax / transformers, so both see the same machine load; the ratio is reported
  both as a ratio of medians and as the median of per-pair ratios.

Prefill throughput (prompt tokens per second) is measured the same way with max_new_tokens=1
(prefill plus one sampled token on both sides).

    python bench/bench_sampling.py [--sizes tiny,small] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

# Run from a checkout: import this tree's r1jax (and `bench`), not another installed copy.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# WORKLOAD.md model table (Qwen2 architecture, float32, tied embeddings).
MODELS = {
    "tiny": dict(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
    ),
    "small": dict(
        vocab_size=2048,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
    ),
}
COMMON = dict(
    max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=True, rms_norm_eps=1e-6
)

NUM_PROMPTS, PROMPT_LEN, NEW_TOKENS = 16, 32, 128
# torch's threads: the CPUs this process may use, which is what XLA:CPU sizes its pool by (a
# fixed 2 under `taskset -c 0` would put torch's two threads on one core, flattering the ratio).
TORCH_THREADS = len(os.sched_getaffinity(0))


def build_checkpoint(size: str, directory: str) -> str:
    """Save the WORKLOAD.md model `size` (random init, seed 0) as an HF folder; return its path."""
    import torch
    import transformers

    path = os.path.join(directory, f"qwen2_{size}")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    config = transformers.Qwen2Config(**MODELS[size], **COMMON)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    return path


def make_prompts(vocab_size: int, seed: int = 0) -> np.ndarray:
    """[16, 32] int32 random token ids in [1, vocab) (0 is left for padding)."""
    return (
        np.random.RandomState(seed)
        .randint(1, vocab_size, size=(NUM_PROMPTS, PROMPT_LEN), dtype=np.int64)
        .astype(np.int32)
    )


class Pair:
    """The same checkpoint loaded in r1jax and transformers, with one timed call each."""

    def __init__(self, path: str):
        import torch
        import transformers

        from r1jax.models import hf

        torch.set_num_threads(TORCH_THREADS)
        self.torch = torch
        self.ours = hf.load(path)
        self.theirs = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
        self.vocab = self.ours.cfg.vocab_size
        self.prompts = make_prompts(self.vocab)
        self.params = self.ours.cfg.num_params

    def check_same_model(self, atol: float = 1e-3) -> float:
        """Max |logit difference| of one forward on the prompts; raises if the models differ."""
        import jax.numpy as jnp

        ours = np.asarray(self.ours(jnp.asarray(self.prompts)))
        with self.torch.no_grad():
            theirs = self.theirs(self.torch.as_tensor(self.prompts, dtype=self.torch.long)).logits
        diff = float(np.max(np.abs(ours - theirs.numpy())))
        if diff > atol:
            raise RuntimeError(
                f"r1jax and transformers disagree on the same checkpoint (max "
                f"|logit diff| {diff:.2e}); the comparison would be meaningless"
            )
        return diff

    def run_ours(self, new_tokens: int, seed: int) -> float:
        """Wall seconds of one `sampling.generate` call, tokens fetched to the host."""
        from r1jax import sampling

        t0 = time.perf_counter()
        out = sampling.generate(
            self.ours,
            self.prompts,
            max_new_tokens=new_tokens,
            temperature=1.0,
            seed=seed,
            buckets=(PROMPT_LEN,),
        )
        elapsed = time.perf_counter() - t0
        if sum(map(len, out.tokens)) != NUM_PROMPTS * new_tokens:
            raise RuntimeError("r1jax produced fewer tokens than asked (no stop tokens were set)")
        return elapsed

    def run_theirs(self, new_tokens: int, seed: int) -> float:
        """Wall seconds of one transformers `generate` call."""
        torch = self.torch
        ids = torch.as_tensor(self.prompts, dtype=torch.long)
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.theirs.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                use_cache=True,
                pad_token_id=0,
            )
        elapsed = time.perf_counter() - t0
        if out.shape[1] != PROMPT_LEN + new_tokens:
            raise RuntimeError(
                f"transformers generated {out.shape[1] - PROMPT_LEN} tokens, not {new_tokens}"
            )
        return elapsed


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "median": float(np.median(values)),
        "min": float(min(values)),
        "max": float(max(values)),
    }


def _interleaved(pair: Pair, new_tokens: int, repeats: int, tokens_per_run: int) -> dict:
    """Alternate r1jax / transformers runs; throughput stats in tokens/s for each side."""
    t0 = time.perf_counter()
    pair.run_ours(new_tokens, seed=0)
    first_call = time.perf_counter() - t0
    pair.run_theirs(new_tokens, seed=0)  # warm-up
    ours, theirs = [], []
    for i in range(repeats):
        ours.append(pair.run_ours(new_tokens, seed=i + 1))
        theirs.append(pair.run_theirs(new_tokens, seed=i + 1))
    pairwise = [b / a for a, b in zip(ours, theirs, strict=True)]  # time ratio = speed ratio
    ours_tps = [tokens_per_run / t for t in ours]
    theirs_tps = [tokens_per_run / t for t in theirs]
    return {
        "r1jax_tok_s": _stats(ours_tps),
        "transformers_tok_s": _stats(theirs_tps),
        "ratio_of_medians": float(np.median(ours_tps) / np.median(theirs_tps)),
        "ratio_pairwise_median": float(np.median(pairwise)),
        "r1jax_compile_s": float(first_call - np.median(ours)),
        "r1jax_run_s": _stats(ours),
        "transformers_run_s": _stats(theirs),
    }


def run(
    sizes=("tiny", "small"), repeats: int = 3, workdir: str | None = None, prefill: bool = True
) -> list[dict]:
    """Workload A for each model size: one result row per (size, phase) with stats and ratios."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            pair = Pair(build_checkpoint(size, workdir or tmp))
            diff = pair.check_same_model()
            row = {
                "workload": "A",
                "model": size,
                "torch_threads": TORCH_THREADS,
                "params": pair.params,
                "phase": "decode",
                "max_logit_diff": diff,
                **_interleaved(pair, NEW_TOKENS, repeats, NUM_PROMPTS * NEW_TOKENS),
            }
            rows.append(row)
            if prefill:
                rows.append(
                    {
                        "workload": "A",
                        "model": size,
                        "params": pair.params,
                        "phase": "prefill",
                        "unit": "prompt tokens/s (prefill + 1 token)",
                        **_interleaved(pair, 1, repeats, NUM_PROMPTS * PROMPT_LEN),
                    }
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,small")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = run(tuple(args.sizes.split(",")), args.repeats)
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
