"""Queued trials against today's search space: a trial given back by SIGTERM (queued again with
its parameters) or queued by hand, then a study resumed with a narrower study file. A queued
value the search space no longer holds is dropped with one line, before any parameter is drawn
or any MLflow run opened, and does not count toward ``n_trials``; Optuna's own warning ("Fixed
parameter ... is out of range") never comes. Real journal and MLflow stores in tmp folders, a
real SIGTERM, the real command.
"""

from __future__ import annotations

import re
import signal
import subprocess
import warnings
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from test_reliability import python_m_research, read_until
from test_study import by_trial_number, journal_storage, load_optuna_study, run_cli, study_runs

from research.experiment.config.search_space import SearchParam
from research.experiment.studies.liveness import ATTR_INTERRUPTED, ATTR_RETRY_OF
from research.experiment.studies.optuna_compat import queued_params
from research.experiment.studies.optuna_study import queued_misfit
from research.experiment.studies.trials import ATTR_DROPPED, counted_trials

NAME = "narrowed"
FIXED = {
    "n_hidden_layers": 1,
    "activation": "relu",
    "optimizer": "momentum",
    "batch_size": 128,
    "epochs": 3,
    "seed": 0,
    "dtype": "float32",
}
WIDE = {
    "hidden_size": {"type": "int", "low": 16, "high": 48},
    "learning_rate": {"type": "float", "low": 0.05, "high": 0.5, "log": True},
}
NARROW = {
    "hidden_size": {"type": "int", "low": 64, "high": 96},
    "learning_rate": {"type": "float", "low": 0.001, "high": 0.01, "log": True},
}


def study_file(folder: Path, stem: str, search: dict, fixed: dict | None = None) -> Path:
    path = folder / f"{stem}.toml"
    study = {"name": NAME, "objective": "val/accuracy", "n_trials": 2, "sampler": "random"}
    doc = {"study": study | {"pruner": "none", "seed": 0}, "fixed": fixed or FIXED}
    path.write_text(tomli_w.dumps(doc | {"search": search}))
    return path


def study_argv(path: Path, uri: str, *more: str) -> list[str]:
    return ["study", str(path), "--subset", "1000", "--tracking-uri", uri, "--no-final", *more]


def sqlite_uri(folder: Path) -> str:
    (folder / "mlruns").mkdir(exist_ok=True)
    return f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}"


def run_recording_optuna_warnings(argv: list[str]) -> tuple[int, str, str, list[str]]:
    """The command in this process, with Optuna's fixed-parameter warning recorded (pytest
    would raise it as an error): (exit code, stdout, stderr, the warnings' texts)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.filterwarnings("always", message="Fixed parameter")
        code, out, err = run_cli(argv)
    return code, out, err, [str(w.message) for w in caught]


def table_rows(out: str) -> list[list[str]]:
    """The best-trials table's rows, split into columns (trial, objective, seconds, params)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if re.fullmatch(r"-+", line)) + 1
    end = next(i for i, line in enumerate(lines) if line.startswith("best: trial"))
    return [line.split() for line in lines[start:end]]


def assert_in_narrow_space(params: dict[str, Any]) -> None:
    assert 64 <= params["hidden_size"] <= 96, params
    assert 0.001 <= params["learning_rate"] <= 0.01, params


# --- what does not fit -------------------------------------------------------------------------


def test_queued_misfit_names_the_parameter_the_value_and_todays_space():
    search = (
        SearchParam("hidden_size", "int", low=64, high=1024, step=32),
        SearchParam("learning_rate", "float", low=0.001, high=0.1, log=True),
        SearchParam("activation", "categorical", choices=["relu", "tanh"]),
    )
    fits = {"hidden_size": 96, "learning_rate": 0.1, "activation": "tanh"}
    assert queued_misfit(fits, search) is None
    assert queued_misfit({"learning_rate": 0.01}, search) is None  # the rest is drawn
    assert queued_misfit(fits | {"hidden_size": 42}, search) == (
        "hidden_size 42 is outside today's [search] range 64..1024"
    )
    assert queued_misfit(fits | {"learning_rate": 0.11}, search) == (
        "learning_rate 0.11 is outside today's [search] range 0.001..0.1"
    )
    assert queued_misfit(fits | {"hidden_size": 100}, search) == (
        "hidden_size 100 is off today's [search] grid 64..1024 step 32"
    )
    assert queued_misfit(fits | {"activation": "sigmoid"}, search) == (
        'activation "sigmoid" is not among today\'s [search] choices "relu", "tanh"'
    )
    assert queued_misfit(fits | {"batch_size": 64}, search) == (
        "batch_size 64 is no longer in today's [search]"
    )
    widths = (SearchParam("hidden_sizes", "categorical", choices=[[64, 64], [128]]),)
    assert queued_misfit({"hidden_sizes": "[128]"}, widths) is None  # Optuna's text of a list
    assert queued_misfit({"hidden_sizes": "[48, 48]"}, widths) == (
        "hidden_sizes [48, 48] is not among today's [search] choices [64, 64], [128]"
    )


