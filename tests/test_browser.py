"""The MLflow UI as a researcher meets it, in a real headless Chromium (tests/browser.py).

A tiny study with its refit (so a champion is registered), its report, and ``python -m research
ui`` on a free loopback port; then, in a fresh browser profile:

- every link ``ui`` prints opens that experiment's runs with the val/accuracy and research.state
  columns (the charts link: the val/accuracy chart);
- after the one click ``ui`` asks for (*Override saved view*), a reload shows the same columns;
- after the other (*Model training*), a trial reached by clicking opens in model-training mode
  (the experiment's *Runs*, not the GenAI *Evaluations*);
- the champion's model page shows its registered version, not "Not registered";
- report.html shows every image (none broken).

Screenshots of each step are kept under the test's tmp folder. Every wait is on a condition in
the page. Without Chromium this FAILS (``.ci/run`` installs Debian's ``chromium``), unless the
developer says RESEARCH_NO_CHROMIUM=1 (a skip then shows in the summary; CI never sets it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from browser import Browser, chromium_path
from test_study import MNIST_MLP, REPO, STUDY, free_port, run_cli, sqlite_uri, started
from test_ui_and_runs import LINK, wait_for_lines

from research.experiment.tracking.ui import MODE_HINT

#: The runs table's column headers, as the page renders them (MLflow's grid).
HEADERS = (
    "Array.from(document.querySelectorAll('[role=columnheader]'))"
    ".map(e => e.innerText.trim()).filter(t => t)"
)
TABLE_SHOWN = "document.body && /\\d+ matching runs/.test(document.body.innerText)"


def columns_shown(browser: Browser, what: str) -> list[str]:
    """The runs table's headers, once they include val/accuracy and research.state."""
    return browser.wait(
        f"{TABLE_SHOWN} && (() => {{ const h = {HEADERS}; "
        "return h.includes('val/accuracy') && h.includes('research.state') && h; })()",
        f"{what}: the runs table with the val/accuracy and research.state columns",
    )


