"""The ``layers`` field (a network written as layers) everywhere a field goes: its check and its
MLflow text, the rule between it and the MLP's fields, the ``train`` and ``gradcheck`` flags,
study files fixing and searching it (a real Optuna store sees each architecture as a choice),
``rerun`` reading it back, the memory estimate and the report's parameter count; and every bad
value refused with one line naming the token, the key and the file."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import tomli_w
from hypothesis import given, settings
from hypothesis import strategies as st

from research.arguments import build_parser
from research.cli import main
from research.engine.network import count_params, init_params
from research.experiment.config.fields import FIELDS, ConfigError, TrainConfig, with_values
from research.experiment.config.layers_field import EXAMPLE, MAX_LENGTH, layers_param_count
from research.experiment.config.presets import PRESETS, configure
from research.experiment.config.study_config import StudyConfigError, load_study_config

REPO = Path(__file__).resolve().parents[1]
MNIST_MLP = REPO / "experiments" / "mnist_mlp.toml"
MNIST_CNN = REPO / "experiments" / "mnist_cnn.toml"
FIELD = FIELDS["layers"]
SMALL_CNN = "conv(4,5) dense(16)"  # 4x24x24 after the conv, then 16 units


def one_line(error: BaseException) -> str:
    (line,) = str(error).splitlines()
    return line


# --- the field: its place in the table, its check and its text ----------------------------------


def test_the_field_is_a_text_in_the_model_group():
    assert FIELD.kind is str and FIELD.default == "" and FIELD.group == "model"
    assert FIELD.searchable and FIELD.column and FIELD.choices == ()
    assert TrainConfig().layers == "" and TrainConfig().network() is None
    assert TrainConfig().as_texts()["layers"] == ""
    assert list(FIELDS).index("layers") == list(FIELDS).index("hidden_sizes") + 1


#: Valid layers values, built from the tokens that need no image input.
TOKENS = st.one_of(
    st.integers(1, 64).map(lambda n: f"dense({n})"),
    st.sampled_from(["relu", "tanh", "sigmoid", "gelu", "swish", "layernorm", "batchnorm"]),
    st.sampled_from([0.0, 0.25, 0.5]).map(lambda rate: f"dropout({rate:g})"),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(TOKENS, min_size=1, max_size=5).map(" ".join))
def test_a_value_checks_and_reads_back_from_its_text(text):
    assert FIELD.check(text) == text
    assert FIELD.parse(FIELD.text(text)) == text
    config = TrainConfig(layers=text)
    assert TrainConfig.from_params(config.as_texts()) == (config, [])


def test_the_empty_value_is_the_mlp_and_any_other_a_network():
    assert FIELD.check("") == "" and FIELD.parse("") == ""
    config = TrainConfig(layers="dense(100)")
    network = config.network()
    assert network.describe() == "dense(100) relu dense(10)" and network.in_shape == (784,)
    assert config.describe_network() == "dense(100) relu dense(10)"
    assert TrainConfig().describe_network() == "784x256x10"  # the MLP, as before
    conv = TrainConfig(layers=SMALL_CNN, activation="tanh").network()
    assert conv.describe() == "conv(4,5) tanh dense(16) tanh dense(10)"
    assert conv.in_shape == (1, 28, 28) and conv.shapes[1] == (4, 24, 24)


@pytest.mark.parametrize("value", [5, 1.5, True, None, ["dense(10)"], b"dense(10)"])
def test_a_value_of_another_type_is_one_line(value):
    with pytest.raises(ConfigError) as caught:
        TrainConfig(layers=value)
    line = one_line(caught.value)
    assert line.startswith("layers = ") and ", not a string; allowed: hidden layers such as" in line


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("foo(3)", "unknown layer 'foo'; allowed: dense(units), conv(filters,kernel"),
        ("dense(100) fc(10)", "unknown layer 'fc'"),
        ("dense(0)", "dense's units=0 must be a whole number >= 1"),
        ("dense(1.5)", "dense's units=1.5 must be a whole number >= 1"),
        ("dense(wide)", "dense's argument 'wide' is not a number"),
        ("dense", "dense needs units: dense(units)"),
        ("conv(8)", "conv needs kernel: conv(filters,kernel[,stride[,pad]])"),
        ("dense(10", "dense( is not closed"),
        (" ", "it names no layer"),
        ("conv(8,29)", "conv(8,29): kernel 29 is larger than its 28x28 input"),
        ("conv(8,5) conv(8,25)", "conv(8,25): kernel 25 is larger than its 24x24 input"),
        ("dense(10) conv(4,3)", "conv(4,3): takes images (channels, height, width), got inputs "
                                "of shape (10,)"),
        ("dense(8) " * 200, f"1800 characters, more than {MAX_LENGTH}"),
    ],
    ids=["unknown", "unknown-later", "zero", "fraction", "word", "bare", "missing-kernel",
         "unclosed", "blank", "kernel-too-large", "kernel-too-large-later", "no-chain",
         "too-long"],
)  # fmt: skip
def test_a_bad_value_is_one_line_naming_the_token(text, problem):
    for check in (lambda: TrainConfig(layers=text), lambda: FIELD.parse(text)):
        with pytest.raises(ConfigError) as caught:
            check()
        line = one_line(caught.value)
        assert line.startswith("layers = ") and f": {problem}" in line, line
        assert "; allowed: " in line, line


# --- the rule between layers and the MLP's fields -----------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"), [("hidden_size", 512), ("n_hidden_layers", 2), ("hidden_sizes", (64,))]
)
def test_a_non_default_mlp_field_beside_layers_is_refused(name, value):
    with pytest.raises(ConfigError) as caught:
        TrainConfig(layers="dense(100)", **{name: value})
    line = one_line(caught.value)
    assert line.startswith(f"{name} = ") and (
        'conflicts with layers = "dense(100)", which defines the network' in line
    )
    assert "allowed: layers alone (hidden_size, n_hidden_layers, hidden_sizes stay at their " \
           "defaults, unused)" in line  # fmt: skip
    # at their defaults (as a logged run reads back) they are accepted, unused
    config = TrainConfig(layers="dense(100)", hidden_size=256, n_hidden_layers=1, hidden_sizes=())
    assert config.n_params() == 785 * 100 + 101 * 10


def test_given_layers_replace_the_network_of_the_values_under_them():
    origin = PRESETS["origin"]  # hidden_size 30, sigmoid, normal init
    config = configure(origin, layers="dense(20)")
    assert (config.layers, config.hidden_size, config.activation) == ("dense(20)", 256, "sigmoid")
    assert config.network().describe() == "dense(20) sigmoid dense(10)"
    # an MLP field given over a layers config replaces its layers
    assert configure(config, hidden_size=40).layers == ""
    assert configure(config, hidden_sizes=(8, 8)).spec().sizes == (784, 8, 8, 10)
    # an MLP field given beside layers is refused, even at its default (it would be unused)
    for name, value in (("hidden_size", 256), ("n_hidden_layers", 3), ("hidden_sizes", (64,))):
        with pytest.raises(ConfigError, match=rf"^{name} = .*: conflicts with layers = "):
            configure(origin, layers="dense(20)", **{name: value})
    # a layers value given as "" is the MLP of the fields given with it
    assert configure(config, layers="", hidden_size=32).spec().sizes == (784, 32, 10)
    # values read back from a run: the MLP's fields at their defaults, given, are fine
    assert with_values(TrainConfig(), config.as_params()) == config


# --- the flags ----------------------------------------------------------------------------------


def test_the_flag_shows_the_syntax_with_an_example():
    import argparse

    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    for command in ("train", "gradcheck"):  # gradcheck takes the model group's flags
        (action,) = [a for a in commands.choices[command]._actions if a.dest == "layers"]
        assert action.option_strings == ["--layers"] and action.type is str
        assert action.default is None and action.metavar == "LAYERS"
        assert f'--layers "{EXAMPLE}"' in action.help
        assert "conv(filters,kernel[,stride[,pad]])" in action.help and "res(" in action.help
    train = build_parser().parse_args(["train", "--layers", EXAMPLE])
    assert train.layers == EXAMPLE


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--layers", "foo(3)"], 'layers = "foo(3)": unknown layer \'foo\'; allowed: dense(units)'),
        (["--layers", "conv(8,29)"], "kernel 29 is larger than its 28x28 input"),
        (["--layers", "dense(64)", "--hidden", "32"],
         'hidden_size = 32: conflicts with layers = "dense(64)", which defines the network'),
        (["--layers", "dense(64)", "--hidden-sizes", "8"], "hidden_sizes = [8]: conflicts with"),
    ],
)  # fmt: skip
def test_a_bad_flag_is_one_line(argv, message, capsys):
    assert main(["train", *argv, "--no-track"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid training configuration: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_the_module_entry_point_refuses_a_bad_layers_value_without_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "research", "train", "--layers", "foo(3)", "--no-track"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith('error: invalid training configuration: layers = "foo(3)": unknown ')


def test_gradcheck_hands_a_layers_network_to_the_network_check(monkeypatch, capsys):
    """``gradcheck --layers`` calls research.verify.layer_check.gradcheck_network with the
    network, the dtype, the seed, the batch and the tolerances, and prints its rows."""
    from research.verify import layer_check
    from research.verify.compare import ArrayCheck

    calls: list[dict[str, Any]] = []

    def fake(network, dtype, seed, x, labels, rtol=None, atol=None):
        calls.append(dict(network=network, dtype=dtype, seed=seed, x=x, labels=labels,
                          rtol=rtol, atol=atol))  # fmt: skip
        return [ArrayCheck("loss", (), 0.0, 0.0), ArrayCheck("layer 0 conv(4,5) W", (4,), 0, 0)]

    monkeypatch.setattr(layer_check, "gradcheck_network", fake, raising=False)
    argv = ["gradcheck", "--synthetic", "--batch-size", "8", "--layers", SMALL_CNN, "--seed", "3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    (call,) = calls
    # the origin preset's network flags: sigmoid after every conv and dense, squared error
    assert call["network"].describe() == "conv(4,5) sigmoid dense(16) sigmoid dense(10)"
    assert (call["dtype"], call["seed"], call["rtol"], call["atol"]) == ("float64", 3, None, None)
    assert call["x"].shape == (8, 784) and call["labels"].shape == (8,)
    assert out.startswith(
        "gradcheck: conv(4,5) sigmoid dense(16) sigmoid dense(10) sigmoid/mse l2=0, float64, "
        "normal init (seed 3), on a random batch"
    )
    assert "all 2 arrays agree" in out


# --- study files ---------------------------------------------------------------------------------


def study_file(folder: Path, fixed: dict[str, Any], search: dict[str, Any], **study: Any) -> Path:
    """A small study file: ``fixed`` and ``search`` on the default preset."""
    doc = {
        "study": {"name": "nets", "objective": "val/accuracy", "n_trials": 3, **study},
        "fixed": {"epochs": 1, **fixed},
        "search": search,
    }
    path = folder / "nets.toml"
    path.write_text(tomli_w.dumps(doc))
    return path


ARCHITECTURES = ["dense(32)", "conv(4,5) dense(16)", "dense(24) dense(12)"]
SEARCHED = {"layers": {"type": "categorical", "choices": ARCHITECTURES}}
RATE = {"learning_rate": {"type": "float", "low": 0.01, "high": 0.1, "log": True}}


def test_a_study_fixes_layers(tmp_path):
    config = load_study_config(study_file(tmp_path, {"layers": SMALL_CNN}, RATE, preset="origin"))
    assert config.fixed["layers"] == SMALL_CNN
    # the preset's MLP (hidden_size 30) is dropped: the parent logs no fixed.hidden_size
    assert not {"hidden_size", "n_hidden_layers", "hidden_sizes"} & set(config.fixed)
    trial = config.train_config({"learning_rate": 0.05})
    assert trial.layers == SMALL_CNN and trial.hidden_size == 256
    assert trial.network().describe() == "conv(4,5) sigmoid dense(16) sigmoid dense(10)"


def test_a_study_searches_architectures_in_a_real_optuna_store(tmp_path):
    import optuna

    from research.experiment.studies.optuna_study import distribution, suggest

    config = load_study_config(study_file(tmp_path, {}, {**SEARCHED, **RATE}))
    layers = config.search[0]
    assert layers.choices == tuple(ARCHITECTURES)
    assert layers.as_dict() == {"name": "layers", "type": "categorical", "choices": ARCHITECTURES}
    assert distribution(layers).choices == tuple(ARCHITECTURES)
    assert not {"hidden_size", "n_hidden_layers", "hidden_sizes"} & set(config.fixed)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "optuna.journal"))
    )
    study = optuna.create_study(
        study_name="nets", storage=storage, sampler=optuna.samplers.RandomSampler(seed=0)
    )
    study.enqueue_trial({"layers": "conv(4,5) dense(16)"})
    for _ in range(4):
        trial = study.ask()
        suggested = {param.name: suggest(trial, param) for param in config.search}
        study.tell(trial, 0.5)
        assert trial.params == suggested and suggested["layers"] in ARCHITECTURES
    stored = optuna.load_study(study_name="nets", storage=storage).trials
    assert stored[0].params["layers"] == "conv(4,5) dense(16)"
    assert {t.params["layers"] for t in stored} <= set(ARCHITECTURES)
    for record in stored:  # every stored trial's params make its TrainConfig
        trial_config = config.train_config(record.params)
        assert trial_config.layers == record.params["layers"]
        assert trial_config.learning_rate == record.params["learning_rate"]
        assert trial_config.n_params() == layers_param_count(record.params["layers"])


L2 = {"l2": {"type": "float", "low": 0, "high": 1}}


@pytest.mark.parametrize(
    ("fixed", "search", "start", "also"),
    [
        ({}, {"layers": {"type": "categorical", "choices": ["dense(8)", "foo(3)"]}},
         "search.layers.choices[1] = \"foo(3)\": unknown layer 'foo'", "dense(units), conv("),
        ({}, {"layers": {"type": "categorical", "choices": ["dense(8)", "conv(4,29)"]}},
         "search.layers.choices[1] = \"conv(4,29)\": conv(4,29): kernel 29 is larger", "hidden"),
        ({}, {"layers": {"type": "categorical", "choices": ["", "dense(8)"]}},
         'search.layers.choices[0] = "": the MLP ("", the default) is not a choice of layers',
         'write the MLP as layers, e.g. "dense(256)"'),
        ({}, {"layers": {"type": "categorical", "choices": ["dense(8)", 8]}},
         "search.layers.choices[1] = 8: an integer, not a string", "hidden layers such as"),
        ({}, {"layers": {"type": "categorical", "choices": ["dense(8)"]}},
         "search.layers.choices = [\"dense(8)\"]: a single choice is not a search", "at least two"),
        ({"layers": "dense(8) flat"}, L2,
         'fixed.layers = "dense(8) flat": unknown layer \'flat\'', "flatten"),
        ({"layers": ["dense(8)"]}, L2, 'fixed.layers = ["dense(8)"]: an array, not a string', ""),
        ({"layers": "dense(8)", "hidden_size": 64}, L2,
         'fixed.hidden_size = 64: conflicts with fixed.layers = "dense(8)", which defines the '
         "network", "layers alone"),
        ({"n_hidden_layers": 1}, SEARCHED,
         'fixed.n_hidden_layers = 1: conflicts with search.layers = ["dense(32)", ',
         "layers alone"),
        ({}, {**SEARCHED, "hidden_size": {"type": "int", "low": 16, "high": 64}},
         "search.hidden_size: cannot be searched with search.layers, which defines the network",
         "search layers alone"),
        ({"layers": "dense(8)"}, {"hidden_sizes": {"type": "categorical", "choices": [[8], [16]]}},
         "search.hidden_sizes: cannot be searched with fixed.layers", "search layers alone"),
    ],
    ids=["unknown", "kernel", "empty-choice", "not-text", "single", "fixed-unknown",
         "fixed-array", "fixed-size", "fixed-depth-vs-searched", "searched-size",
         "searched-widths"],
)  # fmt: skip
def test_a_bad_study_is_one_line_naming_the_file_and_key(tmp_path, fixed, search, start, also):
    path = study_file(tmp_path, fixed, search)
    with pytest.raises(StudyConfigError) as caught:
        load_study_config(path)
    line = one_line(caught.value)
    assert line.startswith(f"{path}: ") and start in line, line
    assert also in line.split("; allowed: ", 1)[1], line


def test_a_bad_study_through_the_command_line_is_one_line(tmp_path, capsys):
    choices = {"layers": {"type": "categorical", "choices": ["dense(8)", "foo(3)"]}}
    path = study_file(tmp_path, {}, choices)
    store = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    assert main(["study", str(path), "--tracking-uri", store]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f'error: {path}: search.layers.choices[1] = "foo(3)": unknown layer')


def test_the_shipped_cnn_study_searches_architectures():
    config = load_study_config(MNIST_CNN)
    assert config.search_names == ("layers", "learning_rate", "l2")
    for choice in config.search[0].choices:
        network = config.train_config({"layers": choice, "learning_rate": 0.01, "l2": 0.0})
        assert network.network().in_shape == (1, 28, 28)


def test_the_default_study_is_unchanged_but_for_an_empty_layers():
    """The default study: the same search space and fixed values as before the field, so the
    sampler draws the same 20 trials; each trial's MLflow params gain ``layers = ""``."""
    config = load_study_config(MNIST_MLP)
    assert [param.as_dict() for param in config.search] == [
        {"name": "hidden_size", "type": "int", "low": 64, "high": 1024, "log": True},
        {"name": "learning_rate", "type": "float", "low": 0.01, "high": 0.5, "log": True},
        {"name": "batch_size", "type": "categorical", "choices": [64, 128, 256]},
        {"name": "l2", "type": "categorical", "choices": [0.0, 1e-5, 1e-4]},
    ]
    assert config.fixed["layers"] == "" and config.fixed["hidden_sizes"] == ()
    trial = config.train_config(
        {"hidden_size": 300, "learning_rate": 0.05, "batch_size": 128, "l2": 1e-5}
    )
    assert trial.network() is None and trial.spec().sizes == (784, 300, 10)
    assert trial.n_params() == trial.spec().n_params == 784 * 300 + 300 + 3010
    texts = trial.as_texts()
    assert texts["layers"] == "" and texts["hidden_size"] == "300"


