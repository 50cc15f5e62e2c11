"""The status page at ``/``: what it ships, and what headless Chromium renders of it
against real daemons (tests/browser.py skips those without chromium, outside CI)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from p2pfl.lab.localnet import LocalNetwork
from p2pfl.lab.netpage import NetworkPage, NetworkPageServer
from p2pfl.status import ASSETS, answer
from tests.browser import rendered_dom, screenshot

pytestmark = pytest.mark.e2e

# Bounds a hang only: two daemons importing torch on a busy 2-core machine are slow.
READY_TIMEOUT_S = 240.0


def test_the_page_and_each_file_it_names_are_served_from_the_package() -> None:
    code, content_type, body = answer("GET", "/", dict)
    assert code == 200 and content_type.startswith("text/html")
    named = re.findall(r'(?:src|href)="([^"]+)"', body.decode())
    assert named, "the page names its script and style sheet"
    for path in named:
        code, _, asset = answer("GET", "/" + path, dict)
        assert code == 200 and asset == ASSETS[path.removeprefix("web/")][1], path


def test_no_file_of_the_page_names_another_host() -> None:
    for name, (_, body) in ASSETS.items():
        # The SVG namespace is an identifier, never fetched.
        text = body.decode().replace("http://www.w3.org/2000/svg", "")
        assert not re.search(r"(https?:)?//[a-z0-9]", text, re.IGNORECASE), name


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNetwork]:
    """Two real daemons, the second bootstrapped from the first, running until the end."""
    with LocalNetwork(
        tmp_path_factory.mktemp("web"), 2, rounds=None, local_epochs=1, partition="iid"
    ) as running:
        running.start_all()
        first = running.nodes[0]
        assert first is not None

        def learning() -> bool:
            status = first.status()
            return bool(status and status["round"] >= 2 and status["accuracy"] is not None)

        assert running.wait_for(learning, READY_TIMEOUT_S), "the node never finished 2 rounds"
        yield running


def _node_page(network: LocalNetwork) -> tuple[str, dict[str, Any]]:
    node = network.nodes[0]
    assert node is not None and node.status_url is not None
    status = node.status()
    assert status is not None
    return node.status_url.removesuffix("status"), status


def test_chromium_shows_the_nodes_peer_id_round_and_accuracy(network: LocalNetwork) -> None:
    url, before = _node_page(network)
    dom = rendered_dom(url)
    assert f'id="peer-id">{before["peer_id"]}<' in dom
    shown_round = re.search(r'id="round">(\d+)<', dom)
    shown_accuracy = re.search(r'id="accuracy">([0-9.]+)<', dom)
    assert shown_round and shown_accuracy, "the page's script did not fill them in"
    assert int(shown_round.group(1)) >= before["round"]
    assert 0.0 < float(shown_accuracy.group(1)) <= 1.0
    # Silence and pacing counts, filled in from /status (two honest daemons: none silent).
    assert re.search(r'id="silent">0 \(0\)<', dom), "the silent-peer count is not shown"
    assert re.search(r'id="waited-out">\d+<', dom), "the waited-out count is not shown"
    # The neighbour table lists the other daemon, by the end of its id.
    other = network.nodes[1]
    assert other is not None and other.peer_id is not None
    assert other.peer_id[-8:] in dom


def test_a_screenshot_of_the_page_is_not_blank(network: LocalNetwork, tmp_path: Path) -> None:
    url, _ = _node_page(network)
    with Image.open(screenshot(url, tmp_path / "node.png")) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    # A blank or failed page is one or two colours; drawn charts and text are hundreds.
    assert colours is None or len(colours) > 50


def test_chromium_shows_every_node_on_the_network_page(network: LocalNetwork) -> None:
    page = NetworkPage()
    for _ in range(2):  # two polls: a first point of each node's accuracy series
        page.update(network, network.statuses())
    with NetworkPageServer(page) as server:
        dom = rendered_dom(server.url)
    for node in network.started():
        assert node.peer_id is not None
        assert f'id="node-{node.index}"' in dom and node.peer_id[-8:] in dom
    rounds = re.findall(r'class="node-round">(\d+)<', dom)
    assert len(rounds) == 2 and all(int(r) >= 1 for r in rounds)
    # The gossip graph: a line per neighbour link, between the two daemons.
    graph = dom[dom.index('id="graph"'):]
    assert "<line" in graph
