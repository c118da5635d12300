"""The main job (launch/demo.py) at a reduced size: train AR, adapt to SDAR, evaluate, plot."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _load_demo():
    spec = importlib.util.spec_from_file_location("demo_cli", os.path.join(ROOT, "launch", "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_demo_runs_the_whole_pipeline(tmp_path, capsys):
    demo = _load_demo()
    out = tmp_path / "demo"
    assert demo.main(["--quick", "--out", str(out), "--no-progress", "--tasks", "add,sort",
                      "--num-test", "3"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "demo_summary.json").read_text())

    # Two training stages, the SDAR one initialised from the AR export.
    assert summary["training"]["ar"]["steps"] == demo.QUICK["ar_steps"]
    assert len(summary["training"]["ar"]["losses"]) == demo.QUICK["ar_steps"]
    assert len(summary["training"]["sdar"]["losses"]) == demo.QUICK["sdar_steps"]
    assert summary["configs"]["sdar"]["train"]["init_from"] == str(out / "ar" / "export")
    assert summary["configs"]["sdar"]["objective"]["kind"] == "sdar"
    assert summary["configs"]["ar"]["objective"]["kind"] == "ar"
    for stage in ("ar", "sdar"):
        assert (out / stage / "export" / "config.json").is_file()

    # One row for AR and one per (block, threshold); each counted from its own samples file.
    names = [r["name"] for r in summary["rows"]]
    assert names == ["AR"] + [f"SDAR B={b} t={t}" for b in (4, 8) for t in (0.7, 0.8, 0.9)]
    for row in summary["rows"]:
        records = [json.loads(x) for x in (out / row["records"]).read_text().splitlines()]
        assert len(records) == summary["num_test"] == 6
        assert {r["task"] for r in records} == {"add", "sort"}
        samples = [r["samples"][0] for r in records]
        committed = sum(s["num_committed"] for s in samples)
        forwards = sum(s["num_forwards"] for s in samples)
        assert row["num_forwards"] == forwards
        assert row["tpf"] == pytest.approx(committed / forwards)
        assert row["accuracy"] == pytest.approx(sum(s["correct"] for s in samples) / len(samples))
        assert all(s["num_tokens"] <= demo.QUICK["max_new_tokens"] for s in samples)
        if row["mode"] == "ar":
            assert row["tpf"] == 1.0 and forwards == sum(s["num_tokens"] for s in samples)
        assert row["name"] in printed and f"{row['tpf']:.2f}" in printed

    # The SDAR model is trained with the recipe: shifted logits, B drawn from 4 and 8.
    sdar_cfg = summary["configs"]["sdar"]
    assert sdar_cfg["model"]["overrides"]["logits_convention"] == "shifted"
    assert tuple(sdar_cfg["objective"]["mixed_block_sizes"]) == (4, 8)
    assert sdar_cfg["data"]["train_path"].startswith("procedural:")
    exported = json.loads((out / "sdar" / "export" / "config.json").read_text())
    assert exported["logits_convention"] == "shifted"
    for row in summary["rows"]:
        assert 0 <= row["accuracy_stderr"] <= 0.5 and row["num_examples"] == 6
    # The teacher-forced diagnostic of both models, printed beside the table.
    assert set(summary["diagnostics"]) == {"AR", "SDAR"}
    assert set(summary["diagnostics"]["SDAR"]) == {"masked_block", "left_clean"}
    assert summary["diagnostics_table"] in printed
    assert summary["cpu_seconds"] > 0 and summary["wall_seconds"] > 0

    for name in ("loss_curves.png", "accuracy_vs_tpf.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert summary["table"] in printed

    # A second run into the same directory would resume the finished runs: refused.
    assert demo.main(["--quick", "--out", str(out), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
