"""``p2pfl network`` and ``p2pfl member``: the invitation and revocation flows, in process."""

from __future__ import annotations

from pathlib import Path

import pytest

from gossip.keys import NodeKey
from gossip.member_formats import Certificate, RevocationEntry
from p2pfl.cli import main
from p2pfl.member_store import inbox, read_object

pytestmark = pytest.mark.unit


@pytest.fixture
def network(tmp_path: Path) -> dict[str, Path]:
    paths = {}
    for index in range(5):
        paths[f"k{index}"] = tmp_path / f"k{index}"
        NodeKey(bytes([index + 1]) * 32).save(paths[f"k{index}"])
    founders = [f"--founder={NodeKey(bytes([i + 1]) * 32).peer_id}" for i in range(4)]
    paths["genesis"] = tmp_path / "genesis"
    argv = ["network", "create", str(paths["genesis"]), "--name", "labs", "--threshold", "2"]
    assert main([*argv, *founders]) == 0
    return paths


def sign(network: dict[str, Path], path: Path, signer: int, *extra: str) -> int:
    argv = ["member", "sign", str(path), "--key", str(network[f"k{signer}"])]
    return main([*argv, "--network", str(network["genesis"]), *extra])


def test_an_invitation_gathers_k_signatures(network, tmp_path, capsys) -> None:
    cert = tmp_path / "cert"
    newcomer = NodeKey(bytes([5]) * 32).peer_id
    assert sign(network, cert, 0, "--peer", newcomer, "--org", "lab five") == 0
    assert "not valid yet (too-few-signatures" in capsys.readouterr().out
    assert sign(network, cert, 0) == 2  # the same member again
    assert "has signed it already" in capsys.readouterr().err
    assert sign(network, cert, 1) == 0
    assert "signed by 2 of k = 2; valid" in capsys.readouterr().out
    parsed = read_object(cert, Certificate)
    assert parsed.peer == newcomer and len(parsed.sigs) == 2
    assert main(["member", "inspect", str(cert), "--network", str(network["genesis"])]) == 0
    assert "verdict valid" in capsys.readouterr().out


def test_a_revocation_is_cosigned_then_published(network, tmp_path, capsys) -> None:
    entry, state = tmp_path / "entry", tmp_path / "state"
    state.mkdir()
    victim = NodeKey(bytes([4]) * 32).peer_id
    argv = ["member", "revoke", str(entry), "--network", str(network["genesis"])]
    assert main([*argv, "--key", str(network["k0"]), "--peer", victim]) == 0
    assert main([*argv, "--key", str(network["k1"])]) == 0
    assert "2 of k = 2 member signatures; publish it" in capsys.readouterr().out
    assert read_object(entry, RevocationEntry).target == victim
    assert main(["member", "publish", str(entry), "--state-dir", str(state)]) == 0
    assert [p.suffix for p in inbox(state).iterdir()] == [".revocationentry"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["member", "inspect", "/nonexistent"], "does not exist"),
        (["member", "sign", "/tmp/x-never", "--key", "K", "--network", "G"], "key file"),
    ],
)
def test_user_errors_are_one_line(argv, message, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_garbled_file_is_one_line(network, tmp_path, capsys) -> None:
    bad = tmp_path / "bad"
    bad.write_text("-----BEGIN P2PFL CERTIFICATE-----\nAAAA\n-----END P2PFL CERTIFICATE-----\n")
    assert main(["member", "inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "not msgpack" in err or "canonical" in err or "expected the fields" in err
    assert err.count("\n") == 1