# --- rerun, memory and the report ---------------------------------------------------------------


def test_rerun_reads_a_layers_run_back_from_its_params():
    from research.experiment.reproduction.rerun import RerunError, _read_back
    from research.experiment.tracking.results import LoggedRun

    config = configure(PRESETS["default"], layers=SMALL_CNN, activation="tanh", epochs=2)
    params = {**config.as_texts(), "sizes": "[784, 256, 10]", "n_train_rows": "500"}
    histories = {key: [(0, 0.5), (1, 0.4)] for key in ("train/loss", "val/loss", "val/accuracy")}
    rerun, missing, _, _ = _read_back(LoggedRun("run1", params, {}, histories))
    assert rerun.config == config and missing == [] and rerun.n_rows == 500
    assert rerun.config.network().describe() == "conv(4,5) tanh dense(16) tanh dense(10)"
    # a run logged before the field existed is the MLP
    older = {k: v for k, v in params.items() if k != "layers"}
    rerun, missing, _, _ = _read_back(LoggedRun("run2", older, {}, histories))
    assert missing == ["layers"] and rerun.config.layers == ""
    for change, message in (
        ({"layers": "conv(4,40)"}, 'layers = "conv(4,40)": conv(4,40): kernel 40 is larger'),
        ({"layers": "foo"}, 'layers = "foo": unknown layer'),
        ({"hidden_size": "64"}, 'hidden_size = 64: conflicts with layers = "conv(4,5) dense(16)"'),
    ):
        with pytest.raises(RerunError) as caught:
            _read_back(LoggedRun("run3", {**params, **change}, {}, histories))
        assert one_line(caught.value).startswith(
            f"run run3 cannot be rerun: its params give {message}"
        )


