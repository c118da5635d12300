"""launch/compare_strategies.py at a tiny size: adapt at block 8, evaluate every strategy, table."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import jax
import pytest

from sdar_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                  intermediate_size=64)


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "compare_strategies", os.path.join(ROOT, "launch", "compare_strategies.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rows_cover_the_strategies_and_skip_impossible_budgets():
    cs = _load_script()
    rows, skipped = cs.strategy_rows(8, (0.7, 0.9), (2, 4), (2, 3), 16, (3,))
    got = [(r.name, r.decode_config.strategy, r.decode_config.steps,
            r.decode_config.said_stages) for r in rows]
    assert [g[0] for g in got] == [
        "B=8 dynamic t=0.7", "B=8 dynamic t=0.9", "B=8 static T=4", "B=8 static T=2",
        "B=8 said K=2 T=4", "B=8 said K=2 T=2", "B=8 said K=3 T=4",
        "B=8 said_chlg K=2 T=7", "B=8 said_chlg K=2 T=5", "B=8 said_chlg K=3 T=7",
    ]
    dynamic = [r.decode_config for r in rows if r.decode_config.strategy == "low_confidence_dynamic"]
    assert all(dc.steps == 8 for dc in dynamic) and [dc.threshold for dc in dynamic] == [0.7, 0.9]
    chlg = [r.decode_config for r in rows if r.decode_config.strategy == "said_chlg"]
    assert all(dc.chlg_threshold == 0.8 and dc.chlg_extra_steps == 3 for dc in chlg)
    # said_chlg keeps said's generation-stage steps: only the reconstruction stage differs (1 -> 1+3).
    said = {(r.decode_config.said_stages, r.decode_config.steps): r.decode_config
            for r in rows if r.decode_config.strategy == "said"}
    for dc in chlg:
        twin = said[(dc.said_stages, dc.steps - 3)]
        assert dc.said_steps_per_stage[:-1] == twin.said_steps_per_stage[:-1]
        assert dc.said_steps_per_stage[-1] == 4 and twin.said_steps_per_stage[-1] == 1
    assert all(dc.temperature == 0.0 and dc.stop_ids == (3,) for dc in (r.decode_config for r in rows))
    # K = 3 at T = 2: two generation stages cannot share one step.
    assert [s.split(":")[0] for s in skipped] == ["B=8 said K=3 T=2", "B=8 said_chlg K=3 T=5"]


def test_bad_flags_are_one_line_errors(tmp_path, capsys):
    cs = _load_script()
    assert cs.main(["--init-from", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not a params export" in capsys.readouterr().err
    assert cs.main(["--init-from", str(tmp_path), "--thresholds", "0.7,1.5"]) == 2
    assert "--thresholds" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_pipeline_adapts_evaluates_and_writes_the_table(tmp_path, capsys):
    cs = _load_script()
    # A tiny AR model to adapt from (2 steps: the pipeline, not the accuracy, is under test).
    ar = cs.load_demo_config("ar")
    ar.model.overrides.update(TINY_MODEL)
    ar.train.steps = ar.train.eval_every = ar.train.checkpoint_every = 2
    ar.optimizer.warmup_steps = 1
    ar.train.workdir = str(tmp_path / "ar")
    ar.train.progress_bar = False
    init = loop.train(ar, devices=jax.local_devices()[:1]).export_dir

    out = tmp_path / "cmp"
    argv = ["--init-from", init, "--out", str(out), "--blocks", "8", "--sdar-steps", "2",
            "--tasks", "add,sort", "--num-test", "1", "--thresholds", "0.9",
            "--budget-divisors", "4", "--said-stages", "2", "--max-new-tokens", "8",
            "--no-progress"]
    assert cs.main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "comparison.json").read_text())

    training = summary["training"]["8"]
    assert not training["reused"] and training["steps"] == 2
    assert training["config"]["objective"]["block_size"] == 8
    assert training["config"]["objective"]["kind"] == "sdar"
    assert training["config"]["train"]["init_from"] == init
    names = [r["name"] for r in summary["rows"]]
    assert names == ["B=8 dynamic t=0.9", "B=8 static T=2", "B=8 said K=2 T=2",
                     "B=8 said_chlg K=2 T=5"]
    table = (out / "comparison.md").read_text()
    for row in summary["rows"]:
        records = [json.loads(x) for x in (out / row["records"]).read_text().splitlines()]
        samples = [r["samples"][0] for r in records]
        assert row["n"] == len(samples) == 2
        correct = sum(s["correct"] for s in samples) / 2
        assert row["accuracy"] == pytest.approx(correct)
        assert row["accuracy_stderr"] == pytest.approx(math.sqrt(correct * (1 - correct) / 2))
        assert row["num_forwards"] == sum(s["num_forwards"] for s in samples)
        assert row["forwards_per_problem"] == pytest.approx(row["num_forwards"] / 2)
        assert row["tpf"] == pytest.approx(
            sum(s["num_committed"] for s in samples) / row["num_forwards"])
        assert row["decode_config"]["block_length"] == 8
        line = next(x for x in table.splitlines() if x.startswith(f"| {row['name']} |"))
        assert f"| {row['tpf']:.2f} |" in line and line in printed

    # A second call reuses the adapted model instead of training again.
    assert cs.main(argv) == 0
    assert json.loads((out / "comparison.json").read_text())["training"]["8"]["reused"]
