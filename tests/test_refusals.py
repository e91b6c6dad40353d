"""Bad input, refused: every command line here is a user mistake, and each must end with exit
code 2, exactly one ``error:`` line on stderr and no traceback, before any work is done.

The harness (:data:`BAD_INPUTS`) runs each command line through ``research.cli.main`` in this
process against real stores: a real MLflow SQLite store holding a real (tiny) training run and
hand-edited copies of it, real study files, a real occupied port. Each case also names a piece of
the message it must give, so a refusal for the wrong reason fails. A case that hangs (a rerun of
``epochs=1e8`` would train for days) fails after :data:`CASE_SECONDS`.

Below the harness: the checks behind some refusals (the memory estimate, the worker bound, the
UI's start, the report's storage and Markdown), each tested on its own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from helpers import copy_run, study_results

from research.cli import main

REPO = Path(__file__).resolve().parents[1]
MNIST_MLP = REPO / "experiments" / "mnist_mlp.toml"
#: Longest any one bad input may take (the slowest load MNIST and open a store first).
CASE_SECONDS = 30
GIB = 2**30


class Hung(BaseException):
    """A case ran past CASE_SECONDS (a BaseException, as KeyboardInterrupt is: code that
    catches Exception, such as a study's trial, does not swallow it)."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_main(argv: list[str], capfd: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``main(argv)`` in this process, as a fresh process would run it (the environment is
    restored afterwards: MLflow sets ``MLFLOW_TRACKING_URI``): (exit code, stdout, stderr). An
    exception that escapes ``main`` is what the user would see as a traceback: it is written to
    stderr as one."""

    def hang(signum: int, frame: Any) -> None:
        raise Hung(f"still running after {CASE_SECONDS} s")

    environment = dict(os.environ)
    previous = signal.signal(signal.SIGALRM, hang)
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS, 1)  # again every second until it stops
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse
        code = exit.code if isinstance(exit.code, int) else 1
    except BaseException:  # what the user would see as a traceback
        code = -1
        print(traceback.format_exc(), file=sys.stderr)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        os.environ.clear()
        os.environ.update(environment)
    out, err = capfd.readouterr()
    return code, out, err


def files_in(folder: Path) -> dict[str, int]:
    """Every file and folder under ``folder``: relative path -> size (-1 for a folder)."""
    return {
        str(path.relative_to(folder)): -1 if path.is_dir() else path.stat().st_size
        for path in folder.rglob("*")
    }


# --- the world the bad inputs are tried in -------------------------------------------------------


@dataclass
class World:
    folder: Path
    uri: str
    runs: dict[str, str]  # edit name -> run id (a copy of a real train run with that edit)
    files: dict[str, Path]  # study file name -> path
    busy_port: int
    closed_port: int

    def fill(self, argv: list[str]) -> list[str]:
        """``argv`` with its ``{placeholders}`` replaced."""
        values = {
            "uri": self.uri,
            "tmp": str(self.folder),
            "busy_port": str(self.busy_port),
            "closed_port": str(self.closed_port),
            "mnist_mlp": str(MNIST_MLP),
        }
        values |= {f"run:{name}": run_id for name, run_id in self.runs.items()}
        values |= {f"file:{name}": str(path) for name, path in self.files.items()}
        filled = []
        for arg in argv:
            for key, value in values.items():
                arg = arg.replace(f"{{{key}}}", value)
            assert "{" not in arg, f"unknown placeholder in {arg}"
            filled.append(arg)
        return filled


#: Edits to the params of a real train run, as a hand-edited store would hold them.
EDITED_RUNS: dict[str, dict[str, str]] = {
    "activation": {"activation": "softplus"},
    "lr_nan": {"learning_rate": "nan"},
    "lr_text": {"learning_rate": "fast"},
    "dtype": {"dtype": "object"},
    "hidden_1e9": {"hidden_size": "1000000000"},
    "hidden_float": {"hidden_size": "1e9"},
    "hidden_bool": {"hidden_size": "True"},
    "rows_negative": {"n_train_rows": "-5"},
    "rows_zero": {"n_train_rows": "0"},
    "rows_text": {"n_train_rows": "many"},
    "rows_too_many": {"n_train_rows": "1000000"},
    "rows_float": {"n_train_rows": "300.5"},
    "epochs_1e8": {"epochs": "100000000"},
    "threads": {"blas_threads": "lots"},
    "threads_zero": {"blas_threads": "0"},
    "batch_over_rows": {"batch_size": "5000"},
    "memory": {"hidden_size": "65536", "n_hidden_layers": "4"},
    "loss_combination": {"loss": "cross_entropy", "output": "sigmoid"},
    "widths_zero": {"hidden_sizes": "[16, 0]"},
    "widths_text": {"hidden_sizes": "wide"},
    "widths_floats": {"hidden_sizes": "[16.0, 16.0]"},
    "widths_conflict": {"hidden_sizes": "[16, 16]"},  # the run logged n_hidden_layers = 1
    "widths_memory": {
        "hidden_sizes": "[65536, 65536, 65536, 65536]",
        "hidden_size": "65536",
        "n_hidden_layers": "4",
    },
}


def _study_file(folder: Path, name: str, change: dict[str, dict[str, Any]]) -> Path:
    """The shipped study file with some tables' keys replaced (``{"study": {"name": "."}}``);
    None removes a key."""
    import tomllib

    data = tomllib.loads(MNIST_MLP.read_text())
    for table, values in change.items():
        target = data
        for part in table.split("."):
            target = target.setdefault(part, {})
        for key, value in values.items():
            if value is None:
                target.pop(key, None)
            else:
                target[key] = value
    path = folder / f"{name}.toml"
    path.write_text(tomli_w.dumps(data))
    return path


STUDY_FILES: dict[str, dict[str, dict[str, Any]]] = {
    "name_dot": {"study": {"name": "."}},
    "name_dotdot": {"study": {"name": ".."}},
    "name_slash": {"study": {"name": "a/b"}},
    "name_hidden": {"study": {"name": ".hidden"}},
    "trials_float": {"study": {"n_trials": 1e20}},
    "trials_huge": {"study": {"n_trials": 10**15}},
    "epochs_huge": {"fixed": {"epochs": 10**12}},
    # 784 x 65536 x 65536 x 10: 4.3e9 parameters, 17 GB each copy in float32
    "memory_fixed": {
        "fixed": {"n_hidden_layers": 2, "hidden_size": 65536},
        "search": {"hidden_size": None},
    },
    # the corners of the search reach 65536 units in 32 layers
    "memory_searched": {
        "search.hidden_size": {"low": 64, "high": 65536},
        "search.n_hidden_layers": {"type": "int", "low": 1, "high": 32},
        "fixed": {"n_hidden_layers": None},
    },
    # per-layer widths: searched beside the shorthand the file fixes, or badly
    "widths_vs_layers": {
        "search": {"hidden_size": None},
        "search.hidden_sizes": {"type": "categorical", "choices": [[64, 64], [128, 32]]},
    },
    "widths_empty_choice": {
        "search": {"hidden_size": None},
        "fixed": {"n_hidden_layers": None},
        "search.hidden_sizes": {"type": "categorical", "choices": [[], [64]]},
    },
    "widths_and_hidden_size": {
        "fixed": {"n_hidden_layers": None},
        "search.hidden_sizes": {"type": "categorical", "choices": [[64, 64], [128, 32]]},
    },
    "widths_string": {"fixed": {"n_hidden_layers": None, "hidden_sizes": "64,64"}},
    "widths_memory": {
        "search": {"hidden_size": None},
        "fixed": {"n_hidden_layers": None},
        "search.hidden_sizes": {"type": "categorical", "choices": [[64], [65536, 65536]]},
    },
}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A real store with a real train run (256 rows, one epoch) and its edited copies, the
    study files, a port something listens on and one nothing does."""
    from mlflow.tracking import MlflowClient

    from research.experiment.tracking.study_runs import StudyTracker

    folder = tmp_path_factory.mktemp("refusals")
    environment = dict(os.environ)  # MLflow sets MLFLOW_TRACKING_URI
    uri = f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}"
    argv = [
        "train", "--subset", "256", "--epochs", "1", "--hidden", "16", "--batch-size", "64",
        "--quiet", "--tracking-uri", uri, "--experiment", "source",
    ]  # fmt: skip
    assert main(argv) == 0
    client = MlflowClient(tracking_uri=uri)
    (source,) = client.search_runs([client.get_experiment_by_name("source").experiment_id])
    experiment_id = client.create_experiment("edited")
    runs = {
        name: copy_run(client, source, experiment_id, change=change)
        for name, change in EDITED_RUNS.items()
    }
    runs["source"] = source.info.run_id
    StudyTracker.open("tiny", uri)  # a study in the store (no trials)
    os.environ.clear()
    os.environ.update(environment)

    files = {name: _study_file(folder, name, change) for name, change in STUDY_FILES.items()}
    files["not_toml"] = folder / "not_toml.toml"
    files["not_toml"].write_text("[study\nname = 1\n")
    files["folder"] = folder / "a_folder.toml"
    files["folder"].mkdir()
    (folder / "a_file").write_text("not a folder\n")

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        yield World(folder, uri, runs, files, busy.getsockname()[1], free_port())


