"""How much of a trial's time goes to bookkeeping (MLflow and Optuna), measured in one run.

Runs the default study's trial (hidden_size 256, learning_rate 0.1, batch_size 128, 8 epochs) six
times through the real objective against fresh MLflow (SQLite) and Optuna (journal) stores in a
temporary folder, and splits each trial's wall time into training (time inside ``train`` minus
the ``on_epoch`` callbacks) and bookkeeping (everything else: run creation, params, per-epoch
metrics, Optuna reports and pruning checks, the loss-curve PNG, weights, tags). The first trial
warms up imports and is not counted.

Usage: ``.venv/bin/python scripts/measure_tracking_overhead.py`` (figures: docs/tracking.md)
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from research.engine.blas_kernels import choose_openblas_kernels

choose_openblas_kernels()  # before numpy loads, as `python -m research` does

import numpy as np  # noqa: E402

import research.experiment.studies.trials as trials_module  # noqa: E402
from research.data import load_mnist  # noqa: E402
from research.experiment.config.study_config import load_study_config, with_overrides  # noqa: E402
from research.experiment.studies.optuna_study import load_study  # noqa: E402
from research.experiment.studies.trials import TrialContext, run_next_trial  # noqa: E402
from research.experiment.tracking.study_runs import StudyTracker  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PARAMS = {"hidden_size": 256, "learning_rate": 0.1, "batch_size": 128, "l2": 0.0}


def main() -> None:
    config = with_overrides(load_study_config(REPO / "experiments" / "mnist_mlp.toml"), epochs=8)
    data = load_mnist()
    folder = Path(tempfile.mkdtemp())
    tracker = StudyTracker.open(config.name, f"sqlite:///{folder}/mlflow.db")
    study = load_study(config, str(folder / "optuna.journal"))
    context = TrialContext(
        config,
        data.train.images,
        data.train.labels,
        data.validation.x,
        data.validation.labels,
        tracker,
        lambda message: None,
        2,
    )
    training: list[float] = []
    real_train = trials_module.train

    def timed_train(*args, **kwargs):
        callbacks: list[float] = []
        on_epoch = kwargs["on_epoch"]

        def timed_on_epoch(metrics, params):
            started = time.perf_counter()
            try:
                on_epoch(metrics, params)
            finally:
                callbacks.append(time.perf_counter() - started)

        kwargs["on_epoch"] = timed_on_epoch
        started = time.perf_counter()
        result = real_train(*args, **kwargs)
        training.append(time.perf_counter() - started - sum(callbacks))
        return result

    trials_module.train = timed_train
    shares = []
    for index in range(6):
        study.enqueue_trial(PARAMS)
        started = time.perf_counter()
        run_next_trial(study, context)
        total = time.perf_counter() - started
        bookkeeping = total - training[-1]
        if index == 0:
            continue
        shares.append(bookkeeping / total)
        print(
            f"trial {total:.2f} s = training {training[-1]:.2f} s + bookkeeping "
            f"{bookkeeping:.3f} s ({100 * shares[-1]:.1f}%)"
        )
    print(f"median bookkeeping share of a trial's wall time: {100 * np.median(shares):.1f}%")


if __name__ == "__main__":
    main()
