"""The training state and the generic jitted update: optimizer, gradient accumulation, sharding.

`grpo.update`, `sft.train_step` and `sft.distill_step` are each a small loss function handed to
the machinery here. This module owns:

- `OptimConfig`: AdamW with linear warmup and a constant or cosine schedule, global-norm
  clipping, weight decay (HF/TRL names and defaults where they have them);
- `Optimizer`: `nnx.Optimizer` built from an `OptimConfig` whose `apply_gradients` clips,
  updates, and *skips* an update whose gradients are not finite (counted in `skipped`);
- `TrainState`: a model, its optimizer and the mesh they live on; `run_step` compiles a step
  function once (explicit in/out shardings, state donated) and runs it;
- `accumulate_gradients`: gradients summed over micro-batches with `lax.scan` (optionally with a
  part computed once for the whole batch, e.g. GRPO's prompt forward, whose gradient is pulled
  back once), and `repeat`, several optimizer steps on one batch (GRPO's μ iterations) without
  unrolling them;
- `hidden_states` / `cached_hidden_states` / `router_step`: what a loss and a step do differently
  for a mixture-of-experts
  model (DeepSeek-V3): the forward also returns its routing counts, and after each optimizer
  step the router metrics are reported and the load-balancing bias is updated. For dense models
  both are exactly the plain forward and nothing.

Notable choices:
- Steps follow Flax's "jax.jit over nnx.split" pattern: the jitted function is pure in
  `(state arrays, batch)`; `run_step` reads the arrays from the live objects' Variables (listed
  once), calls it with them *donated* (so the new parameters and moments reuse the old buffers)
  and writes the results back into the same Variables. Arrays fetched from the model before a
  step are therefore invalid after it.
- Shardings are explicit: state in and out in the layout its logical axis names declare under the
  rules (FSDP + tensor parallel by default), batch arrays split over the batch axes on their first
  dimension, metrics replicated. The optimizer moments inherit their parameter's logical names
  (`nnx.Optimizer` copies the metadata), so they are sharded exactly like the parameters.
- Micro-batch j takes rows j, j + k, j + 2k, ... of the batch (a strided split): each device's
  contiguous block of rows holds an equal share of every micro-batch, so splitting moves no data.
- A non-finite gradient norm (NaN or inf anywhere) leaves parameters *and* optimizer state as
  they were, does not advance the schedule, and increments `Optimizer.skipped`; the step reports
  it. Gradients are accumulated in float32 whatever the parameter dtype.
- Mixed precision needs nothing here: a model built with `param_dtype="float32", dtype="bfloat16"`
  keeps float32 master weights (and float32 AdamW moments) and casts them to bfloat16 for the
  matmuls; gradients arrive in float32. A weight's gradient is the transpose of its bfloat16
  cast, so on a mesh its sum over the batch shards (the reduce-scatter of each micro-batch) runs
  in bfloat16 before the float32 accumulation over micro-batches: half the gradient traffic,
  with bfloat16 rounding in each sum over shards.
- Weight decay applies to matrices only (ndim >= 2), not to norm scales and biases, as HF does.
- The learning rate starts at 0 when there is warmup (HF's schedules do the same), so numbers
  carry over from TRL runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from r1jax import sharding
from r1jax.models import deepseek

log = logging.getLogger(__name__)

SCHEDULES = ("constant", "cosine")


# --------------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with warmup and a learning-rate schedule. Frozen, hashable (a static jit argument).

    learning_rate: peak learning rate (TRL's GRPO default is 1e-6; tiny models want ~1e-3).
    schedule:      "constant" (after warmup) or "cosine" (decays to 0 at `total_steps`).
    warmup_steps:  linear warmup from 0 over this many optimizer steps.
    total_steps:   optimizer steps in the run; required by "cosine".
    weight_decay:  decoupled weight decay on matrices (not on norms and biases).
    b1, b2, eps:   Adam's moment decays and epsilon (HF: adam_beta1/2, adam_epsilon).
    max_grad_norm: clip the global gradient norm to this (HF's max_grad_norm); 0 disables.
    max_skipped_steps: the stages stop (`Diverged`) after this many steps in a row whose update
                   was skipped for non-finite gradients (`SkipWatch`); 0 never stops.
    """

    learning_rate: float = 1e-6
    schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    max_skipped_steps: int = 10

    def __post_init__(self):
        if not 0 < self.learning_rate < float("inf"):
            raise ValueError(
                f"optim.learning_rate must be a finite number > 0, got {self.learning_rate}"
            )
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.schedule == "cosine" and self.total_steps <= self.warmup_steps:
            raise ValueError(
                f"optim.schedule='cosine' needs total_steps > warmup_steps, got total_steps="
                f"{self.total_steps}, warmup_steps={self.warmup_steps}; set optim.total_steps "
                "to the number of optimizer steps in the run"
            )
        if not (0 <= self.weight_decay < float("inf") and 0 <= self.max_grad_norm < float("inf")):
            raise ValueError(
                "optim.weight_decay and optim.max_grad_norm must be finite numbers >= 0, got "
                f"{self.weight_decay} and {self.max_grad_norm}"
            )
        if self.max_skipped_steps < 0:
            raise ValueError(
                "optim.max_skipped_steps must be >= 0 (0 = never stop), got "
                f"{self.max_skipped_steps}"
            )
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1 and 0 < self.eps < float("inf")):
            raise ValueError(
                f"optim: need 0 <= b1, b2 < 1 and a finite eps > 0, got b1={self.b1}, "
                f"b2={self.b2}, eps={self.eps}"
            )


