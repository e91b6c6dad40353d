"""A report as data (:class:`Report`), written as Markdown (beside its PNGs), as one
self-contained HTML page, and as JSON.

All three are written from the same sections (:func:`sections`), so they always say the same.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.baselines import baselines_table
from analysis.history import IMPORTANCES_METHOD
from analysis.store import StudyResults
from research.data import DATASETS
from research.experiment.tracking.stores import redact

TOP_TRIALS = 10


@dataclass
class Report:
    """Everything the report says, as data (rendered to Markdown, HTML and JSON)."""

    results: StudyResults
    tracking_uri: str
    created: str
    figures: dict[str, str] = field(default_factory=dict)  # file name -> caption
    notes: list[str] = field(default_factory=list)
    test: dict[str, Any] | None = None
    comparison: pd.DataFrame | None = None
    importances: pd.DataFrame | None = None
    seconds: float = 0.0


def pct(value: Any, digits: int = 2) -> str:
    """A fraction as a percentage (``0.9826`` -> ``98.26%``); ``n/a`` if missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or pd.isna(value):
        return "n/a"
    return f"{100 * float(value):.{digits}f}%"


def title_of(dataset: str) -> str:
    """How people write a dataset (``Fashion-MNIST``); a name this version does not know, as
    it is."""
    info = DATASETS.get(dataset)
    return info.title if info else dataset


def seconds(value: Any) -> str:
    """``12.3 s``, or ``an unrecorded time`` for a run that logged none."""
    return "an unrecorded time" if value is None or pd.isna(value) else f"{float(value):.1f} s"


def _cell(value: Any) -> str:
    if isinstance(value, tuple):  # a list field, as it is written: [512, 512]
        return str(list(value))
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def sections(report: Report) -> list[dict[str, Any]]:
    """The report's content in order: each section has a ``title``, ``paragraphs`` (text),
    ``tables`` (DataFrames of text) and ``figures`` (file names)."""
    results = report.results
    out = [_overview_section(report)]
    if results.best is not None:
        out.append(_best_trial_section(results, results.best))
    if report.test:
        dataset = report.test.get("dataset", results.dataset)
        out += _test_sections(report.test, dataset, report.figures)
    if report.comparison is not None and len(report.comparison):
        out.append(_comparison_section(report.comparison))
    search_figures = [
        name
        for name in (
            "loss_curves.png",
            "val_accuracy_vs_params.png",
            "optimization_history.png",
            "param_importances.png",
        )
        if name in report.figures
    ]
    out.append({"title": "The search", "paragraphs": [], "tables": [], "figures": search_figures})
    return out


def _overview_section(report: Report) -> dict[str, Any]:
    """The dataset, objective, sampler, pruner, trial counts, store and notes; the failed
    trials and why, as a table."""
    results = report.results
    trials = results.trials
    counts = trials["state"].value_counts().to_dict()
    overview = [
        f"Dataset: {title_of(results.dataset)}.",
        f"Objective: {results.objective} ({results.direction}). Sampler "
        f"{results.parent_params.get('sampler', '?')}, pruner "
        f"{results.parent_params.get('pruner', '?')}. Trials: {len(trials)} finished ("
        + ", ".join(f"{counts.get(s, 0)} {s}" for s in ("COMPLETE", "PRUNED", "FAIL"))
        + ").",
        f"Tracking store {redact(report.tracking_uri)}; experiment {results.name!r}, parent run "
        f"{results.record.parent_run_id}.",
    ]
    overview += [f"Note: {note}." for note in report.notes]
    failed = trials[trials["state"] == "FAIL"]
    tables = []
    if len(failed):
        tables.append(pd.DataFrame({"trial": failed["trial"], "why it failed": failed["error"]}))
    return {"title": "Overview", "paragraphs": overview, "tables": tables, "figures": []}


def _best_trial_section(results: StudyResults, best: pd.Series) -> dict[str, Any]:
    """The best trial (its objective, epochs, time and searched values) and a table of the
    top :data:`TOP_TRIALS` completed trials."""
    trials = results.trials
    params = {d.name: best[d.name] for d in results.search}
    text = [
        f"Trial {int(best['trial'])}: {results.objective} "
        + (
            pct(best[results.objective])
            if "accuracy" in results.objective
            else f"{best[results.objective]:.4g}"
        )
        + f" after {int(best['epochs_run'])} epochs in {seconds(best['wall_seconds'])}; "
        + ", ".join(f"{k} = {_cell(v)}" for k, v in params.items())
        + "."
    ]
    ranked = trials[trials["state"] == "COMPLETE"].sort_values(
        results.objective, ascending=results.direction != "maximize"
    )
    top = ranked.head(TOP_TRIALS)
    table = pd.DataFrame(
        {
            "trial": top["trial"],
            **{d.name: top[d.name].map(_cell) for d in results.search},
            results.objective: top[results.objective].map(
                pct if "accuracy" in results.objective else _cell
            ),
            "epochs": top["epochs_run"],
            "wall (s)": top["wall_seconds"].map(lambda v: "n/a" if pd.isna(v) else f"{v:.1f}"),
        }
    )
    return {
        "title": "Best trial",
        "paragraphs": [*text, f"The top {len(top)} completed trials:"],
        "tables": [table],
        "figures": [],
    }


