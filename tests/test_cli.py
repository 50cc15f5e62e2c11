"""The ``p2pfl`` command as a user runs it: real subprocesses, exit codes, one-line errors.

Every mistake a user can make (a flag, a key file, an address, a config file) must end
the command with exit code 2 and one line on stderr naming the cause, never a traceback.
The ``node`` cases that get past flag parsing import torch and libp2p (seconds each on a
busy machine), so one module fixture runs them all in one process, each with its own
stderr and exit status, and each test then checks its own case.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest

from gossip.keys import NodeKey
from p2pfl.config import ConfigError, build_config, load_config_file

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
# A guard against a hang: several node processes import torch and libp2p at once,
# minutes on a machine kept busy by other work.
TIMEOUT_S = 600
PEER_ID = re.compile(r"^12D3KooW[1-9A-HJ-NP-Za-km-z]{44}$")


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def p2pfl(*args: str, cwd: Path) -> Result:
    done = subprocess.run(
        [sys.executable, "-m", "p2pfl.cli", *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    return Result(done.returncode, done.stdout, done.stderr)


def assert_one_line_error(result: Result, *names: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for name in names:
        assert name in lines[0]


# -- version ------------------------------------------------------------------------------


def test_version_is_the_installed_distributions_version(tmp_path: Path) -> None:
    result = p2pfl("--version", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"p2pfl {metadata.version('p2pfl-gossip')}"


# -- keygen -------------------------------------------------------------------------------


def test_keygen_writes_a_0600_key_and_prints_its_peer_id(tmp_path: Path) -> None:
    result = p2pfl("keygen", "node.key", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = result.stdout.strip()
    assert PEER_ID.match(printed)
    key_file = tmp_path / "node.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert NodeKey.load(key_file).peer_id == printed


def test_keygen_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    key_file = tmp_path / "node.key"
    NodeKey.generate().save(key_file)
    before = key_file.read_bytes()
    result = p2pfl("keygen", "node.key", cwd=tmp_path)
    assert_one_line_error(result, "node.key", "--force")
    assert key_file.read_bytes() == before


def test_keygen_force_overwrites(tmp_path: Path) -> None:
    key_file = tmp_path / "node.key"
    old = NodeKey.generate()
    old.save(key_file)
    result = p2pfl("keygen", "node.key", "--force", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    new = NodeKey.load(key_file)
    assert new != old
    assert new.peer_id == result.stdout.strip()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


# -- node: every user mistake is one line and exit 2 ----------------------------------------

# case -> (extra argv after `node --key node.key --state-dir state`, words the line names)
NODE_CASES: dict[str, tuple[list[str], list[str]]] = {
    "missing-key": (["--key", "missing.key"], ["missing.key", "keygen"]),
    "garbage-key": (["--key", "garbage.key"], ["garbage.key", "not a p2pfl key file"]),
    "binary-garbage-key": (["--key", "binary.key"], ["binary.key"]),
    "bad-listen": (["--listen", "/ip4/not-an-ip/tcp/1"], ["--listen", "/ip4/not-an-ip/tcp/1"]),
    "bad-bootstrap": (["--bootstrap", "/ip4/1.2.3/tcp/1"], ["--bootstrap", "/ip4/1.2.3/tcp/1"]),
    "bootstrap-without-peer-id": (
        ["--bootstrap", "/ip4/127.0.0.1/tcp/4001"],
        ["--bootstrap", "/p2p/"],
    ),
    "bad-shard": (["--shard", "9/4"], ["--shard", "9/4"]),
    "bad-partition": (["--partition", "dirichlet:x"], ["dirichlet:x"]),
    "unknown-task": (["--task", "nosuch"], ["nosuch"]),
    "zero-degree": (["--degree", "0"], ["--degree"]),
    "unknown-config-key": (["--config", "unknown-key.toml"], ["unknown-key.toml", "bogus"]),
    "missing-config": (["--config", "nothere.toml"], ["nothere.toml", "no such file"]),
    "bad-log-format": (["--log-format", "xml"], ["--log-format", "xml"]),
}


# Runs `p2pfl.cli.main(argv)` once per argv in one process, each with its own stderr, and
# prints [exit status, stdout, stderr] for each: what `p2pfl ARGV` would have exited with
# and written, importing torch and libp2p once instead of once per case. The imports' own
# stderr is the process's, checked empty, so each case's lines are all a user would see.
ONE_PROCESS = """
import contextlib, io, json, sys, traceback
from p2pfl.cli import main
results = []
for argv in json.loads(sys.stdin.read()):
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            status = main(argv)
        except SystemExit as exit:
            status = exit.code
        except BaseException:  # what the command would have died of, as its traceback
            traceback.print_exc()
            status = 1
    results.append([status, stdout.getvalue(), stderr.getvalue()])
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def node_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Result]:
    """Run every NODE_CASES command; each must end on its own, and so the process."""
    workdir = tmp_path_factory.mktemp("cli-node")
    NodeKey.generate().save(workdir / "node.key")
    (workdir / "garbage.key").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n")
    (workdir / "binary.key").write_bytes(b"\xd8\xff" + os.urandom(62))
    (workdir / "unknown-key.toml").write_text('task = "digits"\nbogus = 1\n')
    # An address on no interface of this machine (TEST-NET-1): the bind fails at startup.
    cases = dict(NODE_CASES)
    cases["unbindable-listen"] = (["--listen", "/ip4/192.0.2.1/tcp/0"], ["--listen"])
    argvs = [
        ["node", "--key", "node.key", "--state-dir", f"state-{name}", *argv]
        for name, (argv, _) in cases.items()
    ]
    done = subprocess.run(
        [sys.executable, "-c", ONE_PROCESS], input=json.dumps(argvs), cwd=workdir, env=_env(),
        capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    results = json.loads(done.stdout)
    return {name: Result(*result) for name, result in zip(cases, results, strict=True)}


@pytest.mark.parametrize("case", sorted(NODE_CASES))
def test_node_user_error_is_one_line_and_exit_2(node_results: dict[str, Result], case: str) -> None:
    assert_one_line_error(node_results[case], *NODE_CASES[case][1])


def test_node_that_cannot_bind_its_listen_address_exits_2_without_traceback(
    node_results: dict[str, Result],
) -> None:
    # Log lines from libp2p may come first; the last line is the error.
    result = node_results["unbindable-listen"]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("p2pfl node: error: --listen")
    assert "192.0.2.1" in last


def test_status_with_nothing_listening_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = p2pfl("status", "--status-addr", "127.0.0.1:1", cwd=tmp_path)
    assert_one_line_error(result, "127.0.0.1:1")


# -- config: file, then flags ---------------------------------------------------------------


def test_config_file_supplies_settings_and_flags_override_it(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(
        'task = "breast-cancer"\nshard = "2/8"\ndegree = 6\nround_interval = 1\n'
        'listen = "/ip4/0.0.0.0/tcp/4001"\n'
        'bootstrap = ["/ip4/10.0.0.1/tcp/4001/p2p/12D3KooWA"]\n'
    )
    config = build_config(load_config_file(path), {"degree": 3, "shard": None})
    assert config.degree == 3  # the flag wins
    assert config.shard == "2/8"  # a flag that was not given leaves the file's value
    assert config.task == "breast-cancer"
    assert config.round_interval == 1.0
    assert config.listen == ("/ip4/0.0.0.0/tcp/4001",)
    assert config.bootstrap == ("/ip4/10.0.0.1/tcp/4001/p2p/12D3KooWA",)
    assert config.seed == 0  # in neither: the default


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('degree = "four"', "degree"),
        ('rounds = "5"', "rounds"),  # an optional int: once a TypeError deep in validate()
        ("allow = 5", "allow"),  # an optional path: once accepted
        ('dp_clip = "1"', "dp_clip"),
        ("send_timeout = true", "send_timeout"),
    ],
)
def test_config_file_value_of_the_wrong_type_is_a_config_error(
    tmp_path: Path, line: str, key: str
) -> None:
    path = tmp_path / "node.toml"
    path.write_text(line + "\n")
    with pytest.raises(ConfigError, match=f"^{key}: expected") as caught:
        build_config(load_config_file(path), {})
    assert "\n" not in str(caught.value)


def test_the_new_robustness_and_experiment_flags_reach_the_config() -> None:
    from p2pfl.cli import build_parser, node_config

    args = build_parser().parse_args(
        ["node", "--linger", "2.5", "--quorum", "4", "--attack", "alie"]
    )
    config = node_config(args)
    assert (config.linger, config.quorum, config.attack) == (2.5, 4, "alie")
    defaults = node_config(build_parser().parse_args(["node"]))
    assert (defaults.linger, defaults.quorum, defaults.attack) == (120.0, 3, None)
    assert defaults.round_interval > 0  # rounds are paced unless asked otherwise
