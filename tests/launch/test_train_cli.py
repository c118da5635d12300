"""launch/train.py end to end: configs/tiny.py with command-line overrides trains a
few steps on the shipped task data, writes checkpoints, event files and the
exported params, and rejects a config with a required field unset."""

import glob
import os
import subprocess
import sys

from sdar_jax.convert import load_params_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _train(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "launch/train.py", "--config=configs/tiny.py", *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )


def test_tiny_config_trains_and_writes_checkpoints_events_export(tmp_path):
    workdir = tmp_path / "run"
    proc = _train(
        f"--config.train.workdir={workdir}", "--config.train.steps=4",
        "--config.train.checkpoint_every=2", "--config.train.eval_every=2",
        "--config.train.eval_batches=1", "--config.train.log_every=1",
        "--config.optimizer.warmup_steps=1",
        "--config.data.seq_len=128", "--config.data.global_batch_size=8",
        "--config.model.overrides.num_layers=2",
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
    assert len(events) == 1 and os.path.getsize(events[0]) > 0

    config, params = load_params_checkpoint(workdir / "export")
    assert (config.num_layers, config.vocab_size, config.mask_token_id) == (2, 128, 4)
    assert params["embed_tokens"]["embedding"].shape == (128, 64)
    assert os.path.isfile(workdir / "export" / "tokenizer.json")


def test_unset_required_field_exits_2():
    proc = _train()
    assert proc.returncode == 2
    assert "train.workdir is required" in proc.stderr
