"""Several real processes on localhost for the multi-process tests: a free coordinator port, and
a bounded run of the processes that always reaps them and reports their logs on failure."""

from __future__ import annotations

import os
import socket
import subprocess
from typing import Mapping, Sequence


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_device_count(xla_flags: str, num_devices: int | str) -> str:
    """`xla_flags` with its fake CPU device count set to `num_devices` and every other flag kept
    (tests/conftest.py's compile-time flags halve a child's compile time)."""
    kept = [f for f in xla_flags.split() if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join([f"--xla_force_host_platform_device_count={num_devices}", *kept])


def cpu_process_env(num_devices: int, **extra: str) -> dict[str, str]:
    """This environment for a child JAX process with `num_devices` CPU devices of its own.

    XLA_FLAGS keeps this process's other flags (`with_device_count`)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(XLA_FLAGS=with_device_count(os.environ.get("XLA_FLAGS", ""), num_devices),
               JAX_PLATFORMS="cpu")
    env.update(extra)
    return env


def run_processes(argvs: Sequence[Sequence[str]], envs: Sequence[Mapping[str, str]], log_prefix: str,
                  timeout_s: float, cwd: str | None = None) -> None:
    """Runs one process per argv (all at once), waits at most `timeout_s`, kills any left, and
    fails with every process's log tail unless all exit 0. Logs: `<log_prefix>_<i>.log`."""
    logs = [open(f"{log_prefix}_{i}.log", "w") for i in range(len(argvs))]
    procs = [
        subprocess.Popen(list(argv), cwd=cwd, env=dict(env), stdout=log, stderr=subprocess.STDOUT)
        for argv, env, log in zip(argvs, envs, logs)
    ]
    try:
        codes = [p.wait(timeout=timeout_s) for p in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    tails = "\n".join(f"--- process {i} ---\n{log.name}\n" + open(log.name).read()[-4000:]
                      for i, log in enumerate(logs))
    assert codes == [0] * len(argvs), f"processes failed or timed out (exit codes {codes}):\n{tails}"
