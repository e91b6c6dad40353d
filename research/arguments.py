"""The command line's arguments: ``python -m research`` and its commands' flags (the training
fields' flags come from the field table, :mod:`research.experiment.config.flags`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from research.experiment.config.flags import add_field_flags
from research.experiment.config.presets import PRESETS, preset_name
from research.experiment.reproduction.reproduce import add_reproduce_arguments
from research.verify.layer_command import add_verify_layer_command


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--source-dir",
        "--mnist-dir",  # its old name, from when it served MNIST only
        dest="source_dir",
        help="folder holding the dataset's four IDX files (.gz or raw), for offline use; "
        "default $RESEARCH_<NAME>_DIR (RESEARCH_MNIST_DIR, RESEARCH_FASHION_MNIST_DIR), else "
        "download through tensorflow-datasets. --mnist-dir is its old name",
    )
    parser.add_argument(
        "--data-dir",
        help="where the prepared dataset and its cache live; default $RESEARCH_DATA_DIR, "
        "else ~/.cache/research",
    )


def add_preset_flag(parser: argparse.ArgumentParser, default: str, help: str) -> None:
    # type= runs first: the deprecated name "seed" becomes "origin", with a note
    parser.add_argument(
        "--preset",
        type=preset_name,
        choices=list(PRESETS),
        default=default,
        help=f"{help} (default: {default})",
    )


def add_store_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db",
    )


def port(text: str) -> int:
    port = int(text) if text.strip().isdecimal() else -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1 to 65535)")
    return port


#: The subcommands' parsers as ``build_parser`` makes them (``commands.add_parser``).
Commands = argparse._SubParsersAction


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m research",
        description="A numpy MLP with handwritten backprop, verified against JAX.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # The order here is the order `python -m research --help` lists them in.
    _add_train_command(commands)
    _add_gradcheck_command(commands)
    add_verify_layer_command(commands)
    _add_study_command(commands)
    _add_ui_command(commands)
    _add_rerun_command(commands)
    _add_report_command(commands)
    _add_reproduce_command(commands)
    _add_bench_command(commands)
    return parser


def _add_train_command(commands: Commands) -> None:
    """``train``: one network, every training field a flag, logged to MLflow."""
    train = commands.add_parser(
        "train",
        help="train one network (MNIST, or --dataset fashion_mnist) and log it to MLflow",
        description="Train one network on a dataset's train split, report validation metrics per "
        "epoch, and log the run to MLflow.",
    )
    add_preset_flag(
        train, "default", "the values the flags start from: 'origin' is the origin program's"
    )
    titles = ("the network", "the optimizer", "training", "the data")
    for group, title in zip(("model", "optimizer", "training", "data"), titles):
        add_field_flags(train.add_argument_group(title), group, "default")
    train.add_argument(
        "--subset",
        type=int,
        metavar="N",
        help="train on the first N training rows only (quick looks and tests)",
    )
    train.add_argument(
        "--evaluate-test",
        action="store_true",
        help="evaluate the final model once on the test split (never used for choices)",
    )
    train.add_argument(
        "--experiment",
        help="MLflow experiment (default: train, or train_<dataset> for another dataset)",
    )
    add_store_flag(train)
    train.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    add_data_flags(train)


def _add_gradcheck_command(commands: Commands) -> None:
    """``gradcheck``: the model fields as flags, plus the batch and the tolerances."""
    check = commands.add_parser(
        "gradcheck",
        help="compare numpy's handwritten gradients with JAX autodiff, per layer",
        description="Compare the handwritten numpy gradients with JAX autodiff on one batch, "
        "per layer and array; exits 1 if any array is outside tolerance.",
    )
    add_preset_flag(check, "origin", "the network the model flags start from")
    add_field_flags(check.add_argument_group("the network"), "model", "origin")
    check.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    check.add_argument(
        "--batch-size", dest="rows", type=int, default=256, help="rows of the batch (default 256)"
    )
    check.add_argument("--seed", type=int, default=0)
    check.add_argument(
        "--synthetic",
        action="store_true",
        help="use a random batch instead of real MNIST (no data needed)",
    )
    for name in ("rtol", "atol"):
        check.add_argument(
            f"--{name}",
            type=float,
            help="the same for every array, instead of the tolerance table's for the dtype "
            "(research/verify/compare.py)",
        )
    add_data_flags(check)


def _add_study_command(commands: Commands) -> None:
    """``study FILE``: the study file's values, overridden by these flags."""
    study = commands.add_parser(
        "study",
        help="run (or continue) an Optuna study; every trial is an MLflow run",
        description="Run or continue the Optuna study defined in a TOML file (see experiments/). "
        "Command-line values override the file's.",
    )
    study.add_argument("study_file", help="study definition, e.g. experiments/mnist_mlp.toml")
    study.add_argument("--n-trials", type=int, help="trials the study should hold in the end")
    study.add_argument("--timeout", type=float, help="seconds after which no new trial starts")
    study.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    study.add_argument("--epochs", type=int, help="epochs per trial")
    study.add_argument("--subset", type=int, metavar="N", help="train on the first N rows")
    study.add_argument("--study-name", help="Optuna study and MLflow experiment name")
    study.add_argument(
        "--storage",
        help="Optuna storage: a journal file path, or a database URL such as "
        "postgresql://user@host/db (default: mlruns/optuna.journal beside the MLflow store)",
    )
    add_store_flag(study)
    study.add_argument(
        "--no-final",
        action="store_true",
        help="skip retraining the best configuration on train+validation and the test evaluation",
    )
    study.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    add_data_flags(study)


