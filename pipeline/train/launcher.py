"""The driver side of a training run: validate, decide new vs resume, open the MLflow run, run Ray Train.

``vitpipe train`` and ``jobs/train.py`` both end up in :func:`main`. The order matters:

1. the config is loaded, resolved and checked (data manifests, model name and kwargs, optimiser and
   scheduler) before any Ray resource is requested;
2. the run directory ``<storage_path>/<run_name>`` decides: its newest checkpoint means *resume* (and
   names the MLflow run to continue), ``--new`` deletes it and starts over;
3. Ray: the cluster at ``--address`` / ``ray_address`` / ``RAY_ADDRESS``, else a local Ray with CPU workers;
4. ``TorchTrainer.fit()``; a worker failure restarts the group from the last checkpoint, up to
   ``max_failures`` times; rank 0's progress lines are forwarded here by Ray.

Heavy imports (torch, ray, mlflow) happen inside functions so that ``vitpipe --help`` stays fast.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import TYPE_CHECKING, Any

import yaml

from pipeline.train.config import ConfigError, TrainConfig, flatten, load_config, resolve_config

if TYPE_CHECKING:
    from pipeline.train.distill import Teacher
    from pipeline.train.finetune import InitialWeights

__all__ = ["NonFiniteLossError", "TrainingError", "add_arguments", "build_trainer", "ensure_ray", "main", "prepare",
           "train"]


class TrainingError(RuntimeError):
    """The run failed (worker errors beyond ``max_failures``); the MLflow run is marked FAILED."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite; the run stopped (not retried) and is marked FAILED in MLflow."""


def prepare(path: str | os.PathLike, overrides: list[str] | dict[str, Any] | None = None) -> TrainConfig:
    """Load, override and resolve a config, reading the shard manifests. Errors: ConfigError.

    :func:`train` then checks the model and optimiser (:func:`check_model_and_optimisation`) before Ray.
    """
    return resolve_config(load_config(path, overrides))


def check_model_and_optimisation(config: TrainConfig) -> dict[str, int | float]:
    """Build the model where it is cheap (meta device) and a throw-away optimiser and scheduler, so that a
    bad model name, model kwarg, optimiser, scheduler or DVT exit weighting fails here. Returns the
    model's size (parameters, MACs) for tracking."""
    import torch
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    from pipeline.train.build import model_facts

    facts = model_facts(config)
    weights = config.method.dvt.exit_weights
    exits = sum(1 for key in facts if key.startswith("macs_exit"))
    if weights is not None and len(weights) != max(exits, 1):
        raise ConfigError(f"method.dvt.exit_weights: {len(weights)} weights for a model with {max(exits, 1)} exit(s)")
    probe = torch.nn.Linear(2, 2)
    opt = config.optim
    try:
        optimizer = create_optimizer_v2(probe, opt=opt.optimizer, lr=opt.lr, weight_decay=opt.weight_decay,
                                        momentum=opt.momentum, **opt.opt_kwargs)  # fmt: skip
    except (ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"optim.optimizer / optim.opt_kwargs: {err}") from None
    try:
        create_scheduler_v2(optimizer, sched=opt.scheduler, num_epochs=opt.epochs, warmup_epochs=opt.warmup_epochs,
                            warmup_lr=opt.warmup_lr, min_lr=opt.min_lr, step_on_epochs=False, updates_per_epoch=1)
    except (ValueError, TypeError, AssertionError) as err:
        raise ConfigError(f"optim.scheduler: {err}") from None
    if config.method.castling.mask_reg_strength > 0:
        from pipeline.models.layers.castling import mask_reg_weight

        try:
            mask_reg_weight(config.method.castling.mask_reg_strength, config.method.castling.mask_reg_schedule)
        except ValueError as err:
            raise ConfigError(f"method.castling.mask_reg_schedule: {err}") from None
    return facts


# Failed starts of the worker group (no resources within scaling.resource_wait_s, a worker lost while
# starting) that Ray Train retries before the run fails. Ray's default is to retry forever: a run that lost
# a node on a cluster that cannot replace it would wait for ever instead of failing.
WORKER_GROUP_START_RETRIES = 2


