"""The one error a bad simulator setting raises: which settings, and why, in one line."""

from __future__ import annotations


class SettingError(ValueError):
    """A bad value for one or more settings, named by their field names.

    Front ends name the settings their own way (``--trim-fraction`` for a flag,
    ``trim_fraction`` for a TOML key) from :attr:`names`, never by rewriting the
    message text.
    """

    def __init__(self, names: str | tuple[str, ...], reason: str) -> None:
        self.names = (names,) if isinstance(names, str) else tuple(names)
        self.reason = reason.splitlines()[0] if reason else reason
        super().__init__(f"{', '.join(self.names)}: {self.reason}")
