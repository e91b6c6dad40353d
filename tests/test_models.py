"""The network of a run as an MLflow model (docs/models.md), through the real commands: real
SQLite stores in a temporary folder, real MNIST subsets, a real ``mlflow models serve``; no mocks.

A ``train`` run logs its network as a model (models from code: nothing pickled) that predicts
exactly what the engine predicts from the run's weights.npz, raw-input networks included; a study
registers its refit best as ``models:/<study>@champion``, and the alias follows the latest refit;
the champion answers over REST; runs logged before models existed still rerun.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import copy_run
from test_study import (
    MNIST_MLP,
    free_port,
    mlflow_client,
    run_cli,
    sqlite_uri,
    started,
    study_runs,
    wait_for_http,
    wait_until_gone,
)

from research.data import load_mnist, to_inputs
from research.engine.mlp import forward, predict
from research.experiment.config.fields import TrainConfig
from research.experiment.tracking.models import CHAMPION, MODEL_NAME, load_model, log_model
from research.experiment.tracking.runs import RunEnd, start_run
from research.experiment.tracking.stores import TrackingError
from research.experiment.tracking.weights import load_weights

STUDY = "mnist_mlp"
SERVE_WAIT = 120  # seconds: `mlflow models serve` answers in ~3 s, a busy 2-core CI is slower


# --- helpers ------------------------------------------------------------------------------------


def only_run(uri: str, experiment: str) -> Any:
    client = mlflow_client(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


def run_weights(uri: str, run_id: str, name: str, folder: Path):
    """(spec, params) of the run's weights file, downloaded and read with numpy."""
    path = mlflow_client(uri).download_artifacts(run_id, name, str(folder))
    return load_weights(Path(path))


def model_id_of(run: Any) -> str:
    (output,) = run.outputs.model_outputs
    return output.model_id


def use_store(uri: str) -> None:
    """Where ``mlflow.pyfunc.load_model`` looks up ``models:/`` URIs (as every command sets it)."""
    import mlflow

    mlflow.set_tracking_uri(uri)


@pytest.fixture(scope="module")
def mnist_test_images(mnist_folder) -> np.ndarray:
    """The first 1,000 images of MNIST's test split (uint8, (1000, 784))."""
    return load_mnist(mnist_folder).test.images[:1000]


# --- a train run's model ------------------------------------------------------------------------

TRAIN_RUNS = {
    # the default network (float32, inputs k/255), and the origin's (float64 sigmoid network fed
    # raw 0..255 pixels: the model takes [0, 1] and scales them itself)
    "default": (["--hidden-size", "32"], False, np.float32),
    "origin-raw": (["--preset", "origin", "--raw"], True, np.float64),
}


