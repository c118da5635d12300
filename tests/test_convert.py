"""The converter's layout, errors, dtypes, sharded inputs and checkpoints.

Logit parity lives in test_model_parity.py / test_llama_parity.py; here the
converter is checked tensor by tensor against the files transformers wrote.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from launch import convert_checkpoint
from sdar_jax.checkpoint.errors import ConversionError
from sdar_jax.checkpoint.params import load_params_checkpoint, save_params_checkpoint
from sdar_jax.config import get_preset, load_hf_config
from sdar_jax.convert import hf_rules
from sdar_jax.convert.from_hf import hf_to_jax, hf_to_params
from sdar_jax.convert.hf_rules import param_shapes, tensor_rules
from sdar_jax.convert.safetensors_io import SAFETENSORS_INDEX, SAFETENSORS_SINGLE, find_safetensors
from sdar_jax.convert.to_hf import write_hf_weights
from sdar_jax.model import transformer
from tests.helpers.shared import REFERENCE_DIR
from tests.helpers import hf_models


def read_all(path: str) -> dict[str, np.ndarray]:
    with safe_open(path, framework="numpy") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def read_dir(hf_dir) -> dict[str, np.ndarray]:
    return {name: read_all(path)[name] for name, path in find_safetensors(hf_dir).items()}


def shapes(tree) -> dict:
    return jax.tree.map(lambda x: tuple(x.shape), tree)


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    """An untied float32 tiny Qwen3 checkpoint and its model."""
    return hf_models.make_checkpoint(tmp_path_factory.mktemp("q") / "hf", "qwen3", seed=1)


def corrupt_copy(src: str, dst, edit) -> str:
    """Copies an HF dir, rewriting its tensors with edit(dict) -> dict."""
    shutil.copytree(src, dst)
    path = os.path.join(dst, SAFETENSORS_SINGLE)
    save_file(edit(read_all(path)), path, metadata={"format": "pt"})
    return os.fspath(dst)


# --- layout ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "llama"])
def test_param_shapes_match_the_model(name):
    config = get_preset("tiny")
    if name == "llama":
        config = config.replace(model_type="llama", qk_norm=False, tie_word_embeddings=True)
    assert param_shapes(config) == shapes(transformer.init_params(config, jax.random.key(0)))


def test_param_shapes_match_the_moe_model():
    pytest.importorskip("sdar_jax.model.moe")
    config = get_preset("tiny-moe")
    assert param_shapes(config) == shapes(nn.unbox(transformer.abstract_params(config)))


def test_rule_table_checked_against_the_model(monkeypatch):
    """The import-time check names a parameter the table lacks and a rule
    stacked differently from the model's logical axes."""
    config = get_preset("tiny")
    hf_rules.check_against_model(config)
    attention_rules = hf_rules._attention_rules

    def without_o_proj(cfg):
        return [r for r in attention_rules(cfg) if "o_proj" not in r.path]

    monkeypatch.setattr(hf_rules, "_attention_rules", without_o_proj)
    with pytest.raises(ValueError, match=r"the model's layers/self_attn/o_proj/kernel \[3, 4, 16, 64\] has no rule"):
        hf_rules.check_against_model(config)

    def unstacked_q_proj(cfg):
        return [dataclasses.replace(r, hf_name="model.q_proj.weight") if "q_proj" in r.path else r
                for r in attention_rules(cfg)]

    monkeypatch.setattr(hf_rules, "_attention_rules", unstacked_q_proj)
    with pytest.raises(ValueError, match=r"rule model.q_proj.weight stacks layers/self_attn/q_proj/kernel over "
                                         r"\[\], the model's logical axes \['layers', 'embed', 'heads', "
                                         r"'head_dim'\] over \['layer'\]"):
        hf_rules.check_against_model(config)


