"""The ``vitpipe`` command. Each subcommand parses its arguments and calls one function of the package.

Heavy imports (torch, ray, mlflow) happen inside the handlers, so ``vitpipe --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys


def _add_shards_commands(sub: argparse._SubParsersAction) -> None:
    """`vitpipe shards build|verify|inspect`: the data plane (pipeline.data)."""
    shards = sub.add_parser("shards", help="build, verify and inspect WebDataset shards")
    actions = shards.add_subparsers(dest="shards_command", required=True, metavar="ACTION")

    build = actions.add_parser("build", help="write train/val/test shards and their manifests")
    build.add_argument("source", help="the input dataset (a folder, or a file for parquet / CIFAR .tar.gz)")
    build.add_argument("out_dir", help="where OUT_DIR/{train,val,test}/ go")
    build.add_argument("--format", required=True, choices=["imagefolder", "idx", "parquet", "cifar"])
    build.add_argument("--samples-per-shard", type=int, default=2_000)  # shards.DEFAULT_SAMPLES_PER_SHARD
    build.add_argument("--val-fraction", type=float, default=0.1,
                       help="share of train carved into val when the source has no val split (0: none)")
    build.add_argument("--seed", type=int, default=0, help="seeds the val carve-out and the sample order")
    build.add_argument("--image-column", default="image", help="parquet: the encoded-image column")
    build.add_argument("--label-column", default="label", help="parquet: the label column")
    build.add_argument("--class-names", type=lambda s: s.split(","), help="idx/parquet: comma-separated names")
    build.add_argument("--overwrite", action="store_true", help="replace shards already in OUT_DIR")
    build.add_argument("--no-progress", dest="progress", action="store_false")
    build.set_defaults(func=_shards_build)

    verify = actions.add_parser("verify", help="re-read every shard against its manifest; non-zero exit on damage")
    verify.add_argument("out_dir")
    verify.add_argument("--no-progress", dest="progress", action="store_false")
    verify.set_defaults(func=_shards_verify)

    inspect = actions.add_parser("inspect", help="summary table: splits, shards, samples, classes")
    inspect.add_argument("out_dir")
    inspect.set_defaults(func=_shards_inspect)


def _shards_build(args: argparse.Namespace) -> int:
    from pipeline.data import ManifestError, SourceError, build_shards, inspect_shards

    try:
        build_shards(
            args.source, args.out_dir, format=args.format, samples_per_shard=args.samples_per_shard,
            val_fraction=args.val_fraction, seed=args.seed, image_column=args.image_column,
            label_column=args.label_column, class_names=args.class_names, overwrite=args.overwrite,
            progress=args.progress,
        )  # fmt: skip
    except (SourceError, ManifestError, FileExistsError, ValueError) as exc:
        print(f"vitpipe shards build: {exc}", file=sys.stderr)
        return 2
    print(inspect_shards(args.out_dir))
    return 0


def _shards_verify(args: argparse.Namespace) -> int:
    from pipeline.data import verify_shards

    report = verify_shards(args.out_dir, progress=args.progress)
    print(report)
    return 0 if report.ok else 1


def _shards_inspect(args: argparse.Namespace) -> int:
    from pipeline.data import ManifestError, inspect_shards

    try:
        print(inspect_shards(args.out_dir))
    except ManifestError as exc:
        print(f"vitpipe shards inspect: {exc}", file=sys.stderr)
        return 2
    return 0


def _add_train_command(sub: argparse._SubParsersAction) -> None:
    """`vitpipe train`: distributed training on Ray Train (pipeline.train)."""
    from pipeline.train.launcher import add_arguments  # light: argparse and the config schema only

    train = sub.add_parser("train", help="train a model on Ray Train (DDP workers), tracked in MLflow",
                           description="Train a model on Ray Train, tracked in MLflow. Resumes a run name "
                           "that has checkpoints unless --new is given.")  # fmt: skip
    add_arguments(train)
    train.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from pipeline.train.launcher import run_from_args

    return run_from_args(args)


def _add_tune_commands(sub: argparse._SubParsersAction) -> None:
    """`vitpipe tune`, `vitpipe registry`, `vitpipe evaluate`: search and the model registry."""


def _add_cluster_commands(sub: argparse._SubParsersAction) -> None:
    """`vitpipe cluster`: checks on cluster.yaml before any node is paid for."""
    cluster = sub.add_parser("cluster", help="check cluster.yaml; run the head node's MLflow server")
    actions = cluster.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")

    check = actions.add_parser("check", help="validate a Ray cluster config offline: Ray's schema + project rules")
    check.add_argument("config", nargs="?", default="cluster.yaml", help="default: ./cluster.yaml")
    check.set_defaults(func=_cluster_check)

    server = actions.add_parser("mlflow-server", help="(re)start the MLflow tracking server on the head node, "
                                "bound to 127.0.0.1 and the node's private address")  # fmt: skip
    server.add_argument("--db", required=True, help="sqlite file of the run database, e.g. ~/mlflow/mlflow.db")
    server.add_argument("--artifacts", required=True, help="artifact store, e.g. s3://BUCKET/mlflow")
    server.add_argument("--port", type=int, default=5000)
    server.add_argument("--workers", type=int, default=4, help="server processes")
    server.add_argument("--private-address", help="default: the address Ray uses for this node")
    server.add_argument("--host-name", dest="host_names", action="append", default=[],
                        help="another name clients reach the server by (repeatable), e.g. vitpipe-head")
    server.add_argument("--state-dir", default="~/mlflow", help="where server.pid and server.log go")
    server.set_defaults(func=_cluster_mlflow_server)


def _cluster_check(args: argparse.Namespace) -> int:
    from pipeline.cluster import check_cluster_config

    problems = check_cluster_config(args.config)
    for problem in problems:
        print(f"{args.config}: {problem}")
    if problems:
        print(f"{len(problems)} problem(s); fix them before `ray up`.", file=sys.stderr)
        return 1
    print(f"{args.config}: OK (Ray's cluster schema and the project's rules)")
    return 0


def _cluster_mlflow_server(args: argparse.Namespace) -> int:
    from pipeline.cluster import start_mlflow_server

    try:
        pgid = start_mlflow_server(args.db, args.artifacts, port=args.port, private_address=args.private_address,
                                   state_dir=args.state_dir, host_names=tuple(args.host_names),
                                   workers=args.workers)  # fmt: skip
    except (ValueError, RuntimeError, TimeoutError) as exc:
        print(f"vitpipe cluster mlflow-server: {exc}", file=sys.stderr)
        return 1
    print(f"mlflow server running (process group {pgid}) on 127.0.0.1:{args.port}; log in {args.state_dir}/server.log")
    return 0


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
