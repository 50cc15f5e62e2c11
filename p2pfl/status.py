"""The status endpoint: ``GET /status`` (JSON), ``GET /metrics`` (Prometheus text),
``GET /history`` (recent samples, p2pfl/status_history.py) and the web page at ``/``
(p2pfl/web/, which reads only the first and the third).

A small HTTP/1.1 server on trio, one request per connection. Requests are
parsed by h11 (size-capped), the metrics written by prometheus-client, so
neither the HTTP grammar nor the exposition format is ours to get wrong. What
is ours is the budget: at most ``max_connections`` clients at once (one more
is answered 503 and closed at once, so idle sockets cannot pile up and exhaust
the daemon's file descriptors), and each one has ``read_timeout`` seconds for
its whole request and answer, so a slow or hostile client costs one slot for
a few seconds and never blocks the node.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import h11
import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from p2pfl.deadlines import STATUS_READ_S
from p2pfl.web import load_assets

logger = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 8192
MAX_CONNECTIONS = 16
LINGER_S = 1.0
# generate_latest writes the classic text format; this is its content type.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

StatusSource = Callable[[], dict[str, Any]]
Answer = tuple[int, str, bytes]
ASSETS = load_assets()
# The page may load only this server's own files and read only its own JSON: a
# browser then refuses anything from another host even if a file asked for it.
PAGE_HEADERS = [
    ("Content-Security-Policy",
     "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
     "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Cache-Control", "no-store"),
]


def _by_label(
    family: CounterMetricFamily | GaugeMetricFamily, counts: dict[str, int]
) -> Metric:
    """``family`` with one sample per entry of ``counts``, its key as the one label."""
    for label, count in sorted(counts.items()):
        family.add_metric([label], count)
    return family


class _StatusCollector(Collector):
    """The numeric fields of one status snapshot, as Prometheus metric families."""

    def __init__(self, status: dict[str, Any]) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        status = self.status
        yield GaugeMetricFamily("p2pfl_round", "Local rounds completed.", value=status["round"])
        yield GaugeMetricFamily(
            "p2pfl_neighbours", "Current gossip neighbours.", value=len(status["neighbours"])
        )
        if status.get("accuracy") is not None:
            yield GaugeMetricFamily(
                "p2pfl_accuracy", "Test accuracy of the current model.", value=status["accuracy"]
            )
        yield CounterMetricFamily(
            "p2pfl_updates_sent", "Updates delivered to neighbours.", value=status["updates_sent"]
        )
        yield CounterMetricFamily(
            "p2pfl_updates_accepted", "Incoming updates admitted.", value=status["updates_accepted"]
        )
        if status["updates_rejected"]:
            yield _by_label(
                CounterMetricFamily("p2pfl_updates_rejected",
                                    "Incoming updates rejected, by reason.", labels=["reason"]),
                status["updates_rejected"],
            )
        if status.get("deliveries"):
            # Cumulative counts of pushes by fate, so a counter (was a gauge without _total).
            yield _by_label(
                CounterMetricFamily(
                    "p2pfl_push_shares",
                    "Pushed weight shares by fate: delivered, refunded, disputed, unanswered.",
                    labels=["fate"],
                ),
                status["deliveries"],
            )
        yield CounterMetricFamily(
            "p2pfl_push_failures", "Pushes that failed (dial, send or timeout), all peers.",
            value=sum((status.get("send_failures") or {}).values()),
        )
        if status.get("connections_refused"):
            yield _by_label(
                CounterMetricFamily("p2pfl_connections_refused",
                                    "Inbound connections cut before any stream, by reason.",
                                    labels=["reason"]),
                status["connections_refused"],
            )
        yield from _mass_metrics(status)
        yield CounterMetricFamily(
            "p2pfl_bytes_sent", "Payload bytes sent.", value=status["bytes_sent"]
        )
        yield CounterMetricFamily(
            "p2pfl_bytes_received", "Payload bytes received.", value=status["bytes_received"]
        )
        if status.get("epsilon") is not None:
            yield GaugeMetricFamily(
                "p2pfl_dp_epsilon",
                f"Differential-privacy epsilon spent so far, at delta={status.get('delta')}.",
                value=status["epsilon"],
            )
            if status.get("dp_target_epsilon") is not None:
                yield GaugeMetricFamily(
                    "p2pfl_dp_target_epsilon", "The epsilon budget (--dp-target-epsilon).",
                    value=status["dp_target_epsilon"],
                )
            yield GaugeMetricFamily(
                "p2pfl_dp_exhausted",
                "1 once --dp-target-epsilon stopped training (merging and serving go on), else 0.",
                value=int(bool(status.get("dp_exhausted"))),
            )
        yield GaugeMetricFamily(
            "p2pfl_uptime_seconds", "Seconds since the node started.", value=status["uptime_s"]
        )
        if status.get("version") is not None:
            info = GaugeMetricFamily("p2pfl_build_info", "The daemon's version.",
                                     labels=["version"])
            info.add_metric([status["version"]], 1)
            yield info
        yield from _phase_metrics(status.get("phases"))
        yield from _membership_metrics(status.get("membership"))
        yield from _relay_metrics(status.get("relay"))


def _mass_metrics(status: dict[str, Any]) -> Iterator[Metric]:
    """Push-sum mass on this node: held, received but not merged, and pushed unsettled."""
    for key, name, help_text in (
        ("weight", "p2pfl_pushsum_weight", "This node's push-sum weight."),
        ("weight_pending", "p2pfl_pushsum_weight_pending",
         "Weight of received shares not merged yet."),
        ("weight_in_flight", "p2pfl_pushsum_weight_in_flight",
         "Weight of pushed shares whose fate is not known yet."),
    ):
        if status.get(key) is not None:
            yield GaugeMetricFamily(name, help_text, value=status[key])
    if status.get("known_peers") is not None:
        yield GaugeMetricFamily(
            "p2pfl_known_peers", "Peers in this node's peer book.", value=status["known_peers"]
        )
    if status.get("train_loss") is not None:
        yield GaugeMetricFamily(
            "p2pfl_train_loss", "Mean training loss of the last round.",
            value=status["train_loss"],
        )


def _phase_metrics(phases: dict[str, Any] | None) -> Iterator[Metric]:
    """The last round's seconds per phase, peak RSS and worst loop stall (p2pfl.phases)."""
    if not phases:
        return
    yield GaugeMetricFamily(
        "p2pfl_peak_rss_bytes", "Peak resident set size of the daemon.",
        value=phases["peak_rss_mb"] * 2**20,
    )
    yield GaugeMetricFamily(
        "p2pfl_loop_worst_stall_seconds", "Longest the event loop was blocked since start.",
        value=phases["worst_stall_s"],
    )
    last = phases.get("last_round")
    if last:
        seconds = GaugeMetricFamily(
            "p2pfl_round_phase_seconds", "Seconds per phase in the last round.", labels=["phase"]
        )
        for key, value in last.items():
            if key.endswith("_s") and key not in ("round_s", "worst_stall_s", "other_s"):
                seconds.add_metric([key.removesuffix("_s")], value)
        yield seconds
        yield GaugeMetricFamily(
            "p2pfl_round_seconds", "Wall-clock seconds of the last round.", value=last["round_s"]
        )