def na(show: Any) -> Any:
    """``show`` of a value, or ``n/a`` for a missing one."""
    return lambda value: "n/a" if value is None or pd.isna(value) else show(value)


def comparison_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The comparison's rows as text; a number the store does not hold is ``n/a``."""
    frame = frame.reindex(columns=[*frame.columns, *sorted(COMPARED.difference(frame.columns))])
    return pd.DataFrame(
        {
            "configuration": frame["configuration"],
            "val/accuracy": frame["val/accuracy"].map(pct),
            "test_accuracy": frame["test_accuracy"].map(pct),
            "epochs": frame["epochs"].map(na(lambda v: f"{int(v)}")),
            "wall (s)": frame["wall_seconds"].map(na(lambda v: f"{float(v):.1f}")),
            "parameters": frame["n_params"].map(na(lambda v: f"{int(v):,}")),
            "source": frame["source"],
        }
    )


COMPARED = frozenset({"val/accuracy", "test_accuracy", "epochs", "wall_seconds", "n_params"})


def _comparison_section(frame: pd.DataFrame) -> dict[str, Any]:
    return {
        "title": "The origin's configuration against the tuned best",
        "paragraphs": [
            "Wall time is the training time of that one configuration (a study's is its "
            "best trial's, on the study's training rows); test accuracy of a study is "
            "that of its final refit on train+validation. A configuration this store holds no "
            "run of is n/a throughout."
        ],
        "tables": [comparison_table(frame)],
        "figures": [],
    }


def _test_sections(test: dict[str, Any], name: str, drawn: dict[str, str]) -> list[dict[str, Any]]:
    """The best model on the test split of dataset ``name``, per class, with those of its
    figures that were ``drawn``; and where its accuracy stands against the dataset's published
    results."""
    dataset = title_of(name)
    text = [
        f"Evaluated once on the {dataset} test split: {test['source']}.",
        f"Test accuracy {pct(test['accuracy'])} ({test['correct']:,} of {test['n']:,}); "
        f"95% confidence interval {pct(test['ci_low'])} to {pct(test['ci_high'])} "
        "(Wilson score interval).",
    ]
    if test.get("logged_test_accuracy") is not None:
        text.append(
            f"The study logged test_accuracy {pct(test['logged_test_accuracy'])} for the "
            "same weights."
        )
    per_class = pd.DataFrame(test["per_class"])
    # MNIST's classes are their labels; any other dataset's are named beside them.
    if name == "mnist":
        classes = {"digit": per_class["class"]}
    else:
        classes = {"label": per_class["label"], "class": per_class["class"]}
    table = pd.DataFrame(
        {
            **classes,
            "test rows": per_class["n"],
            "correct": per_class["correct"],
            "accuracy": per_class["accuracy"].map(pct),
            "95% CI": [
                f"{pct(lo)} to {pct(hi)}"
                for lo, hi in zip(per_class["ci_low"], per_class["ci_high"])
            ],
        }
    )
    figures = [
        name
        for name in ("confusion_matrix.png", "per_class_accuracy.png", "misclassified.png")
        if name in drawn
    ]
    sections = [
        {
            "title": "Best model on the test split",
            "paragraphs": text,
            "tables": [table],
            "figures": figures,
        }
    ]
    if test.get("baselines"):
        sections.append(
            {
                "title": f"Against published {dataset} results",
                "paragraphs": [
                    f"Where the test accuracy above stands against published {dataset} test "
                    "accuracies: above or below a baseline when the baseline lies outside our "
                    f"95% interval, within it when inside ({test['n']:,} test rows cannot tell "
                    "the two apart)."
                ],
                "tables": [
                    baselines_table(
                        test["baselines"], test["accuracy"], test["ci_low"], test["ci_high"]
                    )
                ],
                "figures": [],
            }
        )
    return sections


#: What Markdown would read as markup in text from the store (tags, params, names): raw HTML
#: (``<script>``), entities and escapes; and line breaks, which would end a table row or start
#: a heading. Links and images (``[x](javascript:...)``) are broken at ``](``, below.
_MARKDOWN_ESCAPES = str.maketrans(
    {"\\": "\\\\", "&": "&amp;", "<": "&lt;", ">": "&gt;", "\n": " ", "\r": " "}
)


