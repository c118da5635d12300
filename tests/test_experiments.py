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
             "tokens_per_second": 100.0}]
    table = experiments.results_table(rows, ("add", "sort"))
    assert "25.0 ± 2.5" in table and "acc % ± se" in table
    line = table.splitlines()[-1]
    assert "50" in line and "1.00" in line


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
