"""The command line: ``python -m curvlin`` (check) and ``python -m curvlin demo``."""

from __future__ import annotations

import subprocess
import sys

import pytest
from _helpers import needs_test_dep

from curvlin.__main__ import main


def test_check_passes_and_reports_every_backend(capsys):
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert "usable backends: numpy" in out
    for name in ("kron_apply", "kron_solve exact", "spd_inverse", "spd_inverse_root"):
        assert name in out
    assert "all primitives match their dense references" in out
    assert "FAIL" not in out


def test_module_entry_point_lists_commands():
    done = subprocess.run(
        [sys.executable, "-m", "curvlin", "--help"], capture_output=True, text=True, check=True
    )
    assert "check" in done.stdout
    assert "demo" in done.stdout


@needs_test_dep("matplotlib")
def test_demo_trains_prints_table_and_writes_plot(tmp_path, capsys):
    plot = tmp_path / "demo.png"
    args = [
        "--iterations",
        "12",
        "--train-size",
        "500",
        "--test-size",
        "100",
        "--batch-size",
        "50",
        "--plot",
        str(plot),
    ]
    assert main(["demo", *args]) == 0
    out = capsys.readouterr().out
    for name in ("KFAC", "Adam", "SGD+momentum"):
        assert name in out
    assert "iters to SGD final" in out
    assert plot.stat().st_size > 10_000
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_rejects_unknown_optimizer():
    with pytest.raises(SystemExit, match="unknown optimizers"):
        main(["demo", "--optimizers", "KFAC,Shampoo", "--iterations", "1"])
