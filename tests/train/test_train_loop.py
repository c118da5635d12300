"""The training loop: exact resume, eval and event files, the non-finite-loss stop,
SIGTERM and kill -9 (in a subprocess), the fallback from a damaged checkpoint and
the config check on resume."""

import glob
import json
import logging
import os
import shutil
import struct
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from train_synthetic import synthetic_iterator, tiny_config

from sdar_jax.checkpoint import integrity, train_state
from tests.test_checkpoint import DAMAGE
from sdar_jax.checkpoint.params import load_params_checkpoint, save_params_checkpoint
from sdar_jax.config import to_hf_config
from sdar_jax.model import transformer
from sdar_jax.train import loop
from sdar_jax.train import optimizer
from sdar_jax.train import config as run_config
from sdar_jax.train.state import abstract_train_state

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Runs of one config compile the same programs: share them through jax's
    persistent cache (each `train` call jits afresh)."""
    directory = str(tmp_path_factory.mktemp("jax_cache"))
    previous = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    yield directory
    jax.config.update("jax_compilation_cache_dir", previous[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[1])


def _config(workdir, steps):
    config = tiny_config(str(workdir), steps=steps)
    config.optimizer.decay_steps = 6  # the same schedule whatever train.steps says
    return config


def _eval_data():
    return [next(synthetic_iterator(seed=1))]


def _run(config, **kwargs):
    return loop.train(config, train_data=synthetic_iterator(), devices=jax.devices()[:1], **kwargs)


def _steps(workdir):
    names = (os.path.basename(p) for p in glob.glob(os.path.join(workdir, "checkpoints", "[0-9]*")))
    return sorted(int(n) for n in names if n.isdigit())


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    """One uninterrupted 6-step run (checkpoints 2, 4, 6; eval at 3 and 6; params exported), shared
    by the resume test (the step-for-step reference) and the damaged-checkpoint test (the source it
    damages and the params its reruns must reproduce)."""
    workdir = tmp_path_factory.mktemp("clean") / "full"
    config = _config(workdir, 6)
    config.train.export = True
    result = _run(config, eval_data=_eval_data)
    return workdir, result


def test_resume_is_exact_step_for_step(tmp_path, clean_run):
    full_dir, full = clean_run
    first = _run(_config(tmp_path / "split", 3))
    # A fresh iterator: the checkpoint must put it back at batch 3. train.steps
    # differs from the checkpoint's (the schedule does not: decay_steps is fixed).
    longer = _config(tmp_path / "split", 6)
    longer.train.allow_config_change = True
    second = _run(longer)

    assert (full.step, first.step, second.step) == (6, 3, 6)
    assert not (full.preempted or first.preempted or second.preempted)
    resumed = first.history + second.history
    for key in ("loss", "grad_norm", "accuracy", "learning_rate"):
        np.testing.assert_array_equal([h[key] for h in resumed], [h[key] for h in full.history], err_msg=key)
    assert len({h["loss"] for h in full.history}) == 6  # the steps really differ
    # Interval saves (2, 4, 6) plus the end of the first call (3).
    assert _steps(tmp_path / "split") == [2, 3, 4, 6]
    assert _steps(full_dir) == [2, 4, 6]

    # Eval at eval_every=3 and at the end, logged with the training scalars.
    assert [s for s, _ in full.eval_history] == [3, 6]
    assert all(np.isfinite(r["loss"]) and 0 <= r["accuracy"] <= 1 for _, r in full.eval_history)
    events = glob.glob(str(full_dir / "tensorboard" / "events.out.tfevents.*"))
    assert events and os.path.getsize(events[0]) > 0
    # A later call finds nothing left to do and computes nothing.
    again = _run(_config(tmp_path / "split", 6))
    assert again.step == 6 and again.history == []


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    config = _config(tmp_path, 6)
    with pytest.raises(loop.NonFiniteLossError, match="non-finite training metrics at step 5") as err:
        loop.train(config, train_data=synthetic_iterator(poison_batch=4), devices=jax.devices()[:1])
    assert err.value.step == 5 and err.value.last_checkpoint == 4
    assert _steps(tmp_path) == [2, 4]

    model = run_config.model_config(config)
    tx = optimizer.make_optimizer(config.optimizer, config.train.steps)
    abstract = train_state.with_shardings(abstract_train_state(model, tx))
    with train_state.Checkpointer(tmp_path / "checkpoints", save_every=2, keep=5) as ckpt:
        state, step, _ = ckpt.restore(abstract, synthetic_iterator())
    assert step == 4 and int(state.step) == 4
    assert all(bool(np.isfinite(x).all()) for x in jax.tree.leaves(state.params))


def test_init_from_a_params_checkpoint_and_export(tmp_path):
    """train.init_from loads converted params; step 1 has learning rate 0 (warmup
    from 0, decoupled decay scaled by it), so the export equals them exactly."""
    config = _config(tmp_path / "run", 1)
    model = run_config.model_config(config)
    params = transformer.init_params(model, jax.random.key(42))
    save_params_checkpoint(tmp_path / "init", model, params)
    config.train.init_from = str(tmp_path / "init")
    config.model.preset = None  # the architecture comes from init_from's config.json
    config.train.export = True
    result = _run(config)
    assert result.step == 1 and result.history[0]["learning_rate"] == 0.0
    exported_config, exported = load_params_checkpoint(result.export_dir)
    assert to_hf_config(exported_config) == to_hf_config(model)
    jax.tree.map(np.testing.assert_array_equal, exported, params)


# The child trains `_config`'s programs (the same schedule: decay_steps 6; the same matmul
# precision as tests/conftest.py) through this module's compilation cache, so it loads the train
# step the in-process runs compiled instead of compiling it again.
_CHILD = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {here!r})
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    jax.config.update("jax_compilation_cache_dir", {cache!r})
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    from train_synthetic import synthetic_iterator, tiny_config
    from sdar_jax.train import loop

    config = tiny_config({workdir!r}, steps=100000, checkpoint_every=2, log_every=50)
    config.optimizer.decay_steps = 6
    result = loop.train(config, train_data=synthetic_iterator(), devices=jax.devices()[:1])
    print(json.dumps({{"step": result.step, "preempted": result.preempted}}))
""")


