"""Deadlines that grow with what must cross the slowest link, and reach libp2p."""

from __future__ import annotations

import pytest
import trio

from gossip.keys import NodeKey
from p2pfl.config import NodeConfig
from p2pfl.deadlines import DIAL_S, HANDSHAKE_WAIT_BYTES
from p2pfl.transport import Transport

pytestmark = pytest.mark.integration


def test_a_handshake_may_wait_behind_a_yamux_window_each_way_at_the_slowest_link() -> None:
    fast = NodeConfig(min_link_mbit=1000.0).deadlines
    slow = NodeConfig(min_link_mbit=1 / 6).deadlines  # 1 Mbit/s shared by 6 streams
    assert fast.handshake < DIAL_S + 0.01
    # A yamux window each way at 20.8 kB/s: the 5 s and 12 s that failed in the lab
    # become 30 s.
    assert slow.handshake == DIAL_S + HANDSHAKE_WAIT_BYTES / (1e6 / 6 / 8)
    assert slow.handshake > 6 * DIAL_S
    assert slow.peer_exchange == slow.handshake


async def test_the_transport_hands_the_handshake_deadline_to_libp2p() -> None:
    with trio.fail_after(15):
        async with Transport.open(
            NodeKey.generate(), ["/ip4/127.0.0.1/tcp/0"], handshake_timeout=12.5
        ) as transport:
            config = transport.host.get_network().connection_config
            assert config.dial_timeout == 12.5
            assert config.inbound_upgrade_timeout == config.outbound_upgrade_timeout == 12.5
            assert config.outbound_stream_protocol_negotiation_timeout == 12.5
            assert config.inbound_stream_protocol_negotiation_timeout == 12.5
