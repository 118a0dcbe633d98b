"""The ``vitpipe`` command. Each subcommand parses its arguments and calls one function of the package.

Heavy imports (torch, ray, mlflow) happen inside the handlers, so ``vitpipe --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys


def _add_shards_commands(sub: argparse._SubParsersAction) -> None:
    """`vitpipe shards build|verify|inspect`: the data plane (pipeline.data)."""
    shards = sub.add_parser("shards", help="build, verify and inspect WebDataset shards")
    shards.add_subparsers(dest="shards_command", required=True, metavar="ACTION")


def _add_train_command(sub: argparse._SubParsersAction) -> None:
    """`vitpipe train`: distributed training on Ray Train (pipeline.train)."""


def _add_tune_commands(sub: argparse._SubParsersAction) -> None:
    """`vitpipe tune`, `vitpipe registry`, `vitpipe evaluate`: search and the model registry."""


def _add_cluster_commands(sub: argparse._SubParsersAction) -> None:
    """`vitpipe cluster`: checks on cluster.yaml before any node is paid for."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitpipe", description="Train efficient vision transformers on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_shards_commands(sub)
    _add_train_command(sub)
    _add_tune_commands(sub)
    _add_cluster_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
