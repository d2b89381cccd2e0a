"""The command line: ``python -m curvlin`` check, demo and bench."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _helpers import needs_test_dep
from test_mnist_idx import write_mnist

from curvlin.__main__ import main
from curvlin._methods import SETTINGS, TUNED, build, settings


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
    assert "bench" in done.stdout


def tiny_factory(batch_size):
    """A ``module:factory`` for the bench test: a 6-8-3 classifier on random data."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch_size, 6, generator=g), torch.randint(0, 3, (batch_size,), generator=g)
    return model, x, y, "cross_entropy"


@needs_test_dep("matplotlib")
def test_demo_every_method_table_plot_and_json(tmp_path, capsys):
    import matplotlib.image

    args = ["--problem", "digits", "--iterations", "6", "--batch-size", "64", "--out"]
    assert main(["demo", *args, str(tmp_path), "--no-progress", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    for name in SETTINGS:
        assert f"\n{name} " in out, name  # a row of the table for every optimizer
    for column in ("loss@1", "loss@3", "loss@6", "ms/step", "peak MiB", "T1 it / s"):
        assert column in out
    assert "T1: " in out
    assert "final loss" in out
    assert "KFAC: KFAC {'lr': 0.1, 'damping': 0.1," in out  # digits' tuned setting is used
    png = tmp_path / "curvlin-demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(png)
    assert image.ndim == 3
    assert image.shape[0] > 300
    assert image.shape[1] > 600
    runs = json.loads((tmp_path / "curvlin-demo.json").read_text())["runs"]
    assert [r["name"] for r in runs] == list(SETTINGS)
    assert all(len(r["losses"]) == 6 and np.all(np.isfinite(r["losses"])) for r in runs)
    assert all(np.all(np.diff(r["seconds"]) > 0) for r in runs)


@needs_test_dep("matplotlib")
def test_demo_mnist_from_idx_files_and_thresholds(tmp_path, capsys):
    write_mnist(tmp_path, n_train=40, n_test=10)
    args = ["--problem", "mnist", "--data", str(tmp_path), "--methods", "KFAC,Adam"]
    args += ["--iterations", "3", "--batch-size", "20", "--thresholds", "1e9,1e-9"]
    assert main(["demo", *args, "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"MNIST from {tmp_path}" in out
    assert "784-1000-500-250-30-mirror" in out
    assert "T1: loss 1e+09 loss" in out
    assert "T2: loss 1e-09 loss" in out
    rows = [line for line in out.splitlines() if line.startswith(("KFAC ", "Adam "))]
    assert len(rows) == 2
    assert all(" 1 / " in row and row.rstrip().endswith("—") for row in rows)  # T1 hit at once
    assert (tmp_path / "out" / "curvlin-demo.png").stat().st_size > 10_000


def test_demo_mnist_needs_its_files(tmp_path):
    with pytest.raises(SystemExit, match="needs --data DIR: a directory holding train-images"):
        main(["demo", "--problem", "mnist"])
    with pytest.raises(SystemExit, match="curvlin does not download MNIST"):
        main(["demo", "--problem", "mnist", "--data", str(tmp_path)])


def test_demo_rejects_unknown_optimizer():
    with pytest.raises(SystemExit, match="unknown optimizers"):
        main(["demo", "--optimizers", "KFAC,Nadam", "--iterations", "1"])
    with pytest.raises(SystemExit, match="--thresholds must be numbers"):
        main(["demo", "--thresholds", "low", "--iterations", "1"])


def run(name, losses, seconds):
    from curvlin._demo import Run

    return Run(name, list(range(1, len(losses) + 1)), list(seconds), list(losses))


def test_thresholds_and_verdicts():
    from curvlin._demo import default_thresholds, first_reach, verdicts

    losses = [10.0, 8.0, 6.0, 4.0]
    kfac = run("KFAC", [10.0, 2.0, 2.0, 2.0], [1.0, 2.0, 3.0, 4.0])
    adam = run("Adam", losses, [0.1, 0.2, 0.3, 0.4])
    sgd = run("SGD+momentum", [10.0] * 4, [0.1, 0.2, 0.3, 0.4])
    # Smoothed over a window of 20: the running mean of all losses so far.
    assert first_reach(adam, 7.0) == 4  # means 10, 9, 8, 7
    assert first_reach(kfac, 6.0) == 2
    assert first_reach(sgd, 9.0) is None
    assert default_thresholds([kfac, adam, sgd]) == [
        ("SGD+momentum final", 10.0),
        ("Adam final", 7.0),
    ]
    notes = verdicts([kfac, adam, sgd], [("Adam final", 7.0), ("low", 0.5)])
    assert notes == [
        "Adam final (7.00), fastest first-order: Adam (4 / 0.4 s): fewer iterations but more "
        "time: KFAC (2 / 2.0 s)"
    ]
    fast = run("KFAC", [10.0, 10.0, 10.0, 1.0], [0.01, 0.02, 0.03, 0.04])
    slow = run("Adam", [10.0, 4.0, 4.0, 4.0], [1.0, 2.0, 3.0, 4.0])
    assert verdicts([fast, slow], [("x", 7.9)]) == [
        "x (7.90), fastest first-order: Adam (2 / 2.0 s): faster in time: KFAC (4 / 0.0 s)"
    ]
    behind = run("KFAC", [10.0] * 3 + [1.0], [1.0, 2.0, 3.0, 4.0])
    assert verdicts([behind, slow], [("x", 7.9)]) == [
        "x (7.90), fastest first-order: Adam (2 / 2.0 s): no curvature method reaches it in "
        "fewer iterations"
    ]


def test_settings_per_problem_override_only_their_options():
    assert settings() == SETTINGS
    from curvlin._demo import ARCHITECTURES

    assert set(TUNED) == set(ARCHITECTURES) - {"curves"}  # every demo problem but CURVES
    for problem, tuned in TUNED.items():
        assert set(tuned) <= set(SETTINGS), problem
        per_problem = settings(problem)
        assert list(per_problem) == list(SETTINGS)
        for name, setting in per_problem.items():
            changed = {k for k, v in setting.options.items() if SETTINGS[name].options[k] != v}
            assert changed == set(tuned.get(name, {})) - {"warmup"}, (problem, name)
            assert setting.warmup == tuned.get(name, {}).get("warmup", SETTINGS[name].warmup)
            assert (setting.kind, setting.sampled, setting.baseline) == (
                SETTINGS[name].kind, SETTINGS[name].sampled, SETTINGS[name].baseline
            )  # fmt: skip
    assert settings("digits")["KFAC"].options["lr"] == 0.1
    assert SETTINGS["KFAC"].options["lr"] == 1.0  # the table itself is left alone
    with pytest.raises(ValueError, match="unknown problem 'cifar'"):
        settings("cifar")


def test_warmup_schedule_ramps_lr_linearly_then_holds():
    import torch

    from curvlin._methods import warmup_schedule

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.03)
    assert warmup_schedule(opt, 0) is None
    assert warmup_schedule(opt, 1) is None
    sched = warmup_schedule(opt, 4)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])  # the lr step k runs at
        opt.step()
        sched.step()
    np.testing.assert_allclose(seen, [0.03 * k / 4 for k in (1, 2, 3, 4)] + [0.03, 0.03])
    assert SETTINGS["K-BFGS(L)"].warmup == 50
    assert settings("digits")["K-BFGS(L)"].warmup == 0


def test_settings_merge_nested_options_key_by_key(monkeypatch):
    monkeypatch.setitem(TUNED, "digits", {"Muon": {"muon": {"lr": 0.05}}})
    muon = settings("digits")["Muon"].options
    assert muon["muon"] == {"lr": 0.05, "momentum": 0.95}
    assert muon["adamw"] == SETTINGS["Muon"].options["adamw"]
    assert SETTINGS["Muon"].options["muon"]["lr"] == 0.02


def test_build_uses_the_problem_settings():
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 4))
    opt = build("KFAC", model, loss="mse", problem="digits")
    assert opt.param_groups[0]["lr"] == TUNED["digits"]["KFAC"]["lr"]
    assert opt.param_groups[0]["damping"] == TUNED["digits"]["KFAC"]["damping"]
    assert opt.param_groups[0]["lr"] != SETTINGS["KFAC"].options["lr"]


