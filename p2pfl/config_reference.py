"""docs/CONFIG.md, made from :class:`p2pfl.config.NodeConfig`'s declarations.

``python -m p2pfl.config --reference docs/CONFIG.md`` runs :func:`main`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from fltasks.settings_schema import reference_markdown
from p2pfl.config import NodeConfig

REFERENCE_INTRO = """
Every setting of `p2pfl node` is both a flag and a key of the TOML file given with
`--config FILE`; a flag overrides the file, the file overrides the default. A repeatable
flag (`--listen`, `--bootstrap`) is a TOML string or list of strings. A value of the wrong
type in the file (`rounds = "5"`) is refused, not converted.

Generated from the declarations in `p2pfl/config.py` by
`python -m p2pfl.config --reference docs/CONFIG.md`; do not edit by hand.
"""


def reference() -> str:
    """docs/CONFIG.md: every daemon setting, made from its declaration."""
    return reference_markdown(NodeConfig, "p2pfl node: settings reference", REFERENCE_INTRO)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m p2pfl.config", description="The daemon's settings reference."
    )
    parser.add_argument(
        "--reference", metavar="PATH", required=True, help="write it here ('-': stdout)"
    )
    args = parser.parse_args(argv)
    if args.reference == "-":
        sys.stdout.write(reference())
    else:
        Path(args.reference).write_text(reference(), encoding="utf-8")
    return 0

