"""The command line, end to end: a real training run logged to a real MLflow store."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from helpers import copy_run

from research.cli import main
from research.engine.blas_kernels import loaded_kernels
from research.experiment.tracking.weights import load_weights


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
    assert artifacts == {"loss_curves.png", "weights.npz", "weights.txt"}
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
    assert "diverged at epoch 1, step" in err
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("train").experiment_id])
    assert run.info.status == "FAILED"
    # the one divergence tag, as a study's trials have it
    assert run.data.tags["research.state"] == "FAIL"
    assert run.data.tags["research.error"].startswith("training diverged at epoch 1, step ")
    assert run.data.tags["research.diverged_epoch"] == "0"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["train", "--output", "sigmoid", "--loss", "cross_entropy", "--no-track"],
            "needs output='softmax'",
        ),
        (
            ["train", "--batch-size", "0", "--no-track"],
            "batch_size = 0: out of range; allowed: an integer from 1 to 60000",
        ),
        (["train", "--lr", "nan", "--no-track"], "learning_rate = nan: out of range"),
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
    # the tolerance table's rows: the loss's and the gradients'
    assert (
        "<= 1e-14 + 1e-12*|jax| (the loss); |numpy - jax| <= 1e-12 + 1e-10*|jax| (gradients)" in out
    )
    assert main(["gradcheck", "--synthetic", "--batch-size", "0"]) == 2
    assert "--batch-size 0 is not allowed" in capsys.readouterr().err


def test_gradcheck_checks_dropout_with_one_fixed_set_of_masks(capsys):
    argv = ["gradcheck", "--synthetic", "--n-hidden-layers", "2", "--hidden", "24"]
    assert main([*argv, "--input-dropout", "0.2", "--dropout", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "dropout 0.2 (inputs) / 0.5 (hidden) with one fixed set of masks on both sides" in out
    assert "all 7 arrays agree" in out
    assert main(argv) == 0
    assert "dropout" not in capsys.readouterr().out.splitlines()[0]
    assert main([*argv, "--dropout", "1"]) == 2
    assert "dropout = 1.0: out of range; allowed: a number in [0, 1)" in capsys.readouterr().err


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


def test_rerun_reads_runs_through_the_field_table(store, capsys):
    """A train run reruns exactly; a run logged before a field existed takes the field's
    default, with a note; a value the table no longer allows is one line, exit 2."""
    from mlflow.tracking import MlflowClient

    argv = ["train", "--subset", "300", "--epochs", "2", "--hidden", "8", "--batch-size", "50"]
    assert main([*argv, "--quiet", "--tracking-uri", store, "--experiment", "rerun"]) == 0
    client = MlflowClient(tracking_uri=store)
    experiment_id = client.get_experiment_by_name("rerun").experiment_id
    (source,) = client.search_runs([experiment_id])
    capsys.readouterr()

    assert main(["rerun", source.info.run_id, "--tracking-uri", store]) == 0
    out = capsys.readouterr().out
    assert "reproduced exactly: 2 epochs x 3 metrics identical" in out and "note:" not in out

    older = copy_run(client, source, experiment_id, drop=("drop_last", "raw_inputs"))
    assert main(["rerun", older, "--tracking-uri", store]) == 0
    out = capsys.readouterr().out
    assert (
        "note: the run did not log drop_last, raw_inputs (it predates them): using their "
        "defaults drop_last=False, raw_inputs=False"
    ) in out
    assert "reproduced exactly" in out

    edited = copy_run(client, source, experiment_id, change={"hidden_size": "100000"})
    assert main(["rerun", edited, "--tracking-uri", store]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (
        f'error: run {edited} cannot be rerun: its params give hidden_size = "100000": out of '
        "range; allowed: an integer from 1 to 65536"
    )


def test_the_flags_are_the_field_table():
    """Every training field is a `train` flag with the field's name, type and choices (and no
    default, so the preset's value stays); gradcheck takes the network's fields."""
    import argparse

    from research.arguments import build_parser
    from research.experiment.config.fields import FIELDS

    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]

    def flags(command: str) -> dict[str, argparse.Action]:
        return {a.dest: a for a in commands.choices[command]._actions if a.dest in FIELDS}

    train = flags("train")
    assert set(train) == set(FIELDS)
    for name, field in FIELDS.items():
        action = train[name]
        assert action.option_strings[0] == "--" + name.replace("_", "-"), name
        assert set(field.flags) <= set(action.option_strings) and action.default is None, name
        assert field.help in action.help, name
        if field.kind is bool:
            assert "--no-" + name.replace("_", "-") in action.option_strings, name
        elif field.kind is tuple:  # a list: its items as words, or separated by commas
            assert action.nargs == "+", name
        else:
            assert action.type is field.kind, name
            assert tuple(action.choices or ()) == field.choices, name
    model = {name for name, field in FIELDS.items() if field.group == "model"}
    # gradcheck's own --dtype and --seed have their own defaults (--batch-size is rows)
    assert set(flags("gradcheck")) - {"dtype", "seed"} == model == {
        "hidden_size", "n_hidden_layers", "hidden_sizes", "layers", "activation", "output",
        "loss", "l2", "init", "input_dropout", "dropout",
    }  # fmt: skip
