"""Settings declared once, as the fields of a frozen dataclass, and everything made from them.

A schema is a dataclass whose fields are made with :func:`setting`: the type is
the annotation, the default is the field's, and the help, group, metavar,
choices and range sit in the field's metadata. From it come

* the argparse flags (:func:`add_flags`; ``trim_fraction`` is ``--trim-fraction``),
  each help ending in a ``(default X)`` made from the declared default;
* the TOML keys (:func:`load_toml`, :func:`typed_settings`, :func:`to_toml`);
* the per-setting checks (:func:`first_problem`: choices and range);
* a reference page (:func:`reference_markdown`).

Both the daemon (:mod:`p2pfl.config`) and the simulator (:mod:`topologies.settings`)
declare their settings this way, so a default or a choice list is written once and
a flag, a key and the reference cannot disagree. Errors are left to each front end:
this module returns problems, and the caller names them in its own words.
"""

from __future__ import annotations

import argparse
import json
import math
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from fltasks.settings_file import read_toml_table, type_words, typed_value

__all__ = [
    "Check",
    "Setting",
    "above",
    "add_flags",
    "at_least",
    "first_problem",
    "flag_name",
    "flag_values",
    "load_toml",
    "reference_markdown",
    "setting",
    "settings_of",
    "to_toml",
    "typed_settings",
]


@dataclass(frozen=True)
class Check:
    """A range a value must be in; ``reason`` is both the error and the reference's text."""

    test: Callable[[Any], bool]
    reason: str


def _finite(value: Any) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def at_least(low: float, reason: str | None = None) -> Check:
    """``value >= low`` (and finite): e.g. ``at_least(1)`` for a count."""
    return Check(lambda v: _finite(v) and v >= low, reason or f"must be >= {low:g}")


def above(low: float, reason: str | None = None) -> Check:
    """``value > low`` (and finite): e.g. ``above(0)`` for a timeout."""
    return Check(lambda v: _finite(v) and v > low, reason or f"must be > {low:g}")


@dataclass(frozen=True)
class Setting:
    """One declared setting: what a flag, a TOML key and a reference row are made from."""

    name: str
    hint: Any
    default: Any
    help: str
    group: str
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    check: Check | None = None
    # Shown as "(default ...)" in place of the default itself, e.g. for None.
    default_text: str | None = None

    @property
    def flag(self) -> str:
        return flag_name(self.name)

    @property
    def repeated(self) -> bool:
        """A ``tuple[str, ...]`` setting: a repeatable flag, a TOML string or list."""
        return typing.get_origin(self.hint) is tuple

    @property
    def kind(self) -> type:
        """What a flag's text is parsed into: ``float | None`` -> float."""
        if self.repeated:
            return str
        members = [m for m in typing.get_args(self.hint) if m is not type(None)]
        return members[0] if members else self.hint

    def shown_default(self) -> str | None:
        if self.default_text is not None:
            return self.default_text
        if self.default is None or self.default == ():
            return None
        if isinstance(self.default, tuple):
            return ", ".join(map(str, self.default))
        if isinstance(self.default, float):
            return f"{self.default:g}"
        return str(self.default)

    def help_text(self) -> str:
        if self.default_text is not None:  # words, not a value: "(default: adaptive)"
            return f"{self.help} (default: {self.default_text})"
        if "default" in self.help.lower():  # it says its default in its own words
            return self.help
        shown = self.shown_default()
        return self.help if shown is None else f"{self.help} (default {shown})"

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is out of this setting's choices or range; None when it is fine."""
        if value is None:
            return None
        if self.choices is not None and value not in self.choices:
            if len(self.choices) == 2:
                return f"choose {self.choices[0]} or {self.choices[1]}"
            return f"choose one of {', '.join(self.choices)}"
        if self.check is not None and not self.check.test(value):
            return self.check.reason
        return None


def setting(
    group: str,
    help: str,
    default: Any,
    *,
    metavar: str | None = None,
    choices: tuple[str, ...] | None = None,
    check: Check | None = None,
    default_text: str | None = None,
) -> Any:
    """One setting's dataclass field: its default, and the rest in its metadata."""
    meta = {
        "group": group,
        "help": help,
        "metavar": metavar,
        "choices": choices,
        "check": check,
        "default_text": default_text,
    }
    return field(default=default, metadata=meta)


