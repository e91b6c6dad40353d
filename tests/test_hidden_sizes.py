"""Per-layer widths: the ``hidden_sizes`` field, beside the ``hidden_size`` × ``n_hidden_layers``
shorthand, everywhere a field goes: its check and its MLflow text, the rule between the two
spellings, the ``train`` and ``gradcheck`` flags, study files fixing and searching it (Optuna
sees each list as its text), the memory estimate, and end to end (slow): a ``train`` run, a
study, ``rerun`` of both and the report, and a run logged before the field existed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from helpers import copy_run
from hypothesis import given, settings
from hypothesis import strategies as st

from research.arguments import build_parser
from research.cli import main
from research.experiment.config.fields import (
    FIELDS,
    MAX_HIDDEN_LAYERS,
    MAX_HIDDEN_SIZE,
    ConfigError,
    TrainConfig,
)
from research.experiment.config.presets import PRESETS, configure, preset
from research.experiment.config.search_space import SearchParam
from research.experiment.config.study_config import StudyConfigError, load_study_config

FIELD = FIELDS["hidden_sizes"]
ALLOWED = "a list of 1 to 32 integers, each from 1 to 65536"
WIDTHS = st.lists(st.integers(1, MAX_HIDDEN_SIZE), min_size=1, max_size=MAX_HIDDEN_LAYERS)


def one_line(error: BaseException) -> str:
    (line,) = str(error).splitlines()
    return line


# --- the field: its check, its text, its place in the table -------------------------------------


def test_the_field_is_a_list_of_widths_in_the_table():
    assert FIELD.kind is tuple and FIELD.default == () and FIELD.group == "model"
    assert FIELD.searchable and FIELD.max_items == MAX_HIDDEN_LAYERS
    assert FIELD.allowed == f"{ALLOWED}, or [] (the default)"
    assert FIELD.allowed_items == ALLOWED
    assert list(FIELDS).index("hidden_sizes") == list(FIELDS).index("n_hidden_layers") + 1
    assert TrainConfig().hidden_sizes == () and TrainConfig().as_texts()["hidden_sizes"] == "[]"


@settings(max_examples=200, deadline=None)
@given(WIDTHS, st.booleans())
def test_a_list_checks_and_reads_back_from_its_text(widths, as_tuple):
    value = FIELD.check(tuple(widths) if as_tuple else widths)
    assert value == tuple(widths)
    text = FIELD.text(value)
    assert text == str(widths) == json.dumps(widths)  # "[1024, 512]", as TOML writes it too
    assert FIELD.parse(text) == value
    assert FIELD.parse(str(value)) == value  # a tuple's text, "(1024, 512)", reads back too

    config = TrainConfig(hidden_sizes=widths)
    assert config.spec().sizes == (784, *widths, 10)
    assert (config.hidden_size, config.n_hidden_layers) == (max(widths), len(widths))
    assert TrainConfig.from_params(config.as_texts()) == (config, [])


BAD_LISTS = st.one_of(
    # an item out of range, a float, a boolean or a text among good widths
    st.tuples(
        st.lists(st.integers(1, 64), max_size=4),
        st.one_of(
            st.integers(max_value=0),
            st.integers(min_value=MAX_HIDDEN_SIZE + 1),
            st.floats(allow_nan=True),
            st.booleans(),
            st.text(max_size=5),
            st.none(),
        ),
        st.lists(st.integers(1, 64), max_size=4),
    ).map(lambda parts: [*parts[0], parts[1], *parts[2]]),
    st.lists(st.integers(1, 64), min_size=MAX_HIDDEN_LAYERS + 1, max_size=40),  # too many
    st.one_of(st.integers(), st.floats(), st.text(max_size=8), st.booleans()),  # not a list
)


@settings(max_examples=200, deadline=None)
@given(BAD_LISTS)
def test_a_bad_list_is_one_line_naming_the_field(value):
    with pytest.raises(ConfigError) as caught:
        FIELD.check(value, "fixed.hidden_sizes")
    line = one_line(caught.value)
    assert line.startswith("fixed.hidden_sizes = "), line
    assert line.endswith(f"; allowed: {ALLOWED}, or [] (the default)"), line
    with pytest.raises(ConfigError) as caught:
        TrainConfig(hidden_sizes=value)
    assert one_line(caught.value).startswith("hidden_sizes = ")


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ([1024, 0], "hidden_sizes = [1024, 0]: item 2 (0) is out of range"),
        ([1024, 1.5], "hidden_sizes = [1024, 1.5]: item 2 (1.5) is a float, not an integer"),
        ([512.0], "hidden_sizes = [512.0]: item 1 (512.0) is a float, not an integer"),
        ([True], "hidden_sizes = [true]: item 1 (true) is a boolean, not an integer"),
        (["64"], 'hidden_sizes = ["64"]: item 1 ("64") is a string, not an integer'),
        ("512,512", 'hidden_sizes = "512,512": a string, not a list'),
        (512, "hidden_sizes = 512: an integer, not a list"),
        ([8] * 33, "33 items, more than 32"),
    ],
)
def test_each_bad_list_says_what_is_wrong(value, problem):
    with pytest.raises(ConfigError) as caught:
        FIELD.check(value)
    assert problem in one_line(caught.value)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[0]", "item 1 (0) is out of range"),
        ("[1e3]", "item 1 (1000.0) is a float"),
        ("wide", '"wide": not a list'),
        ("5", '"5": not a list'),
        ("{1, 2}", "not a list"),
        ("[" * 300 + "]" * 300, "not a list"),
    ],
)
def test_a_logged_text_that_is_no_list_is_one_line(text, problem):
    with pytest.raises(ConfigError) as caught:
        FIELD.parse(text)
    assert problem in one_line(caught.value)


# --- the two spellings -------------------------------------------------------------------------


def test_hidden_sizes_defines_the_network_and_sets_the_shorthand():
    config = TrainConfig(hidden_sizes=(64, 256, 32))
    assert (config.hidden_size, config.n_hidden_layers) == (256, 3)
    assert config.spec().sizes == (784, 64, 256, 32, 10)
    assert TrainConfig(hidden_size=256, n_hidden_layers=3, hidden_sizes=(64, 256, 32)) == config
    # the default list: the shorthand, as before
    assert TrainConfig(hidden_size=30, n_hidden_layers=2).spec().sizes == (784, 30, 30, 10)
    for changed, message in (
        ({"hidden_size": 512}, "hidden_size = 512: conflicts with hidden_sizes = [64, 256, 32] "
                               "(its widest layer is 256), which defines the network"),
        ({"n_hidden_layers": 2}, "n_hidden_layers = 2: conflicts with hidden_sizes = [64, 256, "
                                 "32] (3 layers), which defines the network"),
    ):  # fmt: skip
        with pytest.raises(ConfigError) as caught:
            TrainConfig(hidden_sizes=(64, 256, 32), **changed)
        line = one_line(caught.value)
        assert line.startswith(message), line
        assert line.endswith(
            "; allowed: hidden_sizes alone (it sets "
            f"{next(iter(changed))}), or hidden_size and n_hidden_layers without hidden_sizes"
        ), line


def test_given_values_replace_the_network_of_the_values_under_them():
    origin = PRESETS["origin"]  # hidden_size 30: not the user's choice
    widths = configure(origin, hidden_sizes=(64, 32))
    assert widths.spec().sizes == (784, 64, 32, 10) and widths.activation == "sigmoid"
    assert preset("origin", hidden_sizes=(64, 32)) == widths
    # the shorthand given replaces a list under it
    assert configure(widths, n_hidden_layers=3).spec().sizes == (784, 64, 64, 64, 10)
    assert configure(widths, hidden_size=16).spec().sizes == (784, 16, 16, 10)
    # given together, they must agree, even at the shorthand's defaults
    assert configure(origin, hidden_sizes=(8, 8), n_hidden_layers=2, hidden_size=8).hidden_size == 8
    for shorthand in ({"hidden_size": 256}, {"n_hidden_layers": 1}):
        with pytest.raises(ConfigError, match="conflicts with hidden_sizes = \\[64, 32\\]"):
            configure(PRESETS["default"], hidden_sizes=(64, 32), **shorthand)
    # an empty list given is the shorthand
    assert configure(origin, hidden_sizes=()) == origin


# --- the flags ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "words",
    [["1024", "512", "256"], ["1024,512,256"], ["1024,512", "256"]],
    ids=["words", "commas", "both"],
)
def test_the_flag_takes_words_or_commas(words):
    args = build_parser().parse_args(["train", "--hidden-sizes", *words])
    assert args.hidden_sizes == (1024, 512, 256)
    assert build_parser().parse_args(["train"]).hidden_sizes is None  # the preset's stays
    args = build_parser().parse_args(["gradcheck", "--hidden-sizes", *words])
    assert args.hidden_sizes == (1024, 512, 256)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--hidden-sizes", "64", "0"], "hidden_sizes = [64, 0]: item 2 (0) is out of range"),
        (["--hidden-sizes", "64,1.5"], "item 2 (1.5) is a float, not an integer"),
        (["--hidden-sizes", "wide"], 'item 1 ("wide") is a string, not an integer'),
        (["--hidden-sizes", "64,"], 'item 2 ("") is a string'),
        (["--hidden-sizes", ",".join(["8"] * 33)], "33 items, more than 32"),
        (["--hidden-sizes", "64", "64", "--hidden", "32"], "hidden_size = 32: conflicts with"),
        (["--hidden-sizes", "64", "64", "--n-hidden-layers", "1"], "n_hidden_layers = 1: confl"),
    ],
)
def test_a_bad_flag_is_one_line(argv, message, capsys):
    assert main(["train", *argv, "--no-track"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid training configuration: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_gradcheck_checks_unequal_widths(capsys):
    argv = ["gradcheck", "--synthetic", "--batch-size", "16", "--hidden-sizes", "7", "3", "5"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("gradcheck: 784x7x3x5x10 sigmoid/sigmoid/mse")  # the origin preset's
    assert "all 9 arrays agree" in out  # the loss, then W and b of 4 layers
    assert main([*argv[:-3], "4,9", "--activation", "relu", "--output", "softmax", "--loss",
                 "cross_entropy", "--l2", "0.01"]) == 0  # fmt: skip
    assert "784x4x9x10 relu/softmax/cross_entropy" in capsys.readouterr().out


# --- study files ---------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
MNIST_MLP = REPO / "experiments" / "mnist_mlp.toml"


def study_file(folder: Path, fixed: dict[str, Any], search: dict[str, Any], **study: Any) -> Path:
    """A small study file: ``fixed`` and ``search`` on the default preset."""
    doc = {
        "study": {"name": "widths", "objective": "val/accuracy", "n_trials": 3, **study},
        "fixed": {"epochs": 1, **fixed},
        "search": search,
    }
    path = folder / "widths.toml"
    path.write_text(tomli_w.dumps(doc))
    return path


CHOICES = [[32, 16], [48, 48, 48], [64]]
L2 = {"type": "float", "low": 0, "high": 1}
SEARCHED = {"hidden_sizes": {"type": "categorical", "choices": CHOICES}}


def test_a_study_searches_lists_of_widths(tmp_path):
    config = load_study_config(study_file(tmp_path, {}, SEARCHED))
    (param,) = config.search
    assert param.choices == ((32, 16), (48, 48, 48), (64,))
    assert param.as_dict() == {"name": "hidden_sizes", "type": "categorical", "choices": CHOICES}
    # Optuna sees each list as its text (the MLflow param's), under the field's name
    assert param.optuna_choices() == ["[32, 16]", "[48, 48, 48]", "[64]"]
    assert [param.value(text) for text in param.optuna_choices()] == list(param.choices)
    # the shorthand follows each trial's list: neither fixed nor searched
    assert "hidden_size" not in config.fixed and "n_hidden_layers" not in config.fixed
    trial = config.train_config({"hidden_sizes": "[48, 48, 48]"})
    assert trial.spec().sizes == (784, 48, 48, 48, 10) and trial.n_hidden_layers == 3
    assert config.train_config({"hidden_sizes": (64,)}).spec().sizes == (784, 64, 10)
    # a [fixed] value of the shorthand that agrees with every list stays
    agreeing = {"type": "categorical", "choices": [[64, 16], [16, 64]]}
    both = load_study_config(
        study_file(tmp_path, {"hidden_size": 64, "n_hidden_layers": 2}, {"hidden_sizes": agreeing})
    )
    assert both.fixed["hidden_size"] == 64 and both.fixed["n_hidden_layers"] == 2
    assert both.train_config({"hidden_sizes": "[16, 64]"}).spec().sizes == (784, 16, 64, 10)


def test_a_study_fixes_a_list_of_widths(tmp_path):
    search = {"learning_rate": {"type": "float", "low": 0.01, "high": 0.1}}
    config = load_study_config(study_file(tmp_path, {"hidden_sizes": [64, 128]}, search))
    assert config.fixed["hidden_sizes"] == (64, 128)
    # the preset's shorthand is set from the list, so the parent run's fixed.* params agree
    assert (config.fixed["hidden_size"], config.fixed["n_hidden_layers"]) == (128, 2)
    trial = config.train_config({"learning_rate": 0.05})
    assert trial.spec().sizes == (784, 64, 128, 10)
    # from the origin preset (hidden_size 30) too
    origin = load_study_config(
        study_file(tmp_path, {"hidden_sizes": [64]}, search, preset="origin")
    )
    assert origin.fixed["hidden_size"] == 64 and origin.train_config({"learning_rate": 0.05})


@pytest.mark.parametrize(
    ("fixed", "search", "start", "also"),
    [
        ({}, {"hidden_sizes": {"type": "categorical", "choices": [[], [64]]}},
         "search.hidden_sizes.choices[0] = []: an empty list (the default) is not a choice",
         ALLOWED),
        ({}, {"hidden_sizes": {"type": "categorical", "choices": [[64, 0], [64]]}},
         "search.hidden_sizes.choices[0] = [64, 0]: item 2 (0) is out of range", ALLOWED),
        ({}, {"hidden_sizes": {"type": "categorical", "choices": [[64], [64]]}},
         "search.hidden_sizes.choices = [[64], [64]]: [64] appears more than once", "distinct"),
        ({}, {"hidden_sizes": {"type": "categorical", "choices": [[64]]}},
         "search.hidden_sizes.choices = [[64]]: a single choice is not a search",
         f"at least two distinct values, each {ALLOWED}"),
        ({}, {"hidden_sizes": {"type": "categorical", "choices": [64, 128]}},
         "search.hidden_sizes.choices[0] = 64: an integer, not a list", ALLOWED),
        ({}, {"hidden_sizes": {"type": "int", "low": 1, "high": 2}},
         'search.hidden_sizes.type = "int": not a search type for hidden_sizes', '"categorical"'),
        ({"n_hidden_layers": 1}, SEARCHED,
         "fixed.n_hidden_layers = 1: conflicts with search.hidden_sizes.choices[0] = [32, 16] "
         "(2 layers), which defines the network", "hidden_sizes alone (it sets n_hidden_layers)"),
        ({"hidden_size": 64, "hidden_sizes": [32, 16]}, {"l2": L2},
         "fixed.hidden_size = 64: conflicts with fixed.hidden_sizes = [32, 16] (its widest "
         "layer is 32)", "hidden_sizes alone"),
        ({}, {**SEARCHED, "n_hidden_layers": {"type": "int", "low": 1, "high": 3}},
         "search.n_hidden_layers: cannot be searched with search.hidden_sizes, which defines the "
         "network", "search hidden_sizes alone"),
        ({"hidden_sizes": [64, 64]}, {"hidden_size": {"type": "int", "low": 16, "high": 64}},
         "search.hidden_size: cannot be searched with fixed.hidden_sizes", "search hidden_sizes"),
        ({"hidden_sizes": "64,64"}, {"l2": L2},
         'fixed.hidden_sizes = "64,64": a string, not a list', ALLOWED),
        ({"hidden_sizes": [64.0]}, {"l2": L2},
         "fixed.hidden_sizes = [64.0]: item 1 (64.0) is a float, not an integer", ALLOWED),
        ({"hidden_sizes": [8] * 33}, {"l2": L2},
         "33 items, more than 32", ALLOWED),
    ],
    ids=["empty-choice", "zero-width", "duplicate", "single", "not-lists", "range",
         "fixed-layers-vs-searched", "fixed-size-vs-fixed", "searched-layers-too",
         "searched-size-vs-fixed", "string", "float", "too-many"],
)  # fmt: skip
def test_a_bad_study_is_one_line(tmp_path, fixed, search, start, also):
    path = study_file(tmp_path, fixed, search)
    with pytest.raises(StudyConfigError) as caught:
        load_study_config(path)
    line = one_line(caught.value)
    assert line.startswith(f"{path}: ") and start in line, line
    allowed = line.split("; allowed: ", 1)[1]
    assert also in allowed, line
    if "search.hidden_sizes.choices" in start:
        assert "[] (the default)" not in allowed, line  # an empty list is no choice


def test_the_memory_check_takes_the_list_that_needs_the_most(tmp_path):
    from research.experiment.config.resources import check_memory, check_study_memory, worst_case

    wide = {"type": "categorical", "choices": [[64, 64, 64], [4096, 16], [512]]}
    config = load_study_config(study_file(tmp_path, {}, {"hidden_sizes": wide}))
    assert worst_case(config).hidden_sizes == (4096, 16)  # 3.3 million weights
    check_study_memory(config, 50_000, workers=1)
    with pytest.raises(ConfigError) as caught:
        check_study_memory(config, 50_000, workers=1, available=(2**20, "a test"))
    line = one_line(caught.value)
    assert "the study's largest trial (hidden_sizes = [4096, 16], a 784x4096x16x10 network" in line
    assert "smaller hidden_sizes or batch_size" in line
    with pytest.raises(ConfigError, match=r"^the network 784x65536x65536x10 .* smaller hidden_s"):
        check_memory(TrainConfig(hidden_sizes=(65536, 65536)), 50_000)


def test_optuna_suggests_the_lists_as_text(tmp_path):
    import optuna

    from research.experiment.studies.optuna_study import distribution, suggest

    config = load_study_config(study_file(tmp_path, {}, SEARCHED))
    (param,) = config.search
    assert distribution(param).choices == ("[32, 16]", "[48, 48, 48]", "[64]")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial({"hidden_sizes": "[48, 48, 48]"})
    trial = study.ask()
    suggested = {"hidden_sizes": suggest(trial, param)}
    assert trial.params == suggested == {"hidden_sizes": "[48, 48, 48]"}
    assert config.train_config(trial.params).hidden_sizes == (48, 48, 48)


def test_the_shipped_studies_still_use_the_shorthand():
    config = load_study_config(MNIST_MLP)
    assert config.fixed["hidden_sizes"] == () and "hidden_size" in config.search_names
    assert SearchParam("hidden_size", "int", low=64, high=1024).kind == "int"


# --- end to end ----------------------------------------------------------------------------------


def sqlite_uri(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}"


@pytest.mark.slow
def test_train_logs_the_widths_and_rerun_reproduces_them(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from research.experiment.tracking.weights import load_weights

    uri = sqlite_uri(tmp_path)
    argv = ["train", "--subset", "500", "--epochs", "2", "--batch-size", "50", "--quiet",
            "--tracking-uri", uri, "--experiment", "widths"]  # fmt: skip
    assert main([*argv, "--hidden-sizes", "32,16", "24"]) == 0
    out = capsys.readouterr().out
    assert "training 784x32x16x24x10 relu/softmax/cross_entropy" in out
    assert main([*argv, "--hidden", "8", "--n-hidden-layers", "2"]) == 0  # the shorthand
    capsys.readouterr()

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("widths").experiment_id
    shorthand_run, widths_run = client.search_runs([experiment], order_by=["start_time DESC"])
    params = widths_run.data.params
    assert (params["hidden_sizes"], params["hidden_size"], params["n_hidden_layers"]) == (
        "[32, 16, 24]", "32", "3")  # fmt: skip
    assert params["sizes"] == "[784, 32, 16, 24, 10]"
    spec, _ = load_weights(Path(client.download_artifacts(widths_run.info.run_id, "weights.npz",
                                                          str(tmp_path))))  # fmt: skip
    assert spec.sizes == (784, 32, 16, 24, 10)
    params = shorthand_run.data.params
    assert (params["hidden_sizes"], params["hidden_size"], params["n_hidden_layers"]) == (
        "[]", "8", "2")  # fmt: skip

    for run in (widths_run, shorthand_run):
        assert main(["rerun", run.info.run_id, "--tracking-uri", uri]) == 0
        out = capsys.readouterr().out
        assert "reproduced exactly: 2 epochs x 3 metrics identical" in out and "note:" not in out

    # a run logged before the field existed: the shorthand, with a note
    older = copy_run(client, shorthand_run, experiment, drop=("hidden_sizes",))
    assert main(["rerun", older, "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "note: the run did not log hidden_sizes (it predates them): using their defaults " \
           "hidden_sizes=[]" in out  # fmt: skip
    assert "reproduced exactly: 2 epochs x 3 metrics identical" in out

    # hand-edited params: one line naming the run and the param
    for change, message in (
        ({"hidden_sizes": "[32, 0, 24]"}, "hidden_sizes = [32, 0, 24]: item 2 (0) is out of range"),
        ({"hidden_sizes": "wide"}, 'hidden_sizes = "wide": not a list'),
        ({"n_hidden_layers": "2"}, "n_hidden_layers = 2: conflicts with hidden_sizes"),
    ):
        edited = copy_run(client, widths_run, experiment, change=change)
        assert main(["rerun", edited, "--tracking-uri", uri]) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith(f"error: run {edited} cannot be rerun: its params give {message}")


@pytest.mark.slow
def test_a_study_searching_widths_runs_reruns_and_reports(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = sqlite_uri(tmp_path)
    path = study_file(tmp_path, {}, SEARCHED, sampler="random", pruner="none")
    assert main(["study", str(path), "--subset", "1000", "--tracking-uri", uri, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "3/3 trials counted (3 COMPLETE)" in out, out
    assert "test_accuracy of the retrained best configuration" in out

    import optuna

    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "mlruns" / "optuna.journal"))
    )
    trials = optuna.load_study(study_name="widths", storage=storage).get_trials()
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("widths").experiment_id
    runs = client.search_runs([experiment])
    parent = next(run for run in runs if "mlflow.parentRunId" not in run.data.tags)
    children = {
        int(run.data.tags["research.trial_number"]): run
        for run in runs
        if "mlflow.parentRunId" in run.data.tags
    }
    assert sorted(children) == [0, 1, 2]
    for trial in trials:
        params = children[trial.number].data.params
        text = trial.params["hidden_sizes"]  # Optuna's value: the list's text
        assert text in ("[32, 16]", "[48, 48, 48]", "[64]")
        widths = json.loads(text)
        assert params["hidden_sizes"] == text
        assert params["hidden_size"] == str(max(widths))
        assert params["n_hidden_layers"] == str(len(widths))
        assert params["sizes"] == str([784, *widths, 10])
    # the parent: the search as lists; no fixed shorthand to mislead
    assert parent.data.params["search.hidden_sizes"] == str(CHOICES)
    assert "fixed.hidden_size" not in parent.data.params
    assert "fixed.n_hidden_layers" not in parent.data.params

    run_id = children[0].info.run_id
    assert main(["rerun", run_id, "--tracking-uri", uri]) == 0
    assert "reproduced exactly: 1 epochs x 3 metrics identical" in capsys.readouterr().out

    out_dir = tmp_path / "report"
    argv = ["report", "widths", "--tracking-uri", uri, "--no-log", "--out", str(out_dir)]
    assert main(argv) == 0
    report = (out_dir / "report.md").read_text()
    best = trials[max(range(3), key=lambda i: trials[i].value)]
    assert f"hidden_sizes = {best.params['hidden_sizes']}." in report
    assert (out_dir / "val_accuracy_vs_params.png").stat().st_size > 0


@pytest.mark.slow
def test_a_study_fixing_widths_logs_the_shorthand_they_set(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = sqlite_uri(tmp_path)
    search = {"learning_rate": {"type": "categorical", "choices": [0.05, 0.1]}}
    path = study_file(tmp_path, {"hidden_sizes": [40, 20]}, search, n_trials=1)
    argv = ["study", str(path), "--subset", "500", "--tracking-uri", uri, "--quiet", "--no-final"]
    assert main(argv) == 0
    capsys.readouterr()
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("widths").experiment_id])
    parent = next(run for run in runs if "mlflow.parentRunId" not in run.data.tags)
    (child,) = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    assert parent.data.params["fixed.hidden_sizes"] == "[40, 20]"
    assert parent.data.params["fixed.hidden_size"] == "40"
    assert parent.data.params["fixed.n_hidden_layers"] == "2"
    assert child.data.params["sizes"] == "[784, 40, 20, 10]"
    assert main(["rerun", child.info.run_id, "--tracking-uri", uri]) == 0
    assert "reproduced exactly" in capsys.readouterr().out
