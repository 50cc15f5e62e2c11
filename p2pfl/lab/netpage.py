"""The network page of a local run: every node side by side, served by the launcher.

``scripts/local_network.py`` (``make demo``) polls each daemon's /status for its
terminal table anyway; it hands those snapshots to :class:`NetworkPage`, which keeps
an accuracy-over-time series per node (bounded) and serves, on 127.0.0.1, the page
``p2pfl/web/network.html`` and ``GET /network`` (its JSON). The page reads only that,
from its own origin, so it needs no cross-origin access to the daemons.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from p2pfl.lab.localnet import LocalNetwork
from p2pfl.status import PAGE_HEADERS, page_asset

MAX_POINTS = 2000  # per node: over half an hour at the demo's poll rate
MIN_SAMPLE_INTERVAL_S = 1.0
REQUEST_TIMEOUT_S = 5.0


class NetworkPage:
    """The latest status of each node and its accuracy over time, behind a lock (the
    server's threads read what the launcher's thread writes)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._nodes: list[dict[str, Any]] = []
        self._series: dict[int, deque[tuple[float, float]]] = {}
        self._last_sample = -MIN_SAMPLE_INTERVAL_S

    def update(self, network: LocalNetwork, statuses: list[dict[str, Any] | None]) -> None:
        now = time.monotonic() - self.started
        sample = now - self._last_sample >= MIN_SAMPLE_INTERVAL_S
        nodes = []
        with self._lock:
            for node, status in zip(network.nodes, statuses, strict=True):
                if node is None:
                    continue
                series = self._series.setdefault(node.index, deque(maxlen=MAX_POINTS))
                if sample and status and status.get("accuracy") is not None:
                    series.append((round(now, 1), status["accuracy"]))
                nodes.append({
                    "index": node.index,
                    "peer_id": node.peer_id,
                    "page": node.status_url.removesuffix("status") if node.status_url else None,
                    "running": node.running,
                    "status": status,
                    "accuracy": list(series),
                })
            self._nodes = nodes
            if sample:
                self._last_sample = now

    def view(self) -> dict[str, Any]:
        with self._lock:
            return {"t": round(time.monotonic() - self.started, 1), "nodes": self._nodes}


def _handler(page: NetworkPage) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = REQUEST_TIMEOUT_S  # a silent client holds its thread this long at most

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0]
            if path == "/network":
                found = 200, "application/json", json.dumps(page.view()).encode()
            else:
                found = page_asset(path, index="network.html") or (
                    404, "text/plain", b"try / or /network\n"
                )
            code, content_type, body = found
            self.send_response(code)
            for name, value in (("Content-Type", content_type), *PAGE_HEADERS):
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the launcher's terminal shows the live table, not request lines

    return Handler


class NetworkPageServer:
    """``page`` served on 127.0.0.1 from a thread while used as a context manager. The
    port is bound on construction, so a taken --page-port fails (OSError) before any run."""

    def __init__(self, page: NetworkPage, port: int = 0) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _handler(page))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        host, bound = self._server.server_address[:2]
        self.url = f"http://{host!s}:{bound}/"

    def __enter__(self) -> NetworkPageServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()  # serve_forever returns; then the socket closes under no one
        self._server.server_close()
        self._thread.join()