@pytest.fixture(scope="module")
def chromium() -> str:
    path = chromium_path()
    if path is None:
        if os.environ.get("RESEARCH_NO_CHROMIUM") == "1":
            pytest.skip("RESEARCH_NO_CHROMIUM=1: Chromium is not installed on this machine")
        pytest.fail(
            "Chromium is not installed; install it (apt-get install chromium), or set "
            "RESEARCH_NO_CHROMIUM=1 to skip the browser tests"
        )
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory, chromium):
    """A tiny study with its refit and report, and ``ui`` over it: (base URL, printed lines,
    store URI, report folder)."""
    folder = tmp_path_factory.mktemp("browser")
    uri = sqlite_uri(folder)
    code, out, err = run_cli(
        ["study", str(MNIST_MLP), "--n-trials", "4", "--epochs", "2", "--subset", "2000",
         "--tracking-uri", uri, "--quiet"]
    )  # fmt: skip
    assert code == 0, out + err
    reports = folder / "reports"
    code, out, err = run_cli(["report", STUDY, "--tracking-uri", uri, "--out", str(reports)])
    assert code == 0, out + err
    port = free_port()
    command = [sys.executable, "-m", "research", "ui", "--tracking-uri", uri, "--port", str(port)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = folder / "ui.out"
    with log.open("w") as stdout, started(command, folder, env=env, stdout=stdout) as ui:
        lines = wait_for_lines(log, ui, 6)  # the banner, the study's title and 3 links, the hint
        yield f"http://127.0.0.1:{port}", lines, uri, reports


@pytest.fixture
def browser(chromium):
    opened = Browser(chromium)
    try:
        yield opened
    finally:
        opened.close()


@pytest.mark.slow
def test_every_printed_link_shows_the_runs_and_a_reload_keeps_them(served, browser, tmp_path):
    _, lines, _, _ = served
    assert lines[-1] == MODE_HINT
    links = dict(match.groups() for line in lines if (match := LINK.match(line)))
    assert set(links) == {"runs", "charts", "complete"}
    for kind in ("runs", "complete"):
        browser.open(links[kind])
        columns_shown(browser, f"the {kind} link")
        browser.screenshot(tmp_path / f"{kind}.png")
    counts = {}
    for kind in ("runs", "complete"):  # the complete trials only: fewer rows
        browser.open(links[kind])
        columns_shown(browser, f"the {kind} link again")
        counts[kind] = int(
            browser.wait(
                f"{TABLE_SHOWN} && document.body.innerText.match(/(\\d+) matching runs/)[1]",
                "the count of runs",
            )
        )
    assert 0 < counts["complete"] < counts["runs"], counts  # (the parent run is no trial)
    browser.open(links["charts"])
    browser.wait(
        f"{TABLE_SHOWN} && document.querySelectorAll('canvas, svg').length > 0 && "
        "document.body.innerText.includes('val/accuracy')",
        "the charts link: the val/accuracy chart",
    )
    browser.screenshot(tmp_path / "charts.png")

    # the click ui asks for, then a reload (its URL now carries the sort) keeps the columns
    browser.open(links["runs"])
    columns_shown(browser, "the runs link before the override")
    assert browser.click_text("Override saved view", "button")
    browser.wait("!document.body.innerText.includes('Override saved view')", "the override")
    browser.reload()  # (the URL now carries the sort, which makes MLflow ignore the saved view)
    assert "orderByKey" in browser.evaluate("location.href")
    columns_shown(browser, "the runs page after a reload")
    browser.screenshot(tmp_path / "reloaded.png")


@pytest.mark.slow
def test_a_trial_reached_by_clicking_stays_in_model_training_mode(served, browser, tmp_path):
    _, lines, _, _ = served
    links = dict(match.groups() for line in lines if (match := LINK.match(line)))

    def open_a_trial_by_clicking() -> str:
        browser.open(links["runs"])
        columns_shown(browser, "the runs link")
        assert browser.click_text("trial-0000", "a")
        browser.wait(
            "location.hash.includes('/runs/') && document.body.innerText.includes('Description')",
            "the trial's page",
        )
        return browser.text()

    # MLflow 3.17 falls back to its GenAI mode on a page reached by clicking, until the one
    # click ui asks for, on "Model training" there; then the browser keeps the mode
    first = open_a_trial_by_clicking()
    if "Evaluations" in first:
        browser.screenshot(tmp_path / "trial-genai.png")
        assert browser.click_text("Model training", "label, button, span, div[role=radio]")
        browser.wait("!document.body.innerText.includes('Evaluations')", "the toggle")
    text = open_a_trial_by_clicking()
    browser.screenshot(tmp_path / "trial.png")
    assert "Evaluations" not in text and "Training runs" not in text, text[:600]  # not GenAI
    assert "COMPLETE: val/accuracy" in text  # the trial's description


@pytest.mark.slow
def test_the_champions_model_page_shows_its_registered_version(served, browser, tmp_path):
    from test_study import mlflow_client

    base, _, uri, _ = served
    client = mlflow_client(uri)
    champion = client.get_model_version_by_alias(STUDY, "champion")
    experiment = client.get_experiment_by_name(STUDY).experiment_id
    model_id = champion.source.removeprefix("models:/")
    browser.open(
        f"{base}/#/experiments/{experiment}/models/{model_id}?workflowType=machine_learning"
    )
    browser.wait(
        "document.body && document.body.innerText.includes('Model versions')", "the model page"
    )
    version = f"v{champion.version}"
    browser.wait(
        f"(() => {{ const t = document.body.innerText; const i = t.indexOf('Model versions');"
        f" return t.slice(i, i + 200).includes({STUDY!r}) && t.slice(i, i + 200).includes("
        f"{version!r}); }})()",
        f"the model page naming {STUDY} {version}",
    )
    # its one metric is its test accuracy, not the study's best_value (a validation figure)
    browser.wait("document.body.innerText.includes('test_accuracy')", "the model's metric")
    browser.screenshot(tmp_path / "champion.png")
    text = browser.text()
    assert "Not registered" not in text
    assert "best_value" not in text and "n_trials_complete" not in text


@pytest.mark.slow
def test_the_report_shows_every_image(served, browser, tmp_path):
    _, _, _, reports = served
    html = Path(reports) / "report.html"
    browser.open(html.as_uri())
    browser.wait("document.readyState === 'complete'", "report.html")
    images = browser.evaluate(
        "Array.from(document.images).map(i => [i.alt, i.complete && i.naturalWidth > 0])"
    )
    assert images and all(shown for _, shown in images), images
    assert len(images) == len(list(Path(reports).glob("*.png")))
    browser.screenshot(tmp_path / "report.png")