def settings_of(schema: type) -> tuple[Setting, ...]:
    """The declared settings of a dataclass, in declaration order."""
    hints = typing.get_type_hints(schema)
    declared = []
    for item in fields(schema):
        if "group" not in item.metadata:  # a plain field, not a setting
            continue
        default = None if item.default is MISSING else item.default
        declared.append(Setting(item.name, hints[item.name], default, **item.metadata))
    return tuple(declared)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser, schema: type, *, parse: bool) -> None:
    """One flag per setting, in argument groups as declared; every default None (not given).

    With ``parse``, argparse converts the text and enforces the choices (its own
    errors); without, values stay text for the caller to convert and check, so a
    bad flag and a bad TOML value get the same error.
    """
    groups: dict[str, Any] = {}
    for item in settings_of(schema):
        group = groups.get(item.group) or parser.add_argument_group(item.group)
        groups[item.group] = group
        options: dict[str, Any] = {"default": None, "help": item.help_text()}
        if item.kind is bool:
            group.add_argument(item.flag, action="store_true", **options)
            continue
        if item.repeated:
            options["action"] = "append"
        if parse and item.kind in (int, float):
            options["type"] = item.kind
        if parse and item.choices is not None:
            options["choices"] = item.choices
        elif item.choices is not None and item.metavar is None:
            options["metavar"] = "{" + ",".join(item.choices) + "}"
        if item.metavar is not None:
            options["metavar"] = item.metavar
        group.add_argument(item.flag, **options)


def flag_values(flags: argparse.Namespace, schema: type) -> dict[str, Any]:
    """The settings given as flags (not None), by name; repeated flags as tuples."""
    given: dict[str, Any] = {}
    for item in settings_of(schema):
        value = getattr(flags, item.name, None)
        if value is not None:
            given[item.name] = tuple(value) if item.repeated else value
    return given


def load_toml(path: Path, schema: type) -> dict[str, Any]:
    """The settings in a TOML file, by name; unknown keys raise SettingsFileError.

    A repeated setting may be one string or a list of strings (``listen = "/ip4/..."``).
    """
    declared = {item.name: item for item in settings_of(schema)}
    table = read_toml_table(path, declared)
    for name, value in table.items():
        if declared[name].repeated:
            table[name] = (value,) if isinstance(value, str) else value
    return table


def typed_settings(
    values: Mapping[str, Any], schema: type, *, finite: bool = False
) -> tuple[dict[str, Any], tuple[str, str] | None]:
    """Each value checked against its declared type (nothing is converted from text).

    Returns the typed values and, for the first that has the wrong type, its name
    and why: the caller raises its own error.
    """
    typed: dict[str, Any] = {}
    for item in settings_of(schema):
        if item.name not in values:
            continue
        value = values[item.name]
        if item.repeated:
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                return typed, (item.name, f"expected a list of text, got {value!r}")
            typed[item.name] = tuple(value)
            continue
        try:
            typed[item.name] = typed_value(value, item.hint, finite=finite)
        except ValueError as error:
            return typed, (item.name, str(error))
    return typed, None


def first_problem(config: object, schema: type) -> tuple[Setting, str] | None:
    """The first setting of ``config`` out of its choices or range, and why."""
    for item in settings_of(schema):
        reason = item.problem(getattr(config, item.name))
        if reason is not None:
            return item, reason
    return None


def _toml_value(value: Any) -> str:
    # JSON's strings, numbers and arrays of them are TOML's too; TOML spells the
    # special floats and the booleans its own way.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Path):
        value = str(value)
    return json.dumps(value)


def to_toml(values: Mapping[str, Any], schema: type) -> str:
    """A TOML file of ``values`` (None left out, as TOML has no null); keys must be declared."""
    known = {item.name for item in settings_of(schema)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise KeyError(f"not settings of {schema.__name__}: {', '.join(unknown)}")
    return "".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items() if v is not None)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def reference_markdown(schema: type, title: str, intro: str) -> str:
    """A Markdown page: every setting's key, flag, type, default, range and help, by group."""
    lines = [f"# {title}", "", intro.strip(), ""]
    group = None
    declared = settings_of(schema)
    for item in declared:
        if item.group != group:
            group = item.group
            lines += [f"## {group}", "", "| key | flag | type | default | allowed | meaning |"]
            lines.append("|---|---|---|---|---|---|")
        kind = "list of text" if item.repeated else type_words(item.kind).removeprefix("a ")
        if type(None) in typing.get_args(item.hint):
            kind += " (optional)"
        allowed = (
            ", ".join(item.choices)
            if item.choices
            else (item.check.reason if item.check else "")
        )
        default = item.shown_default() or "-"
        row = (f"`{item.name}`", f"`{item.flag}`", kind, default, allowed, item.help)
        lines.append("| " + " | ".join(_cell(cell) for cell in row) + " |")
        if item is declared[-1] or declared[declared.index(item) + 1].group != group:
            lines.append("")
    return "\n".join(lines)
