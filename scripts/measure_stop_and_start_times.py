"""How fast the commands answer a user, measured on real processes (figures: docs/reliability.md).

- Ctrl-C and SIGTERM to ``python -m research study`` in the middle of a trial: the seconds from
  the signal to the process's exit (the tests check what the stop leaves behind, within 60 s);
- ``python -m research ui``: the seconds from its start to the line with its URL, printed once
  the server answers HTTP (the tests check that it answers then).

Each is measured ``ROUNDS`` times (default 3) in a temporary folder, on the MNIST folder of
$RESEARCH_MNIST_DIR (or ``--mnist-dir`` beside it, as for the commands).

    .venv/bin/python scripts/measure_stop_and_start_times.py [ROUNDS]
"""

from __future__ import annotations

import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
MID_TRIAL = re.compile(r"^trial \d+ epoch 1/3")


def research(argv: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "research", *argv],
        cwd=cwd,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def seconds_to_stop(sent_signal: signal.Signals, folder: Path) -> float:
    """A one-trial study (3 epochs on 1,000 rows) in a new store in ``folder``, signalled after
    its first epoch."""
    folder.mkdir()
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    argv = [
        "study", str(REPO / "experiments" / "mnist_mlp.toml"), "--n-trials", "1",
        "--epochs", "3", "--subset", "1000", "--tracking-uri", uri, "--no-final",
    ]  # fmt: skip
    with research(argv, folder) as study:
        for line in study.stdout:
            if MID_TRIAL.search(line):
                break
        else:
            raise SystemExit(f"the study ended before its first epoch: {study.stderr.read()}")
        sent = time.monotonic()
        study.send_signal(sent_signal)
        study.wait(timeout=120)
        return time.monotonic() - sent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def seconds_to_url(folder: Path) -> float:
    """``ui`` over the store a study above wrote in ``folder``, until it prints its URL."""
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    argv = ["ui", "--port", str(free_port()), "--tracking-uri", uri]
    started = time.monotonic()
    with research(argv, folder) as ui:
        try:
            banner = ui.stdout.readline()  # blocks until the server answers
            waited = time.monotonic() - started
            if not banner.startswith("MLflow UI on http://"):
                raise SystemExit(f"ui printed {banner!r}: {ui.stderr.read()}")
            return waited
        finally:
            ui.send_signal(signal.SIGTERM)
            ui.wait(timeout=60)


def report(what: str, seconds: list[float]) -> None:
    listed = ", ".join(f"{s:.1f}" for s in seconds)
    print(f"{what}: median {statistics.median(seconds):.1f} s ({listed} s)", flush=True)


def main(rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="research-stop-start-") as name:
        folder = Path(name)
        for sent_signal in (signal.SIGINT, signal.SIGTERM):
            seconds = [
                seconds_to_stop(sent_signal, folder / f"{sent_signal.name}-{number}")
                for number in range(rounds)
            ]
            report(f"{sent_signal.name} mid-trial to exit", seconds)
        store = folder / "SIGINT-0"
        report("ui start to its URL", [seconds_to_url(store) for _ in range(rounds)])


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
