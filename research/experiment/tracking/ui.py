"""The MLflow UI over a tracking store, as a child process group that stops with us.

The port is checked first (something else listening there would be browsed instead), and the
URL is printed only once the server answers HTTP on it; a server that exits or does not answer
in time is an error, not a URL.

Then come links that open the UI where a user wants to be. MLflow 3.17 opens in its GenAI mode,
its runs table has no metric columns, and its charts overlay the 10 most recent runs; so for
each study in the store (an experiment with a study parent run) and each experiment of
``train`` runs, ``ui`` prints a link to its runs best first, as a table and as charts. The links
open the *Model training* mode (``workflowType=machine_learning``) and a saved view of the
experiment (``viewStateShareKey``; MLflow keeps it as the experiment tag
``mlflow.sharedViewState.<key>`` and lists it in its *Views* menu) that sorts the runs by the
objective and shows the state, the metrics and the searched params as columns. That format is
MLflow's own and undocumented: it is written only for the MLflow versions whose format is known
(:data:`SAVED_VIEW_VERSIONS`, at the end of this module with all of the view's format). Where the
view cannot be written (another MLflow version, a store ``ui`` may not write), the links carry
the sort alone (``orderByKey``, ``orderByAsc``). Each link is printed once the server answers 200
on it.

The server's output is held back while it starts (its last line is the reason of a start that
fails) and passed on to our stderr once it answers, without its access log or Python warnings,
until we stop it: its shutdown prints a CancelledError traceback that is not the user's concern.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import quote, urlencode

from research.experiment.config.fields import FIELDS
from research.experiment.tracking.runs import TAG_ROLE, TAG_STATE, TAG_STUDY
from research.experiment.tracking.stores import redact

LOOPBACK = ("127.0.0.1", "localhost", "::1")
#: Seconds the server may take to answer (it takes 6 to 10 s on 2 cores).
START_SECONDS = 120.0
#: Seconds one call to the server's REST API may take (listing the store for the links).
API_SECONDS = 30.0
#: The metric columns of the view, after the objective.
VIEW_METRICS = ("val/accuracy", "val/loss", "train/loss")
#: The param columns of a view of ``train`` runs: the fields the field table declares as columns
#: (``knob(..., column=True)``), in its order. A study's view shows the fields it searched.
TRAIN_PARAMS = tuple(name for name, field in FIELDS.items() if field.column)
#: A Python warning in the server's output (``file.py:12: SomeWarning: ...``), followed by an
#: indented line of source: start-up noise, never the user's concern.
WARNING_LINE = re.compile(r"^\S.*:\d+: \w*Warning: ")


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


def _base_url(host: str, port: int) -> str:
    """``http://host:port`` as this machine reaches the server: loopback for a wildcard
    address, an IPv6 address in brackets."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _probe_url(host: str, port: int) -> str:
    """Where to ask whether the server answers."""
    return f"{_base_url(host, port)}/health"


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
        warning = False  # the line before was a Python warning: its source line follows
        for raw in stream:
            line = raw.decode("utf-8", "replace")
            if WARNING_LINE.match(line) or (warning and line.startswith((" ", "\t"))):
                warning = True
                continue
            warning = False
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
    a loopback address: the UI has no authentication. Says the URL once the server answers,
    then the links to its studies and train runs (:func:`say_links`).

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

    def stop(signum, frame):
        raise KeyboardInterrupt

    # MLflow's server is a tree of processes (uvicorn, job runners): give it its own process group
    # and stop the whole group on Ctrl-C or SIGTERM, else a killed `ui` leaves it serving.
    previous = signal.signal(signal.SIGTERM, stop)
    server = None
    output = None
    try:
        server = _start_server(uri, host, port)
        assert server.stdout is not None
        output = _Output(server.stdout)
        _wait_for_answer(server, output, host, port, start_seconds)
        output.passing.set()
        say(f"MLflow UI on http://{host}:{port} over {redact(uri)} (Ctrl-C stops it)")
        say_links(_base_url(host, port), say)
        return server.wait()
    except KeyboardInterrupt:
        if output is not None:
            output.passing.clear()  # what a server says while we stop it is not news
        if server is not None:
            _stop(server)
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        if server is not None and server.poll() is not None and server.stdout is not None:
            if output is not None:
                output.thread.join(timeout=5)
            server.stdout.close()


