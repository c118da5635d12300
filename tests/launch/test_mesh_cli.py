"""launch/evaluate.py and launch/generate.py with --mesh on 8 fake CPU devices: the same results as
one device (dense and MoE checkpoints, one strategy each: every strategy on every mesh is
tests/test_sharded_inference.py), one-line errors for bad meshes, and a two-process evaluate run
equal to one process."""

from __future__ import annotations

import json
import os
import re
import sys

import jax
import pytest

from launch import evaluate, generate
from sdar_jax.checkpoint.params import save_params_checkpoint
from sdar_jax.config import get_preset
from sdar_jax.data import tasks
from sdar_jax.data.tokenizer import CHAR_TOKENIZER_DIR
from sdar_jax.model import transformer
from tests.helpers import processes

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = 420
# Sampled (temperature 1) with a dynamic threshold: PRNG keys per row and ragged block counts.
DECODING = ["--block-length", "4", "--strategy", "low_confidence_dynamic", "--threshold", "0.3",
            "--temperature", "1.0", "--max-new-tokens", "8", "--compilation-cache", "off"]
EVALUATE = ["--chat", "--n-samples", "2", "--batch-size", "4", "--num-buckets", "1", "--no-progress"]
# Measured per run, not results.
TIMING = ("wall_seconds", "compile_seconds", "decode_seconds", "tokens_per_second")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Tiny one-layer dense and MoE checkpoints with the char tokenizer, and 5 problems."""
    tmp = tmp_path_factory.mktemp("mesh_cli")
    for seed, preset in enumerate(("tiny", "tiny-moe")):
        config = get_preset(preset, vocab_size=103, num_layers=1, mask_token_id=4, eos_token_id=1,
                            bos_token_id=1)
        params = jax.device_get(transformer.init_params(config, jax.random.key(seed)))
        save_params_checkpoint(tmp / preset, config, params, aux_dir=CHAR_TOKENIZER_DIR)
    tasks.write_jsonl(tmp / "test.jsonl", tasks.load_split("test")[::80])
    (tmp / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in (
        {"prompt": "12+7="}, {"prompt_ids": [20, 21, 22, 23, 24, 25]}, {"prompt": "hello"})))
    return tmp


def _evaluate_argv(workdir, preset: str, output) -> list[str]:
    return ["--ckpt", str(workdir / preset), "--data", str(workdir / "test.jsonl"), "--output", str(output),
            *EVALUATE, *DECODING]


def _evaluated(output) -> tuple[list[dict], dict]:
    summary = json.loads(output.with_suffix(".summary.json").read_text())
    return ([json.loads(line) for line in output.read_text().splitlines()],
            {k: v for k, v in summary.items() if k not in TIMING})


@pytest.fixture(scope="module")
def one_device(workdir):
    """evaluate.py without --mesh (one device), per checkpoint."""
    out = {}
    for preset in ("tiny", "tiny-moe"):
        output = workdir / f"{preset}_one_device.jsonl"
        assert evaluate.main(_evaluate_argv(workdir, preset, output)) == 0
        out[preset] = _evaluated(output)
    return out


@pytest.mark.parametrize("preset, mesh", [("tiny", "fsdp=4,tensor=2"), ("tiny-moe", "data=2,tensor=2,expert=2")])
def test_evaluate_on_a_mesh_equals_one_device(workdir, one_device, preset, mesh, tmp_path):
    output = tmp_path / "mesh.jsonl"
    assert evaluate.main(_evaluate_argv(workdir, preset, output) + ["--mesh", mesh]) == 0
    records, summary = _evaluated(output)
    want_records, want_summary = one_device[preset]
    assert records == want_records
    assert summary == want_summary
    texts = {s["text"] for r in records for s in r["samples"]}
    assert len(texts) > 1  # the samples differ, so equal records are not equal by accident


def test_generate_on_a_mesh_equals_one_device(workdir, tmp_path, capsys):
    argv = ["--ckpt", str(workdir / "tiny"), "--prompts-file", str(workdir / "prompts.jsonl"),
            "--batch-size", "2", *DECODING]
    results = []
    for extra in ([], ["--mesh", "data=2,tensor=4"]):
        output = tmp_path / f"out{len(results)}.jsonl"
        assert generate.main(argv + ["--output", str(output), *extra]) == 0, capsys.readouterr().err
        results.append([json.loads(line) for line in output.read_text().splitlines()])
    assert results[0] == results[1]
    assert [r["index"] for r in results[1]] == [0, 1, 2]
    assert len({tuple(r["completion_ids"]) for r in results[1]}) == 3


@pytest.mark.parametrize("cli", [evaluate, generate], ids=["evaluate", "generate"])
@pytest.mark.parametrize("mesh, message", [
    pytest.param("tensor=two", "--mesh 'tensor=two': size 'two' of 'tensor' is not an integer", id="size"),
    pytest.param("model=2", "--mesh 'model=2': unknown mesh axis 'model'", id="axis"),
    pytest.param("fsdp=3", "--mesh 'fsdp=3': mesh .* does not divide the 8 devices", id="devices"),
])
def test_bad_mesh_is_one_line_and_exit_2(workdir, capsys, cli, mesh, message):
    if cli is evaluate:
        argv = ["--ckpt", str(workdir / "tiny"), "--data", str(workdir / "test.jsonl"), "--no-progress"]
    else:
        argv = ["--ckpt", str(workdir / "tiny"), "--prompt", "hi"]
    assert cli.main(argv + ["--mesh", mesh, "--compilation-cache", "off"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith(f"{cli.__name__.split('.')[-1]}: error: ")
    assert re.search(message, err), err


@pytest.mark.slow
def test_two_process_evaluate_equals_one_process(workdir, one_device, tmp_path):
    """Two processes of 4 CPU devices each (a local coordinator, gloo collectives) evaluate on one
    8-device mesh spanning both; process 0 writes what one process writes, process 1 nothing."""
    coordinator = f"127.0.0.1:{processes.free_port()}"
    outputs = [tmp_path / f"process_{i}.jsonl" for i in range(2)]
    argvs = [[sys.executable, os.path.join(REPO, "launch", "evaluate.py"),
              *_evaluate_argv(workdir, "tiny", outputs[i]), "--mesh", "data=2,fsdp=2,tensor=2"]
             for i in range(2)]
    envs = [processes.cpu_process_env(
        4, JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
        JAX_DEFAULT_MATMUL_PRECISION="highest", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
        for i in range(2)]
    # Each process has 4 devices: only the joined run has the mesh's 8 (else exit 2).
    processes.run_processes(argvs, envs, str(tmp_path / "evaluate"), TIMEOUT_S, cwd=REPO)
    assert _evaluated(outputs[0]) == one_device["tiny"]
    assert not outputs[1].exists() and not outputs[1].with_suffix(".summary.json").exists()
