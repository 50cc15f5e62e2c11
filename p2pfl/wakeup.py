"""One task waits for something another may have changed: a poke wakes it to look again."""

from __future__ import annotations

import trio


class Wakeup:
    """Pokes wake every waiter; a waiter re-checks its own condition (no lost pokes:
    a poke between a check and the wait ends the wait at once)."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def poke(self) -> None:
        self._event.set()
        self._event = trio.Event()

    def armed(self) -> trio.Event:
        """The event the next poke sets: take it *before* checking the condition."""
        return self._event