# (id, argv with {placeholders}, a piece of the message)
BAD_INPUTS: list[tuple[str, list[str], str]] = [
    # --- train
    ("train-memory-8x65536", ["train", "--hidden-size", "65536", "--n-hidden-layers", "8",
                              "--no-track"], "of memory"),
    ("train-memory-2x65536", ["train", "--hidden-size", "65536", "--n-hidden-layers", "2",
                              "--subset", "256", "--no-track"], "of memory"),
    ("train-hidden-1e9", ["train", "--hidden-size", "1000000000", "--no-track"], "hidden_size"),
    ("train-epochs-1e12", ["train", "--epochs", "1000000000000", "--no-track"], "epochs"),
    ("train-batch-1e9", ["train", "--batch-size", "1000000000", "--no-track"], "batch"),
    ("train-layers-0", ["train", "--n-hidden-layers", "0", "--no-track"], "n_hidden_layers"),
    ("train-hidden-0", ["train", "--hidden-size", "0", "--no-track"], "hidden_size"),
    ("train-hidden-text", ["train", "--hidden-size", "wide", "--no-track"], "--hidden-size"),
    ("train-widths-0", ["train", "--hidden-sizes", "64", "0", "--no-track"],
     "hidden_sizes = [64, 0]: item 2 (0) is out of range"),
    ("train-widths-float", ["train", "--hidden-sizes", "64,1.5", "--no-track"], "is a float"),
    ("train-widths-text", ["train", "--hidden-sizes", "wide", "--no-track"], "is a string"),
    ("train-widths-none", ["train", "--hidden-sizes", "--no-track"], "--hidden-sizes"),
    ("train-widths-33", ["train", "--hidden-sizes", ",".join(["8"] * 33), "--no-track"],
     "33 items, more than 32"),
    ("train-widths-conflict", ["train", "--hidden-sizes", "64", "64", "--n-hidden-layers", "3",
                               "--no-track"], "n_hidden_layers = 3: conflicts with hidden_sizes"),
    ("train-widths-memory", ["train", "--hidden-sizes", "65536", "65536", "--subset", "256",
                             "--no-track"], "of memory"),
    ("train-lr-inf", ["train", "--lr", "inf", "--no-track"], "learning_rate"),
    ("train-lr-negative", ["train", "--lr", "-1", "--no-track"], "learning_rate"),
    ("train-momentum-1", ["train", "--momentum", "1", "--no-track"], "momentum"),
    ("train-l2-negative", ["train", "--l2", "-0.1", "--no-track"], "l2"),
    ("train-seed-negative", ["train", "--seed", "-1", "--no-track"], "seed"),
    ("train-activation", ["train", "--activation", "softplus", "--no-track"], "--activation"),
    ("train-dtype", ["train", "--dtype", "float16", "--no-track"], "--dtype"),
    ("train-preset", ["train", "--preset", "modern", "--no-track"], "--preset"),
    ("train-combination", ["train", "--output", "sigmoid", "--loss", "cross_entropy",
                           "--no-track"], "softmax"),
    ("train-nesterov-adam", ["train", "--optimizer", "adam", "--nesterov", "--no-track"],
     "--nesterov"),
    ("train-subset-0", ["train", "--subset", "0", "--no-track"], "--subset 0"),
    ("train-subset-negative", ["train", "--subset", "-5", "--no-track"], "--subset -5"),
    ("train-subset-too-many", ["train", "--subset", "70000", "--no-track"], "--subset 70000"),
    ("train-batch-over-subset", ["train", "--subset", "10", "--no-track"], "--batch-size 128"),
    ("train-no-mnist", ["train", "--mnist-dir", "{tmp}/no-mnist", "--data-dir", "{tmp}/no-data",
                        "--no-track"], "no-mnist"),
    ("train-closed-store", ["train", "--subset", "256", "--epochs", "1", "--hidden", "16",
                            "--tracking-uri", "http://127.0.0.1:{closed_port}"], "127.0.0.1"),
    ("train-unknown-scheme", ["train", "--subset", "256", "--epochs", "1", "--hidden", "16",
                              "--tracking-uri", "nosuch://store"], "nosuch://store"),
    # --- gradcheck
    ("gradcheck-rows-0", ["gradcheck", "--synthetic", "--batch-size", "0"], "--batch-size 0"),
    ("gradcheck-memory", ["gradcheck", "--synthetic", "--hidden-size", "65536",
                          "--n-hidden-layers", "8"], "of memory"),
    ("gradcheck-rtol-nan", ["gradcheck", "--synthetic", "--rtol", "nan"], "--rtol"),
    ("gradcheck-widths-0", ["gradcheck", "--synthetic", "--hidden-sizes", "0"], "hidden_sizes"),
    ("gradcheck-atol-negative", ["gradcheck", "--synthetic", "--atol", "-1"], "--atol"),
    # --- study
    ("study-missing-file", ["study", "{tmp}/nothing.toml"], "nothing.toml"),
    ("study-folder", ["study", "{file:folder}"], "a_folder.toml"),
    ("study-not-toml", ["study", "{file:not_toml}"], "invalid TOML"),
    # With an unreachable store, the code before these checks fails safely (not 1000 workers).
    ("study-workers-1000", ["study", "{mnist_mlp}", "--workers", "1000", "--subset", "256",
                            "--tracking-uri", "http://127.0.0.1:{closed_port}"],
     "--workers 1000"),
    ("study-workers-0", ["study", "{mnist_mlp}", "--workers", "0"], "--workers 0"),
    ("study-workers-negative", ["study", "{mnist_mlp}", "--workers", "-3"], "--workers -3"),
    ("study-name-dot", ["study", "{file:name_dot}"], "study.name"),
    ("study-name-dotdot", ["study", "{file:name_dotdot}"], "study.name"),
    ("study-name-slash", ["study", "{file:name_slash}"], "study.name"),
    ("study-name-hidden", ["study", "{file:name_hidden}"], "study.name"),
    ("study-flag-name-dot", ["study", "{mnist_mlp}", "--study-name", "."], "study.name"),
    ("study-flag-name-dotdot", ["study", "{mnist_mlp}", "--study-name", ".."], "study.name"),
    ("study-flag-name-up", ["study", "{mnist_mlp}", "--study-name", "../up"], "study.name"),
    ("study-flag-name-empty", ["study", "{mnist_mlp}", "--study-name", ""], "study.name"),
    ("study-trials-float", ["study", "{file:trials_float}"], "study.n_trials"),
    ("study-trials-huge", ["study", "{file:trials_huge}"], "study.n_trials"),
    ("study-flag-trials-huge", ["study", "{mnist_mlp}", "--n-trials", "1000000000000"],
     "study.n_trials"),
    ("study-flag-trials-float", ["study", "{mnist_mlp}", "--n-trials", "1e20"], "--n-trials"),
    ("study-epochs-huge", ["study", "{file:epochs_huge}"], "fixed.epochs"),
    ("study-flag-epochs-0", ["study", "{mnist_mlp}", "--epochs", "0"], "fixed.epochs"),
    ("study-flag-epochs-huge", ["study", "{mnist_mlp}", "--epochs", "1000000000000"],
     "fixed.epochs"),
    ("study-flag-timeout", ["study", "{mnist_mlp}", "--timeout", "-1"], "study.timeout"),
    ("study-flag-timeout-nan", ["study", "{mnist_mlp}", "--timeout", "nan"], "study.timeout"),
    ("study-subset-0", ["study", "{mnist_mlp}", "--subset", "0", "--tracking-uri", "{uri}"],
     "--subset 0"),
    ("study-memory-fixed", ["study", "{file:memory_fixed}", "--n-trials", "1", "--epochs", "1",
                            "--subset", "256", "--no-final", "--tracking-uri", "{uri}"],
     "of memory"),
    ("study-memory-searched", ["study", "{file:memory_searched}", "--n-trials", "1", "--epochs",
                               "1", "--subset", "256", "--no-final", "--tracking-uri",
                               "http://127.0.0.1:{closed_port}"], "of memory"),
    ("study-widths-vs-layers", ["study", "{file:widths_vs_layers}"],
     "fixed.n_hidden_layers = 1: conflicts with search.hidden_sizes.choices[0]"),
    ("study-widths-empty-choice", ["study", "{file:widths_empty_choice}"],
     "search.hidden_sizes.choices[0] = []: an empty list"),
    ("study-widths-and-hidden-size", ["study", "{file:widths_and_hidden_size}"],
     "search.hidden_size: cannot be searched with search.hidden_sizes"),
    ("study-widths-string", ["study", "{file:widths_string}"], "fixed.hidden_sizes"),
    ("study-widths-memory", ["study", "{file:widths_memory}", "--n-trials", "1", "--epochs",
                             "1", "--subset", "256", "--no-final", "--tracking-uri",
                             "http://127.0.0.1:{closed_port}"], "of memory"),
    # --- ui
    ("ui-port-busy", ["ui", "--port", "{busy_port}", "--tracking-uri", "{uri}"],
     "already in use"),
    ("ui-server-fails", ["ui", "--port", "{closed_port}", "--tracking-uri", "nosuch://store"],
     "stopped (exit code"),
    ("ui-port-0", ["ui", "--port", "0"], "--port"),
    ("ui-port-high", ["ui", "--port", "70000"], "--port"),
    ("ui-host-bad", ["ui", "--host", "256.1.1.1", "--port", "{closed_port}", "--tracking-uri",
                     "{uri}"], "256.1.1.1"),
    # --- rerun
    ("rerun-unknown", ["rerun", "00000000000000000000000000000000", "--tracking-uri", "{uri}"],
     "no MLflow run"),
    ("rerun-malformed", ["rerun", "not-a-run-id", "--tracking-uri", "{uri}"], "no MLflow run"),
    ("rerun-empty", ["rerun", "", "--tracking-uri", "{uri}"], "no MLflow run"),
    ("rerun-missing-store", ["rerun", "{run:source}", "--tracking-uri",
                             "sqlite:///{tmp}/no-store/mlflow.db"], "no-store"),
    *[
        (f"rerun-{name.replace('_', '-')}", ["rerun", f"{{run:{name}}}", "--tracking-uri", "{uri}"],
         key)
        for name, key in (
            ("activation", "activation"),
            ("lr_nan", "learning_rate"),
            ("lr_text", "learning_rate"),
            ("dtype", "dtype"),
            ("hidden_1e9", "hidden_size"),
            ("hidden_float", "hidden_size"),
            ("hidden_bool", "hidden_size"),
            ("rows_negative", "n_train_rows"),
            ("rows_zero", "n_train_rows"),
            ("rows_text", "n_train_rows"),
            ("rows_too_many", "n_train_rows"),
            ("rows_float", "n_train_rows"),
            ("epochs_1e8", "epochs"),
            ("threads", "blas_threads"),
            ("threads_zero", "blas_threads"),
            ("batch_over_rows", "batch_size"),
            ("memory", "of memory"),
            ("loss_combination", "softmax"),
            ("widths_zero", "hidden_sizes = [16, 0]"),
            ("widths_text", 'hidden_sizes = "wide"'),
            ("widths_floats", "hidden_sizes = [16.0, 16.0]"),
            ("widths_conflict", "n_hidden_layers = 1: conflicts with hidden_sizes = [16, 16]"),
            ("widths_memory", "of memory"),
        )
    ],
    # --- report
    ("report-unknown", ["report", "nosuch", "--tracking-uri", "{uri}"], "nosuch"),
    ("report-dot", ["report", ".", "--tracking-uri", "{uri}"], '"."'),
    ("report-dotdot", ["report", "..", "--tracking-uri", "{uri}"], '".."'),
    ("report-up", ["report", "../tiny", "--tracking-uri", "{uri}"], "../tiny"),
    ("report-missing-store", ["report", "--tracking-uri", "sqlite:///{tmp}/no-store/mlflow.db"],
     "no-store"),
    ("report-out-file", ["report", "tiny", "--tracking-uri", "{uri}", "--out", "{tmp}/a_file"],
     "a_file"),
    # --- bench
    ("bench-rounds-0", ["bench", "--rounds", "0", "--no-track"], "--rounds 0"),
    ("bench-json-folder", ["bench", "--json", "{tmp}/no-folder/bench.json", "--no-track"],
     "no-folder"),
    # --- the command itself
    ("no-command", [], "COMMAND"),
    ("unknown-command", ["fly"], "fly"),
    ("unknown-flag", ["train", "--hiden", "32"], "--hiden"),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(("argv", "fragment"), [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])  # fmt: skip
def test_bad_input_is_refused_with_one_line(world, capfd, monkeypatch, argv, fragment):
    monkeypatch.chdir(world.folder)  # the default store, if a case got that far, lands there
    before = files_in(world.folder)
    code, out, err = run_main(world.fill(argv), capfd)
    assert "Traceback" not in err, err
    assert code == 2, out + err
    errors = [line for line in err.splitlines() if line.startswith("error:") or ": error:" in line]
    assert len(errors) == 1, err
    assert fragment in errors[0], errors[0]
    if not err.startswith("usage:"):  # argparse shows its usage line first; we never do
        assert err.splitlines() == errors, err
    assert files_in(world.folder) == before  # nothing written, nothing created


def test_the_harness_tries_many_distinct_bad_inputs():
    ids = [case[0] for case in BAD_INPUTS]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 80


# --- the checks behind the refusals ---------------------------------------------------------------


def test_memory_is_estimated_per_part_and_compared_with_what_is_available():
    from research.experiment.config.fields import ConfigError, TrainConfig
    from research.experiment.config.resources import (
        DATA_BYTES,
        PROCESS_BYTES,
        available_memory,
        check_memory,
        estimate_memory,
    )

    small = estimate_memory((784, 256, 10), 128, "float32", "momentum", 50_000)
    n_params = 784 * 256 + 256 + 256 * 10 + 10
    assert small.model == n_params * 5 * 4  # params x3, gradients, momentum
    assert small.process == PROCESS_BYTES + DATA_BYTES
    assert small.total < 1e9
    adam = estimate_memory((784, 256, 10), 128, "float32", "adam", 50_000)
    assert adam.model == n_params * 6 * 4
    double = estimate_memory((784, 256, 10), 128, "float64", "momentum", 50_000)
    assert double.model == 2 * small.model and double.data > small.data  # the rows, converted

    # the real machine: the default network fits, 4.3e9 parameters (17 GB a copy) do not
    assert available_memory() is not None
    check_memory(TrainConfig(), 50_000)
    with pytest.raises(ConfigError) as caught:
        check_memory(TrainConfig(hidden_size=65536, n_hidden_layers=2), 50_000)
    (line,) = str(caught.value).splitlines()
    assert line.startswith("the network 784x65536x65536x10 (float32, momentum, batch_size 128) ")
    assert "of memory (model " in line and "is available (" in line
    assert line.endswith("allowed: at most " + line.split("allowed: at most ")[1])

    # against a given amount: the estimate, what is available, how many workers would fit
    config = TrainConfig(hidden_size=4096, n_hidden_layers=2)
    one = estimate_memory(config.spec().sizes, 128, "float32", "momentum", 50_000).total
    check_memory(config, 50_000, workers=1, available=(one, "a test"))
    with pytest.raises(ConfigError, match=r"but 1\.\d+ GB is available \(a test\)"):
        check_memory(config, 50_000, workers=1, available=(one - 1, "a test"))
    with pytest.raises(ConfigError, match=r"x 8 workers\), .*allowed: at most .*--workers \d"):
        check_memory(config, 50_000, workers=8, available=(3 * one, "a test"))


def test_workers_are_bounded_by_the_cores():
    from research.experiment.config.fields import ConfigError
    from research.experiment.config.resources import WORKERS_PER_CORE, check_workers, usable_cores

    for workers in (1, usable_cores(), WORKERS_PER_CORE * usable_cores()):
        check_workers(workers)
    check_workers(8, cores=2)
    with pytest.raises(ConfigError, match=r"^--workers 9 is too many: .* 2 CPU core\(s\)"):
        check_workers(9, cores=2)
    for bad in (0, -3, True):
        with pytest.raises(ConfigError, match=r"is not allowed; allowed: an integer from 1 to"):
            check_workers(bad)


def test_a_study_is_checked_at_its_largest_trial(tmp_path):
    from research.experiment.config.fields import ConfigError
    from research.experiment.config.resources import check_study_memory, worst_case
    from research.experiment.config.study_config import load_study_config

    config = load_study_config(MNIST_MLP)
    worst = worst_case(config)
    assert (worst.hidden_size, worst.batch_size) == (1024, 256)  # the ends of the search
    check_study_memory(config, 50_000, workers=2)  # on the real machine

    path = _study_file(tmp_path, "wide", {
        "search.hidden_size": {"high": 65536},
        "search.n_hidden_layers": {"type": "int", "low": 1, "high": 32},
        "search.optimizer": {"type": "categorical", "choices": ["sgd", "adam"]},
        "fixed": {"n_hidden_layers": None, "optimizer": None, "momentum": None,
                  "nesterov": None},
    })  # fmt: skip
    wide = load_study_config(path)
    worst = worst_case(wide)
    assert (worst.hidden_size, worst.n_hidden_layers, worst.optimizer) == (65536, 32, "adam")
    with pytest.raises(ConfigError) as caught:
        check_study_memory(wide, 50_000, workers=1)
    (line,) = str(caught.value).splitlines()
    assert line.startswith(
        f"{path}: the study's largest trial (hidden_size = 65536, n_hidden_layers = 32, "
        "batch_size = 256, optimizer = adam, a 784x[32 layers of 65536]x10 network, float32) "
    ), line
    assert "[search] table" in line

    # a study that fits one worker but not eight: the message says how many would
    with pytest.raises(ConfigError, match=r"--workers [1-7] or fewer"):
        check_study_memory(config, 50_000, workers=8, available=(2 * 2**30, "a test"))


@pytest.mark.slow
def test_the_ui_says_its_url_only_once_it_answers(tmp_path):
    """A real `ui`: the moment its URL is printed, an HTTP GET of it answers; SIGTERM stops it
    (exit 0)."""
    from research.experiment.tracking.study_runs import StudyTracker

    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    StudyTracker.open("tiny", uri)
    port = free_port()
    command = [sys.executable, "-m", "research", "ui", "--port", str(port), "--tracking-uri", uri]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with (
        (tmp_path / "ui.err").open("w") as stderr,
        subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True
        ) as ui,
    ):
        try:
            # blocks until the URL is printed (how long: scripts/measure_stop_and_start_times.py)
            banner = ui.stdout.readline()
            assert banner == (
                f"MLflow UI on http://127.0.0.1:{port} over {uri} (Ctrl-C stops it)\n"
            ), (tmp_path / "ui.err").read_text()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
                assert response.status == 200  # at once: no retry
            ui.send_signal(signal.SIGTERM)
            assert ui.wait(timeout=60) == 0
        finally:
            if ui.poll() is None:  # a failed assertion: SIGTERM stops `ui` and its server
                ui.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    ui.wait(timeout=60)
                ui.kill()
    with socket.socket() as probe:  # the server is gone with it: the port is free again
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))