def test_layout_of_one_layer(qwen3_dir):
    """q_proj [heads*head_dim, hidden] -> [L, hidden, heads, head_dim]; o_proj
    [hidden, heads*head_dim] -> [L, heads, head_dim, hidden]; norms as is."""
    hf_dir, _ = qwen3_dir
    config, params = hf_to_params(hf_dir)
    files = read_dir(hf_dir)
    h, n, d = config.hidden_size, config.num_heads, config.head_dim
    q = files["model.layers.2.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(params["layers"]["self_attn"]["q_proj"]["kernel"][2], q.T.reshape(h, n, d))
    o = files["model.layers.1.self_attn.o_proj.weight"]
    np.testing.assert_array_equal(params["layers"]["self_attn"]["o_proj"]["kernel"][1], o.T.reshape(n, d, h))
    np.testing.assert_array_equal(
        params["layers"]["self_attn"]["k_norm"]["scale"][0], files["model.layers.0.self_attn.k_norm.weight"]
    )
    np.testing.assert_array_equal(params["lm_head"]["kernel"], files["lm_head.weight"].T)
    np.testing.assert_array_equal(params["embed_tokens"]["embedding"], files["model.embed_tokens.weight"])


@pytest.mark.parametrize(
    "family,tie", [("qwen3", False), ("qwen3", True), ("llama", True), ("qwen3_moe", False)]
)
def test_round_trip_reproduces_every_tensor(tmp_path, family, tie):
    hf_dir, _ = hf_models.make_checkpoint(tmp_path / "hf", family, tie_word_embeddings=tie, seed=2)
    config, params = hf_to_params(hf_dir)
    out = tmp_path / "out"
    out.mkdir()
    write_hf_weights(os.fspath(out), config, params, "float32")
    original, written = read_dir(hf_dir), read_dir(out)
    assert sorted(written) == sorted(original)
    for name, tensor in original.items():
        np.testing.assert_array_equal(written[name], tensor, err_msg=name)


# --- errors ---------------------------------------------------------------


def test_all_mismatches_reported_at_once(qwen3_dir, tmp_path):
    def edit(tensors):
        del tensors["model.layers.1.mlp.up_proj.weight"]
        tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
        tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.int32)
        tensors["model.layers.0.extra.weight"] = np.zeros(3, np.float32)
        return tensors

    bad = corrupt_copy(qwen3_dir[0], tmp_path / "bad", edit)
    with pytest.raises(ConversionError) as err:
        hf_to_params(bad)
    message = str(err.value)
    assert "4 tensor(s) do not match" in message
    assert "missing tensor model.layers.1.mlp.up_proj.weight (shape [128, 64])" in message
    assert "wrong shape for model.layers.0.self_attn.k_proj.weight: got [16, 64], expected [32, 64]" in message
    assert "unsupported dtype for model.norm.weight: got I32" in message
    assert "unexpected tensor model.layers.0.extra.weight" in message