def _start_server(uri: str, host: str, port: int) -> subprocess.Popen[bytes]:
    """``mlflow ui`` in a process group of its own, its output (stdout and stderr) piped."""
    command = [
        sys.executable, "-m", "mlflow", "ui",
        "--backend-store-uri", uri, "--host", host, "--port", str(port),
        # One web worker is plenty for one researcher and starts fastest on 2 cores.
        "--workers", "1",
        # A line per request (some 50 per page) would bury anything worth reading.
        "--uvicorn-opts", "--no-access-log",
    ]  # fmt: skip
    # MLflow's background job runners serve features this project does not use.
    environment = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return subprocess.Popen(
        command,
        start_new_session=True,
        env=environment,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _wait_for_answer(
    server: subprocess.Popen[bytes], output: _Output, host: str, port: int, start_seconds: float
) -> None:
    """Returns once the server answers HTTP; UIError (the server stopped) if it exits first or
    does not answer within ``start_seconds``."""
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


# --- links to where a user wants to be ---------------------------------------------------------


@dataclass(frozen=True)
class Linked:
    """An experiment ``ui`` links to: a study's, or one holding ``train`` runs."""

    experiment_id: str
    title: str  # "study mnist_mlp (experiment 1)"
    objective: str  # the metric its runs are sorted by
    ascending: bool  # True when smaller is better (a loss)
    params: tuple[str, ...]  # the param columns of its view
    tags: dict[str, str]  # the experiment's tags as listed

    @property
    def is_study(self) -> bool:
        return self.title.startswith("study ")

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metric columns of its view: the objective, then the others of VIEW_METRICS."""
        return (self.objective, *(m for m in VIEW_METRICS if m != self.objective))


def _api(base: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """One call to the MLflow REST API of the server at ``base`` (a GET without ``body``)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{base}/api/2.0/mlflow/{path}",
        data=data,
        headers={} if data is None else {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=API_SECONDS) as response:
        return json.loads(response.read() or b"{}")


def _pairs(entries: list[dict[str, str]] | None) -> dict[str, str]:
    """REST ``[{"key": k, "value": v}, ...]`` (tags, params) as a dict."""
    return {entry["key"]: entry.get("value", "") for entry in entries or []}


def _search_runs(base: str, ids: list[str], where: str, limit: int) -> list[dict[str, Any]]:
    body = {"experiment_ids": ids, "filter": where, "max_results": limit}
    return _api(base, "runs/search", body).get("runs", [])


def linked_experiments(base: str) -> list[Linked]:
    """The store's studies (by name), then its experiments of ``train`` runs (by name), as the
    server at ``base`` lists them."""
    experiments: list[dict[str, Any]] = []
    token = None
    while True:
        body = {"max_results": 1000, **({"page_token": token} if token else {})}
        page = _api(base, "experiments/search", body)
        experiments += page.get("experiments", [])
        token = page.get("next_page_token")
        if not token:
            break
    by_id = {experiment["experiment_id"]: experiment for experiment in experiments}
    parents: dict[str, dict[str, Any]] = {}  # experiment id -> its earliest study parent run
    if by_id:
        found = _search_runs(base, list(by_id), f"tags.`{TAG_ROLE}` = 'study'", 1000)
        for run in sorted(found, key=lambda run: int(run["info"].get("start_time") or 0)):
            parents.setdefault(run["info"]["experiment_id"], run)
    studies, trains = [], []
    for experiment_id, experiment in by_id.items():
        tags = _pairs(experiment.get("tags"))
        if experiment_id in parents:
            data = parents[experiment_id]["data"]
            params = _pairs(data.get("params"))
            objective = params.get("objective") or "val/accuracy"
            direction = params.get("direction") or (
                "minimize" if objective.endswith("loss") else "maximize"
            )
            name = _pairs(data.get("tags")).get(TAG_STUDY) or experiment["name"]
            searched = sorted(
                key.removeprefix("search.") for key in params if key.startswith("search.")
            )
            title = f"study {name} (experiment {experiment_id})"
            linked = Linked(
                experiment_id, title, objective, direction == "minimize", tuple(searched), tags
            )
            studies.append((name, linked))
        elif _search_runs(base, [experiment_id], "tags.command = 'train'", 1):
            name = experiment["name"]
            title = f"train runs in {name!r} (experiment {experiment_id})"
            trains.append(
                (name, Linked(experiment_id, title, "val/accuracy", False, TRAIN_PARAMS, tags))
            )
    by_name = sorted(studies, key=lambda pair: pair[0]) + sorted(trains, key=lambda pair: pair[0])
    return [linked for _, linked in by_name]


def runs_link(
    base: str, linked: Linked, view: bool, chart: bool = False, complete: bool = False
) -> str:
    """The link to an experiment's runs, best first: through its saved view (the sort and the
    columns), else with the sort alone in the URL (a URL with a sort ignores a view). With
    ``complete``, a study's COMPLETE trials only (:data:`COMPLETE_FILTER`): its own view."""
    query = {"workflowType": "machine_learning"}
    if view:
        query["viewStateShareKey"] = COMPLETE_VIEW_KEY if complete else VIEW_KEY
    else:
        if complete:
            query["searchFilter"] = COMPLETE_FILTER
        query["orderByKey"] = f"metrics.`{linked.objective}`"
        query["orderByAsc"] = "true" if linked.ascending else "false"
    if chart:
        query["compareRunsMode"] = "CHART"
    text = urlencode(query, quote_via=quote, safe="/")
    return f"{base}/#/experiments/{linked.experiment_id}/runs?{text}"


def answers_200(url: str) -> bool:
    """Whether the server answers 200 with a page on ``url`` (its ``#/...`` part is the page's
    own: not sent)."""
    try:
        with urllib.request.urlopen(url, timeout=API_SECONDS) as response:
            return response.status == 200 and bool(response.read(64))
    except (OSError, ValueError):
        return False


def say_links(base: str, say: Callable[[str], None]) -> None:
    """Says, for each study and experiment of ``train`` runs, the links to its runs best first
    (table and charts), each once it answers 200; a store it cannot list is a note on stderr."""
    try:
        linked = linked_experiments(base)
    except (OSError, ValueError, KeyError) as error:
        print(f"note: cannot list the store's experiments for links: {error}", file=sys.stderr)
        return
    if not linked:
        say("no study or train runs in this store yet")
        return
    views = saved_views_known()
    columns = views
    for experiment in linked:
        view = views and ensure_view(base, experiment)
        columns = columns and view
        links = {
            "runs": runs_link(base, experiment, view),
            "charts": runs_link(base, experiment, view, chart=True),
        }
        if experiment.is_study:  # pruned trials rank by their last epoch: these rank alone
            complete_view = view and ensure_view(base, experiment, complete=True)
            links["complete"] = runs_link(base, experiment, complete_view, complete=True)
        if not all(answers_200(link) for link in links.values()):
            print(f"note: the MLflow UI does not answer {links['runs']}", file=sys.stderr)
            continue
        say(f"{experiment.title}, best {experiment.objective} first:")
        for kind, link in links.items():
            say(f"  {kind + ':':<9} {link}")
    if not columns:
        say("(to see the metrics, add their columns with Columns: see docs/tracking.md)")
    say(MODE_HINT)


#: MLflow 3.17 keeps its mode and a runs table's columns per browser (local storage): the links
#: above carry ``workflowType=machine_learning`` and a saved view, but pages reached by clicking
#: fall back to GenAI mode until the toggle is clicked once, and a reload (its URL has a sort
#: then) drops the view's columns until the view is made the browser's own (docs/tracking.md).
MODE_HINT = (
    'first time in this browser: where a page opens in GenAI mode ("Evaluations"), click "Model '
    'training" at the top left, and on each runs page click "Override saved view", once each: '
    "then pages stay in model-training mode, and reloads and bookmarks keep the columns"
)


# --- MLflow's saved view: undocumented, written only for the versions whose format is known ----

#: The saved view ``ui`` gives each experiment it links to (MLflow's *Views* menu).
VIEW_KEY = "research-best-first"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
#: The second view of a study: its COMPLETE trials only, best first (a pruned trial's last
#: val/accuracy, of an early epoch, would otherwise rank among them).
COMPLETE_VIEW_KEY = "research-complete-best-first"
COMPLETE_FILTER = f"tags.`{TAG_STATE}` = 'COMPLETE' and tags.`{TAG_ROLE}` = 'trial'"
#: The MLflow versions (major, minor) whose saved-view format :func:`ensure_view` writes: that
#: of MLflow 3.17, read in its JS bundle (docs/tracking.md). Any other version gets no view.
SAVED_VIEW_VERSIONS = ((3, 17),)


def mlflow_version() -> str:
    """The installed MLflow's version, the one ``ui`` serves (read without importing it)."""
    from importlib.metadata import version

    return version("mlflow")


def saved_views_known(version: str | None = None) -> bool:
    """Whether ``ui`` knows how MLflow ``version`` (the installed one by default) saves a view;
    if not, it says so once on stderr: the links then carry the sort alone."""
    version = version or mlflow_version()
    major, _, rest = version.partition(".")
    minor = rest.partition(".")[0]
    if major.isdigit() and minor.isdigit() and (int(major), int(minor)) in SAVED_VIEW_VERSIONS:
        return True
    known = ", ".join(f"{a}.{b}.x" for a, b in SAVED_VIEW_VERSIONS)
    print(
        f"note: MLflow {version} may save views differently from MLflow {known}, the format "
        "`ui` knows; its links carry the sort alone, without a saved view",
        file=sys.stderr,
    )
    return False


def view_state(linked: Linked, complete: bool = False) -> dict[str, Any]:
    """The view as MLflow 3.17 saves it: search facets (the sort; the filter of COMPLETE trials
    with ``complete``) and the runs table's columns (MLflow's column keys:
    ``metrics.`val/accuracy```, ``params.`...```)."""
    return {
        **({"searchFilter": COMPLETE_FILTER} if complete else {}),
        "orderByKey": f"metrics.`{linked.objective}`",
        "orderByAsc": linked.ascending,
        "selectedColumns": [
            f"tags.`{TAG_STATE}`",
            *(f"metrics.`{name}`" for name in linked.metrics),
            *(f"params.`{name}`" for name in linked.params),
        ],
    }


def ensure_view(base: str, linked: Linked, complete: bool = False) -> bool:
    """Whether the experiment has the saved view :data:`VIEW_KEY` (with ``complete``,
    :data:`COMPLETE_VIEW_KEY`), writing it if it has none (one that exists is kept: the user may
    have changed it in the UI). False if it cannot be written (a read-only store). Only for an
    MLflow of :data:`SAVED_VIEW_VERSIONS`."""
    tag = f"mlflow.sharedViewState.{COMPLETE_VIEW_KEY}" if complete else VIEW_TAG
    if tag in linked.tags:
        return True
    now = int(time.time() * 1000)
    name = f"{'complete trials, ' if complete else ''}best {linked.objective} first"
    envelope = {  # MLflow 3.17's saved view: its name, times, and the state as JSON text
        "name": name,
        "createdAt": now,
        "updatedAt": now,
        "state": json.dumps(view_state(linked, complete)),
    }
    body = {"experiment_id": linked.experiment_id, "key": tag, "value": json.dumps(envelope)}
    try:
        _api(base, "experiments/set-experiment-tag", body)
    except (OSError, ValueError):  # (urllib's HTTPError and URLError are OSErrors)
        return False
    return True
