"""SAID / SAID+CHLG against the SDAR default decoding, measured on a model trained here.

  python launch/compare_strategies.py --init-from DEMO_OUT/sdar/export --out cmp_out
      [--blocks 8,16] [--sdar-steps 200] [--tasks add,sort,word] [--num-test N]
      [--thresholds 0.7,0.8,0.9] [--budget-divisors 2,4] [--said-stages 2,3]

1. For every block length B in `--blocks`, adapt `--init-from` (a params
   export: the demo's AR or SDAR model, `launch/demo.py`) with a short SDAR
   run at block B (`configs/demo.py:sdar`, `objective.block_size = B`) into
   `--out/sdar_bB`; an export already there is reused, not retrained.
2. Evaluate each block-B model on the held-out test split, greedy, with
     low_confidence_dynamic  at every `--thresholds` value, steps = B;
     low_confidence_static   at steps T = B / d for every d in `--budget-divisors`
                             (SAID with K = 1: the same budget without a scaffold);
     said                    K in `--said-stages`, budget T = B / d, rec_steps 1;
     said_chlg               the same K and generation-stage steps as said, tau 0.8,
                             3 extra steps (budget T + 3: CHLG's reconstruction
                             stage takes 1 + 3 steps where said's takes 1).
   A (K, T) the stage split cannot hold (T below one step per stage) is
   skipped and listed.
3. Print the table (accuracy with its binomial standard error and n, tokens
   per forward, forwards per problem, decode tokens/s) and write into `--out`:
   `comparison.md` (the markdown table), `comparison.json` (every row, the
   training runs, the settings) and `eval/<row>.jsonl` (every decoded sample).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any, NamedTuple, Sequence

from sdar_jax import experiments
from sdar_jax.cli import UsageError, load_config, run_main
from sdar_jax.data import tasks
from sdar_jax.data.tokenizer import Tokenizer
from sdar_jax.decode.decoder import DecodeConfig
from sdar_jax.eval import runner
from sdar_jax.eval.report import markdown_table
from sdar_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILE = os.path.join(ROOT, "configs", "demo.py")
DEFAULT_TASKS = ("add", "sort", "word")  # the demo's default task subset
CHLG_THRESHOLD = 0.8  # tau of the SAID paper
CHLG_EXTRA_STEPS = 3  # the paper's extra steps for the positions below tau
SAID_REC_STEPS = 1




class Row(NamedTuple):
    """One table row: a name and the decoding of a block-B model."""

    name: str
    block_length: int
    decode_config: DecodeConfig


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x)
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated integers") from None
    if not values or min(values) < 1:
        raise UsageError(f"{flag} {text!r}: expected one or more integers >= 1")
    return values


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x)
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated numbers") from None
    if not values or not all(0.0 < v <= 1.0 for v in values):
        raise UsageError(f"{flag} {text!r}: expected one or more numbers in (0, 1]")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compare_strategies", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--init-from", required=True,
                        help="params export to adapt (e.g. a demo run's sdar/export or ar/export)")
    parser.add_argument("--out", default="compare_out", help="output directory")
    parser.add_argument("--blocks", default="8,16", help="block lengths B")
    parser.add_argument("--sdar-steps", type=int, default=200,
                        help="SDAR adaptation steps per block length")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                        help=f"comma-separated subset of {','.join(tasks.TASKS)}")
    parser.add_argument("--num-test", type=int, default=None,
                        help="test problems per task (default: the whole test split)")
    parser.add_argument("--thresholds", default="0.7,0.8,0.9",
                        help="low_confidence_dynamic thresholds")
    parser.add_argument("--budget-divisors", default="2,4",
                        help="SAID / static per-block budgets T = B / d")
    parser.add_argument("--said-stages", default="2,3", help="SAID stage counts K")
    parser.add_argument("--max-new-tokens", type=int, default=48,
                        help="generation length (the demo's: the longest answer is 44 tokens)")
    parser.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    parser.add_argument("--num-buckets", type=int, default=2,
                        help="prompt-length buckets (one decoder compilation each)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def load_demo_config(stage: str):
    """`configs/demo.py`'s `get_config(stage)`."""
    return load_config(CONFIG_FILE, stage)


