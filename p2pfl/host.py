"""Build the node's libp2p host: the node key as identity, Noise only, yamux, no mDNS.

py-libp2p 0.8.1 facts this module relies on (see the project's libp2p notes):
- its default security options also accept ``/plaintext/2.0.0``, so the Noise-only
  ``sec_opt`` here is what makes unencrypted peers fail the handshake;
- ``connect()`` waits about 250 ms per dial unless ``max_connections_per_peer=1``;
- the ``libp2p`` logger has no handler and does not propagate, so its warnings
  would only reach Python's last-resort stderr handler.
"""

from __future__ import annotations

import logging

from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.identity_utils import create_identity_from_seed
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from multiaddr import Multiaddr

from gossip.keys import NodeKey
from p2pfl.deadlines import DIAL_S
from p2pfl.gating import ConnectionGate

# A libp2p log line is cut to this many characters: some of its messages embed whole
# stream payloads, which must never reach the node's logs.
MAX_LOG_MESSAGE_CHARS = 300

logger = logging.getLogger(__name__)


def parse_multiaddr(text: str) -> Multiaddr:
    """Parse a multiaddr string; ValueError with one line naming the problem on bad input."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"empty multiaddr {text!r}; expected e.g. /ip4/127.0.0.1/tcp/4001")
    try:
        return Multiaddr(text.strip())
    except Exception as error:  # multiaddr raises several unrelated exception types
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(
            f"invalid multiaddr {text!r} ({reason}); expected e.g. /ip4/127.0.0.1/tcp/4001"
        ) from None


def split_peer_multiaddr(text: str) -> tuple[str, Multiaddr]:
    """Split ``/ip4/.../tcp/N/p2p/<id>`` into (peer id, address without ``/p2p``)."""
    addr = parse_multiaddr(text)
    try:
        peer_id = addr.get_peer_id()
    except Exception:
        peer_id = None
    if not peer_id:
        raise ValueError(f"multiaddr {text!r} has no /p2p/<peer id> suffix; append the peer's id")
    transport_part = addr.decapsulate(Multiaddr(f"/p2p/{peer_id}"))
    if not str(transport_part):
        raise ValueError(f"multiaddr {text!r} has no network address before /p2p/")
    return peer_id, transport_part


class _ForwardLibp2pRecords(logging.Handler):
    """Re-emit ``libp2p`` records on our logger, each message cut to one short line."""

    def __init__(self, target: logging.Logger) -> None:
        super().__init__(level=logging.WARNING)
        self._target = target

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:
            message = str(record.msg)
        # Only the first line: libp2p embeds whole tracebacks of routine peer failures
        # (a peer killed mid-handshake) in its messages; operators need the cause only.
        message = message.strip().split("\n", 1)[0]
        if len(message) > MAX_LOG_MESSAGE_CHARS:
            message = message[:MAX_LOG_MESSAGE_CHARS] + "...(cut)"
        # libp2p logs routine peer failures (a dead peer's dial, 4 lines per attempt) at
        # ERROR; in a P2P network those are expected, so they are warnings to us.
        level = min(record.levelno, logging.WARNING)
        self._target.log(level, "libp2p %s: %s", record.name, message)


def route_libp2p_logging() -> None:
    """Send the ``libp2p`` logger's WARNING+ records to ``p2pfl.libp2p`` (idempotent)."""
    source = logging.getLogger("libp2p")
    if any(isinstance(handler, _ForwardLibp2pRecords) for handler in source.handlers):
        return
    # libp2p's setup_logging sets WARNING when LIBP2P_DEBUG is unset; keep it at least
    # that strict so DEBUG lines with whole payloads are never even formatted.
    if source.level == logging.NOTSET or source.level < logging.WARNING:
        source.setLevel(logging.WARNING)
    source.addHandler(_ForwardLibp2pRecords(logging.getLogger("p2pfl.libp2p")))


def new_node_host(
    key: NodeKey,
    *,
    handshake_timeout: float = DIAL_S,
    gate: ConnectionGate | None = None,
) -> IHost:
    """A libp2p host whose peer id is ``key.peer_id``, speaking Noise + yamux over TCP.

    ``handshake_timeout`` bounds a dial, a connection's upgrade (Noise, yamux) and a
    stream's protocol negotiation (Deadlines.handshake: longer on slow links).
    ``gate`` decides who may hold a connection (p2pfl.gating); by default everyone,
    within the per-IP limits.
    """
    route_libp2p_logging()
    gate = gate if gate is not None else ConnectionGate()
    key_pair = create_identity_from_seed(key.seed)
    # Noise needs its own static x25519 key; it is authenticated by the identity key
    # during the handshake, so a fresh one per host is what libp2p itself does.
    noise = gate.noise(key_pair, create_new_x25519_key_pair().private_key)
    connection_config = ConnectionConfig(
        max_connections_per_peer=1,
        dial_timeout=handshake_timeout,
        inbound_upgrade_timeout=handshake_timeout,
        outbound_upgrade_timeout=handshake_timeout,
        inbound_stream_protocol_negotiation_timeout=handshake_timeout,
        outbound_stream_protocol_negotiation_timeout=handshake_timeout,
    )
    host = new_host(
        key_pair=key_pair,
        sec_opt={TProtocol(NOISE_PROTOCOL_ID): noise},
        muxer_preference="YAMUX",
        connection_config=connection_config,
        enable_mDNS=False,
        resource_manager=gate.manager,
    )
    if str(host.get_id()) != key.peer_id:
        # Would mean libp2p derives ids differently from gossip.keys: signatures
        # checked against the peer id would then silently fail for every update.
        raise RuntimeError(f"libp2p peer id {host.get_id()} differs from key id {key.peer_id}")
    swarm = host.get_network()
    # One attempt per dial: callers retry on their own schedule, under a per-address
    # budget (p2pfl.transport); libp2p's 3 quick retries would multiply every dial.
    swarm.retry_config = RetryConfig(max_retries=0)
    gate.install(swarm)
    return host
