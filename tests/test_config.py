"""ModelConfig: released SDAR configs load and match the presets; transformers'
own configs (4.x and 5.x styles) read back; bad values name their field."""

from __future__ import annotations

import json
import os

import pytest

from sdar_jax.config import ConfigError, ModelConfig, from_hf_config, get_preset, load_hf_config, to_hf_config
from tests.helpers import hf_models

from tests.helpers.shared import REFERENCE_DIR

REFERENCE = os.path.join(REFERENCE_DIR, "configs")
needs_reference = pytest.mark.skipif(
    not os.path.isdir(REFERENCE), reason=f"reference configs not found at {REFERENCE}"
)


def reference_config(name: str) -> dict:
    with open(os.path.join(REFERENCE, f"{name}.config.json")) as f:
        return json.load(f)


@needs_reference
@pytest.mark.parametrize("name,preset", [("SDAR-4B-Chat", "sdar-4b"), ("SDAR-8B-Chat", "sdar-8b")])
def test_released_configs_match_presets(name, preset):
    config = load_hf_config(os.path.join(REFERENCE, f"{name}.config.json"))
    assert config == get_preset(preset)
    assert (config.block_size, config.mask_token_id, config.eos_token_id) == (4, 151669, 151643)
    assert not config.tie_word_embeddings and config.qk_norm


@needs_reference
def test_sdar_4b_parameter_count_matches_released_weights():
    # The index's total_size counts bfloat16 bytes of every tensor.
    with open(os.path.join(REFERENCE, "SDAR-4B-Chat.safetensors.index.json")) as f:
        total_bytes = json.load(f)["metadata"]["total_size"]
    assert get_preset("sdar-4b").num_params * 2 == total_bytes


@pytest.mark.parametrize("name", ["tiny", "tiny-moe", "sdar-1.7b", "sdar-30b-a3b"])
def test_to_hf_config_round_trips(name):
    config = get_preset(name)
    hf = json.loads(json.dumps(to_hf_config(config)))  # what config.json holds
    assert from_hf_config(hf) == config
    # SDAR stays SDAR (engines recognise a block-diffusion model by these).
    assert (hf["model_type"], hf["architectures"]) == {
        "sdar": ("sdar", ["SDARForCausalLM"]), "sdar_moe": ("sdar_moe", ["SDARMoeForCausalLM"]),
    }[config.model_type]


