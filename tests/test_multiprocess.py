"""Multi-process runs: start-up plans, launch-script dry runs, and a real two-process training run.

The two-process test starts tests/multiprocess_worker.py twice on localhost
(a local jax.distributed coordinator, gloo CPU collectives, 4 CPU devices
each), trains three steps on one 8-device mesh, and checks the result against
the same training in this process on one device; the checkpoint the two
processes wrote is then restored here onto a different 8-device mesh.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import textwrap

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sdar_jax import distributed, parallel
from sdar_jax.checkpoint.params import load_params_checkpoint
from sdar_jax.distributed import DistributedConfig, DistributedConfigError, DistributedPlan
from sdar_jax.model import sharding as model_sharding
from sdar_jax.model import transformer
from sdar_jax.train import config as run_config
from sdar_jax.train import optimizer
from sdar_jax.train.state import abstract_train_state
from tests.helpers import processes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER_TIMEOUT_S = 420

# ---------------------------------------------------------------------------
# Start-up plans (pure: an environment in, a plan out)


def plan(env, **config):
    return distributed.plan_distributed(DistributedConfig(**config), env)


@pytest.fixture
def no_tpu(monkeypatch):
    monkeypatch.setattr(distributed, "_tpu_vm_present", lambda: False)


def test_single_process_is_a_no_op(no_tpu):
    assert plan({}) is None
    assert plan({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
    assert distributed.initialize_distributed(DistributedConfig(), env={}) is None


def test_explicit_local_coordinator(no_tpu):
    got = plan({}, coordinator_address="127.0.0.1:1234", num_processes=2, process_id=1)
    assert got == DistributedPlan("explicit", "127.0.0.1:1234", 2, 1, None)
    with pytest.raises(DistributedConfigError, match=r"needs \['process_id'\]"):
        plan({}, coordinator_address="127.0.0.1:1234", num_processes=2)
    with pytest.raises(DistributedConfigError, match=r"process_id 2 must lie in \[0, num_processes=2\)"):
        plan({}, coordinator_address="h:1", num_processes=2, process_id=2)


def test_environment_variables(no_tpu):
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:9999", "JAX_NUM_PROCESSES": "4",
           "JAX_PROCESS_ID": "3", "JAX_LOCAL_DEVICE_IDS": "0,1"}
    assert plan(env) == DistributedPlan("env", "10.0.0.1:9999", 4, 3, (0, 1))
    with pytest.raises(DistributedConfigError, match=r"missing \['JAX_PROCESS_ID'\]"):
        plan({k: v for k, v in env.items() if k != "JAX_PROCESS_ID"}, mode="env")
    with pytest.raises(DistributedConfigError, match="JAX_NUM_PROCESSES='four' is not an integer"):
        plan({**env, "JAX_NUM_PROCESSES": "four"})


SLURM_ONE_PER_NODE = {
    "SLURM_JOB_ID": "1234", "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
    "SLURM_STEP_NODELIST": "gpu[003-004]", "SLURM_STEP_NUM_NODES": "2",
}


def test_slurm_one_process_per_node_uses_every_gpu(no_tpu):
    got = plan(SLURM_ONE_PER_NODE)
    assert got == DistributedPlan("slurm", f"gpu003:{1234 % 4096 + 61440}", 2, 1, None)
    got = plan({**SLURM_ONE_PER_NODE, "JAX_COORDINATOR_ADDRESS": "head:5000"})
    assert got.coordinator_address == "head:5000"
    assert plan({**SLURM_ONE_PER_NODE, "JAX_COORDINATOR_PORT": "7000"}).coordinator_address == "gpu003:7000"


def test_slurm_one_process_per_gpu_picks_its_gpu(no_tpu):
    env = {**SLURM_ONE_PER_NODE, "SLURM_NTASKS": "16", "SLURM_PROCID": "13", "SLURM_LOCALID": "5"}
    assert plan(env) == DistributedPlan("slurm", f"gpu003:{1234 % 4096 + 61440}", 16, 13, (5,))


def test_tpu_vm_uses_jax_auto_detection(monkeypatch):
    monkeypatch.setattr(distributed, "_tpu_vm_present", lambda: True)
    assert plan({}) == DistributedPlan("tpu")
    assert plan({}, mode="off") is None


@pytest.mark.parametrize(
    "nodelist, first",
    [("node7", "node7"), ("gpu[003-010,015],cpu1", "gpu003"), ("a[1,4]", "a1"), ("x1,x2", "x1")],
)
def test_first_slurm_host(nodelist, first):
    assert distributed.first_slurm_host(nodelist) == first


def test_bad_mode_is_named():
    with pytest.raises(DistributedConfigError, match="mode is 'mpi'"):
        DistributedConfig(mode="mpi")


# ---------------------------------------------------------------------------
# Launch scripts: the dry run prints exactly what runs, and arguments survive quoting

RECORDER = textwrap.dedent("""\
    #!{python}
    import json, os, sys
    with open(os.environ["RECORD"], "a") as f:
        f.write(json.dumps({{"argv": sys.argv, "coordinator": os.environ.get("JAX_COORDINATOR_ADDRESS")}}) + "\\n")
