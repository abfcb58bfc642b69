"""The decoder against transformers (PyTorch), HF round trips, sharded forwards, errors."""

import copy
import dataclasses
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import (
    FAMILIES,
    assert_a_stored_head_must_equal_the_embedding,
    hf_checkpoint,
    left_padded_batch,
    load_counting_reads,
    random_blocks,
    torch_logits,
    torch_model,
)

from r1jax import sharding
from r1jax.models import hf
from r1jax.models.transformer import ModelConfig


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers_with_left_padding(family):
    path = hf_checkpoint(family)
    model = hf.load(path)
    ids, mask = left_padded_batch(length=12)
    ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    real = mask.astype(bool)
    if "dynamic" in family:
        # Dynamic NTK grows the base with the longest position: transformers takes its batch's,
        # we take each row's own, so that a row's logits do not depend on its batch mates (a
        # short prompt batched beside a long one sampled other tokens). Each row against the row
        # run alone, by a model of its own (transformers keeps the longest base it has grown).
        ref = np.zeros_like(ours)
        for i, row in enumerate(real):
            alone = ids[i : i + 1, row].astype(np.int64)
            torch_model.cache_clear()
            ref[i, row] = torch_logits(path, alone, np.ones_like(alone))[0]
        torch_model.cache_clear()
    else:
        ref = torch_logits(path, ids.astype(np.int64), mask.astype(np.int64))
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=0)


def test_left_padding_does_not_change_real_logits():
    model = hf.load(hf_checkpoint("qwen2"))
    ids, mask = left_padded_batch(length=12, pads=(0, 4, 0))
    ids[1, 4:] = ids[0, :8]
    full = np.asarray(model(jnp.asarray(ids[:1, :8])))
    padded = np.asarray(model(jnp.asarray(ids[1:2]), attention_mask=jnp.asarray(mask[1:2])))
    np.testing.assert_allclose(padded[0, 4:], full[0], atol=1e-5)


@pytest.mark.parametrize("family", ["qwen2", "llama3", "qwen3", "mistral"])
def test_save_round_trip_through_transformers(family, tmp_path):
    model = hf.load(hf_checkpoint(family))
    out = str(tmp_path / "saved")
    hf.save(model, out)
    ids, mask = left_padded_batch(length=10)
    ids, mask = ids.astype(np.int64), mask.astype(np.int64)
    ref = torch_logits(hf_checkpoint(family), ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(torch_logits(out, ids, mask)[real], ref[real], atol=1e-6)
    # transformers 4.x reads only rope_theta / rope_scaling: those alone give the same model.
    with open(os.path.join(out, "config.json")) as f:
        legacy = json.load(f)
    del legacy["rope_parameters"]
    old_style = str(tmp_path / "legacy")
    shutil.copytree(out, old_style)
    with open(os.path.join(old_style, "config.json"), "w") as f:
        json.dump(legacy, f)
    np.testing.assert_allclose(torch_logits(old_style, ids, mask)[real], ref[real], atol=1e-6)
    # ... and r1jax reads its own output back identically.
    again = hf.load(out)
    for (p, a), (_, b) in zip(
        nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(again)), strict=False
    ):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(p))


@pytest.mark.parametrize("family", ["qwen2", "deepseek_v3"])
def test_saved_rope_is_also_spelled_for_transformers_4(family):
    """config.json carries rope_theta / rope_scaling beside rope_parameters, equal to it: the
    only keys transformers 4.x reads (without them it builds theta 10000, unscaled)."""
    import transformers

    from r1jax.models import deepseek_hf, transformer
    from r1jax.models.deepseek import DeepseekConfig

    scaling = (("factor", 4.0), ("original_max_position_embeddings", 64), ("rope_type", "yarn"))
    if family == "qwen2":
        cfg = transformer.ModelConfig(
            **dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1),
            **dict(num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=256),
            rope_theta=1e6,
            rope_scaling=scaling,
            qkv_bias=True,
        )
        written = hf.config_to_hf(cfg)
    else:
        cfg = dataclasses.replace(DeepseekConfig.tiny(), rope_theta=1e6, rope_scaling=scaling)
        written = deepseek_hf.config_to_hf(cfg)
    legacy = {k: v for k, v in written.items() if k != "rope_parameters"}
    assert legacy["rope_theta"] == 1e6
    assert legacy["rope_scaling"] == dict(scaling)
    fields = copy.deepcopy({k: v for k, v in legacy.items() if k != "model_type"})
    read = transformers.AutoConfig.for_model(family, **fields).rope_parameters
    assert read == written["rope_parameters"]
    before = copy.deepcopy(legacy)
    assert hf.config_from_hf(legacy) == hf.config_from_hf(written) == cfg
    assert legacy == before  # reading a config does not write into it


