"""Tables and plots of evaluation results."""

from __future__ import annotations

import numpy as np
import pytest

from sdar_jax.eval import report


def test_format_table_aligns_columns_and_formats_values():
    rows = [{"name": "AR", "acc": 12.345, "n": 7}, {"name": "SDAR B=4 t=0.9", "acc": 3.0, "n": 120}]
    text = report.format_table(rows, [("name", "decoding", ""), ("acc", "acc %", ".1f"),
                                      ("n", "forwards", "d")])
    lines = text.splitlines()
    assert lines[0].split(" | ") == ["decoding      ", "acc %", "forwards"]
    assert set(lines[1]) <= {"-", "+"}
    assert lines[2].split(" | ") == ["AR            ", " 12.3", "       7"]
    assert lines[3].split(" | ") == ["SDAR B=4 t=0.9", "  3.0", "     120"]
    assert len({len(line) for line in lines}) == 1


@pytest.mark.parametrize("window", [1, 3, 5])
def test_smooth_is_a_trailing_mean(window):
    x = np.random.default_rng(0).normal(size=17)
    expected = [x[max(0, i - window + 1):i + 1].mean() for i in range(len(x))]
    np.testing.assert_allclose(report.smooth(x, window), expected, rtol=1e-12)


def test_plots_write_png_files(tmp_path):
    report.plot_loss_curves({"ar": ([1, 2, 3], [3.0, 2.0, 1.5]), "sdar": ([4, 5], [2.5, 2.0])},
                            tmp_path / "loss.png")
    report.plot_accuracy_vs_tpf(
        [{"label": "AR", "group": "AR", "accuracy": 0.5, "tpf": 1.0},
         {"label": "t=0.9", "group": "B=4", "accuracy": 0.4, "tpf": 1.5},
         {"label": "t=0.7", "group": "B=4", "accuracy": 0.3, "tpf": 2.0}],
        tmp_path / "sub" / "acc.png")
    for name in ("loss.png", "sub/acc.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
