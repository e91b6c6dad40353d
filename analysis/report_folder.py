"""Where a report is written: the output folder, checked before any work (a new, empty or
earlier report's folder only), and the finished report put in its place whole, never
half-written."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from analysis.render import Report, write_html, write_json, write_markdown
from analysis.style import save_png
from research.experiment.config.fields import show
from research.experiment.tracking.stores import local_store_folder


class ReportError(Exception):
    """The report cannot be made as asked; the message says why and how to fix it."""


def is_folder_name(name: str) -> bool:
    """Whether ``name`` names one folder inside another: not empty, not ``.`` or ``..``, no
    ``/``, ``\\`` or NUL. Every name a study file may have is one, and so are older study
    names that study files no longer allow (``-x``)."""
    return name not in ("", ".", "..") and not any(character in name for character in "/\\\0")


def not_a_folder(name: str) -> str:
    """Why ``name`` cannot be a study's report folder (a sentence to go on)."""
    return f'study name {show(name)} is not a plain folder name (not empty, "." or "..", no "/")'


def default_out_dir(tracking_uri: str, study: str) -> Path:
    """``<store folder>/reports/<study>`` for a local SQLite store, else ``mlruns/reports/``;
    ReportError (asking for ``--out``) if ``study`` cannot name a folder."""
    if not is_folder_name(study):
        raise ReportError(f"{not_a_folder(study)}; pass --out to write its report elsewhere")
    return local_store_folder(tracking_uri) / "reports" / study


REPORT_FILES = ("report.json", "report.md", "report.html")


def check_out_dir(out: Path) -> Path:
    """The absolute output folder, checked before any work: its parent can be written, and it
    is new, empty or an earlier report (which is replaced whole). Any other folder is refused,
    never emptied."""
    out = out.expanduser().resolve()
    if out.parent == out:
        raise ReportError(f"--out {out} is not a folder the report can replace; pass another")
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out} is a file; pass a folder for the report")
    if out.is_dir():
        names = {path.name for path in out.iterdir()}
        earlier = "report.json" in names and all(
            name in REPORT_FILES or name.endswith(".png") for name in names
        )
        if names and not earlier:
            raise ReportError(
                f"--out {out} holds files that are not a report ({', '.join(sorted(names)[:3])}"
                f"{', ...' if len(names) > 3 else ''}); the report replaces its folder whole, so "
                "pass a new or empty folder"
            )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.TemporaryFile(dir=out.parent)
    except OSError as error:
        raise ReportError(
            f"cannot write the report folder {out}: {error.strerror}; pass --out"
        ) from None
    probe.close()
    return out


def _replace_folder(staging: Path, out: Path) -> None:
    """Puts the finished report in place of any older one; never leaves a half-written one."""
    # Temporary files and folders are private (0600/0700); a report is for sharing.
    umask = os.umask(0)
    os.umask(umask)
    for path in staging.iterdir():
        path.chmod(0o666 & ~umask)
    staging.chmod(0o777 & ~umask)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}-old-{os.getpid()}")
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_report_folder(
    report: Report, figures: dict[str, tuple[Any, str]], out: Path, started: float
) -> None:
    """Writes the figures (name -> (figure, caption)), report.md, report.html and report.json
    into a staging folder beside ``out`` and puts it in place of ``out`` whole; fills
    ``report.figures`` and ``report.seconds`` (since ``started``, a ``perf_counter`` time).
    ReportError if the folder cannot be written; nothing half-written is left behind."""
    staging = None
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        for name, (figure, caption) in figures.items():
            save_png(figure, staging / name)
            report.figures[name] = caption
        report.seconds = time.perf_counter() - started
        write_markdown(report, staging / "report.md")
        write_html(report, staging / "report.html", staging)
        write_json(report, staging / "report.json")
        _replace_folder(staging, out)
    except BaseException as error:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError):
            raise ReportError(
                f"cannot write the report into {out}: "
                f"{error.strerror or error} ({error.filename or out}); pass --out"
            ) from None
        raise
