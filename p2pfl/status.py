"""The status endpoint: ``GET /status`` (JSON) and ``GET /metrics`` (Prometheus text).

A deliberately tiny HTTP/1.1 server on trio: one request per connection,
every read under a timeout, request size capped, so a slow or hostile client
costs a task for at most a few seconds and never blocks the node.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import trio

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 5.0
MAX_REQUEST_BYTES = 8192

StatusSource = Callable[[], dict[str, Any]]


def render_metrics(status: dict[str, Any]) -> str:
    """The numeric status fields as Prometheus text exposition format."""
    lines = []

    def metric(name: str, kind: str, help_text: str, value: float, labels: str = "") -> None:
        if not any(line.startswith(f"# HELP {name} ") for line in lines):
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
        lines.append(f"{name}{labels} {value}")

    metric("p2pfl_round", "gauge", "Local rounds completed.", status["round"])
    metric("p2pfl_neighbors", "gauge", "Current gossip neighbours.", len(status["neighbors"]))
    if status.get("accuracy") is not None:
        metric("p2pfl_accuracy", "gauge", "Test accuracy of the current model.", status["accuracy"])
    metric(
        "p2pfl_updates_sent_total",
        "counter",
        "Updates delivered to neighbours.",
        status["updates_sent"],
    )
    metric(
        "p2pfl_updates_accepted_total",
        "counter",
        "Incoming updates admitted.",
        status["updates_accepted"],
    )
    for reason, count in sorted(status["updates_rejected"].items()):
        metric(
            "p2pfl_updates_rejected_total",
            "counter",
            "Incoming updates rejected, by reason.",
            count,
            f'{{reason="{reason}"}}',
        )
    metric("p2pfl_bytes_sent_total", "counter", "Payload bytes sent.", status["bytes_sent"])
    metric(
        "p2pfl_bytes_received_total", "counter", "Payload bytes received.", status["bytes_received"]
    )
    if status.get("epsilon") is not None:
        metric(
            "p2pfl_dp_epsilon",
            "gauge",
            f"Differential-privacy epsilon spent so far, at delta={status.get('delta')}.",
            status["epsilon"],
        )
    metric("p2pfl_uptime_seconds", "gauge", "Seconds since the node started.", status["uptime_s"])
    return "\n".join(lines) + "\n"


def _response(code: int, reason: str, content_type: str, body: bytes) -> bytes:
    head = (
        f"HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


async def _read_request_line(stream: trio.abc.Stream) -> str:
    buffer = bytearray()
    while b"\r\n\r\n" not in buffer and b"\n\n" not in buffer:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        buffer += chunk
        if len(buffer) > MAX_REQUEST_BYTES:
            break
    return buffer.split(b"\n", 1)[0].decode("latin-1").strip()


def answer(request_line: str, source: StatusSource) -> bytes:
    """The full HTTP response for one request line."""
    parts = request_line.split()
    if len(parts) < 2 or parts[0] != "GET":
        return _response(405, "Method Not Allowed", "text/plain", b"only GET is served\n")
    path = parts[1].split("?", 1)[0]
    if path == "/status":
        body = json.dumps(source(), indent=2).encode() + b"\n"
        return _response(200, "OK", "application/json", body)
    if path == "/metrics":
        return _response(200, "OK", "text/plain; version=0.0.4", render_metrics(source()).encode())
    return _response(404, "Not Found", "text/plain", b"try /status or /metrics\n")


async def serve_status(
    host: str, port: int, source: StatusSource, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve until cancelled; reports the bound ``(host, port)`` through ``task_status``."""

    async def handle(stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(REQUEST_TIMEOUT_S):
                line = await _read_request_line(stream)
                await stream.send_all(answer(line, source))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client went away; nothing to answer
        except Exception:
            logger.exception("status request failed")
        finally:
            with trio.move_on_after(1):
                await stream.aclose()

    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()
    task_status.started((bound[0], bound[1]))
    await trio.serve_listeners(handle, listeners)
