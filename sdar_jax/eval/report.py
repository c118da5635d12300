"""Tables and PNG plots of evaluation results (matplotlib's object API on the Agg canvas).

No global matplotlib state is touched: figures are built with
`matplotlib.figure.Figure` and written through `FigureCanvasAgg`, so importing
this module never changes the caller's backend.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def format_table(rows: Sequence[Mapping[str, object]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A plain-text table with aligned columns.

    Args:
      rows: one mapping per row.
      columns: (key, header, format spec) triples, e.g. ("tpf", "TPF", ".2f");
        an empty spec prints the value with str().

    Returns:
      The header, a rule and one line per row.
    """
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        cells.append([format(row[k], spec) if spec else str(row[k]) for k, _, spec in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = [" | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]],
                   right: Sequence[bool] | None = None) -> list[str]:
    """GitHub markdown table lines; `right[i]` right-aligns column i (default: all but the first)."""
    right = right if right is not None else [i > 0 for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"markdown_table: a row has {len(row)} cells; the header {len(header)}")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _save(fig: Figure, path: str | os.PathLike[str]) -> None:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average over at most `window` points (same length as `values`)."""
    x = np.asarray(values, np.float64)
    if window <= 1 or x.size == 0:
        return x
    csum = np.concatenate([[0.0], np.cumsum(x)])
    idx = np.arange(1, x.size + 1)
    lo = np.maximum(idx - window, 0)
    return (csum[idx] - csum[lo]) / (idx - lo)


def plot_loss_curves(curves: Mapping[str, tuple[Sequence[int], Sequence[float]]],
                     path: str | os.PathLike[str], title: str = "training loss",
                     smoothing: int = 20) -> None:
    """One line per run: loss against the global step (raw values faint, smoothed solid).

    Args:
      curves: run name -> (steps, losses).
      path: the PNG to write.
      title: the axes title.
      smoothing: moving-average window of the solid line.
    """
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for i, (name, (steps, losses)) in enumerate(curves.items()):
        color = f"C{i}"
        ax.plot(steps, losses, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, smooth(losses, smoothing), color=color, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_accuracy_vs_tpf(rows: Sequence[Mapping[str, object]], path: str | os.PathLike[str],
                         title: str = "accuracy vs tokens per forward") -> None:
    """A point per row (`label`, `accuracy`, `tpf`, optional `group` for colour and lines).

    Rows of one group are joined by a line in TPF order (e.g. one block length
    across thresholds).
    """
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    groups: dict[str, list[Mapping[str, object]]] = {}
    for row in rows:
        groups.setdefault(str(row.get("group", row["label"])), []).append(row)
    for i, (group, members) in enumerate(groups.items()):
        members = sorted(members, key=lambda r: float(r["tpf"]))
        x = [float(r["tpf"]) for r in members]
        y = [100.0 * float(r["accuracy"]) for r in members]
        ax.plot(x, y, marker="o", color=f"C{i}", label=group)
        for r, xi, yi in zip(members, x, y):
            ax.annotate(str(r["label"]), (xi, yi), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
    top = max((100.0 * float(r["accuracy"]) for r in rows), default=0.0)
    ax.set_ylim(0.0, max(5.0, 1.15 * top))
    ax.set_xlabel("tokens per forward (TPF)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    _save(fig, path)
