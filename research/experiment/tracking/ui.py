"""The MLflow UI over a tracking store, as a child process group that stops with us."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve_ui(uri: str, host: str, port: int, say: Callable[[str], None] = print) -> int:
    """Runs ``mlflow ui`` over the store ``uri`` on ``host:port`` until it exits, Ctrl-C or
    SIGTERM; returns its exit code (0 when stopped by us). Warns on stderr when ``host`` is not
    a loopback address: the UI has no authentication."""
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
    try:
        # MLflow's background job runners serve features this project does not use.
        environment = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        server = subprocess.Popen(command, start_new_session=True, env=environment)
        say(f"MLflow UI on http://{host}:{port} over {uri} (Ctrl-C stops it)")
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
