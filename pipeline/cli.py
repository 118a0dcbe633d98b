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
    from pipeline.tune.cli import add_tune_arguments  # light: argparse only

    tune = sub.add_parser("tune", help="search hyper-parameters on Ray Tune (each trial a Ray Train run); "
                          "register the best checkpoint", description="Search a YAML space with Ray Tune: each "
                          "trial is a multi-worker Ray Train run, poor trials are stopped early, the best "
                          "checkpoint is registered in MLflow with the alias 'champion'. Resumes an interrupted "
                          "sweep of the same name unless --new is given.")  # fmt: skip
    add_tune_arguments(tune)
    tune.set_defaults(func=_run_tune)

    registry = sub.add_parser("registry", help="the MLflow Model Registry: promote a run's best checkpoint")
    actions = registry.add_subparsers(dest="registry_command", required=True, metavar="ACTION")
    promote = actions.add_parser("promote", help="register a run's best checkpoint (a sweep's: its best trial's) "
                                 "and point the alias at it; promoting twice creates no second version")  # fmt: skip
    promote.add_argument("run_id", metavar="RUN", help="an MLflow run ID or run name (the newest run of that name): "
                                                       "a training run, a trial, or a sweep's parent run")
    promote.add_argument("--name", help="registered model name (default: the run's model.name)")
    promote.add_argument("--alias", default="champion")
    promote.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db")
    promote.set_defaults(func=_registry_promote)

    evaluate = sub.add_parser("evaluate", help="evaluate a registered model or a checkpoint on a shard split, without Ray")
    evaluate.add_argument("model_uri", help="models:/NAME@champion, models:/NAME/VERSION, or a checkpoint path")
    evaluate.add_argument("--shards", required=True, help="a shard dataset root (holding train/val/test) or one split")
    evaluate.add_argument("--split", default="test", help="the split of a dataset root to evaluate (default: test)")
    evaluate.add_argument("--batch-size", type=int, default=256)
    evaluate.add_argument("--loader-workers", type=int, default=0)
    evaluate.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    evaluate.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db")
    evaluate.add_argument("--out", help="folder for evaluation.json (and DVT's budget curve JSON + PNG)")
    evaluate.set_defaults(func=_evaluate)

    export = sub.add_parser("export", help="export a checkpoint or registered model in inference form (ONNX, "
                            "torch.export pt2, TorchScript), checked against PyTorch",
                            description="Export the deployed form of a model (Castling-ViT without its "
                            "training-only branch; a DVT cascade exit by exit, with calibrated thresholds) and "
                            "check the written file against PyTorch. See pipeline/export.py.")  # fmt: skip
    export.add_argument("model_uri", help="models:/NAME@champion, models:/NAME/VERSION, or a checkpoint path")
    export.add_argument("--format", required=True, choices=["onnx", "pt2", "torchscript"])  # export.FORMATS
    export.add_argument("--out", required=True, help="folder for the exported file(s), export.json and config.yaml")
    export.add_argument("--shards", help="a shard dataset root: check on real images of --split (default: seeded "
                        "noise); a DVT cascade needs it to calibrate its thresholds on val")  # fmt: skip
    export.add_argument("--split", default="val", help="the split whose images the export is checked on")
    export.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db")
    export.set_defaults(func=_export)


def _run_tune(args: argparse.Namespace) -> int:
    from pipeline.tune.cli import run_from_args

    return run_from_args(args)


def _registry_promote(args: argparse.Namespace) -> int:
    from pipeline.registry import RegistryError, default_tracking_uri, promote_run

    try:
        promotion = promote_run(args.run_id, tracking_uri=args.tracking_uri or default_tracking_uri(),
                                name=args.name, alias=args.alias)  # fmt: skip
    except RegistryError as exc:
        print(f"vitpipe registry promote: {exc}", file=sys.stderr)
        return 2
    what = "registered as" if promotion.created else "already registered as"
    print(f"{promotion.checkpoint} ({promotion.metric} = {promotion.value}) {what} {promotion.name} version "
          f"{promotion.version}; {promotion.uri} points to it")  # fmt: skip
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from pipeline.data.manifest import ManifestError
    from pipeline.eval.evaluate import evaluate_model
    from pipeline.registry import RegistryError

    try:
        report = evaluate_model(args.model_uri, args.shards, split=args.split, batch_size=args.batch_size,
                                loader_workers=args.loader_workers, device=args.device,
                                tracking_uri=args.tracking_uri, out_dir=args.out)  # fmt: skip
    except (RegistryError, ManifestError, FileNotFoundError, ValueError) as exc:
        print(f"vitpipe evaluate: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


def _export(args: argparse.Namespace) -> int:
    from pipeline.data.manifest import ManifestError
    from pipeline.export import ExportError, export_model
    from pipeline.registry import RegistryError

    try:
        summary = export_model(args.model_uri, args.format, args.out, shards=args.shards, split=args.split,
                               tracking_uri=args.tracking_uri)  # fmt: skip
    except (ExportError, RegistryError, ManifestError, FileNotFoundError, ValueError) as exc:
        print(f"vitpipe export: {exc}", file=sys.stderr)
        return 2
    for item in summary["files"]:
        print(f"{args.out}/{item['file']}: {' '.join(item['inputs'])} -> {' '.join(item['outputs'])} "
              f"(max relative difference to PyTorch {item['max_relative_difference']:.1e})")  # fmt: skip
    print(f"checked on {summary['checked_on']}; export.json" + (", thresholds.json" if "thresholds" in summary else ""))
    return 0


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
