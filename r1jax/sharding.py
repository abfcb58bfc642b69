"""Meshes, logical-axis rules, and multi-host start-up.

Models name the axes of every parameter and of a few activations logically (`embed`, `heads`,
`batch` ...). This module owns the one table that maps those names onto mesh axes, so a model file
never mentions a mesh axis and a config change reshards everything.

Mesh axes:
  data    pure data parallelism: a full replica of the weights per group of devices
  fsdp    data parallelism whose devices also split every weight along `embed` (ZeRO-3 style)
  tensor  tensor parallelism: heads, kv-heads, MLP hidden units and vocab split across devices
  expert  expert parallelism for mixture-of-experts layers (size 1 for dense models)

Notable choices:
- Meshes use `AxisType.Auto` (jax 0.10 defaults to Explicit, under which logical annotations inside
  jit fail with "contracting dimensions are sharded").
- A dimension that the mesh axis does not divide (e.g. 2 kv-heads on tensor=4) is replicated instead
  of failing; loading or creating a model logs where (`warn_undivided`), `explain()` lists every
  parameter's spec. Routed experts are the exception: `expert` must divide them (`moe`).
- `constrain()` is a no-op only when no mesh is set at all; on a multi-device CPU mesh it constrains
  for real, so tests catch sharding bugs.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# Logical axis -> mesh axis (or tuple of mesh axes, or None for replicated).
# Expert parallelism (`expert` > 1): routed experts' leading axis goes over `expert`; all else
# treats `expert` as more FSDP: rows are split over it (otherwise every expert rank would repeat
# the attention of the same rows), and so is `embed` of the non-expert weights (otherwise they
# would be replicated on every expert rank). A mesh axis is used once per array, so an expert
# weight [E, D, M] keeps `embed` on `fsdp` alone. With `expert` = 1 (dense models) nothing changes.
# MLA's low ranks (`q_lora`, `kv_lora`) are split like `embed`: the up-projections [Q or C, N, H]
# have no `embed` axis and would otherwise be split over `tensor` only.
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("embed", ("fsdp", "expert")),
    ("q_lora", ("fsdp", "expert")),
    ("kv_lora", ("fsdp", "expert")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("seq", None),
    ("head_dim", None),
    ("norm", None),
)

# For sampling: no weight is split over fsdp, and only routed experts over expert (each decode step
# would otherwise all-gather every weight); the batch still spreads over data, fsdp and expert, and
# tensor and expert parallelism stay.
SAMPLING_RULES: tuple[tuple[str, Any], ...] = tuple(
    (name, None if name in ("embed", "q_lora", "kv_lora") else axes) for name, axes in RULES
)

_rules: contextvars.ContextVar[tuple] = contextvars.ContextVar("r1jax_rules", default=RULES)


@contextlib.contextmanager
def use_rules(rules: Sequence[tuple[str, Any]]) -> Iterator[None]:
    """Make `rules` the logical-axis rules for `constrain` inside this context."""
    token = _rules.set(tuple(rules))
    try:
        yield
    finally:
        _rules.reset(token)


# --------------------------------------------------------------------------------------------------
# Meshes
# --------------------------------------------------------------------------------------------------


def make_mesh(
    data: int = 1,
    fsdp: int = -1,
    tensor: int = 1,
    expert: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A mesh with axes (data, fsdp, tensor, expert); one size may be -1 to take the remaining
    devices.

    Devices are ordered so that `tensor` (the most communication-heavy axis) is innermost, i.e. on
    neighbouring chips of a TPU slice.
    """
    devices = list(devices if devices is not None else jax.devices())
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor, "expert": expert}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {free}")
    fixed = int(np.prod([v for v in sizes.values() if v != -1]))
    if any(v == 0 or v < -1 for v in sizes.values()):
        raise ValueError(f"mesh: axis sizes must be positive or -1, got {sizes}")
    if free:
        if len(devices) % fixed:
            raise ValueError(
                f"mesh: {len(devices)} devices are not divisible by the fixed axes "
                f"{ {k: v for k, v in sizes.items() if v != -1} }"
            )
        sizes[free[0]] = len(devices) // fixed
    total = int(np.prod(list(sizes.values())))
    if total != len(devices):
        raise ValueError(
            f"mesh: data*fsdp*tensor*expert = {total} but {len(devices)} devices are "
            f"available; set config.mesh so the product matches (one axis may be -1)"
        )
    shape = tuple(sizes[a] for a in ("data", "fsdp", "expert", "tensor"))
    dev_array = np.asarray(devices, dtype=object).reshape(shape).transpose(0, 1, 3, 2)
    return Mesh(dev_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def mesh_from_config(mesh_config) -> Mesh:
    """A mesh from a config section with fields data, fsdp, tensor (and optionally expert)."""
    fields = dict(mesh_config)
    unknown = set(fields) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"config.mesh: unknown axes {sorted(unknown)}; use {MESH_AXES}")
    return make_mesh(**fields)


