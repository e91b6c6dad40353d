"""Issue 24's pieces: the expanded training rows (``augment = "shift1"``), the book's protocol
(tested at the best validation epoch), the chapter 6 paper file end to end (``--quick``), the
median pruner's warm-up in a study file, and glibc keeping freed memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from research.cli import main
from research.data import augment_factor, augment_rows
from research.data.augment import shifted_by_one
from research.experiment.config.fields import ConfigError, TrainConfig
from research.experiment.config.paper_file import load_paper
from research.experiment.reproduction.reproduce import Splits, train_row
from research.experiment.training.train import train

REPO = Path(__file__).resolve().parents[1]
NIELSEN = REPO / "experiments" / "nielsen_ch6.toml"


# --- shift1: each image and its four one-pixel shifts --------------------------------------------


def _expand_like_the_book(image: np.ndarray) -> list[np.ndarray]:
    """expand_mnist.py's construction, one image at a time: np.roll, then the row or column
    that wrapped around set to zero (its order: down, up, right, left)."""
    square = image.reshape(28, 28)
    shifted = [image]
    for d, axis, index_position, index in [
        (1, 0, "first", 0),
        (-1, 0, "first", 27),
        (1, 1, "last", 0),
        (-1, 1, "last", 27),
    ]:
        new = np.roll(square, d, axis)
        if index_position == "first":
            new[index, :] = np.zeros(28)
        else:
            new[:, index] = np.zeros(28)
        shifted.append(new.reshape(784))
    return shifted


@settings(max_examples=25, deadline=None)
@given(
    images=st.integers(1, 4).flatmap(
        lambda n: arrays(np.uint8, (n, 784), elements=st.integers(0, 255))
    )
)
def test_shift1_matches_the_books_construction(images):
    expanded, labels = augment_rows("shift1", images, np.arange(len(images)))
    n = len(images)
    assert expanded.shape == (5 * n, 784) and expanded.dtype == np.uint8
    for i, image in enumerate(images):
        copies = _expand_like_the_book(image)
        for k, copy in enumerate(copies):  # block k holds every image's k-th copy
            np.testing.assert_array_equal(expanded[k * n + i], copy)
            assert labels[k * n + i] == i


def test_shift1_moves_a_pixel_and_keeps_floats():
    image = np.zeros((1, 784), dtype=np.float32)
    image[0, 10 * 28 + 10] = 0.5  # row 10, column 10
    down, up, right, left = (c.reshape(28, 28) for c in shifted_by_one(image)[1:])
    assert down[11, 10] == up[9, 10] == right[10, 11] == left[10, 9] == np.float32(0.5)
    assert all(c.sum() == np.float32(0.5) for c in (down, up, right, left))
    edge = np.zeros((1, 784), dtype=np.uint8)
    edge[0, 27] = 255  # row 0, column 27: it leaves the image when moved up or right
    assert [c.sum() for c in shifted_by_one(edge)] == [255, 255, 0, 0, 255]
    with pytest.raises(ValueError, match=r"\(N, 784\)"):
        shifted_by_one(np.zeros((2, 28, 28), dtype=np.uint8))


def test_no_augment_is_the_rows_themselves_and_factors_are_declared():
    x, labels = np.ones((3, 784), dtype=np.uint8), np.arange(3)
    same_x, same_labels = augment_rows("none", x, labels)
    assert same_x is x and same_labels is labels
    assert augment_factor("none") == 1 and augment_factor("shift1") == 5


def test_augment_is_a_field_checked_like_the_others():
    assert TrainConfig(augment="shift1").as_params()["augment"] == "shift1"
    logged, missing = TrainConfig.from_params(TrainConfig(augment="shift1").as_texts())
    assert logged.augment == "shift1" and missing == []
    # A run logged before the field existed reads back without augmentation.
    older = {k: v for k, v in TrainConfig().as_texts().items() if k != "augment"}
    assert TrainConfig.from_params(older) == (TrainConfig(), ["augment"])
    with pytest.raises(ConfigError, match="augment"):
        TrainConfig(augment="flip")


def test_training_sees_five_times_the_rows_and_validation_stays_as_given(mnist):
    """The steps per epoch count the expanded rows; the validation metrics are those of the
    rows given (the same with and without augment at the same parameters)."""
    x, labels = mnist.train.images[:200], mnist.train.labels[:200]
    x_val, labels_val = mnist.validation.images[:300], mnist.validation.labels[:300]
    from research.experiment.training.train import evaluate

    steps: list[int] = []
    config = TrainConfig(hidden_size=8, epochs=1, batch_size=50, augment="shift1")
    result = train(
        config, x, labels, x_val, labels_val, on_step=lambda e, s, per: steps.append(per)
    )
    assert steps == [20] * 20  # 1,000 rows in batches of 50
    val_loss, val_accuracy = evaluate(result.params, x_val, labels_val, result.model, raw=False)
    assert result.history[0].val_accuracy == val_accuracy
    assert result.history[0].val_loss == pytest.approx(val_loss, rel=1e-12)


def test_memory_estimate_counts_the_expanded_rows():
    from research.experiment.config.resources import _estimate

    plain = _estimate(TrainConfig(), 50_000)
    expanded = _estimate(TrainConfig(augment="shift1"), 50_000)
    assert expanded.data == 5 * plain.data


# --- the book's protocol: tested at the best validation epoch -----------------------------------


def test_restore_best_returns_the_parameters_of_the_best_validation_epoch(mnist):
    x, labels = mnist.train.images[:600], mnist.train.labels[:600]
    x_val, labels_val = mnist.validation.images[:500], mnist.validation.labels[:500]
    # A rate too large for the last epochs: validation accuracy is not monotonic.
    config = TrainConfig(hidden_size=16, epochs=6, batch_size=30, learning_rate=0.9, seed=3)
    seen: dict[int, list] = {}
    result = train(
        config, x, labels, x_val, labels_val, lambda m, p: seen.update({m.epoch: p}),
        restore_best=True,
    )  # fmt: skip
    accuracies = [m.val_accuracy for m in result.history]
    assert result.best_epoch == accuracies.index(max(accuracies))
    for got, want in zip(result.params, seen[result.best_epoch], strict=True):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    last = train(config, x, labels, x_val, labels_val)
    assert last.best_epoch is None
    if result.best_epoch != len(accuracies) - 1:  # (then the last epoch's are other values)
        assert not np.array_equal(last.params[0]["W"], result.params[0]["W"])
    with pytest.raises(ValueError, match="restore_best needs validation rows"):
        train(config, x, labels, None, None, restore_best=True)


def test_a_row_is_tested_at_its_best_validation_epoch(tmp_path, mnist):
    paper_file = tmp_path / "paper.toml"
    paper_file.write_text(
        textwrap.dedent(
            """
            [paper]
            name = "best_epoch_paper"
            title = "t"
            test_at = "best_validation_epoch"
            [[rows]]
            name = "r"
            paper_error = 10.0
            paper_settings = "the book's"
            budget_minutes = 12
            [rows.fixed]
            hidden_size = 16
            epochs = 4
            batch_size = 30
            learning_rate = 0.9
            """
        )
    )
    paper = load_paper(paper_file)
    assert paper.best_validation_epoch and paper.budget(paper.rows[0]) == 12
    assert paper.rows[0].paper_settings == "the book's"
    data = Splits(
        mnist.train.images[:600], mnist.train.labels[:600],
        mnist.validation.images[:500], mnist.validation.labels[:500],
        mnist.test.x[:1000], mnist.test.labels[:1000],
    )  # fmt: skip
    result = train_row(paper.rows[0], data, 3600.0, restore_best=True)
    accuracies = [m.val_accuracy for m in result.history]
    assert result.best_epoch == accuracies.index(max(accuracies))
    reference = train(
        paper.rows[0].config, data.x_train, data.labels_train, data.x_val, data.labels_val,
        restore_best=True,
    )  # fmt: skip
    from research.experiment.training.train import evaluate

    _, accuracy = evaluate(reference.params, data.x_test, data.labels_test, reference.model)
    assert result.errors == round((1 - accuracy) * 1000)


@pytest.mark.parametrize(
    "line, expected",
    [
        ('test_at = "best"', 'paper.test_at = "best": '),
        ("budget_minutes = -1", "rows[0].budget_minutes = -1: out of range"),
    ],
)
def test_bad_protocol_values_are_one_line(tmp_path, line, expected):
    path = tmp_path / "p.toml"
    where = "[paper]\n" if line.startswith("test_at") else "paper_error = 10.0\n"
    text = '[paper]\nname = "p"\ntitle = "t"\n[[rows]]\nname = "r"\npaper_error = 10.0\n'
    path.write_text(text.replace(where, where + line + "\n", 1))
    with pytest.raises(ConfigError) as raised:
        load_paper(path)
    assert expected in str(raised.value)


def test_the_nielsen_file_holds_the_books_table():
    paper = load_paper(NIELSEN)
    assert paper.best_validation_epoch
    assert [row.paper_error for row in paper.rows] == [2.20, 1.22, 0.94, 0.77, 0.63, 0.40]
    assert [paper.budget(row) for row in paper.rows] == [30, 30, 30, 30, 45, 45]
    configs = [row.config for row in paper.rows]
    assert configs[0].layers == "" and configs[0].spec().sizes == (784, 100, 10)
    assert configs[0].batch_size == 10 and configs[0].optimizer == "sgd"
    assert [c.activation for c in configs] == ["sigmoid"] * 3 + ["relu"] * 3
    assert [c.augment for c in configs] == ["none"] * 4 + ["shift1"] * 2
    assert configs[3].layers == configs[4].layers == configs[2].layers
    assert configs[5].layers.count("dropout(0.5)") == 3
    # network3's L2: λ 0.1 over its mini-batches per epoch (50,000 or 250,000 images, 10 a batch)
    assert configs[3].l2 == pytest.approx(0.1 / 5_000)
    assert configs[4].l2 == pytest.approx(0.1 / 25_000)
    assert all(row.paper_settings for row in paper.rows)


@pytest.mark.slow
def test_nielsen_quick_logs_each_row_tested_at_its_best_epoch(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["reproduce", str(NIELSEN), "--quick", "--quiet", "--tracking-uri", store]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count(", tested at 1 |") == 6
    assert printed.count("1 epochs on 500 rows (expanded to 2,500)") == 2
    assert "| row | the paper's settings | ours |" in printed
    assert "mini-batch 10, SGD, η 0.03, λ 0.1, 60 epochs" in printed
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("nielsen_ch6")
    runs = client.search_runs([experiment.experiment_id])
    rows = [r for r in runs if r.data.tags.get("research.role") == "row"]
    assert len(rows) == 6
    for run in rows:
        assert run.data.metrics["best_epoch"] == 0
        assert run.data.metrics["target_met"] == 0.0  # (one epoch on 500 images)
        target = float(run.data.params["paper_error"]) + 0.15
        assert float(run.data.params["target_error"]) == pytest.approx(target)
        assert run.data.params["n_train_rows"] == "500"
        assert "val/accuracy" in run.data.metrics  # validation kept apart, as the book did
    expanded = [r for r in rows if r.data.params["augment"] == "shift1"]
    assert len(expanded) == 2
    (parent,) = [r for r in runs if r.data.tags.get("research.role") == "reproduce"]
    path = client.download_artifacts(parent.info.run_id, "reproduce.json", str(tmp_path))
    summary = json.loads(Path(path).read_text())
    assert [row["best_epoch"] for row in summary["rows"]] == [0] * 6
    assert [row["met"] for row in summary["rows"]] == [False] * 6
    # The same command again keeps every row, best epoch included.
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert again.count(", kept") == 6 and again.count(", tested at 1 |") == 6


# --- the median pruner's warm-up, set by a study file --------------------------------------------


def test_a_study_file_sets_the_median_pruners_patience(tmp_path):
    from research.experiment.config.study_config import load_study_config
    from research.experiment.studies.optuna_study import describe_pruner, make_pruner

    text = (REPO / "experiments" / "fashion_cnn.toml").read_text()
    config = load_study_config(REPO / "experiments" / "fashion_cnn.toml")
    assert (config.n_warmup_steps, config.n_startup_trials) == (3, 3)
    assert describe_pruner(make_pruner(config)) == (
        "MedianPruner(n_startup_trials=3, n_warmup_steps=3)"
    )
    plain = tmp_path / "plain.toml"
    plain.write_text(text.replace("n_warmup_steps = 3\n", "").replace("n_startup_trials = 3\n", ""))
    default = make_pruner(load_study_config(plain))
    assert describe_pruner(default) == "MedianPruner(n_startup_trials=4, n_warmup_steps=1)"
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace("n_warmup_steps = 3", "n_warmup_steps = -1"))
    with pytest.raises(ConfigError, match=r"study.n_warmup_steps = -1: out of range"):
        load_study_config(bad)


# --- glibc keeps freed memory ---------------------------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
@pytest.mark.parametrize("user_setting, expected", [(None, "True"), ("1048576", "False")])
def test_freed_memory_is_kept_unless_the_user_chose(user_setting, expected):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    if user_setting is not None:
        env["MALLOC_TRIM_THRESHOLD_"] = user_setting
    code = "from research.engine.allocator import keep_freed_memory; print(keep_freed_memory())"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == expected
