"""Run issue 20's silent-TCP attack from a process of its own (for daemon tests):
``python silent_flood.py TARGET_MULTIADDR IPS CONNECTIONS_PER_IP SECONDS``.
Bounded: it stops after SECONDS, or after MAX_OPENS re-opens per connection, and
prints the cuts it saw."""

from __future__ import annotations

import sys

import trio
from attackers import hold_silent_tcp, loopback_ips

MAX_OPENS = 1000


async def flood(target: str, ips: int, per_ip: int, seconds: float) -> int:
    stop = trio.Event()
    cuts = [0]
    async with trio.open_nursery() as nursery:
        for ip in loopback_ips(ips):
            for _ in range(per_ip):
                nursery.start_soon(
                    lambda ip=ip: hold_silent_tcp(target, ip, stop, cuts, max_opens=MAX_OPENS)
                )
        await trio.sleep(seconds)
        stop.set()
    return cuts[0]


if __name__ == "__main__":
    target, ips, per_ip, seconds = sys.argv[1:5]
    print(f"cuts {trio.run(flood, target, int(ips), int(per_ip), float(seconds))}", flush=True)
