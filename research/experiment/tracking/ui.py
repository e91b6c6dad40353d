"""The MLflow UI over a tracking store, as a child process group that stops with us.

The port is checked first (something else listening there would be browsed instead), and the
URL is printed only once the server answers HTTP on it; a server that exits or does not answer
in time is an error, not a URL.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import IO

LOOPBACK = ("127.0.0.1", "localhost", "::1")
#: Seconds the server may take to answer (it takes 6 to 10 s on 2 cores).
START_SECONDS = 120.0


class UIError(Exception):
    """The UI cannot be served as asked; the message says why and how to fix it."""


def check_port(host: str, port: int) -> None:
    """UIError unless ``host:port`` can be bound now (nothing listens there, the address is
    this machine's)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as error:
        raise UIError(
            f"--host {host}: not an address of this machine ({error}); pass --host 127.0.0.1"
        ) from None
    family, kind, protocol, _, address = infos[0]
    with socket.socket(family, kind, protocol) as probe:
        # as the server binds: a port left in TIME_WAIT by an earlier server is free
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise UIError(
                    f"port {port} on {host} is already in use (another MLflow UI or another "
                    f"server); pass --port with a free port, e.g. --port {port + 1}"
                ) from None
            raise UIError(
                f"cannot listen on {host}:{port}: {error.strerror or error}; pass another "
                "--host or --port"
            ) from None


def _probe_url(host: str, port: int) -> str:
    """Where to ask whether the server answers: loopback for a wildcard address."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}/health" if ":" in host else f"http://{host}:{port}/health"


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            response.read(64)
        return True
    except urllib.error.HTTPError:
        return True  # an HTTP answer, even an error status, is a server answering
    except (OSError, ValueError):
        return False


class _Output:
    """The server's output (stdout and stderr together): held back while it starts, so that a
    server that fails gives its last line in our one-line error; passed on to our stderr once
    it answers."""

    def __init__(self, stream: IO[bytes]):
        self.lines: collections.deque[str] = collections.deque(maxlen=40)
        self.passing = threading.Event()
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode("utf-8", "replace")
            if self.passing.is_set():
                sys.stderr.write(line)
                sys.stderr.flush()
            else:
                self.lines.append(line.rstrip())

    def reason(self) -> str:
        """The server's last error line, else its last line."""
        self.thread.join(timeout=5)
        lines = [line for line in self.lines if line.strip()]
        errors = [line for line in lines if "error" in line.lower()]
        return (errors or lines or ["it printed nothing"])[-1].strip()


def _stop(server: subprocess.Popen[bytes]) -> None:
    """Stops the server's whole process group: Ctrl-C first, SIGKILL for what is left."""
    for sig, wait in ((signal.SIGINT, 20), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError, PermissionError, subprocess.TimeoutExpired):
            os.killpg(server.pid, sig)
            server.wait(timeout=wait)


def serve_ui(
    uri: str,
    host: str,
    port: int,
    say: Callable[[str], None] = print,
    start_seconds: float = START_SECONDS,
) -> int:
    """Runs ``mlflow ui`` over the store ``uri`` on ``host:port`` until it exits, Ctrl-C or
    SIGTERM; returns its exit code (0 when stopped by us). Warns on stderr when ``host`` is not
    a loopback address: the UI has no authentication. Says the URL once the server answers.

    Raises:
        UIError: the port is taken or cannot be bound, or the server exits or does not answer
            within ``start_seconds``.
    """
    check_port(host, port)
    if host not in LOOPBACK:
        print(
            f"warning: binding the MLflow UI to {host}: it has no authentication, anyone who "
            "can reach this address can read and change every run",
            file=sys.stderr,
        )
    command = [
        sys.executable, "-m", "mlflow", "ui",
        "--backend-store-uri", uri, "--host", host, "--port", str(port),
        # One web worker is plenty for one researcher and starts fastest on 2 cores.
        "--workers", "1",
    ]  # fmt: skip

    def stop(signum, frame):
        raise KeyboardInterrupt

    # MLflow's server is a tree of processes (uvicorn, job runners): give it its own process group
    # and stop the whole group on Ctrl-C or SIGTERM, else a killed `ui` leaves it serving.
    previous = signal.signal(signal.SIGTERM, stop)
    server = None
    output = None
    try:
        # MLflow's background job runners serve features this project does not use.
        environment = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        server = subprocess.Popen(
            command,
            start_new_session=True,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert server.stdout is not None
        output = _Output(server.stdout)
        url = _probe_url(host, port)
        deadline = time.monotonic() + start_seconds
        while not _answers(url):
            code = server.poll()
            if code is not None:
                raise UIError(
                    f"the MLflow UI stopped (exit code {code}) before it answered on "
                    f"{host}:{port}: {output.reason()}"
                )
            if time.monotonic() > deadline:
                _stop(server)
                raise UIError(
                    f"the MLflow UI did not answer on {host}:{port} within {start_seconds:g} s "
                    f"(its last words: {output.reason()}); it was stopped"
                )
            time.sleep(0.1)
        output.passing.set()
        say(f"MLflow UI on http://{host}:{port} over {uri} (Ctrl-C stops it)")
        return server.wait()
    except KeyboardInterrupt:
        if server is not None:
            _stop(server)
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        if server is not None and server.poll() is not None and server.stdout is not None:
            if output is not None:
                output.thread.join(timeout=5)
            server.stdout.close()
