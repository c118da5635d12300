"""Evaluate an sdar_jax params checkpoint on a JSONL file of problems (batched, jitted).

  python launch/evaluate.py --ckpt CKPT_DIR --data FILE.jsonl [--tokenizer DIR] [--chat]
      [--style gsm8k|math|math_hendrycks|exact]
      [--gsm8k-extract last-marker|strict-match|flexible-extract]
      [--n-samples N] [--k 1,5] [--output FILE.jsonl] [--summary FILE.json]
      [--batch-size N] [--num-buckets N] [--seed S] [--limit N] [--mesh fsdp=4,tensor=2] [--stored-layout]
      [every decoding flag of launch/generate.py: --mode --block-length --steps --strategy
       --threshold --temperature --top-k --top-p --max-new-tokens --stop-ids ...]

Each line of FILE.jsonl holds a `prompt` and a reference `answer` (a bare
answer, or a full solution ending in `#### 42` / holding `\\boxed{..}`);
`--prompt-field` / `--answer-field` read other keys. Prompts are grouped into
`--num-buckets` padded length buckets (one compilation each). With
`--n-samples N > 1` (needs `--temperature > 0`), every problem is sampled N
times with its own PRNG keys, and the summary adds unbiased pass@k for each
`--k` and majority-vote accuracy.

Each bucket decodes in one jitted call with continuous batching over
`--batch-size` slots (a finished row's slot takes the next waiting row).

Outputs: one JSON line per problem in `--output` (samples, extracted
answers, correctness, TPF), appended and flushed as soon as the problem's
last sample is decoded (finished work survives a later failure) and
rewritten in input order at the end; the summary JSON in `--summary`
(default: next to `--output` as `<output stem>.summary.json`), and the
summary printed. Both output paths are checked for writability before any
work. Compilations are cached on disk (`--compilation-cache`). Bad input
exits with status 2 and a one-line message naming the value.

`--mesh fsdp=4,tensor=2` decodes on a device mesh (axes as in the train
config, `-1` for the devices left over), the params restored straight into
their shardings; on a mesh each bucket's records are written when its
decoder call returns. On several hosts run the same command on every host
(multi-host start-up as `launch/train.py`: SLURM, TPU pods, or
`JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID`); every
process decodes every problem and process 0 writes the outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

from sdar_jax.cli import UsageError, load_inference_model, run_main
from sdar_jax.decode.cli import (
    DecodingArgsError, add_cache_args, add_decoding_args, add_mesh_args, check_writable,
    decode_config_from_args, enable_compilation_cache, few_rows_layout, resolve_stop_ids, start_run,
)
from sdar_jax.eval.runner import EvalSettings




STYLE_CHOICES = ("gsm8k", "math", "math_hendrycks", "exact")
GSM8K_EXTRACTIONS = {"last-marker": "gsm8k", "strict-match": "gsm8k_strict",
                     "flexible-extract": "gsm8k_flexible"}


def _style(args: argparse.Namespace) -> str:
    """The `sdar_jax.eval.answers` style of --style and --gsm8k-extract."""
    if args.style == "gsm8k":
        return GSM8K_EXTRACTIONS[args.gsm8k_extract]
    if args.gsm8k_extract != "last-marker":
        raise UsageError(
            f"--gsm8k-extract {args.gsm8k_extract} needs --style gsm8k, got --style {args.style}")
    return args.style


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evaluate", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--ckpt", required=True, help="params checkpoint directory")
    parser.add_argument("--data", required=True, help="JSONL file of problems")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer directory (default: the checkpoint directory)")
    parser.add_argument("--chat", action="store_true",
                        help="wrap prompts in the tokenizer's chat template (user turn)")
    parser.add_argument("--style", choices=STYLE_CHOICES, default="gsm8k",
                        help="answer extraction and comparison: gsm8k (see --gsm8k-extract), math "
                             "(last \\boxed{}, judged by math-verify; Hendrycks' normaliser with a "
                             "warning when math-verify is not installed), math_hendrycks, exact")
    parser.add_argument("--gsm8k-extract", choices=tuple(GSM8K_EXTRACTIONS), default="last-marker",
                        help="gsm8k answer rule: last-marker (the last `####` line, else the last "
                             "box; numbers compared by value) or lm-evaluation-harness's "
                             "strict-match / flexible-extract (its exact_match string comparison)")
    parser.add_argument("--prompt-field", default="prompt")
    parser.add_argument("--answer-field", default="answer")
    parser.add_argument("--n-samples", type=int, default=1, help="samples per problem")
    parser.add_argument("--k", default="1", help="comma-separated k of pass@k (each <= n-samples)")
    parser.add_argument("--output", default=None, help="per-problem JSONL output")
    parser.add_argument("--summary", default=None, help="summary JSON output")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-buckets", type=int, default=3,
                        help="most prompt-length buckets (one compilation each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N problems")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_decoding_args(parser)
    add_mesh_args(parser)
    add_cache_args(parser)
    return parser


def _ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(k) for k in text.split(",") if k.strip())
    except ValueError as e:
        raise UsageError(f"--k {text!r}: expected comma-separated ints") from e
    if not ks:
        raise UsageError(f"--k {text!r}: no values")
    return ks


def _summary_path(args: argparse.Namespace) -> str | None:
    if args.summary:
        return args.summary
    if args.output:
        return os.path.splitext(args.output)[0] + ".summary.json"
    return None


def format_summary(summary: dict[str, Any]) -> str:
    """A short human-readable rendering of a runner summary."""
    lines = [
        f"examples={summary['num_examples']} samples/example={summary['n_samples']} "
        f"style={summary['style']}",
        f"accuracy={summary['accuracy']:.4f} (+/- {summary['accuracy_stderr']:.4f})",
    ]
    if summary["accuracy_by_task"]:
        lines.append("by task: " + ", ".join(f"{t}={a:.4f}" for t, a in summary["accuracy_by_task"].items()))
    lines.append("pass@k: " + ", ".join(f"pass@{k}={v:.4f}" for k, v in summary["pass_at_k"].items()))
    if summary["n_samples"] > 1:
        lines.append(f"majority-vote accuracy={summary['majority_accuracy']:.4f}")
    lines.append(
        f"TPF={summary['tpf']:.3f} tokens/s={summary['tokens_per_second']:.1f} "
        f"forwards={summary['num_forwards']} generated_tokens={summary['generated_tokens']} "
        f"decode={summary['decode_seconds']:.2f}s compile={summary['compile_seconds']:.2f}s"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    summary_path = _summary_path(args)
    start_run(args)

    from sdar_jax.checkpoint import sharded_restore
    from sdar_jax.data.tokenizer import TokenizerError, load_tokenizer
    from sdar_jax.eval import runner

    writer = sharded_restore.writes_outputs()
    try:
        if args.output and writer:
            check_writable(args.output, "--output")
        if summary_path and writer:
            check_writable(summary_path, "--summary")
        enable_compilation_cache(args)
    except DecodingArgsError as e:
        raise UsageError(str(e)) from e

    try:
        settings = EvalSettings(
            style=_style(args), n_samples=args.n_samples, ks=_ks(args.k), batch_size=args.batch_size,
            num_buckets=args.num_buckets, chat=args.chat, seed=args.seed,
            progress=not args.no_progress,
        )
    except ValueError as e:
        raise UsageError(str(e)) from e
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    try:
        examples = runner.load_examples(args.data, args.prompt_field, args.answer_field)
    except (OSError, ValueError) as e:
        raise UsageError(f"--data: {e}") from e
    examples = examples[:args.limit]
    model = load_inference_model(args.ckpt, args.mesh, args.stored_layout)
    config = model.config
    tokenizer_dir = args.tokenizer or args.ckpt
    try:
        tokenizer = load_tokenizer(tokenizer_dir)
    except TokenizerError as e:
        raise UsageError(f"tokenizer {tokenizer_dir!r}: {e}") from e
    try:
        decode_config = decode_config_from_args(args, config, resolve_stop_ids(args, tokenizer, config))
    except ValueError as e:
        raise UsageError(str(e)) from e
    model = few_rows_layout(model, decode_config, args.batch_size, args.stored_layout)
    output = runner.JsonlStream(args.output) if args.output and writer else None
    try:
        with sharded_restore.activate(model.context):
            result = runner.evaluate(
                model.params, config, tokenizer, examples, decode_config, settings,
                on_record=None if output is None else lambda _, record: output.append(record))
    except ValueError as e:  # temperature / n-samples, prompt length
        raise UsageError(str(e)) from e
    if not writer:
        return 0
    if output is not None:
        output.finish(result.records)
    if summary_path:
        runner.write_summary(summary_path, result.summary)
    print(format_summary(result.summary))
    if not summary_path:
        print(json.dumps(result.summary))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main("evaluate", build_parser(), run, argv, usage_errors=(DecodingArgsError,))


if __name__ == "__main__":
    sys.exit(main())
