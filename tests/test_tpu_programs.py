"""What XLA:TPU makes of the GRPO programs, checked without a TPU: `tpu_programs.py` compiles the
sampling copy, the rollout and the update for a v5e 2x4 slice (libtpu compiles for a topology
description; nothing runs) and reports per-chip memory and the collectives inside and outside
their while loops. These are the claims the sharding design rests on (launch/README.md, DESIGN.md):
decoding moves no weights per token, gradients are reduce-scattered, the sampling copy is whole
along fsdp and split along tensor, the training state stays sharded.
"""

import importlib.metadata
import json
import os
import re
import subprocess
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def libtpu(tmp_path_factory) -> str:
    """A private folder holding the libtpu that jax pins for its `tpu` extra (from the package
    registry). Not installed beside jax: there it would make every JAX program probe for a TPU."""
    (pin,) = [
        re.sub(r";.*", "", r).replace(" ", "")
        for r in importlib.metadata.requires("jax")
        if r.startswith("libtpu")
    ]
    target = str(tmp_path_factory.mktemp("libtpu"))
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target, pin]
    proc = subprocess.run(install, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"could not install {pin}: {proc.stderr[-2000:]}"
    return target


@pytest.fixture
def report(libtpu):
    """mesh name -> tpu_programs.py's report for that mesh of the 8 chips."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([libtpu, TESTS, os.environ.get("PYTHONPATH", "")]),
        "JAX_PLATFORMS": "cpu",  # the programs are compiled for TPU; nothing runs
    }
    env.pop("XLA_FLAGS", None)
    out = {}
    meshes = {
        "fsdp8": (1, 8, 1, 1),
        "fsdp4_tensor2": (1, 4, 2, 1),
        "moe_fsdp2_expert4": (1, 2, 1, 4),
    }
    for name, axes in meshes.items():
        script = [sys.executable, os.path.join(TESTS, "tpu_programs.py"), *map(str, axes)]
        proc = subprocess.run(script, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
        out[name] = json.loads(proc.stdout)
    return out


def largest(collectives, *ops):
    return max([size for op, size in collectives if not ops or op in ops], default=0)


def test_what_xla_tpu_makes_of_the_grpo_programs(report):
    """One test (the two compiles are shared, and xdist would run a module fixture once per
    worker that gets one of its tests)."""
    params = report["fsdp8"]["params"]

    # Decoding moves no weights and no cache per token: inside the decode loops only the all-done
    # flag crosses chips on fsdp=8 (the sampling copy holds whole weights, gathered once per step
    # by `policy_for_sampling`); with tensor=2, only the tensor-parallel sums of a token's
    # activations, never a weight (the smallest weight matrix here is 64 KB).
    fsdp = report["fsdp8"]["rollout"]
    assert largest(fsdp["in_loops"]) <= 64, fsdp["in_loops"]
    assert largest(fsdp["outside"], "all-gather") == 0  # the copy arrives laid out for decoding
    tensor = report["fsdp4_tensor2"]["rollout"]
    assert 0 < largest(tensor["in_loops"], "all-reduce") <= 16 * 1024, tensor["in_loops"]
    assert largest(tensor["in_loops"], "all-gather") <= 16 * 1024

    # Gradients are reduce-scattered, each micro-batch's, and no gradient is summed whole onto
    # every chip (the largest all-reduce is a few scalars).
    update = report["fsdp8"]["update"]
    assert largest(update["in_loops"], "reduce-scatter") > 0
    assert largest(update["in_loops"] + update["outside"], "all-reduce") <= 64 * 1024
    # The training state stays sharded: parameters and both Adam moments (12 bytes per
    # parameter) in, a little batch besides: an eighth per chip, not the whole (39 MB here).
    assert update["argument_bytes"] < 1.25 * 12 * params / 8

    # The sampling copy, as launch/README.md's memory guide counts it: bfloat16, whole along fsdp
    # (2 bytes per parameter on every chip), about half of that with tensor=2.
    whole = report["fsdp8"]["policy_for_sampling"]
    assert abs(whole["output_bytes"] - 2 * params) < 0.01 * 2 * params
    assert whole["argument_bytes"] < 1.25 * 4 * params / 8  # read from the float32 training shards
    split = report["fsdp4_tensor2"]["policy_for_sampling"]["output_bytes"]
    assert 0.45 * 2 * params < split < 0.55 * 2 * params

    # The DeepSeek-V3-shaped MoE on fsdp=2 x expert=4: decoding moves tokens to their experts
    # (all-to-all of a few KB) and no weights; the sampling copy holds every weight whole but the
    # routed experts, split over `expert`; the update reduce-scatters its gradients.
    moe = report["moe_fsdp2_expert4"]
    assert largest(moe["rollout"]["in_loops"], "all-gather") == 0
    assert 0 < largest(moe["rollout"]["in_loops"], "all-to-all") <= 16 * 1024
    experts = 3 * 8 * 256 * 128  # one MoE layer: gate, up, down of 8 experts
    whole = 2 * (moe["params"] - experts + experts / 4)
    assert abs(moe["policy_for_sampling"]["output_bytes"] - whole) < 0.03 * whole
    assert largest(moe["update"]["in_loops"], "reduce-scatter") > 0