def test_save_shards_above_size_and_loads_from_index(tmp_path):
    import transformers

    model = hf.load(hf_checkpoint("llama3"))
    out = str(tmp_path / "sharded")
    hf.save(model, out, max_shard_bytes=64 * 1024)
    files = sorted(os.listdir(out))
    assert "model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 1
    again = hf.load(out)
    ids, mask = left_padded_batch()
    np.testing.assert_array_equal(
        np.asarray(again(jnp.asarray(ids), attention_mask=jnp.asarray(mask))),
        np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))),
    )
    assert transformers.AutoModelForCausalLM.from_pretrained(out) is not None
    # Converted on the way out: the tensors and the dtype transformers loads them as.
    hf.save(model, str(tmp_path / "bf16"), dtype="bfloat16")
    import torch

    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").dtype == (
        torch.bfloat16
    )


def test_save_holds_one_shard_at_a_time(tmp_path):
    """Exporting streams: each tensor is gathered when its shard is written, so host memory
    holds about one shard, not the model (a 70B export must not need 280 GB on every host)."""
    import tracemalloc

    from r1jax.models import transformer

    cfg = transformer.ModelConfig(
        **dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=6),
        **dict(num_heads=4, num_kv_heads=2, head_dim=32, qkv_bias=True),
    )
    model = transformer.create(cfg)
    total = cfg.num_params * 4
    tracemalloc.start()
    try:
        hf.save(model, str(tmp_path / "out"), max_shard_bytes=total // 16)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < total / 3, (peak, total)
    assert len([f for f in os.listdir(tmp_path / "out") if f.endswith(".safetensors")]) >= 16
    again = hf.load(str(tmp_path / "out"))
    for (p, a), (_, b) in zip(
        nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(again)), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(p))


