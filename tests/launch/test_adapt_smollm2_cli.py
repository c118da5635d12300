"""launch/adapt_smollm2.py: bad flags are one line and exit 2, before any work."""

from __future__ import annotations


def test_launcher_flag_errors_exit_2(tmp_path, capsys):
    from launch import adapt_smollm2

    for steps, message in (("ar=x", "expected stage=int"), ("sdar4=3", "unknown stages ['sdar4']"),
                           ("ar=1", "int >= 2")):
        assert adapt_smollm2.main(["--workdir", str(tmp_path), "--steps", steps]) == 2
        err = capsys.readouterr().err
        assert err.startswith("adapt_smollm2: error: --steps") and message in err, err
        assert len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # nothing was written
