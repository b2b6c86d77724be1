"""Options dataclasses -> argparse, so the CLI and the seed-guide scripts share one definition.

Declare options as a dataclass whose fields carry their one-line help:

    @dataclass
    class PruneOptions:
        model: str = opt("smollm2-135m", "model reference: folder, hub id, .gguf, alias")
        pruning_ratio: float | None = opt(None, "fraction of total parameters to remove")

``add_options(parser, PruneOptions)`` adds ``--model`` and ``--pruning-ratio``;
``add_options(..., underscore=True)`` adds ``--pruning_ratio`` (the seed scripts' style).
Both spellings are always accepted. ``options_from_args(PruneOptions, ns)`` builds the dataclass.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def opt(default: Any = dataclasses.MISSING, help: str = "", *, choices=None, aliases=(), factory=None):
    """A dataclass field with a one-line help text (and optional choices / extra flag aliases)."""
    meta = {"help": help, "choices": choices, "aliases": tuple(aliases)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _base_type(tp):
    """(python type, is_optional, is_list) for a field annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        base, _, is_list = _base_type(args[0])
        return base, True, is_list
    if origin in (list, tuple):
        return typing.get_args(tp)[0], False, True
    return tp, False, False


def add_options(parser: argparse.ArgumentParser, cls: type, *, underscore: bool = False,
                skip: tuple[str, ...] = ()) -> None:
    """Add one flag per dataclass field; the preferred spelling is shown in --help."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name.startswith("_"):
            continue
        tp, _optional, is_list = _base_type(hints[f.name])
        dash, under = "--" + f.name.replace("_", "-"), "--" + f.name
        flags = [under, dash] if underscore else [dash, under]
        flags = list(dict.fromkeys(flags + list(f.metadata.get("aliases", ()))))
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = f.metadata.get("help", "")
        if default not in (None, False, [], ()) and tp is not bool:
            help_text += f" (default: {default})"
        kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = tp if tp in (int, float) else str
            if is_list:
                kw["type"] = _comma_list(kw["type"])
            if f.metadata.get("choices"):
                kw["choices"] = f.metadata["choices"]
            kw["metavar"] = f.name.upper() if not f.metadata.get("choices") else None
            if kw["metavar"] is None:
                del kw["metavar"]
        parser.add_argument(*flags, **kw)


def _comma_list(item_type):
    def parse(text: str):
        return [item_type(x.strip()) for x in text.split(",") if x.strip()]

    parse.__name__ = f"comma-separated {getattr(item_type, '__name__', 'value')} list"
    return parse


def options_from_args(cls: type[T], ns: argparse.Namespace, **overrides) -> T:
    """Build ``cls`` from parsed args: flags not given keep the dataclass default."""
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in vars(ns).items() if k in names}
    kw.update(overrides)
    return cls(**kw)
