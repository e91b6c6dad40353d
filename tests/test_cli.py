"""The command line, end to end: a real training run logged to a real MLflow store."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from research.blas_kernels import loaded_kernels
from research.cli import main
from research.tracking import load_weights


@pytest.fixture
def store(tmp_path):
    return f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"


@pytest.mark.slow
def test_train_logs_params_metrics_and_artifacts(tmp_path, store, capsys):
    from mlflow.tracking import MlflowClient

    code = main(
        [
            "train",
            "--subset",
            "2000",
            "--epochs",
            "3",
            "--hidden",
            "32",
            "--quiet",
            "--tracking-uri",
            store,
            "--experiment",
            "cli-test",
            "--evaluate-test",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "val/accuracy" in out and "test accuracy" in out
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("cli-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.info.run_id in out
    assert run.data.params["hidden_size"] == "32"
    assert run.data.params["learning_rate"] == "0.1"
    assert run.data.params["n_train_rows"] == "2000"
    assert run.data.params["blas_kernels"] == loaded_kernels()
    history = client.get_metric_history(run.info.run_id, "val/accuracy")
    assert [m.step for m in history] == [0, 1, 2]
    assert 0.5 < history[-1].value <= 1
    assert {"train/loss", "val/loss", "test_accuracy", "wall_seconds"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"loss_curves.png", "weights.npz"}
    folder = client.download_artifacts(run.info.run_id, "", str(tmp_path / "download"))
    with open(f"{folder}/loss_curves.png", "rb") as png:
        assert png.read(8) == b"\x89PNG\r\n\x1a\n"
    spec, params = load_weights(tmp_path / "download" / "weights.npz")
    assert spec.sizes == (784, 32, 10)
    assert params[0]["W"].shape == (784, 32) and np.isfinite(params[0]["W"]).all()
    # the artifacts sit beside the SQLite store, not in the current directory
    assert (tmp_path / "mlruns" / "artifacts").is_dir()


def test_train_divergence_exits_1_and_marks_run_failed(store, capsys):
    from mlflow.tracking import MlflowClient

    code = main(
        [
            "train",
            "--subset",
            "512",
            "--epochs",
            "2",
            "--hidden",
            "16",
            "--quiet",
            "--activation",
            "tanh",
            "--output",
            "identity",
            "--loss",
            "mse",
            "--optimizer",
            "sgd",
            "--lr",
            "1e100",
            "--raw",
            "--tracking-uri",
            store,
        ]
    )
    err = capsys.readouterr().err
    assert code == 1, err
    assert "diverged at epoch 0, step" in err
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("train").experiment_id])
    assert run.info.status == "FAILED"
    assert "diverged" in run.data.tags["diverged"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["train", "--output", "sigmoid", "--loss", "cross_entropy", "--no-track"],
            "needs output='softmax'",
        ),
        (["train", "--batch-size", "0", "--no-track"], "batch_size=0"),
        (["train", "--subset", "10", "--no-track"], "--batch-size 128 is larger than the 10"),
        (
            [
                "train",
                "--mnist-dir",
                "/nonexistent/mnist",
                "--data-dir",
                "/tmp/none-here",
                "--no-track",
            ],
            "/nonexistent/mnist",
        ),
    ],
)
def test_user_mistakes_give_one_clear_message(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_gradcheck_command_passes_and_prints_table(capsys):
    assert main(["gradcheck", "--batch-size", "32"]) == 0
    out = capsys.readouterr().out
    for row in ("loss", "layer 0 W", "layer 0 b", "layer 1 W", "layer 1 b"):
        assert row in out
    assert "all 5 arrays agree" in out
    assert "MNIST training rows" in out


def test_gradcheck_fails_when_tolerance_is_impossible(capsys):
    # A tolerance below float64 rounding must fail: the check can fail.
    code = main(
        [
            "gradcheck",
            "--synthetic",
            "--activation",
            "tanh",
            "--rtol",
            "0",
            "--atol",
            "0",
            "--n-hidden-layers",
            "3",
            "--hidden",
            "20",
            "--output",
            "softmax",
            "--loss",
            "cross_entropy",
        ]
    )
    out = capsys.readouterr().out
    assert code == 1 and "FAILED" in out


def test_module_entry_point_runs_without_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "research", "train", "--activation", "swish"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "invalid choice: 'swish'" in result.stderr and "Traceback" not in result.stderr
