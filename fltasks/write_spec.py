"""``python -m fltasks.write_spec --task csv:PATH --label COLUMN``: print this member's task spec.

One member runs it on its own data and sends the file to the others; every
member then starts its node with ``--task-spec FILE`` (see fltasks/spec.py).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fltasks.spec import spec_of
from fltasks.task import TaskError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fltasks.write_spec",
        description="Print the task spec of this member's data, for every member to share.",
    )
    parser.add_argument("--task", required=True, help="csv:PATH or imagefolder:DIR")
    parser.add_argument("--label", help="csv: the column to predict")
    parser.add_argument("--model", help="mlp:W,W, cnn or resnet18 (default: the task's)")
    parser.add_argument("--image-size", type=int, help="images: side in pixels (default 32)")
    args = parser.parse_args(argv)
    try:
        spec = spec_of(args.task, args.label, args.model, args.image_size)
    except TaskError as error:
        print(f"write_spec: error: {error}", file=sys.stderr)
        return 2
    sys.stdout.write(spec.to_toml())
    return 0


if __name__ == "__main__":
    sys.exit(main())
