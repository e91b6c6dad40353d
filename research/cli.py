"""Command line: ``python -m research COMMAND`` (train, gradcheck, verify-layer, study, ui, ...).

User mistakes (bad flags, missing data, an unreachable tracking store) end with one message on
stderr and exit code 2, never a traceback. A run that diverges exits 1; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
import warnings
from dataclasses import replace

from research.arguments import build_parser
from research.experiment.config.fields import ConfigError, TrainConfig
from research.experiment.config.presets import PRESETS, DeprecatedName, LongWarmup, configure
from research.experiment.reproduction.reproduce import reproduce_command
from research.experiment.training.train import (
    DivergenceError,
    EpochMetrics,
    Terminated,
    interruption,
    stop_on_sigterm,
)

EXIT_USAGE = 2


class UserError(Exception):
    """A mistake the user can fix; printed as one line, exit code 2."""


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = {
        name: getattr(args, name)
        for name in TrainConfig.field_names()
        if getattr(args, name, None) is not None
    }
    try:  # the flags' network replaces the preset's, whichever way each gives it
        return configure(PRESETS[args.preset], **overrides)
    except ValueError as error:
        raise UserError(f"invalid training configuration: {error}") from None


def _check_memory(config: TrainConfig, n_train_rows: int) -> None:
    """UserError if training ``config`` cannot fit in the memory available now."""
    from research.experiment.config.resources import check_memory

    try:
        check_memory(config, n_train_rows)
    except ConfigError as error:
        raise UserError(str(error)) from None


def _load_data(args: argparse.Namespace, config: TrainConfig):
    """The splits of ``config.dataset``, its inputs as ``config.raw_inputs`` says."""
    from research.data import DataError, load_named

    try:
        return load_named(config.dataset, args.source_dir, args.data_dir, raw=config.raw_inputs)
    except DataError as error:
        raise UserError(str(error)) from None


def _epoch_row(metrics: EpochMetrics) -> str:
    return (
        f"{metrics.epoch + 1:>5}  {metrics.train_loss:>10.4f}  {metrics.val_loss:>10.4f}  "
        f"{100 * metrics.val_accuracy:>11.2f}%  {metrics.seconds:>7.2f}s"
    )


EPOCH_HEADER = (
    f"{'epoch':>5}  {'train/loss':>10}  {'val/loss':>10}  {'val/accuracy':>12}  {'time':>8}"
)


def _train_rows(args: argparse.Namespace, config: TrainConfig):
    """The dataset of ``config`` and its training rows (the first ``--subset`` of them), checked
    against the batch size and the memory available: (data, x_train (N, 784) uint8 or float,
    labels_train (N,))."""
    data = _load_data(args, config)
    x_train, labels_train = data.train.images, data.train.labels  # (uint8: floats per batch)
    if args.subset is not None:
        if not 1 <= args.subset <= len(x_train):
            raise UserError(f"--subset {args.subset} must be between 1 and {len(x_train)}")
        x_train, labels_train = x_train[: args.subset], labels_train[: args.subset]
    if config.batch_size > len(x_train):
        raise UserError(
            f"--batch-size {config.batch_size} is larger than the {len(x_train)} training rows"
        )
    _check_memory(config, len(x_train))
    return data, x_train, labels_train


def _start_train_run(args: argparse.Namespace, config: TrainConfig):
    """The ``train`` run's MLflow run; None with ``--no-track``."""
    from research.experiment.tracking.runs import start_run
    from research.experiment.tracking.stores import TrackingError

    if args.no_track:
        return None
    try:
        return start_run(
            _train_experiment(args, config),
            tags={"preset": args.preset, "command": "train"},
            tracking_uri=args.tracking_uri,
        )
    except TrackingError as error:
        raise UserError(str(error)) from None


def _train_experiment(args: argparse.Namespace, config: TrainConfig) -> str:
    return args.experiment or ("train" if config.dataset == "mnist" else f"train_{config.dataset}")


