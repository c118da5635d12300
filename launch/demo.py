"""The whole SDAR story on a CPU, in one command: train AR, adapt to block diffusion, compare.

  python launch/demo.py [--out demo_out] [--overwrite] [--quick]
      [--ar-steps N] [--sdar-steps N] [--tasks add,sort,word] [--num-test N]

1. Train a tiny Qwen3-style model from scratch with the next-token (AR)
   objective on the embedded tasks (`configs/demo.py:ar`), a procedural
   stream of fresh problems that never holds a test prompt
   (`sdar_jax.data.procedural`); by default the add, sort and word tasks
   (`--tasks add,mul,sort,word` for all four).
2. Adapt it to SDAR block diffusion: continue training from the AR params
   with the SDAR objective (`configs/demo.py:sdar`, the recipe of
   docs/adaptation.md: shifted logits convention, each step at block 4 or 8),
   as the paper turns AR checkpoints into SDAR ones.
3. Evaluate on the held-out test split, greedy: the AR model with AR decoding,
   and the SDAR model with low_confidence_dynamic decoding at block 4 and 8
   (steps = block length), thresholds 0.7, 0.8, 0.9; the model was trained
   for both block lengths.
4. Print one table (accuracy ± its standard error, overall and per task,
   tokens per forward, forwards, tokens/s, all measured by this run), beside
   it the teacher-forced token accuracy of both models by in-block position
   and task (`sdar_jax.eval.teacher_forcing`), and write into `--out`:
   `loss_curves.png`, `accuracy_vs_tpf.png`, `demo_summary.json`,
   `eval/<row>.jsonl` (every decoded sample), and the two runs' workdirs
   `ar/` and `sdar/` (checkpoints, TensorBoard logs, exported params).

`--quick` shrinks everything (model, steps, test problems, output length)
to check the pipeline in about a minute; its accuracies are not meaningful.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import time
from typing import Sequence

from sdar_jax import experiments
from sdar_jax.cli import UsageError, load_config, run_main
from sdar_jax.data import procedural, tasks
from sdar_jax.data.tokenizer import Tokenizer
from sdar_jax.eval import runner
from sdar_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILE = os.path.join(ROOT, "configs", "demo.py")
THRESHOLDS = (0.7, 0.8, 0.9)
BLOCK_LENGTHS = (4, 8)
MAX_NEW_TOKENS = 48  # the longest response is 44 tokens before <|im_end|>
STAGE_DIRS = ("ar", "sdar", "eval", "data")
# `mul` (the longest responses, 2-digit x 2-digit partial products) is left out by
# default: within the CPU time budget the tiny model learns the other three far better.
DEFAULT_TASKS = ("add", "sort", "word")
DIAGNOSTIC_BLOCK = 4

# Applied on top of configs/demo.py by --quick.
QUICK = dict(
    model=dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
               intermediate_size=64),
    ar_steps=4, sdar_steps=4, num_test=2, max_new_tokens=16,
)




def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="demo", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="demo_out", help="output directory")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the outputs of an earlier demo run in --out")
    parser.add_argument("--quick", action="store_true",
                        help="a reduced run that checks the pipeline (accuracies not meaningful)")
    parser.add_argument("--ar-steps", type=int, default=None, help="AR training steps")
    parser.add_argument("--sdar-steps", type=int, default=None, help="SDAR adaptation steps")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of both runs (init, data stream, noise)")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                        help="comma-separated subset of the task suite (all four: "
                             "add,mul,sort,word)")
    parser.add_argument("--num-test", type=int, default=None,
                        help="test problems per task (default: all of the test split)")
    parser.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    parser.add_argument("--num-buckets", type=int, default=2,
                        help="prompt-length buckets (one decoder compilation each)")
    parser.add_argument("--no-diagnostics", action="store_true",
                        help="skip the teacher-forced accuracy diagnostic")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def load_demo_config(stage: str):
    """`configs/demo.py`'s `get_config(stage)`."""
    return load_config(CONFIG_FILE, stage)


def _prepare_out(out: str, overwrite: bool) -> None:
    """Creates `out`; an earlier demo's stage directories are removed only with --overwrite
    (the trainer would otherwise resume the finished runs and train nothing)."""
    stale = [d for d in STAGE_DIRS if os.path.exists(os.path.join(out, d))]
    if stale and not overwrite:
        raise UsageError(f"--out {out!r} holds an earlier demo run ({', '.join(stale)}); pass "
                         "--overwrite to replace it or choose another --out")
    for d in stale:
        shutil.rmtree(os.path.join(out, d))
    os.makedirs(out, exist_ok=True)


def stage_configs(args: argparse.Namespace, out: str, task_names: Sequence[str]):
    """The AR and SDAR run configs with the command line's changes applied."""
    ar, sdar = load_demo_config("ar"), load_demo_config("sdar")
    if args.quick:
        ar.model.overrides.update(QUICK["model"])
        for cfg, steps in ((ar, QUICK["ar_steps"]), (sdar, QUICK["sdar_steps"])):
            cfg.train.steps = steps
            cfg.optimizer.warmup_steps = 1
    for cfg, steps in ((ar, args.ar_steps), (sdar, args.sdar_steps)):
        if steps is not None:
            if steps < 2:
                raise UsageError(f"training steps must be >= 2, got {steps}")
            cfg.train.steps = steps
            cfg.optimizer.warmup_steps = min(cfg.optimizer.warmup_steps, steps - 1)
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    for cfg, name in ((ar, "ar"), (sdar, "sdar")):
        cfg.data.train_path = procedural.spec_for(task_names, args.seed)
        cfg.data.seed = cfg.train.seed = args.seed
        cfg.train.workdir = os.path.join(out, name)
        cfg.train.eval_every = cfg.train.checkpoint_every = cfg.train.steps
        cfg.train.progress_bar = not args.no_progress
    sdar.train.init_from = os.path.join(out, "ar", loop.EXPORT_SUBDIR)
    return ar, sdar


