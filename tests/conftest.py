"""Test-wide setup: eight fake CPU devices, float32 matmuls at full precision, XLA's
optimizations mostly off.

XLA_FLAGS must be set before jax is imported anywhere, so this runs first.
"""
import importlib.metadata
import os


def _compile_fast_flags() -> str:
    """XLA:CPU flags that halve compile time on the pinned jaxlib (0.10.x).

    Its legacy loop emitters compile the suite's tiny programs about twice as fast
    as the fusion emitters (backend compile of one decoder: 12.4 s -> 5.3 s). Newer
    XLA drops the flag and refuses unknown flags, so it is set for 0.10.x only.
    """
    version = tuple(int(p) for p in importlib.metadata.version("jaxlib").split(".")[:2])
    return " --xla_cpu_use_fusion_emitters=false" if version == (0, 10) else ""

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8" + _compile_fast_flags())
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The tests run tiny shapes, so compiling is most of their time; XLA's optimization passes
# are about half of that. With them mostly off the programs compute the same functions
# (GSPMD still partitions them; the compiled-memory tests hold either way). Set before jax
# is imported, and inherited by the CLI subprocesses the tests start.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
