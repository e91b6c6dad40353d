"""The Optuna study object: created or loaded (atomically, so that exactly one command creates
it), its seeded sampler and its pruner, its objective named, and the study file's search space as
Optuna distributions (checked against the study's earlier trials before any trial starts)."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from research.experiment.config.config_text import quoted, show
from research.experiment.config.fields import FIELDS, ConfigError
from research.experiment.config.search_space import SearchParam
from research.experiment.config.study_config import StudyConfig
from research.experiment.studies.storage import StudyError, damaged_journal, open_storage
from research.experiment.tracking.stores import redact


def make_sampler(config: StudyConfig, n_existing: int = 0, worker: int = 0):
    """The study's sampler, seeded from the file's seed, the trials the study already holds and
    the worker index: a resumed study or a second worker must not replay the same suggestions
    (a seeded sampler restarted from the same seed would), yet every run stays reproducible."""
    import optuna

    seed = int(np.random.SeedSequence([config.seed, n_existing, worker]).generate_state(1)[0])
    if config.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(config: StudyConfig):
    import optuna

    if config.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=config.fixed["epochs"])
    if config.pruner == "none":
        return optuna.pruners.NopPruner()
    # By default a trial runs two epochs before it is judged, once 4 trials have finished.
    return optuna.pruners.MedianPruner(
        n_startup_trials=config.n_startup_trials, n_warmup_steps=config.n_warmup_steps
    )


def describe_pruner(pruner: Any) -> str:
    """``MedianPruner(n_startup_trials=4, n_warmup_steps=1)``-style text for the parent run."""
    keys = ("_n_startup_trials", "_n_warmup_steps", "_min_resource", "_max_resource")
    shown = [f"{k.lstrip('_')}={getattr(pruner, k)}" for k in keys if hasattr(pruner, k)]
    return f"{type(pruner).__name__}({', '.join(shown)})"


def load_study(config: StudyConfig, storage_url: str, worker: int = 0):
    """Creates the study, or loads it when it exists (same name, same storage)."""
    return open_study(config, storage_url, worker)[0]


def open_study(config: StudyConfig, storage_url: str, worker: int = 0) -> tuple[Any, bool]:
    """The study, and whether this call created it. Creation is atomic in every storage (a
    journal record, a database row with a unique name): of several commands started together,
    exactly one gets True, so it alone makes the study's MLflow parent run."""
    import optuna

    # Our own lines say what happens per trial and epoch, failures included; Optuna's would
    # repeat them (with a full traceback for every diverged trial).
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = open_storage(storage_url)
    created = True
    try:
        try:
            study = optuna.create_study(
                storage=storage,
                study_name=config.name,
                direction=config.direction,
                sampler=make_sampler(config),
                pruner=make_pruner(config),
            )
        except optuna.exceptions.DuplicatedStudyError:
            created = False
            study = optuna.load_study(
                study_name=config.name,
                storage=storage,
                sampler=make_sampler(config),
                pruner=make_pruner(config),
            )
    except StudyError:
        raise
    except json.JSONDecodeError as error:  # read when the study's first record was appended
        raise damaged_journal(storage_url, error) from None
    except ValueError as error:  # e.g. an existing study with the other direction
        raise StudyError(f"study {config.name!r} in {redact(storage_url)}: {error}") from None
    if study.direction.name.lower() != config.direction:
        raise StudyError(
            f"study {config.name!r} in {redact(storage_url)} exists with direction "
            f"{study.direction.name.lower()}, but the file asks to {config.direction} "
            f"{config.objective}; use another --study-name"
        )
    study.sampler = make_sampler(config, len(study.get_trials(deepcopy=False)), worker)
    name_objective(study, config.objective)
    return study, created


def name_objective(study: Any, objective: str) -> None:
    """Names the study's objective (``val/accuracy``) where Optuna shows it (optuna-dashboard,
    ``trials_dataframe``) instead of "Objective 0"; a study that has the name is not written."""
    import optuna

    with warnings.catch_warnings():  # (metric names are "experimental" in Optuna)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if study.metric_names != [objective]:
            study.set_metric_names([objective])


def study_exists(name: str, storage_url: str) -> bool:
    """Whether the storage holds a study of that name (without creating anything)."""
    import optuna

    return name in optuna.get_all_study_names(open_storage(storage_url))


