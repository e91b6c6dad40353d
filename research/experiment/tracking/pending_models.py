"""MLflow models left PENDING: a process killed while logging a model never finalizes it.

Every LoggedModel this project creates names its writer (:data:`TAG_WRITER`, ``host:pid:start
time``); :func:`fail_abandoned_models` marks FAILED those whose writer is gone.
"""

from __future__ import annotations

import time
from typing import Any

from research.experiment.tracking.processes import process_alive
from research.experiment.tracking.stores import store_writes

#: Tag of a LoggedModel: the process logging it, ``host:pid:start time``.
TAG_WRITER = "research.writer"
#: A PENDING model whose writer runs on another host (or is not named) is taken as abandoned
#: once this old: logging one takes seconds.
ABANDONED_SECONDS = 600


def _abandoned(model: Any, now: float) -> bool:
    """Whether a PENDING LoggedModel's writer is gone: on this host, its process; elsewhere
    (or unnamed), after :data:`ABANDONED_SECONDS`."""
    alive = process_alive(model.tags.get(TAG_WRITER, ""))
    if alive is not None:
        return not alive
    return now - model.creation_timestamp / 1000 > ABANDONED_SECONDS


def fail_abandoned_models(run: Any) -> list[str]:
    """Marks FAILED the LoggedModels of ``run``'s experiment (a study's: a few refits; ``run``
    is a ``models.OpenRun``) left PENDING by a process that died while logging them
    (``kill -9``: MLflow never finalized them); returns their ids. Their run tells nothing: a
    study's parent is RUNNING again while the next command works."""
    from mlflow.entities import LoggedModelStatus

    now, found, token = time.time(), [], None
    with store_writes(run.tracking_uri):
        # All of them, sorted out here: MLflow's SQL stores keep the status as a number, so a
        # filter on it matches nothing in SQLite and is an error in PostgreSQL.
        while True:
            page = run.client.search_logged_models(
                [run.experiment_id], max_results=100, page_token=token
            )
            found += [m for m in page if m.status == LoggedModelStatus.PENDING]
            if not (token := page.token):
                break
        failed = [model.model_id for model in found if _abandoned(model, now)]
        for model_id in failed:
            run.client.set_logged_model_tags(
                model_id, {"research.error": "its process died while logging it"}
            )
            run.client.finalize_logged_model(model_id, "FAILED")
    return failed
