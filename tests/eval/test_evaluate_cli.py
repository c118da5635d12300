"""launch/evaluate.py on a tiny converted checkpoint: outputs, summary bookkeeping, usage errors."""

from __future__ import annotations

import importlib.util
import json
import os

import jax
import pytest

from sdar_jax.checkpoint.params import save_params_checkpoint
from sdar_jax.config import get_preset
from sdar_jax.data import tasks
from sdar_jax.data.tokenizer import CHAR_TOKENIZER_DIR
from sdar_jax.model import transformer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_cli():
    spec = importlib.util.spec_from_file_location("evaluate_cli", os.path.join(ROOT, "launch", "evaluate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate_cli")
    cfg = get_preset("tiny", vocab_size=103, num_layers=1, mask_token_id=4, eos_token_id=1,
                     bos_token_id=1)
    params = transformer.init_params(cfg, jax.random.key(0))
    ckpt = tmp / "ckpt"
    save_params_checkpoint(ckpt, cfg, params, aux_dir=CHAR_TOKENIZER_DIR)
    data = tmp / "test.jsonl"
    tasks.write_jsonl(data, tasks.load_split("test")[::80])  # 5 problems, several tasks
    return _load_cli(), ckpt, data, tmp


def test_evaluate_writes_records_and_a_consistent_summary(setup, capsys):
    cli, ckpt, data, tmp = setup
    out = tmp / "out.jsonl"
    rc = cli.main([
        "--ckpt", str(ckpt), "--data", str(data), "--chat", "--n-samples", "2", "--k", "1,2",
        "--temperature", "1.0", "--block-length", "4", "--threshold", "0.9",
        "--max-new-tokens", "8", "--output", str(out), "--batch-size", "4", "--num-buckets", "2",
        "--no-progress",
    ])
    assert rc == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    summary = json.loads((tmp / "out.summary.json").read_text())
    expected = tasks.read_jsonl(data)
    assert [r["prompt"] for r in records] == [e["prompt"] for e in expected]
    assert all(len(r["samples"]) == 2 for r in records)
    # The summary's counts are the records' sums.
    samples = [s for r in records for s in r["samples"]]
    assert summary["num_forwards"] == sum(s["num_forwards"] for s in samples)
    assert summary["generated_tokens"] == sum(s["num_tokens"] for s in samples)
    assert summary["tpf"] == pytest.approx(
        sum(s["num_committed"] for s in samples) / sum(s["num_forwards"] for s in samples))
    assert summary["accuracy"] == pytest.approx(sum(s["correct"] for s in samples) / len(samples))
    assert all(1 <= s["num_tokens"] <= 8 for s in samples)
    assert summary["decode_config"]["mode"] == "diffusion"  # the checkpoint has a mask token
    assert summary["decode_config"]["stop_ids"] == [1, 3]  # the tokenizer's stop ids
    assert set(summary["pass_at_k"]) == {"1", "2"}
    printed = capsys.readouterr().out
    assert f"TPF={summary['tpf']:.3f}" in printed


@pytest.mark.parametrize("extra, message", [
    (["--n-samples", "2"], "temperature > 0"),
    (["--k", "2"], "ks"),
    (["--mode", "diffusion", "--threshold", "1.5"], "threshold"),
    (["--data", "/nonexistent.jsonl"], "does not exist"),
])
def test_evaluate_usage_errors_exit_2(setup, capsys, extra, message):
    cli, ckpt, data, _ = setup
    argv = ["--ckpt", str(ckpt), "--data", str(data), "--max-new-tokens", "4", "--no-progress"]
    assert cli.main(argv + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("evaluate: error:") and message in err


@pytest.fixture(autouse=True)
def _no_disk_cache(monkeypatch):
    """The CLI's persistent compilation cache stays off in tests (it is process-global)."""
    monkeypatch.setenv("SDAR_JAX_COMPILATION_CACHE", "off")


def test_unwritable_outputs_are_refused_before_any_work(setup, capsys):
    cli, _, data, tmp = setup
    blocker = tmp / "blocker"
    blocker.write_text("")
    for flag, path in (("--output", tmp), ("--output", blocker / "o.jsonl"),
                       ("--summary", tmp)):
        # The checkpoint does not exist: the output paths are checked first.
        rc = cli.main(["--ckpt", str(tmp / "missing"), "--data", str(data), flag, str(path)])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and flag in err and str(path) in err


@pytest.mark.parametrize("extra, message", [
    (["--block-length", "0"], "--block-length must be >= 1, got 0"),
    (["--stop-ids", "103"], "id 103 is outside the vocabulary [0, 103)"),
])
def test_bad_block_length_and_stop_ids_exit_2(setup, capsys, extra, message):
    cli, ckpt, data, _ = setup
    assert cli.main(["--ckpt", str(ckpt), "--data", str(data), "--no-progress"] + extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
