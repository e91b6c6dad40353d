"""Ctrl-C and SIGTERM during training: how they stop a run, and bookkeeping they must not cut.

SIGTERM is handled as Ctrl-C is (:class:`Terminated` is a ``KeyboardInterrupt``); an interrupt
that lands where Python cannot raise it (a finalizer) is kept and raised at the next check
(:func:`raise_pending_interrupt`, called by the training loop after every epoch); bookkeeping
that must not be cut in half runs inside :func:`signals_deferred`. Imported through
:mod:`.train` as well, where these lived first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


class Terminated(KeyboardInterrupt):
    """SIGTERM (what ``kill``, systemd and supervisord send), handled exactly like Ctrl-C: the
    running epoch stops, the run is closed and the trial queued again; the exit code is 143."""


#: Ctrl-C or SIGTERM that landed inside a finalizer or weakref callback, where Python cannot
#: raise it (it prints "Exception ignored" and goes on): kept to be raised at the next check.
_swallowed: list[KeyboardInterrupt] = []


def stop_on_sigterm() -> None:
    """Makes SIGTERM raise :class:`Terminated` in the main thread of this process, and keeps an
    interrupt that a finalizer swallowed for :func:`raise_pending_interrupt`."""
    import signal
    import sys

    def terminated(signum: int, frame: object) -> None:
        raise Terminated("terminated (SIGTERM)")

    signal.signal(signal.SIGTERM, terminated)
    default = sys.unraisablehook

    def keep_interrupts(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            _swallowed.append(unraisable.exc_value)
        else:
            default(unraisable)

    sys.unraisablehook = keep_interrupts


def raise_pending_interrupt() -> None:
    """Raises a Ctrl-C or SIGTERM that arrived where it could not be raised (a finalizer)."""
    if _swallowed:
        raise _swallowed.pop()


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block ends, then are raised: for bookkeeping that must
    not be cut in half (recording how a trial ended, closing its run). A second Ctrl-C is common:
    a terminal sends it to every worker, and the study command forwards its own."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers live in the main thread only
        return
    caught: list[int] = []

    def record(number: int, frame: object) -> None:
        caught.append(number)

    previous = {number: signal.signal(number, record) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if signal.SIGTERM in caught:
        raise Terminated("terminated (SIGTERM)")
    if caught:
        raise KeyboardInterrupt


def interruption(error: BaseException) -> str:
    """How an interrupted run ended, for its MLflow tag and the trial's record."""
    return "terminated (SIGTERM)" if isinstance(error, Terminated) else "interrupted (Ctrl-C)"
