"""A throwaway PostgreSQL server on a loopback port, for the tests and for CI (standard library
only, so `.ci/run` can call it with the machine's python3 before the project is installed).

    python3 tests/postgres_server.py find          # the folder holding initdb/pg_ctl, or exit 1
    python3 tests/postgres_server.py start DIR     # prints postgresql://postgres@127.0.0.1:PORT/
    python3 tests/postgres_server.py stop DIR

PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` user (created
by Debian's ``postgresql`` package). Trust authentication on 127.0.0.1 only; fsync off: the data
is thrown away.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
from pathlib import Path

SERVER_USER = "postgres"


def find_binaries() -> Path | None:
    """The folder of initdb and pg_ctl: on PATH, else Debian's /usr/lib/postgresql/<v>/bin."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).resolve().parent
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4])
    )
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_server_user(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", SERVER_USER, "--", *command]


def start(folder: Path) -> str:
    """Initializes and starts a server with its data in ``folder``; returns its URL (database
    ``postgres``, superuser ``postgres``, no password)."""
    binaries = find_binaries()
    if binaries is None:
        raise RuntimeError(
            "PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin); "
            "install it, e.g. apt-get install postgresql"
        )
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        user = pwd.getpwnam(SERVER_USER)  # KeyError: no such user; installing postgresql adds it
        os.chown(folder, user.pw_uid, user.pw_gid)
    data = folder / "data"
    port = _free_port()
    for command in (
        [str(binaries / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
         "-E", "UTF8", "--no-locale", "--no-sync"],
        [str(binaries / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"), "-w",
         "-t", "60", "-o", f"-h 127.0.0.1 -p {port} -k {folder} -c fsync=off", "start"],
    ):  # fmt: skip
        done = subprocess.run(_as_server_user(command), capture_output=True, text=True)
        if done.returncode != 0:
            log = folder / "server.log"
            raise RuntimeError(
                f"{' '.join(command[:1])} failed ({done.returncode}): {done.stderr.strip()}"
                + (f"\n{log.read_text()}" if log.exists() else "")
            )
    return f"postgresql://postgres@127.0.0.1:{port}/postgres"


def pause(folder: Path) -> None:
    """Stops the server of ``folder`` as a restart does (fast shutdown: its sessions are cut),
    keeping its data; :func:`resume` starts it again."""
    binaries = find_binaries()
    command = [str(binaries / "pg_ctl"), "-D", str(folder / "data"), "-m", "fast", "-w", "stop"]
    subprocess.run(_as_server_user(command), capture_output=True, text=True, check=True)


def resume(folder: Path, url: str) -> None:
    """Starts the server of ``folder`` that :func:`pause` stopped, on the port of ``url``."""
    binaries = find_binaries()
    port = url.split("@127.0.0.1:", 1)[1].split("/", 1)[0]
    command = [
        str(binaries / "pg_ctl"), "-D", str(folder / "data"), "-l", str(folder / "server.log"),
        "-w", "-t", "60", "-o", f"-h 127.0.0.1 -p {port} -k {folder} -c fsync=off", "start",
    ]  # fmt: skip
    subprocess.run(_as_server_user(command), capture_output=True, text=True, check=True)


def stop(folder: Path) -> None:
    """Stops the server of ``folder`` (if running) and deletes the folder."""
    binaries = find_binaries()
    if binaries is not None and (folder / "data" / "postmaster.pid").exists():
        command = [str(binaries / "pg_ctl"), "-D", str(folder / "data"), "-m", "fast", "-w", "stop"]
        subprocess.run(_as_server_user(command), capture_output=True, text=True)
    shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str]) -> int:
    if argv[:1] == ["find"]:
        binaries = find_binaries()
        print(binaries or "PostgreSQL not found")
        return 0 if binaries else 1
    if len(argv) == 2 and argv[0] in ("start", "stop"):
        try:
            if argv[0] == "start":
                print(start(Path(argv[1])))
            else:
                stop(Path(argv[1]))
        except (RuntimeError, KeyError, OSError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
