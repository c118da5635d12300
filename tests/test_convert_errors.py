"""Bad input to the converter gives one line and exit 2, before anything is
written (damaged safetensors, unusable --out, --out equal to the input,
half-written params checkpoints), and export keeps the model's identity."""

from __future__ import annotations

import json
import os
import shutil

import jax
import pytest

import sdar_jax
from bench.convert_memory import write_synthetic_checkpoint
from launch import convert_checkpoint, evaluate, generate
from sdar_jax.checkpoint import atomic
from sdar_jax.checkpoint.errors import ConversionError
from sdar_jax.checkpoint.params import load_params_checkpoint, save_params_checkpoint
from sdar_jax.config import from_hf_config, get_preset, to_hf_config
from sdar_jax.convert.from_hf import hf_to_jax
from sdar_jax.convert.safetensors_io import SAFETENSORS_INDEX
from sdar_jax.convert.to_hf import ExportWarning, jax_to_hf
from sdar_jax.model import transformer
from tests.helpers import hf_models
from tests.helpers.shared import REFERENCE_DIR

CHAR_TOKENIZER = os.path.join(os.path.dirname(sdar_jax.__file__), "data", "assets", "char_tokenizer")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    return hf_models.make_checkpoint(tmp_path_factory.mktemp("q") / "hf", "qwen3", num_hidden_layers=2)[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, hf_dir) -> str:
    out = tmp_path_factory.mktemp("c") / "ckpt"
    hf_to_jax(hf_dir, out)
    return str(out)


def cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()  # drop what building the inputs printed (transformers' progress bars)
    code = convert_checkpoint.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("convert_checkpoint: error: "), err
    return lines[0]


# --- damaged safetensors ----------------------------------------------------