def test_cli_reports_bad_input_with_status_2(qwen3_dir, tmp_path, capsys):
    bad = corrupt_copy(qwen3_dir[0], tmp_path / "bad",
                       lambda t: {k: v for k, v in t.items() if k != "model.norm.weight"})
    out = tmp_path / "ckpt"
    assert convert_checkpoint.main(["hf-to-jax", "--hf", bad, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("convert_checkpoint: error: ")
    assert "missing tensor model.norm.weight" in err
    # Nothing half-written: neither the output nor a temporary directory is left.
    assert sorted(os.listdir(tmp_path)) == ["bad"]
    assert convert_checkpoint.main(["jax-to-hf", "--ckpt", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "not a params checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "model.pth"])
def test_pickles_refused(qwen3_dir, tmp_path, name):
    src = tmp_path / "pickled"
    src.mkdir()
    shutil.copy(os.path.join(qwen3_dir[0], "config.json"), src)
    torch.save({"x": torch.zeros(2)}, src / name)
    for target in (src, src / name):
        with pytest.raises(ConversionError, match="pickle checkpoints .* are refused") as err:
            hf_to_params(target)
        assert "safe_serialization=True" in str(err.value)


def test_existing_output_refused_and_overwrite(qwen3_dir, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    with pytest.raises(ConversionError, match="already exists"):
        hf_to_jax(qwen3_dir[0], out)
    hf_to_jax(qwen3_dir[0], out, overwrite=True)
    assert (out / "params").is_dir()
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_tied_checkpoint_with_a_different_lm_head_is_refused(tmp_path):
    hf_dir, _ = hf_models.make_checkpoint(tmp_path / "hf", "qwen3", tie_word_embeddings=True)

    def add_head(tensors):
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1.0
        return tensors

    bad = corrupt_copy(hf_dir, tmp_path / "bad", add_head)
    with pytest.raises(ConversionError, match="lm_head.weight differs"):
        hf_to_params(bad)
    same = corrupt_copy(hf_dir, tmp_path / "same", lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"]})
    config, params = hf_to_params(same)
    assert "lm_head" not in params


# --- dtypes and shards ----------------------------------------------------


def test_bfloat16_cast_equals_torch(qwen3_dir):
    hf_dir, model = qwen3_dir
    config, params = hf_to_params(hf_dir, "bfloat16")
    assert config.param_dtype == "bfloat16"
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {np.dtype(ml_dtypes.bfloat16)}
    state = model.state_dict()
    torch_q = state["model.layers.1.self_attn.q_proj.weight"].bfloat16().view(torch.int16).numpy()
    ours_q = params["layers"]["self_attn"]["q_proj"]["kernel"][1]
    ours_q = ours_q.reshape(config.hidden_size, -1).T.view(np.int16)
    np.testing.assert_array_equal(ours_q, torch_q)
    torch_e = state["model.embed_tokens.weight"].bfloat16().view(torch.int16).numpy()
    np.testing.assert_array_equal(params["embed_tokens"]["embedding"].view(np.int16), torch_e)


def test_bfloat16_files_are_read_exactly(tmp_path):
    hf_dir, model = hf_models.make_checkpoint(tmp_path / "hf", "qwen3", dtype="bfloat16")
    config, params = hf_to_params(hf_dir)  # default keeps bfloat16
    assert config.param_dtype == "bfloat16"
    up = model.state_dict()["model.layers.0.mlp.up_proj.weight"].view(torch.int16).numpy()
    np.testing.assert_array_equal(params["layers"]["mlp"]["up_proj"]["kernel"][0].T.view(np.int16), up)
    _, params32 = hf_to_params(hf_dir, "float32")
    np.testing.assert_array_equal(
        params32["layers"]["mlp"]["up_proj"]["kernel"][0].T,
        model.state_dict()["model.layers.0.mlp.up_proj.weight"].float().numpy(),
    )


def test_sharded_input_converts(qwen3_dir, tmp_path):
    hf_dir, model = qwen3_dir
    sharded = hf_models.save_model(model, tmp_path / "sharded", max_shard_size="100KB")
    with open(os.path.join(sharded, SAFETENSORS_INDEX)) as f:
        assert len(set(json.load(f)["weight_map"].values())) >= 2
    _, want = hf_to_params(hf_dir)
    _, got = hf_to_params(sharded)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_missing_shard_file_reported(qwen3_dir, tmp_path):
    sharded = hf_models.save_model(qwen3_dir[1], tmp_path / "sharded", max_shard_size="100KB")
    victim = sorted(f for f in os.listdir(sharded) if f.endswith(".safetensors"))[0]
    os.remove(os.path.join(sharded, victim))
    with pytest.raises(ConversionError, match=f"shard files that do not exist: \\['{victim}'\\]"):
        hf_to_params(sharded)


# --- params checkpoints ---------------------------------------------------


def test_checkpoint_round_trip_with_dtype_and_shardings(qwen3_dir, tmp_path):
    hf_dir, _ = qwen3_dir
    (hf_dir_tok := tmp_path / "hf").mkdir()
    for f in os.listdir(hf_dir):
        shutil.copy(os.path.join(hf_dir, f), hf_dir_tok)
    (hf_dir_tok / "tokenizer.json").write_text("{}")
    config = hf_to_jax(hf_dir_tok, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "tokenizer.json").read_text() == "{}"
    assert load_hf_config(tmp_path / "ckpt") == config.replace(param_dtype="float32")
    _, want = hf_to_params(hf_dir)

    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)

    def sharding(shape):
        spec = [None] * len(shape)
        if shape[-1] % 4 == 0:
            spec[-1] = "model"
        return jax.sharding.NamedSharding(mesh, jax.P(*spec))

    shardings = jax.tree.map(sharding, param_shapes(config), is_leaf=lambda x: isinstance(x, tuple))
    loaded_config, got = load_params_checkpoint(tmp_path / "ckpt", "bfloat16", shardings)
    assert loaded_config.param_dtype == "bfloat16"
    kernel = got["layers"]["mlp"]["up_proj"]["kernel"]
    assert kernel.sharding == shardings["layers"]["mlp"]["up_proj"]["kernel"]
    assert len(kernel.addressable_shards) == 8 and kernel.addressable_shards[0].data.shape == (3, 64, 32)
    jax.tree.map(
        lambda g, w: np.testing.assert_array_equal(np.asarray(g), w.astype(ml_dtypes.bfloat16)), got, want
    )

    with pytest.raises(ConversionError, match="shardings tree"):
        load_params_checkpoint(tmp_path / "ckpt", shardings={"embed_tokens": None})


def test_save_params_checkpoint_checks_shapes(tmp_path):
    config = get_preset("tiny")
    params = transformer.init_params(config, jax.random.key(1))
    params["layers"]["mlp"]["down_proj"]["kernel"] = params["layers"]["mlp"]["down_proj"]["kernel"][:, :5]
    del params["norm"]
    with pytest.raises(ConversionError) as err:
        save_params_checkpoint(tmp_path / "ckpt", config, params)
    assert "missing param norm/scale [64]" in str(err.value)
    assert "wrong shape for layers/mlp/down_proj/kernel: got [3, 5, 64], expected [3, 128, 64]" in str(err.value)
    assert not (tmp_path / "ckpt").exists()


def test_save_and_load_trained_params(tmp_path):
    """What the trainer does: save jax params of a preset, load them back."""
    config = get_preset("tiny")
    params = transformer.init_params(config, jax.random.key(2))
    save_params_checkpoint(tmp_path / "ckpt", config, params)
    loaded_config, loaded = load_params_checkpoint(tmp_path / "ckpt")
    assert loaded_config.block_size == config.block_size
    assert loaded_config.mask_token_id == config.mask_token_id
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_rules_name_every_tensor_of_a_released_sdar_checkpoint():
    index = os.path.join(REFERENCE_DIR, "configs", "SDAR-4B-Chat.safetensors.index.json")
    if not os.path.isfile(index):
        pytest.skip(f"reference index not found at {index}")
    with open(index) as f:
        released = set(json.load(f)["weight_map"])
    config = get_preset("sdar-4b")
    expected = {name for rule in tensor_rules(config) for name, _ in rule.instances(config)}
    assert released == expected


def test_peak_memory_is_one_output_copy_plus_a_tensor(tmp_path):
    """hf_to_params streams: traced allocations stay below the output plus a
    few tensors (a second copy of the model would add 13 of the largest)."""
    import math
    import tracemalloc

    hf_dir, _ = hf_models.make_checkpoint(tmp_path / "hf", "qwen3", num_hidden_layers=6, intermediate_size=256)
    tracemalloc.start()
    try:
        config, params = hf_to_params(hf_dir)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    output = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
    largest = max(math.prod(rule.hf_shape) * 4 for rule in tensor_rules(config))
    assert output > 12 * largest
    assert peak < output + 3 * largest


def test_export_bfloat16_loads_in_transformers(qwen3_dir, tmp_path):
    hf_dir, model = qwen3_dir
    hf_to_jax(hf_dir, tmp_path / "ckpt")
    argv = ["jax-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"]
    assert convert_checkpoint.main(argv) == 0
    with safe_open(str(tmp_path / "bf16" / SAFETENSORS_SINGLE), framework="numpy") as f:
        assert {f.get_slice(n).get_dtype() for n in f.keys()} == {"BF16"}
    reloaded = hf_models.load_model(tmp_path / "bf16", dtype="bfloat16")
    original = model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, original[name].bfloat16()), name
