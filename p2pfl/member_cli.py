"""``p2pfl network ...`` and ``p2pfl member ...``: membership without a server, from a shell.

The flow (docs/PROTOCOL.md, "Membership"; SECURITY.md):

1. Founders run ``p2pfl keygen``, one of them ``p2pfl network create`` with their
   peer ids and k; the genesis file is shared out of band like a bootstrap address.
2. A newcomer's invitation starts at any member: ``p2pfl member sign cert --peer ID
   --org ORG`` creates and signs it; the file travels (mail, chat) and each of k
   members runs ``p2pfl member sign cert`` to append a signature. The newcomer starts
   ``p2pfl node --network genesis --cert cert``; no member restarts.
3. ``p2pfl member revoke entry --peer ID`` (or ``--serial N``) starts a revocation on
   top of the node's log; k members co-sign it the same way and one of them runs
   ``p2pfl member publish entry --state-dir DIR``: its running node takes it and
   gossips it, and every node disconnects and refuses the revoked key.

Every error a user can cause is one line (the caller prints it) and exit code 2.
"""

from __future__ import annotations

import argparse
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gossip.keys import NodeKey
from gossip.member_formats import (
    Certificate,
    Genesis,
    MemberFormatError,
    RevocationEntry,
    armor,
    check_peer_id,
)
from gossip.membership import MemberSet, expiry_warning
from p2pfl.member_store import (
    MemberFileError,
    inbox,
    load_state,
    read_genesis,
    read_object,
    write_atomically,
)

DAY_S = 86_400
COMMANDS = ("network", "member")


def add_commands(commands: Any) -> None:
    """Add ``network`` and ``member`` to the ``p2pfl`` parser's subcommands."""
    network = commands.add_parser("network", help="create a network's genesis file")
    network_commands = network.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = network_commands.add_parser("create", help="write a genesis: name, founders, k")
    create.add_argument("path", help="the genesis file to write")
    create.add_argument("--name", required=True)
    create.add_argument("--founder", action="append", required=True, metavar="PEER_ID",
                        help="a founding member's peer id, repeatable")
    create.add_argument("--threshold", type=int, required=True, metavar="K",
                        help="signatures of distinct members that admit or revoke anyone")
    create.add_argument("--force", action="store_true", help="overwrite an existing file")

    member = commands.add_parser("member", help="sign, inspect, revoke, publish or list members")
    actions = member.add_subparsers(dest="action", required=True, metavar="ACTION")
    sign = actions.add_parser("sign", help="create an invitation or add our signature to one")
    sign.add_argument("path", help="the certificate file (created when it does not exist)")
    _signer_flags(sign)
    sign.add_argument("--peer", metavar="PEER_ID", help="new invitation: the newcomer's id")
    sign.add_argument("--org", help="new invitation: the newcomer's organisation")
    sign.add_argument("--days", type=int, default=365, help="new invitation: lifetime (365)")
    inspect = actions.add_parser("inspect", help="show a certificate, entry or genesis")
    inspect.add_argument("path")
    inspect.add_argument("--network", metavar="GENESIS", help="also judge it in this network")
    inspect.add_argument("--state-dir", metavar="DIR", help="with the certificates a node knows")
    revoke = actions.add_parser("revoke", help="start a revocation or co-sign one")
    revoke.add_argument("path", help="the revocation file (created when it does not exist)")
    _signer_flags(revoke)
    target = revoke.add_mutually_exclusive_group()
    target.add_argument("--peer", metavar="PEER_ID", help="revoke this key for good")
    target.add_argument("--serial", type=int, help="revoke this certificate only")
    revoke.add_argument("--effective", type=int, metavar="UNIX_S", help="from (default: now)")
    publish = actions.add_parser("publish", help="hand a certificate or entry to a running node")
    publish.add_argument("path")
    publish.add_argument("--state-dir", required=True, metavar="DIR", help="the node's --state-dir")
    listing = actions.add_parser("list", help="the members and revocations a node knows")
    listing.add_argument("--network", required=True, metavar="GENESIS")
    listing.add_argument("--state-dir", required=True, metavar="DIR")


def _signer_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--key", required=True, help="your node key (the signer)")
    parser.add_argument("--network", required=True, metavar="GENESIS", help="the genesis file")
    parser.add_argument("--state-dir", metavar="DIR",
                        help="your node's --state-dir: its log head and known certificates")


def run_with(fail: type[Exception]) -> Callable[[argparse.Namespace], None]:
    """The handler of ``network``/``member``; ``fail`` is the CLI's one-line error type."""
    handlers = {"create": _create, "sign": _sign, "inspect": _inspect, "revoke": _revoke,
                "publish": _publish, "list": _list}

    def run(args: argparse.Namespace) -> None:
        try:
            handlers[args.action](args)
        except (MemberFileError, MemberFormatError) as error:
            raise fail(str(error)) from None

    return run


def _now() -> int:
    return int(time.time())


def _members(genesis: Genesis, state_dir: str | None) -> MemberSet:
    members = MemberSet(genesis)
    if state_dir:
        load_state(members, state_dir, _now())
    return members


def _write(path: str, text: str, force: bool = True) -> None:
    if Path(path).exists() and not force:
        raise MemberFileError(f"{path} already exists; pass --force to overwrite it")
    write_atomically(path, text.encode("utf-8"))


def _create(args: argparse.Namespace) -> None:
    founders = [check_peer_id(peer, "--founder") for peer in args.founder]
    genesis = Genesis.create(args.name, founders, args.threshold)
    _write(args.path, armor(genesis), args.force)
    print(f"network {genesis.network_id.hex()}: {len(genesis.founders)} founders, "
          f"k = {genesis.threshold}; share {args.path} with every member")