@pytest.mark.parametrize("kind", ["memory", "database", "journal"])
def test_queued_params_are_what_enqueue_trial_queued_and_none_for_a_drawn_trial(tmp_path, kind):
    """The contract :func:`queued_params` relies on in the installed Optuna, in each storage."""
    import optuna

    storage = {
        "memory": None,
        "database": f"sqlite:///{tmp_path / 'optuna.db'}",
        "journal": journal_storage(tmp_path / "optuna.journal"),
    }[kind]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage)
    study.enqueue_trial({"x": 3}, user_attrs={ATTR_RETRY_OF: 0})
    queued = study.ask()
    assert queued_params(queued) == {"x": 3}
    drawn = study.ask()
    assert queued_params(drawn) is None


# --- the study command ---------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_then_a_narrower_search_drops_the_queued_trial_uncounted(tmp_path):
    uri = sqlite_uri(tmp_path)
    wide = study_file(tmp_path, "wide", WIDE)
    first = python_m_research(study_argv(wide, uri), tmp_path)
    with first:
        read_until(first, r"^trial 0 epoch 1/3")
        first.send_signal(signal.SIGTERM)
        try:
            first.wait(timeout=60)
        except subprocess.TimeoutExpired:
            first.kill()
            pytest.fail("the study did not stop within 60 s of SIGTERM")
    assert first.returncode == 143
    interrupted, waiting = load_optuna_study(tmp_path, NAME).get_trials()
    assert (interrupted.state.name, waiting.state.name) == ("FAIL", "WAITING")
    old = interrupted.params
    assert 16 <= old["hidden_size"] <= 48  # outside the narrow 64..96 whatever was drawn

    narrow = study_file(tmp_path, "narrow", NARROW)
    code, out, err, caught = run_recording_optuna_warnings(study_argv(narrow, uri, "--epochs", "1"))
    assert code == 0, out + err
    assert caught == [] and "Fixed parameter" not in out + err
    line = (
        f"trial 1 (queued again from trial 0) is dropped: hidden_size {old['hidden_size']} "
        "is outside today's [search] range 64..96"
    )
    assert [text for text in out.splitlines() if "dropped" in text] == [line], out
    assert "2/2 trials counted (2 COMPLETE, 2 FAIL)" in out, out

    study = load_optuna_study(tmp_path, NAME)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "FAIL", "COMPLETE", "COMPLETE"]
    dropped = trials[1]
    assert dropped.system_attrs[ATTR_DROPPED] == line.split("is dropped: ")[1]
    assert ATTR_INTERRUPTED not in dropped.system_attrs
    assert dropped.params == {} and dropped.user_attrs[ATTR_RETRY_OF] == 0
    assert counted_trials(study) == 2
    for trial in trials[2:]:  # the budget, met by trials of today's space
        assert_in_narrow_space(trial.params)
    rows = table_rows(out)
    assert sorted(int(row[0]) for row in rows) == [2, 3]
    for row in rows:
        assert_in_narrow_space({"hidden_size": int(row[3]), "learning_rate": float(row[4])})
    runs = by_trial_number(study_runs(uri, NAME)[1])
    assert sorted(runs) == [0, 2, 3]  # none was opened for the dropped trial


@pytest.mark.slow
def test_hand_queued_trials_that_fit_run_as_queued_and_the_others_are_dropped(tmp_path):
    import optuna

    uri = sqlite_uri(tmp_path)
    search = NARROW | {"activation": {"type": "categorical", "choices": ["relu", "tanh"]}}
    fixed = {k: v for k, v in FIXED.items() if k != "activation"} | {"epochs": 1}
    path = study_file(tmp_path, "narrow", search, fixed)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=NAME,
        storage=journal_storage(tmp_path / "mlruns" / "optuna.journal"),
        direction="maximize",
    )
    fits = {"hidden_size": 72, "learning_rate": 0.005, "activation": "tanh"}
    study.enqueue_trial(fits | {"activation": "sigmoid"})
    study.enqueue_trial(fits | {"batch_size": 64})
    study.enqueue_trial(fits)

    code, out, err, caught = run_recording_optuna_warnings(study_argv(path, uri))
    assert code == 0, out + err
    assert caught == [], caught
    assert [text for text in out.splitlines() if "dropped" in text] == [
        'trial 0 (queued) is dropped: activation "sigmoid" is not among today\'s [search] '
        'choices "relu", "tanh"',
        "trial 1 (queued) is dropped: batch_size 64 is no longer in today's [search]",
    ], out
    study = load_optuna_study(tmp_path, NAME)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "FAIL", "COMPLETE", "COMPLETE"]
    assert [t.params for t in trials[:3]] == [{}, {}, fits]
    assert counted_trials(study) == 2
    assert sorted(by_trial_number(study_runs(uri, NAME)[1])) == [2, 3]