def markdown_text(text: Any) -> str:
    """``text`` as Markdown that shows it as it is, never as markup, a link or HTML."""
    return str(text).translate(_MARKDOWN_ESCAPES).replace("](", "\\](")


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of ``frame`` (cells as text, escaped by
    :func:`markdown_text`, pipes too)."""

    def row(cells: list[Any]) -> str:
        return "| " + " | ".join(markdown_text(_cell(c)).replace("|", "\\|") for c in cells) + " |"

    lines = [row(list(frame.columns)), "| " + " | ".join("---" for _ in frame.columns) + " |"]
    lines += [row(list(values)) for values in frame.itertuples(index=False)]
    return "\n".join(lines)


def _atomic_write(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, suffix=path.suffix, delete=False, encoding="utf-8"
    ) as handle:
        handle.write(text)
    os.replace(handle.name, path)


def write_markdown(report: Report, path: Path) -> None:
    """``report.md``, with the figures as relative links to the PNGs beside it."""
    lines = [
        f"# Study report: {markdown_text(report.results.name)}",
        "",
        f"Made {report.created} by `python -m research report` in {report.seconds:.1f} s.",
    ]
    for section in sections(report):
        lines += ["", f"## {markdown_text(section['title'])}", ""]
        for paragraph in section["paragraphs"]:
            lines += [markdown_text(paragraph), ""]
        for table in section["tables"]:
            lines += [markdown_table(table), ""]
        for name in section["figures"]:
            lines += [f"![{name}]({name})", "", f"*{markdown_text(report.figures[name])}*", ""]
    _atomic_write(path, "\n".join(lines).rstrip() + "\n")


HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Study report: {{ name }}</title>
<style>
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; }
th { background: #f4f6f8; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
.meta { color: #666; }
</style></head><body>
<h1>Study report: {{ name }}</h1>
<p class="meta">Made {{ created }} by <code>python -m research report</code> in {{ seconds }} s.</p>
{% for section in sections %}
<h2>{{ section.title }}</h2>
{% for paragraph in section.paragraphs %}<p>{{ paragraph | safe }}</p>
{% endfor %}
{% for table in section.tables %}{{ table | safe }}
{% endfor %}
{% for figure in section.figures %}<figure><img alt="{{ figure.name }}" src="{{ figure.src }}">
<figcaption>{{ figure.caption }}</figcaption></figure>
{% endfor %}
{% endfor %}
</body></html>
"""


def code_spans(html: str) -> str:
    """Escaped HTML with Markdown's `code` spans as ``<code>`` elements (the report's texts are
    written for Markdown; HTML would show the backticks)."""
    return re.sub(r"`([^`<>]+)`", r"<code>\1</code>", html)


def write_html(report: Report, path: Path, figure_folder: Path) -> None:
    """``report.html``: one file with every figure embedded as a data URI (opens offline)."""
    import jinja2
    from markupsafe import escape

    rendered = []
    for section in sections(report):
        figures = []
        for name in section["figures"]:
            data = base64.b64encode((figure_folder / name).read_bytes()).decode("ascii")
            figures.append(
                {
                    "name": name,
                    "src": f"data:image/png;base64,{data}",
                    "caption": report.figures[name],
                }
            )
        tables = [
            code_spans(table.to_html(index=False, border=0, escape=True, na_rep=""))
            for table in section["tables"]
        ]
        paragraphs = [code_spans(str(escape(p))) for p in section["paragraphs"]]
        rendered.append({**section, "paragraphs": paragraphs, "figures": figures, "tables": tables})
    template = jinja2.Environment(autoescape=True).from_string(HTML)
    text = template.render(
        name=report.results.name,
        created=report.created,
        seconds=f"{report.seconds:.1f}",
        sections=rendered,
    )
    _atomic_write(path, text)


def write_json(report: Report, path: Path) -> None:
    """``report.json``: the numbers behind the report, for scripts and tests."""
    results = report.results
    best = results.best
    payload = {
        "study": results.name,
        "dataset": results.dataset,
        "tracking_uri": redact(report.tracking_uri),
        "parent_run_id": results.record.parent_run_id,
        "objective": results.objective,
        "direction": results.direction,
        "states": results.trials["state"].value_counts().to_dict(),
        "skipped_running": results.skipped_running,
        "best_trial": None if best is None else int(best["trial"]),
        "best_value": None if best is None else float(best[results.objective]),
        "test": report.test,
        "importances": None
        if report.importances is None
        else dict(zip(report.importances["param"], report.importances["importance"])),
        "importances_method": None if report.importances is None else IMPORTANCES_METHOD,
        # each share's range with one completed trial left out at a time (3+ completed trials)
        "importances_leave_one_out": None
        if report.importances is None or "low" not in report.importances
        else {
            row["param"]: [float(row["low"]), float(row["high"])]
            for _, row in report.importances.iterrows()
        },
        "figures": sorted(report.figures),
        "notes": report.notes,
        "seconds": report.seconds,
    }
    _atomic_write(path, json.dumps(payload, indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")
