"""The shared experiment steps: rows, tables with standard errors, atomic JSON results."""

import json
import os

import pytest

from sdar_jax import experiments


def test_rows_and_slugs():
    ar = experiments.ar_row("AR", "ar", 16, (3,))
    row = experiments.dynamic_row("SDAR B=4 t=0.9", "sdar", 4, 0.9, 16, (3,))
    assert ar.decode.mode == "ar" and ar.decode.stop_ids == (3,)
    dc = row.decode
    assert (dc.mode, dc.block_length, dc.steps, dc.strategy, dc.threshold) == (
        "diffusion", 4, 4, "low_confidence_dynamic", 0.9)
    assert row.slug == "SDAR_B4_t0.9"


def test_results_table_prints_standard_errors():
    rows = [{"name": "AR", "accuracy": 0.25, "accuracy_stderr": 0.025,
             "accuracy_by_task": {"add": 0.5}, "tpf": 1.0, "num_forwards": 10,
             "batch_forwards": 5, "tokens_per_second": 100.0}]
    table = experiments.results_table(rows, ("add", "sort"))
    assert "25.0 ± 2.5" in table and "acc % ± se" in table
    line = table.splitlines()[-1]
    assert "50" in line and "1.00" in line
    assert "vs AR" not in table  # no AR-mode row to compare with


def test_results_table_puts_each_rows_tokens_per_second_against_the_ar_rows():
    common = {"accuracy": 0.5, "accuracy_stderr": 0.05, "accuracy_by_task": {}, "tpf": 1.0}
    rows = [{**common, "name": "AR", "mode": "ar", "num_forwards": 40, "batch_forwards": 20,
             "tokens_per_second": 200.0},
            {**common, "name": "SDAR B=4", "mode": "diffusion", "num_forwards": 20,
             "batch_forwards": 12, "tokens_per_second": 150.0}]
    lines = experiments.results_table(rows, ()).splitlines()
    assert "tokens/s vs AR" in lines[0] and "batch fwd" in lines[0]
    assert lines[2].rstrip().endswith("1.00x") and lines[3].rstrip().endswith("0.75x")
    assert " 12 " in lines[3]


def test_write_json_is_atomic(tmp_path):
    path = tmp_path / "sub" / "out.json"
    experiments.write_json(str(path), {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    with pytest.raises(TypeError):
        experiments.write_json(str(path), {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}  # the old file survives a failed write
    assert [p for p in os.listdir(path.parent) if p.startswith(".tmp-")] == []


def test_evaluate_rows_names_missing_exports(tmp_path):
    row = experiments.ar_row("AR", "ar", 16, (3,))
    with pytest.raises(KeyError, match="no export"):
        experiments.evaluate_rows([row], {}, None, [], None, str(tmp_path))