def learning_rate_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Optimizer step (int) -> learning rate: linear warmup from 0, then constant or cosine to 0."""
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, cfg.learning_rate, cfg.warmup_steps, cfg.total_steps, end_value=0.0
        )
    if cfg.warmup_steps == 0:
        return optax.constant_schedule(cfg.learning_rate)
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps),
            optax.constant_schedule(cfg.learning_rate),
        ],
        [cfg.warmup_steps],
    )


def _decayed(params) -> Any:
    """Weight decay's mask: matrices only. Norm scales are vectors; biases (named `*_bias`) are
    not decayed either, although attention's q/k/v biases are [heads, head_dim]."""

    def matrix(path, p) -> bool:
        last = path[-1] if path else None
        name = str(getattr(last, "key", getattr(last, "name", last)))
        return p.ndim >= 2 and not name.endswith("bias")

    return jax.tree_util.tree_map_with_path(matrix, params)


@functools.cache
def make_tx(cfg: OptimConfig) -> optax.GradientTransformation:
    """Global-norm clipping (when enabled) followed by AdamW on `learning_rate_schedule(cfg)`.

    Cached: equal configs give the *same* transformation, hence equal optimizer graph
    definitions, so two train states of one shape share their compiled steps.
    """
    adamw = optax.adamw(
        learning_rate_schedule(cfg),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=_decayed,
    )
    if cfg.max_grad_norm == 0:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw)


class Diverged(RuntimeError):
    """A run stopped by `SkipWatch`: its updates kept being skipped for non-finite gradients."""


