"""Multi-host start-up: one JAX process per host (or per GPU), one global mesh.

`initialize_distributed` must run before any JAX computation. Where the
process runs decides how it joins the others (first match wins):

1. explicit: `DistributedConfig(coordinator_address, num_processes,
   process_id)` all set (tests use a local coordinator this way);
2. env: `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`
   all set (optionally `JAX_LOCAL_DEVICE_IDS="0,1"`), e.g. by a cluster
   launcher of your own;
3. slurm: `SLURM_JOB_ID` with `SLURM_NTASKS` > 1. Process id is
   `SLURM_PROCID`; the coordinator is `JAX_COORDINATOR_ADDRESS` when set,
   else the first node of `SLURM_STEP_NODELIST` (or `SLURM_JOB_NODELIST`) on
   `JAX_COORDINATOR_PORT` (default: a port derived from the job id, as JAX
   itself does). With one process per node every local GPU is used; with
   several processes per node each uses GPU `SLURM_LOCALID`;
4. tpu: a Cloud TPU VM (libtpu installed and a TPU chip present):
   `jax.distributed.initialize()` with no arguments, which reads the pod's
   worker list from the TPU metadata (a single-host TPU VM is a pod of one);
5. otherwise a single process: nothing to do.

`DistributedConfig(mode=...)` forces one of "explicit", "env", "slurm", "tpu"
or "off" instead of detecting.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import logging
import os
import re
from typing import Mapping

import jax

logger = logging.getLogger(__name__)

MODES = ("auto", "off", "explicit", "env", "slurm", "tpu")


class DistributedConfigError(ValueError):
    """The multi-process settings are incomplete or inconsistent."""


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins a multi-process run (see the module docstring).

    mode: "auto" detects; any other value of MODES forces that source.
    coordinator_address: "host:port" of process 0's coordinator service.
    num_processes, process_id: the run's process count and this process's id.
    local_device_ids: the local devices this process uses (None: all).
    initialization_timeout_s: how long to wait for all processes to connect.
    """

    mode: str = "auto"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    initialization_timeout_s: int = 300

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise DistributedConfigError(f"DistributedConfig.mode is {self.mode!r}; expected one of {MODES}")
        if self.initialization_timeout_s < 1:
            raise DistributedConfigError(
                "DistributedConfig.initialization_timeout_s must be >= 1, got "
                f"{self.initialization_timeout_s}"
            )


@dataclasses.dataclass(frozen=True)
class DistributedPlan:
    """The arguments `jax.distributed.initialize` is called with.

    source: which of MODES produced them. For "tpu" every field is None and
    JAX reads the pod from the TPU metadata.
    """

    source: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None


