"""What every launcher in `launch/` shares: one-line usage errors and loading a config file.

A launcher builds its argparse parser and a `run(args) -> int`, and its `main` is

    def main(argv=None) -> int:
        return cli.run_main("generate", build_parser(), run, argv)

Bad input raises `UsageError` (or an error type the launcher names); it is
printed as `NAME: error: MESSAGE` on one line and the exit status is 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Callable, Sequence

import ml_collections

if TYPE_CHECKING:
    from sdar_jax.checkpoint.sharded_restore import InferenceModel

USAGE_EXIT = 2


class UsageError(ValueError):
    """Bad command-line input; reported as one line, exit status 2."""


def run_main(
    name: str,
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], int],
    argv: Sequence[str] | None = None,
    usage_errors: tuple[type[Exception], ...] = (),
) -> int:
    """Parses `argv`, calls `run`; a UsageError (or one of `usage_errors`) becomes one line
    on stderr and exit status 2."""
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (UsageError, *usage_errors) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return USAGE_EXIT


def load_config_module(path: str | os.PathLike[str]) -> ModuleType:
    """Imports a config file that is not part of a package (configs/*.py)."""
    path = os.fspath(path)
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    if spec is None or spec.loader is None:
        raise UsageError(f"config file {path!r}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(path: str | os.PathLike[str], arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of a config file, as `--config=FILE:ARG` gives it to launch/train.py."""
    return load_config_module(path).get_config(arg)


def load_inference_model(ckpt: str, mesh: str | None, stored_layout: bool = False) -> "InferenceModel":
    """A params checkpoint for generate / evaluate: on one device, or straight into its
    shardings under `--mesh` (`sharded_restore.load_for_inference`), re-laid out for
    decoding unless `stored_layout`; bad input as UsageError."""
    # Imported here: the launchers answer --help and flag errors without starting JAX.
    from sdar_jax.checkpoint import sharded_restore
    from sdar_jax.parallel import ParallelConfigError

    if not os.path.isdir(ckpt):
        raise UsageError(f"--ckpt {ckpt!r}: no such directory")
    try:
        return sharded_restore.load_for_inference(ckpt, mesh, unstack_layers=not stored_layout)
    except ParallelConfigError as e:  # a mesh that does not fit the devices
        raise UsageError(f"--mesh {mesh!r}: {e}") from e
    except ValueError as e:
        raise UsageError(f"--ckpt {ckpt!r}: {e}") from e
