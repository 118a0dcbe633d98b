"""The ``vitpipe`` command. Each subcommand parses its arguments and calls one function of the package."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitpipe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # --- shards: the data plane -------------------------------------------------------------
    shards = sub.add_parser("shards", help="build, verify and inspect WebDataset shards")
    shards_sub = shards.add_subparsers(dest="shards_command", required=True, metavar="ACTION")
    del shards_sub  # filled in by the data plane

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
