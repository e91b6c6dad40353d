"""No command prints a password: ``study``, ``train``, ``reproduce``, ``report`` and ``ui`` run
against a real PostgreSQL store and storage whose URLs carry one, and their whole output (stdout
and stderr, the browse hints included) is searched for it. The test server trusts loopback
connections, so the password is carried along but never checked."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_reliability import new_database, postgres  # noqa: F401  (the PostgreSQL server)
from test_reproduce import TINY
from test_study import free_port

REPO = Path(__file__).resolve().parents[1]
PASSWORD = "s3cret-Pa55word"


def with_password(url: str) -> str:
    """``postgresql://postgres@host:port/db`` with the password after the user."""
    return url.replace("postgres@", f"postgres:{PASSWORD}@", 1)


def research(argv: list[str], cwd: Path, timeout: float = 600) -> str:
    """``python -m research ...`` in a process of its own: everything it printed."""
    done = subprocess.run(
        [sys.executable, "-m", "research", *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    printed = done.stdout + done.stderr
    assert done.returncode in (0, 1, 2), printed
    return printed


def ui_output(uri: str, cwd: Path, seconds: float = 120) -> str:
    """What ``ui`` prints until its links are out (then it is stopped with Ctrl-C)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "research", "ui", "--tracking-uri", uri, "--port", str(free_port())],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    linked = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if line.startswith("first time in this browser"):  # its last line: the hint
                linked.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + seconds
        while not linked.wait(0.5) and process.poll() is None:
            assert time.monotonic() < deadline, "".join(lines)
        assert linked.is_set(), "".join(lines)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        reader.join(timeout=10)
        process.stdout.close()  # type: ignore[union-attr]
    return "".join(lines)


@pytest.mark.slow
def test_no_command_prints_the_password_of_a_store(tmp_path, postgres):  # noqa: F811
    store = with_password(new_database(postgres, "credentials_mlflow"))
    storage = with_password(new_database(postgres, "credentials_optuna"))
    paper = tmp_path / "paper.toml"
    paper.write_text(TINY)
    tiny = ["--quiet", "--tracking-uri", store]
    study = [
        "study", str(REPO / "experiments" / "mnist_mlp.toml"), "--n-trials", "1", "--epochs",
        "1", "--subset", "500", "--storage", storage, *tiny,
    ]  # fmt: skip
    outputs = {
        "train": research(["train", "--subset", "500", "--epochs", "1", "--hidden", "16", *tiny],
                          tmp_path),
        "study": research(study, tmp_path),
        "reproduce": research(["reproduce", str(paper), "--quick", *tiny], tmp_path),
        "report": research(["report", "mnist_mlp", "--tracking-uri", store, "--storage", storage,
                            "--out", str(tmp_path / "report")], tmp_path),
        "ui": ui_output(store, tmp_path),
        # a store that cannot be reached: the error names it, without the password
        "unreachable": research(["train", "--subset", "500", "--epochs", "1", "--quiet",
                                 "--tracking-uri", with_password(
                                     "postgresql://postgres@127.0.0.1:1/nowhere")], tmp_path),
    }  # fmt: skip
    assert (
        "browse it: python -m research ui --tracking-uri postgresql://postgres:***@"
        in (outputs["train"])
    )
    assert "--tracking-uri postgresql://postgres:***@" in outputs["study"]
    for command, printed in outputs.items():
        assert PASSWORD not in printed, f"{command} printed the password:\n{printed}"
    # (and nothing secret went to the report's files either)
    for path in (tmp_path / "report").rglob("*"):
        if path.is_file() and path.suffix in (".html", ".md", ".json", ".txt"):
            assert PASSWORD not in path.read_text(errors="replace"), path
