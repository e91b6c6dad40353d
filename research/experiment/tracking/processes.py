"""Which process writes a run, a trial or a model, and whether it still runs.

A process is named ``host:pid:start``: ``start`` is its start time (clock ticks after boot, field
22 of ``/proc/<pid>/stat``), so a later process that reuses the pid (process 1 of every container
start) is not taken for the one that is gone. Studies name a trial's worker so, ``reproduce``
the command that holds a paper's parent run, and a study's refit the writer of its MLflow model.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def process_identity() -> str:
    """``host:pid:start``: this process. Both pid and start come from the same /proc: in a PID
    namespace without its own /proc mount, ``os.getpid()`` and /proc would disagree."""
    try:
        pid = int(os.readlink("/proc/self"))
    except (OSError, ValueError):
        return f"{socket.gethostname()}:{os.getpid()}:"
    return f"{socket.gethostname()}:{pid}:{process_start(pid) or ''}"


def process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (field 22 of /proc/<pid>/stat); None if it has none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: count after it.
    fields = text[text.rindex(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def process_alive(identity: str) -> bool | None:
    """Whether the process named ``identity`` (``host:pid:start``; ``host:pid`` from older
    versions) still runs; None when it ran on another host (or is unnamed), which cannot be
    seen from here."""
    host, _, rest = identity.partition(":")
    pid, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    if start:  # the process with that pid in /proc, started at that time
        return process_start(int(pid)) == start
    try:  # recorded without a start time (older versions, no /proc): trust the pid
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    return True