def test_a_busy_port_is_refused_before_anything_starts(capfd):
    from research.experiment.tracking.ui import UIError, check_port

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UIError, match=f"^port {port} on 127.0.0.1 is already in use"):
            check_port("127.0.0.1", port)
        started = time.monotonic()
        code, out, err = run_main(["ui", "--port", str(port)], capfd)
        assert time.monotonic() - started < 5  # no MLflow started
    assert (code, out) == (2, "")
    assert err == (
        f"error: port {port} on 127.0.0.1 is already in use (another MLflow UI or another "
        f"server); pass --port with a free port, e.g. --port {port + 1}\n"
    )
    check_port("127.0.0.1", port)  # closed: free again


def test_report_markdown_shows_tags_as_text(tmp_path):
    """Text from the store (here a failed trial's error tag) is escaped in report.md as it is
    in report.html: no raw HTML, no links, no broken table rows."""
    import pandas as pd

    from analysis.render import Report, write_html, write_markdown

    evil = "<script>alert(1)</script> [click](javascript:alert(2)) a|b\n# heading & more"
    trials = pd.DataFrame(
        {"run_id": ["r0"], "trial": [0], "state": ["FAIL"], "error": [evil],
         "val/accuracy": [float("nan")], "epochs_run": [1], "wall_seconds": [1.0]}
    )  # fmt: skip
    results = study_results(trials)
    report = Report(results, "sqlite:///x.db", "now", notes=["a note with <img src=x>"])
    write_markdown(report, tmp_path / "report.md")
    write_html(report, tmp_path / "report.html", tmp_path)
    for name in ("report.md", "report.html"):
        text = (tmp_path / name).read_text()
        assert "<script>" not in text and "<img" not in text, name
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text, name
    markdown = (tmp_path / "report.md").read_text()
    row = next(line for line in markdown.splitlines() if line.startswith("| 0 |"))
    assert row == (
        "| 0 | &lt;script&gt;alert(1)&lt;/script&gt; [click\\](javascript:alert(2)) a\\|b "
        "# heading &amp; more |"
    )
    assert "\n# heading" not in markdown