def build_trainer(config: TrainConfig, *, mlflow_run_id: str | None, callbacks: list | None = None,
                  initial: InitialWeights | None = None, teacher: Teacher | None = None):  # fmt: skip
    """The ``TorchTrainer`` of a resolved config (Ray must be initialised). Tune trials build theirs here too.

    ``initial``: the weights ``model.init_from`` names, fitted on the driver; ``teacher``: the distillation
    teacher. Both travel to the workers through Ray's object store (a worker on another node need not see
    the driver's files or registry).
    """
    import ray

    def to_workers(value):
        return value if value is None or not ray.is_initialized() else ray.put(value)

    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2._internal.constants import WORKER_GROUP_START_TIMEOUT_S_ENV_VAR

    from pipeline.train.loop import train_loop_per_worker

    scaling = config.scaling
    # Ray Train takes this timeout from the environment of the process that calls fit() (and passes it on
    # to its controller); there is no argument for it.
    os.environ[WORKER_GROUP_START_TIMEOUT_S_ENV_VAR] = f"{scaling.resource_wait_s:g}"
    resources = {"CPU": scaling.cpus_per_worker, **scaling.resources_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.to_dict(), "mlflow_run_id": mlflow_run_id,
                           "initial_weights": to_workers(None if initial is None else initial.state_dict),
                           "teacher": to_workers(teacher)},  # fmt: skip
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker=resources),  # fmt: skip
        run_config=RunConfig(
            name=config.run_name,
            storage_path=config.storage_path,
            failure_config=FailureConfig(max_failures=config.max_failures,
                                         controller_failure_limit=WORKER_GROUP_START_RETRIES),
            checkpoint_config=CheckpointConfig(
                num_to_keep=config.checkpoint.keep,
                checkpoint_score_attribute=config.checkpoint.metric,
                checkpoint_score_order=config.checkpoint.mode,
            ),
            callbacks=callbacks or [],
            # Ray Train's INFO lines repeat every reported metric; the loop prints its own progress.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo", timeout_s=scaling.timeout_s),
    )


def ensure_ray(config: TrainConfig, address: str | None, *, cpus_needed: float | None = None) -> None:
    """Connect to the cluster if one is named, else start a local Ray with at least ``cpus_needed``
    logical CPUs (default: what the config's workers ask for)."""
    import ray

    if ray.is_initialized():
        return
    address = address or config.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        print(f"[vitpipe] connecting to the Ray cluster at {address}")
        ray.init(address=address)
        return
    if config.scaling.use_gpu:
        import torch

        if torch.cuda.device_count() < config.scaling.num_workers:
            raise ConfigError(
                f"scaling.use_gpu: {config.scaling.num_workers} GPU workers asked, this machine has "
                f"{torch.cuda.device_count()} GPU(s) and no cluster address was given (--address or ray_address)"
            )
    if cpus_needed is None:
        cpus_needed = config.scaling.num_workers * config.scaling.cpus_per_worker
    cpus = max(os.cpu_count() or 1, math.ceil(cpus_needed))  # logical CPUs: never fewer than asked for
    print(f"[vitpipe] starting a local Ray ({cpus} CPUs)")
    ray.init(num_cpus=cpus)  # with the dashboard: Ray Train's placement-group cleaner polls its state API


def _resume_point(config: TrainConfig, new: bool) -> dict[str, Any] | None:
    """The newest checkpoint's meta of this run name, after ``--new`` has cleared it (then None)."""
    from pipeline.train.checkpoint import delete_run_dir, latest_checkpoint

    if new:
        if delete_run_dir(config.run_dir):
            print(f"[vitpipe] --new: removed the previous run's checkpoints in {config.run_dir}")
        return None
    latest = latest_checkpoint(config.run_dir)
    if latest is None:
        return None
    path, meta = latest
    try:
        saved = TrainConfig.from_dict(meta["config"])
    except ConfigError as err:  # written by another version of this schema: the state dict load will tell
        print(f"[vitpipe] note: cannot compare with the config stored in {path} ({err})")
        return {"path": path, **meta}
    for field in ("model", "data.num_classes", "data.in_chans", "data.img_size"):
        section, _, key = field.partition(".")
        old, now = getattr(saved, section), getattr(config, section)
        if key:
            old, now = getattr(old, key), getattr(now, key)
        if old != now:
            raise ConfigError(
                f"{field}: the checkpoints of run {config.run_name!r} in {config.storage_path} were trained with "
                f"{old!r}, this config says {now!r}; pass --new to start over or choose another run_name"
            )
    return {"path": path, **meta}


