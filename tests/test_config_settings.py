"""The daemon's settings are declared once (p2pfl/config.py); flags, TOML keys, checks,
the reference page and LocalNetwork's settings files are all made from that declaration.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from fltasks.settings_schema import flag_values, settings_of, to_toml
from gossip.aggregation import AGGREGATORS
from gossip.attacks import DAEMON_ATTACKS
from gossip.robust import DEFAULT_CLIP_FRACTION, DEFAULT_TRIM_FRACTION
from p2pfl.cli import build_parser, node_config
from p2pfl.config import ConfigError, NodeConfig, build_config, load_config_file
from p2pfl.config_reference import reference
from p2pfl.lab.localnet import LocalNetwork

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
SETTINGS = settings_of(NodeConfig)


def node_actions() -> dict[str, argparse.Action]:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {action.dest: action for action in commands.choices["node"]._actions}


def test_docs_config_md_is_the_generated_reference() -> None:
    written = (REPO / "docs" / "CONFIG.md").read_text(encoding="utf-8")
    assert written == reference(), (
        "docs/CONFIG.md is out of date: run "
        "`python -m p2pfl.config --reference docs/CONFIG.md`"
    )


def test_the_reference_names_every_setting_as_key_and_flag() -> None:
    page = reference()
    for item in SETTINGS:
        assert f"| `{item.name}` | `{item.flag}` |" in page, item.name


def test_every_setting_is_a_flag_and_no_flag_given_means_the_declared_defaults() -> None:
    actions = node_actions()
    assert {item.name for item in SETTINGS} <= set(actions)
    assert {item.name for item in SETTINGS} == set(actions) - {"help", "config"}
    assert node_config(build_parser().parse_args(["node"])) == NodeConfig()


def test_help_and_choices_come_from_the_modules_that_own_them() -> None:
    actions = node_actions()
    assert tuple(actions["attack"].choices) == DAEMON_ATTACKS
    assert tuple(actions["aggregator"].choices) == tuple(AGGREGATORS)
    trim = actions["trim_fraction"].help
    assert f"trimmed-mean {DEFAULT_TRIM_FRACTION}" in trim
    assert f"clipped {DEFAULT_CLIP_FRACTION}" in trim
    assert f"(default {NodeConfig().quorum})" in actions["quorum"].help
    assert "(default 120)" in actions["linger"].help


def test_every_default_written_as_toml_reads_back_as_the_defaults(tmp_path: Path) -> None:
    defaults = NodeConfig()
    path = tmp_path / "node.toml"
    path.write_text(to_toml({item.name: getattr(defaults, item.name) for item in SETTINGS},
                            NodeConfig))
    assert build_config(load_config_file(path), {}) == defaults


@pytest.mark.parametrize(
    ("flag", "key", "value", "message"),
    [
        ("--degree", "degree", "0", "--degree 0: must be at least 1"),
        ("--read-timeout", "read_timeout", "0", "--read-timeout 0.0: must be seconds > 0"),
        ("--trim-fraction", "trim_fraction", "0.7", "--trim-fraction 0.7: must be in (0, 0.5)"),
        ("--shard", "shard", '"9/4"', "--shard '9/4': expected I/N with 0 <= I < N"),
    ],
)
def test_a_bad_value_gets_the_same_one_line_error_from_a_flag_and_from_toml(
    tmp_path: Path, flag: str, key: str, value: str, message: str
) -> None:
    path = tmp_path / "node.toml"
    path.write_text(f"{key} = {value}\n")
    with pytest.raises(ConfigError) as from_file:
        build_config(load_config_file(path), {})
    args = build_parser().parse_args(["node", flag, value.strip('"')])
    with pytest.raises(ConfigError) as from_flag:
        node_config(args)
    assert str(from_file.value) == str(from_flag.value)
    assert str(from_flag.value).startswith(message)


def test_a_local_network_node_reads_its_settings_from_a_toml_file_and_flags_override_it(
    tmp_path: Path,
) -> None:
    network = LocalNetwork(
        tmp_path, 3, rounds=7, degree=2, extra_args=("--linger", "2", "--degree", "1"),
        node_args={1: ("--attack", "alie")},
    )
    bootstrap = "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWA"
    command = network.command(1, bootstrap)
    config_at = command.index("--config")
    assert command[config_at - 1] == "node"
    args = build_parser().parse_args(command[config_at - 1 :])
    config = node_config(args)
    assert (config.shard, config.rounds, config.bootstrap) == ("1/3", 7, (bootstrap,))
    assert config.state_dir == str(tmp_path / "node-1" / "state")
    assert (config.linger, config.degree, config.attack) == (2.0, 1, "alie")
    first = node_config(build_parser().parse_args(network.command(0, None)[config_at - 1 :]))
    assert (first.bootstrap, first.attack, first.shard) == ((), None, "0/3")


def test_flag_values_keeps_only_the_flags_given() -> None:
    args = build_parser().parse_args(["node", "--listen", "/ip4/0.0.0.0/tcp/1", "--seed", "3"])
    assert flag_values(args, NodeConfig) == {"listen": ("/ip4/0.0.0.0/tcp/1",), "seed": 3}


def test_a_settings_file_cannot_be_written_with_an_unknown_key() -> None:
    with pytest.raises(KeyError, match="roundz"):
        to_toml({"roundz": 3}, NodeConfig)