def test_sigterm_saves_and_exits_cleanly(tmp_path, compilation_cache):
    workdir = str(tmp_path / "run")
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD.format(here=HERE, workdir=workdir, cache=compilation_cache)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 400
        while not os.path.isdir(os.path.join(workdir, "checkpoints", "2")):
            assert child.poll() is None, child.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the child never saved step 2"
            time.sleep(0.5)
        child.send_signal(signal.SIGTERM)
        stdout, stderr = child.communicate(timeout=300)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0, stderr[-3000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["preempted"] is True
    assert 2 <= result["step"] < 100000
    assert _steps(workdir)[-1] == result["step"]
    assert "preemption requested" in stderr


# ---- a damaged latest checkpoint -----------------------------------------------------------


def _exported(workdir, steps, **train):
    config = _config(workdir, steps)
    config.train.update(export=True, **train)
    result = _run(config)
    assert result.step == steps
    return load_params_checkpoint(result.export_dir)[1]


@pytest.mark.slow
def test_damaged_latest_checkpoint_falls_back_and_matches_a_clean_run(tmp_path, caplog, clean_run):
    source, result = clean_run
    clean = load_params_checkpoint(result.export_dir)[1]
    # Two representative kinds, one in the train state and one in the data-iterator state:
    # tests/test_checkpoint.py::test_damaged_latest_step_falls_back_to_the_newest_intact covers
    # every DAMAGE kind at the checkpointer level; here the loop's rerun from the fallback must
    # reproduce the clean run.
    for damage in ("flipped_bytes", "garbage_iterator_json"):
        workdir = tmp_path / damage
        shutil.copytree(source, workdir)
        shutil.rmtree(workdir / "export")
        # The newest step is damaged: the rerun must redo steps 5 and 6 from step 4.
        DAMAGE[damage](str(workdir / "checkpoints" / "6"))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sdar_jax.checkpoint"):
            params = _exported(workdir, 6)
        warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
        assert len(warnings) == 1 and "step 6" in warnings[0], (damage, warnings)
        jax.tree.map(np.testing.assert_array_equal, params, clean)
        assert _steps(workdir) == [2, 4, 6]  # step 6 rewritten, the damaged one set aside
        assert os.path.isdir(workdir / "checkpoints" / "6.damaged")


def test_no_intact_checkpoint_stops(tmp_path):
    _run(_config(tmp_path, 2))
    DAMAGE["flipped_bytes"](str(tmp_path / "checkpoints" / "2"))
    with pytest.raises(integrity.CheckpointIntegrityError, match="step 2: state/.*SHA-256"):
        _run(_config(tmp_path, 2))


# ---- the config check on resume ------------------------------------------------------------


def test_resume_refuses_architecture_and_data_layout_changes(tmp_path):
    _run(_config(tmp_path, 2))
    changed = _config(tmp_path, 2)
    changed.model.overrides.num_layers = 3
    changed.data.seq_len = 72
    changed.train.allow_config_change = True  # never enough for these
    with pytest.raises(run_config.ConfigChangeError) as err:
        _run(changed)
    message = str(err.value)
    assert "architecture or data layout" in message
    assert "model.overrides.num_layers: 2 -> 3" in message and "data.seq_len: 36 -> 72" in message


def test_resume_refuses_other_changes_unless_allowed(tmp_path, caplog):
    _run(_config(tmp_path, 2))
    changed = _config(tmp_path, 4)
    changed.optimizer.peak_lr = 1e-3
    changed.train.checkpoint_every = 1
    with pytest.raises(run_config.ConfigChangeError, match="allow_config_change=True") as err:
        _run(changed)
    for line in ("optimizer.peak_lr: 0.003 -> 0.001", "train.checkpoint_every: 2 -> 1", "train.steps: 2 -> 4"):
        assert line in str(err.value)
    assert _steps(tmp_path) == [2]

    changed.train.allow_config_change = True
    with caplog.at_level(logging.WARNING, logger="sdar_jax.train.loop"):
        result = _run(changed)
    assert result.step == 4 and len(result.history) == 2
    (warning,) = [r.getMessage() for r in caplog.records if "changed config" in r.getMessage()]
    assert "optimizer.peak_lr: 0.003 -> 0.001" in warning


def test_unchanged_resume_and_free_fields_pass():
    saved = json.loads(json.dumps(_config("/a", 6).to_dict()))
    moved = _config("/elsewhere", 6)
    moved.mesh.data = 1
    moved.model.remat_policy = "full"
    assert run_config.resume_changes(saved, moved.to_dict()) == []
    # A field the saved config predates counts only when it leaves its default.
    del saved["data"]["on_bad_record"]
    assert run_config.resume_changes(saved, moved.to_dict()) == []
    moved.data.on_bad_record = "skip"
    (change,) = run_config.resume_changes(saved, moved.to_dict())
    assert str(change) == "data.on_bad_record: 'error' -> 'skip'" and not change.fixed


# ---- kill -9: the event files hold every step up to the newest checkpoint --------------------


def _event_steps(workdir, tag="train/loss"):
    """Steps of the `tag` scalars in the event files (TFRecord framing; a torn last record is ignored)."""
    from tensorboardX.proto import event_pb2

    steps = []
    for path in glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*")):
        data = open(path, "rb").read()
        offset = 0
        while offset + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            if offset + 12 + length + 4 > len(data):
                break
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            steps += [event.step for v in event.summary.value if v.tag == tag]
            offset += 12 + length + 4
    return sorted(steps)


def test_event_files_agree_with_checkpoints_after_kill_9(tmp_path, compilation_cache):
    workdir = str(tmp_path / "run")
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD.format(here=HERE, workdir=workdir, cache=compilation_cache)
         .replace("log_every=50", "log_every=1")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    sealed = os.path.join(workdir, "checkpoints", "2", integrity.INTEGRITY_FILE)
    try:
        deadline = time.monotonic() + 400
        while not os.path.exists(sealed):
            assert child.poll() is None, child.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the child never saved step 2"
            time.sleep(0.2)
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    newest = _steps(workdir)[-1]
    assert newest >= 2
    assert set(range(1, newest + 1)) <= set(_event_steps(workdir))