def train(config: TrainConfig, *, new: bool = False, address: str | None = None) -> dict[str, Any]:
    """Run (or resume) a training run to the end; returns rank 0's summary. See the module docstring."""
    from pipeline import tracking

    from pipeline.train.checkpoint import check_writable

    facts = check_model_and_optimisation(config)
    check_writable(config.storage_path)  # before Ray (and the MLflow run): Ray finds it out at the first save
    resume = _resume_point(config, new)
    initial = None
    if config.model.init_from is not None and resume is None:  # a resumed run's checkpoint holds its weights
        from pipeline.train.finetune import initial_weights

        initial = initial_weights(config)
        print(f"[vitpipe] starting from {initial.source}" + "".join(f"\n[vitpipe]   {n}" for n in initial.notes))
    teacher = _teacher(config)
    tracking_uri = config.mlflow.tracking_uri
    if resume is not None:
        run_id = resume.get("mlflow_run_id")
        status = tracking.run_status(tracking_uri, run_id, config.mlflow.outage_wait_s) if run_id else None
        if resume["epochs_done"] >= config.optim.epochs and status and status.get(tracking.TAG_STATUS) == "finished":
            print(f"[vitpipe] run {config.run_name!r} already finished its {resume['epochs_done']} epochs "
                  f"(MLflow run {run_id}); pass --new to start over, or raise optim.epochs to train on")  # fmt: skip
            return {"status": "already_finished", "epochs_done": resume["epochs_done"], "mlflow_run_id": run_id}
        print(f"[vitpipe] resuming run {config.run_name!r} after epoch {resume['epochs_done']} from {resume['path']}")
    run_id, resumed = tracking.open_run(
        tracking_uri, config.mlflow.experiment, config.run_name,
        params={**flatten(config.to_dict()), **{f"model.{k}": v for k, v in facts.items()}},
        tags={**tracking.run_tags(), tracking.TAG_RUN_DIR: config.run_dir, "vitpipe.model": config.model.name,
              **(initial.tags() if initial else {}), **(teacher.tags() if teacher else {})},
        artifacts={"config.yaml": yaml.safe_dump(config.to_dict(), sort_keys=False)},
        resume_run_id=None if resume is None else resume.get("mlflow_run_id"), outage_wait_s=config.mlflow.outage_wait_s,
    )  # fmt: skip
    print(f"[vitpipe] MLflow run {run_id} ({'continued' if resumed else 'new'}) in {tracking_uri}, "
          f"experiment {config.mlflow.experiment!r}")  # fmt: skip

    if config.scaling.num_workers > 0:  # 0: Ray Train's local mode runs the loop in this process
        ensure_ray(config, address)
    from ray.train import TrainingFailedError

    trainer = build_trainer(config, mlflow_run_id=run_id, initial=initial, teacher=teacher)
    scaling = config.scaling
    if scaling.num_workers > 0:
        print(f"[vitpipe] starting {scaling.num_workers} Ray Train worker(s), {scaling.cpus_per_worker:g} CPU"
              f"{' + 1 GPU' if scaling.use_gpu else ''} each (on a cluster, the autoscaler may add nodes first)")
    nodes_at_start = _alive_nodes() if scaling.num_workers > 0 else {}
    try:
        result = trainer.fit()
    except TrainingFailedError as err:
        lost = _lost_nodes_message(config, nodes_at_start, err) if scaling.num_workers > 0 else ""
        tracking.close_run(tracking_uri, run_id, "FAILED", f"failed: {lost}{str(err)[:2000]}", config.mlflow.outage_wait_s)
        raise TrainingError(f"run {config.run_name!r} failed (after up to {config.max_failures} restarts): "
                            f"{lost}{err}") from err  # fmt: skip
    except KeyboardInterrupt:
        tracking.close_run(tracking_uri, run_id, "KILLED", "interrupted: run the same command to resume",
                           config.mlflow.outage_wait_s)  # fmt: skip
        raise
    summary = dict(result.return_value or {})
    summary.setdefault("mlflow_run_id", run_id)
    summary["run_dir"] = config.run_dir
    if summary.get("status") == "non_finite_loss":
        raise NonFiniteLossError(f"run {config.run_name!r} stopped: {summary['message']}")
    best = summary.get("best_metric")
    print(f"[vitpipe] run {config.run_name!r} finished {summary.get('epochs_done')} epochs"
          + (f"; best {config.checkpoint.metric} = {best:.4f} (epoch {summary.get('best_epoch')})" if best is not None else "")
          + (f"\n[vitpipe] best checkpoint: {summary['best_checkpoint']}" if summary.get("best_checkpoint") else "")
          + f"\n[vitpipe] MLflow: run {run_id} in {tracking_uri}")  # fmt: skip
    return summary