def _int_env(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise DistributedConfigError(f"environment variable {name}={value!r} is not an integer") from None


def _check_ids(source: str, num_processes: int, process_id: int) -> None:
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise DistributedConfigError(
            f"{source}: process_id {process_id} must lie in [0, num_processes={num_processes})"
        )


def first_slurm_host(nodelist: str) -> str:
    """The first host name of a SLURM node list.

    "node7" -> "node7"; "gpu[003-010,015],cpu1" -> "gpu003"; "a[1,4]" -> "a1".
    """
    match = re.match(r"^([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise DistributedConfigError(f"cannot parse the SLURM node list {nodelist!r}")
    prefix, ranges = match.groups()
    if ranges is None:
        return prefix
    return prefix + re.split(r"[,-]", ranges, maxsplit=1)[0]


def _explicit_plan(config: DistributedConfig) -> DistributedPlan:
    fields = dict(
        coordinator_address=config.coordinator_address,
        num_processes=config.num_processes,
        process_id=config.process_id,
    )
    missing = [name for name, value in fields.items() if value is None]
    if missing:
        raise DistributedConfigError(f"DistributedConfig: explicit start-up needs {missing} as well")
    _check_ids("DistributedConfig", config.num_processes, config.process_id)
    return DistributedPlan("explicit", local_device_ids=config.local_device_ids, **fields)


_ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _env_plan(env: Mapping[str, str]) -> DistributedPlan:
    missing = [name for name in _ENV_VARS if not env.get(name)]
    if missing:
        raise DistributedConfigError(
            f"environment start-up needs {list(_ENV_VARS)}; missing {missing}"
        )
    num, pid = _int_env(env, "JAX_NUM_PROCESSES"), _int_env(env, "JAX_PROCESS_ID")
    _check_ids("JAX_NUM_PROCESSES/JAX_PROCESS_ID", num, pid)
    local = env.get("JAX_LOCAL_DEVICE_IDS")
    local_ids = tuple(int(i) for i in local.split(",")) if local else None
    return DistributedPlan("env", env["JAX_COORDINATOR_ADDRESS"], num, pid, local_ids)


def _slurm_plan(env: Mapping[str, str]) -> DistributedPlan:
    for name in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID"):
        if name not in env:
            raise DistributedConfigError(f"SLURM start-up: environment variable {name} is not set")
    num, pid = _int_env(env, "SLURM_NTASKS"), _int_env(env, "SLURM_PROCID")
    _check_ids("SLURM_NTASKS/SLURM_PROCID", num, pid)
    address = env.get("JAX_COORDINATOR_ADDRESS")
    if not address:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise DistributedConfigError(
                "SLURM start-up: set JAX_COORDINATOR_ADDRESS or run inside srun "
                "(SLURM_STEP_NODELIST / SLURM_JOB_NODELIST are unset)"
            )
        port = env.get("JAX_COORDINATOR_PORT") or str(_int_env(env, "SLURM_JOB_ID") % 4096 + 61440)
        address = f"{first_slurm_host(nodelist)}:{port}"
    nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    local_ids = None
    if num > nodes:  # several processes per node: one GPU each
        local_ids = (_int_env(env, "SLURM_LOCALID"),)
    return DistributedPlan("slurm", address, num, pid, local_ids)


def _tpu_vm_present() -> bool:
    """A Cloud TPU VM: libtpu is installed and a TPU chip is visible."""
    if importlib.util.find_spec("libtpu") is None:
        return False
    return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def plan_distributed(config: DistributedConfig, env: Mapping[str, str]) -> DistributedPlan | None:
    """How this process joins the run, or None for a single process (pure; see module doc).

    Args:
      config: the distributed settings.
      env: the process environment (os.environ).
    """
    mode = config.mode
    if mode == "auto":
        if config.coordinator_address is not None or config.num_processes is not None:
            mode = "explicit"
        elif env.get("JAX_COORDINATOR_ADDRESS") and env.get("JAX_NUM_PROCESSES"):
            mode = "env"
        elif "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS") or 1) > 1:
            mode = "slurm"
        elif _tpu_vm_present():
            mode = "tpu"
        else:
            mode = "off"
    if mode == "off":
        return None
    if mode == "explicit":
        plan = _explicit_plan(config)
    elif mode == "env":
        plan = _env_plan(env)
    elif mode == "slurm":
        plan = _slurm_plan(env)
    else:
        return DistributedPlan("tpu")
    return None if plan.num_processes == 1 else plan


def initialize_distributed(
    config: DistributedConfig | None = None, env: Mapping[str, str] | None = None
) -> DistributedPlan | None:
    """Joins this process to the multi-process run (see the module docstring).

    Call once per process before any JAX computation. A second call after a
    successful one returns without initialising again.

    Returns:
      The plan used, or None when this is a single-process run.
    """
    config = config or DistributedConfig()
    plan = plan_distributed(config, os.environ if env is None else env)
    if plan is None:
        return None
    if jax.distributed.is_initialized():
        logger.info("jax.distributed is already initialised; keeping it")
        return plan
    if plan.source == "tpu":
        jax.distributed.initialize(initialization_timeout=config.initialization_timeout_s)
    else:
        # All arguments are given, so JAX's own cluster detection is skipped: it
        # would otherwise restrict one-process-per-node SLURM jobs to one GPU.
        jax.distributed.initialize(
            coordinator_address=plan.coordinator_address,
            num_processes=plan.num_processes,
            process_id=plan.process_id,
            local_device_ids=None if plan.local_device_ids is None else list(plan.local_device_ids),
            cluster_detection_method="deactivate",
            initialization_timeout=config.initialization_timeout_s,
        )
    logger.info(
        "joined a %d-process run as process %d (%s start-up, %d local / %d global devices)",
        jax.process_count(), jax.process_index(), plan.source, jax.local_device_count(), jax.device_count(),
    )
    return plan
