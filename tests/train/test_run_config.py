"""Run configs: the files under configs/, required fields, the model config they
resolve to, and the errors that name the offending field."""

import importlib.util
import json
import math
import os

import pytest

from sdar_jax.config import get_preset, to_hf_config
from sdar_jax.train import config as run_config
from sdar_jax.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAPER_CONFIGS = ("sdar_1p7b", "sdar_8b", "sdar_30b_a3b")


def _load(name: str, arg: str | None = None):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_tiny_config_resolves_and_matches_its_tokenizer():
    config = _load("tiny")
    config.train.workdir = "/tmp/unused"
    run_config.check_required(config)
    model = run_config.model_config(config)
    run_config.validate(config, model)
    tokenizer = loop._load_tokenizer(config, model)
    assert model.mask_token_id == tokenizer.mask_token_id == 4
    assert model.eos_token_id == tokenizer.eos_token_id == 1
    assert tokenizer.vocab_size <= model.vocab_size == 128
    assert os.path.isfile(config.data.train_path) and os.path.isfile(config.data.eval_path)
    ar = _load("tiny", "ar")
    assert ar.objective.kind == "ar" and run_config.data_block_size(ar, model) == 1
    with pytest.raises(ValueError, match="expected 'sdar' or 'ar'"):
        _load("tiny", "bert")


def test_tokenizer_mask_id_mismatch_is_named():
    config = _load("tiny")
    config.model.overrides.mask_token_id = 5
    model = run_config.model_config(config)
    with pytest.raises(run_config.RunConfigError, match="mask_token_id 5 differs from tokenizer"):
        loop._load_tokenizer(config, model)


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_configs_carry_the_spec_token_budgets(name):
    tokens_per_step = 4096 * 256
    for stage, tokens in (("pretrain", 50e9), ("sft", 4e9)):
        config = _load(name, stage)
        assert config.train.steps == math.ceil(tokens / tokens_per_step)
        assert config.data.seq_len * config.data.global_batch_size == tokens_per_step
        assert config.objective.kind == "sdar" and config.objective.block_size == 4
        assert config.model.overrides.mask_token_id == 151669
        assert (config.model.dtype, config.model.param_dtype) == ("bfloat16", "float32")
    with pytest.raises(run_config.RunConfigError, match="expected one of"):
        _load(name, "rl")


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_configs_name_their_unset_required_fields(name):
    config = _load(name)
    with pytest.raises(run_config.RunConfigError, match=r"train\.init_from is required.*--config\.train\.init_from="):
        run_config.check_required(config)
    config.train.init_from = "/ckpt"
    with pytest.raises(run_config.RunConfigError, match=r"data\.train_path is required"):
        run_config.check_required(config)


def test_init_from_supplies_the_architecture_and_overrides_apply(tmp_path):
    """An AR Qwen3 checkpoint (no mask token) + the SDAR recipe's overrides."""
    ar = get_preset("tiny").replace(model_type="qwen3", mask_token_id=None, block_size=None)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(to_hf_config(ar), f)
    config = _load("sdar_1p7b")
    config.train.init_from = str(tmp_path)
    config.model.overrides.update(dict(vocab_size=151936))
    model = run_config.model_config(config)
    assert (model.hidden_size, model.num_layers, model.model_type) == (64, 3, "qwen3")
    assert (model.mask_token_id, model.block_size, model.vocab_size) == (151669, 4, 151936)
    assert (model.dtype, model.remat_policy) == ("bfloat16", "dots_with_no_batch_dims_saveable")
    config.model.preset = "tiny"
    with pytest.raises(run_config.RunConfigError, match="unset model.preset"):
        run_config.model_config(config)


@pytest.mark.parametrize("field, value, message", [
    ("objective.kind", "mlm", "objective.kind is 'mlm'"),
    ("objective.normalization", "tokens", "objective.normalization is 'tokens'"),
    ("data.seq_len", 30, r"data.seq_len \(30\) must be a multiple of the block size \(4\)"),
    ("optimizer.grad_accum_steps", 3, r"global_batch_size \(16\) must be divisible"),
    ("train.keep", 0, "train.keep must be >= 1"),
])
def test_validate_names_the_bad_field(field, value, message):
    config = _load("tiny")
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(run_config.RunConfigError, match=message):
        run_config.validate(config, run_config.model_config(config))


def test_unset_model_source_is_named():
    config = run_config.base_config()
    with pytest.raises(run_config.RunConfigError, match="exactly one of model.preset and model.hf_config"):
        run_config.model_config(config)


def test_runtime_field_in_overrides_is_rejected():
    config = _load("tiny")
    config.model.overrides.dtype = "bfloat16"
    with pytest.raises(run_config.RunConfigError, match=r"names \['dtype'\].*model.dtype"):
        run_config.model_config(config)
