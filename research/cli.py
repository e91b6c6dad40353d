"""Command line: ``python -m research {train,gradcheck,study,ui,rerun,report,bench} ...``.

User mistakes (bad flags, missing data, an unreachable tracking store) end with one message on
stderr and exit code 2, never a traceback. A run that diverges exits 1; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from research.train import PRESETS, DivergenceError, EpochMetrics, TrainConfig

EXIT_USAGE = 2


class UserError(Exception):
    """A mistake the user can fix; printed as one line, exit code 2."""


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mnist-dir",
        help="folder holding the four MNIST IDX files (.gz or raw), for offline use; "
        "default $RESEARCH_MNIST_DIR, else download through tensorflow-datasets",
    )
    parser.add_argument(
        "--data-dir",
        help="where the prepared dataset and its cache live; default $RESEARCH_DATA_DIR, "
        "else ~/.cache/research",
    )


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1 to 65535)")
    return port


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m research",
        description="A numpy MLP with handwritten backprop, verified against JAX.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="train one network on MNIST and log it to MLflow",
        description="Train one network on MNIST (train split), report validation metrics per "
        "epoch, and log the run to MLflow.",
    )
    train.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="default",
        help="starting configuration: 'seed' is the origin program's, 'default' a modern one",
    )
    fields = TrainConfig.__dataclass_fields__
    for name, flags, kind, extra in (
        ("hidden_size", ["--hidden-size", "--hidden"], int, {}),
        ("n_hidden_layers", ["--n-hidden-layers"], int, {}),
        ("activation", ["--activation"], str, {"choices": ["sigmoid", "tanh", "relu"]}),
        ("output", ["--output"], str, {"choices": ["sigmoid", "softmax", "identity"]}),
        ("loss", ["--loss"], str, {"choices": ["mse", "cross_entropy", "bce"]}),
        ("l2", ["--l2"], float, {}),
        ("init", ["--init"], str, {"choices": ["normal", "xavier", "he"]}),
        ("optimizer", ["--optimizer"], str, {"choices": ["sgd", "momentum", "adam"]}),
        ("learning_rate", ["--learning-rate", "--lr"], float, {}),
        ("momentum", ["--momentum"], float, {}),
        ("batch_size", ["--batch-size"], int, {}),
        ("epochs", ["--epochs"], int, {}),
        ("seed", ["--seed"], int, {}),
        ("dtype", ["--dtype"], str, {"choices": ["float32", "float64"]}),
    ):
        default = fields[name].default
        train.add_argument(
            *flags, dest=name, type=kind, default=None, help=f"(default preset: {default})", **extra
        )
    train.add_argument(
        "--nesterov",
        dest="nesterov",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Nesterov momentum (momentum optimizer only)",
    )
    train.add_argument(
        "--raw",
        dest="raw_inputs",
        action="store_true",
        default=None,
        help="feed raw 0..255 pixels, as the origin did (default: scaled to [0, 1])",
    )
    train.add_argument(
        "--subset",
        type=int,
        metavar="N",
        help="train on the first N training rows only (quick looks and tests)",
    )
    train.add_argument(
        "--evaluate-test",
        action="store_true",
        help="evaluate the final model once on the test split (never used for choices)",
    )
    train.add_argument("--experiment", default="train", help="MLflow experiment (default: train)")
    train.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db",
    )
    train.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_data_flags(train)

    check = commands.add_parser(
        "gradcheck",
        help="compare numpy's handwritten gradients with JAX autodiff, per layer",
        description="Compare the handwritten numpy gradients with JAX autodiff on one batch, "
        "per layer and array; exits 1 if any array is outside tolerance.",
    )
    check.add_argument("--preset", choices=sorted(PRESETS), default="seed")
    check.add_argument("--hidden-size", "--hidden", dest="hidden_size", type=int)
    check.add_argument("--n-hidden-layers", dest="n_hidden_layers", type=int)
    check.add_argument("--activation", choices=["sigmoid", "tanh", "relu"])
    check.add_argument("--output", choices=["sigmoid", "softmax", "identity"])
    check.add_argument("--loss", choices=["mse", "cross_entropy", "bce"])
    check.add_argument("--l2", type=float)
    check.add_argument("--init", choices=["normal", "xavier", "he"])
    check.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    check.add_argument("--batch-size", dest="batch_size", type=int, default=256)
    check.add_argument("--seed", type=int, default=0)
    check.add_argument(
        "--synthetic",
        action="store_true",
        help="use a random batch instead of real MNIST (no data needed)",
    )
    check.add_argument("--rtol", type=float, help="default 1e-10 (float64), 1e-4 (float32)")
    check.add_argument("--atol", type=float, help="default 1e-12 (float64), 1e-5 (float32)")
    _add_data_flags(check)

    study = commands.add_parser(
        "study",
        help="run (or continue) an Optuna study; every trial is an MLflow run",
        description="Run or continue the Optuna study defined in a TOML file (see experiments/). "
        "Command-line values override the file's.",
    )
    study.add_argument("study_file", help="study definition, e.g. experiments/mnist_mlp.toml")
    study.add_argument("--n-trials", type=int, help="trials the study should hold in the end")
    study.add_argument("--timeout", type=float, help="seconds after which no new trial starts")
    study.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    study.add_argument("--epochs", type=int, help="epochs per trial")
    study.add_argument("--subset", type=int, metavar="N", help="train on the first N rows")
    study.add_argument("--study-name", help="Optuna study and MLflow experiment name")
    study.add_argument(
        "--storage",
        help="Optuna storage: a journal file path, or a database URL such as "
        "postgresql://user@host/db (default: mlruns/optuna.journal beside the MLflow store)",
    )
    study.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default sqlite:///mlruns/mlflow.db)"
    )
    study.add_argument(
        "--no-final",
        action="store_true",
        help="skip retraining the best configuration on train+validation and the test evaluation",
    )
    study.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    _add_data_flags(study)

    ui = commands.add_parser("ui", help="start the MLflow UI over the tracking store")
    ui.add_argument("--port", type=_port, default=5000, help="port to listen on (default 5000)")
    ui.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1; the UI has no authentication)",
    )
    ui.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default sqlite:///mlruns/mlflow.db)"
    )

    rerun = commands.add_parser(
        "rerun",
        help="retrain a logged run from its params and seed; check its metrics are reproduced",
    )
    rerun.add_argument("run_id", help="the MLflow run id of a trial or a train run")
    rerun.add_argument("--tracking-uri", help="MLflow tracking URI")
    _add_data_flags(rerun)

    report = commands.add_parser(
        "report",
        help="figures and a self-contained report of a study (never trains)",
        description="Turn a study in the tracking store into figures, report.md, report.html "
        "and report.json, and log them on the study's parent run (artifacts report/).",
    )
    report.add_argument("study", nargs="?", help="study name (default: the most recent study)")
    report.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default sqlite:///mlruns/mlflow.db)"
    )
    report.add_argument(
        "--out", type=Path, help="output folder (default: reports/<study> beside the store)"
    )
    report.add_argument(
        "--storage",
        help="Optuna storage for the importances (default: the one the study recorded)",
    )
    report.add_argument(
        "--no-log", action="store_true", help="do not log the report to the parent run"
    )
    _add_data_flags(report)

    bench = commands.add_parser(
        "bench",
        help="time the numpy engine against the origin, JAX and PyTorch (interleaved rounds)",
        description="Time every contender on every workload in interleaved rounds, print a "
        "table of medians, spreads, GFLOP/s and ratios, and log it to MLflow.",
    )
    bench.add_argument("--quick", action="store_true", help="short runs (under a minute)")
    bench.add_argument("--rounds", type=int, help="rounds per workload (default 5; 2 with --quick)")
    bench.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    bench.add_argument(
        "--experiment", default="benchmarks", help="MLflow experiment (default: benchmarks)"
    )
    bench.add_argument("--tracking-uri", help="MLflow tracking URI")
    bench.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    _add_data_flags(bench)
    return parser


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = {
        name: getattr(args, name)
        for name in TrainConfig.field_names()
        if getattr(args, name, None) is not None
    }
    base = PRESETS[args.preset]
    try:
        return replace(base, **overrides)
    except ValueError as error:
        raise UserError(f"invalid training configuration: {error}") from None


def _load_data(args: argparse.Namespace, raw: bool):
    from research.data import DataError, load_mnist

    try:
        return load_mnist(args.mnist_dir, args.data_dir, raw=raw)
    except DataError as error:
        raise UserError(str(error)) from None


def _epoch_row(metrics: EpochMetrics) -> str:
    return (
        f"{metrics.epoch:>5}  {metrics.train_loss:>10.4f}  {metrics.val_loss:>10.4f}  "
        f"{100 * metrics.val_accuracy:>11.2f}%  {metrics.seconds:>7.2f}s"
    )


EPOCH_HEADER = (
    f"{'epoch':>5}  {'train/loss':>10}  {'val/loss':>10}  {'val/accuracy':>12}  {'time':>8}"
)


def _run_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from research import train as training
    from research.blas_kernels import loaded_kernels
    from research.figures import save_loss_curves
    from research.tracking import TrackingError, save_weights, start_training_run

    config = _config_from_args(args)
    if config.optimizer != "momentum" and args.nesterov:
        raise UserError("--nesterov applies only to --optimizer momentum")
    data = _load_data(args, config.raw_inputs)
    x_train, labels_train = data.train.x, data.train.labels
    if args.subset is not None:
        if not 1 <= args.subset <= len(x_train):
            raise UserError(f"--subset {args.subset} must be between 1 and {len(x_train)}")
        x_train, labels_train = x_train[: args.subset], labels_train[: args.subset]
    if config.batch_size > len(x_train):
        raise UserError(
            f"--batch-size {config.batch_size} is larger than the {len(x_train)} training rows"
        )
    spec = config.spec()
    print(
        f"training {'x'.join(map(str, spec.sizes))} {config.activation}/{config.output}/"
        f"{config.loss}, {config.optimizer} learning_rate={config.learning_rate:g}, "
        f"batch_size={config.batch_size}, {config.epochs} epochs, {config.dtype} "
        f"(preset {args.preset}; {spec.n_params:,} parameters)"
    )

    run = None
    if not args.no_track:
        try:
            run = start_training_run(
                args.experiment,
                tags={"preset": args.preset, "command": "train"},
                tracking_uri=args.tracking_uri,
            )
            run.log_params(
                {
                    **config.as_params(),
                    "sizes": list(spec.sizes),
                    "n_train_rows": len(x_train),
                    "blas_kernels": loaded_kernels(),
                }
            )
        except TrackingError as error:
            raise UserError(str(error)) from None

    progress = tqdm(
        total=config.epochs, unit="epoch", disable=args.quiet, leave=False, dynamic_ncols=True
    )
    tqdm.write(EPOCH_HEADER)

    def on_step(epoch: int, step: int, steps: int) -> None:
        if step % 20 == 0 or step == steps - 1:
            progress.set_postfix_str(f"step {step + 1}/{steps}", refresh=False)
            progress.update(0)

    def on_epoch(metrics: EpochMetrics, params) -> None:
        progress.update(1)
        tqdm.write(_epoch_row(metrics))
        if run is not None:
            run.log_metrics(metrics.as_metrics(), step=metrics.epoch)

    started = time.perf_counter()
    status = "FAILED"
    try:
        result = training.train(
            config,
            x_train,
            labels_train,
            data.validation.x,
            data.validation.labels,
            on_epoch=on_epoch,
            on_step=None if args.quiet else on_step,
        )
        status = "FINISHED"
    except DivergenceError as error:
        progress.close()
        if run is not None:
            run.set_tags({"diverged": str(error)})
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        status = "KILLED"
        progress.close()
        print("interrupted; the MLflow run is marked KILLED", file=sys.stderr)
        return 130
    finally:
        if run is not None and status != "FINISHED":
            run.finish(status)
    progress.close()
    wall = time.perf_counter() - started

    last = result.history[-1]
    best = max(result.history, key=lambda m: m.val_accuracy)
    print(
        f"done in {wall:.1f} s: val/accuracy {100 * last.val_accuracy:.2f}% after "
        f"{len(result.history)} epochs (best {100 * best.val_accuracy:.2f}% at epoch {best.epoch})"
    )
    summary = {"wall_seconds": wall, "n_params": float(spec.n_params)}
    if args.evaluate_test:
        test_loss, test_accuracy = training.evaluate(
            result.params, data.test.x, data.test.labels, spec
        )
        print(f"test accuracy (evaluated once, at the end): {100 * test_accuracy:.2f}%")
        summary.update({"test_accuracy": test_accuracy, "test_loss": test_loss})

    if run is not None:
        run.log_metrics(summary, step=last.epoch)
        with tempfile.TemporaryDirectory() as folder:
            curve = save_loss_curves(
                result.history, Path(folder) / "loss_curves.png", title=f"run {run.run_id[:8]}"
            )
            weights = Path(folder) / "weights.npz"
            save_weights(weights, result.params, spec)
            run.log_artifact(curve)
            run.log_artifact(weights)
        run.finish("FINISHED")
        print(f"MLflow run {run.run_id} in experiment '{args.experiment}'")
        print(f"browse it: {run.ui_hint}")
    return 0


def _run_gradcheck(args: argparse.Namespace) -> int:
    from research.data import one_hot
    from research.gradcheck import TOLERANCES, format_table, gradcheck
    from research.mlp import init_params

    config = _config_from_args(args)
    spec = config.spec()
    dtype = np.dtype(args.dtype)
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size} is not allowed; give an integer >= 1")
    if args.synthetic:
        rng = np.random.default_rng(args.seed)
        x = rng.random((args.batch_size, spec.sizes[0]))
        labels = rng.integers(0, spec.sizes[-1], args.batch_size)
        source = "a random batch"
    else:
        data = _load_data(args, config.raw_inputs)
        x, labels = data.train.x[: args.batch_size], data.train.labels[: args.batch_size]
        source = f"the first {len(x)} MNIST training rows"
    x = np.asarray(x, dtype=dtype)
    y = one_hot(labels, spec.sizes[-1], dtype=dtype)
    params = init_params(spec, args.seed, dtype=dtype, scheme=config.init)
    rtol_default, atol_default = TOLERANCES[dtype.name]
    rtol = args.rtol if args.rtol is not None else rtol_default
    atol = args.atol if args.atol is not None else atol_default
    print(
        f"gradcheck: {'x'.join(map(str, spec.sizes))} {spec.activation}/{spec.output}/{spec.loss}"
        f" l2={spec.l2:g}, {dtype.name}, {config.init} init (seed {args.seed}), on {source}"
    )
    started = time.perf_counter()
    rows = gradcheck(params, x, y, spec, rtol=rtol, atol=atol)
    print(format_table(rows, rtol, atol))
    print(f"({time.perf_counter() - started:.1f} s, including JAX compilation)")
    return 0 if all(row.passed for row in rows) else 1


def _run_study(args: argparse.Namespace) -> int:
    from research.data import DataError
    from research.study import StudyError, run_study
    from research.study_config import StudyConfigError, load_study_config, with_overrides
    from research.tracking import TrackingError

    try:
        config = with_overrides(
            load_study_config(args.study_file),
            n_trials=args.n_trials,
            timeout=args.timeout,
            epochs=args.epochs,
            name=args.study_name,
        )
        return run_study(
            config,
            storage_url=args.storage,
            tracking_uri=args.tracking_uri,
            workers=args.workers,
            subset=args.subset,
            mnist_dir=args.mnist_dir,
            data_dir=args.data_dir,
            quiet=args.quiet,
            final=not args.no_final,
        )
    except (StudyConfigError, StudyError, DataError, TrackingError) as error:
        raise UserError(str(error)) from None


def _run_ui(args: argparse.Namespace) -> int:
    import contextlib
    import os
    import signal
    import subprocess

    from research.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: binding the MLflow UI to {args.host}: it has no authentication, anyone "
            "who can reach this address can read and change every run",
            file=sys.stderr,
        )
    command = [
        sys.executable, "-m", "mlflow", "ui",
        "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port),
        # One web worker is plenty for one researcher and starts in a few seconds on 2 cores.
        "--workers", "1",
    ]  # fmt: skip

    def stop(signum, frame):
        raise KeyboardInterrupt

    # MLflow's server is a tree of processes (uvicorn, job runners): give it its own process group
    # and stop the whole group on Ctrl-C or SIGTERM, else a killed `ui` leaves it serving.
    previous = signal.signal(signal.SIGTERM, stop)
    server = None
    try:
        # MLflow's background job runners serve features this project does not use.
        environment = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        server = subprocess.Popen(command, start_new_session=True, env=environment)
        address = f"http://{args.host}:{args.port}"
        print(f"MLflow UI on {address} over {uri} (Ctrl-C stops it)", flush=True)
        return server.wait()
    except KeyboardInterrupt:
        for sig, wait in ((signal.SIGINT, 20), (signal.SIGKILL, None)):  # SIGKILL: what is left
            with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
                if server is not None:
                    os.killpg(server.pid, sig)
                    server.wait(timeout=wait)
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)


def _parse_param(name: str, text: str):
    kind = TrainConfig.__dataclass_fields__[name].type
    if kind in (bool, "bool"):
        return text == "True"
    if kind in (int, "int"):
        return int(text)
    if kind in (float, "float"):
        return float(text)
    return text


def _kernels_note(logged: str | None, current: str) -> str | None:
    """What ``rerun`` says when the run's BLAS kernels may differ from this process's.

    The kernels order the sums of every matrix product, so other kernels give other last bits.
    """
    from research.blas_kernels import UNKNOWN, VARIABLE

    if logged is None:
        return (
            "note: the run did not record its OpenBLAS kernels (it was logged before runs did); "
            f"this process runs {current}. If the run was trained with other kernels, expect "
            "differences in the last bits: on AMD Zen 4, runs logged before the project chose "
            f"the Zen kernels used SkylakeX ({VARIABLE}=SkylakeX python -m research rerun ...)"
        )
    if logged in (current, UNKNOWN) or current == UNKNOWN:
        return None
    return (
        f"note: the run used OpenBLAS's {logged} kernels and this process runs {current}: the "
        "sums round differently, so expect differences in the last bits; on a CPU that "
        f"supports them, {VARIABLE}={logged} python -m research rerun ... uses the run's kernels"
    )


def _run_rerun(args: argparse.Namespace) -> int:
    from threadpoolctl import threadpool_limits

    from research import train as training
    from research.blas_kernels import loaded_kernels
    from research.tracking import TAG_ERROR, TAG_STATE, TrackingError, find_run, metric_history

    try:
        run, handle = find_run(args.run_id, args.tracking_uri)
    except TrackingError as error:
        raise UserError(str(error)) from None
    params = run.data.params
    missing = [name for name in TrainConfig.field_names() if name not in params]
    if missing:
        raise UserError(f"run {args.run_id} lacks the params {', '.join(missing)}; cannot rerun it")
    config = TrainConfig(
        **{name: _parse_param(name, params[name]) for name in TrainConfig.field_names()}
    )
    data = _load_data(args, config.raw_inputs)
    n_rows = int(params.get("n_train_rows", len(data.train)))
    threads = int(params["blas_threads"]) if "blas_threads" in params else None
    keys = ("train/loss", "val/loss", "val/accuracy")
    logged = {key: metric_history(handle, key) for key in keys}
    tags = run.data.tags
    if tags.get(TAG_STATE) == "PRUNED" and logged["val/loss"]:
        # the pruner stopped the trial: retrain only the epochs it ran
        config = replace(config, epochs=len(logged["val/loss"]))
    # a run that diverged (a FAIL trial, a train run) must diverge again, at the same step
    logged_error = tags.get(TAG_ERROR) or tags.get("diverged") or ""
    if not logged_error.startswith("training diverged"):
        logged_error = None
    print(f"rerunning {args.run_id} ({n_rows} training rows, {config.epochs} epochs)")
    note = _kernels_note(params.get("blas_kernels"), loaded_kernels())
    if note:
        print(note)
    history: list[EpochMetrics] = []
    error = None
    with threadpool_limits(limits=threads):
        try:
            training.train(
                config,
                data.train.x[:n_rows],
                data.train.labels[:n_rows],
                data.validation.x,
                data.validation.labels,
                on_epoch=lambda metrics, _: history.append(metrics),
            )
        except DivergenceError as diverged:
            error = str(diverged)
    mismatches = 0
    print(f"{'epoch':>5}  " + "  ".join(f"{k + ' logged':>18}  {'rerun':>18}" for k in keys))
    for metrics in history:
        new = metrics.as_metrics()
        cells = []
        for key in keys:
            old = dict(logged[key]).get(metrics.epoch)
            same = old is not None and old == new[key]
            mismatches += not same
            cells.append(
                f"{'-' if old is None else repr(old):>18}  {new[key]!r:>18}{'' if same else ' *'}"
            )
        print(f"{metrics.epoch:>5}  " + "  ".join(cells))
    logged_epochs = len(logged["val/loss"])
    if logged_epochs != len(history):
        print(f"the run logged {logged_epochs} epochs, the rerun trained {len(history)}")
        mismatches += 1
    if error != logged_error:
        print(f"the run logged: {logged_error or 'no divergence'}")
        print(f"the rerun: {error or 'no divergence'}")
        mismatches += 1
    if mismatches:
        print(f"NOT reproduced: {mismatches} value(s) differ (marked *)")
        return 1
    print(
        f"reproduced exactly: {len(history)} epochs x {len(keys)} metrics identical"
        + (f", then the same divergence: {error}" if error else "")
    )
    return 0


def _run_report(args: argparse.Namespace) -> int:
    from analysis.report import ReportError, build_report
    from research.data import DataError
    from research.tracking import TrackingError

    try:
        build_report(
            args.study,
            tracking_uri=args.tracking_uri,
            out=args.out,
            storage=args.storage,
            mnist_dir=args.mnist_dir,
            data_dir=args.data_dir,
            log_to_mlflow=not args.no_log,
        )
    except (ReportError, TrackingError, DataError) as error:
        raise UserError(str(error)) from None
    return 0


def _run_bench(args: argparse.Namespace) -> int:
    import os

    from research.bench import (
        BenchError,
        format_table,
        metrics_of,
        params_of,
        run_benchmark,
        to_json,
    )
    from research.data import DataError
    from research.tracking import TrackingError, log_benchmark

    if args.rounds is not None and args.rounds < 1:
        raise UserError(f"--rounds {args.rounds} is not allowed; give an integer >= 1")
    json_path = Path(args.json) if args.json else None
    if json_path is not None and not json_path.parent.is_dir():
        raise UserError(f"--json {args.json}: the folder {json_path.parent} does not exist")
    try:
        results = run_benchmark(
            quick=args.quick,
            rounds=args.rounds,
            mnist_dir=args.mnist_dir,
            data_dir=args.data_dir,
            say=lambda line: print(line, file=sys.stderr, flush=True),
        )
    except (BenchError, DataError) as error:
        raise UserError(str(error)) from None
    except KeyboardInterrupt:
        print("interrupted; nothing was logged", file=sys.stderr)
        return 130
    table = format_table(results)
    print(table)
    text = to_json(results)
    if json_path is not None:
        # written beside the target and renamed: never a half-written file
        with tempfile.NamedTemporaryFile("w", dir=json_path.parent, delete=False) as handle:
            handle.write(text)
        os.replace(handle.name, json_path)
        print(f"results written to {json_path}")
    if not args.no_track:
        command = "python -m research bench" + (" --quick" if args.quick else "")
        try:
            run = log_benchmark(
                params_of(results, command),
                metrics_of(results),
                {"bench_table.txt": table + "\n", "bench_results.json": text},
                experiment=args.experiment,
                tracking_uri=args.tracking_uri,
            )
        except TrackingError as error:
            raise UserError(str(error)) from None
        print(f"MLflow run {run.run_id} in experiment '{args.experiment}'")
        print(f"browse it: {run.ui_hint}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = _build_parser().parse_args(argv)
    commands = {
        "train": _run_train,
        "gradcheck": _run_gradcheck,
        "study": _run_study,
        "ui": _run_ui,
        "rerun": _run_rerun,
        "report": _run_report,
        "bench": _run_bench,
    }
    try:
        return commands[args.command](args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (loading data, opening stores)
        print("interrupted", file=sys.stderr)
        return 130
