"""The experiment steps the launchers share: train a stage, evaluate a grid of decoding rows,
diagnose, tabulate, write results.

  train_stage(config, name)            one run (`train.loop.train`) on one device, with
                                       its loss curve and wall / CPU seconds
  evaluate_rows(rows, exports, ...)    every `DecodeRow` on held-out problems; each row's
                                       samples to `<out>/eval/<slug>.jsonl`
  diagnose(models, ...)                teacher-forced token accuracy of each model
                                       (`eval.teacher_forcing`)
  results_table / diagnostics_table    the printed tables (accuracy with its standard error)
  write_json                           a results file, written whole or not at all

`launch/demo.py` and `launch/compare_strategies.py` parse flags and call these.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import tempfile
import time
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from sdar_jax.checkpoint.params import load_params_checkpoint
from sdar_jax.checkpoint.sharded_restore import load_for_inference
from sdar_jax.data.tokenizer import Tokenizer
from sdar_jax.decode.decoder import DecodeConfig
from sdar_jax.eval import report, runner
from sdar_jax.eval import teacher_forcing
from sdar_jax.train import loop


@dataclasses.dataclass(frozen=True)
class DecodeRow:
    """One table row: `name`, the model it decodes (a key of the exports) and how."""

    name: str
    model: str
    decode: DecodeConfig

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.name.replace("=", "")).strip("_")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def train_stage(config: ml_collections.ConfigDict, name: str,
                devices: Sequence[jax.Device] | None = None) -> dict[str, Any]:
    """Runs one training stage (on the first local device by default).

    Returns:
      export_dir, steps, seconds (wall), cpu_seconds (this process), losses
      (per step), final_loss, final_accuracy, median_step_seconds (the steps
      the trainer timed: compilation excluded; None when it timed none).

    Raises:
      RuntimeError: the run stopped (preempted) before exporting its params.
    """
    log(f"[experiments] training {name}: {config.train.steps} steps")
    start, cpu = time.perf_counter(), time.process_time()
    result = loop.train(config, devices=devices or jax.local_devices()[:1])
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    if result.export_dir is None:
        raise RuntimeError(f"the {name} run stopped at step {result.step} without exporting params")
    losses = [h["loss"] for h in result.history]
    step_seconds = [h["num_tokens"] / h["tokens_per_s"] for h in result.history
                    if h.get("tokens_per_s")]
    return {"export_dir": result.export_dir, "steps": result.step, "seconds": seconds,
            "cpu_seconds": cpu_seconds, "losses": losses, "final_loss": losses[-1],
            "final_accuracy": result.history[-1]["accuracy"],
            "median_step_seconds": float(np.median(step_seconds)) if step_seconds else None}


def ar_row(name: str, model: str, max_new_tokens: int, stop_ids: Sequence[int]) -> DecodeRow:
    return DecodeRow(name, model, DecodeConfig(mode="ar", max_new_tokens=max_new_tokens,
                                               stop_ids=tuple(stop_ids)))


def dynamic_row(name: str, model: str, block_length: int, threshold: float,
                max_new_tokens: int, stop_ids: Sequence[int]) -> DecodeRow:
    """low_confidence_dynamic at `threshold`, steps = block length."""
    return DecodeRow(name, model, DecodeConfig(
        mode="diffusion", block_length=block_length, steps=block_length,
        strategy="low_confidence_dynamic", threshold=threshold, max_new_tokens=max_new_tokens,
        stop_ids=tuple(stop_ids)))


def row_result(row: DecodeRow, summary: Mapping[str, Any], records_path: str) -> dict[str, Any]:
    """The JSON-ready result of one row (the keys `demo_summary.json` promises, and more)."""
    dc = row.decode
    diffusion = dc.mode == "diffusion"
    return {
        "name": row.name, "model": row.model, "mode": dc.mode,
        "block_length": dc.block_length if diffusion else 1,
        "threshold": dc.threshold if diffusion else None,
        "strategy": dc.strategy if diffusion else None,
        "steps": dc.steps if diffusion else None,
        "accuracy": summary["accuracy"], "accuracy_stderr": summary["accuracy_stderr"],
        "num_examples": summary["num_examples"], "accuracy_by_task": summary["accuracy_by_task"],
        "tpf": summary["tpf"], "num_forwards": summary["num_forwards"],
        "batch_forwards": summary["batch_forwards"], "generated_tokens": summary["generated_tokens"],
        "tokens_per_second": summary["tokens_per_second"],
        "decode_seconds": summary["decode_seconds"], "compile_seconds": summary["compile_seconds"],
        "records": records_path,
    }


def evaluate_rows(rows: Sequence[DecodeRow], exports: Mapping[str, str], tokenizer: Tokenizer,
                  examples: Sequence[Mapping[str, Any]], settings: runner.EvalSettings,
                  out: str) -> list[dict[str, Any]]:
    """Every row's evaluation, in order; writes each row's samples to `out/eval/<slug>.jsonl`.

    Args:
      rows: the table rows.
      exports: model key -> params export directory (`sdar_jax.checkpoint.params` format).
      tokenizer: encodes prompts and decodes samples.
      examples: held-out problems (`prompt`, `answer`, optional `task`).
      settings: scoring and batching.
      out: the output directory.
    """
    missing = sorted({r.model for r in rows} - set(exports))
    if missing:
        raise KeyError(f"evaluate_rows: rows name models {missing} with no export; have {sorted(exports)}")
    models = {key: load_for_inference(exports[key]) for key in {r.model for r in rows}}
    results = []
    for row in rows:
        log(f"[experiments] evaluating {row.name}")
        config, params, _ = models[row.model]
        result = runner.evaluate(params, config, tokenizer, examples, row.decode, settings)
        records = os.path.join("eval", f"{row.slug}.jsonl")
        runner.write_jsonl(os.path.join(out, records), result.records)
        results.append(row_result(row, result.summary, records))
    return results


def diagnose(models: Mapping[str, tuple[str, str]], tokenizer: Tokenizer,
             examples: Sequence[Mapping[str, Any]], block_size: int) -> dict[str, Any]:
    """Teacher-forced token accuracy of each model: name -> (export dir, "ar" | "diffusion")."""
    out = {}
    for name, (export, mode) in models.items():
        log(f"[experiments] teacher-forced accuracy of {name} ({mode})")
        config, params = load_params_checkpoint(export)
        out[name] = teacher_forcing.teacher_forced_accuracy(
            params, config, tokenizer, examples, mode=mode, block_size=block_size)
    return out


def results_table(rows: Sequence[Mapping[str, Any]], task_names: Sequence[str]) -> str:
    """Accuracy ± its binomial standard error (all, per task), TPF, forwards, batch
    forwards, tokens/s and, when a row decodes in AR mode, every row's tokens/s
    against that (the first AR row's)."""
    ar = next((r for r in rows if r.get("mode") == "ar"), None)
    flat = [{**r, "acc": f"{100 * r['accuracy']:.1f} ± {100 * r['accuracy_stderr']:.1f}",
             **{f"acc_{t}": 100 * r["accuracy_by_task"].get(t, 0.0) for t in task_names},
             **({"vs_ar": f"{r['tokens_per_second'] / ar['tokens_per_second']:.2f}x"} if ar else {})}
            for r in rows]
    columns = [("name", "decoding", ""), ("acc", "acc % ± se", "")]
    columns += [(f"acc_{t}", f"{t} %", ".0f") for t in task_names]
    columns += [("tpf", "TPF", ".2f"), ("num_forwards", "forwards", "d"),
                ("batch_forwards", "batch fwd", "d"), ("tokens_per_second", "tokens/s", ".0f")]
    if ar:
        columns.append(("vs_ar", "tokens/s vs AR", ""))
    return report.format_table(flat, columns)


def diagnostics_table(diagnostics: Mapping[str, Mapping[str, Any]]) -> str:
    """Teacher-forced token accuracy %: all, first in-block position, later ones, per task."""
    rows = [r for name, s in diagnostics.items() for r in teacher_forcing.table_rows(name, s)]
    task_keys = list(dict.fromkeys(k for r in rows for k in r if k.startswith("task_")))
    columns = [("model", "model", ""), ("probe", "probe", ""), ("all", "all %", ".1f"),
               ("first", "first pos %", ".1f"), ("later", "later pos %", ".1f")]
    columns += [(k, f"{k[5:]} %", ".1f") for k in task_keys]
    return report.format_table(rows, columns)


def write_plots(curves: Mapping[str, Sequence[float]], rows: Sequence[Mapping[str, Any]],
                out: str, title: str) -> None:
    """loss_curves.png (the stages' losses, one after the other) and accuracy_vs_tpf.png."""
    series, at = {}, 0
    for label, losses in curves.items():
        series[label] = (list(range(at + 1, at + len(losses) + 1)), list(losses))
        at += len(losses)
    report.plot_loss_curves(series, os.path.join(out, "loss_curves.png"), title=title)
    points = [{"label": "AR" if r["mode"] == "ar" else f"t={r['threshold']}",
               "group": "AR" if r["mode"] == "ar" else f"SDAR B={r['block_length']}",
               "accuracy": r["accuracy"], "tpf": r["tpf"]} for r in rows]
    report.plot_accuracy_vs_tpf(points, os.path.join(out, "accuracy_vs_tpf.png"),
                                title="held-out accuracy vs tokens per forward")


def write_json(path: str, obj: Any) -> None:
    """Indented JSON written to a temporary file beside `path`, then renamed (never half-written)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
