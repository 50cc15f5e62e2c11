"""Throughput between two members behind two NATs: through a relay, then hole-punched.

In the network lab (p2pfl/lab/netlab.py): host 0 is public and relays, hosts 1 and 2
sit behind NATs of their own. Host 2 reserves a slot on host 0; host 1 dials host
2's relay address and sends ``--frames`` frames of ``--mib`` MiB on p2pfl's
transport (Noise, yamux), timing them. Twice: behind port-randomising NATs, where
DCUtR cannot punch a hole, so every frame goes through the relay; then behind
port-keeping NATs, where host 1 first waits for DCUtR's direct connection. Prints
MiB/s of each and their ratio, measured in the same run, and how long the hole
punch took. Needs root, iproute2 and nftables.

    sudo .venv/bin/python scripts/bench_relay.py --frames 8 --mib 4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import trio

from gossip.keys import NodeKey
from p2pfl.lab.namespaces import lab_unavailable_reason, nft_missing_reason
from p2pfl.lab.netlab import Lab, serving_in
from p2pfl.transport import Transport

PROTOCOL = "/p2pfl/bench/1.0.0"
SETUP_TIMEOUT_S = 30.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=8, help="frames per phase (8)")
    parser.add_argument("--mib", type=float, default=4.0, help="MiB per frame (4)")
    parser.add_argument("--direct-wait", type=float, default=60.0,
                        help="longest wait for DCUtR's direct connection (s)")
    parser.add_argument("--json", type=Path, help="write the measurements here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if reason := lab_unavailable_reason() or nft_missing_reason():
        print(f"bench_relay: {reason}")
        return 2
    relayed = measure("random", args, wait_for_direct=False)
    direct = measure("keep", args, wait_for_direct=True)
    result = {
        "frames": args.frames,
        "mib_per_frame": args.mib,
        "relayed_mib_per_s": relayed["mib_per_s"],
        "seconds_from_relayed_connection_to_direct": direct["seconds_until_direct"],
        "direct_mib_per_s": direct["mib_per_s"],
        "direct_over_relayed": (
            direct["mib_per_s"] / relayed["mib_per_s"]
            if direct["mib_per_s"] and relayed["mib_per_s"] else None
        ),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def measure(nat_ports: str, args: argparse.Namespace, wait_for_direct: bool) -> dict[str, Any]:
    size = int(args.mib * 1024 * 1024)
    relay_key, sender_key, receiver_key = (NodeKey.generate() for _ in range(3))
    # The relay carries model-sized traffic between members only (p2pfl/relay.py):
    # strangers get 128 KiB per circuit.
    members = frozenset(key.peer_id for key in (relay_key, sender_key, receiver_key))
    with Lab(3, nats=[[1], [2]], nat_ports=nat_ports) as lab:

        async def relay(stop: trio.Event, addrs: list[str]) -> None:
            listen = [lab.hosts[0].listen]
            async with Transport.open(relay_key, listen, relay=True, allowed_peers=members) as t:
                addrs.extend(t.addrs)
                await stop.wait()

        with serving_in(lab, 0, relay) as relay_addrs:

            async def receiver(stop: trio.Event, addrs: list[str]) -> None:
                async with Transport.open(receiver_key, [lab.hosts[2].listen], relay=False) as t:

                    async def drop(peer_id: str, payload: bytes) -> None:
                        return None

                    t.set_handler(PROTOCOL, drop, size, 60.0)
                    await t.connect(relay_addrs[0], 5.0)
                    assert t.nat is not None
                    addrs.append((await t.nat.reserve(relay_addrs[0])).circuit_addr)
                    await stop.wait()

            with serving_in(lab, 2, receiver) as circuit:
                return lab.run(
                    1,
                    lambda: trio.run(
                        sender, lab, circuit[0], size, args, wait_for_direct, sender_key
                    ),
                )


async def sender(
    lab: Lab,
    circuit: str,
    size: int,
    args: argparse.Namespace,
    wait_for_direct: bool,
    key: NodeKey,
) -> dict[str, Any]:
    payload = b"\x5a" * size
    async with Transport.open(key, [lab.hosts[1].listen], relay=False) as t:
        with trio.fail_after(SETUP_TIMEOUT_S):
            peer = await t.connect(circuit, 5.0)
        connected = trio.current_time()
        assert t.relayed_via(peer) is not None, "the first connection runs through the relay"
        until_direct = None
        if wait_for_direct:
            with trio.move_on_after(args.direct_wait):
                while t.relayed_via(peer) is not None:
                    await trio.sleep(0.1)
                until_direct = trio.current_time() - connected
            if until_direct is None:
                return {"mib_per_s": None, "seconds_until_direct": None}
        started = trio.current_time()
        for _ in range(args.frames):
            await t.send(peer, PROTOCOL, payload, 60.0)
        seconds = trio.current_time() - started
        # Still the same kind of connection at the end: the phase measured one kind only.
        assert (t.relayed_via(peer) is None) == wait_for_direct
    return {
        "mib_per_s": args.frames * size / (1024 * 1024) / seconds,
        "seconds_until_direct": until_direct,
    }


if __name__ == "__main__":
    sys.exit(main())