def _add_ui_command(commands: Commands) -> None:
    """``ui``: the MLflow UI's address and store."""
    ui = commands.add_parser(
        "ui",
        help="start the MLflow UI over the tracking store",
        description="Start the MLflow UI over the tracking store (on 127.0.0.1 unless --host "
        "says otherwise) and print, once it answers, a link to each study's and train "
        "experiment's runs, best first, as a table and as charts. MLflow 3 opens in its GenAI "
        'mode: click "Model training" at the top left once per browser (docs/tracking.md). '
        "Ctrl-C stops it.",
    )
    ui.add_argument("--port", type=port, default=5000, help="port to listen on (default 5000)")
    ui.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1; the UI has no authentication)",
    )
    add_store_flag(ui)


def _add_rerun_command(commands: Commands) -> None:
    """``rerun RUN_ID``: a logged run trained again."""
    rerun = commands.add_parser(
        "rerun",
        help="retrain a logged run from its params and seed; check its metrics are reproduced",
    )
    rerun.add_argument("run_id", help="the MLflow run id of a trial or a train run")
    add_store_flag(rerun)
    add_data_flags(rerun)


def _add_report_command(commands: Commands) -> None:
    """``report [STUDY]``: where the report goes and whether it is logged."""
    report = commands.add_parser(
        "report",
        help="figures and a self-contained report of a study (never trains)",
        description="Turn a study in the tracking store into figures, report.md, report.html "
        "and report.json, and log them on the study's parent run (artifacts report/).",
    )
    report.add_argument("study", nargs="?", help="study name (default: the most recent study)")
    add_store_flag(report)
    report.add_argument(
        "--out", type=Path, help="output folder (default: reports/<study> beside the store)"
    )
    report.add_argument(
        "--storage",
        help="Optuna storage for the importances (default: the one the study recorded)",
    )
    report.add_argument(
        "--no-log", action="store_true", help="do not log the report to the parent run"
    )
    add_data_flags(report)


def _add_reproduce_command(commands: Commands) -> None:
    """``reproduce FILE``: its own arguments come from the reproduce module."""
    reproduce = commands.add_parser(
        "reproduce", help="train a published table's rows, side by side"
    )
    add_reproduce_arguments(reproduce)
    add_store_flag(reproduce)
    add_data_flags(reproduce)


def _add_bench_command(commands: Commands) -> None:
    """``bench``: rounds, output and where the table is logged."""
    bench = commands.add_parser(
        "bench",
        help="time the numpy engine against the origin, JAX and PyTorch (interleaved rounds)",
        description="Time every contender on every workload in interleaved rounds, print a "
        "table of medians, spreads, GFLOP/s and ratios, and log it to MLflow.",
    )
    bench.add_argument("--quick", action="store_true", help="short runs (under a minute)")
    bench.add_argument("--rounds", type=int, help="rounds per workload (default 5; 2 with --quick)")
    bench.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    bench.add_argument(
        "--experiment", default="benchmarks", help="MLflow experiment (default: benchmarks)"
    )
    add_store_flag(bench)
    bench.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    add_data_flags(bench)