def _run_train(args: argparse.Namespace) -> int:
    from research.experiment.tracking.runs import Outputs, run_lifecycle
    from research.experiment.tracking.stores import TrackingError
    from research.experiment.training import train as training

    config = _config_from_args(args)
    if config.optimizer != "momentum" and args.nesterov:
        raise UserError("--nesterov applies only to --optimizer momentum")
    data, x_train, labels_train = _train_rows(args, config)
    spec = config.spec()
    print(
        f"training {config.describe_network()} "  # a network of layers names its activations
        f"{'' if config.layers else config.activation + '/'}{config.output}/"
        f"{config.loss}, {config.optimizer} learning_rate={config.learning_rate:g}, "
        f"batch_size={config.batch_size}, {config.epochs} epochs, {config.dtype} "
        f"(preset {args.preset}; {config.n_params():,} parameters) on {data.info.title}"
    )
    run = _start_train_run(args, config)
    started = time.perf_counter()
    try:
        with run_lifecycle(run), _EpochProgress(config.epochs, args.quiet) as progress:
            if run is not None:
                run.log_config(config, len(x_train))
            result = training.train(
                config, x_train, labels_train, data.validation.x, data.validation.labels,
                on_epoch=lambda metrics, params: progress.epoch(metrics, run),
                on_step=None if args.quiet else progress.step,
            )  # fmt: skip
            progress.close()
            wall = time.perf_counter() - started
            summary = _train_summary(args, result, data, config, wall)
            if run is not None:
                run.log_metrics(summary, step=result.history[-1].epoch)
                title = f"run {run.run_id[:8]}"
                images = data.test.images
                # the MLP's spec, or the network of layers with its running statistics
                model = result.model or spec
                state = None if result.network is None else result.state
                run.save_on_success(
                    Outputs(result.history, title, result.params, model, config, images, state)
                )
    except DivergenceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as error:
        print(f"{interruption(error)}; the MLflow run is marked KILLED", file=sys.stderr)
        return 143 if isinstance(error, Terminated) else 130
    except TrackingError as error:
        raise UserError(str(error)) from None
    if run is not None:
        print(f"MLflow run {run.run_id} in experiment '{_train_experiment(args, config)}'")
        print(f"its MLflow model: {run.model_uri} (load and serve it: docs/models.md)")
        print(f"browse it: {run.ui_hint}")
    return 0


class _EpochProgress:
    """``train``'s progress: a tqdm bar over the epochs, a table row per epoch, and each
    epoch logged to the run (if tracked)."""

    def __init__(self, epochs: int, quiet: bool) -> None:
        from tqdm import tqdm

        self.tqdm = tqdm
        self.bar = tqdm(total=epochs, unit="epoch", disable=quiet, leave=False, dynamic_ncols=True)
        tqdm.write(EPOCH_HEADER)

    def __enter__(self) -> _EpochProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.bar.close()

    def step(self, epoch: int, step: int, steps: int) -> None:
        if step % 20 == 0 or step == steps - 1:
            self.bar.set_postfix_str(f"step {step + 1}/{steps}", refresh=False)
            self.bar.update(0)

    def epoch(self, metrics: EpochMetrics, run) -> None:
        self.bar.update(1)
        self.tqdm.write(_epoch_row(metrics))
        if run is not None:
            run.log_epoch(metrics)


def _train_summary(
    args: argparse.Namespace, result, data, config: TrainConfig, wall: float
) -> dict:
    """Prints how the training went (and the test accuracy, with ``--evaluate-test``); returns
    the run's summary metrics."""
    from research.experiment.training import train as training

    last = result.history[-1]
    best = max(result.history, key=lambda m: m.val_accuracy)
    print(
        f"done in {wall:.1f} s: val/accuracy {100 * last.val_accuracy:.2f}% after "
        f"{len(result.history)} epochs (best {100 * best.val_accuracy:.2f}% at epoch "
        f"{best.epoch + 1})"
    )
    summary = {"wall_seconds": wall, "n_params": float(config.n_params())}
    if args.evaluate_test:
        test_loss, test_accuracy = training.evaluate(
            result.params, data.test.x, data.test.labels, result.model or config.spec(),
            state=result.state,
        )  # fmt: skip
        print(f"test accuracy (evaluated once, at the end): {100 * test_accuracy:.2f}%")
        summary.update({"test_accuracy": test_accuracy, "test_loss": test_loss})
    return summary