def single_device_mesh() -> Mesh:
    """A mesh of one device with all four axes of size 1 (same code path, no parallelism)."""
    return make_mesh(1, 1, 1, 1, devices=jax.devices()[:1])


# --------------------------------------------------------------------------------------------------
# Logical axes -> shardings
# --------------------------------------------------------------------------------------------------


def logical_to_spec(
    names: Sequence[str | None],
    shape: Sequence[int] | None,
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]] | None = None,
) -> PartitionSpec:
    """The PartitionSpec for an array whose axes are named `names`.

    A mesh axis is used at most once per array, axes of size 1 are dropped, and a dimension that
    the mesh axes do not divide falls back to fewer axes (or replication) rather than failing
    (`undivided` lists where).
    """
    return _spec_and_undivided(names, shape, mesh, rules)[0]


def _spec_and_undivided(names, shape, mesh, rules):
    """(PartitionSpec, [(logical name, size, mesh axes it is not split over)])."""
    table = dict(rules if rules is not None else _rules.get())
    used: set[str] = set()
    spec, undivided = [], []
    for i, name in enumerate(names):
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape.get(a, 1) > 1)
        if shape is not None:
            # Drop mesh axes from the end until their product divides the dimension.
            wanted = axes
            while axes and shape[i] % int(np.prod([mesh.shape[a] for a in axes])):
                axes = axes[:-1]
            if axes != wanted:
                undivided.append((name, shape[i], wanted[len(axes) :]))
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec), undivided


def undivided(state, mesh: Mesh, rules=None) -> list[str]:
    """One line per (logical axis, size, mesh axes) that the rules would split a parameter of
    `state` over but the mesh does not divide, so that dimension is replicated there instead:
    e.g. 28 heads on tensor=8 keep every q/k/v/o weight whole on every device. Empty when every
    parameter is split as the rules ask."""
    from flax import nnx

    found: dict[tuple, list[str]] = {}
    for path, v in nnx.to_flat_state(state):
        names = _variable_names(v) if isinstance(v, nnx.Variable) else None
        if names is None:
            continue
        for name, size, axes in _spec_and_undivided(names, v.shape, mesh, rules)[1]:
            found.setdefault((name, size, axes), []).append("/".join(map(str, path)))
    lines = []
    for (name, size, axes), where in found.items():
        ways = " x ".join(f"{a}={mesh.shape[a]}" for a in axes)
        lines.append(
            f"{name} ({size}) is not divisible by {ways}: not split there in {len(where)} "
            f"parameter(s), e.g. {where[0]}"
        )
    return lines


