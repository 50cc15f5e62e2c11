"""The status endpoint: Prometheus text for /metrics, JSON for /status, on a real socket."""

from __future__ import annotations

import json
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from p2pfl.status import render_metrics, serve_status

pytestmark = pytest.mark.integration

SAMPLE: dict[str, Any] = {
    "peer_id": "12D3KooWJbV6uzPMKBPtwhgUXm8FnTnosy4gawhgjCLP6PdDPsdC",
    "round": 7,
    "neighbours": ["a", "b", "c"],
    "accuracy": 0.875,
    "updates_sent": 21,
    "updates_accepted": 18,
    "updates_rejected": {"bad-signature": 2, "replay": 1},
    "bytes_sent": 123456,
    "bytes_received": 654321,
    "uptime_s": 12.5,
}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, labels) -> value, parsed by the Prometheus client's own parser."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_parse_as_prometheus_text_with_the_status_values() -> None:
    parsed = samples(render_metrics(SAMPLE))
    assert parsed[("p2pfl_round", ())] == 7
    assert parsed[("p2pfl_neighbours", ())] == 3
    assert parsed[("p2pfl_accuracy", ())] == 0.875
    assert parsed[("p2pfl_updates_sent_total", ())] == 21
    assert parsed[("p2pfl_updates_accepted_total", ())] == 18
    assert parsed[("p2pfl_bytes_received_total", ())] == 654321
    assert parsed[("p2pfl_uptime_seconds", ())] == 12.5


def test_rejections_are_one_counter_labelled_by_reason() -> None:
    parsed = samples(render_metrics(SAMPLE))
    rejected = {
        labels: value
        for (name, labels), value in parsed.items()
        if name == "p2pfl_updates_rejected_total"
    }
    assert rejected == {(("reason", "bad-signature"),): 2, (("reason", "replay"),): 1}


def test_each_metric_has_one_help_and_one_type_line_before_its_samples() -> None:
    lines = render_metrics(SAMPLE).splitlines()
    names = {line.split("{")[0].split()[0] for line in lines if not line.startswith("#")}
    for name in names:
        helps = [i for i, line in enumerate(lines) if line.startswith(f"# HELP {name} ")]
        types = [i for i, line in enumerate(lines) if line.startswith(f"# TYPE {name} ")]
        first_sample = min(
            i for i, line in enumerate(lines) if line.split("{")[0].split()[0] == name
        )
        assert len(helps) == 1 and len(types) == 1
        assert helps[0] < types[0] < first_sample
    kinds = {line.split()[2]: line.split()[3] for line in lines if line.startswith("# TYPE ")}
    assert all(kinds[n] == "counter" for n in kinds if n.endswith("_total"))
    assert kinds["p2pfl_round"] == "gauge"


def test_accuracy_is_left_out_before_the_first_evaluation() -> None:
    text = render_metrics({**SAMPLE, "accuracy": None, "updates_rejected": {}})
    assert "p2pfl_accuracy" not in text
    assert "p2pfl_updates_rejected_total" not in text
    assert samples(text)[("p2pfl_round", ())] == 7


# -- the server ---------------------------------------------------------------------------


async def http_get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        data = bytearray()
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}
    assert int(headers["content-length"]) == len(body)
    return int(status_line.split()[1]), headers, body


async def start_server(nursery: trio.Nursery) -> int:
    host, port = await nursery.start(serve_status, "127.0.0.1", 0, lambda: dict(SAMPLE))
    assert host == "127.0.0.1" and port > 0
    return port


async def test_get_status_returns_the_status_as_json() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await start_server(nursery)
            code, headers, body = await http_get(port, "/status")
            assert code == 200
            assert headers["content-type"] == "application/json"
            assert json.loads(body) == SAMPLE
            nursery.cancel_scope.cancel()


async def test_get_metrics_returns_prometheus_text() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await start_server(nursery)
            code, headers, body = await http_get(port, "/metrics")
            assert code == 200
            assert headers["content-type"].startswith("text/plain; version=0.0.4")
            assert samples(body.decode())[("p2pfl_round", ())] == 7
            nursery.cancel_scope.cancel()


async def test_other_paths_are_404() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await start_server(nursery)
            for path in ("/statusx", "/../etc/passwd", "/web/../status.py", "/web/", "/history"):
                code, _, _ = await http_get(port, path)
                assert code == 404, path
            nursery.cancel_scope.cancel()


async def test_a_silent_client_does_not_block_other_requests() -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            # A deadline far beyond the test's guard: the answer below cannot come from the
            # silent clients timing out, only from the server not waiting for them.
            host, port = await nursery.start(
                partial(serve_status, read_timeout=3600), "127.0.0.1", 0, lambda: dict(SAMPLE)
            )
            silent = await trio.open_tcp_stream("127.0.0.1", port)
            half = await trio.open_tcp_stream("127.0.0.1", port)
            await half.send_all(b"GET /sta")  # a request line that never ends
            code, _, body = await http_get(port, "/status")
            assert code == 200
            assert json.loads(body)["round"] == 7
            await silent.aclose()
            await half.aclose()
            nursery.cancel_scope.cancel()


async def receive_all(stream: trio.SocketStream) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some(65536):
        data += chunk
    return bytes(data)


async def test_idle_clients_beyond_the_cap_are_refused_at_once_not_held_open() -> None:
    """300 idle sockets hold at most ``max_connections`` server sockets; the rest get a 503
    and are closed by the server (EOF), with a deadline far beyond the test's guard."""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            _, port = await nursery.start(
                partial(serve_status, max_connections=4, read_timeout=3600),
                "127.0.0.1",
                0,
                lambda: dict(SAMPLE),
            )
            idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(4)]
            await trio.testing.wait_all_tasks_blocked()  # the four hold every slot
            refused = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(296)]
            for stream in refused:
                reply = await receive_all(stream)  # ends: the server closed it
                assert reply.startswith(b"HTTP/1.1 503 ")
                await stream.aclose()
            for stream in idle:
                await stream.aclose()
            # The slots come back as the idle clients leave.
            await trio.testing.wait_all_tasks_blocked()
            code, _, _ = await http_get(port, "/status")
            assert code == 200
            nursery.cancel_scope.cancel()


async def test_an_idle_client_is_cut_at_the_read_deadline() -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            _, port = await nursery.start(
                partial(serve_status, read_timeout=0.2), "127.0.0.1", 0, lambda: dict(SAMPLE)
            )
            idle = await trio.open_tcp_stream("127.0.0.1", port)
            assert await receive_all(idle) == b""  # closed by the server, nothing answered
            await idle.aclose()
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("request_bytes", "code"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", 400),
        (b"GET /status HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20_000 + b"\r\n\r\n", 431),
        (b"POST /status HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405),
    ],
)
async def test_malformed_oversize_or_non_get_requests_get_an_error_status(
    request_bytes: bytes, code: int
) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await start_server(nursery)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(request_bytes)
            reply = await receive_all(stream)
            assert reply.split(b" ", 2)[1] == str(code).encode()
            await stream.aclose()
            nursery.cancel_scope.cancel()


def test_epsilon_is_exported_only_when_privacy_is_on() -> None:
    assert "p2pfl_dp_epsilon" not in render_metrics(SAMPLE)
    with_dp = dict(SAMPLE, epsilon=3.5, delta=1e-5)
    assert samples(render_metrics(with_dp))[("p2pfl_dp_epsilon", ())] == 3.5