def _run_gradcheck(args: argparse.Namespace) -> int:
    from research.data import N_TRAIN
    from research.verify.gradcheck import (
        check_network,
        describe_check,
        format_table,
        random_batch,
    )

    config = _config_from_args(args)
    spec = config.spec()
    if not 1 <= args.rows <= N_TRAIN:
        raise UserError(
            f"--batch-size {args.rows} is not allowed; give an integer from 1 to {N_TRAIN}"
        )
    for name in ("rtol", "atol"):
        value = getattr(args, name)
        if value is not None and not 0 <= value < float("inf"):
            raise UserError(f"--{name} {value} is not allowed; give a finite number >= 0")
    # the network in float64 twice (numpy's and JAX's), on one batch
    _check_memory(replace(config, dtype="float64", batch_size=args.rows), args.rows)
    if args.synthetic:
        x, labels = random_batch(spec, args.rows, args.seed)
        source = "a random batch"
    else:
        data = _load_data(args, config)
        head = data.train[: args.rows]
        x, labels = head.x, head.labels
        source = f"the first {len(x)} {data.info.title} training rows"
    print(describe_check(config, args.dtype, args.seed, source))
    started = time.perf_counter()
    if config.layers:
        rows = _gradcheck_layers(config, args, x, labels)
    else:
        rows = check_network(
            spec, config.init, args.dtype, args.seed, x, labels, args.rtol, args.atol,
            config.input_dropout, config.dropout,
        )  # fmt: skip
    print(format_table(rows))
    print(f"({time.perf_counter() - started:.1f} s, including JAX compilation)")
    return 0 if all(row.passed for row in rows) else 1


def _gradcheck_layers(config: TrainConfig, args: argparse.Namespace, x, labels) -> list:
    """``gradcheck --layers``: the network of ``config`` checked against its JAX reference
    (:func:`research.verify.layer_check.gradcheck_network`) on inputs x (B, 784) and labels (B,)."""
    from research.verify.layer_check import gradcheck_network

    network = config.network()
    return gradcheck_network(
        network, args.dtype, args.seed, x, labels, rtol=args.rtol, atol=args.atol
    )


def _run_verify_layer(args: argparse.Namespace) -> int:
    from research.verify.layer_command import run_verify_layer

    return run_verify_layer(args)


def _run_study(args: argparse.Namespace) -> int:
    from analysis.report import ReportError, log_study_figures
    from research.data import DataError
    from research.experiment.config.study_config import (
        StudyConfigError,
        load_study_config,
        with_overrides,
    )
    from research.experiment.studies.storage import StudyError, locked_database
    from research.experiment.studies.study import run_study
    from research.experiment.tracking.stores import TrackingError

    try:
        config = with_overrides(
            load_study_config(args.study_file),
            n_trials=args.n_trials,
            timeout=args.timeout,
            epochs=args.epochs,
            name=args.study_name,
        )
        code = run_study(
            config,
            storage_url=args.storage,
            tracking_uri=args.tracking_uri,
            workers=args.workers,
            subset=args.subset,
            source_dir=args.source_dir,
            data_dir=args.data_dir,
            quiet=args.quiet,
            final=not args.no_final,
        )
        if code in (0, 1):
            # The study's figures on its parent run, drawn as the report draws them.
            log_study_figures(config.name, args.tracking_uri, args.storage)
        return code
    except (StudyConfigError, StudyError, DataError, TrackingError, ReportError) as error:
        raise UserError(str(error)) from None
    except Exception as error:  # a SQLite study database that another process keeps locked
        locked = locked_database(error, args.storage) if args.storage else None
        if locked is None:
            raise
        raise UserError(str(locked)) from None


def _run_ui(args: argparse.Namespace) -> int:
    from research.experiment.tracking.stores import resolve_tracking_uri
    from research.experiment.tracking.ui import UIError, serve_ui

    say = functools.partial(print, flush=True)
    try:
        return serve_ui(resolve_tracking_uri(args.tracking_uri), args.host, args.port, say)
    except UIError as error:
        raise UserError(str(error)) from None