@pytest.fixture(scope="module")
def train_store(tmp_path_factory) -> str:
    """One tiny ``train`` run per entry of TRAIN_RUNS, each in its own experiment."""
    folder = tmp_path_factory.mktemp("train_models")
    uri = sqlite_uri(folder)
    for name, (flags, _, _) in TRAIN_RUNS.items():
        code, out, err = run_cli(
            ["train", *flags, "--subset", "1000", "--epochs", "1", "--quiet",
             "--tracking-uri", uri, "--experiment", name]
        )  # fmt: skip
        assert code == 0, out + err
        model = f"models:/{model_id_of(only_run(uri, name))}"
        assert f"its MLflow model: {model} (load and serve it: docs/models.md)" in out
    return uri


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAIN_RUNS)
def test_a_train_runs_model_predicts_exactly_what_the_engine_does(
    name, train_store, mnist_test_images, tmp_path
):
    import mlflow

    _, raw, dtype = TRAIN_RUNS[name]
    uri = train_store
    run = only_run(uri, name)
    spec, params = run_weights(uri, run.info.run_id, "weights.npz", tmp_path)
    use_store(uri)
    model = mlflow.pyfunc.load_model(f"models:/{model_id_of(run)}")

    # pixels in [0, 1], whatever the run trained on
    out = model.predict(to_inputs(mnist_test_images))
    trained_on = to_inputs(mnist_test_images, raw=raw, dtype=dtype)  # what the network saw
    assert set(out) == {"class", "probabilities"}
    assert out["class"].dtype == np.int64 and out["probabilities"].dtype == dtype
    np.testing.assert_array_equal(out["class"], predict(params, trained_on, spec))
    np.testing.assert_array_equal(out["probabilities"], forward(params, trained_on, spec))
    if not raw:  # one epoch on 1,000 rows is far above chance (the origin's raw pixels are not)
        labels = load_mnist().test.labels[: len(mnist_test_images)]
        assert np.mean(out["class"] == labels) > 0.6

    # the model's contract, as logged
    signature = {k: json.loads(v) for k, v in model.metadata.signature.to_dict().items() if v}
    assert signature["inputs"] == [
        {"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 784]}}
    ]
    assert signature["outputs"] == [
        {"name": "class", "type": "tensor", "tensor-spec": {"dtype": "int64", "shape": [-1]}},
        {
            "name": "probabilities",
            "type": "tensor",
            "tensor-spec": {"dtype": np.dtype(dtype).name, "shape": [-1, 10]},
        },
    ]
    example = model.input_example
    assert example.shape == (2, 784) and example.dtype == np.float32
    assert 0 <= example.min() and example.max() <= 1
    metadata = model.metadata.metadata
    assert metadata["research.raw_inputs"] is raw and metadata["research.dataset"] == "mnist"
    assert metadata["research.sizes"] == list(spec.sizes)

    # a LoggedModel of the run, in the run's experiment, with the run's training fields
    client = mlflow_client(uri)
    logged = client.get_logged_model(model_id_of(run))
    assert logged.name == MODEL_NAME and str(logged.status) == "READY"
    assert logged.experiment_id == run.info.experiment_id
    assert logged.source_run_id == run.info.run_id
    assert TrainConfig.from_params(logged.params)[0] == TrainConfig.from_params(run.data.params)[0]
    # its metrics are the run's at its last epoch
    own = {metric.key: metric.value for metric in logged.metrics}
    assert own["val/accuracy"] == run.data.metrics["val/accuracy"], own
    # the run's own artifacts are as before (report and rerun read weights.npz); the model's
    # are the LoggedModel's, not under the run's
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"loss_curves.png", "weights.npz"} <= artifacts and MODEL_NAME not in artifacts