def test_muon_steps_matrices_and_adamw_the_rest():
    import torch
    from torch import nn

    from curvlin._methods import MuonAdamW, build

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    opt = build("Muon", model)
    assert isinstance(opt, MuonAdamW)
    muon, adamw = opt.optimizers
    assert isinstance(muon, torch.optim.Muon)
    assert isinstance(adamw, torch.optim.AdamW)
    assert all(p.ndim == 2 for g in muon.param_groups for p in g["params"])
    assert all(p.ndim == 1 for g in adamw.param_groups for p in g["params"])
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(8, 4)

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    assert torch.isfinite(opt.step(closure))
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_bench_every_method_with_layer_breakdown(capsys):
    args = ["--model", "test_cli:tiny_factory", "--batch-size", "16", "--steps", "2"]
    args += ["--repeat", "1", "--warmup", "1", "--layers", "--threads", "1"]
    assert main(["bench", *args]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0] for line in out.splitlines() if line.split()}
    for name in SETTINGS:
        assert name in rows, name
    assert "not finite" not in out
    assert "KFAC: per layer" in out
    assert "KFACBlock" in out
    assert "TNTBlock" in out
    assert "stats GFLOP" in out
    assert "precond GFLOP" in out
    # KFAC's statistics formula on the first layer's rows: R·(d_out² + d_a²), 16 rows of 6 + 1.
    kfac = out[out.index("KFAC: per layer") :].splitlines()
    assert float(kfac[2].split()[3]) == pytest.approx(16 * (8**2 + 7**2) / 1e9, rel=1e-3)
    blocks = [line.split() for line in out.splitlines() if "Block " in line]
    assert len(blocks) >= 2 * (len(SETTINGS) - 3)  # two layers (TNT, Shampoo: four tensors)
    for row in blocks:
        _, block, _, stats, stats_ms, refresh, refresh_ms, precond, precond_ms = row[:9]
        assert min(float(stats), float(refresh), float(precond)) >= 0, row
        assert float(stats_ms) >= 0, row  # every layer was timed
        assert float(refresh_ms) >= 0, row
        # A state never holds more than its formula allows (the last two columns).
        assert float(row[-1]) <= float(row[-2]), row
        # SMW-NG's kernel blocks are solved together: no per-layer preconditioning time.
        assert (precond_ms == "—") == (block == "LinearKernelBlock"), row


def test_bench_windows_are_whole_schedule_periods():
    """A window shorter than the refresh interval could miss every refresh, and the best of
    several windows would then be one that does."""
    from curvlin._bench import window_steps

    assert window_steps("Adam", 10) == 10
    assert window_steps("TNT", 10) == 12  # statistics every 3, refresh every 6
    assert window_steps("TNT", 12) == 12
    assert window_steps("KFAC", 10) == 20  # refresh every 20
    assert window_steps("MBF", 10) == 40  # statistics and refresh every 40
    for name, setting in SETTINGS.items():
        steps = window_steps(name, 7)
        assert steps >= 7
        for key in ("stats_every", "refresh_every"):
            assert steps % setting.options.get(key, 1) == 0, (name, key)


def test_bench_rejects_bad_model():
    with pytest.raises(SystemExit, match="--model must be one of"):
        main(["bench", "--model", "resnet"])
    with pytest.raises(SystemExit, match="no_such_module"):
        main(["bench", "--model", "no_such_module:f"])


def test_console_script_declared():
    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert 'curvlin = "curvlin.__main__:main"' in text