@pytest.mark.slow
def test_report_opens_only_the_storage_it_is_given(tmp_path, capfd):
    """A parent run's optuna.storage tag names another database: the report never opens it
    (it would create Optuna's tables in it), and takes the importances from the journal beside
    the store. A study whose name cannot be a folder (stores written before names were
    checked) needs --out."""
    from mlflow.tracking import MlflowClient

    from research.experiment.tracking.study_runs import StudyTracker

    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    argv = ["study", str(MNIST_MLP), "--n-trials", "3", "--epochs", "1", "--subset", "300",
            "--no-final", "--quiet", "--tracking-uri", uri]  # fmt: skip
    code, out, err = run_main(argv, capfd)
    assert code == 0, out + err
    client = MlflowClient(tracking_uri=uri)
    parent = StudyTracker.open("mnist_mlp", uri).parent_run_id
    planted = tmp_path / "elsewhere.db"
    planted.write_bytes(b"")
    client.set_tag(parent, "optuna.storage", f"sqlite:///{planted}")

    out_dir = tmp_path / "report"
    code, out, err = run_main(
        ["report", "mnist_mlp", "--tracking-uri", uri, "--no-log", "--out", str(out_dir)], capfd
    )
    assert code == 0, out + err
    assert planted.read_bytes() == b""  # never opened
    summary = (out_dir / "report.json").read_text()
    assert '"importances": {' in summary, summary  # from mlruns/optuna.journal

    # --storage is what is opened: here a journal that does not exist (nothing is created)
    missing = tmp_path / "missing.journal"
    code, out, err = run_main(
        ["report", "mnist_mlp", "--tracking-uri", uri, "--no-log", "--out", str(out_dir),
         "--storage", str(missing)], capfd,
    )  # fmt: skip
    assert code == 0, out + err
    assert (
        f"the Optuna storage {missing} does not exist; pass --storage (the study recorded "
        f"sqlite:///{planted}: pass it as --storage if that is where it lives)" in out
    )
    assert not missing.exists() and planted.read_bytes() == b""

    StudyTracker.open(".", uri)  # the most recent study now, named as no study file may be
    code, out, err = run_main(["report", "--tracking-uri", uri, "--no-log"], capfd)
    assert code == 2
    assert err == (
        'error: study name "." is not a plain folder name (not empty, "." or "..", no "/"); '
        "pass --out to write its report elsewhere\n"
    )
    assert not (tmp_path / "mlruns" / "reports").exists()
