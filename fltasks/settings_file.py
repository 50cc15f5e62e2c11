"""Settings read from a TOML file, and settings checked against their declared types.

The daemon's ``--config`` (:mod:`p2pfl.config`), the simulator's ``--config``
(:mod:`topologies.settings`) and the task spec (:mod:`fltasks.spec`) all read a
TOML table of known keys, and the first two check each value against its
dataclass field's type. One rule for all three, so a missing file, bad TOML,
an unknown key or ``rounds = "5"`` reads the same everywhere. Errors are
:class:`SettingsFileError` lines without the file's flag: each caller prefixes
it (``--config FILE: ...``) or turns it into its own error type.
"""

from __future__ import annotations

import math
import tomllib
import types
import typing
from collections.abc import Collection
from pathlib import Path
from typing import Any

__all__ = ["SettingsFileError", "read_toml_table", "type_words", "typed_value"]


class SettingsFileError(ValueError):
    """A settings file or value that cannot be used; one line, without a traceback."""


def read_toml_table(path: Path, known: Collection[str]) -> dict[str, Any]:
    """The top-level table of the TOML file at ``path``; every key must be in ``known``."""
    try:
        with path.open("rb") as handle:
            table = tomllib.load(handle)
    except FileNotFoundError:
        raise SettingsFileError("no such file") from None
    except OSError as error:
        raise SettingsFileError(f"cannot read ({error.strerror})") from None
    except tomllib.TOMLDecodeError as error:
        raise SettingsFileError(f"not valid TOML ({error})") from None
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise SettingsFileError(
            f"unknown key(s) {', '.join(map(repr, unknown))}; "
            f"known keys are {', '.join(sorted(known))}"
        )
    return table


def _allowed(hint: Any) -> tuple[list[type], bool]:
    """``float | None`` -> ([float], True); ``int`` -> ([int], False)."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    members = list(typing.get_args(hint)) if union else [hint]
    allowed = [member for member in members if member is not type(None)]
    return allowed, len(allowed) < len(members)


def type_words(hint: Any) -> str:
    """What a value of type ``hint`` is, in words: ``a whole number``, ``text``, ..."""
    words = {int: "a whole number", float: "a number", str: "text", bool: "true or false"}
    return " or ".join(words.get(kind, kind.__name__) for kind in _allowed(hint)[0])


def typed_value(value: Any, hint: Any, *, finite: bool = False) -> Any:
    """``value`` if it has the type ``hint`` declares, else SettingsFileError.

    Nothing is converted from text (TOML has types; ``rounds = "5"`` is a
    mistake), a whole number is taken where a number is declared (as a float)
    and a bool is never taken for a number. With ``finite``, inf and NaN are
    refused too (the daemon's config checks them per setting instead, with
    the range).
    """
    allowed, optional = _allowed(hint)
    if value is None and optional:
        return None
    wrong = SettingsFileError(f"expected {type_words(hint)}, got {value!r}")
    if isinstance(value, bool) and bool not in allowed:
        raise wrong
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, tuple(allowed)):
        raise wrong
    if finite and isinstance(value, float) and not math.isfinite(value):
        raise SettingsFileError(f"expected a finite number, got {value!r}")
    return value
