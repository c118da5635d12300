"""Train (or resume) a run described by a config file.

  python launch/train.py --config=configs/tiny.py --config.train.workdir=/tmp/tiny
  python launch/train.py --config=configs/tiny.py:ar --config.train.steps=50 ...
  python launch/train.py --config=configs/sdar_1p7b.py:pretrain --config.train.init_from=... ...

`--config=FILE[:ARG]` loads `get_config(ARG)` from FILE; `--config.a.b=value`
overrides any field. Running the same command again resumes from the newest
checkpoint in the workdir. Multi-host runs call this on every host
(`sdar_jax.distributed` detects SLURM, TPU pods and explicit settings).

Progress goes to stderr (a tqdm bar, eval lines), scalars to
`<workdir>/tensorboard`. Exit status: 0 when the run finished or was preempted (SIGTERM: the current
step is saved first), 1 on a non-finite loss (the last good checkpoint is
kept), 2 on a bad config.
"""

from __future__ import annotations

import sys
from typing import Sequence

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from sdar_jax.config import ConfigError
from sdar_jax.data.pipeline import DataConfigError
from sdar_jax.distributed import initialize_distributed
from sdar_jax.parallel import ParallelConfigError
from sdar_jax.train import loop
from sdar_jax.train.config import RunConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "run config file (configs/NAME.py[:ARG])")
flags.mark_flags_as_required(["config"])

_CONFIG_ERRORS = (RunConfigError, ConfigError, DataConfigError, ParallelConfigError)


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
        print(f"train: bad config: {e}", file=sys.stderr)
        return 2
    except loop.NonFiniteLossError as e:
        print(f"train: {e}", file=sys.stderr)
        return 1
    status = "preempted" if result.preempted else "finished"
    print(f"train: {status} at step {result.step}", file=sys.stderr)
    if result.export_dir:
        print(f"train: exported params to {result.export_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    app.run(main)