def _teacher(config: TrainConfig) -> Teacher | None:
    """``method.distill``'s teacher, read on the driver (None without one)."""
    from pipeline.train.distill import resolve_teacher

    teacher = resolve_teacher(config)
    if teacher is not None:
        d = config.method.distill
        print(f"[vitpipe] distilling from {teacher.source} ({d.kind}, weight {d.weight:g}"
              + (f", temperature {d.temperature:g}" if d.kind == "soft" else "") + ")")  # fmt: skip
    return teacher


def _alive_nodes() -> dict[str, str]:
    """The cluster's live nodes: node id -> IP address."""
    import ray

    return {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]}


def _lost_nodes_message(config: TrainConfig, nodes_at_start: dict[str, str], err: Exception) -> str:
    """What a failed run says first when nodes it started with have died: which, and what the rest lacked."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    try:
        alive = _alive_nodes()
    except Exception:  # noqa: BLE001 - the cluster itself is gone: the error that follows says so
        return ""
    lost = [f"{ip} (node {node_id[:12]})" for node_id, ip in nodes_at_start.items() if node_id not in alive]
    if not lost:
        return ""
    message = f"the cluster lost node(s) {', '.join(lost)} during the run"
    if isinstance(getattr(err, "controller_failure", None), WorkerGroupStartupTimeoutError):
        scaling = config.scaling
        per_worker = {"CPU": scaling.cpus_per_worker, **({"GPU": 1} if scaling.use_gpu else {}),
                      **scaling.resources_per_worker}  # fmt: skip
        message += (f", and the {len(alive)} node(s) left did not hold {scaling.num_workers} worker(s) x "
                    f"{per_worker} within scaling.resource_wait_s = {scaling.resource_wait_s:g} s "
                    f"({WORKER_GROUP_START_RETRIES + 1} tries); add nodes (or let the autoscaler) and run the same "
                    "command to resume from the last checkpoint")  # fmt: skip
    return message + ". Ray's error: "


# --------------------------------------------------------------------------------------------------
# Command line (shared by `vitpipe train` and jobs/train.py).


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="training config (YAML), e.g. configs/tiny_cpu.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field by its dotted key, e.g. --set optim.lr=3.0e-4 (repeatable)")
    parser.add_argument("--new", action="store_true",
                        help="start over: delete this run name's checkpoints instead of resuming from them")
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (default: config ray_address, then RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the config and print it resolved, without starting Ray")


def run_from_args(args: argparse.Namespace) -> int:
    """Exit codes: 0 done, 1 training failed (or MLflow unreachable), 2 config error, 3 non-finite loss."""
    from pipeline.tracking import TrackingUnavailableError

    try:
        config = prepare(args.config, args.overrides)
        if args.dry_run:
            facts = check_model_and_optimisation(config)
            print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
            print(f"# model: {', '.join(f'{k} {v:,}' for k, v in facts.items())}")
            return 0
        train(config, new=args.new, address=args.address)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except (TrainingError, TrackingUnavailableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="train", description="Train a model on Ray Train, tracked in MLflow.")
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
