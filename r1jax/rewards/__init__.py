"""Rewards for R1-style RL: rule-based scoring on the host, TRL's reward signature throughout.

Every reward is ``fn(completions, **columns) -> list[float | None]`` (completions as strings or
chat-message lists; extra columns ignored; ``None`` = not applicable to that row), so TRL and
open-r1 reward functions drop in, and these drop into TRL.

- ``accuracy_reward`` (math, via math-verify), ``task_reward`` (built-in synthetic tasks)
- ``format_reward``, ``tag_count_reward``
- ``language_consistency_reward`` (R1 stage 2)
- ``code_reward`` (tests run in a bubblewrap sandbox, ``sandbox.py``)
- shaping, off unless listed: ``cosine_scaled_reward``, ``repetition_penalty_reward``,
  ``overlong_penalty_reward``
- composition: ``build_reward_fn(specs)`` -> weighted total + per-reward values, scored in a
  process pool; ``HostRewardBridge`` calls it from inside ``jax.jit``.
- the learned reward model (R1's last RL stage): ``r1jax.rewards.reward_model.RewardModel``, a
  decoder with a scalar head scored on device. Import it from its module: it pulls in JAX, which
  this package (preloaded by the reward workers' fork server) deliberately does not.
"""

from r1jax.rewards.accuracy import accuracy_reward, answers_match, extract_answer
from r1jax.rewards.code import code_reward, extract_code, outputs_match
from r1jax.rewards.compose import (
    REWARDS,
    HostRewardBridge,
    RewardFunction,
    RewardOutput,
    RewardSpec,
    build_reward_fn,
    parse_spec,
    register_reward,
)
from r1jax.rewards.format import format_reward, tag_count_reward
from r1jax.rewards.language import language_consistency_reward
from r1jax.rewards.sandbox import (
    RunResult,
    SandboxConfig,
    SandboxUnavailableError,
    run_python,
    sandbox_available,
)
from r1jax.rewards.shaping import (
    cosine_scaled_reward,
    overlong_penalty_reward,
    repetition_penalty_reward,
)
from r1jax.rewards.task import task_reward

__all__ = [
    "REWARDS",
    "HostRewardBridge",
    "RewardFunction",
    "RewardOutput",
    "RewardSpec",
    "RunResult",
    "SandboxConfig",
    "SandboxUnavailableError",
    "accuracy_reward",
    "answers_match",
    "build_reward_fn",
    "code_reward",
    "cosine_scaled_reward",
    "extract_answer",
    "extract_code",
    "format_reward",
    "language_consistency_reward",
    "outputs_match",
    "overlong_penalty_reward",
    "parse_spec",
    "register_reward",
    "repetition_penalty_reward",
    "run_python",
    "sandbox_available",
    "tag_count_reward",
    "task_reward",
]