def test_the_parameter_count_comes_from_the_layers_without_drawing_them():
    for text in ("dense(100)", SMALL_CNN, "conv(4,3,1,1) batchnorm res(conv(4,3,1,1) relu) "
                 "layernorm dropout dense(8)"):  # fmt: skip
        config = TrainConfig(layers=text)
        drawn = count_params(init_params(config.network(), 0, np.float32))
        assert config.n_params() == layers_param_count(text) == drawn, text
    # far too large to draw, counted all the same
    huge = TrainConfig(layers="dense(1000000000)")
    assert huge.n_params() == 785 * 10**9 + (10**9 + 1) * 10


def test_the_memory_check_estimates_a_layers_network(tmp_path):
    from research.experiment.config.resources import check_memory, check_study_memory, worst_case

    check_memory(TrainConfig(layers=SMALL_CNN), 50_000)
    with pytest.raises(ConfigError) as caught:
        check_memory(TrainConfig(layers="dense(1000000000)"), 50_000)
    line = one_line(caught.value)
    assert line.startswith('the network layers "dense(1000000000)" (float32, momentum, ')
    assert "fewer or narrower layers (filters, units) or batch_size" in line
    wide = {"layers": {"type": "categorical", "choices": ["dense(8)", "conv(64,3) dense(8)"]}}
    config = load_study_config(study_file(tmp_path, {}, wide))
    assert worst_case(config).layers == "conv(64,3) dense(8)"
    with pytest.raises(ConfigError) as caught:
        check_study_memory(config, 50_000, workers=1, available=(2**20, "a test"))
    line = one_line(caught.value)
    assert 'the study\'s largest trial (layers = "conv(64,3) dense(8)", float32)' in line


