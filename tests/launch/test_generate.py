"""launch/generate.py end to end on tiny converted checkpoints."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from launch import generate as cli
from sdar_jax.checkpoint.params import save_params_checkpoint
from sdar_jax.config import get_preset
from sdar_jax.convert.from_hf import hf_to_jax
from sdar_jax.data.tokenizer import load_char_tokenizer
from sdar_jax.decode.decoder import DecodeConfig, generate
from sdar_jax.model import transformer
from tests.helpers import hf_models

CHAR_TOKENIZER = os.path.join(os.path.dirname(cli.__file__), "..", "sdar_jax", "data", "assets",
                              "char_tokenizer")


@pytest.fixture(scope="module")
def sdar_ckpt(tmp_path_factory):
    """A tiny random SDAR checkpoint carrying the demo's char tokenizer."""
    tokenizer = load_char_tokenizer()
    config = get_preset("tiny", vocab_size=tokenizer.vocab_size, num_layers=2,
                        mask_token_id=tokenizer.mask_token_id, eos_token_id=1)
    params = transformer.init_params(config, jax.random.key(1))
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 20
    out = tmp_path_factory.mktemp("sdar") / "ckpt"
    save_params_checkpoint(out, config, jax.device_get(params),
                                   aux_dir=os.path.abspath(CHAR_TOKENIZER))
    return str(out), config, params, tokenizer


@pytest.fixture(scope="module")
def ar_ckpt(tmp_path_factory):
    base = tmp_path_factory.mktemp("ar")
    hf_dir, _ = hf_models.make_checkpoint(base / "hf", "qwen3", num_hidden_layers=1, seed=2)
    hf_to_jax(hf_dir, base / "ckpt", "float32")
    return str(base / "ckpt")


def _run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_batched_prompts_file_to_output(sdar_ckpt, tmp_path, capsys):
    ckpt, config, params, tokenizer = sdar_ckpt
    prompts = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "12+7="}, {"prompt_ids": [20, 21, 22, 23, 24, 25]}, {"prompt": "hello"}]
    prompts.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    output = tmp_path / "out.jsonl"
    code, _, err = _run(
        capsys, "--ckpt", ckpt, "--prompts-file", prompts, "--output", output, "--batch-size", 2,
        "--block-length", 4, "--steps", 4, "--strategy", "low_confidence_dynamic",
        "--threshold", 0.5, "--max-new-tokens", 12,
    )
    assert code == 0, err
    assert "TPF=" in err and "tokens/s=" in err
    results = [json.loads(x) for x in output.read_text().splitlines()]
    assert len(results) == 3
    # Each result equals the decoder run on that prompt alone, with the
    # tokenizer's stop ids (<|endoftext|>, <|im_end|>).
    dc = DecodeConfig(block_length=4, steps=4, threshold=0.5, max_new_tokens=12,
                      stop_ids=tokenizer.stop_token_ids)
    for line, result in zip(lines, results):
        ids = line.get("prompt_ids") or tokenizer.encode(line["prompt"])
        padded = np.zeros((1, 8), np.int32)  # one shape (one compilation) for all three
        padded[0, : len(ids)] = ids
        alone = jax.device_get(generate(params, config, jnp.asarray(padded),
                                        jnp.asarray([len(ids)]), jax.random.key(0), dc))
        want = alone.tokens[0, : int(alone.lengths[0])].tolist()
        assert result["completion_ids"] == want
        assert result["num_forwards"] == int(alone.num_forwards[0])
        assert result["tokens_per_forward"] == pytest.approx(float(alone.tokens_per_forward[0]))
        text_ids = want[:-1] if want and want[-1] in tokenizer.stop_token_ids else want
        assert result["completion"] == tokenizer.decode(text_ids)


def test_single_prompt_streams_text(sdar_ckpt, tmp_path, capsys):
    ckpt, *_ = sdar_ckpt
    args = ("--ckpt", ckpt, "--prompt", "abc", "--chat", "--block-length", 4, "--max-new-tokens", 8,
            "--strategy", "said", "--said-stages", 2, "--steps", 3, "--stop-ids", "")
    code, streamed, err = _run(capsys, *args)
    assert code == 0, err
    code, _, err = _run(capsys, *args, "--output", tmp_path / "one.jsonl")
    assert code == 0, err
    completion = json.loads((tmp_path / "one.jsonl").read_text())["completion"]
    assert streamed == completion + "\n"
    assert len(completion) > 0


