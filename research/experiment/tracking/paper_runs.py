"""A paper's runs in MLflow, for ``reproduce``: the parent run a command continues, its rows as
they were logged, and the rows a killed command left open.

A ``reproduce`` parent carries the digest of the paper file's settings (:data:`TAG_PAPER_KEY`)
and the command that has it open (:data:`TAG_COMMAND`, ``host:pid:start``); each row's run the
digest of what it trains (:data:`TAG_ROW_KEY`). :func:`claim_parent`, under the store's lock,
continues the latest parent with the same digest (marked RUNNING again) or makes a new one.
This module talks to MLflow only: whether a command still runs is the caller's to say.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from research.experiment.tracking.runs import (
    TAG_ERROR,
    TAG_NOTE,
    TAG_PARENT,
    TAG_ROLE,
    TAG_STATE,
    RunEnd,
    TrackedRun,
    source_tags,
)
from research.experiment.tracking.stores import (
    TrackingError,
    get_or_create_experiment,
    mlflow_client,
    redact,
    resolve_tracking_uri,
    store_error,
    store_lock,
    store_writes,
)

TAG_PAPER_KEY = "research.paper_key"  # on a parent: the digest of the paper file's settings
TAG_ROW_KEY = "research.row_key"  # on a row: the digest of the row's settings
TAG_COMMAND = "research.command_process"  # on a parent: host:pid:start of the command using it


@dataclass(frozen=True)
class PaperParent:
    """The parent run a ``reproduce`` command logs under: continued, or new."""

    run: TrackedRun
    #: The MLflow status it had when this command took it (FINISHED, FAILED, KILLED, or RUNNING
    #: for one whose command is gone); None for a new parent.
    continued: str | None
    #: The command that had it open before (``host:pid:start``), if any.
    previous_command: str = ""


@dataclass(frozen=True)
class LoggedRow:
    """A row's run as it was logged under a parent."""

    run_id: str
    name: str
    status: str  # MLflow's: RUNNING, FINISHED, FAILED, KILLED
    start_time: int
    tags: dict[str, str]
    metrics: dict[str, float]  # the last value of each


def claim_parent(
    experiment: str,
    key: str,
    command: str,
    *,
    still_running: Callable[[str], bool],
    fresh: bool = False,
    run_name: str = "reproduce",
    tags: dict[str, str] | None = None,
    tracking_uri: str | None = None,
) -> PaperParent:
    """The parent run for the paper file whose settings digest to ``key``, held by ``command``.

    The latest parent in ``experiment`` with that ``key`` is continued (unless ``fresh``): set
    RUNNING again, its old error and description removed. A RUNNING one whose command
    ``still_running`` says may still run is refused (TrackingError), so two commands never log
    into one parent. Without one, a new parent is made with ``tags``. All under the store's lock.
    """
    uri = resolve_tracking_uri(tracking_uri)
    try:
        with store_lock(uri):
            client = mlflow_client(uri)
            experiment_id = get_or_create_experiment(client, experiment, uri)
            latest = None if fresh else _latest_parent(client, experiment_id, key)
            if latest is None:
                made = client.create_run(
                    experiment_id,
                    run_name=run_name,
                    tags={
                        **source_tags((tags or {}).get("command", "")),
                        **(tags or {}),
                        TAG_ROLE: "reproduce",
                        TAG_PAPER_KEY: key,
                        TAG_COMMAND: command,
                        TAG_STATE: "RUNNING",
                    },
                )
                return PaperParent(TrackedRun(client, made.info.run_id, experiment_id, uri), None)
            holder = latest.data.tags.get(TAG_COMMAND, "")
            if latest.info.status == "RUNNING" and still_running(holder):
                raise TrackingError(
                    f"the parent run {latest.info.run_id} of this paper file (experiment "
                    f"{experiment!r} in {redact(uri)}) is in use by the command {holder} "
                    "(host:pid:start), which may still run: wait for it to end, or pass --fresh "
                    "for a new parent run (a command on another machine cannot be seen from here)"
                )
            _reopen(client, latest, command)
    except TrackingError:
        raise
    except Exception as error:  # MLflow raises many kinds; the user needs the URI and the cause.
        raise store_error(uri, error) from None
    run = TrackedRun(client, latest.info.run_id, experiment_id, uri)
    return PaperParent(run, latest.info.status, holder)


def _latest_parent(client, experiment_id: str, key: str):
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_ROLE}` = 'reproduce' and tags.`{TAG_PAPER_KEY}` = '{key}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return found[0] if found else None


def _reopen(client, run, command: str) -> None:
    """Marks ``run`` RUNNING again, held by ``command``; how it ended before is removed (its
    error and description would otherwise outlive the new ending)."""
    run_id = run.info.run_id
    for tag in (TAG_ERROR, TAG_NOTE):
        if tag in run.data.tags:
            client.delete_tag(run_id, tag)
    client.set_tag(run_id, TAG_COMMAND, command)
    client.set_tag(run_id, TAG_STATE, "RUNNING")
    client.update_run(run_id, status="RUNNING")


def logged_rows(parent: TrackedRun) -> list[LoggedRow]:
    """Every row run under ``parent``, earliest first."""
    with store_writes(parent.tracking_uri):
        found = parent.client.search_runs(
            [parent.experiment_id],
            filter_string=f"tags.`{TAG_PARENT}` = '{parent.run_id}'",
            max_results=10_000,
        )
    rows = [
        LoggedRow(
            run_id=run.info.run_id,
            name=run.info.run_name or "",
            status=run.info.status,
            start_time=run.info.start_time or 0,
            tags=dict(run.data.tags),
            metrics=dict(run.data.metrics),
        )
        for run in found
    ]
    return sorted(rows, key=lambda row: (row.start_time, row.run_id))


def metric_histories(
    parent: TrackedRun, run_id: str, keys: Sequence[str]
) -> dict[str, list[tuple[int, float]]]:
    """Every logged ``(step, value)`` of ``keys`` for the run ``run_id``, in step order."""
    with store_writes(parent.tracking_uri):
        return {
            key: sorted((m.step, m.value) for m in parent.client.get_metric_history(run_id, key))
            for key in keys
        }


def close_row(parent: TrackedRun, row: LoggedRow, reason: str) -> None:
    """Ends a row's run left RUNNING (its command is gone): FAILED, with ``reason``."""
    closing = TrackedRun(parent.client, row.run_id, parent.experiment_id, parent.tracking_uri)
    closing.end(RunEnd.FAIL, reason)