@needs_reference
@pytest.mark.parametrize("name", ["SDAR-4B-Chat", "SDAR-8B-Chat"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_released_config_written_back_unchanged(name, dtype):
    """Every key of the release (fuse_cross_entropy, auto_map, rope_scaling,
    use_cache, ...) comes back; only the dtype written may change."""
    released = reference_config(name)
    config = from_hf_config(released, param_dtype=dtype)
    written = json.loads(json.dumps(to_hf_config(config, base=released)))
    assert written == {**released, "torch_dtype": dtype}


def test_moe_and_transformers5_keys_kept():
    """An SDAR-MoE config (the release's SDARMoeForCausalLM) and transformers
    5's spellings (dtype, rope_parameters, num_local_experts, an eos list)."""
    base = to_hf_config(get_preset("tiny-moe"))
    del base["torch_dtype"], base["rope_theta"], base["num_experts"]
    base.update(
        dtype="float32", rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        num_local_experts=8, eos_token_id=[1, 7], use_cache=False, fuse_cross_entropy=True,
        auto_map={"AutoModelForCausalLM": "modeling_sdar_moe.SDARMoeForCausalLM"},
    )
    config = from_hf_config(base)
    assert config.num_experts == 8 and config.eos_token_id == 1
    written = to_hf_config(config, base=base)
    assert written == base
    assert written["architectures"] == ["SDARMoeForCausalLM"]
    # A changed value is written, not the source's.
    assert to_hf_config(config.replace(eos_token_id=3), base=base)["eos_token_id"] == 3


@pytest.mark.parametrize("family,sdar_type", [("qwen3", "sdar"), ("qwen3_moe", "sdar_moe"), ("llama", None)])
def test_a_network_trained_with_the_sdar_objective_is_written_as_sdar(family, sdar_type):
    hf = hf_models.hf_config(family).to_dict()
    plain = from_hf_config(hf)
    assert to_hf_config(plain, base=hf)["model_type"] == family  # Qwen3 and Llama stay theirs
    adapted = plain.replace(mask_token_id=511, block_size=4)
    written = to_hf_config(adapted, base=hf)
    if sdar_type is None:  # there is no SDAR Llama: the family stays, with the SDAR fields
        assert written["model_type"] == "llama" and written["architectures"] == ["LlamaForCausalLM"]
    else:
        arch = {"sdar": "SDARForCausalLM", "sdar_moe": "SDARMoeForCausalLM"}[sdar_type]
        assert (written["model_type"], written["architectures"]) == (sdar_type, [arch])
    assert (written["mask_token_id"], written["block_size"]) == (511, 4)
    assert from_hf_config(written).replace(model_type=family) == adapted


@pytest.mark.parametrize("field,value", [("logits_convention", "shifted"), ("block_attention", "causal")])
def test_non_default_decoding_fields_are_written(field, value):
    config = get_preset("tiny", **{field: value})
    hf = to_hf_config(config)
    assert hf[field] == value
    assert from_hf_config(hf) == config
    assert field not in to_hf_config(get_preset("tiny"), base=hf)


@pytest.mark.parametrize("family", hf_models.FAMILIES)
@pytest.mark.parametrize("tie", [False, True])
def test_transformers_configs_read_back(family, tie):
    """transformers 5 writes rope_parameters and (for MoE) num_local_experts."""
    hf = hf_models.hf_config(family, tie_word_embeddings=tie, rope_theta=12345.0).to_dict()
    config = from_hf_config(hf)
    dims = hf_models.TINY_DIMS
    assert config.model_type == family
    assert config.rope_theta == 12345.0
    assert config.tie_word_embeddings == tie
    assert config.qk_norm == (family != "llama")
    assert (config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim) == (
        dims["hidden_size"], dims["num_attention_heads"], dims["num_key_value_heads"], dims["head_dim"]
    )
    if family == "qwen3_moe":
        moe = hf_models.TINY_MOE_DIMS
        assert (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size) == (
            moe["num_experts"], moe["num_experts_per_tok"], moe["moe_intermediate_size"]
        )
    else:
        assert not config.is_moe
    # And transformers reads ours: same architecture both ways.
    import transformers

    theirs = transformers.AutoConfig.for_model(**to_hf_config(config)).to_dict()
    assert from_hf_config(theirs) == config


def test_llama_defaults_head_dim_and_kv_heads():
    hf = dict(model_type="llama", vocab_size=100, hidden_size=64, num_hidden_layers=2,
              num_attention_heads=4, intermediate_size=96, rms_norm_eps=1e-5, rope_theta=1e5,
              max_position_embeddings=128, tie_word_embeddings=True)
    config = from_hf_config(hf)
    assert (config.head_dim, config.num_kv_heads, config.qk_norm) == (16, 4, False)


def _base_hf() -> dict:
    return to_hf_config(get_preset("tiny"))


@pytest.mark.parametrize(
    "edit,field",
    [
        (lambda h: h.pop("hidden_size"), "'hidden_size' is missing"),
        (lambda h: h.pop("rms_norm_eps"), "'rms_norm_eps' is missing"),
        (lambda h: h.update(model_type="gpt2"), "model_type 'gpt2' is not supported"),
        (lambda h: h.update(num_key_value_heads=3), "num_heads (4) must be divisible by num_kv_heads (3)"),
        (lambda h: h.update(num_hidden_layers=0), "num_layers must be a positive integer"),
        (lambda h: h.update(use_sliding_window=True), "use_sliding_window"),
        (lambda h: h.update(hidden_act="gelu"), "hidden_act 'gelu'"),
        (lambda h: h.update(attention_bias=True), "attention_bias"),
        (lambda h: h.update(mask_token_id=512), "mask_token_id 512 is outside the vocabulary"),
        (lambda h: h.update(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling type 'yarn'"),
        (lambda h: h.update(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4}),
         "rope_parameters.rope_type 'llama3'"),
    ],
)
def test_bad_config_names_the_field(edit, field):
    hf = _base_hf()
    edit(hf)
    with pytest.raises(ConfigError) as err:
        from_hf_config(hf, source="my/config.json")
    assert field in str(err.value)


def test_bad_moe_and_runtime_values_name_the_field():
    hf = to_hf_config(get_preset("tiny-moe"))
    hf["num_experts_per_tok"] = 9
    with pytest.raises(ConfigError, match=r"num_experts_per_tok \(9\) exceeds num_experts \(8\)"):
        from_hf_config(hf)
    with pytest.raises(ConfigError, match="ModelConfig.dtype is 'float16'"):
        get_preset("tiny", dtype="float16")
    with pytest.raises(ConfigError, match="unknown model preset 'huge'"):
        get_preset("huge")


def test_load_hf_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_hf_config(tmp_path)


def test_config_is_frozen_and_hashable():
    config = get_preset("tiny")
    assert isinstance(config, ModelConfig)
    assert hash(config) == hash(get_preset("tiny"))
    with pytest.raises(AttributeError):
        config.hidden_size = 3  # type: ignore[misc]