def check_mesh(mesh: Mesh) -> None:
    """Refuse a mesh r1jax's logical annotations cannot work on: one without the axes
    `MESH_AXES`, or with Explicit axes (jax 0.10's `jax.make_mesh` default), under which every
    `constrain` inside jit fails later. `make_mesh` builds the right kind."""
    missing = [a for a in MESH_AXES if a not in mesh.shape]
    explicit = [
        name for name, t in zip(mesh.axis_names, mesh.axis_types, strict=True) if t != AxisType.Auto
    ]
    if missing or explicit:
        raise ValueError(
            f"mesh {dict(mesh.shape)}: "
            + (f"lacks the axes {missing}" if missing else f"axes {explicit} are not Auto")
            + "; build it with r1jax.sharding.make_mesh(data=, fsdp=, tensor=, expert=)"
        )


def warn_undivided(state, mesh: Mesh, rules=None) -> None:
    """Log `undivided(...)` as one warning (more memory per device than the mesh suggests)."""
    lines = undivided(state, mesh, rules)
    if lines and jax.process_index() == 0:
        log.warning(
            "the mesh %s does not divide some parameter dimensions, which are replicated instead "
            "(choose mesh sizes that divide them to save memory):\n  %s",
            dict(mesh.shape),
            "\n  ".join(lines),
        )


def logical_sharding(names, shape, mesh: Mesh, rules=None) -> NamedSharding:
    """NamedSharding for an array of `shape` with logical axis `names`."""
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))


def _variable_names(variable) -> tuple | None:
    return variable.get_metadata().get("out_sharding")


def state_shardings(state, mesh: Mesh, rules=None):
    """A tree of NamedShardings matching an nnx.State (abstract or concrete), from each parameter's
    logical `out_sharding` names; unannotated leaves are replicated."""
    from flax import nnx

    def one(v):
        names = _variable_names(v) if isinstance(v, nnx.Variable) else None
        shape = getattr(v, "shape", ())
        if names is None:
            return NamedSharding(mesh, PartitionSpec())
        return logical_sharding(names, shape, mesh, rules)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical names, under the mesh set with `jax.set_mesh`.

    No mesh set (plain single-device use) means nothing to constrain.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(names, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def explain(state, mesh: Mesh, rules=None) -> list[str]:
    """Human-readable lines 'path: shape -> spec' for each parameter (for logs and debugging)."""
    from flax import nnx

    lines = []
    flat = nnx.to_flat_state(state) if hasattr(nnx, "to_flat_state") else state.flat_state()
    for path, v in flat:
        names = _variable_names(v)
        shape = v.shape
        spec = logical_to_spec(names or (None,) * len(shape), shape, mesh, rules)
        lines.append(f"{'/'.join(map(str, path))}: {tuple(shape)} {names} -> {spec}")
    return lines


# --------------------------------------------------------------------------------------------------
# Models and batches on a mesh
# --------------------------------------------------------------------------------------------------


def create_sharded(model_fn, mesh: Mesh, rules=None):
    """Build an nnx module with every parameter born in its sharding (no full copy anywhere).

    `model_fn()` constructs the module (e.g. `lambda: Decoder(cfg, rngs=nnx.Rngs(0))`).
    """
    from flax import nnx

    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(model_fn)
        graphdef, abstract_state = nnx.split(abstract)
        shardings = state_shardings(abstract_state, mesh, rules)
        warn_undivided(abstract_state, mesh, rules)

        def init():
            return nnx.state(model_fn())

        init = jax.jit(init, out_shardings=shardings)
        state = init()
    return nnx.merge(graphdef, state)


def reshard(model, mesh: Mesh, rules=None):
    """Move an nnx module's state onto `mesh` under `rules` (e.g. training -> SAMPLING_RULES).

    Returns a new module sharing the graph definition; the input is left as it was.
    """
    from flax import nnx

    graphdef, state = nnx.split(model)
    state = jax.device_put(state, state_shardings(state, mesh, rules))
    return nnx.merge(graphdef, state)


def batch_sharding(mesh: Mesh, ndim: int, rules=None) -> NamedSharding:
    """Sharding of a [B, ...] batch: B over the `batch` rule's mesh axes, the rest replicated."""
    return NamedSharding(
        mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), None, mesh, rules)
    )