def _damage(path: str, how: str) -> None:
    data = open(path, "rb").read()
    damaged = {
        "truncated": data[:-100], "half": data[: len(data) // 2],
        "garbage": os.urandom(len(data)), "empty": b"",
    }[how]
    with open(path, "wb") as f:
        f.write(damaged)


@pytest.mark.parametrize("how", ["truncated", "half", "garbage", "empty"])
@pytest.mark.parametrize("sharded", [False, True])
def test_damaged_safetensors_is_one_line_naming_the_file(hf_dir, tmp_path, capsys, how, sharded):
    src = tmp_path / "src"
    if sharded:
        _, model = hf_models.make_checkpoint(tmp_path / "unused", "qwen3", num_hidden_layers=2)
        hf_models.save_model(model, src, max_shard_size="100KB")
    else:
        shutil.copytree(hf_dir, src)
    victim = sorted(p for p in os.listdir(src) if p.endswith(".safetensors"))[-1]
    _damage(str(src / victim), how)
    code, err = cli(capsys, "hf-to-jax", "--hf", src, "--out", tmp_path / "ckpt")
    assert code == 2
    line = one_line_error(err)
    assert str(src / victim) in line and "not a readable safetensors file" in line
    assert sorted(os.listdir(tmp_path)) == sorted(["src"] + (["unused"] if sharded else []))


def test_garbage_index_is_one_line(hf_dir, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(hf_dir, src)
    (src / SAFETENSORS_INDEX).write_text('{"weight_map": ')
    code, err = cli(capsys, "hf-to-jax", "--hf", src, "--out", tmp_path / "ckpt")
    assert code == 2 and "not a safetensors index" in one_line_error(err)


# --- the output is checked first --------------------------------------------


def test_unusable_out_is_refused_before_reading_the_input(tmp_path, capsys):
    """The output is checked first: an unreadable input is not even opened."""
    (tmp_path / "a_file").write_text("x")
    missing_input = tmp_path / "no-such-model"
    for out, expected in [
        (tmp_path / "a_file" / "ckpt", "parent directory does not exist"),
        (tmp_path / "no" / "such" / "ckpt", "parent directory does not exist"),
    ]:
        code, err = cli(capsys, "hf-to-jax", "--hf", missing_input, "--out", out)
        assert code == 2 and expected in one_line_error(err), err
    code, err = cli(capsys, "hf-to-jax", "--hf", missing_input, "--out", tmp_path / "a_file", "--overwrite")
    assert code == 2 and "is not a directory" in one_line_error(err)
    code, err = cli(capsys, "jax-to-hf", "--ckpt", missing_input, "--out", tmp_path / "a_file" / "x")
    assert code == 2 and "parent directory does not exist" in one_line_error(err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_parent_is_refused(hf_dir, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, err = cli(capsys, "hf-to-jax", "--hf", hf_dir, "--out", locked / "ckpt")
    finally:
        locked.chmod(0o755)
    assert code == 2 and "cannot create the output there" in one_line_error(err)


def test_refused_directory_creation_is_one_line(hf_dir, tmp_path, capsys, monkeypatch):
    """Whatever makes creating the output fail (a read-only mount, permissions) is one line."""
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(atomic.tempfile, "mkdtemp", refuse)
    code, err = cli(capsys, "hf-to-jax", "--hf", hf_dir, "--out", tmp_path / "ckpt")
    assert code == 2
    assert f"{tmp_path}: cannot create the output there (Permission denied)" in one_line_error(err)


@pytest.mark.parametrize("where", ["same", "parent"])
def test_out_that_would_replace_the_input_is_refused(hf_dir, ckpt, tmp_path, capsys, where):
    src = tmp_path / "model" / "hf"
    shutil.copytree(hf_dir, src)
    out = src if where == "same" else src.parent
    before = sorted(os.listdir(src))
    code, err = cli(capsys, "hf-to-jax", "--hf", src, "--out", out, "--overwrite")
    assert code == 2 and "would replace the input" in one_line_error(err)
    assert sorted(os.listdir(src)) == before
    own = tmp_path / "ckpt"
    shutil.copytree(ckpt, own)
    code, err = cli(capsys, "jax-to-hf", "--ckpt", own, "--out", own, "--overwrite")
    assert code == 2 and "would replace the input" in one_line_error(err)
    assert (own / "params").is_dir()


# --- half-written params checkpoints ---------------------------------------


def _half_written(ckpt: str, tmp_path, how: str) -> str:
    bad = tmp_path / f"bad-{how}"
    shutil.copytree(ckpt, bad)
    params = bad / "params"
    if how == "no_metadata":
        (params / "_METADATA").unlink()
    elif how == "no_array":
        shutil.rmtree(params / "layers.mlp.up_proj.kernel")
    elif how == "no_chunk":
        (params / "layers.mlp.up_proj.kernel" / "1.0.0").unlink()
    elif how == "cut_chunk":
        chunk = params / "layers.self_attn.q_proj.kernel" / "0.0.0.0"
        chunk.write_bytes(chunk.read_bytes()[:10])
    elif how == "empty_params":
        shutil.rmtree(params)
        params.mkdir()
    return str(bad)


HOWS = ["no_metadata", "no_array", "no_chunk", "cut_chunk", "empty_params"]


@pytest.mark.parametrize("how", HOWS)
def test_half_written_checkpoint_to_jax_to_hf(ckpt, tmp_path, capsys, how):
    bad = _half_written(ckpt, tmp_path, how)
    code, err = cli(capsys, "jax-to-hf", "--ckpt", bad, "--out", tmp_path / "out")
    assert code == 2
    line = one_line_error(err)
    assert bad in line and ("incomplete" in line or "damaged" in line or "unreadable" in line), line
    assert not (tmp_path / "out").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")]


@pytest.mark.parametrize("how", HOWS)
def test_half_written_checkpoint_to_load(ckpt, tmp_path, how):
    bad = _half_written(ckpt, tmp_path, how)
    with pytest.raises(ConversionError) as err:
        load_params_checkpoint(bad)
    assert bad in str(err.value) and "\n" not in str(err.value)


@pytest.fixture(scope="module")
def char_ckpt(tmp_path_factory):
    from sdar_jax.data.tokenizer import load_char_tokenizer

    tokenizer = load_char_tokenizer()
    config = get_preset("tiny", vocab_size=tokenizer.vocab_size, num_layers=1,
                        mask_token_id=tokenizer.mask_token_id)
    out = tmp_path_factory.mktemp("char") / "ckpt"
    save_params_checkpoint(out, config, transformer.init_params(config, jax.random.key(0)),
                                   aux_dir=CHAR_TOKENIZER)
    return str(out)


@pytest.mark.parametrize("how", ["no_metadata", "empty_params"])
def test_half_written_checkpoint_to_generate_and_evaluate(char_ckpt, tmp_path, capsys, how):
    bad = tmp_path / "bad"
    shutil.copytree(char_ckpt, bad)
    if how == "no_metadata":
        (bad / "params" / "_METADATA").unlink()
    else:
        shutil.rmtree(bad / "params")
        (bad / "params").mkdir()
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    runs = {
        "generate": lambda: generate.main(["--ckpt", str(bad), "--prompt", "1+1=", "--max-new-tokens", "4"]),
        "evaluate": lambda: evaluate.main(["--ckpt", str(bad), "--data", str(data), "--max-new-tokens", "4"]),
    }
    for name, run in runs.items():
        capsys.readouterr()
        code = run()
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2, (name, err)
        assert len(lines) == 1 and str(bad) in lines[0] and "StepMetadata" not in lines[0], (name, err)


# --- export keeps the model's identity --------------------------------------


def _tiny_released(name: str) -> dict:
    """A released SDAR config.json with every key kept and the sizes shrunk."""
    path = os.path.join(REFERENCE_DIR, "configs", f"{name}.config.json")
    if not os.path.isfile(path):
        pytest.skip(f"reference config not found at {path}")
    with open(path) as f:
        released = json.load(f)
    released.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, vocab_size=151936 // 512 * 2, max_window_layers=2)
    released["mask_token_id"] = released["vocab_size"] - 1
    return released


@pytest.mark.parametrize("name", ["SDAR-4B-Chat", "SDAR-8B-Chat"])
def test_released_sdar_config_survives_the_round_trip(tmp_path, capsys, name):
    released = _tiny_released(name)
    config = from_hf_config(released)
    src = tmp_path / "src"
    write_synthetic_checkpoint(str(src), config.replace(param_dtype="bfloat16"), hf_config=released)
    for module in ("configuration_sdar.py", "modeling_sdar.py"):  # the release's remote code
        (src / module).write_text(f"# {module}\n")
    assert cli(capsys, "hf-to-jax", "--hf", src, "--out", tmp_path / "ckpt")[0] == 0
    assert cli(capsys, "jax-to-hf", "--ckpt", tmp_path / "ckpt", "--out", tmp_path / "back")[0] == 0
    with open(tmp_path / "back" / "config.json") as f:
        back = json.load(f)
    assert back == released
    assert (back["model_type"], back["architectures"]) == ("sdar", ["SDARForCausalLM"])
    for module in ("configuration_sdar.py", "modeling_sdar.py"):
        assert (tmp_path / "back" / module).read_text() == f"# {module}\n"


def test_sdar_moe_keeps_its_architecture(tmp_path, capsys):
    """The released SDAR-30B-A3B names SDARMoeForCausalLM / sdar_moe."""
    config = get_preset("tiny-moe", param_dtype="float32")
    base = {**json.loads(json.dumps(to_hf_config(config))), "use_cache": False, "fuse_cross_entropy": True}
    src = tmp_path / "src"
    write_synthetic_checkpoint(str(src), config, hf_config=base)
    assert cli(capsys, "hf-to-jax", "--hf", src, "--out", tmp_path / "ckpt")[0] == 0
    assert cli(capsys, "jax-to-hf", "--ckpt", tmp_path / "ckpt", "--out", tmp_path / "back")[0] == 0
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert back == base
    assert (back["model_type"], back["architectures"]) == ("sdar_moe", ["SDARMoeForCausalLM"])


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_transformers_checkpoints_keep_their_config(tmp_path, capsys, family):
    hf, _ = hf_models.make_checkpoint(tmp_path / "hf", family, num_hidden_layers=1)
    source = json.loads(open(os.path.join(hf, "config.json")).read())
    assert cli(capsys, "hf-to-jax", "--hf", hf, "--out", tmp_path / "ckpt")[0] == 0
    assert cli(capsys, "jax-to-hf", "--ckpt", tmp_path / "ckpt", "--out", tmp_path / "back")[0] == 0
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert back == source
    model = hf_models.load_model(tmp_path / "back")
    assert type(model).__name__ == source["architectures"][0]


def test_model_trained_from_scratch_exports_as_sdar(char_ckpt, tmp_path, capsys):
    assert cli(capsys, "jax-to-hf", "--ckpt", char_ckpt, "--out", tmp_path / "back")[0] == 0
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (back["model_type"], back["architectures"]) == ("sdar", ["SDARForCausalLM"])
    assert back["mask_token_id"] == from_hf_config(back).mask_token_id is not None


def test_shifted_model_export_warns_and_says_so_in_config(tmp_path, capsys):
    config = get_preset("tiny", num_layers=1, logits_convention="shifted")
    save_params_checkpoint(tmp_path / "ckpt", config, transformer.init_params(config, jax.random.key(0)))
    code, err = cli(capsys, "jax-to-hf", "--ckpt", tmp_path / "ckpt", "--out", tmp_path / "back")
    assert code == 0
    assert "convert_checkpoint: warning: " in err and "cannot decode this model" in err
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert back["logits_convention"] == "shifted"
    with pytest.warns(ExportWarning, match="logits_convention='shifted'"):
        jax_to_hf(tmp_path / "ckpt", tmp_path / "again")


def test_causal_block_model_export_warns(tmp_path):
    config = get_preset("tiny", num_layers=1, block_attention="causal")
    save_params_checkpoint(tmp_path / "ckpt", config, transformer.init_params(config, jax.random.key(0)))
    with pytest.warns(ExportWarning, match="block_attention='causal'.*cannot decode this model"):
        jax_to_hf(tmp_path / "ckpt", tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["block_attention"] == "causal"
