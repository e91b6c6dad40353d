"""Trust boundaries (issue 22): what the project reads back from a store it does not control, and
what it writes into one. Real MLflow stores in temporary folders, a real ``mlflow models serve``,
real studies and reports; no mocks.

- weights that are not finite are refused when read, so a model holding them does not load;
- a served model refuses a request above its row limit with a 400, before it allocates the batch;
- weights files get the mode of every other file the project writes (not tempfile's 0600);
- ``report`` says, in a warning line and in the report, when the study's final fit has no
  weights and it evaluates the best trial's own;
- a warm-up as long as the training is one ``warning:`` line, not an error.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_study import (
    MNIST_MLP,
    free_port,
    run_cli,
    sqlite_uri,
    started,
    study_runs,
    wait_for_http,
    wait_until_gone,
)

from research.engine.mlp import MLPSpec, init_params, predict
from research.experiment.config.fields import TrainConfig
from research.experiment.config.presets import LongWarmup, configure, long_warmup, preset
from research.experiment.tracking import mlp_pyfunc
from research.experiment.tracking.mlp_pyfunc import MAX_ROWS
from research.experiment.tracking.models import log_model
from research.experiment.tracking.runs import RunEnd, start_run
from research.experiment.tracking.weights import WeightsError, load_weights, save_weights

SERVE_WAIT = 120  # seconds (as tests/test_models.py)


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def tiny_network(dtype: Any = np.float32) -> tuple[MLPSpec, list]:
    spec = MLPSpec((784, 16, 10), "relu", "softmax", "cross_entropy", 0.0)
    return spec, init_params(spec, 0, dtype=np.dtype(dtype), scheme="he")


def with_arrays(path: Path, out: Path, **changes: np.ndarray) -> Path:
    """A copy of the weights file ``path`` at ``out`` with some arrays replaced (as anyone with
    write access to the store could: a valid .npz, nothing pickled)."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    np.savez(out, **{**arrays, **changes})
    return out