def test_the_report_counts_a_layers_run_from_its_layers():
    from analysis.store import n_params_of_run, search_dimensions, trials_frame

    runs = pd.DataFrame(
        {
            "run_id": ["a", "b", "c", "d"],
            "tags.research.trial_number": ["0", "1", "2", "3"],
            "tags.research.state": ["COMPLETE"] * 4,
            # what each run logged: an MLP, two layers runs (their sizes are the MLP fields'
            # unused defaults), and an MLP run logged before the layers field existed
            "params.sizes": ["[784, 30, 10]", "[784, 256, 10]", "[784, 256, 10]", "[784, 8, 10]"],
            "params.layers": ["", "dense(100)", SMALL_CNN, np.nan],
        }
    )
    space = [{"name": "layers", "type": "categorical", "choices": ["dense(100)", SMALL_CNN]}]
    frame = trials_frame(runs, search_dimensions(space))
    cnn = TrainConfig(layers=SMALL_CNN).n_params()
    assert cnn == 4 * 26 + (4 * 24 * 24 + 1) * 16 + 17 * 10
    assert list(frame["n_params"]) == [784 * 30 + 30 + 310, 79_510, cnn, 784 * 8 + 8 + 90]
    assert list(frame["layers"]) == ["", "dense(100)", SMALL_CNN, None] or math.isnan(
        frame["layers"].iloc[3]
    )
    assert n_params_of_run("[784, 30, 10]", "not a network") is pd.NA


