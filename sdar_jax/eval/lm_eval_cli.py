"""lm-evaluation-harness's command line with the `sdar_jax` model registered.

    python -m sdar_jax.eval.lm_eval_cli --model sdar_jax \\
        --model_args ckpt=DIR,tokenizer=DIR,block_length=4,steps=4,threshold=0.9 \\
        --tasks gsm8k --batch_size 64 [every other lm_eval flag]

is `lm_eval ...` (lm-eval's `cli_evaluate`, unchanged) after importing
`sdar_jax.eval.lm_eval_backend`, plus a log handler that shows the backend's
decoding totals (TPF, forwards, tokens/s) on stderr next to lm-eval's own
log lines. `sdar-lm-eval` is the same command once sdar_jax is pip installed.
"""

from __future__ import annotations

import logging
import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    """Runs lm-eval's CLI on `argv` (default: sys.argv[1:])."""
    from lm_eval.__main__ import cli_evaluate

    import sdar_jax.eval.lm_eval_backend  # noqa: F401  registers the `sdar_jax` model

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-8s [%(name)s] %(message)s"))
    package_logger = logging.getLogger("sdar_jax")
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)
    package_logger.propagate = False  # shown once, not again by a root handler
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