def eval_rows(max_new_tokens: int, stop_ids: tuple[int, ...]) -> list[experiments.DecodeRow]:
    """The table's rows, AR first."""
    rows = [experiments.ar_row("AR", "ar", max_new_tokens, stop_ids)]
    for b in BLOCK_LENGTHS:
        for t in THRESHOLDS:
            rows.append(experiments.dynamic_row(f"SDAR B={b} t={t}", "sdar", b, t,
                                                max_new_tokens, stop_ids))
    return rows


def _recipe(cfg) -> str:
    obj = cfg.objective
    sizes = obj.mixed_block_sizes or (obj.block_size,)
    parts = [f"{cfg.model.overrides.logits_convention or 'same_position'} logits",
             f"learning rate {cfg.optimizer.peak_lr:g}",
             "B drawn from " + "/".join(map(str, sizes)) + " per step"]
    if cfg.model.overrides.block_attention == "causal":
        parts.append("causal attention inside blocks")
    if obj.ar_loss_weight:
        parts.append(f"AR term x{obj.ar_loss_weight}")
    if obj.complementary_masking:
        parts.append("complementary masking")
    if obj.distill_weight:
        parts.append(f"AR distillation x{obj.distill_weight}")
    return ", ".join(parts)


def run(args: argparse.Namespace) -> int:
    start, cpu_start = time.perf_counter(), time.process_time()
    task_names = tuple(t for t in args.tasks.split(",") if t)
    unknown = [t for t in task_names if t not in tasks.TASKS]
    if not task_names or unknown:
        raise UsageError(f"--tasks {args.tasks!r}: expected a comma-separated subset of {tasks.TASKS}")
    num_test = QUICK["num_test"] if args.quick and args.num_test is None else args.num_test
    if num_test is not None and num_test < 1:
        raise UsageError(f"--num-test must be >= 1, got {num_test}")
    ar_cfg, sdar_cfg = stage_configs(args, os.path.abspath(args.out), task_names)
    out = os.path.abspath(args.out)
    _prepare_out(out, args.overwrite)
    test = tasks.load_split("test", tasks=task_names)
    if num_test is not None:
        test = [e for t in task_names for e in [x for x in test if x["task"] == t][:num_test]]
    tokenizer = Tokenizer.from_dir(ar_cfg.data.tokenizer_dir)

    stages = {"ar": experiments.train_stage(ar_cfg, "AR"),
              "sdar": experiments.train_stage(sdar_cfg, "SDAR")}
    max_new = QUICK["max_new_tokens"] if args.quick else MAX_NEW_TOKENS
    settings = runner.EvalSettings(style="gsm8k", batch_size=args.batch_size,
                                   num_buckets=args.num_buckets, chat=True,
                                   progress=not args.no_progress)
    exports = {k: v["export_dir"] for k, v in stages.items()}
    rows = experiments.evaluate_rows(eval_rows(max_new, tokenizer.stop_token_ids), exports,
                                     tokenizer, test, settings, out)
    diagnostics = {}
    if not args.no_diagnostics:
        diagnostics = experiments.diagnose(
            {"AR": (exports["ar"], "ar"), "SDAR": (exports["sdar"], "diffusion")},
            tokenizer, test, DIAGNOSTIC_BLOCK)
    experiments.write_plots(
        {"AR (next-token loss)": stages["ar"]["losses"],
         "SDAR adaptation (block-diffusion loss)": stages["sdar"]["losses"]},
        rows, out, title="training loss: AR from scratch, then SDAR adaptation")
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start

    table = experiments.results_table(rows, task_names)
    print(f"\nSDAR demo: {len(test)} held-out problems ({', '.join(task_names)}), greedy, "
          f"max {max_new} new tokens; AR {stages['ar']['steps']} steps "
          f"({stages['ar']['seconds']:.0f}s), SDAR adaptation {stages['sdar']['steps']} steps "
          f"({stages['sdar']['seconds']:.0f}s: {_recipe(sdar_cfg)}); SDAR rows: "
          f"low_confidence_dynamic, steps = B, one model for both B")
    print(table)
    print("acc: exact final answers, ± the binomial standard error; tokens/s: decoding only "
          f"(compilation excluded); total wall time {wall:.0f}s, CPU time {cpu:.0f}s")
    diag_table = experiments.diagnostics_table(diagnostics) if diagnostics else ""
    if diag_table:
        print(f"\nteacher-forced token accuracy on the same problems (positions in blocks of "
              f"{DIAGNOSTIC_BLOCK}; SDAR masked_block: the whole block masked, left_clean: every "
              "earlier token clean)")
        print(diag_table)
    print(f"plots: {os.path.join(out, 'loss_curves.png')}, {os.path.join(out, 'accuracy_vs_tpf.png')}")
    summary = {
        "quick": args.quick, "seed": args.seed, "tasks": list(task_names), "num_test": len(test),
        "max_new_tokens": max_new, "wall_seconds": wall, "cpu_seconds": cpu,
        "training": stages,
        "configs": {"ar": ar_cfg.to_dict(), "sdar": sdar_cfg.to_dict()},
        "eval_settings": dataclasses.asdict(settings),
        "rows": rows, "table": table,
        "diagnostics": diagnostics, "diagnostics_table": diag_table,
    }
    experiments.write_json(os.path.join(out, "demo_summary.json"), summary)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main("demo", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