# --- end to end ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_layers_run_logs_reruns_and_a_study_counts_its_parameters(tmp_path, capsys):
    """``train --layers`` logs the field as a param and the network's parameter count, ``rerun``
    reproduces it from its params, and a study searching layers gives each trial's count in the
    report's table of trials."""
    from mlflow.tracking import MlflowClient

    from analysis.store import load_study_results

    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    text = "conv(2,5) maxpool(2) dense(8)"
    argv = ["train", "--layers", text, "--subset", "300", "--epochs", "1", "--batch-size", "50",
            "--quiet", "--tracking-uri", uri, "--experiment", "layers-train"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    count = layers_param_count(text)
    assert out.startswith(
        "training conv(2,5) relu maxpool(2) dense(8) relu dense(10) softmax/cross_entropy, "
    )
    assert f"{count:,} parameters" in out
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("layers-train").experiment_id])
    assert run.data.params["layers"] == text and run.data.params["hidden_size"] == "256"
    assert run.data.metrics["n_params"] == count
    assert main(["rerun", run.info.run_id, "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "reproduced exactly: 1 epochs x 3 metrics identical" in out and "note:" not in out

    choices = ["dense(8)", text]
    path = study_file(tmp_path, {"batch_size": 50},
                      {"layers": {"type": "categorical", "choices": choices}},
                      n_trials=2, sampler="random", pruner="none")  # fmt: skip
    argv = ["study", str(path), "--subset", "300", "--tracking-uri", uri, "--quiet", "--no-final"]
    assert main(argv) == 0
    capsys.readouterr()
    trials = load_study_results("nets", uri).trials
    assert len(trials) == 2 and set(trials["layers"]) <= set(choices)
    for layers, n_params in zip(trials["layers"], trials["n_params"]):
        assert n_params == layers_param_count(layers) != TrainConfig().n_params()