def _sign(args: argparse.Namespace) -> None:
    key = NodeKey.load(args.key)
    genesis = read_genesis(args.network)
    if Path(args.path).exists():
        cert = read_object(args.path, Certificate)
        assert isinstance(cert, Certificate)
        if cert.network != genesis.network_id:
            raise MemberFileError(f"{args.path} is for another network than {args.network}")
    else:
        if not args.peer or not args.org:
            raise MemberFileError(f"{args.path} does not exist: give --peer and --org to create it")
        if args.days < 1:
            raise MemberFileError(f"--days {args.days}: must be at least 1")
        now = _now()
        cert = Certificate(
            sigs=(), network=genesis.network_id, peer=check_peer_id(args.peer, "--peer"),
            org=args.org, serial=secrets.randbelow(2**63 - 1) + 1,
            not_before=now - 300, not_after=now + args.days * DAY_S,
        )
    if key.peer_id in cert.signers():
        raise MemberFileError(f"{args.path}: {key.peer_id} has signed it already")
    cert = cert.signed_by(key)
    _write(args.path, armor(cert))
    members = _members(genesis, args.state_dir)
    problem = members.check_certificate(cert, _now())
    state = "valid" if problem is None else f"not valid yet ({problem})"
    print(f"{args.path}: signed by {len(cert.sigs)} of k = {genesis.threshold}; {state}")


def _describe(item: Any) -> list[str]:
    if isinstance(item, Genesis):
        return [f"genesis {item.name!r}", f"network {item.network_id.hex()}",
                f"threshold {item.threshold}", *[f"founder {f}" for f in item.founders]]
    lines = [f"network {item.network.hex()}"]
    if isinstance(item, Certificate):
        lines += [f"certificate of {item.peer}", f"org {item.org}", f"serial {item.serial}",
                  f"valid {_when(item.not_before)} .. {_when(item.not_after)}"]
    else:
        lines += [f"revocation {item.describe()}", f"issued {_when(item.issued)}",
                  f"follows {item.prev.hex()[:16]}"]
    lines += [f"signed by {signer}" for signer in item.signers()]
    return lines


def _when(seconds: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def _inspect(args: argparse.Namespace) -> None:
    item = read_object(args.path)
    for line in _describe(item):
        print(line)
    if args.network is None or isinstance(item, Genesis):
        return
    members = _members(read_genesis(args.network), args.state_dir)
    if isinstance(item, Certificate):
        problem = members.check_certificate(item, _now())
        print("verdict valid" if problem is None else f"verdict refused: {problem}")
        if problem is None and expiry_warning(item, _now()):
            print("warning: in the last third of its life; renew it (member sign a new one)")
    else:
        counted = [s for s in item.signers() if members.is_member(s, _now())]
        print(f"verdict {len(counted)} of k = {members.threshold} member signatures")


def _revoke(args: argparse.Namespace) -> None:
    key = NodeKey.load(args.key)
    members = _members(read_genesis(args.network), args.state_dir)
    if Path(args.path).exists():
        entry = read_object(args.path, RevocationEntry)
        assert isinstance(entry, RevocationEntry)
        if entry.network != members.network_id:
            raise MemberFileError(f"{args.path} is for another network than {args.network}")
        if key.peer_id in entry.signers():
            raise MemberFileError(f"{args.path}: {key.peer_id} has signed it already")
    else:
        if args.peer is None and args.serial is None:
            raise MemberFileError(f"{args.path} does not exist: give --peer or --serial")
        now = _now()
        head = members.head
        entry = RevocationEntry(
            sigs=(), network=members.network_id, seq=head.length, prev=head.head,
            kind="peer" if args.peer else "serial",
            target=check_peer_id(args.peer, "--peer") if args.peer else args.serial,
            effective=args.effective if args.effective is not None else now, issued=now,
        )
    entry = entry.signed_by(key)
    _write(args.path, armor(entry))
    counted = [s for s in entry.signers() if members.is_member(s, _now())]
    print(f"{args.path}: {entry.describe()}; {len(counted)} of k = {members.threshold} "
          "member signatures" + ("; publish it with `p2pfl member publish`"
                                 if len(counted) >= members.threshold else ""))


def _publish(args: argparse.Namespace) -> None:
    item = read_object(args.path)
    if isinstance(item, Genesis):
        raise MemberFileError(f"{args.path} is a genesis: give it to nodes with --network")
    if not Path(args.state_dir).is_dir():
        raise MemberFileError(f"--state-dir {args.state_dir} is not a directory")
    target = inbox(args.state_dir) / f"{item.body_hash.hex()[:32]}.{type(item).__name__.lower()}"
    write_atomically(target, armor(item).encode("utf-8"))
    print(f"handed {args.path} to the node at {args.state_dir}; it is taken within a second")


def _list(args: argparse.Namespace) -> None:
    members = _members(read_genesis(args.network), args.state_dir)
    now = _now()
    print(f"network {members.network_id.hex()} k = {members.threshold}; "
          f"log {members.head.length} entries, head {members.head.head.hex()[:16]}")
    for peer in sorted(members.members(now)):
        cert = members.certificate_of(peer, now)
        if cert is None:
            print(f"member {peer} founder")
        else:
            print(f"member {peer} org={cert.org} serial={cert.serial} "
                  f"until={_when(cert.not_after)} signers={','.join(cert.signers())}")
    for entry in members.log:
        print(f"revoked {entry.kind} {entry.target} from {_when(entry.effective)}")
