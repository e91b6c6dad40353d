"""One run lifecycle: every caller that opens an MLflow run (``train``, a study's trial, a
study's final fit, a ``reproduce`` row) is crashed mid-run, by an exception, a tracking-store
error and a real SIGTERM, and no run is left RUNNING; each run says how it ended."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
from test_reproduce import TINY as PAPER  # two rows: the first one crashes

from research.cli import main
from research.experiment.tracking.runs import RunEnd, TrackedRun, run_lifecycle, start_run
from research.experiment.tracking.stores import TrackingError
from research.experiment.training import train as training
from research.experiment.training.train import DivergenceError, Terminated

REPO = Path(__file__).resolve().parents[1]

STUDY = """
[study]
name = "crash_study"
objective = "val/accuracy"
n_trials = 1
pruner = "none"

[fixed]
epochs = 2
batch_size = 50

[search.hidden_size]
type = "int"
low = 8
high = 16
"""


class Crash(Exception):
    """The unexpected exception a caller meets mid-run."""


def crash(fault: str) -> None:
    """Meets ``fault`` here, as a run would after its first epoch."""
    if fault == "exception":
        raise Crash("an unexpected crash")
    if fault == "tracking":
        raise TrackingError("the tracking store went away")
    # A real SIGTERM to this process: the handler the command installed raises Terminated.
    os.kill(os.getpid(), signal.SIGTERM)  # (its handler runs before the next line)
    raise AssertionError("SIGTERM did not stop the run")


def crashing_train(fault: str):
    """``train``, meeting ``fault`` once its first epoch has been reported."""
    real = training.train

    def train(config, x_train, labels_train, x_val, labels_val, on_epoch=None, **kwargs):
        def epoch_then_crash(metrics, params):
            if on_epoch is not None:
                on_epoch(metrics, params)
            crash(fault)

        return real(config, x_train, labels_train, x_val, labels_val, epoch_then_crash, **kwargs)

    return train


@pytest.fixture
def sigterm_restored():
    """The commands install a SIGTERM handler (and an unraisable hook) in this process."""
    handler, hook = signal.getsignal(signal.SIGTERM), sys.unraisablehook
    yield
    signal.signal(signal.SIGTERM, handler)
    sys.unraisablehook = hook


def all_runs(uri: str) -> list:
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiments = client.search_experiments(view_type=ViewType.ALL)
    ids = [experiment.experiment_id for experiment in experiments]
    return client.search_runs(ids, run_view_type=ViewType.ALL)


EXPECTED = {  # fault -> (exit code or the exception raised, MLflow status of the crashed run)
    "exception": (Crash, "FAILED"),
    "tracking": (2, "FAILED"),
    "sigterm": (143, "KILLED"),
}

CRASHED_ROLES = {  # caller -> the roles (research.role) of the runs a crash in it ends
    "train": {"train"},
    "trial": {"trial", "study"},
    "final fit": {"study"},
    "reproduce row": {"row", "reproduce"},
}

CALLERS = {  # caller -> (the module whose `train` it calls, its command line)
    "train": (
        "research.experiment.training.train",
        lambda folder, uri: ["train", "--subset", "500", "--epochs", "2", "--hidden", "16",
                             "--quiet", "--tracking-uri", uri],
    ),
    "trial": (
        "research.experiment.studies.trials",
        lambda folder, uri: ["study", str(write(folder, "study.toml", STUDY)), "--subset", "500",
                             "--quiet", "--tracking-uri", uri],
    ),
    "final fit": (
        "research.experiment.studies.study",
        lambda folder, uri: ["study", str(write(folder, "study.toml", STUDY)), "--subset", "500",
                             "--quiet", "--tracking-uri", uri],
    ),
    "reproduce row": (
        "research.experiment.reproduction.reproduce",
        lambda folder, uri: ["reproduce", str(write(folder, "paper.toml", PAPER)), "--quick",
                             "--quiet", "--tracking-uri", uri],
    ),
}  # fmt: skip


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("fault", list(EXPECTED))
@pytest.mark.parametrize("caller", list(CALLERS))
def test_a_run_crashed_mid_way_is_never_left_running(
    tmp_path, monkeypatch, capsys, sigterm_restored, caller, fault
):
    module, argv = CALLERS[caller]
    monkeypatch.setattr(f"{module}.train", crashing_train(fault))
    monkeypatch.chdir(tmp_path)  # (the study's journal sits beside the store)
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    expected, status = EXPECTED[fault]
    if isinstance(expected, int):
        assert main(argv(tmp_path, uri)) == expected, capsys.readouterr()
    else:
        with pytest.raises(expected):
            main(argv(tmp_path, uri))
    runs = all_runs(uri)
    assert runs, "the command opened no run"
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    # the run that crashed says how, and so do those around it (a study's or a paper's parent)
    crashed = [r for r in runs if r.info.status == status]
    roles = {r.data.tags.get("research.role", "train") for r in crashed}
    assert roles == CRASHED_ROLES[caller], [(r.info.run_name, r.info.status) for r in runs]
    for run in crashed:
        assert run.data.tags["research.state"] == "FAIL"
        reason = run.data.tags.get("research.error", "")
        if fault == "exception" and run.data.tags.get("research.role") != "study":
            assert "an unexpected crash" in reason
        if fault == "sigterm":
            assert reason == "terminated (SIGTERM)"


# --- the lifecycle itself, on one run ------------------------------------------------------------


def lifecycle_run(tmp_path: Path) -> TrackedRun:
    return start_run("lifecycle", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


def ended(run: TrackedRun) -> tuple[str, str, str | None]:
    found = run.client.get_run(run.run_id)
    tags = found.data.tags
    return found.info.status, tags.get("research.state"), tags.get("research.error")


def test_a_block_that_returns_ends_its_run_complete(tmp_path):
    with run_lifecycle(lifecycle_run(tmp_path)) as run:
        pass
    assert run.ended is RunEnd.COMPLETE
    assert ended(run) == ("FINISHED", "COMPLETE", None)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (DivergenceError(0, 3, "the loss is nan"), ("FAILED", "FAIL", "training diverged at")),
        (Terminated("terminated (SIGTERM)"), ("KILLED", "FAIL", "terminated (SIGTERM)")),
        (KeyboardInterrupt(), ("KILLED", "FAIL", "interrupted (Ctrl-C)")),
        (TrackingError("the store is full"), ("FAILED", "FAIL", "the store is full")),
        (Crash("boom"), ("FAILED", "FAIL", "Crash('boom')")),
    ],
)
def test_an_exception_ends_the_run_by_its_kind_and_goes_on(tmp_path, error, expected):
    with pytest.raises(type(error)), run_lifecycle(lifecycle_run(tmp_path)) as run:
        raise error
    status, state, reason = ended(run)
    assert (status, state) == expected[:2]
    assert reason is not None and reason.startswith(expected[2])
    if isinstance(error, DivergenceError):
        tags = run.client.get_run(run.run_id).data.tags
        assert (tags["research.diverged_epoch"], tags["research.diverged_step"]) == ("0", "3")


def test_a_run_the_block_ended_is_left_as_it_is(tmp_path):
    with run_lifecycle(lifecycle_run(tmp_path)) as run:
        run.end(RunEnd.PRUNED)
    assert ended(run) == ("FINISHED", "PRUNED", None)
    with pytest.raises(Crash), run_lifecycle(lifecycle_run(tmp_path)) as run:
        run.end(RunEnd.COMPLETE)
        raise Crash("after the end")
    assert ended(run) == ("FINISHED", "COMPLETE", None)


def test_outputs_that_cannot_be_saved_fail_the_run(tmp_path, monkeypatch):
    from research.experiment.tracking.runs import Outputs

    def full_disk(*args, **kwargs):
        raise TrackingError("cannot save the artifact: no space left on device")

    with pytest.raises(TrackingError), run_lifecycle(lifecycle_run(tmp_path)) as run:
        monkeypatch.setattr(run, "save_outputs", full_disk)
        run.save_on_success(Outputs([], "nothing"))
    assert ended(run) == ("FAILED", "FAIL", "cannot save the artifact: no space left on device")


def test_no_tracking_passes_through():
    with run_lifecycle(None) as run:
        assert run is None
