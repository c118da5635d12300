"""The whole SDAR story on a CPU, in one command: train AR, adapt to block diffusion, compare.

  python launch/demo.py [--out demo_out] [--overwrite] [--quick]
      [--ar-steps N] [--sdar-steps N] [--tasks add,sort,word] [--num-test N]

1. Train a tiny Qwen3-style model from scratch with the next-token (AR)
   objective on the shipped task suite (`configs/demo.py:ar`); by default on
   its add, sort and word tasks (`--tasks add,mul,sort,word` for all four).
2. Adapt it to SDAR block diffusion: continue training from the AR params
   with the SDAR objective at block 4 (`configs/demo.py:sdar`), as the paper
   turns AR checkpoints into SDAR ones.
3. Evaluate on the held-out test split, greedy: the AR model with AR decoding,
   and the SDAR model with low_confidence_dynamic decoding at block 4 and 8
   (steps = block length), thresholds 0.7, 0.8, 0.9. Block 8 uses the same
   block-4-adapted model.
4. Print one table (accuracy overall and per task, tokens per forward,
   forwards, tokens/s, all measured by this run) and write into `--out`:
   `loss_curves.png`, `accuracy_vs_tpf.png`, `demo_summary.json`,
   `eval/<row>.jsonl` (every decoded sample), and the two runs' workdirs
   `ar/` and `sdar/` (checkpoints, TensorBoard logs, exported params).

`--quick` shrinks everything (model, steps, test problems, output length)
to check the pipeline in about a minute; its accuracies are not meaningful.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import sys
import time
from typing import Any, Sequence

import jax

from sdar_jax import convert
from sdar_jax.data import tasks
from sdar_jax.data.tokenizer import Tokenizer
from sdar_jax.decode.decoder import DecodeConfig
from sdar_jax.eval import report, runner
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

# Applied on top of configs/demo.py by --quick.
QUICK = dict(
    model=dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
               intermediate_size=64),
    ar_steps=4, sdar_steps=4, num_test=2, max_new_tokens=16,
)


class UsageError(ValueError):
    """Bad command-line input; reported as one line."""


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
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                        help="comma-separated subset of the task suite (all four: "
                             "add,mul,sort,word)")
    parser.add_argument("--num-test", type=int, default=None,
                        help="test problems per task (default: all of the test split)")
    parser.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    parser.add_argument("--num-buckets", type=int, default=2,
                        help="prompt-length buckets (one decoder compilation each)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def load_demo_config(stage: str):
    """`configs/demo.py`'s `get_config(stage)`."""
    spec = importlib.util.spec_from_file_location("demo_config", CONFIG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(stage)


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


def _task_files(out: str, task_names: Sequence[str]) -> tuple[str, list[dict[str, str]]]:
    """The training JSONL for `task_names` (the shipped file when all tasks) and the test examples."""
    test = tasks.load_split("test", tasks=task_names)
    if tuple(task_names) == tasks.TASKS:
        return os.path.join(tasks.TASK_DIR, "train.jsonl"), test
    path = os.path.join(out, "data", "train.jsonl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tasks.write_jsonl(path, tasks.load_split("train", tasks=task_names))
    return path, test


def stage_configs(args: argparse.Namespace, out: str, train_path: str):
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
    for cfg, name in ((ar, "ar"), (sdar, "sdar")):
        cfg.data.train_path = train_path
        cfg.train.workdir = os.path.join(out, name)
        cfg.train.eval_every = cfg.train.checkpoint_every = cfg.train.steps
        cfg.train.progress_bar = not args.no_progress
    sdar.train.init_from = os.path.join(out, "ar", loop.EXPORT_SUBDIR)
    return ar, sdar


def train_stage(config, name: str) -> dict[str, Any]:
    """Runs one training stage on one device; returns its loss curve and timing."""
    print(f"[demo] training {name}: {config.train.steps} steps", file=sys.stderr, flush=True)
    start = time.perf_counter()
    result = loop.train(config, devices=jax.local_devices()[:1])
    seconds = time.perf_counter() - start
    if result.export_dir is None:
        raise RuntimeError(f"the {name} run stopped at step {result.step} without exporting params")
    losses = [h["loss"] for h in result.history]
    return {"export_dir": result.export_dir, "steps": result.step, "seconds": seconds,
            "losses": losses, "final_loss": losses[-1],
            "final_accuracy": result.history[-1]["accuracy"]}


def eval_rows(max_new_tokens: int, stop_ids: tuple[int, ...]) -> list[tuple[str, str, DecodeConfig]]:
    """(row name, model stage, decode config) of the table, AR first."""
    rows = [("AR", "ar", DecodeConfig(mode="ar", max_new_tokens=max_new_tokens, stop_ids=stop_ids))]
    for b in BLOCK_LENGTHS:
        for t in THRESHOLDS:
            rows.append((f"SDAR B={b} t={t}", "sdar", DecodeConfig(
                mode="diffusion", block_length=b, steps=b, strategy="low_confidence_dynamic",
                threshold=t, max_new_tokens=max_new_tokens, stop_ids=stop_ids)))
    return rows


def evaluate_all(exports: dict[str, str], tokenizer: Tokenizer, examples: list[dict[str, str]],
                 max_new_tokens: int, settings: runner.EvalSettings, out: str) -> list[dict[str, Any]]:
    """Every table row's evaluation; writes each row's samples to `out/eval/<row>.jsonl`."""
    models = {stage: convert.load_params_checkpoint(path) for stage, path in exports.items()}
    rows = []
    for name, stage, dc in eval_rows(max_new_tokens, tokenizer.stop_token_ids):
        print(f"[demo] evaluating {name}", file=sys.stderr, flush=True)
        config, params = models[stage]
        result = runner.evaluate(params, config, tokenizer, examples, dc, settings)
        slug = name.replace(" ", "_").replace("=", "")
        runner.write_jsonl(os.path.join(out, "eval", f"{slug}.jsonl"), result.records)
        s = result.summary
        rows.append({
            "name": name, "model": stage, "mode": dc.mode,
            "block_length": dc.block_length if dc.mode == "diffusion" else 1,
            "threshold": dc.threshold if dc.mode == "diffusion" else None,
            "accuracy": s["accuracy"], "accuracy_by_task": s["accuracy_by_task"],
            "tpf": s["tpf"], "num_forwards": s["num_forwards"],
            "batch_forwards": s["batch_forwards"], "generated_tokens": s["generated_tokens"],
            "tokens_per_second": s["tokens_per_second"], "decode_seconds": s["decode_seconds"],
            "compile_seconds": s["compile_seconds"], "records": f"eval/{slug}.jsonl",
        })
    return rows


def results_table(rows: Sequence[dict[str, Any]], task_names: Sequence[str]) -> str:
    """The printed table: accuracy (all, per task), TPF, forwards, tokens/s per row."""
    flat = [{**r, **{f"acc_{t}": 100 * r["accuracy_by_task"].get(t, 0.0) for t in task_names},
             "acc": 100 * r["accuracy"]} for r in rows]
    columns = [("name", "decoding", ""), ("acc", "acc %", ".1f")]
    columns += [(f"acc_{t}", f"{t} %", ".0f") for t in task_names]
    columns += [("tpf", "TPF", ".2f"), ("num_forwards", "forwards", "d"),
                ("tokens_per_second", "tokens/s", ".0f")]
    return report.format_table(flat, columns)


def write_plots(stages: dict[str, dict[str, Any]], rows: Sequence[dict[str, Any]], out: str) -> None:
    """loss_curves.png (AR steps, then the SDAR steps continuing the count) and accuracy_vs_tpf.png."""
    ar, sdar = stages["ar"], stages["sdar"]
    n_ar = len(ar["losses"])
    curves = {
        "AR (next-token loss)": (list(range(1, n_ar + 1)), ar["losses"]),
        "SDAR adaptation (block-diffusion loss, B=4)":
            (list(range(n_ar + 1, n_ar + len(sdar["losses"]) + 1)), sdar["losses"]),
    }
    report.plot_loss_curves(curves, os.path.join(out, "loss_curves.png"),
                            title="training loss: AR from scratch, then SDAR adaptation")
    points = [{"label": "AR" if r["mode"] == "ar" else f"t={r['threshold']}",
               "group": "AR" if r["mode"] == "ar" else f"SDAR B={r['block_length']}",
               "accuracy": r["accuracy"], "tpf": r["tpf"]} for r in rows]
    report.plot_accuracy_vs_tpf(points, os.path.join(out, "accuracy_vs_tpf.png"),
                                title="held-out accuracy vs tokens per forward")


def run(args: argparse.Namespace) -> int:
    start, cpu_start = time.perf_counter(), time.process_time()
    task_names = tuple(t for t in args.tasks.split(",") if t)
    unknown = [t for t in task_names if t not in tasks.TASKS]
    if not task_names or unknown:
        raise UsageError(f"--tasks {args.tasks!r}: expected a comma-separated subset of {tasks.TASKS}")
    num_test = QUICK["num_test"] if args.quick and args.num_test is None else args.num_test
    if num_test is not None and num_test < 1:
        raise UsageError(f"--num-test must be >= 1, got {num_test}")
    out = os.path.abspath(args.out)
    _prepare_out(out, args.overwrite)
    train_path, test = _task_files(out, task_names)
    if num_test is not None:
        test = [e for t in task_names for e in [x for x in test if x["task"] == t][:num_test]]
    ar_cfg, sdar_cfg = stage_configs(args, out, train_path)
    tokenizer = Tokenizer.from_dir(ar_cfg.data.tokenizer_dir)

    stages = {"ar": train_stage(ar_cfg, "AR"), "sdar": train_stage(sdar_cfg, "SDAR")}
    max_new = QUICK["max_new_tokens"] if args.quick else MAX_NEW_TOKENS
    settings = runner.EvalSettings(style="gsm8k", batch_size=args.batch_size,
                                   num_buckets=args.num_buckets, chat=True,
                                   progress=not args.no_progress)
    rows = evaluate_all({k: v["export_dir"] for k, v in stages.items()}, tokenizer, test, max_new,
                        settings, out)
    write_plots(stages, rows, out)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start

    table = results_table(rows, task_names)
    print(f"\nSDAR demo: {len(test)} held-out problems ({', '.join(task_names)}), greedy, "
          f"max {max_new} new tokens; AR {stages['ar']['steps']} steps "
          f"({stages['ar']['seconds']:.0f}s), SDAR adaptation {stages['sdar']['steps']} steps "
          f"({stages['sdar']['seconds']:.0f}s); SDAR rows: low_confidence_dynamic, steps = B, "
          f"model adapted at B=4")
    print(table)
    print(f"tokens/s: decoding only (compilation excluded); total wall time {wall:.0f}s, "
          f"CPU time {cpu:.0f}s")
    print(f"plots: {os.path.join(out, 'loss_curves.png')}, {os.path.join(out, 'accuracy_vs_tpf.png')}")
    summary = {
        "quick": args.quick, "tasks": list(task_names), "num_test": len(test),
        "max_new_tokens": max_new, "wall_seconds": wall, "cpu_seconds": cpu,
        "training": {k: {kk: vv for kk, vv in v.items()} for k, v in stages.items()},
        "configs": {"ar": ar_cfg.to_dict(), "sdar": sdar_cfg.to_dict()},
        "eval_settings": dataclasses.asdict(settings),
        "rows": rows, "table": table,
    }
    with open(os.path.join(out, "demo_summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