def test_ar_checkpoint_decodes_in_ar_mode(ar_ckpt, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt_ids": [5, 6, 7]}\n{"prompt_ids": [9]}\n')
    output = tmp_path / "o.jsonl"
    code, _, err = _run(capsys, "--ckpt", ar_ckpt, "--prompts-file", prompts, "--output", output,
                        "--max-new-tokens", 5, "--stop-ids", "")
    assert code == 0, err
    results = [json.loads(x) for x in output.read_text().splitlines()]
    assert [len(r["completion_ids"]) for r in results] == [5, 5]
    assert all(r["num_forwards"] == 5 and r["tokens_per_forward"] == 1.0 for r in results)
    assert all(r["completion"] is None for r in results)  # no tokenizer files in this checkpoint


@pytest.mark.parametrize(
    "extra,needle",
    [
        (("--prompt", ""), "empty"),
        (("--prompt", "abc", "--max-new-tokens", 600), "600"),
        (("--prompt", "abc", "--strategy", "greedy_fast"), "greedy_fast"),
        (("--prompt", "abc", "--threshold", 1.5), "1.5"),
        (("--prompt", "abc", "--strategy", "said", "--steps", 1, "--said-rec-steps", 1), "budget"),
    ],
)
def test_errors_are_one_line(sdar_ckpt, capsys, extra, needle):
    ckpt, *_ = sdar_ckpt
    code, _, err = _run(capsys, "--ckpt", ckpt, *extra)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("generate: error:") and needle in err


def test_diffusion_mode_needs_a_mask_token(ar_ckpt, capsys):
    code, _, err = _run(capsys, "--ckpt", ar_ckpt, "--prompt", "x", "--tokenizer", CHAR_TOKENIZER,
                        "--mode", "diffusion")
    assert code == 2 and "mask_token_id" in err and err.count("\n") == 1


def test_unknown_strategy_lists_valid_ones(sdar_ckpt, capsys):
    code, _, err = _run(capsys, "--ckpt", sdar_ckpt[0], "--prompt", "a", "--strategy", "nope")
    assert code == 2
    assert all(name in err for name in ("sequential", "entropy_bounded", "said_chlg"))


@pytest.fixture(autouse=True)
def _no_disk_cache(monkeypatch):
    """The CLI's persistent compilation cache stays off in tests (it is process-global)."""
    monkeypatch.setenv("SDAR_JAX_COMPILATION_CACHE", "off")


def test_bad_output_is_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    # The checkpoint does not exist either: the output is checked first.
    for output, needle in ((tmp_path, "is a directory"), (blocker / "x.jsonl", "not a directory")):
        code, _, err = _run(capsys, "--ckpt", tmp_path / "missing", "--prompt", "a",
                            "--output", output)
        assert code == 2 and err.count("\n") == 1 and str(output) in err and needle in err


@pytest.mark.parametrize(
    "extra,needle",
    [
        (("--block-length", 0), "--block-length must be >= 1, got 0"),
        (("--stop-ids", "3,100000"), "id 100000 is outside the vocabulary"),
        (("--stop-ids", "-1"), "id -1 is outside the vocabulary"),
    ],
)
def test_bad_block_length_and_stop_ids(sdar_ckpt, capsys, extra, needle):
    ckpt, config, *_ = sdar_ckpt
    code, _, err = _run(capsys, "--ckpt", ckpt, "--prompt", "abc", *extra)
    assert code == 2 and err.count("\n") == 1 and needle in err
    if "stop" in needle:
        assert str(config.vocab_size) in err


def test_results_are_written_as_they_finish(sdar_ckpt, tmp_path, capsys, monkeypatch):
    """More prompts than slots: every result reaches the file during decoding (a
    failure afterwards loses none), and the finished file is in input order."""
    from sdar_jax.eval import runner

    ckpt, *_ = sdar_ckpt
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_ids": list(range(20, 20 + n))}) + "\n"
                               for n in (3, 9, 5, 7, 4)))
    output = tmp_path / "out.jsonl"
    args = ("--ckpt", ckpt, "--prompts-file", prompts, "--output", output, "--batch-size", 2,
            "--block-length", 4, "--threshold", 0.5, "--max-new-tokens", 8, "--stop-ids", "40,41")

    def fail(self, records):
        raise RuntimeError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(runner.JsonlStream, "finish", fail)
        with pytest.raises(RuntimeError):
            _run(capsys, *args)
    streamed = [json.loads(x) for x in output.read_text().splitlines()]
    assert sorted(r["index"] for r in streamed) == list(range(5))
    code, _, err = _run(capsys, *args)
    assert code == 0, err
    final = [json.loads(x) for x in output.read_text().splitlines()]
    assert [r["index"] for r in final] == list(range(5))
    assert sorted(final, key=str) == sorted(streamed, key=str)
    assert not os.path.exists(str(output) + ".partial")


def test_compilation_cache_location(tmp_path, monkeypatch):
    import argparse

    from jax._src import compilation_cache

    from sdar_jax.decode import cli as decode_cli

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("SDAR_JAX_COMPILATION_CACHE")
    assert decode_cli.default_cache_dir() == str(tmp_path / "xdg" / "sdar_jax" / "jax")
    monkeypatch.setenv("SDAR_JAX_COMPILATION_CACHE", str(tmp_path / "env"))
    assert decode_cli.default_cache_dir() == str(tmp_path / "env")
    assert decode_cli.enable_compilation_cache(argparse.Namespace(compilation_cache="off")) is None
    chosen = str(tmp_path / "flag")
    try:
        assert decode_cli.enable_compilation_cache(argparse.Namespace(compilation_cache=chosen)) == chosen
        assert jax.config.jax_compilation_cache_dir == chosen and os.path.isdir(chosen)
    finally:
        jax.config.update("jax_compilation_cache_dir", None)
        compilation_cache.reset_cache()