@pytest.mark.slow
def test_the_model_is_code_and_numpy_arrays_never_a_pickle(train_store, tmp_path):
    import mlflow

    run = only_run(train_store, "default")
    use_store(train_store)
    model_uri = f"models:/{model_id_of(run)}"
    folder = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path)))
    files = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    assert {"MLmodel", "mlp_pyfunc.py", "artifacts/weights.npz"} <= files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))]
    flavor = mlflow.models.Model.load(str(folder / "MLmodel")).flavors["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert "python_model" not in flavor  # (the key of a pickled PythonModel)
    assert flavor["config"] == {"input_scale": 1.0}
    with np.load(folder / "artifacts" / "weights.npz", allow_pickle=False) as arrays:
        assert {"spec", "W0", "b0", "W1", "b1"} == set(arrays.files)
    assert (folder / "requirements.txt").read_text().split() == [
        f"mlflow=={mlflow.__version__}",
        f"numpy=={np.__version__}",
    ]


@pytest.mark.slow
def test_inputs_outside_the_contract_are_refused_with_the_reason(train_store, mnist_test_images):
    from mlflow.exceptions import MlflowException

    model = load_model(f"models:/{model_id_of(only_run(train_store, 'default'))}", train_store)
    with pytest.raises(MlflowException, match=r"range from 0 to 255: .* pixels scaled to \[0, 1\]"):
        model.predict(mnist_test_images[:3].astype(np.float32))  # raw pixels, not scaled
    with pytest.raises(MlflowException, match="dtype of input float64 does not match"):
        model.predict(to_inputs(mnist_test_images[:3]).astype(np.float64))
    with pytest.raises(MlflowException, match=r"Shape of input \(3, 28, 28\) does not match"):
        model.predict(to_inputs(mnist_test_images[:3]).reshape(3, 28, 28))
    with pytest.raises(TrackingError, match=f"cannot load the MLflow model models:/{STUDY}@"):
        load_model(f"models:/{STUDY}@{CHAMPION}", train_store)  # no such registered model


@pytest.mark.slow
def test_logging_a_model_adds_well_under_two_seconds(tmp_path, mnist_test_images):
    """Measured ~0.4 s on 2 cores (docs/models.md); 5 s leaves room for a busy machine, while
    MLflow's requirement inference (what log_model does without explicit requirements) alone
    takes longer."""
    config = TrainConfig(hidden_size=256)
    from research.engine.mlp import init_params

    params = init_params(config.spec(), 0, np.float32, "he")
    run = start_run("timing", tracking_uri=sqlite_uri(tmp_path))
    seconds = []
    for _ in range(2):  # the first call also imports MLflow's model modules
        started_at = time.perf_counter()
        log_model(run, params, config, mnist_test_images)
        seconds.append(time.perf_counter() - started_at)
    assert max(seconds) < 5, seconds
    run.end(RunEnd.COMPLETE)


@pytest.mark.slow
def test_a_run_logged_before_models_existed_still_reruns(train_store):
    """A run without a model (an older run: its params, histories and weights.npz) reruns."""
    uri = train_store
    client = mlflow_client(uri)
    source = only_run(uri, "default")
    older = copy_run(client, source, source.info.experiment_id)
    assert not client.get_run(older).outputs.model_outputs
    code, out, err = run_cli(["rerun", older, "--tracking-uri", uri])
    assert code == 0, out + err
    assert "reproduced exactly" in out


# --- a study's champion -------------------------------------------------------------------------


def tiny_study(uri: str, n_trials: int, subset: int = 2000) -> tuple[int, str, str]:
    """The shipped MNIST study, cut down (as tests/test_study.py runs it)."""
    return run_cli(
        ["study", str(MNIST_MLP), "--n-trials", str(n_trials), "--epochs", "1", "--subset",
         str(subset), "--tracking-uri", uri, "--quiet"]
    )  # fmt: skip


@pytest.fixture(scope="module")
def champion_store(tmp_path_factory) -> tuple[Path, str]:
    """A tiny study (2 trials), then continued (3 trials) on more rows: two refits, two
    versions (the same rows would not refit the same best trial again: test_champion.py)."""
    folder = tmp_path_factory.mktemp("champion")
    uri = sqlite_uri(folder)
    for n_trials, version, subset in ((2, 1, 2000), (3, 2, 3000)):
        code, out, err = tiny_study(uri, n_trials, subset)
        assert code == 0, out + err
        champion = f"models:/{STUDY}@{CHAMPION} (version {version})"
        assert f"the refit best as an MLflow model: {champion}" in out, out
    return folder, uri


@pytest.mark.slow
def test_a_study_registers_its_refit_best_as_the_champion(
    champion_store, mnist_test_images, tmp_path
):
    import mlflow

    _, uri = champion_store
    client = mlflow_client(uri)
    (parent,), children = study_runs(uri, STUDY)
    registered = client.get_registered_model(STUDY)
    assert "refit best" in registered.description
    versions = client.search_model_versions(f"name = '{STUDY}'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    champion = client.get_model_version_by_alias(STUDY, CHAMPION)
    assert int(champion.version) == 2  # the latest refit
    # the champion is the parent's latest model, tagged with the trial and its test accuracy
    assert champion.run_id == parent.info.run_id
    latest = max(parent.outputs.model_outputs, key=lambda output: output.step)
    assert champion.source == f"models:/{latest.model_id}"
    # the champion's own metric is its test accuracy, not the study's best_value (a trial's
    # validation figure) nor n_trials_complete, which the parent logs at the same step
    own = {m.key: m.value for m in client.get_logged_model(latest.model_id).metrics}
    assert own == {"test_accuracy": parent.data.metrics["test_accuracy"]}, own
    assert champion.tags["refit_trial"] == parent.data.tags["refit_trial"]
    assert float(champion.tags["test_accuracy"]) == parent.data.metrics["test_accuracy"]
    assert champion.tags["research.study"] == STUDY
    # only the refits are models: no trial logs one
    assert len(parent.outputs.model_outputs) == 2
    assert all(not run.outputs.model_outputs for run in children)

    use_store(uri)
    model = mlflow.pyfunc.load_model(f"models:/{STUDY}@{CHAMPION}")
    spec, params = run_weights(uri, parent.info.run_id, "best_weights.npz", tmp_path)
    x = to_inputs(mnist_test_images)
    out = model.predict(x)
    np.testing.assert_array_equal(out["class"], predict(params, x, spec))
    np.testing.assert_array_equal(out["probabilities"], forward(params, x, spec))
    labels = load_mnist().test.labels[: len(x)]
    accuracy = np.mean(out["class"] == labels)
    assert accuracy > 0.8, accuracy  # 12,000 rows for one epoch


@pytest.mark.slow
def test_mlflow_models_serve_answers_for_the_champion_over_rest(
    champion_store, mnist_test_images, tmp_path
):
    """``mlflow models serve -m models:/mnist_mlp@champion --env-manager local`` on a free
    loopback port: 5 test images posted as JSON, their classes and probabilities back, equal to
    the engine's; then the server's whole process group is stopped."""
    folder, uri = champion_store
    (parent,), _ = study_runs(uri, STUDY)
    spec, params = run_weights(uri, parent.info.run_id, "best_weights.npz", tmp_path)
    port = free_port()
    environment = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        # `serve` starts uvicorn by name: this environment's, even if it is not activated
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    command = [
        sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{STUDY}@{CHAMPION}",
        "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    log = (tmp_path / "serve.log").open("wb")
    with started(command, folder, env=environment, stdout=log, stderr=subprocess.STDOUT) as server:
        try:
            wait_for_http(f"http://127.0.0.1:{port}/ping", server, SERVE_WAIT)
        except BaseException as error:
            error.add_note("serve.log ends with:\n" + (tmp_path / "serve.log").read_text()[-3000:])
            raise
        x = to_inputs(mnist_test_images[:5])
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": x.tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read())
        predictions = answer["predictions"]
        assert predictions["class"] == predict(params, x, spec).tolist()
        # float32 through JSON (shortest repr of the same double) and back: the same numbers
        probabilities = np.asarray(predictions["probabilities"], dtype=np.float32)
        np.testing.assert_array_equal(probabilities, forward(params, x, spec))
        assert predictions["class"] == load_mnist().test.labels[:5].tolist()  # (7, 2, 1, 0, 4)

        # raw 0..255 pixels are refused with the reason, as a 400
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": (x * 255).tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 400
        assert "pixels scaled to [0, 1]" in json.loads(refused.value.read())["message"]
        refused.value.close()
        # null (JSON's NaN) is named as such, not as a range "from nan to nan"
        holes = x.tolist()
        holes[0][:3] = [None, None, None]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": holes}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        message = json.loads(refused.value.read())["message"]
        refused.value.close()
        assert refused.value.code == 400
        assert "3 inputs are NaN (null or NaN in the request) and 0 infinite" in message, message
    log.close()
    assert wait_until_gone(server.pid) == [], "the server's process group outlived the test"