# --- non-finite weights -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weights_that_are_not_finite_are_refused_naming_the_file_and_the_first_array(
    tmp_path, dtype
):
    spec, params = tiny_network(dtype)
    path = tmp_path / "weights.npz"
    save_weights(path, params, spec)
    load_weights(path)  # finite: loads
    W1 = params[1]["W"].copy()
    W1[3, 4] = np.nan
    b0 = params[0]["b"].copy()
    b0[[0, 5]] = [np.inf, -np.inf]
    for changes, first, what in (
        ({"W1": W1}, "W1", "1 NaN and 0 infinite values of 160"),
        ({"W1": W1, "b0": b0}, "b0", "0 NaN and 2 infinite values of 16"),  # b0 comes first
    ):
        bad = with_arrays(path, tmp_path / "bad.npz", **changes)
        with pytest.raises(WeightsError) as error:
            load_weights(bad)
        message = str(error.value)
        assert message.startswith(f"{bad}: {first} holds {what}; a network's weights are finite")
        assert "\n" not in message


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A project model logged by ``log_model`` (as ``train`` logs it), downloaded to a folder."""
    import mlflow

    folder = tmp_path_factory.mktemp("model")
    uri = sqlite_uri(folder)
    config = TrainConfig(hidden_size=16)
    params = init_params(config.spec(), 0, np.float32, "he")
    run = start_run("trust", tracking_uri=uri)
    model_uri = log_model(run, params, config, np.zeros((2, 784), dtype=np.uint8))
    run.end(RunEnd.COMPLETE)
    mlflow.set_tracking_uri(uri)
    return Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(folder / "copy")))


@pytest.mark.slow
def test_a_model_whose_weights_are_not_finite_refuses_to_load(model_folder, tmp_path):
    import mlflow

    folder = Path(shutil.copytree(model_folder, tmp_path / "model"))
    weights = folder / "artifacts" / "weights.npz"
    mlflow.pyfunc.load_model(str(folder))  # as logged: loads
    _, params = load_weights(weights)
    nan = np.full_like(params[0]["W"], np.nan)
    with_arrays(weights, tmp_path / "nan.npz", W0=nan).replace(weights)
    with pytest.raises(WeightsError, match=rf"{weights}: W0 holds {nan.size} NaN and 0 infinite"):
        mlflow.pyfunc.load_model(str(folder))


# --- the row limit ------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_model_refuses_more_rows_than_its_limit_with_a_400(model_folder):
    import mlflow
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model(str(model_folder))
    spec, params = load_weights(model_folder / "artifacts" / "weights.npz")
    x = np.full((MAX_ROWS + 1, 784), 0.5, dtype=np.float32)
    out = model.predict(x[:MAX_ROWS])  # at the limit: answered
    np.testing.assert_array_equal(out["class"], predict(params, x[:MAX_ROWS], spec))
    with pytest.raises(MlflowException) as refused:
        model.predict(x)
    assert refused.value.get_http_status_code() == 400
    assert f"{MAX_ROWS + 1:,} rows in one request: the model takes at most {MAX_ROWS:,}" in (
        refused.value.message
    )


def post(port: int, rows: np.ndarray) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps({"inputs": rows.tolist()}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


@pytest.mark.slow
def test_a_served_read_only_copy_answers_and_refuses_a_request_above_the_limit(
    model_folder, tmp_path
):
    """docs/models.md's way to serve: a copy of the model in a folder nobody else can write,
    ``mlflow models serve -m <folder>``; a request one row above the limit is a 400."""
    folder = Path(shutil.copytree(model_folder, tmp_path / "served"))
    for path in [folder, *folder.rglob("*")]:
        path.chmod(mode(path) & ~0o222)  # read-only
    spec, params = load_weights(folder / "artifacts" / "weights.npz")
    port = free_port()
    environment = {
        **os.environ,
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    command = [
        sys.executable, "-m", "mlflow", "models", "serve", "-m", str(folder),
        "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    with (
        (tmp_path / "serve.log").open("wb") as log,
        started(command, tmp_path, env=environment, stdout=log, stderr=subprocess.STDOUT) as server,
    ):
        try:
            wait_for_http(f"http://127.0.0.1:{port}/ping", server, SERVE_WAIT)
        except BaseException as error:
            error.add_note("serve.log ends with:\n" + (tmp_path / "serve.log").read_text()[-3000:])
            raise
        x = np.full((MAX_ROWS + 1, 784), 0.5, dtype=np.float32)
        code, answer = post(port, x[:3])
        assert code == 200, answer
        assert answer["predictions"]["class"] == predict(params, x[:3], spec).tolist()
        code, answer = post(port, x)
        assert code == 400, answer
        assert answer["error_code"] == "INVALID_PARAMETER_VALUE"
        assert f"the model takes at most {MAX_ROWS:,} per request" in answer["message"]
    assert wait_until_gone(server.pid) == [], "the server's process group outlived the test"
    assert [path for path in folder.rglob("*") if mode(path) & 0o222] == []  # still read-only


# --- file modes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_weights_files_get_the_mode_of_any_file_written(tmp_path, mask):
    spec, params = tiny_network()
    with umask(mask):
        save_weights(tmp_path / "weights.npz", params, spec)
        (tmp_path / "other.txt").write_text("")
    assert mode(tmp_path / "weights.npz") == mode(tmp_path / "other.txt") == 0o666 & ~mask
    assert sorted(path.name for path in tmp_path.iterdir()) == ["other.txt", "weights.npz"]


@pytest.mark.slow
def test_every_artifact_of_a_run_and_its_model_has_one_mode(tmp_path):
    """A run's weights.npz and weights.txt and its model's files, in MLflow's local artifact
    store: one mode, 0644 under the usual umask (weights.npz was 0600)."""
    uri = sqlite_uri(tmp_path)
    config = TrainConfig(hidden_size=16)
    params = init_params(config.spec(), 0, np.float32, "he")
    with umask(0o022):
        run = start_run("modes", tracking_uri=uri)
        run.log_weights(params, config.spec())
        log_model(run, params, config, np.zeros((2, 784), dtype=np.uint8))
        run.end(RunEnd.COMPLETE)
    store = tmp_path / "mlruns"
    files = [path for path in store.rglob("*") if path.is_file() and path.name != "mlflow.db"]
    names = {path.name for path in files}
    assert {"weights.npz", "weights.txt", "MLmodel", "mlp_pyfunc.py"} <= names, names
    assert len([path for path in files if path.name == "weights.npz"]) == 2  # run's and model's
    # (MLflow copies the model's code with the mode the file has in this checkout)
    code = next(path for path in files if path.name == "mlp_pyfunc.py")
    assert mode(code) == mode(Path(mlp_pyfunc.__file__))
    modes = {str(path.relative_to(store)): oct(mode(path)) for path in files if path != code}
    assert set(modes.values()) == {"0o644"}, modes


# --- the report's fallback ----------------------------------------------------------------------


@pytest.mark.slow
def test_the_report_says_when_it_falls_back_to_the_best_trials_own_weights(tmp_path):
    uri = sqlite_uri(tmp_path)
    code, out, err = run_cli(
        ["study", str(MNIST_MLP), "--n-trials", "2", "--epochs", "1", "--subset", "2000",
         "--tracking-uri", uri, "--quiet"]
    )  # fmt: skip
    assert code == 0, out + err
    (parent,), _ = study_runs(uri, "mnist_mlp")
    refit = parent.data.tags["refit_trial"]
    logged = parent.data.metrics["test_accuracy"]
    # deleted from the store (a local artifact store: a folder under mlruns/)
    stored = list((tmp_path / "mlruns").rglob(f"{parent.info.run_id}/artifacts/best_weights.npz"))
    assert len(stored) == 1, stored
    stored[0].unlink()

    out_dir = tmp_path / "report"
    code, out, err = run_cli(["report", "--tracking-uri", uri, "--out", str(out_dir), "--no-log"])
    assert code == 0, out + err
    warning = (
        f"warning: the study's parent run {parent.info.run_id} has no best_weights.npz, the final "
        f"fit of trial {refit} (the study logged its test_accuracy, {logged:.2%}), so the test "
        f"evaluation uses trial {refit}'s own weights, trained on the training split only"
    )
    lines = [line for line in out.splitlines() if line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith(warning), out
    summary = json.loads((out_dir / "report.json").read_text())
    assert any(note.startswith(warning.removeprefix("warning: ")) for note in summary["notes"])
    assert f"Note: {warning.removeprefix('warning: ')}" in (out_dir / "report.md").read_text()
    assert summary["test"]["source"].startswith(f"trial {refit}'s weights")
    assert summary["test"]["logged_test_accuracy"] is None


# --- a warm-up as long as the training ----------------------------------------------------------


def test_a_warmup_as_long_as_the_training_is_a_warning_not_an_error():
    with pytest.warns(LongWarmup) as caught:
        config = configure(preset("default"), epochs=4, warmup_epochs=5, schedule="cosine")
    assert config.warmup_epochs == 5  # accepted
    (warning,) = caught
    assert str(warning.message) == (
        "warmup_epochs = 5 is not shorter than epochs = 4: the learning rate rises from 0 "
        "through the whole run and only reaches about 80% of learning_rate = 0.1 at its last "
        "step; the cosine schedule never starts; shorten the warm-up or train longer"
    )
    with pytest.warns(LongWarmup, match="and only nears learning_rate = 0.1 at its last step;"):
        configure(preset("default"), epochs=4, warmup_epochs=4)  # no step at the full rate
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for epochs, warmup in ((4, 3), (1, 0)):  # shorter, or none: nothing said
            assert not long_warmup(
                configure(preset("default"), epochs=epochs, warmup_epochs=warmup)
            )
        # a logged run read back (rerun, report) and a study's trials say nothing
        TrainConfig.from_params(config.as_texts())
        TrainConfig(epochs=4, warmup_epochs=5)


@pytest.mark.slow
def test_train_says_so_in_one_warning_line(tmp_path):
    code, out, err = run_cli(
        ["train", "--hidden-size", "16", "--subset", "500", "--epochs", "1",
         "--warmup-epochs", "2", "--quiet", "--tracking-uri", sqlite_uri(tmp_path)]
    )  # fmt: skip
    assert code == 0, out + err
    assert err.splitlines() == [
        "warning: warmup_epochs = 2 is not shorter than epochs = 1: the learning rate rises "
        "from 0 through the whole run and only reaches about 50% of learning_rate = 0.1 at its "
        "last step; shorten the warm-up or train longer"
    ]