class SkipWatch:
    """Stops a training loop whose updates keep being skipped for non-finite gradients (a
    learning rate too high, a diverged model, data the loss cannot take): such a run would
    otherwise go on to its last step without learning anything.

    The model that gives non-finite gradients usually came out of the last update applied before
    the streak (one too large a step), so every checkpoint from that step on holds it and a
    resume cannot recover; the message says so. While a streak lasts the stages save no
    interval checkpoints (`skipping`): those would hold the same model and could push older
    ones out of `ckpt.keep`."""

    def __init__(self, limit: int, learning_rate_field: str = "optim.learning_rate"):
        self.limit = limit  # OptimConfig.max_skipped_steps; 0 = never stop
        self.learning_rate_field = learning_rate_field  # named in the message
        self.in_a_row = 0
        self.last_applied: int | None = None  # the last step whose update was applied

    @property
    def skipping(self) -> bool:
        """Whether the last step's update was skipped."""
        return self.in_a_row > 0

    def record(self) -> dict[str, Any]:
        """The streak, for a checkpoint's `extra` (a stop mid-streak saves the step it is on)."""
        return {"in_a_row": self.in_a_row, "last_applied": self.last_applied}

    def resume(self, saved: dict[str, Any] | None) -> None:
        """Carry on the streak a checkpoint recorded (`record`; None: one saved before the
        streak was recorded, which starts from 0): a run stopped and resumed in the middle of a
        streak would otherwise need `limit` more skipped steps to stop."""
        if saved:
            self.in_a_row, self.last_applied = int(saved["in_a_row"]), saved["last_applied"]

    def __call__(self, step: int, metrics: dict[str, Any]) -> None:
        """After step `step` (1-based), given its metrics on the host (`update_skipped`: the
        share of its updates skipped). Every process sees the same metrics, so all stop
        together. Raises Diverged at the limit."""
        if float(metrics.get("update_skipped", 0.0)) < 1.0:
            self.in_a_row, self.last_applied = 0, step
            return
        self.in_a_row += 1
        log.warning(
            "step %d: update skipped, its gradients are not finite (%d in a row)",
            step,
            self.in_a_row,
        )
        if not (self.limit and self.in_a_row >= self.limit):
            return
        first = step - self.in_a_row + 1
        if self.last_applied is None:
            cause = (
                "the model this run started (or resumed) from gives non-finite gradients: check "
                "the model and the data, or resume from an earlier checkpoint"
            )
        else:
            cause = (
                f"the update of step {self.last_applied} left a model whose gradients overflow, "
                f"and checkpoints from step {self.last_applied} on hold it, so resuming from them "
                f"cannot recover: start the stage again with a lower {self.learning_rate_field}, "
                f"in a new workdir or after deleting its checkpoints from step "
                f"{self.last_applied} on (it resumes from the latest one left)"
            )
        raise Diverged(
            f"steps {first}-{step}: {self.in_a_row} updates in a row skipped because their "
            f"gradients were not finite; {cause} (optim.max_skipped_steps=0 never stops)"
        )


