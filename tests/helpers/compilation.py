"""A module-scoped, autouse fixture for test modules whose time is XLA compilation: XLA's
optimizations mostly off (`jax_disable_most_optimizations`) while the module runs. GSPMD still
partitions every program; import it into the module to use it."""

import jax
import pytest


@pytest.fixture(scope="module", autouse=True)
def fast_compilation():
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)
