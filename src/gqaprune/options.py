"""Options as dataclass groups -> argparse, so the CLI and the seed-guide scripts share one definition.

An option group is a dataclass that derives from ``Args``; each field carries its one-line
help, and the group checks its own values in ``__post_init__`` (litgpt's ``args.py``), so a
value is checked once, when the options are built, before any model is loaded:

    @dataclass
    class BudgetArgs(Args):
        GROUP = "budget"
        pruning_ratio: float | None = opt(None, "fraction of total parameters to remove")

        def __post_init__(self):
            super().__post_init__()
            if self.pruning_ratio is not None and not 0 < self.pruning_ratio < 1:
                raise GQAPruneError(...)

A command's options inherit the groups it needs (``class PruneOptions(ModelArgs, BudgetArgs)``);
the flags stay flat. ``add_options(parser, PruneOptions)`` adds ``--pruning-ratio`` under the
"budget" heading of ``--help``; ``add_options(..., underscore=True)`` shows ``--pruning_ratio``
(the seed scripts' style). Both spellings are always accepted.
``options_from_args(PruneOptions, ns)`` builds the dataclass from parsed arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from gqaprune.errors import GQAPruneError

T = TypeVar("T")

# The one dtype table: every --dtype flag accepts these names (and "auto"); value = the torch attribute.
DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}


def opt(default: Any = dataclasses.MISSING, help: str = "", *, choices=None, aliases=(), factory=None):
    """A dataclass field with a one-line help text (and optional choices / extra flag aliases)."""
    meta = {"help": help, "choices": choices, "aliases": tuple(aliases)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag(name: str) -> str:
    """The dash spelling of an option name, as messages quote it: ``pruning_ratio`` -> ``--pruning-ratio``."""
    return "--" + name.replace("_", "-")


@dataclass
class Args:
    """Base of every option group: ``__post_init__`` chains through the groups, each checking its fields."""

    GROUP: ClassVar[str | None] = None   # the --help heading of the fields this class declares

    def __post_init__(self) -> None:
        pass


@dataclass
class DeviceArgs(Args):
    """The device a command computes on (every command that runs a model)."""

    GROUP = "model loading"
    device: str | None = opt(None, "cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.device is not None and self.device != "auto":
            from gqaprune.models.io import resolve_device

            resolve_device(self.device)   # a malformed or unavailable device fails here


@dataclass
class PickleArgs(Args):
    """Whether a legacy pickled model may be loaded (every command that loads a model)."""

    GROUP = "model loading"
    allow_pickle: bool = opt(False, "allow loading a legacy pickled model (unpickling runs code stored in the file: "
                                    "trusted files only)")


@dataclass
class ModelArgs(DeviceArgs, PickleArgs):
    """Where and how a model is loaded: device, dtype, pickle opt-in."""

    GROUP = "model loading"
    dtype: str | None = opt(None, "fp32, bf16 or fp16 (default: bf16 on GPUs that support it, else fp32)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dtype is not None and self.dtype != "auto" and self.dtype not in DTYPES:
            raise GQAPruneError(f"--dtype {self.dtype}: unknown; choose one of fp32, bf16, fp16 "
                                "(or float32, bfloat16, float16)")


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


def _owner(cls: type, name: str) -> type:
    """The class in ``cls``'s MRO that declares field ``name`` last (the one its help belongs to)."""
    for c in cls.__mro__:
        if name in c.__dict__.get("__annotations__", {}):
            return c
    return cls


def add_options(parser: argparse.ArgumentParser, cls: type, *, underscore: bool = False,
                skip: tuple[str, ...] = ()) -> None:
    """Add one flag per dataclass field, under its group's heading; the preferred spelling is shown."""
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.name not in skip and not f.name.startswith("_")]
    owners = {f.name: _owner(cls, f.name) for f in fields}
    # headings in MRO order: the command's own fields first, then its groups as listed
    groups: dict[str | None, argparse._ActionsContainer] = {}
    for c in cls.__mro__:
        title = c.__dict__.get("GROUP", None) if c is not cls else None
        if any(o is c for o in owners.values()):
            key = title if title else None
            if key not in groups:
                groups[key] = parser.add_argument_group(key) if key else parser
    for f in fields:
        owner = owners[f.name]
        title = owner.__dict__.get("GROUP", None) if owner is not cls else None
        target = groups.get(title if title else None, parser)
        tp, _optional, is_list = _base_type(hints[f.name])
        dash, under = "--" + f.name.replace("_", "-"), "--" + f.name
        flags = [under, dash] if underscore else [dash, under]
        flags = list(dict.fromkeys(flags + list(f.metadata.get("aliases", ()))))
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = f.metadata.get("help", "").replace("%", "%%")   # argparse formats help with %
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
            else:
                kw["metavar"] = f.name.upper()
        target.add_argument(*flags, **kw)


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


def command_line(prog: str, opts) -> str:
    """The command line that builds ``opts``: ``prog`` and every option that differs from its default."""
    import shlex

    parts: list[str] = []
    for f in dataclasses.fields(opts):
        if f.name.startswith("_"):
            continue
        v = getattr(opts, f.name)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if v == default:
            continue
        flag_ = "--" + f.name.replace("_", "-")
        if isinstance(v, bool):
            parts.append(flag_ if v else "--no-" + f.name.replace("_", "-"))
        elif v is not None:
            parts += [flag_, ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)]
    return " ".join([prog] + [shlex.quote(x) for x in parts])