class Optimizer(nnx.Optimizer):
    """`nnx.Optimizer` over the model's `nnx.Param`s, configured by an `OptimConfig`.

    Attributes beyond nnx.Optimizer's (`step`, `opt_state`, `tx`):
      cfg:     the OptimConfig (static).
      skipped: [] int32 OptState, number of updates skipped for non-finite gradients.
    `step` counts *applied* updates only, so it is also the schedule's position.
    """

    def __init__(self, model: nnx.Module, cfg: OptimConfig):
        super().__init__(model, make_tx(cfg), wrt=nnx.Param)
        # Adam's moments in float32 whatever the weights' dtype (optax keeps them in the
        # parameters'): in bfloat16, 0.999 x v rounds back to v, and the second moment of a
        # gradient spike never decays.
        for v in jax.tree.leaves(self.opt_state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
            value = v.get_raw_value()
            if jnp.issubdtype(value.dtype, jnp.floating):
                v.set_raw_value(value.astype(jnp.float32))
        self.cfg = cfg
        self.skipped = nnx.OptState(jnp.zeros((), jnp.int32))

    def apply_gradients(self, model: nnx.Module, grads: nnx.State) -> dict[str, jax.Array]:
        """One AdamW update of `model` in place, skipped entirely if any gradient is not finite.

        Args:
          model: the module whose `nnx.Param`s `grads` belong to.
          grads: nnx.State of gradients with the structure of `nnx.state(model, nnx.Param)`.
        Returns:
          float32 scalars: `grad_norm` (global norm before clipping), `learning_rate` (the rate
          this update used), `update_skipped` (1.0 if it was skipped).
        """
        params = nnx.as_pure(nnx.state(model, self.wrt))
        grads = nnx.as_pure(grads)
        old_opt_state = nnx.as_pure(self.opt_state)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(grad_norm)
        updates, new_opt_state = self.tx.update(grads, old_opt_state, params)
        new_params = optax.apply_updates(params, updates)
        # A select, not a cond: both branches are cheap elementwise work and XLA fuses them. The
        # cast keeps every state dtype fixed (float32 gradients would promote bfloat16 moments),
        # so the next call finds the same compiled program.
        keep = lambda new, old: jnp.where(finite, new, old).astype(old.dtype)
        nnx.update(model, jax.tree.map(keep, new_params, params))
        nnx.update(self.opt_state, nnx.state(jax.tree.map(keep, new_opt_state, old_opt_state)))
        learning_rate = learning_rate_schedule(self.cfg)(self.step[...].astype(jnp.int32))
        self.step[...] += finite.astype(self.step[...].dtype)
        self.skipped[...] += (~finite).astype(jnp.int32)
        return {
            "grad_norm": grad_norm.astype(jnp.float32),
            "learning_rate": jnp.asarray(learning_rate, jnp.float32),
            "update_skipped": (~finite).astype(jnp.float32),
        }


# --------------------------------------------------------------------------------------------------
# Gradient accumulation and repeated steps (called inside jit)
# --------------------------------------------------------------------------------------------------


def split_micro_batches(batch: Any, num_micro_batches: int) -> Any:
    """A tree of [B, ...] arrays -> the same tree of [k, B / k, ...]; micro-batch j = rows j::k."""

    def one(x):
        b = x.shape[0]
        if b % num_micro_batches:
            raise ValueError(
                f"a batch of {b} rows cannot be split into {num_micro_batches} "
                "equal micro-batches; make the batch a multiple of num_micro_batches"
            )
        x = x.reshape(b // num_micro_batches, num_micro_batches, *x.shape[1:]).swapaxes(0, 1)
        return sharding.constrain(x, (None, "batch") + (None,) * (x.ndim - 2))

    return jax.tree.map(one, batch)


def merge_micro_batches(x: jax.Array) -> jax.Array:
    """Inverse of `split_micro_batches` for one array: [k, B / k, ...] -> [B, ...]."""
    x = x.swapaxes(0, 1)
    x = x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
    return sharding.constrain(x, ("batch",) + (None,) * (x.ndim - 1))


def accumulate_gradients(
    loss_fn: Callable[..., tuple[jax.Array, dict[str, jax.Array]]],
    model: nnx.Module,
    batch: Any,
    num_micro_batches: int,
    *,
    sum_micro_batches: bool = False,
    shared: Callable[[nnx.Module], tuple[Any, Any]] | None = None,
) -> tuple[jax.Array, nnx.State, dict[str, jax.Array]]:
    """Loss and float32 gradients of `loss_fn` over `batch`, one micro-batch at a time.

    Args:
      loss_fn: `(model, micro_batch) -> (scalar loss, metrics of scalars)`; with `shared`,
        `(model, micro_batch, shared_values) -> ...`.
      model: the module; gradients are taken w.r.t. its `nnx.Param`s (it is not modified).
      batch: tree of [B, ...] arrays; B must divide by `num_micro_batches`.
      num_micro_batches: k; memory holds one micro-batch's activations at a time.
      sum_micro_batches: False: loss and gradients are the *mean* over micro-batches (right when
        each micro-batch loss is itself a mean). True: their *sum* (right when each micro-batch
        loss is already divided by a whole-batch count, e.g. `num_items_in_batch`).
      shared: optional `model -> (differentiable tree, aux tree)`, computed once for the whole
        batch and handed to every micro-batch's `loss_fn` as the pair (e.g. GRPO's prompt
        forward, whose KV cache all the completions of a prompt attend to). Gradients flow
        through the differentiable part: its cotangents are summed over the micro-batches and
        pulled back through `shared` once; `aux` (integers, statistics) carries none. Its
        activations are held until the last micro-batch is done (beside one micro-batch's).
    Returns:
      (loss, grads, metrics): grads an nnx.State like `nnx.state(model, nnx.Param)` (float32),
      metrics the mean over micro-batches of `loss_fn`'s metrics.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if shared is None:
        values = aux = pullback = None
    else:
        values, pullback, aux = jax.vjp(
            lambda p: shared(nnx.merge(graphdef, p, rest)), params, has_aux=True
        )

    def micro_step(carry, micro):
        grad_sum, cotangent_sum = carry

        def loss_of(p, v):
            args = () if shared is None else ((v, aux),)
            return loss_fn(nnx.merge(graphdef, p, rest), micro, *args)

        (loss, metrics), (grads, cotangents) = jax.value_and_grad(
            loss_of, argnums=(0, 1), has_aux=True
        )(params, values)
        add = lambda a, g: a + g.astype(jnp.float32)  # noqa: E731
        carry = jax.tree.map(add, grad_sum, grads), jax.tree.map(add, cotangent_sum, cotangents)
        return carry, (loss, metrics)

    zeros = jax.tree.map(_zeros_like_param, params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    cotangent_zeros = jax.tree.map(lambda v: jnp.zeros(v.shape, jnp.float32), values)
    micro_batches = split_micro_batches(batch, num_micro_batches)
    (grads, cotangents), (losses, metrics) = jax.lax.scan(
        micro_step, (zeros, cotangent_zeros), micro_batches
    )
    if shared is not None:  # the shared forward's share of the gradient, pulled back once
        cotangents = jax.tree.map(lambda c, v: c.astype(v.dtype), cotangents, values)
        (shared_grads,) = pullback(cotangents)
        grads = jax.tree.map(lambda g, s: g + s.astype(jnp.float32), grads, shared_grads)
    scale = 1.0 if sum_micro_batches else 1.0 / num_micro_batches
    grads = jax.tree.map(lambda g: g * scale, grads)
    metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
    return jnp.sum(losses) * scale, grads, metrics


def _zeros_like_param(p: nnx.Variable) -> nnx.Variable:
    """float32 zeros laid out like the parameter (so accumulators are sharded like FSDP weights)."""
    names = p.get_metadata().get("out_sharding")
    zeros = jnp.zeros(p.shape, jnp.float32)
    return p.replace(sharding.constrain(zeros, names) if names else zeros)


def repeat(
    step_fn: Callable[..., dict[str, jax.Array]],
    model: nnx.Module,
    optimizer: Optimizer,
    num_steps: int,
    batches: Any = None,
) -> dict[str, jax.Array]:
    """Run `step_fn(model, optimizer) -> metrics` `num_steps` times in a `lax.scan` (one compiled
    body, not `num_steps` copies; a plain call when `num_steps == 1`); model and optimizer are
    updated in place. With `batches` (a tree of [num_steps, ...] arrays) step i is
    `step_fn(model, optimizer, batch i)`. Returns the metrics averaged over the steps."""
    if num_steps == 1 and batches is None:
        return step_fn(model, optimizer)
    graphdef, state = nnx.split((model, optimizer))

    def body(state, batch):
        m, o = nnx.merge(graphdef, state)
        metrics = step_fn(m, o) if batches is None else step_fn(m, o, batch)
        return nnx.state((m, o)), metrics

    state, metrics = jax.lax.scan(body, state, xs=batches, length=num_steps)
    nnx.update((model, optimizer), state)
    return jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)


# --------------------------------------------------------------------------------------------------
# Mixture-of-experts models: routing counts from the forward, bias update after the step
# --------------------------------------------------------------------------------------------------


def hidden_states(
    model: nnx.Module, input_ids: jax.Array, attention_mask: jax.Array | None = None, **kwargs
) -> tuple[jax.Array, deepseek.RouterStats | None]:
    """`model.hidden_states` for a loss: (final hidden [B, T, D], routing counts or None).

    A DeepSeek model's forward also returns a `RouterStats` of the batch (same pass, no extra
    work); a loss puts it in its metrics under "router" and the step hands it to `router_step`.
    Dense models return None. `kwargs` as `hidden_states` (positions, segment_ids).
    """
    if isinstance(model, deepseek.DeepseekDecoder):
        hidden, _, stats = model.hidden_states_with_router(input_ids, attention_mask, **kwargs)
        return hidden, stats
    return model.hidden_states(input_ids, attention_mask, **kwargs)[0], None


def cached_hidden_states(
    model: nnx.Module, input_ids: jax.Array, attention_mask: jax.Array, cache: Any
) -> tuple[jax.Array, Any, deepseek.RouterStats | None]:
    """`hidden_states` through a KV cache (e.g. prompts, then completions attending to them as a
    prefix): (final hidden [B, T, D], the updated cache, routing counts or None)."""
    if isinstance(model, deepseek.DeepseekDecoder):
        return model.hidden_states_with_router(input_ids, attention_mask, cache=cache)
    hidden, cache = model.hidden_states(input_ids, attention_mask, cache=cache)
    return hidden, cache, None


def router_step(
    model: nnx.Module, stats: deepseek.RouterStats | None, skipped: jax.Array
) -> dict[str, jax.Array]:
    """After an optimizer step: the router metrics of the step's batch, and the auxiliary-loss-free
    bias update when the model's `router_bias_rate` > 0 (`deepseek.router_step`), none when the
    step was `skipped` ([] bool). {} for dense models (stats None)."""
    return {} if stats is None else deepseek.router_step(model, stats, skipped)


# --------------------------------------------------------------------------------------------------
# The train state and its compiled steps
# --------------------------------------------------------------------------------------------------

_PROGRAMS: dict[Any, Any] = {}  # see TrainState.program


class TrainState:
    """A model, its optimizer, the mesh and rules that lay them out, and their compiled steps.

    Create with `TrainState.create(model, optim_cfg, mesh)`. `model` and `optimizer` are live NNX
    objects (what `checkpoint.Checkpointer.save/restore` take); `run_step` replaces their arrays.
    Their structure is fixed at creation, as the compiled steps are: values may be replaced in
    place (`nnx.update`, a checkpoint restore), Variables must not be added or swapped.
    """

    def __init__(self, model: nnx.Module, optimizer: Optimizer, mesh: Mesh, rules=None):
        self.model = model
        self.optimizer = optimizer
        self.mesh = mesh
        self.rules = tuple(rules if rules is not None else sharding.RULES)
        self.graphdef, state = nnx.split((model, optimizer))
        self.shardings = sharding.state_shardings(state, mesh, self.rules)
        # Steps read and write the arrays through the state's Variables, listed once in leaf
        # order: walking the object graph to split and update it cost ~10 ms of Python per step
        # (bench/NOTES.md, U2), on the cores the step computes on.
        # (nnx.split's state holds the live Variables themselves; they flatten to their arrays.)
        self._variables = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
        self._state_def = jax.tree.structure(state)
        if len(self._variables) != self._state_def.num_leaves or not all(
            isinstance(v, nnx.Variable) for v in self._variables
        ):
            raise ValueError(
                "TrainState needs every array of the model and optimizer in an nnx.Variable "
                "holding one array (found arrays outside Variables, or empty Variables)"
            )
        # The model's own split (what sampling takes), from the same Variables: its state is the
        # pair's first entry, whose leaves lead the pair's leaf order.
        self.model_graphdef = nnx.graphdef(model)
        self._model_state_def = jax.tree.structure(state[0])
        if self._model_state_def != jax.tree.structure(nnx.state(model)):
            raise ValueError("TrainState: the optimizer must not hold Variables of the model")
        self._programs: dict[Any, Any] = {}

    @classmethod
    def create(
        cls, model: nnx.Module, cfg: OptimConfig, mesh: Mesh | None = None, rules=None
    ) -> TrainState:
        """Place `model` on `mesh` (in place; a no-op if already there) and build its optimizer
        with every moment born in its parameter's sharding.

        Args:
          model: e.g. `hf.load(path, mesh, param_dtype="float32", dtype="bfloat16")`.
          cfg: the optimizer configuration.
          mesh: default: one device (the same code path, no parallelism).
          rules: logical-axis rules (default `sharding.RULES`: FSDP + tensor parallel).
        """
        mesh = mesh if mesh is not None else sharding.single_device_mesh()
        sharding.check_mesh(mesh)  # (an Explicit one failed at the first step's constraint)
        rules = tuple(rules if rules is not None else sharding.RULES)
        model_graphdef, model_state = nnx.split(model)
        nnx.update(
            model, jax.device_put(model_state, sharding.state_shardings(model_state, mesh, rules))
        )
        model_state = nnx.state(model)

        with nnx.use_eager_sharding(False):
            abstract = nnx.eval_shape(lambda m: Optimizer(m, cfg), model)
        opt_graphdef, abstract_state = nnx.split(abstract)
        opt_shardings = sharding.state_shardings(abstract_state, mesh, rules)

        def init(state):
            with nnx.use_eager_sharding(False):
                return nnx.state(Optimizer(nnx.merge(model_graphdef, state), cfg))

        opt_state = jax.jit(init, out_shardings=opt_shardings)(model_state)
        return cls(model, nnx.merge(opt_graphdef, opt_state), mesh, rules)

    # -- state --

    def state(self) -> nnx.State:
        """nnx.State of (model, optimizer): the current arrays, in the state's structure."""
        return jax.tree.unflatten(self._state_def, self.state_leaves())

    def state_leaves(self) -> list[jax.Array]:
        """The state's arrays in leaf order (what a compiled step takes and returns)."""
        return [v.get_raw_value() for v in self._variables]

    def model_state(self) -> nnx.State:
        """nnx.State of the model alone (`nnx.split(model)[1]`, without walking the model)."""
        n = self._model_state_def.num_leaves
        return jax.tree.unflatten(
            self._model_state_def, [v.get_raw_value() for v in self._variables[:n]]
        )

    @contextlib.contextmanager
    def mesh_context(self) -> Iterator[None]:
        """The mesh and rules under which this state's programs are traced and run."""
        with jax.set_mesh(self.mesh), sharding.use_rules(self.rules):
            yield

    def batch_sharding(self, x) -> NamedSharding:
        """Sharding of one batch array: first axis over the batch mesh axes (fewer when they do
        not divide it), the rest replicated."""
        names = ("batch",) + (None,) * (np.ndim(x) - 1)
        return sharding.logical_sharding(names, np.shape(x), self.mesh, self.rules)

    def program(self, key: Any, build: Callable[[], Any]) -> Any:
        """The jitted program for `key` and this state's graph and layout, built on first use.

        Shared by train states of equal graph definition, mesh and rules (one compile each).
        """
        if key not in self._programs:  # hashing the GraphDef costs ~0.6 ms (tiny model)
            shared = (key, self.graphdef, self.mesh, self.rules)
            if shared not in _PROGRAMS:
                _PROGRAMS[shared] = build()
            self._programs[key] = _PROGRAMS[shared]
        return self._programs[key]

    # -- steps --

    def run_step(
        self,
        step_fn: Callable[..., dict[str, jax.Array]],
        batch: Any,
        *frozen: nnx.Module,
        **static: Any,
    ) -> dict[str, jax.Array]:
        """Run `step_fn(model, optimizer, batch, *frozen_models, **static) -> metrics` under jit.

        `step_fn` updates model and optimizer in place (NNX style) and returns a dict of scalar
        metrics. It is compiled once per (step_fn, static values, batch structure and shapes,
        frozen graphs) with in/out shardings fixed: state as declared and donated, batch over
        the batch axes, frozen models (a reference or teacher) in their own declared layout,
        metrics replicated.

        Args:
          step_fn: the pure step (see above); must be a module-level function (hashed by id).
          batch: tree of [B, ...] arrays (numpy or jax).
          frozen: models that are read but not trained (not donated).
          static: hashable options passed through to `step_fn` (e.g. `cfg=GRPOConfig(...)`).
        Returns:
          the metrics dict (device scalars; `jax.device_get` them when you log).
        """
        frozen_split = [nnx.split(m) for m in frozen]
        frozen_graphdefs = tuple(g for g, _ in frozen_split)
        frozen_states = [s for _, s in frozen_split]
        leaves, treedef = jax.tree.flatten(batch)
        key = (
            step_fn,
            tuple(sorted(static.items())),
            treedef,
            tuple((np.shape(x), str(getattr(x, "dtype", type(x)))) for x in leaves),
            frozen_graphdefs,
        )

        def build():
            graphdef, state_def = self.graphdef, self._state_def

            def pure(leaves, batch, frozen_states):
                model, optimizer = nnx.merge(graphdef, jax.tree.unflatten(state_def, leaves))
                frozen_models = [
                    nnx.merge(g, s) for g, s in zip(frozen_graphdefs, frozen_states, strict=True)
                ]
                metrics = step_fn(model, optimizer, batch, *frozen_models, **static)
                return state_def.flatten_up_to(nnx.state((model, optimizer))), metrics

            batch_shardings = jax.tree.map(self.batch_sharding, batch)
            frozen_shardings = [
                sharding.state_shardings(s, self.mesh, self.rules) for s in frozen_states
            ]
            replicated = NamedSharding(self.mesh, PartitionSpec())
            state_shardings = jax.tree.leaves(self.shardings)
            in_shardings = (state_shardings, batch_shardings, frozen_shardings)
            program = jax.jit(
                pure,
                in_shardings=in_shardings,
                out_shardings=(state_shardings, replicated),
                donate_argnums=0,
            )
            return program, batch_shardings

        program, batch_shardings = self.program(key, build)
        # Placing the batch first makes host arrays and device arrays whose (equivalent) sharding
        # is spelled differently hit the same compiled program instead of compiling another one.
        batch = jax.device_put(batch, batch_shardings)
        with self.mesh_context():
            leaves, metrics = program(self.state_leaves(), batch, frozen_states)
        for variable, value in zip(self._variables, leaves, strict=True):
            variable.set_raw_value(value)
        return metrics
