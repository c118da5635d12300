"""launch/train.py end to end: configs/tiny.py with command-line overrides trains a
few steps on the shipped task data, writes checkpoints, event files and the
exported params; bad input (a required field unset, a missing or truncated
tokenizer, a malformed data line) exits 2 with one line naming it."""

import glob
import os
import shutil
import subprocess
import sys

import pytest

from sdar_jax.checkpoint.params import load_params_checkpoint
from sdar_jax.data.tasks import TASK_DIR
from sdar_jax.data.tokenizer import CHAR_TOKENIZER_DIR

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """JAX's persistent compilation cache for this module's train.py processes: the runs share
    one model, batch shape and schedule (decay_steps fixed), so only the first compiles them."""
    return str(tmp_path_factory.mktemp("jax_cache"))


def _train(*overrides: str, cache: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if cache:
        env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return subprocess.run(
        [sys.executable, "launch/train.py", "--config=configs/tiny.py", *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env,
    )


# The model, batch and schedule every training run here shares (one set of compiled programs).
_SHARED = ("--config.optimizer.warmup_steps=1", "--config.optimizer.decay_steps=10",
           "--config.data.seq_len=128", "--config.data.global_batch_size=8",
           "--config.model.overrides.num_layers=2")


def test_tiny_config_trains_and_writes_checkpoints_events_export(tmp_path, compile_cache):
    workdir = tmp_path / "run"
    proc = _train(
        f"--config.train.workdir={workdir}", "--config.train.steps=4",
        "--config.train.checkpoint_every=2", "--config.train.eval_every=2",
        "--config.train.eval_batches=1", "--config.train.log_every=1", *_SHARED, cache=compile_cache,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "finished at step 4" in proc.stderr
    assert "step 2: eval loss=" in proc.stderr and "step 4: eval loss=" in proc.stderr
    steps = sorted(int(os.path.basename(p)) for p in glob.glob(str(workdir / "checkpoints" / "[0-9]*")))
    assert steps == [2, 4]
    for step in steps:
        items = set(os.listdir(workdir / "checkpoints" / str(step)))
        assert {"state", "data", "config"} <= items, items
    events = glob.glob(str(workdir / "tensorboard" / "events.out.tfevents.*"))
    # At most one event file per checkpoint interval: each checkpoint closes the file
    # (MetricsWriter.flush), the next scalars open another.
    assert 1 <= len(events) <= len(steps) and all(os.path.getsize(e) > 0 for e in events)

    config, params = load_params_checkpoint(workdir / "export")
    assert (config.num_layers, config.vocab_size, config.mask_token_id) == (2, 128, 4)
    assert params["embed_tokens"]["embedding"].shape == (128, 64)
    assert os.path.isfile(workdir / "export" / "tokenizer.json")


def test_unset_required_field_exits_2():
    proc = _train()
    assert proc.returncode == 2
    assert "train.workdir is required" in proc.stderr


# ---- bad input: one line, exit 2 (a non-finite loss is 3, a crash 1) ----------------------


def _tiny(workdir, *overrides, cache=None):
    return _train(
        f"--config.train.workdir={workdir}", "--config.train.checkpoint_every=2",
        "--config.train.eval_every=1000", "--config.train.log_every=1", *_SHARED,
        "--config.train.progress_bar=False", *overrides, cache=cache,
    )


def _last_line(proc):
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def test_missing_tokenizer_exits_2_naming_it(tmp_path):
    proc = _tiny(tmp_path / "run", f"--config.data.tokenizer_dir={tmp_path}/absent")
    assert proc.returncode == 2
    assert f"{tmp_path}/absent" in _last_line(proc) and "does not exist" in _last_line(proc)


def test_truncated_tokenizer_json_exits_2_naming_it(tmp_path):
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(CHAR_TOKENIZER_DIR, tokenizer)
    data = (tokenizer / "tokenizer.json").read_bytes()
    (tokenizer / "tokenizer.json").write_bytes(data[: len(data) // 2])
    proc = _tiny(tmp_path / "run", f"--config.data.tokenizer_dir={tokenizer}")
    assert proc.returncode == 2
    assert f"{tokenizer}/tokenizer.json could not be read" in _last_line(proc)


@pytest.mark.slow
def test_malformed_line_deep_in_the_data_exits_2_then_skip_finishes(tmp_path, compile_cache):
    lines = open(os.path.join(TASK_DIR, "train.jsonl")).read().splitlines()[:300]
    lines[99] = lines[99][:-5]  # line 100: cut off mid-object
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(lines) + "\n")
    common = (f"--config.data.train_path={train}", "--config.data.shuffle=False", "--config.train.steps=10")
    proc = _tiny(tmp_path / "run", *common, cache=compile_cache)
    assert proc.returncode == 2
    assert f"{train}:100: invalid JSON" in _last_line(proc)

    proc = _tiny(tmp_path / "run", *common, "--config.data.on_bad_record=skip",
                 "--config.train.allow_config_change=True", cache=compile_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train: finished at step 10 (1 malformed records skipped)" in proc.stderr.splitlines()
    assert f"{train}:100: invalid JSON" in proc.stderr  # the warning names the record