def strategy_rows(block_length: int, thresholds: Sequence[float], divisors: Sequence[int],
                  stages: Sequence[int], max_new_tokens: int, stop_ids: tuple[int, ...]
                  ) -> tuple[list[Row], list[str]]:
    """The rows of one block length, and the (strategy, K, T) combinations skipped.

    A budget T = B // d below 1, or one the SAID stage split cannot hold (fewer
    steps than stages), is skipped with a note naming it.
    """
    b = block_length
    common = dict(mode="diffusion", block_length=b, max_new_tokens=max_new_tokens,
                  stop_ids=stop_ids, temperature=0.0)
    rows = [Row(f"B={b} dynamic t={t}", b, DecodeConfig(
        strategy="low_confidence_dynamic", steps=b, threshold=t, **common)) for t in thresholds]
    skipped = []
    budgets = sorted({b // d for d in divisors if b // d >= 1}, reverse=True)
    skipped += [f"B={b} T=B/{d} (< 1 step)" for d in divisors if b // d < 1]
    rows += [Row(f"B={b} static T={t}", b, DecodeConfig(
        strategy="low_confidence_static", steps=t, **common)) for t in budgets]
    for strategy in ("said", "said_chlg"):
        for k in stages:
            for t in budgets:
                if strategy == "said":
                    name, extra = f"B={b} said K={k} T={t}", dict(said_rec_steps=SAID_REC_STEPS)
                    steps = t
                else:
                    steps = t - SAID_REC_STEPS + 1 + CHLG_EXTRA_STEPS
                    name = f"B={b} said_chlg K={k} T={steps}"
                    extra = dict(chlg_threshold=CHLG_THRESHOLD, chlg_extra_steps=CHLG_EXTRA_STEPS)
                try:
                    dc = DecodeConfig(strategy=strategy, steps=steps, said_stages=k, **extra,
                                      **common)
                except ValueError as e:
                    skipped.append(f"{name}: {e}")
                    continue
                rows.append(Row(name, b, dc))
    return rows, skipped


def adapt(init_from: str, block_length: int, steps: int, train_path: str, out: str,
          progress: bool) -> dict[str, Any]:
    """The block-`block_length` SDAR model: trained from `init_from` into `out/sdar_bB`,
    or the export already there (`reused`)."""
    workdir = os.path.join(out, f"sdar_b{block_length}")
    export = os.path.join(workdir, loop.EXPORT_SUBDIR)
    if os.path.isfile(os.path.join(export, "config.json")):
        print(f"[compare] reusing {export}", file=sys.stderr, flush=True)
        return {"export_dir": export, "reused": True}
    cfg = load_demo_config("sdar")
    cfg.objective.block_size = block_length
    cfg.objective.mixed_block_sizes = None  # one model per block length here
    cfg.train.steps = steps
    cfg.optimizer.warmup_steps = min(cfg.optimizer.warmup_steps, steps - 1)
    cfg.train.init_from = init_from
    cfg.train.workdir = workdir
    cfg.data.train_path = train_path
    cfg.train.eval_every = cfg.train.checkpoint_every = steps
    cfg.train.progress_bar = progress
    stage = experiments.train_stage(cfg, f"SDAR B={block_length}")
    return {**{k: stage[k] for k in ("export_dir", "steps", "seconds", "cpu_seconds", "final_loss")},
            "reused": False, "config": cfg.to_dict()}


def results_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """Rows as a GitHub markdown table (accuracy ± binomial standard error, in %)."""
    header = ("decoding", "acc % ± se", "n", "TPF", "forwards / problem", "tokens/s")
    cells = [(r["name"], f"{100 * r['accuracy']:.1f} ± {100 * r['accuracy_stderr']:.1f}",
              str(r["n"]), f"{r['tpf']:.2f}", f"{r['forwards_per_problem']:.1f}",
              f"{r['tokens_per_second']:.0f}") for r in rows]
    return "\n".join(markdown_table(header, cells))


def evaluate_rows(rows: Sequence[Row], exports: dict[int, str], tokenizer: Tokenizer,
                  examples: list[dict[str, str]], settings: runner.EvalSettings, out: str
                  ) -> list[dict[str, Any]]:
    """Every row's measured summary; each row's samples go to `out/eval/<row>.jsonl`."""
    decode_rows = [experiments.DecodeRow(r.name, str(r.block_length), r.decode_config) for r in rows]
    results = experiments.evaluate_rows(decode_rows, {str(b): p for b, p in exports.items()},
                                        tokenizer, examples, settings, out)
    for r, result in zip(rows, results):
        n = result["num_examples"] * settings.n_samples
        result.update(n=n, forwards_per_problem=result["num_forwards"] / n,
                      decode_config=dataclasses.asdict(r.decode_config))
    return results


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    blocks = _ints(args.blocks, "--blocks")
    divisors = _ints(args.budget_divisors, "--budget-divisors")
    stages = _ints(args.said_stages, "--said-stages")
    thresholds = _floats(args.thresholds, "--thresholds")
    if args.sdar_steps < 2:
        raise UsageError(f"--sdar-steps must be >= 2, got {args.sdar_steps}")
    task_names = tuple(t for t in args.tasks.split(",") if t)
    if not task_names or any(t not in tasks.TASKS for t in task_names):
        raise UsageError(f"--tasks {args.tasks!r}: expected a comma-separated subset of {tasks.TASKS}")
    if args.num_test is not None and args.num_test < 1:
        raise UsageError(f"--num-test must be >= 1, got {args.num_test}")
    if not os.path.isfile(os.path.join(args.init_from, "config.json")):
        raise UsageError(f"--init-from {args.init_from!r} is not a params export (no config.json); "
                         "run launch/demo.py and pass its sdar/export or ar/export")

    out = os.path.abspath(args.out)
    train_path = os.path.join(out, "data", "train.jsonl")
    os.makedirs(os.path.dirname(train_path), exist_ok=True)
    tasks.write_jsonl(train_path, tasks.load_split("train", tasks=task_names))
    test = tasks.load_split("test", tasks=task_names)
    if args.num_test is not None:
        test = [e for t in task_names for e in [x for x in test if x["task"] == t][:args.num_test]]

    training = {b: adapt(args.init_from, b, args.sdar_steps, train_path, out, not args.no_progress)
                for b in blocks}
    tokenizer = Tokenizer.from_dir(training[blocks[0]]["export_dir"])
    rows, skipped = [], []
    for b in blocks:
        r, s = strategy_rows(b, thresholds, divisors, stages, args.max_new_tokens,
                             tokenizer.stop_token_ids)
        rows += r
        skipped += s
    settings = runner.EvalSettings(style="gsm8k", batch_size=args.batch_size,
                                   num_buckets=args.num_buckets, chat=True,
                                   progress=not args.no_progress)
    results = evaluate_rows(rows, {b: t["export_dir"] for b, t in training.items()}, tokenizer,
                            test, settings, out)
    table = results_markdown(results)
    sources = "; ".join(
        f"B={b}: " + (f"reused {t['export_dir']}" if t["reused"]
                      else f"adapted {t['steps']} steps from {args.init_from}")
        for b, t in training.items())
    header = (f"{len(test)} held-out problems ({', '.join(task_names)}), greedy, max "
              f"{args.max_new_tokens} new tokens; one SDAR model per B ({sources})")
    print(header)
    print(table)
    if skipped:
        print("skipped: " + "; ".join(skipped))
    wall = time.perf_counter() - start
    print(f"tokens/s: decoding only (compilation excluded); total wall time {wall:.0f}s")
    with open(os.path.join(out, "comparison.md"), "w", encoding="utf-8") as f:
        f.write(header + "\n\n" + table + "\n")
    summary = {"args": vars(args), "tasks": list(task_names), "num_test": len(test),
               "training": {str(b): t for b, t in training.items()}, "skipped": skipped,
               "eval_settings": dataclasses.asdict(settings), "wall_seconds": wall,
               "rows": results, "table": table}
    experiments.write_json(os.path.join(out, "comparison.json"), summary)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main("compare_strategies", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