def _membership_metrics(view: dict[str, Any] | None) -> Iterator[Metric]:
    """Members known, the revocation log, our certificate's expiry (p2pfl.member_service)."""
    if not view:
        return
    yield GaugeMetricFamily(
        "p2pfl_members_known", "Peers this node counts as members now.",
        value=view["members_known"],
    )
    if "network_id" not in view:
        return
    # The log head is not a label: it changes with each revocation, and each value would
    # be a new series forever; /status has it.
    info = GaugeMetricFamily(
        "p2pfl_network_info", "The network this node belongs to (its genesis hash).",
        labels=["network_id"],
    )
    info.add_metric([view["network_id"]], 1)
    yield info
    yield GaugeMetricFamily(
        "p2pfl_member_log_entries", "Entries in the revocation log.",
        value=view["member_log_length"],
    )
    if view.get("cert_not_after") is not None:
        yield GaugeMetricFamily(
            "p2pfl_cert_expiry_timestamp_seconds", "When this node's certificate expires.",
            value=view["cert_not_after"],
        )
    yield _by_label(
        CounterMetricFamily("p2pfl_member_refused",
                            "Certificates and revocation logs refused, by reason.",
                            labels=["reason"]),
        view["member_refusals"],
    )


def _relay_metrics(relay: dict[str, Any] | None) -> Iterator[Metric]:
    """Our relay service (p2pfl.relay.RelayPolicy.view): bytes carried, circuits open,
    and every refusal and cut by reason."""
    if not relay:
        return
    yield CounterMetricFamily(
        "p2pfl_relay_bytes", "Bytes relayed for others, both directions.",
        value=relay["bytes_relayed"],
    )
    yield GaugeMetricFamily(
        "p2pfl_relay_circuits_open", "Circuits open through this relay.",
        value=relay["circuits_open"],
    )
    yield _by_label(
        CounterMetricFamily("p2pfl_relay_refused",
                            "Relay reservations and circuits refused, by reason.",
                            labels=["reason"]),
        relay["refused"],
    )
    yield _by_label(
        CounterMetricFamily("p2pfl_relay_cut", "Relayed circuits cut by the relay, by reason.",
                            labels=["reason"]),
        relay["cut"],
    )


