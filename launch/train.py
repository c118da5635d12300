"""Train (or resume) a run described by a config file.

  python launch/train.py --config=configs/tiny.py --config.train.workdir=/tmp/tiny
  python launch/train.py --config=configs/tiny.py:ar --config.train.steps=50 ...
  python launch/train.py --config=configs/sdar_1p7b.py:pretrain --config.train.init_from=... ...

`--config=FILE[:ARG]` loads `get_config(ARG)` from FILE; `--config.a.b=value`
overrides any field. Running the same command again resumes from the newest
checkpoint in the workdir. Multi-host runs call this on every host
(`sdar_jax.distributed` detects SLURM, TPU pods and explicit settings).

Progress goes to stderr (a tqdm bar, eval lines), scalars to
`<workdir>/tensorboard`. Exit status:
  0  the run finished, or was preempted (SIGTERM: the current step is saved first);
  2  bad input, one line on stderr naming the field / file: a bad or missing
     config field, a resume whose config differs from the checkpoint's (see
     --config.train.allow_config_change), a missing or damaged tokenizer, bad
     training data (file:line), a bad train.init_from checkpoint, or no intact
     checkpoint in the workdir;
  3  a non-finite loss or gradient norm (the last good checkpoint is kept);
  1  anything else (an unexpected error, with its traceback).
"""

from __future__ import annotations

import sys
from typing import Sequence

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from sdar_jax.checkpoint.errors import ConversionError
from sdar_jax.checkpoint.integrity import CheckpointIntegrityError
from sdar_jax.config import ConfigError
from sdar_jax.data.packing import ExampleTooLongError
from sdar_jax.data.pipeline import DataConfigError
from sdar_jax.data.sources import DataSourceError
from sdar_jax.data.tokenizer import TokenizerError
from sdar_jax.distributed import initialize_distributed
from sdar_jax.parallel import ParallelConfigError
from sdar_jax.train import loop
from sdar_jax.train.config import RunConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "run config file (configs/NAME.py[:ARG])")
flags.mark_flags_as_required(["config"])

_CONFIG_ERRORS = (RunConfigError, ConfigError, DataConfigError, ParallelConfigError)
_INPUT_ERRORS = (
    TokenizerError, DataSourceError, ExampleTooLongError, CheckpointIntegrityError, ConversionError,
)
EXIT_BAD_INPUT, EXIT_NON_FINITE = 2, 3


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {list(argv[1:])}; use --config.a.b=value")
    if not flags.FLAGS["verbosity"].present:
        # orbax and grain log every file they write at INFO; --verbosity=0 shows it.
        absl_logging.set_verbosity(absl_logging.WARNING)
    initialize_distributed()
    try:
        result = loop.train(_CONFIG.value)
    except _CONFIG_ERRORS as e:
        print(f"train: bad config: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except _INPUT_ERRORS as e:
        print(f"train: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except loop.NonFiniteLossError as e:
        print(f"train: {_one_line(e)}", file=sys.stderr)
        return EXIT_NON_FINITE
    status = "preempted" if result.preempted else "finished"
    skipped = f" ({result.skipped_records} malformed records skipped)" if result.skipped_records else ""
    print(f"train: {status} at step {result.step}{skipped}", file=sys.stderr)
    if result.export_dir:
        print(f"train: exported params to {result.export_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    app.run(main)
