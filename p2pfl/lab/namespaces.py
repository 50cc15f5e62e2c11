"""Namespace plumbing of the network lab: running ``ip``, probing what the machine can
build, naming, entering and deleting the lab's namespaces (p2pfl/lab/netlab.py builds
the lab itself on top of these)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

PREFIX = "p2lab"
NFT_INSTALL_HINT = "apt-get install -y nftables"
_CLONE_NEWNET = 0x40000000

_T = TypeVar("_T")


class LabError(Exception):
    """A lab command failed; the message names the command and the kernel's answer."""


def run_command(args: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(args), capture_output=True, text=True)
    if check and result.returncode != 0:
        answer = (result.stderr or result.stdout).strip().splitlines()
        raise LabError(f"`{' '.join(args)}` failed: {answer[0] if answer else result.returncode}")
    return result


def lab_unavailable_reason() -> str | None:
    """Why this machine cannot build a lab (one line), or None if it can."""
    if os.geteuid() != 0:
        return "the network lab needs root (network namespaces)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the network lab needs `{tool}` (iproute2: apt-get install -y iproute2)"
    probe = f"{PREFIX}-{os.getpid()}-probe"
    result = run_command(["ip", "netns", "add", probe], check=False)
    if result.returncode != 0:
        return f"cannot create a network namespace: {result.stderr.strip()}"
    run_command(["ip", "netns", "del", probe], check=False)
    return None


def nft_missing_reason() -> str | None:
    """Why loss and NAT cannot be built here (one line), or None if nftables is present."""
    if shutil.which("nft") is None:
        return f"loss and NAT need nftables: {NFT_INSTALL_HINT}"
    return None


def lab_namespaces() -> list[str]:
    """Every namespace carrying the lab prefix, of any run."""
    names = run_command(["ip", "netns", "list"]).stdout.split()
    return [name for name in names if name.startswith(f"{PREFIX}-")]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def delete_namespace(name: str) -> None:
    # A namespace lives on while a process is in it: stop the lab's daemons first.
    pids = run_command(["ip", "netns", "pids", name], check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    run_command(["ip", "netns", "del", name], check=False)


def cleanup_leftovers() -> list[str]:
    """Delete namespaces of earlier labs whose process is gone; return their names."""
    removed = []
    for name in lab_namespaces():
        owner = name.split("-")[1]
        if owner.isdigit() and not _pid_alive(int(owner)):
            delete_namespace(name)
            removed.append(name)
    return removed


def run_in_netns(namespace: str, function: Callable[[], _T]) -> _T:
    """Call ``function`` in a thread that has entered ``namespace``; sockets it opens live there.

    setns(2) changes only the calling thread's namespace, so a short-lived thread
    keeps the rest of the process where it was. (os.setns arrives in Python 3.12.)
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            with open(f"/run/netns/{namespace}", "rb") as handle:
                if libc.setns(handle.fileno(), _CLONE_NEWNET) != 0:
                    error = ctypes.get_errno()
                    raise OSError(error, f"setns into {namespace}: {os.strerror(error)}")
            outcome["value"] = function()
        except BaseException as error:  # handed to the caller's thread below
            outcome["error"] = error

    thread = threading.Thread(target=target, name=f"netns-{namespace}")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
