"""Dataclass configs as command lines: each field's ``help`` metadata is its flag's ``--help`` text
and its default is written once, on the field."""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import field, fields
from typing import Any


def option(default: Any = dataclasses.MISSING, help: str = "", **extra: Any) -> Any:
    """A dataclass field that becomes one ``--flag``; ``extra`` goes to ``add_argument``
    (``choices``, ``nargs``), and a field without a default is a required flag. A boolean may name
    ``negative_alias`` (e.g. ``--no_fuse_lora``), an extra spelling of its ``--no-`` form."""
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: list(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


def build_parser(config_class: type, description: str) -> argparse.ArgumentParser:
    """One ``--<field>`` per field of ``config_class``; booleans get ``--x/--no-x``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(config_class):
        meta = dict(f.metadata)
        help_text = meta.pop("help", "").replace("%", "%%")  # argparse %-formats help ("15 %" is text here)
        negative_alias = meta.pop("negative_alias", None)
        flags = ["--" + f.name]
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            parser.add_argument(*flags, type=_scalar_type(f.type), required=True, help=help_text, **meta)
            continue
        if "bool" in str(f.type):
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            if negative_alias:
                parser.add_argument(negative_alias, dest=f.name, action="store_false", help=argparse.SUPPRESS)
        else:
            parser.add_argument(*flags, type=_scalar_type(f.type), default=default, help=help_text, **meta)
    return parser


def _scalar_type(annotation: Any) -> Any:
    text = str(annotation)
    for name, typ in (("int", int), ("float", float)):
        if re.search(rf"\b{name}\b", text):
            return typ
    return str