""")
TRAIN_ARGS = ["--config=configs/tiny.py", "--config.train.workdir=/tmp/run dir/$HOME", "--config.mesh.fsdp=-1"]


def _fake_tools(tmp_path, *names):
    """Executables on PATH that record their argv (and coordinator env) as JSON lines."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in names:
        path = bin_dir / name
        path.write_text(RECORDER.format(python=sys.executable))
        path.chmod(0o755)
    return bin_dir


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tpu_pod_dry_run_prints_the_command_it_runs(tmp_path):
    bin_dir = _fake_tools(tmp_path, "gcloud")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", TPU_NAME="my-pod", ZONE="us-central2-b",
               PROJECT="proj", RECORD=str(tmp_path / "gcloud.jsonl"))
    script = os.path.join(REPO, "launch", "tpu_pod.sh")
    dry = subprocess.run(
        [script, "--dry-run", *TRAIN_ARGS], env=env, capture_output=True, text=True, timeout=30
    )
    assert dry.returncode == 0, dry.stderr
    printed = shlex.split(dry.stdout)
    assert not (tmp_path / "gcloud.jsonl").exists()  # nothing ran

    real = subprocess.run([script, *TRAIN_ARGS], env=env, capture_output=True, text=True, timeout=30)
    assert real.returncode == 0, real.stderr
    (record,) = _records(tmp_path / "gcloud.jsonl")
    assert record["argv"][1:] == printed[1:]
    assert printed[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
    assert {"my-pod", "--zone=us-central2-b", "--project=proj", "--worker=all"} <= set(printed)

    # The remote command, run by a shell in a fake checkout, hands train.py its arguments unchanged.
    (command,) = [a[len("--command="):] for a in printed if a.startswith("--command=")]
    checkout = tmp_path / "sdar_jax"
    (checkout / ".venv" / "bin").mkdir(parents=True)
    fake_python = checkout / ".venv" / "bin" / "python"
    fake_python.write_text(RECORDER.format(python=sys.executable))
    fake_python.chmod(0o755)
    subprocess.run(["bash", "-c", command], cwd=tmp_path, env=dict(env, RECORD=str(tmp_path / "worker.jsonl")),
                   check=True, timeout=30)
    (worker,) = _records(tmp_path / "worker.jsonl")
    assert worker["argv"][1:] == ["launch/train.py", *TRAIN_ARGS]


def test_tpu_pod_requires_its_variables(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TPU_NAME", "ZONE")}
    out = subprocess.run([os.path.join(REPO, "launch", "tpu_pod.sh"), "--dry-run"], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "set TPU_NAME" in out.stderr


@pytest.mark.parametrize("procs, tasks_per_node", [("node", "1"), ("gpu", "8")])
def test_slurm_dry_run_prints_the_command_it_runs(tmp_path, procs, tasks_per_node):
    bin_dir = _fake_tools(tmp_path, "srun")
    (bin_dir / "scontrol").write_text("#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] && printf 'gpu003\\ngpu004\\n'\n")
    (bin_dir / "scontrol").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="1234",
               SLURM_JOB_NODELIST="gpu[003-004]", SLURM_JOB_NUM_NODES="2",
               SLURM_NTASKS_PER_NODE=tasks_per_node, PROCS=procs, REPO_DIR="/shared/sdar_jax",
               RECORD=str(tmp_path / "srun.jsonl"))
    script = os.path.join(REPO, "launch", "slurm_gpu.sbatch")
    dry = subprocess.run(["bash", script, "--dry-run", *TRAIN_ARGS], env=env, capture_output=True, text=True,
                         timeout=30)
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    port = 1234 % 4096 + 61440
    assert lines[:2] == [f"export JAX_COORDINATOR_ADDRESS=gpu003:{port}", f"export JAX_COORDINATOR_PORT={port}"]
    printed = shlex.split(lines[-1])
    assert printed[:3] == ["srun", "--nodes=2", f"--ntasks-per-node={tasks_per_node}"]
    assert printed[-4:] == ["launch/train.py", *TRAIN_ARGS]
    assert not (tmp_path / "srun.jsonl").exists()

    real = subprocess.run(["bash", script, *TRAIN_ARGS], env=env, capture_output=True, text=True, timeout=30)
    assert real.returncode == 0, real.stderr
    (record,) = _records(tmp_path / "srun.jsonl")
    assert record["argv"][1:] == printed[1:]
    assert record["coordinator"] == f"gpu003:{port}"


def test_slurm_rejects_a_mismatched_task_layout(tmp_path):
    env = dict(os.environ, SLURM_JOB_ID="1", SLURM_JOB_NODELIST="n1", SLURM_NTASKS_PER_NODE="8", PROCS="node")
    out = subprocess.run(["bash", os.path.join(REPO, "launch", "slurm_gpu.sbatch"), "--dry-run"], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "PROCS=node needs --ntasks-per-node=1" in out.stderr


# ---------------------------------------------------------------------------
# Two real processes


def _run_workers(workdir, mesh: str, num_processes: int = 2) -> list[dict]:
    """Starts the workers, waits (bounded) and always reaps them."""
    coordinator = f"127.0.0.1:{processes.free_port()}"
    argvs = [
        [sys.executable, os.path.join(REPO, "tests", "multiprocess_worker.py"),
         "--coordinator", coordinator, "--num-processes", str(num_processes), "--process-id", str(i),
         "--devices", "4", "--mesh", mesh, "--workdir", str(workdir)]
        for i in range(num_processes)
    ]
    env = processes.cpu_process_env(4)  # the worker sets its own device count too
    processes.run_processes(argvs, [env] * num_processes, str(workdir.parent / f"{workdir.name}_worker"),
                            WORKER_TIMEOUT_S, cwd=REPO)
    return [json.loads((workdir / f"result_{i}.json").read_text()) for i in range(num_processes)]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("multiprocess") / "two_process"
    workdir.mkdir()
    return workdir, _run_workers(workdir, "data=2,fsdp=2,tensor=2")


@pytest.fixture(scope="module")
def other_mesh():
    """The one-process sharding context the two-process outputs are restored onto."""
    return parallel.ShardingContext.from_config(parallel.ParallelConfig(data=1, fsdp=4, tensor=2))


def _model_and_tx():
    import multiprocess_worker as worker

    config = worker.make_config("unused", {})
    return run_config.model_config(config), optimizer.make_optimizer(config.optimizer, config.train.steps)


def test_two_processes_train_like_one(two_process_run, other_mesh, tmp_path):
    import multiprocess_worker as worker

    workdir, results = two_process_run
    for result in results:
        assert (result["process_count"], result["device_count"], result["local_device_count"]) == (2, 8, 4)
        assert result["step"] == worker.STEPS
    metrics = [[{k: v for k, v in m.items() if k != "tokens_per_s"} for m in r["history"]] for r in results]
    assert metrics[0] == metrics[1]  # every process reports the same (replicated) metrics

    reference = worker.run(str(tmp_path / "one_device"), {"data": 1}, jax.devices()[:1])
    for key in ("loss", "grad_norm", "accuracy", "aux_loss", "num_loss_tokens"):
        np.testing.assert_allclose(
            [m[key] for m in results[0]["history"]], [m[key] for m in reference.history], rtol=2e-5, err_msg=key
        )

    # The params both processes exported, read by one process onto another mesh.
    model, _ = _model_and_tx()
    shardings = model_sharding.param_shardings(model, other_mesh)
    _, got = load_params_checkpoint(results[0]["export_dir"], shardings=shardings)
    _, want = load_params_checkpoint(reference.export_dir)
    q = got["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    # Adam moves each weight ~lr = 1e-3 per step: agree to a hundredth of a step. (Eight-way and
    # one-device reductions sum in different orders, and Adam's m / sqrt(v) magnifies that
    # rounding where a gradient is near zero: CI saw 1.5e-6 in one of 32768 elements.)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5), got, want
    )

    # The steps did move the weights.
    initial = transformer.init_params(model, jax.random.split(jax.random.key(0))[0])
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), want, initial)
    assert min(jax.tree.leaves(moved)) > 1e-4


def test_two_process_checkpoint_restores_on_another_mesh(two_process_run, other_mesh):
    workdir, results = two_process_run
    model, tx = _model_and_tx()
    abstract = abstract_train_state(model, tx)
    shardings = model_sharding.state_shardings(abstract, model, other_mesh)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    step_dir = workdir / "checkpoints" / str(results[0]["step"])
    restored = ocp.StandardCheckpointer().restore(step_dir / "state", target)

    assert int(restored.step) == results[0]["step"]
    _, exported = load_params_checkpoint(results[0]["export_dir"])
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored.params, exported
    )
    q_spec = jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert restored.params["layers"]["self_attn"]["q_proj"]["kernel"].sharding.spec == q_spec
    adam = [s for s in jax.tree.leaves(restored.opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")]
    assert adam and adam[0].mu["layers"]["self_attn"]["q_proj"]["kernel"].sharding.spec == q_spec
    # Each process saved its own data-iterator position.
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(step_dir / "data"))