MESHES = {
    "fsdp8": dict(fsdp=8),
    "fsdp4_tp2": dict(fsdp=4, tensor=2),
    "dp2_fsdp2_tp2": dict(data=2, fsdp=2, tensor=2),
}


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_sharded_forward_equals_single_device(mesh_name):
    path = hf_checkpoint("qwen2")
    ids, mask = left_padded_batch(batch=8, pads=(0, 3, 7, 1, 0, 2, 5, 4))
    single = np.asarray(hf.load(path)(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))

    mesh = sharding.make_mesh(**MESHES[mesh_name])
    model = hf.load(path, mesh=mesh)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, attention_mask=mask)

    batch = sharding.shard_batch({"ids": ids, "mask": mask}, mesh)
    with jax.set_mesh(mesh):
        out = forward(state, batch["ids"], batch["mask"])
    np.testing.assert_allclose(np.asarray(out), single, atol=1e-5)

    # Parameters are really laid out as the rules say (and not replicated by accident).
    fsdp, tp = mesh.shape["fsdp"], mesh.shape["tensor"]
    q = model.layers[0].attn.q_dnh[...]  # [D=64, N=4, H=16]: embed->fsdp, heads->tensor
    assert q.sharding.spec == jax.sharding.PartitionSpec(
        "fsdp" if fsdp > 1 else None, "tensor" if tp > 1 else None, None
    )
    shard_shape = q.addressable_shards[0].data.shape
    assert shard_shape == (64 // fsdp, 4 // tp, 16)
    gate = model.layers[0].mlp.gate_df[...]  # [D, F=96]
    assert gate.addressable_shards[0].data.shape == (64 // fsdp, 96 // tp)


def test_indivisible_dimension_falls_back_to_replication():
    mesh = sharding.make_mesh(fsdp=2, tensor=4)
    # kv_heads=2 cannot split 4 ways; heads=4 can.
    assert sharding.logical_to_spec(
        ("embed", "kv_heads", "head_dim"), (64, 2, 16), mesh
    ) == jax.sharding.PartitionSpec("fsdp", None, None)
    assert sharding.logical_to_spec(
        ("embed", "heads", "head_dim"), (64, 4, 16), mesh
    ) == jax.sharding.PartitionSpec("fsdp", "tensor", None)


def test_loading_onto_a_mesh_that_does_not_divide_says_so(caplog):
    """The fallback costs memory (a 7B model's attention whole on every device), so it is
    logged, not silent; a mesh that divides everything logs nothing."""
    path = hf_checkpoint("qwen2")  # 4 heads, 2 kv-heads
    with caplog.at_level("WARNING", logger="r1jax.sharding"):
        model = hf.load(path, mesh=sharding.make_mesh(fsdp=2, tensor=4))
    (record,) = [r for r in caplog.records if "does not divide" in r.getMessage()]
    message = record.getMessage()
    assert "kv_heads (2) is not divisible by tensor=4" in message
    kv_params = 4 * model.cfg.num_layers  # k and v weights and biases
    assert f"not split there in {kv_params} parameter(s)" in message
    assert "heads (4)" not in message.replace("kv_heads", "")
    caplog.clear()
    with caplog.at_level("WARNING", logger="r1jax.sharding"):
        hf.load(path, mesh=sharding.make_mesh(fsdp=4, tensor=2))
    assert not [r for r in caplog.records if "does not divide" in r.getMessage()]


def test_bfloat16_params_and_compute_give_float32_logits():
    path = hf_checkpoint("qwen2")
    model = hf.load(path, param_dtype="bfloat16")
    assert model.layers[0].mlp.up_df[...].dtype == jnp.bfloat16
    ids, mask = left_padded_batch()
    logits = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert logits.dtype == jnp.float32
    ref = np.asarray(hf.load(path)(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    assert np.abs(np.asarray(logits) - ref)[mask.astype(bool)].max() < 0.05


def test_remat_gives_same_loss_and_gradient():
    cfg = ModelConfig.tiny(
        num_layers=2,
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
    )
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 8)), jnp.int32)

    def loss_and_grad(remat):
        from r1jax.models import transformer

        model = transformer.create(ModelConfig(**{**cfg.__dict__, "remat": remat}))
        graphdef, state = nnx.split(model)

        def loss(state):
            return jnp.mean(nnx.merge(graphdef, state)(ids) ** 2)

        return jax.jit(jax.value_and_grad(loss))(state)

    (l0, g0), (l1, g1) = loss_and_grad(False), loss_and_grad(True)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=False):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# Clear errors
# --------------------------------------------------------------------------------------------------


def _copy(tmp_path, family="qwen2"):
    dst = str(tmp_path / "ckpt")
    shutil.copytree(hf_checkpoint(family), dst)
    return dst


def test_error_missing_folder(tmp_path):
    with pytest.raises(hf.CheckpointError, match="does not exist"):
        hf.load(str(tmp_path / "nope"))


def test_error_missing_weights(tmp_path):
    path = _copy(tmp_path)
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(hf.CheckpointError, match="no model.safetensors"):
        hf.load(path)


def test_error_unsupported_architecture(tmp_path):
    path = _copy(tmp_path)
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["model_type"] = "gpt2"
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(hf.CheckpointError, match="model_type 'gpt2' is not supported"):
        hf.load(path)


def test_error_unsupported_field_is_refused_not_ignored(tmp_path):
    path = _copy(tmp_path)
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["hidden_act"] = "gelu"
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(hf.CheckpointError, match="hidden_act"):
        hf.load(path)
    cfg["hidden_act"] = "silu"
    cfg["quantization_config"] = {"quant_method": "gptq"}
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(hf.CheckpointError, match="quantization_config"):
        hf.load(path)
    # A null theta (a bare TypeError) and a Mistral window of 0 (no key to attend to) are named.
    del cfg["quantization_config"]
    cfg["rope_theta"] = None
    cfg.get("rope_parameters", {}).pop("rope_theta", None)
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(hf.CheckpointError, match=r"rope_theta=None must be a positive number"):
        hf.load(path)
    path = _copy(tmp_path / "mistral", "mistral")
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["sliding_window"] = 0
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(hf.CheckpointError, match=r"sliding_window=0 is not supported"):
        hf.load(path)
    # Full-attention layer types beside a window: transformers 5 reads the file as Ministral
    # (unwindowed), 4.x as Mistral (windowed); r1jax windowed it, silently.
    cfg["sliding_window"], cfg["layer_types"] = 5, ["full_attention"] * cfg["num_hidden_layers"]
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(hf.CheckpointError, match=r"layer_types=.* read as unwindowed"):
        hf.load(path)


