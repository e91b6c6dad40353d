"""A researcher's own layer: ``verify-layer FILE.py:NAME``, and the layer in training and studies.

The command's exit codes (0 passes, 1 a check fails, 2 the file cannot be used, in one line);
each check of ``research.verify.layer_suite.check_layer`` shown able to fail on a layer that is
wrong only in what that check looks at (finite differences, float32, non-contiguous inputs, per
sample, mutated inputs); docs/layers.md's worked example (``experiments/layers/my_layers.py``)
failing and then passing as the page says; every built-in layer through the same bar; a user
layer named in ``layers``: trained, its file logged with its SHA-256, ``rerun`` refusing when the
file changed, and a study searching over architectures that use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_layers_verify import MODED, STATELESS

from research.cli import main
from research.engine.layers.parse import LayersError, build_network
from research.engine.layers.user_file import FileLayer, UserLayerError, load_layer
from research.verify.layer_suite import LayerUnusable, check_layer, format_report

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "experiments" / "layers" / "my_layers.py"


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def failed_checks(report) -> set[str]:
    return {section.check for section in report.sections if not section.passed}


# --- layers wrong in one way only ---------------------------------------------------------------


class Square:
    """y = x², right."""

    def init(self, rng, in_shape, dtype):
        return {}

    def forward(self, params, x, xp):
        return x * x, x

    def backward(self, params, cache, dy):
        return 2 * cache * dy, {}


class ContiguousOnlySquare(Square):
    """Reads x's memory with strides computed from its shape (im2col's classic mistake): right
    for contiguous inputs, wrong for any other."""

    def backward(self, params, cache, dy):
        flat = np.lib.stride_tricks.as_strided(cache, (cache.size,), (cache.itemsize,))
        return 2 * flat.reshape(cache.shape) * dy, {}


class InPlaceSquare(Square):
    """Right values, but its backward scales dy in place."""

    def backward(self, params, cache, dy):
        dy *= 2 * cache
        return dy, {}


class Float32Square(Square):
    """Right in float64; in float32 it rounds its gradient to 3 significant digits (a
    precision bug, such as a float16 accumulator)."""

    def backward(self, params, cache, dy):
        dx = 2 * cache * dy
        return (dx if dx.dtype == np.float64 else dx.astype(np.float16).astype(dx.dtype)), {}


class BatchMeanScale:
    """y = a·x per example, right forward; its backward averages the gradient of ``a`` over the
    batch instead of summing it, which only the per-sample check (the examples' gradients summed
    against the batch's) and the autodiff check see."""

    def init(self, rng, in_shape, dtype):
        return {"a": np.ones(in_shape, dtype)}

    def forward(self, params, x, xp):
        return params["a"] * x, x

    def backward(self, params, cache, dy):
        return params["a"] * dy, {"a": (dy * cache).mean(axis=0)}


class Centered:
    """y = x − mean over the batch: it couples the examples (the per-sample check says so and
    does not apply), with a right backward."""

    def init(self, rng, in_shape, dtype):
        return {}

    def forward(self, params, x, xp):
        return x - x.mean(axis=0, keepdims=True), None

    def backward(self, params, cache, dy):
        return dy - dy.mean(axis=0, keepdims=True), {}


def test_a_right_layer_passes_every_check() -> None:
    report = check_layer(Square())
    assert report.passed, report.failures()
    checks = {section.check for section in report.sections}
    assert checks == {
        "autodiff float64",
        "finite differences float64",
        "autodiff float32",
        "non-contiguous inputs, float64",
        "channels-last inputs, float64",
        "per sample against batched, float64",
        "inputs unchanged",
    }
    assert {section.in_shape for section in report.sections} == {(6,), (3, 6, 5)}


@pytest.mark.parametrize(
    ("layer", "failing"),
    [
        (
            ContiguousOnlySquare(),
            {"non-contiguous inputs, float64", "channels-last inputs, float64"},
        ),
        (InPlaceSquare(), {"inputs unchanged"}),
        (Float32Square(), {"autodiff float32"}),
        (
            BatchMeanScale(),
            {
                "autodiff float64",
                "autodiff float32",
                "finite differences float64",
                "non-contiguous inputs, float64",
                "channels-last inputs, float64",
                "per sample against batched, float64",
            },
        ),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, set) else "",
)
def test_each_check_fails_on_what_it_looks_at(layer, failing: set[str]) -> None:
    report = check_layer(layer)
    assert not report.passed
    assert failed_checks(report) == failing, report.failures()


def test_a_layer_coupling_the_batch_skips_the_per_sample_check() -> None:
    report = check_layer(Centered())
    assert report.passed, report.failures()
    skipped = [s for s in report.sections if s.skipped]
    assert len(skipped) == 2 and all("couples the batch" in s.skipped for s in skipped)


@pytest.mark.parametrize("name", [*STATELESS, *MODED])
def test_every_built_in_layer_passes_the_same_bar(name: str) -> None:
    layer, shape = {**STATELESS, **MODED}[name]
    report = check_layer(layer, [shape], seed=3)
    assert report.passed, "\n".join(report.failures())


def test_shapes_the_layer_refuses() -> None:
    from research.engine.layers.conv import Conv2D

    conv = Conv2D(2, 3)
    report = check_layer(conv)  # the default (6,) is no image: skipped, said
    assert report.passed and report.shapes_skipped and "(6,)" in report.shapes_skipped[0]
    assert "(6,)" in format_report(report)
    with pytest.raises(LayerUnusable, match=r"cannot take input shape \(6,\)"):
        check_layer(conv, [(6,)])


# --- the command --------------------------------------------------------------------------------


def test_the_worked_example_fails_then_passes(capsys) -> None:
    """docs/layers.md's worked example: the first try fails on the input gradient in every
    autodiff and finite-difference check (its parameter gradient and the per-sample check
    pass); the fix passes everything."""
    code = main(["verify-layer", f"{EXAMPLE}:RMSNormFirstTry", "--brief"])
    out = capsys.readouterr().out
    assert code == 1, out
    failing = [line for line in out.splitlines() if line.rstrip().endswith("FAIL")]
    assert failing and all(line.split()[0] == "input" for line in failing), failing
    assert "FAILED: 9 of 35 arrays disagree" in out
    assert "ok      per sample against batched, float64, input (6,)" in out
    code = main(["verify-layer", f"{EXAMPLE}:RMSNorm", "--brief"])
    out = capsys.readouterr().out
    assert code == 0 and "PASSED: 35 arrays in 13 checks agree" in out, out
    # by default every check's table: each array, its worst element and both values
    assert main(["verify-layer", f"{EXAMPLE}:Swish", "--shape", "4,3"]) == 0
    out = capsys.readouterr().out
    assert "input (4, 3)" in out and "input (6,)" not in out
    assert out.count("worst at: ours vs reference") == 6  # 6 checks (no images), a table each
    assert "input gradient dx  (4, 4, 3)" in out


BROKEN = """
import numpy as np

class NumpyForward:
    def init(self, rng, in_shape, dtype):
        return {}
    def forward(self, params, x, xp):
        y = np.tanh(np.asarray(x))
        return y, y
    def backward(self, params, cache, dy):
        return dy * (1 - cache**2), {}

class NoBackward:
    def init(self, rng, in_shape, dtype):
        return {}
    def forward(self, params, x, xp):
        return x, None

class Needs:
    def __init__(self, width):
        self.width = width
    def init(self, rng, in_shape, dtype):
        return {}
    def forward(self, params, x, xp):
        return x, None
    def backward(self, params, cache, dy):
        return dy, {}

class OnlyY:
    def init(self, rng, in_shape, dtype):
        return {}
    def forward(self, params, x, xp):
        return x
    def backward(self, params, cache, dy):
        return dy, {}

class Broken:
    def init(self, rng, in_shape, dtype):
        return {}
    def forward(self, params, x, xp):
        return x.nonexistent, None
    def backward(self, params, cache, dy):
        return dy, {}

not_a_layer = 3
"""


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("NumpyForward", "its forward does not run under jax.numpy (TracerArrayConversionError"),
        ("NoBackward", "it has no backward method; a layer needs init(rng, in_shape, dtype)"),
        ("Nope", "defines no 'Nope' (its classes: Broken, Needs, NoBackward, NumpyForward,"),
        ("Needs", "Needs() failed: TypeError:"),
        ("Needs(1.5,2)", "Needs(1.5, 2) failed: TypeError:"),
        ("not_a_layer", "it has no init, forward, backward method"),
        ("OnlyY", "forward must return (y, cache), a pair"),
    ],
)
def test_a_file_that_cannot_be_used_is_one_line_exit_2(tmp_path, capsys, target, message):
    (tmp_path / "broken.py").write_text(BROKEN)
    code = main(["verify-layer", f"{tmp_path / 'broken.py'}:{target}"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith("error: ") and message in line, line


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["nofile.py:X"], "nofile.py:X: no file nofile.py (from "),
        (["my_layers.Swish"], "'my_layers.Swish' is not FILE.py:NAME"),
        ([f"{EXAMPLE}:Swish dense(3)"], "is not FILE.py:NAME"),
        (["my dir/x.py:A"], "the path may hold no spaces, colons, parentheses or commas"),
        ([f"{EXAMPLE}:Swish", "--seed", "-1"], "--seed -1 is not allowed"),
        ([f"{EXAMPLE}:Swish", "--batch-size", "0"], "--batch-size 0 is not allowed"),
    ],
)
def test_usage_mistakes_are_one_line_exit_2(capsys, argv, message):
    assert main(["verify-layer", *argv]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert message in line


def test_an_import_error_names_its_line_and_no_traceback(tmp_path):
    (tmp_path / "layer.py").write_text("import numpy as np\n\nx = 1 / 0\n")
    result = subprocess.run(
        [sys.executable, "-m", "research", "verify-layer", "layer.py:X"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: layer.py:X: importing layer.py failed: ZeroDivisionError: division by zero (line 3)"
    )
    bad_shape = subprocess.run(
        [sys.executable, "-m", "research", "verify-layer", "layer.py:X", "--shape", "3,x"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad_shape.returncode == 2 and "is no shape" in bad_shape.stderr
    assert "Traceback" not in result.stderr + bad_shape.stderr


class RaisesOnChannelsLast(Square):
    """Right, but its backward refuses inputs in channels-last memory: the one check that hands
    it such inputs fails, with what it raised (exit 1, not 2)."""

    def backward(self, params, cache, dy):
        if cache.ndim == 4 and cache.strides[1] < cache.strides[3]:
            raise ValueError("channels-last memory is not supported")
        return super().backward(params, cache, dy)


def test_a_check_in_which_the_layer_raises_fails_with_what_it_raised():
    report = check_layer(RaisesOnChannelsLast())
    assert failed_checks(report) == {"channels-last inputs, float64"}
    (failure,) = report.failures()
    assert "the layer's code: raised ValueError: channels-last memory is not supported" in failure


def test_a_user_layer_that_raises_is_one_line_in_a_layers_value(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("broken.py").write_text(BROKEN)
    code, _, err = run_cli(["train", "--layers", "dense(8) broken.py:Broken", "--no-track"])
    assert code == 2 and "Traceback" not in err
    (line,) = err.splitlines()
    assert "a layer of your own raised AttributeError:" in line and "verify-layer" in line


# --- loading ------------------------------------------------------------------------------------


def test_a_file_is_imported_once_per_content(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(EXAMPLE, "my_layers.py")
    first = load_layer("my_layers.py", "RMSNorm")
    assert isinstance(first, FileLayer) and first.describe() == "my_layers.py:RMSNorm"
    assert first.digest == hashlib.sha256(Path("my_layers.py").read_bytes()).hexdigest()
    assert type(load_layer("my_layers.py", "RMSNorm").layer) is type(first.layer)
    Path("my_layers.py").write_text(EXAMPLE.read_text().replace("eps = 1e-5", "eps = 1e-3"))
    edited = load_layer("my_layers.py", "RMSNorm")
    assert edited.digest != first.digest and edited.layer.eps == 1e-3 and first.layer.eps == 1e-5


def test_numbers_go_to_the_class_and_the_text_reads_back(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("gate.py").write_text(
        "class Gate:\n"
        "    def __init__(self, units, scale=1.0):\n"
        "        self.units, self.scale = units, scale\n"
        "    def init(self, rng, in_shape, dtype): return {}\n"
        "    def forward(self, params, x, xp): return self.scale * x, None\n"
        "    def backward(self, params, cache, dy): return self.scale * dy, {}\n"
    )
    network = build_network(
        "dense(8) gate.py:Gate(16, scale=0.5)", n_classes=10, output="softmax", loss="cross_entropy"
    )
    gate = network.layers[2]
    assert gate.units == 16 and type(gate.units) is int and gate.scale == 0.5
    assert network.describe() == "dense(8) relu gate.py:Gate(16,scale=0.5) dense(10)"
    with pytest.raises(LayersError, match=r"gate.py:Gate's argument 'x' is not a number"):
        build_network("gate.py:Gate(x)", n_classes=10, output="softmax", loss="cross_entropy")
    with pytest.raises(UserLayerError, match=r"no file other\.py"):
        build_network("other.py:Gate(1)", n_classes=10, output="softmax", loss="cross_entropy")


def test_a_user_activation_places_the_activations(tmp_path, monkeypatch):
    """A user layer saying ``activation = True`` (the example's Swish) counts as an activation:
    the run's is inserted nowhere."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(EXAMPLE, "my_layers.py")
    network = build_network(
        "dense(8) my_layers.py:Swish dense(4) my_layers.py:RMSNorm",
        n_classes=10, output="softmax", loss="cross_entropy",
    )  # fmt: skip
    assert network.describe() == (
        "dense(8) my_layers.py:Swish dense(4) my_layers.py:RMSNorm dense(10)"
    )


# --- in training, rerun and studies -----------------------------------------------------------


@pytest.mark.slow
def test_a_user_layer_trains_is_logged_and_rerun_checks_its_file(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    shutil.copy(EXAMPLE, "my_layers.py")
    digest = hashlib.sha256(Path("my_layers.py").read_bytes()).hexdigest()
    store = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    code, out, err = run_cli(
        ["train", "--layers", "dense(32) my_layers.py:RMSNorm", "--subset", "500", "--epochs",
         "2", "--batch-size", "50", "--quiet", "--tracking-uri", store, "--experiment", "user"]
    )  # fmt: skip
    assert code == 0, out + err
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("user").experiment_id])
    assert run.data.params["layers"] == "dense(32) my_layers.py:RMSNorm"
    assert run.data.params["network"] == "dense(32) relu my_layers.py:RMSNorm dense(10)"
    assert run.data.params["layer_files"] == f"my_layers.py=sha256:{digest}"
    logged = client.download_artifacts(run.info.run_id, "layer_files", str(tmp_path / "got"))
    assert (Path(logged) / "my_layers.py").read_bytes() == Path("my_layers.py").read_bytes()

    code, out, err = run_cli(["rerun", run.info.run_id, "--tracking-uri", store])
    assert code == 0 and "reproduced exactly" in out, out + err

    Path("my_layers.py").write_text(Path("my_layers.py").read_text() + "\n# edited\n")
    now = hashlib.sha256(Path("my_layers.py").read_bytes()).hexdigest()
    code, out, err = run_cli(["rerun", run.info.run_id, "--tracking-uri", store])
    assert code == 2
    (line,) = err.splitlines()
    assert line == (
        f"error: run {run.info.run_id} cannot be rerun: its user layer file my_layers.py has "
        f"changed (sha256 {digest[:12]}... then, {now[:12]}... now); restore the run's copy "
        "(its artifacts layer_files/) to rerun it"
    )


STUDY = """
[study]
name = "user_layers"
objective = "val/accuracy"
n_trials = 3
sampler = "random"
pruner = "none"
seed = 0

[fixed]
activation = "relu"
output = "softmax"
loss = "cross_entropy"
optimizer = "sgd"
learning_rate = 0.1
batch_size = 50
epochs = 1
seed = 0
dtype = "float32"

[search.layers]
type = "categorical"
choices = ["dense(16) my_layers.py:Swish", "dense(16) my_layers.py:RMSNorm", "dense(16)"]
"""


@pytest.mark.slow
def test_a_study_searches_architectures_that_use_a_user_layer(tmp_path, monkeypatch):
    import optuna
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    shutil.copy(EXAMPLE, "my_layers.py")
    Path("study.toml").write_text(STUDY)
    store = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    code, out, err = run_cli(
        ["study", "study.toml", "--subset", "500", "--no-final", "--tracking-uri", store, "--quiet"]
    )
    assert code == 0, out + err
    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs(
        [client.get_experiment_by_name("user_layers").experiment_id],
        filter_string="tags.`research.role` = 'trial'",
    )
    assert len(runs) == 3 and all(r.data.tags["research.state"] == "COMPLETE" for r in runs)
    by_layers = {r.data.params["layers"]: r.data.params for r in runs}
    digest = hashlib.sha256(Path("my_layers.py").read_bytes()).hexdigest()
    for layers, params in by_layers.items():
        expected = f"my_layers.py=sha256:{digest}" if "my_layers.py" in layers else None
        assert params.get("layer_files") == expected, layers
    assert any("my_layers.py" in layers for layers in by_layers)