def from_host(x, where: NamedSharding) -> jax.Array:
    """A host array that every process holds whole, placed in `where` (each device copies only
    its slice; jit refuses numpy for a sharding split over processes)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, where, lambda index: x[index])


def shard_batch(batch, mesh: Mesh, rules=None):
    """Place a tree of host arrays, each [B_global, ...] and identical on every process, on the
    mesh.

    Each device receives only its slice. The leading dimension must divide by the batch axes' size.
    """

    def one(x):
        x = np.asarray(x)
        sharding = batch_sharding(mesh, x.ndim, rules)
        _check_divisible(x.shape[0], sharding)
        return from_host(x, sharding)

    return jax.tree.map(one, batch)


def to_host(value: jax.Array) -> np.ndarray:
    """The whole of a (possibly multi-process, sharded) array as numpy; collective when the array
    spans processes, so every process must call it."""
    from jax.experimental import multihost_utils

    if not value.is_fully_addressable:
        value = multihost_utils.process_allgather(value, tiled=True)
    return np.asarray(jax.device_get(value))


def shard_local_batch(batch, mesh: Mesh, rules=None):
    """Like `shard_batch`, but each process passes only its own rows [B_global / processes, ...].

    The batch axes must split rows over processes (with them all of size 1 every process would
    need every row: use `shard_batch`), and B_global must divide by their size.
    """

    def one(x):
        x = np.asarray(x)
        sharding = batch_sharding(mesh, x.ndim, rules)
        global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
        _check_divisible(global_shape[0], sharding)
        # The rows this process's devices hold must be exactly its own B_global / processes:
        # with fewer batch shards than processes, several processes hold the same rows (and
        # would each pass different ones), which make_array_from_process_local_data accepts.
        index = sharding.addressable_devices_indices_map(global_shape)
        held = {(s[0].start or 0, s[0].stop) for s in index.values()}
        rows = sum((stop if stop is not None else global_shape[0]) - start for start, stop in held)
        if rows != x.shape[0]:
            raise ValueError(
                f"shard_local_batch: this process's devices hold {rows} of {global_shape[0]} "
                f"rows, not its own {x.shape[0]}: the mesh's batch axes split rows into fewer "
                f"groups than the {jax.process_count()} processes; pass the global batch to "
                "shard_batch instead"
            )
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree.map(one, batch)


def _check_divisible(size: int, sharding: NamedSharding) -> None:
    spec = sharding.spec[0] if len(sharding.spec) else None
    axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
    ways = int(np.prod([sharding.mesh.shape[a] for a in axes])) if axes else 1
    if size % ways:
        raise ValueError(
            f"batch of {size} rows cannot be split over mesh axes {axes} ({ways} ways); "
            f"make the batch size a multiple of {ways}"
        )


# --------------------------------------------------------------------------------------------------
# Multi-host
# --------------------------------------------------------------------------------------------------

_ENV = ("R1JAX_COORDINATOR_ADDRESS", "R1JAX_NUM_PROCESSES", "R1JAX_PROCESS_ID")


class JoinedAnotherCount(ValueError):
    """This process joined a job of another number of processes than it was told: started, so it
    must still take part in the start-up agreement (the others wait for it there)."""


def initialize_distributed() -> bool:
    """Start `jax.distributed` when running on several hosts; return True if it was started.

    - R1JAX_COORDINATOR_ADDRESS / R1JAX_NUM_PROCESSES / R1JAX_PROCESS_ID set: use them (any cluster,
      and several processes on one machine for tests). On CPU, gloo collectives are enabled.
    - Otherwise on a TPU pod slice, Slurm or another cluster JAX recognises: let JAX detect it.
    - Otherwise (one host): do nothing.
    Must run before anything touches a JAX backend.
    """
    if jax.distributed.is_initialized():
        return True
    given = [k for k in _ENV if os.environ.get(k)]
    if given:
        missing = [k for k in _ENV if k not in given]
        if missing:
            raise ValueError(
                f"multi-host: {given} are set but {missing} are not; set all three (or none)"
            )
        try:
            num, pid = int(os.environ["R1JAX_NUM_PROCESSES"]), int(os.environ["R1JAX_PROCESS_ID"])
        except ValueError:
            raise ValueError(
                "multi-host: R1JAX_NUM_PROCESSES and R1JAX_PROCESS_ID must be whole numbers, got "
                f"{os.environ['R1JAX_NUM_PROCESSES']!r} and {os.environ['R1JAX_PROCESS_ID']!r}"
            ) from None
        if not 0 <= pid < num:
            raise ValueError(
                f"multi-host: need 0 <= R1JAX_PROCESS_ID < R1JAX_NUM_PROCESSES, got {pid} and {num}"
            )
        address = os.environ["R1JAX_COORDINATOR_ADDRESS"]
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(
                f"multi-host: R1JAX_COORDINATOR_ADDRESS must be host:port (process 0's host and "
                f"a free port, e.g. 10.0.0.2:8476), got {address!r}"
            )
        if os.environ.get("JAX_PLATFORMS", "") == "cpu" or os.environ.get("R1JAX_CPU_COLLECTIVES"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if pid == 0:  # (JAX says nothing while it waits, up to 5 minutes, for every process)
            logging.getLogger("r1jax").warning(
                "coordinator at %s: waiting for all %d processes to join", address, num
            )
        jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
        if jax.process_count() != num:  # (a process told another count joined this one's job)
            raise JoinedAnotherCount(
                f"multi-host: R1JAX_NUM_PROCESSES={num} here, but the coordinator at {address} "
                f"runs a job of {jax.process_count()} processes; give every process the same "
                f"R1JAX_NUM_PROCESSES"
            )
        return True
    if _on_known_cluster():
        try:
            jax.distributed.initialize()
        except ValueError as e:  # e.g. a TPU-like host that JAX's own detection does not agree with
            raise ValueError(
                f"multi-host: this host looks like part of a cluster (a TPU VM, Slurm step, "
                f"Open MPI or GKE slice: r1jax.sharding._on_known_cluster), but JAX could not "
                f"start on it ({e}); give R1JAX_COORDINATOR_ADDRESS, R1JAX_NUM_PROCESSES and "
                f"R1JAX_PROCESS_ID (1 process, id 0, any free address for a single host)"
            ) from None
        return True
    return False


def _on_known_cluster() -> bool:
    """True on a multi-host TPU slice (unless JAX_PLATFORMS leaves out the TPU), or under Slurm
    or Open MPI with several tasks (JAX auto-detects all three)."""
    # `mpirun -np N` (N > 1): JAX reads the Open MPI runtime's own variables.
    if (
        os.environ.get("OMPI_MCA_orte_hnp_uri")
        and int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    ):
        return True
    # Inside an `srun` step only: JAX's Slurm detection reads the step's node list, which an
    # `sbatch` script or `salloc` shell does not have.
    if (
        os.environ.get("SLURM_JOB_ID")
        and os.environ.get("SLURM_STEP_NODELIST")
        and int(os.environ.get("SLURM_NTASKS", "1")) > 1
    ):
        return True
    # A run told to leave the TPU alone (e.g. JAX_PLATFORMS=cpu on a TPU VM) is no part of the
    # slice: it would wait for every worker of the slice, or join a running job's coordinator.
    platforms = os.environ.get("JAX_PLATFORMS", "").lower()
    if platforms and "tpu" not in platforms.split(","):
        return False
    # GKE lists a slice's workers in the environment.
    hostnames = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hostnames or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return True
    # TPU VMs made with `gcloud compute tpus tpu-vm create` publish the slice only through the
    # metadata server, which JAX's own detection reads; initialising on a single-host TPU VM is
    # harmless, so any TPU VM counts.
    return any(os.path.exists(p) for p in ("/dev/accel0", "/dev/vfio/0")) or bool(
        os.environ.get("TPU_ACCELERATOR_TYPE")
    )