def test_error_shape_mismatch_between_config_and_weights(tmp_path):
    path = _copy(tmp_path)
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["intermediate_size"] = 128
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(hf.CheckpointError, match="does not match config.json") as error:
        hf.load(path)
    # the expected shape as the file spells it, [out, in] (it was r1jax's [in, out] layout: a
    # transposed tensor then read "has shape (a, b) ... expected (a, b)")
    have, want = re.findall(r"\(\d+, \d+\)", str(error.value))
    assert want == "(128, 64)" and have == "(96, 64)", str(error.value)


def test_error_tensor_with_the_right_size_in_the_wrong_layout(tmp_path):
    """A q/k/v/o tensor stored [in, out] has as many elements as the right one: refused by name
    (it crashed with an IndexError deep in the block reader)."""
    from safetensors.numpy import load_file, save_file

    path = _copy(tmp_path)
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    name = "model.layers.0.self_attn.k_proj.weight"
    tensors[name] = np.ascontiguousarray(tensors[name].T)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(hf.CheckpointError, match=rf"{name} has shape .*does not match config"):
        hf.load(path)


def test_error_index_naming_the_wrong_shard(tmp_path):
    path = str(tmp_path / "sharded")
    hf.save(hf.load(hf_checkpoint("qwen2")), path, max_shard_bytes=20_000)
    index_file = os.path.join(path, "model.safetensors.index.json")
    index = json.load(open(index_file))
    files = sorted(set(index["weight_map"].values()))
    name = next(n for n, f in index["weight_map"].items() if f == files[0])
    index["weight_map"][name] = files[1]
    json.dump(index, open(index_file, "w"))
    with pytest.raises(hf.CheckpointError, match=rf"{files[1]}: tensor '{name}' cannot be read"):
        hf.load(path)


def test_bias_flags_are_read_only_by_the_families_whose_modeling_reads_them(tmp_path):
    """transformers' Mistral has no attention biases and Qwen2 / Qwen3 / Mistral no MLP biases
    whatever config.json says: such a checkpoint (saved by transformers) loads as transformers
    runs it, rather than being refused for missing bias tensors."""
    torch = pytest.importorskip("torch")
    import transformers

    for family, extra in (("mistral", {"attention_bias": True}), ("qwen2", {"mlp_bias": True})):
        config = transformers.AutoConfig.for_model(
            family, vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, **extra,
        )  # fmt: skip
        torch.manual_seed(0)
        reference = transformers.AutoModelForCausalLM.from_config(config).eval()
        path = str(tmp_path / family)
        reference.save_pretrained(path)
        model = hf.load(path)
        assert not model.cfg.mlp_bias and model.cfg.qkv_bias == (family == "qwen2")
        ids = np.arange(1, 13, dtype=np.int32)[None] % 64
        with torch.no_grad():
            want = reference(torch.tensor(ids, dtype=torch.long)).logits.numpy()
        np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), want, atol=1e-4)


def test_error_truncated_safetensors(tmp_path):
    path = _copy(tmp_path)
    file = os.path.join(path, "model.safetensors")
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(hf.CheckpointError, match="truncated"):
        hf.load(path)


