"""Command line of a sweep, shared by ``vitpipe tune`` and ``jobs/tune.py``. Imports nothing heavy."""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_tune_arguments", "main", "run_from_args"]


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--space", required=True, help="search space (YAML), e.g. tune_spaces/lsla.yaml")
    parser.add_argument("--config", required=True, help="training config (YAML) the trials start from")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a training-config field for every trial (repeatable)")
    parser.add_argument("--samples", type=int, help="number of trials (default: the space's num_samples)")
    parser.add_argument("--scheduler", choices=["asha", "fifo"], help="early stopping (default: the space's)")
    parser.add_argument("--search", choices=["optuna", "random", "grid"], help="proposals (default: the space's)")
    parser.add_argument("--baseline", action="store_true", default=None,
                        help="the first trial runs the training config's own values of the searched keys")
    parser.add_argument("--max-concurrent", type=int,
                        help="trials at once (default: as many as the cluster's resources hold)")
    parser.add_argument("--name", help="sweep name: its folder under storage_path (default: <run_name>-<space>)")
    parser.add_argument("--new", action="store_true", help="start over instead of resuming a sweep of this name")
    parser.add_argument("--retry-errored", action="store_true", help="when resuming, run errored trials again")
    parser.add_argument("--trial-retries", type=int, default=0,
                        help="times Tune restarts a trial whose process died (it resumes from its checkpoint)")
    parser.add_argument("--no-register", dest="register", action="store_false",
                        help="do not register the best checkpoint in the MLflow Model Registry")
    parser.add_argument("--model-name", help="registered model name (default: the config's model.name)")
    parser.add_argument("--address", help="Ray cluster address (default: config ray_address, RAY_ADDRESS, local)")
    parser.add_argument("--dry-run", action="store_true", help="check the space against the config and stop")


def run_from_args(args: argparse.Namespace) -> int:
    """Exit codes: 0 done, 1 the sweep failed or was interrupted, 2 config or space error."""
    from pipeline.train.config import ConfigError
    from pipeline.train.launcher import prepare
    from pipeline.tune.space import SpaceError, check_space, load_space
    from pipeline.tune.sweep import SweepError, run_sweep

    try:
        space = load_space(args.space).with_overrides(num_samples=args.samples, search=args.search,
                                                      scheduler=args.scheduler, baseline=args.baseline)  # fmt: skip
        config = prepare(args.config, args.overrides)
        if args.dry_run:
            metric, mode = check_space(space, config)
            print(f"{args.space}: OK against {args.config}; {space.samples()} sample(s) by {metric} ({mode}), "
                  f"{space.search} search, {space.scheduler.name} scheduler")  # fmt: skip
            for key, param in space.parameters.items():
                print(f"  {key}: {param.describe()}")
            return 0
        result = run_sweep(space, config, name=args.name, max_concurrent=args.max_concurrent, new=args.new,
                           register=args.register, model_name=args.model_name, address=args.address,
                           trial_retries=args.trial_retries, retry_errored=args.retry_errored)  # fmt: skip
    except (ConfigError, SpaceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 1 if result.interrupted else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tune", description="Search hyper-parameters on Ray Tune, tracked in MLflow.")
    add_tune_arguments(parser)
    return run_from_args(parser.parse_args(argv))