def distribution(param: SearchParam):
    """The Optuna distribution :func:`suggest` draws ``param`` from."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    if param.kind == "int":
        return IntDistribution(param.low, param.high, log=param.log, step=param.step or 1)
    if param.kind == "float":
        return FloatDistribution(param.low, param.high, log=param.log, step=param.step)
    return CategoricalDistribution(param.optuna_choices())


def describe_distribution(found: Any) -> str:
    """``int [16, 256] log``, ``categorical [16, 64, 256]``: a distribution in a message."""
    from optuna.distributions import CategoricalDistribution

    if isinstance(found, CategoricalDistribution):
        return f"categorical {list(found.choices)}"
    kind = "int" if type(found).__name__.startswith("Int") else "float"
    return f"{kind} [{found.low}, {found.high}]" + (" log" if found.log else "")


def check_search_space(study: Any, config: StudyConfig, storage_url: str) -> None:
    """Refuses, before any trial starts, a search space that Optuna cannot mix with the study's
    earlier trials (a field searched as an integer, now as categorical, or other choices).
    Without this, each attempt adds a FAIL trial with no parameters and uses up the budget."""
    from optuna.distributions import check_distribution_compatibility

    wanted = {param.name: distribution(param) for param in config.search}
    for trial in study.get_trials(deepcopy=False):
        for name, earlier in trial.distributions.items():
            if name not in wanted:
                continue  # no longer searched: the file fixes it now, which Optuna allows
            try:
                check_distribution_compatibility(earlier, wanted[name])
            except ValueError:
                raise StudyError(
                    f"{config.path.name}: [search] {name} is {describe_distribution(wanted[name])}"
                    f", but study {config.name!r} in {redact(storage_url)} searched it as "
                    f"{describe_distribution(earlier)} (trial {trial.number}); Optuna cannot mix "
                    "the two in one study: give this search space a new --study-name, or change "
                    f"{name} back"
                ) from None


def suggest(trial: Any, param: SearchParam) -> Any:
    """One Optuna suggestion for a searched field, named as the field (a list as its text:
    :meth:`StudyConfig.train_config` reads it back)."""
    if param.kind == "int":
        return trial.suggest_int(
            param.name, param.low, param.high, step=param.step or 1, log=param.log
        )
    if param.kind == "float":
        return trial.suggest_float(
            param.name, param.low, param.high, step=param.step, log=param.log
        )
    return trial.suggest_categorical(param.name, param.optuna_choices())


# --- queued trials -------------------------------------------------------------------------------


def queued_misfit(queued: Mapping[str, Any], search: tuple[SearchParam, ...]) -> str | None:
    """Why the parameters queued for a trial (``study.enqueue_trial``'s: a trial given back when
    it was interrupted, or queued by hand) cannot run as queued in today's search space, or
    None. Optuna would run a value outside [low, high], off the step or not among the choices
    as it is, only warning, and would silently ignore a parameter no longer searched. A searched
    parameter the queue leaves out is no misfit: the sampler draws it, as Optuna documents (a
    trial interrupted before it drew all its values is queued so)."""
    searched = {param.name: param for param in search}
    for name, value in queued.items():
        param = searched.get(name)
        if param is None:
            return f"{name} {_shown(name, value)} is no longer in today's [search]"
        why = _outside(param, value)
        if why is not None:
            return f"{name} {_shown(name, value)} {why}"
    return None


def _outside(param: SearchParam, value: Any) -> str | None:
    """How ``value`` misses ``param``'s distribution (as Optuna's ``_contains`` judges it: the
    range, ends included, and the step), or None."""
    if param.kind == "categorical":
        try:
            distribution(param).to_internal_repr(value)
        except ValueError:
            return f"is not among today's [search] choices {quoted(param.choices)}"
        return None
    span = f"{show(param.low)}..{show(param.high)}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"is not a number, as today's [search] range {span} needs"
    if not math.isfinite(value) or not param.low <= value <= param.high:
        return f"is outside today's [search] range {span}"
    step = param.step or (1 if param.kind == "int" else None)
    if param.kind == "int":
        off = (value - param.low) % step != 0
    else:
        off = step is not None and abs((k := (value - param.low) / step) - round(k)) >= 1e-8
    return f"is off today's [search] grid {span} step {show(step)}" if off else None


def _shown(name: str, value: Any) -> str:
    """A queued value as the study file writes it (a list field's text as the list)."""
    field = FIELDS.get(name)
    if field is not None and field.kind is tuple and isinstance(value, str):
        try:
            return show(field.parse(value))
        except ConfigError:  # not a list's text: shown as it is
            pass
    return show(value)
