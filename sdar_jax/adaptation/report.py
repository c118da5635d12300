"""The markdown report of a finished adaptation run (`experiment.run`'s results dict)."""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from sdar_jax.eval.report import markdown_table

TASK_ORDER = ("add", "mul", "sort", "word")


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def _recipe(config: Mapping[str, Any]) -> str:
    obj = config["objective"]
    if obj["kind"] == "ar":
        return "next-token"
    sizes = obj.get("mixed_block_sizes") or (obj["block_size"],)
    overrides = config["model"]["overrides"]
    parts = [f"SDAR, {overrides.get('logits_convention') or 'same_position'} logits"]
    if overrides.get("block_attention") == "causal":
        parts.append("causal blocks")
    if obj.get("ar_loss_weight"):
        parts.append(f"AR term x{obj['ar_loss_weight']:g}")
    return ", ".join(parts + [f"B from {{{', '.join(map(str, sizes))}}}"])


def stage_lines(stages: Mapping[str, Mapping[str, Any]]) -> list[str]:
    rows = [[name, _recipe(s["config"]), str(s["steps"]), str(s["tokens_per_step"]),
             f"{s['seconds']:.0f} s", _fmt(s.get("median_step_seconds"), ".1f"),
             f"{s['first_loss']:.3f} -> {s['last_loss']:.3f}"] for name, s in stages.items()]
    return markdown_table(("stage", "objective", "steps", "tokens/step", "wall time",
                           "s/step (median)", "train loss first -> last"), rows,
                          right=(False, False, True, True, True, True, False))


def loss_lines(losses: Mapping[str, Mapping[str, Any]], block_sizes: Sequence[int]) -> list[str]:
    header = ["model", "next-token loss"]
    header += [f"SDAR loss B={b}" for b in block_sizes]
    header += [f"masked-token acc. B={b}" for b in block_sizes]
    rows = []
    for name, e in losses.items():
        ar = e.get("ar")
        sd = [e.get(f"sdar_b{b}") for b in block_sizes]
        rows.append([name, _fmt(ar and ar["loss"])] + [_fmt(s and s["loss"]) for s in sd]
                    + [_fmt(s and s["accuracy"]) for s in sd])
    return markdown_table(header, rows)


def decode_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    tasks = [t for t in TASK_ORDER if any(t in r["accuracy_by_task"] for r in rows)]
    cells = []
    for r in rows:
        by = r["accuracy_by_task"]
        cells.append([r["name"], f"{100 * r['accuracy']:.1f} ± {100 * r['accuracy_stderr']:.1f}",
                      " / ".join(_fmt(by.get(t) and 100 * by[t], ".0f") for t in tasks),
                      f"{r['tpf']:.2f}", str(r["num_forwards"]), f"{r['tokens_per_second']:.1f}"])
    return markdown_table(("model, decoding", "acc % ± se", " / ".join(tasks) + " %", "TPF",
                           "forwards", "tokens/s"), cells, right=(False, True, False, True, True, True))


def render(results: Mapping[str, Any]) -> str:
    """The report: run facts, then the stage, held-out loss and decoding tables and samples."""
    c, blocks = results["corpus"], results["block_sizes"]
    lines = [
        f"Command: `{results['command']}`  ",
        f"Date: {results['date']} UTC, commit {results['commit']}, device: {results['device']}; "
        f"total wall time {results['wall_seconds'] / 60:.1f} min, CPU time "
        f"{results['cpu_seconds'] / 60:.1f} min.",
        "",
        "Corpus: " + ", ".join(f"{k} {v}" for k, v in c.items()) + ".",
        "",
        *stage_lines(results["stages"]),
        "",
        f"Held-out set: {c['answers_heldout']} self-generated answers + {c['task_heldout_loss']} "
        "task test examples (response tokens only); SDAR losses with fixed noise keys, read with "
        "the SDAR stage's logits convention and block attention for the AR models (where the "
        "SDAR stage starts); the AR term of training is not part of it.",
        "",
        *loss_lines(results["heldout_loss"], blocks),
        "",
        f"Task test prompts: {c['task_eval']} (balanced over the tasks), chat template, greedy, "
        f"max {results['max_new_tokens']} new tokens; SDAR rows: low_confidence_dynamic, "
        f"threshold {results['threshold']}, steps = B, one model for every B; acc ± its binomial "
        "standard error; tokens/s excludes compilation.",
        "",
        *decode_lines(results["rows"]),
        "",
        "First test prompt's output per row:",
        "",
    ]
    lines += [f"- {r['name']}: {json.dumps(r['sample'], ensure_ascii=False)}" for r in results["rows"]]
    return "\n".join(lines) + "\n"