def test_error_text_in_place_of_the_weights_and_a_cloud_save(tmp_path, monkeypatch):
    """A git-lfs pointer (a repo cloned without git-lfs) crashed the loader with a bare
    MemoryError (its text read as a header of ~2e18 bytes); `hf.save` to gs:// wrote a local
    ./gs:/ folder, which `hf.load` of the same URI then read back as if it were the bucket."""
    path = _copy(tmp_path)
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{'a' * 64}\nsize 299944\n"
    # A file the weights are not read from may be one (Mistral's consolidated.safetensors beside
    # the shards, never pulled): transformers loads the folder, and so does r1jax.
    with open(os.path.join(path, "consolidated.safetensors"), "w") as f:
        f.write(pointer)
    hf.load(path)
    with open(os.path.join(path, "model.safetensors"), "w") as f:
        f.write(pointer)
    with pytest.raises(hf.CheckpointError, match=r"model.safetensors is not a (readable )?safet"):
        hf.load(path)
    with pytest.raises(hf.CheckpointError, match=r"not a safetensors file.*git lfs pull"):
        hf._check_complete(path)  # (the size check, whichever reader comes first)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write("[]")
    with pytest.raises(hf.CheckpointError, match="holds a JSON list, not a config object"):
        hf.load(path)
    model = hf.load(_copy(tmp_path / "good"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="checkpoint.export_hf"):
        hf.save(model, "gs://bucket/run/model")
    assert not os.path.exists(tmp_path / "gs:")


def test_config_fields_left_out_take_transformers_defaults_and_unknown_ones_are_refused():
    """A config.json without a field means what transformers makes of it for that family
    (Mistral: a 4096-token window; Qwen2: 32768 positions; Qwen3: head_dim 128), and a save
    that the family's config cannot express is refused rather than silently changed."""
    import dataclasses

    base = dict(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    mistral = hf.config_from_hf({"model_type": "mistral", **base})
    assert mistral.sliding_window == 4096 and mistral.max_position_embeddings == 131072
    assert hf.config_from_hf({"model_type": "qwen2", **base}).max_position_embeddings == 32768
    assert hf.config_from_hf({"model_type": "qwen3", **base}).head_dim == 128
    assert hf.config_from_hf({"model_type": "llama", **base}).head_dim == 16  # 64 / 4
    # Saved by transformers 4.48-4.50, and "swish" (SiLU's other name): the same model.
    same = {"_attn_implementation_autoset": True, "hidden_act": "swish"}
    assert hf.config_from_hf({"model_type": "qwen2", **same, **base}) == hf.config_from_hf(
        {"model_type": "qwen2", **base}
    )
    # Llama 2's pretraining_tp (sliced matmuls in transformers 4, the same function) changes
    # nothing: some Llama-2-13B configs say 2, which was refused.
    assert hf.config_from_hf({"model_type": "llama", "pretraining_tp": 2, **base}) == (
        hf.config_from_hf({"model_type": "llama", **base})
    )
    # Qwen2.5 and R1-Distill-Qwen write "use_mrope": false; true (Qwen2-VL) is not this model.
    assert hf.config_from_hf({"model_type": "qwen2", "use_mrope": False, **base})
    with pytest.raises(hf.CheckpointError, match="use_mrope"):
        hf.config_from_hf({"model_type": "qwen2", "use_mrope": True, **base})
    # Rope scaling: what is missing is named at load, not a KeyError at the first forward.
    for scaling, message in (
        ({"rope_type": "linear"}, "factor"),
        ({"rope_type": "yarn", "original_max_position_embeddings": 16}, "factor"),
        ({"rope_type": "longrope"}, "longrope"),
        # A key r1jax does not read is named, not ignored (a typo).
        (
            {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 16,
                "atention_factor": 1.0,
            },
            r"rope_type 'yarn' does not take atention_factor \(.*attention_factor",
        ),
        ({"rope_type": "linear", "factor": 2.0, "low_freq_factor": 1.0}, "low_freq_factor"),
    ):
        with pytest.raises(hf.CheckpointError, match=message):
            hf.config_from_hf({"model_type": "llama", "rope_scaling": scaling, **base})
    # vLLM's yarn attn_factor (DeepSeek-R1-0528-Qwen3-8B) is read as transformers reads it: not.
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    r1_0528 = hf.config_from_hf(
        {"model_type": "qwen3", "rope_scaling": {**yarn, "attn_factor": 0.878}, **base}
    )
    assert r1_0528 == hf.config_from_hf({"model_type": "qwen3", "rope_scaling": yarn, **base})
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    scaled = hf.config_from_hf(
        {"model_type": "llama", "max_position_embeddings": 256, "rope_scaling": llama3, **base}
    )
    assert dict(scaled.rope_scaling)["original_max_position_embeddings"] == 256  # as transformers
    # Qwen's use_sliding_window windows layers from max_window_layers on: none of them here.
    flag = {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}
    assert hf.config_from_hf({"model_type": "qwen2", **flag, **base}).sliding_window is None
    with pytest.raises(hf.CheckpointError, match="use_sliding_window"):
        hf.config_from_hf({"model_type": "qwen2", **base, **flag, "max_window_layers": 0})
    qwen2 = hf.config_from_hf({"model_type": "qwen2", **base})
    for option, value in (("mlp_bias", True), ("o_bias", True), ("sliding_window", 3)):
        with pytest.raises(hf.CheckpointError, match=f"cannot express {option}"):
            hf.config_to_hf(dataclasses.replace(qwen2, **{option: value}))


def test_error_config_without_the_model_shape_names_the_fields(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "qwen2", "vocab_size": 64}')
    with pytest.raises(hf.CheckpointError, match=r"required field\(s\) \['hidden_size'"):
        hf.load(str(tmp_path))


@pytest.mark.parametrize("family", ["qwen2", "llama_linear", "mistral"])
def test_tensors_are_read_block_by_block_in_our_layout(family):
    """`_Blocks[index]` equals the same block of the whole tensor put in our layout (the
    reshape-and-transpose a `_Mapping` defines), for every parameter and random blocks."""
    path = hf_checkpoint(family)
    cfg = hf.config_from_hf(hf.read_config(path))
    files = hf._WeightFiles(path)
    rng = np.random.default_rng(0)
    for m in hf._mappings(cfg):
        whole = files.get(m.name)
        whole = whole.reshape(m.view(cfg)) if m.view else whole
        whole = whole.transpose(m.perm) if m.perm else whole
        blocks = hf._Blocks(files, m, cfg)
        assert blocks.shape == whole.shape, m.name
        np.testing.assert_array_equal(blocks.whole(), whole, err_msg=m.name)
        for index in random_blocks(whole.shape, rng):
            np.testing.assert_array_equal(blocks[index], whole[index], err_msg=f"{m.name} {index}")


def test_a_sharded_load_reads_each_device_block_not_whole_tensors(monkeypatch):
    """On a mesh, each device's callback reads only the rows of its block from the file, so the
    hosts of a pod slice read 1/hosts of the checkpoint each, not all of it."""
    path = hf_checkpoint("llama3")
    model, read = load_counting_reads(monkeypatch, path, sharding.make_mesh(fsdp=4, tensor=2))
    sizes = {p: np.asarray(v[...]).size for p, v in nnx.to_flat_state(nnx.state(model))}
    gate = [n for n, size in read if n.endswith("layers.0.mlp.gate_proj.weight")]
    # [embed over fsdp=4, mlp over tensor=2]: 8 distinct blocks of 1/8 each, read once each.
    assert len(gate) == 8
    assert all(size * 8 == sizes[("layers", 0, "mlp", "gate_df")] for n, size in read if n in gate)
    norm = [n for n, _ in read if n.endswith("layers.0.input_layernorm.weight")]
    assert len(norm) == 1  # replicated: read once, not once per device


def test_a_mesh_of_the_wrong_kind_is_refused_when_loading():
    """jax 0.10's `jax.make_mesh` makes Explicit axes, under which every forward failed later
    with a sharding-type error: refused at load, naming `sharding.make_mesh`."""
    explicit = jax.make_mesh((1, 8, 1, 1), sharding.MESH_AXES)
    with pytest.raises(ValueError, match=r"are not Auto; build it with r1jax.sharding.make_mesh"):
        hf.load(hf_checkpoint("qwen2"), mesh=explicit)
    two_axes = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with pytest.raises(ValueError, match=r"lacks the axes \['tensor', 'expert'\]"):
        hf.load(hf_checkpoint("qwen2"), mesh=two_axes)
    # A model built otherwise, placed by the train state (the first step failed with JAX's
    # "with_sharding_constraint acts as an assert" there).
    from r1jax import train

    model = hf.load(hf_checkpoint("qwen2"))
    with pytest.raises(ValueError, match=r"are not Auto; build it with r1jax.sharding.make_mesh"):
        train.TrainState.create(model, train.OptimConfig(), explicit)


def test_a_legacy_rope_scaling_block_is_read_as_transformers_reads_it():
    """Qwen2.5's long-context recipe adds `rope_scaling: {"type": "yarn", ...}` to a config.json
    that (written by transformers 5 or r1jax) already says `rope_parameters: {"rope_type":
    "default"}`: transformers builds yarn, r1jax dropped the "type" key and built plain RoPE."""
    from r1jax.models import transformer

    cfg = transformer.ModelConfig(
        **dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1),
        **dict(num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=256),
        rope_theta=1e6,
        qkv_bias=True,
    )
    written = hf.config_to_hf(cfg)
    written["rope_scaling"] = {
        "type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    read = hf.config_from_hf(written)
    assert dict(read.rope_scaling)["rope_type"] == "yarn" and read.rope_theta == 1e6
    # The block replaces the other spelling's parameters too, as in transformers (a yarn
    # export's beta_fast was carried into the new block's yarn).
    yarn = (("beta_fast", 64.0), ("factor", 4.0), ("original_max_position_embeddings", 64))
    written = hf.config_to_hf(dataclasses.replace(cfg, rope_scaling=(*yarn, ("rope_type", "yarn"))))
    written["rope_scaling"] = {
        "type": "yarn",
        "factor": 2.0,
        "original_max_position_embeddings": 64,
    }
    assert "beta_fast" not in dict(hf.config_from_hf(written).rope_scaling)
    nested = {**hf.config_to_hf(cfg), "rope_parameters": {"full_attention": {"rope_theta": 1e4}}}
    with pytest.raises(hf.CheckpointError, match="per-layer RoPE"):
        hf.config_from_hf(nested)


def test_a_folder_with_a_single_file_and_a_stale_index_reads_the_single_file(tmp_path):
    """transformers reads model.safetensors when a folder has it beside an index (a sharded folder
    re-saved as one file keeps its old index): r1jax read the old shards, another model."""
    from safetensors.numpy import load_file, save_file

    path = str(tmp_path / "both")
    hf.save(hf.load(hf_checkpoint("qwen2")), path, max_shard_bytes=20_000)
    tensors = load_file(os.path.join(hf_checkpoint("qwen2"), "model.safetensors"))
    tensors = {k: v * 2 for k, v in tensors.items()}  # another model than the shards
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    model = hf.load(path)
    embed = np.asarray(model.embed_vd[...])
    np.testing.assert_array_equal(embed, tensors["model.embed_tokens.weight"])


def test_a_tied_config_with_another_lm_head_in_its_weights_is_refused(tmp_path):
    """transformers leaves a stored lm_head.weight that differs from the embedding untied; r1jax
    tied them and dropped it: two models. Equal (as some exports write it), it loads."""
    assert_a_stored_head_must_equal_the_embedding(_copy(tmp_path))


def test_checkpoints_of_other_writers_load_or_say_what_they_are(tmp_path):
    """transformers <= 4.31 saved each layer's RoPE `inv_freq` buffer (Llama 2's published
    weights), which it ignores on load: they were refused as weights "not used by the
    architecture". A base model's save (names without "model.") was called 26 missing weights."""
    from safetensors.numpy import load_file, save_file

    path = _copy(tmp_path)
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    want = np.asarray(hf.load(path)(jnp.asarray([[1, 2, 3]])))
    stale = {
        f"model.layers.{i}.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32) for i in (0, 1)
    }
    save_file({**tensors, **stale}, file, metadata={"format": "pt"})
    np.testing.assert_array_equal(np.asarray(hf.load(path)(jnp.asarray([[1, 2, 3]]))), want)
    bare = {k.removeprefix("model."): v for k, v in tensors.items() if k != "lm_head.weight"}
    save_file(bare, file, metadata={"format": "pt"})
    with pytest.raises(hf.CheckpointError, match=r"without the 'model.' prefix.*ForCausalLM"):
        hf.load(path)
    # An untied model's base save lacks its lm_head too.
    untied = _copy(tmp_path / "untied", "llama3")
    file = os.path.join(untied, "model.safetensors")
    tensors = load_file(file)
    assert "lm_head.weight" in tensors
    bare = {k.removeprefix("model."): v for k, v in tensors.items() if k != "lm_head.weight"}
    save_file(bare, file, metadata={"format": "pt"})
    with pytest.raises(hf.CheckpointError, match=r"without the 'model.' prefix.*ForCausalLM"):
        hf.load(untied)
