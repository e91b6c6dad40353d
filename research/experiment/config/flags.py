"""The command line's flags of the training fields, derived from the field table: one flag per
field, with its type, choices and help."""

from __future__ import annotations

import argparse
from typing import Any

from research.experiment.config.config_text import show
from research.experiment.config.fields import FIELDS
from research.experiment.config.presets import PRESETS


def add_field_flags(parser: Any, group: str, preset: str) -> None:
    """One flag per training field of ``group`` on an argparse ``parser``, from the field table:
    ``--<name>`` and its extra spellings, the field's type, choices and help (``None`` when not
    given, so that the preset's value stays). A boolean is ``--x/--no-x``; a list takes its
    items as separate words or separated by commas (``--hidden-sizes 1024 512`` or
    ``1024,512``), each read as a number if it is one, for the field's own check to judge."""
    for field in (field for field in FIELDS.values() if field.group == group):
        default = f"({preset} preset: {show(PRESETS[preset].as_params()[field.name])})"
        options: dict = {"dest": field.name, "default": None, "help": f"{field.help} {default}"}
        if field.kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif field.kind is tuple:
            options.update(nargs="+", type=_flag_items, action=_Items, metavar="N")
        elif field.choices:
            options.update(type=field.kind, choices=list(field.choices))
        else:
            options.update(type=field.kind, metavar=field.name.upper())
        parser.add_argument(field.flag, *field.flags, **options)


def _flag_items(word: str) -> list[Any]:
    """The items of one command-line word of a list flag (``"1024,512"``): integers, floats or,
    failing both, the text."""
    items: list[Any] = []
    for text in word.split(","):
        for kind in (int, float):
            try:
                items.append(kind(text))
                break
            except ValueError:
                continue
        else:
            items.append(text)
    return items


class _Items(argparse.Action):
    """The argparse action of a list flag: the items of all its words, as one tuple."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        setattr(namespace, self.dest, tuple(item for word in values for item in word))
