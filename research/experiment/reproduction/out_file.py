"""``reproduce --out``: the table written to a file whole or not at all, the file checked
before anything trains."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from research.experiment.config.fields import ConfigError


def _out_temporary(out: Path) -> Path:
    """Where ``--out`` is written first: a hidden file in the same folder (renamed over it)."""
    return out.parent / f".{out.name}.tmp"


def check_out(out: Path) -> None:
    """ConfigError unless ``out`` can take the table: not a folder nor a device, in a folder
    that exists and where its temporary file can be made (it is tried, then removed)."""
    allowed = "a file in an existing folder you can write to"
    where = f"--out {out}"  # (in full: a value would be shortened)
    if out.is_dir():
        raise ConfigError(where, "is a folder", allowed=f"{allowed}, e.g. {out / 'table.md'}")
    if out.exists() and not out.is_file():
        raise ConfigError(where, "is not a regular file", allowed=allowed)
    if not out.parent.is_dir():
        missing = "is not a folder" if out.parent.exists() else "does not exist"
        raise ConfigError(where, f"its folder {out.parent} {missing}", allowed=allowed)
    temporary = _out_temporary(out)
    try:
        temporary.write_text("")
        temporary.unlink()
    except OSError as error:
        problem = f"cannot write in its folder {out.parent}: {error.strerror or error}"
        raise ConfigError(where, problem, allowed=allowed) from None


def write_out(out: Path, text: str) -> None:
    """Writes ``text`` to ``out`` whole or not at all: to its temporary file, then renamed."""
    temporary = _out_temporary(out)
    try:
        temporary.write_text(text)
        os.replace(temporary, out)
    except OSError as error:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise OSError(
            f"cannot write the table to {out}: {error.strerror or error}; it is printed above "
            "and in the parent run (reproduce.md); the same command writes it again"
        ) from None