def _run_rerun(args: argparse.Namespace) -> int:
    from research.data import DataError
    from research.experiment.reproduction.rerun import METRICS, RerunError, rerun
    from research.experiment.tracking.stores import TrackingError

    try:
        result = rerun(args.run_id, args.tracking_uri, args.source_dir, args.data_dir)
    except (TrackingError, RerunError, DataError) as error:
        raise UserError(str(error)) from None
    print(f"{'epoch':>5}  " + "  ".join(f"{k + ' logged':>18}  {'rerun':>18}" for k in METRICS))
    for epoch, cells in result.rows():
        shown = [
            f"{'-' if old is None else repr(old):>18}  {new!r:>18}{'' if same else ' *'}"
            for old, new, same in cells
        ]
        print(f"{epoch + 1:>5}  " + "  ".join(shown))
    if result.logged_epochs != len(result.history):
        print(
            f"the run logged {result.logged_epochs} epochs, the rerun trained {len(result.history)}"
        )
    if result.error != result.logged.divergence:
        print(f"the run logged: {result.logged.divergence or 'no divergence'}")
        print(f"the rerun: {result.error or 'no divergence'}")
    if result.mismatches:
        print(f"NOT reproduced: {result.mismatches} value(s) differ (marked *)")
        return 1
    uncompared = result.uncompared  # e.g. a row's validation metrics, NaN by design
    compared = len(METRICS) - len(uncompared)
    reasons = sorted(set(uncompared.values()))
    print(
        f"reproduced exactly: {len(result.history)} epochs x {compared} "
        f"metric{'' if compared == 1 else 's'} identical"
        + "".join(
            f" ({', '.join(k for k in uncompared if uncompared[k] == why)}: {why})"
            for why in reasons
        )
        + (f", then the same divergence: {result.error}" if result.error else "")
    )
    return 0


def _run_report(args: argparse.Namespace) -> int:
    from analysis.report import ReportError, build_report
    from research.data import DataError
    from research.experiment.tracking.stores import TrackingError

    try:
        build_report(
            args.study,
            tracking_uri=args.tracking_uri,
            out=args.out,
            storage=args.storage,
            source_dir=args.source_dir,
            data_dir=args.data_dir,
            log_to_mlflow=not args.no_log,
        )
    except (ReportError, TrackingError, DataError) as error:
        raise UserError(str(error)) from None
    return 0


def _run_reproduce(args: argparse.Namespace) -> int:
    from research.experiment.tracking.stores import TrackingError

    try:  # (missing data is _load_data's UserError)
        return reproduce_command(args, lambda config: _load_data(args, config))
    except (ConfigError, TrackingError, OSError) as error:
        raise UserError(str(error)) from None


def _run_bench(args: argparse.Namespace) -> int:
    from research.bench.run import BenchError, bench_command
    from research.data import DataError
    from research.experiment.tracking.stores import TrackingError

    try:
        return bench_command(
            quick=args.quick,
            rounds=args.rounds,
            json_file=args.json,
            experiment=None if args.no_track else args.experiment,
            tracking_uri=args.tracking_uri,
            source_dir=args.source_dir,
            data_dir=args.data_dir,
        )
    except (BenchError, DataError, TrackingError) as error:
        raise UserError(str(error)) from None


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    with warnings.catch_warnings():
        # A deprecated name (the "seed" preset) is one line on stderr, not a warning's two; so
        # is a warm-up as long as the training.
        warnings.simplefilter("always", DeprecatedName)
        warnings.simplefilter("always", LongWarmup)
        shown = warnings.showwarning

        def show_note(message, category, *args, **kwargs) -> None:
            if issubclass(category, DeprecatedName):
                print(f"note: {message}", file=sys.stderr, flush=True)
            elif issubclass(category, LongWarmup):
                print(f"warning: {message}", file=sys.stderr, flush=True)
            else:
                shown(message, category, *args, **kwargs)

        warnings.showwarning = show_note
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    commands = {
        "train": _run_train,
        "gradcheck": _run_gradcheck,
        "verify-layer": _run_verify_layer,
        "study": _run_study,
        "ui": _run_ui,
        "rerun": _run_rerun,
        "report": _run_report,
        "bench": _run_bench,
        "reproduce": _run_reproduce,
    }
    # SIGTERM (kill, systemd, supervisord) stops a command as Ctrl-C does, with exit code 143.
    stop_on_sigterm()
    try:
        return commands[args.command](args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as error:  # outside a training loop (loading data, opening stores)
        print(interruption(error), file=sys.stderr)
        return 143 if isinstance(error, Terminated) else 130
