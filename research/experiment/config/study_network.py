"""A study file's network: which of its fields define the trials' network, and how the others
follow (or are refused). Used by :class:`~.study_config.StudyConfig` on every study it builds.

The network is spelled one way per study:

- ``layers``, searched (a categorical of layers values) or fixed to a non-empty value, defines
  it: the MLP's fields (``hidden_size``, ``n_hidden_layers``, ``hidden_sizes``) may not be
  searched or set in ``[fixed]``, the preset's values of theirs are dropped (every trial has
  them at their defaults, unused), and ``""`` (the MLP) is no choice of a searched ``layers``:
  the MLP is written as layers there (``"dense(256)"``).
- else ``hidden_sizes``, searched or fixed to a non-empty list, defines the hidden layers:
  ``hidden_size`` and ``n_hidden_layers`` follow from it (its widest layer, its length), may not
  be searched, and a value ``[fixed]`` gives them must agree with every list.
- else ``hidden_size`` × ``n_hidden_layers``, fixed or searched.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from research.experiment.config.fields import (
    MLP_FIELDS,
    SHORTHAND,
    ConfigError,
    layers_conflict,
    shorthand,
    widths_conflict,
)
from research.experiment.config.search_space import SearchParam


def _layers_key(fixed: Mapping[str, Any], search: tuple[SearchParam, ...]) -> str | None:
    """``search.layers`` or ``fixed.layers`` when layers define the network, else None."""
    if any(param.name == "layers" for param in search):
        return "search.layers"
    value = fixed.get("layers")
    return "fixed.layers" if isinstance(value, str) and value else None


def derived_fields(fixed: Mapping[str, Any], search: tuple[SearchParam, ...]) -> tuple[str, ...]:
    """The fields a study need not give: those each trial's network sets (the MLP's, when
    layers define the network; the shorthand, when ``hidden_sizes`` is searched)."""
    if _layers_key(fixed, search):
        return MLP_FIELDS
    return SHORTHAND if any(param.name == "hidden_sizes" for param in search) else ()


def network_fields(
    fixed: dict[str, Any], search: tuple[SearchParam, ...], from_preset: Collection[str]
) -> dict[str, Any]:
    """``fixed`` (checked values) with the network's fields made to follow the field that
    defines the network (see the module docstring); ConfigError for a field that conflicts.
    ``from_preset``: the fixed fields whose value the file left to the preset."""
    key = _layers_key(fixed, search)
    if key is not None:
        return _follow_layers(fixed, search, from_preset, key)
    return _follow_widths(fixed, search, from_preset)


def _follow_layers(
    fixed: dict[str, Any], search: tuple[SearchParam, ...], from_preset: Collection[str], key: str
) -> dict[str, Any]:
    param = next((param for param in search if param.name == "layers"), None)
    layers: Any = fixed.get("layers") if param is None else list(param.choices)
    if param is not None and "" in param.choices:
        raise ConfigError(
            f"{key}.choices[{param.choices.index('')}]",
            'the MLP ("", the default) is not a choice of layers',
            value="",
            allowed='write the MLP as layers, e.g. "dense(256)" for one hidden layer of 256 units',
        )
    for name in MLP_FIELDS:
        if any(other.name == name for other in search):
            raise ConfigError(
                f"search.{name}",
                f"cannot be searched with {key}, which defines the network",
                allowed=f"search layers alone ({', '.join(MLP_FIELDS)} are unused), or search "
                f'{name} without layers (layers = "", the MLP)',
            )
        if name in fixed and name not in from_preset:
            raise layers_conflict(name, fixed[name], layers, f"fixed.{name}", key)
        fixed.pop(name, None)  # every trial has it at its default, unused
    return fixed


def _follow_widths(
    fixed: dict[str, Any], search: tuple[SearchParam, ...], from_preset: Collection[str]
) -> dict[str, Any]:
    """``fixed`` with the shorthand (``hidden_size``, ``n_hidden_layers``) made to follow
    ``hidden_sizes`` when it defines the network (searched, or fixed to a non-empty list):
    the preset's values are dropped (searched) or set from the list (fixed); the file's own
    must agree with every list, and neither may be searched."""
    param = next((param for param in search if param.name == "hidden_sizes"), None)
    if param is not None:
        key = "search.hidden_sizes"
        lists = [(f"{key}.choices[{i}]", widths) for i, widths in enumerate(param.choices)]
    elif fixed.get("hidden_sizes"):
        key = "fixed.hidden_sizes"
        lists = [(key, fixed["hidden_sizes"])]
    else:
        return fixed
    for name in SHORTHAND:
        if any(other.name == name for other in search):
            raise ConfigError(
                f"search.{name}",
                f"cannot be searched with {key}, which defines the network",
                allowed=f"search hidden_sizes alone (it sets {name}), or search "
                "hidden_size and n_hidden_layers without hidden_sizes",
            )
        if name in fixed and name not in from_preset:
            for where, widths in lists:
                if fixed[name] != shorthand(widths)[name]:
                    raise widths_conflict(name, fixed[name], widths, f"fixed.{name}", where)
        elif param is not None:
            fixed.pop(name, None)
        else:
            fixed[name] = shorthand(lists[0][1])[name]
    return fixed


def layers_of(fixed: Mapping[str, Any], search: tuple[SearchParam, ...]) -> tuple[str, ...]:
    """Every ``layers`` value a study's trials can have (its choices, or the fixed one)."""
    param = next((param for param in search if param.name == "layers"), None)
    return tuple(param.choices) if param is not None else (fixed.get("layers", ""),)