def render_metrics(status: dict[str, Any]) -> str:
    """The numeric status fields as Prometheus text exposition format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatusCollector(status))
    return generate_latest(registry).decode()


def answer(
    method: str, target: str, source: StatusSource, history: StatusSource | None = None
) -> Answer:
    """Status code, content type and body for one request."""
    if method != "GET":
        return 405, "text/plain", b"only GET is served\n"
    path = target.split("?", 1)[0]
    if path == "/status":
        return 200, "application/json", json.dumps(source(), indent=2).encode() + b"\n"
    if path == "/metrics":
        return 200, METRICS_CONTENT_TYPE, render_metrics(source()).encode()
    if path == "/history" and history is not None:
        return 200, "application/json", json.dumps(history(), separators=(",", ":")).encode()
    return page_asset(path) or (404, "text/plain", b"try /, /status or /metrics\n")


def page_asset(path: str, index: str = "index.html") -> Answer | None:
    """``/`` is ``index``; ``/web/NAME`` one of the shipped files by exact name."""
    if path == "/":
        name = index
    elif path.startswith("/web/"):
        name = path.removeprefix("/web/")
    else:
        return None
    if name not in ASSETS:
        return None
    content_type, body = ASSETS[name]
    return 200, content_type, body


def _response(code: int, content_type: str, body: bytes) -> list[h11.Event]:
    headers = [
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
        *PAGE_HEADERS,
    ]
    return [
        h11.Response(status_code=code, headers=headers),
        h11.Data(data=body),
        h11.EndOfMessage(),
    ]


async def _read_request(stream: trio.abc.Stream, connection: h11.Connection) -> h11.Request | None:
    """The request head, parsed by h11; None if the client closed without one."""
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(await stream.receive_some(4096))
            continue
        if isinstance(event, h11.Request):
            return event
        return None  # ConnectionClosed, or PAUSED: nothing to answer


async def _send(stream: trio.abc.Stream, connection: h11.Connection, events: list[Any]) -> None:
    for event in events:
        data = connection.send(event)
        if data:
            await stream.send_all(data)


async def _serve_one(
    stream: trio.abc.Stream, source: StatusSource, history: StatusSource | None
) -> None:
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
    try:
        request = await _read_request(stream, connection)
    except h11.RemoteProtocolError as error:
        # Malformed or oversize: answer with h11's own hint, e.g. 400 or 431.
        await _send(stream, connection, _response(error.error_status_hint, "text/plain", b""))
        await _drain(stream)
        return
    if request is None:
        return
    code, content_type, body = answer(
        request.method.decode("ascii", "replace"), request.target.decode("latin-1"), source,
        history,
    )
    await _send(stream, connection, _response(code, content_type, body))


async def _drain(stream: trio.abc.Stream) -> None:
    """Read what the client still sends, briefly, before closing: closing a socket with
    unread input resets it, and the client would lose the error response."""
    with trio.move_on_after(LINGER_S):
        if isinstance(stream, trio.SocketStream):
            await stream.send_eof()
        while await stream.receive_some(4096):
            pass


async def serve_status(
    host: str,
    port: int,
    source: StatusSource,
    task_status: Any = trio.TASK_STATUS_IGNORED,
    *,
    max_connections: int = MAX_CONNECTIONS,
    read_timeout: float = STATUS_READ_S,
    history: StatusSource | None = None,
) -> None:
    """Serve until cancelled; reports the bound ``(host, port)`` through ``task_status``.

    ``history`` answers ``/history`` (404 without one)."""
    open_connections = 0

    async def handle(stream: trio.SocketStream) -> None:
        nonlocal open_connections
        if open_connections >= max_connections:
            with trio.move_on_after(1):
                await _send_busy(stream)
            await trio.aclose_forcefully(stream)
            return
        open_connections += 1
        try:
            with trio.move_on_after(read_timeout):
                await _serve_one(stream, source, history)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client went away; nothing to answer
        except h11.LocalProtocolError:
            pass  # the client broke the exchange mid-way (e.g. after a protocol error)
        except Exception:
            logger.exception("status request failed")
        finally:
            open_connections -= 1
            with trio.move_on_after(1):
                await stream.aclose()

    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()
    task_status.started((bound[0], bound[1]))
    await trio.serve_listeners(handle, listeners)


async def _send_busy(stream: trio.SocketStream) -> None:
    # Written by hand: h11 answers only after reading a request, and this client is not
    # given the time to send one.
    body = b"too many status clients; try again\n"
    head = (
        f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode("ascii")
    try:
        await stream.send_all(head + body)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
