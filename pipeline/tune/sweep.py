"""Hyper-parameter sweeps on Ray Tune: every trial a multi-worker Ray Train run, tracked in MLflow.

``vitpipe tune`` and ``jobs/tune.py`` end up in :func:`run_sweep`:

1. the space is checked against the training config (:func:`pipeline.tune.space.check_space`) before
   Ray starts; the sweep's metric becomes every trial's ``checkpoint.metric``, so the checkpoint that
   is best by the sweep's measure is one Ray Train keeps;
2. the sweep lives in ``<storage_path>/<name>``: if Tune saved an experiment state there, the sweep
   resumes (``Tuner.restore``: unfinished trials continue from their last checkpoint), ``new`` deletes
   it and starts over;
3. one MLflow parent run per sweep; each trial opens its own nested child run (the tag
   ``mlflow.parentRunId``) and hands its id to the training loop, which logs params, curves and
   checkpoints there exactly as for ``vitpipe train``;
4. a trial (:func:`run_trial`) applies its values to the config and fits a ``TorchTrainer`` from
   ``build_trainer`` with ``TuneReportCallback``, so every epoch's metrics and checkpoint path reach Tune;
   ASHA stops poor trials on the reported ``epoch``; Optuna, random or grid search proposes;
5. the trials run ``max_concurrent`` at a time: under Train V2 Tune reserves only the trial's own CPU,
   the workers are requested by each trial's trainer, so the limit is what keeps trials from waiting on
   each other's workers; it defaults to what the cluster holds (:func:`default_concurrency`);
6. at the end: a summary table (printed, CSV next to the sweep and on the parent run), a plot of the
   metric against each searched knob, and the best trial's best checkpoint registered in the MLflow
   Model Registry with the alias ``champion`` (:mod:`pipeline.registry`).
"""

from __future__ import annotations

import csv
import io
import math
import numbers
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.train.config import ConfigError, TrainConfig, apply_overrides, flatten
from pipeline.tune.space import SearchSpace, plain_value, check_space, trial_config

__all__ = [
    "SweepError",
    "SweepResult",
    "TrialRow",
    "TrialSetup",
    "default_concurrency",
    "plot_metric_vs_knobs",
    "run_sweep",
    "run_trial",
    "trial_resources",
]

TAG_ROLE = "vitpipe.role"  # "sweep" on the parent run, "trial" on the children
TAG_SWEEP_DIR = "vitpipe.sweep_dir"
TAG_TRIAL_ID = "vitpipe.trial_id"
TAG_BASELINE = "vitpipe.baseline"  # "true" on the trial that runs the training config's own values
TAG_PARENT = "mlflow.parentRunId"  # MLflow nests a run under the run this tag names
STOPPED_EARLY = "stopped_early"


class SweepError(RuntimeError):
    """The sweep could not run (no resources for one trial, every trial failed, ...)."""


# --------------------------------------------------------------------------------------------------
# Resources.


def trial_resources(config: TrainConfig) -> dict[str, float]:
    """What one trial holds while it runs: 1 CPU for the trial itself plus its workers' resources."""
    scaling = config.scaling
    need = {"CPU": 1.0 + scaling.num_workers * scaling.cpus_per_worker}
    if scaling.use_gpu:
        need["GPU"] = float(scaling.num_workers)
    for key, value in scaling.resources_per_worker.items():
        need[key] = need.get(key, 0.0) + scaling.num_workers * value
    return need


def default_concurrency(cluster: dict[str, float], need: dict[str, float]) -> int:
    """How many trials fit in the cluster's resources at once (at least one must)."""
    fits = []
    for key, amount in need.items():
        if amount > 0:
            fits.append(math.floor(cluster.get(key, 0.0) / amount + 1e-9))
    if not fits or min(fits) < 1:
        have = {k: cluster.get(k, 0.0) for k in need}
        raise SweepError(f"one trial needs {need} (1 CPU for the trial, plus scaling.num_workers x the workers' "
                         f"resources), the Ray cluster has {have}")  # fmt: skip
    return min(fits)


# --------------------------------------------------------------------------------------------------
# One trial (runs in the Tune trial actor).


@dataclass(frozen=True)
class TrialSetup:
    """What every trial needs from the driver (sent once, through ``tune.with_parameters``)."""

    base: dict[str, Any]  # the resolved training config, checkpoint.metric/mode set to the sweep's
    parent_run_id: str
    sweep_name: str
    train_storage: str  # the trials' Ray Train runs go to <train_storage>/<trial id>
    facts: dict[str, Any] = field(default_factory=dict)  # the base model's size, for trials that keep the model
    baseline: dict[str, Any] | None = None  # the baseline trial's values (the space's ``baseline``)


def _same_values(values: dict[str, Any], baseline: dict[str, Any] | None) -> bool:
    if baseline is None or set(values) != set(baseline):
        return False
    for key, value in values.items():
        value, expected = plain_value(value), baseline[key]
        if isinstance(value, float) and isinstance(expected, float):
            if not math.isclose(value, expected, rel_tol=1e-9):
                return False
        elif value != expected:
            return False
    return True


def _trial_dirname(trial) -> str:
    return trial.trial_id


def _child_runs(client, experiment_id: str, parent_run_id: str, trial_id: str | None = None) -> list:
    query = f"tags.`{TAG_PARENT}` = '{parent_run_id}'"
    if trial_id is not None:
        query += f" and tags.`{TAG_TRIAL_ID}` = '{trial_id}'"
    return client.search_runs([experiment_id], filter_string=query, max_results=10_000)


def _open_trial_run(config: TrainConfig, setup: TrialSetup, trial_id: str, facts: dict,
                    tags: dict[str, str]) -> str:  # fmt: skip
    """The trial's child run: the one it opened before a restart, else a new one under the parent."""
    from mlflow.tracking import MlflowClient

    from pipeline import tracking

    uri = config.mlflow.tracking_uri
    client = MlflowClient(uri)
    experiment_id = client.get_run(setup.parent_run_id).info.experiment_id
    previous = _child_runs(client, experiment_id, setup.parent_run_id, trial_id)
    run_id, _ = tracking.open_run(
        uri, config.mlflow.experiment, f"{setup.sweep_name}/{trial_id}",
        params={**flatten(config.to_dict()), **{f"model.{k}": v for k, v in facts.items()}},
        tags={**tracking.run_tags(), TAG_PARENT: setup.parent_run_id, TAG_ROLE: "trial", TAG_TRIAL_ID: trial_id,
              tracking.TAG_RUN_DIR: config.run_dir, "vitpipe.model": config.model.name, **tags},
        artifacts={"config.yaml": yaml.safe_dump(config.to_dict(), sort_keys=False)},
        resume_run_id=previous[0].info.run_id if previous else None,
    )  # fmt: skip
    return run_id


def run_trial(values: dict[str, Any], setup: TrialSetup) -> None:
    """Tune's trainable: one training run with this trial's values, reporting every epoch to Tune.

    A worker failure restarts the trial's worker group from its last checkpoint (``max_failures`` of
    the config, Ray Train's FailureConfig); beyond that the trial fails (Tune marks it ERROR). A
    restarted or restored trial reuses its run directory (Ray Train resumes from it) and its MLflow run.
    """
    from ray import tune
    from ray.train import TrainingFailedError
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline import tracking
    from pipeline.train.distill import resolve_teacher
    from pipeline.train.finetune import initial_weights
    from pipeline.train.launcher import build_trainer, check_model_and_optimisation

    trial_id = tune.get_context().get_trial_id()
    config = trial_config(setup.base, {**values, "run_name": trial_id, "storage_path": setup.train_storage})
    changes_model = any(key.startswith(("model.", "data.")) for key in values)
    facts = check_model_and_optimisation(config) if changes_model or not setup.facts else setup.facts
    initial = initial_weights(config)  # model.init_from, fitted to this trial's model (None: from scratch)
    teacher = resolve_teacher(config)  # method.distill's (None: no distillation)
    tags = {**(initial.tags() if initial else {}), **(teacher.tags() if teacher else {})}
    if _same_values(values, setup.baseline):
        tags[TAG_BASELINE] = "true"
    run_id = _open_trial_run(config, setup, trial_id, facts, tags)
    trainer = build_trainer(config, mlflow_run_id=run_id, callbacks=[TuneReportCallback()], initial=initial,
                            teacher=teacher)  # fmt: skip
    try:
        trainer.fit()
    except TrainingFailedError as err:
        tracking.close_run(config.mlflow.tracking_uri, run_id, "FAILED", f"failed: {str(err)[:2000]}")
        raise


# --------------------------------------------------------------------------------------------------
# The summary.


@dataclass
class TrialRow:
    trial_id: str
    status: str  # completed | stopped early | non-finite loss | failed | error | unfinished | not started
    epochs: int  # epochs reported
    best: float | None  # best value of the sweep's metric over the epochs
    best_epoch: int | None
    checkpoint: str | None  # the checkpoint reported with the best value
    values: dict[str, Any]  # the searched keys' values
    run_id: str | None  # the MLflow child run
    run_dir: str | None = None
    baseline: bool = False  # the trial that ran the training config's own values


@dataclass
class SweepResult:
    name: str
    path: str  # the Tune experiment directory
    parent_run_id: str
    metric: str
    mode: str
    keys: list[str]
    rows: list[TrialRow]
    best: TrialRow | None
    interrupted: bool
    promotion: Any = None  # pipeline.registry.Promotion when the best checkpoint was registered
    artifacts: dict[str, str] = field(default_factory=dict)

    @property
    def baseline(self) -> TrialRow | None:
        """The trial that ran the training config's own values (a space with ``baseline: true``)."""
        return next((row for row in self.rows if row.baseline), None)

    def table(self) -> str:
        """The trials as an aligned text table, best first."""
        header, lines = _table_rows(self)
        widths = [max(len(str(r[i])) for r in [header, *lines]) for i in range(len(header))]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        return "\n".join(fmt.format(*map(str, r)).rstrip() for r in [header, *lines])

    def csv(self) -> str:
        header, _ = _table_rows(self, text=False)
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(header + ["baseline", "mlflow_run_id", "checkpoint"])
        for row in self.sorted_rows():
            writer.writerow(_row_cells(row, self.keys, text=False) + [row.baseline, row.run_id or "", row.checkpoint or ""])
        return out.getvalue()

    def sorted_rows(self) -> list[TrialRow]:
        sign = -1 if self.mode == "max" else 1
        return sorted(self.rows, key=lambda r: (r.best is None, sign * (r.best or 0.0), r.trial_id))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _row_cells(row: TrialRow, keys: list[str], text: bool) -> list:
    best = row.best if not text or row.best is None else f"{row.best:.4f}"
    values = [row.values.get(k) for k in keys]
    trial = f"{row.trial_id} (baseline)" if text and row.baseline else row.trial_id
    return [trial, row.status, row.epochs, best if best is not None else "", row.best_epoch or ""] + [
        _fmt(v) if text else v for v in values
    ]


def _table_rows(result: SweepResult, text: bool = True) -> tuple[list[str], list[list]]:
    header = ["trial", "status", "epochs", f"best {result.metric}" if text else f"best_{result.metric}",
              "best_epoch"] + list(result.keys)  # fmt: skip
    return header, [_row_cells(r, result.keys, text) for r in result.sorted_rows()]


def _status(tag: str | None, tune_status: str | None, error: bool) -> str:
    """A trial's outcome from its MLflow run's status tag (set by the training loop) and Tune's status."""
    if error or tune_status == "ERROR":
        return "error"
    if tag is None:
        return "not started" if tune_status in ("PENDING", None) else "unfinished"
    if tag == "finished":
        return "completed"
    if tag == "non_finite_loss":
        return "non-finite loss"
    if tag.startswith(STOPPED_EARLY):
        return "stopped early"
    if tag.startswith("failed") and tune_status != "TERMINATED":
        return "failed"
    # Still "running", or "failed" by an error that ending the trial caused (the train controller's actor
    # dying with the trial's placement group): the trial was ended from outside. Tune does that to a trial
    # the scheduler stops (Tune calls it TERMINATED: a trial that fails by itself is ERROR), and to every
    # running trial when the sweep is interrupted.
    return "stopped early" if tune_status == "TERMINATED" else "unfinished"


def _saved_statuses(path: str) -> dict[str, str]:
    """Trial id -> Tune's status (TERMINATED, ERROR, PENDING, RUNNING, ...) as saved in the experiment state.

    Read back from disk because after an interruption Tune's cleanup ends the trials in memory; the state
    it saved just before says which trials a restore will run again.
    """
    from ray.tune import ExperimentAnalysis

    return {trial.trial_id: trial.status for trial in ExperimentAnalysis(path).trials}


def _best_of(df, metric: str, mode: str) -> tuple[float | None, int | None, str | None, int]:
    """Best value, its epoch and checkpoint path from a trial's reported results; and epochs reported."""
    if df is None or len(df) == 0 or "epoch" not in df:
        return None, None, None, 0
    epochs = int(df["epoch"].max())
    if metric not in df:
        return None, None, None, epochs
    finite = df[df[metric].apply(lambda v: isinstance(v, (int, float)) and math.isfinite(v))]
    if len(finite) == 0:
        return None, None, None, epochs
    # Ties go to the later epoch, as in the training loop's and the registry's choice of the best checkpoint.
    sign = 1 if mode == "max" else -1
    row = max((r for _, r in finite.iterrows()), key=lambda r: (sign * r[metric], r["epoch"]))
    checkpoint = row.get("checkpoint_path")
    return float(row[metric]), int(row["epoch"]), checkpoint if isinstance(checkpoint, str) else None, epochs


def _collect(results, statuses: dict[str, str], space: SearchSpace, metric: str, mode: str, client,
             experiment_id: str, parent_run_id: str) -> list[TrialRow]:  # fmt: skip
    from pipeline.tracking import TAG_RUN_DIR, TAG_STATUS

    children = {}
    for run in _child_runs(client, experiment_id, parent_run_id):
        children.setdefault(run.data.tags.get(TAG_TRIAL_ID), run)  # newest first: keep the newest
    rows = []
    for result in results:
        trial_id = result.metrics.get("trial_id") if result.metrics else None
        trial_id = trial_id or Path(result.path).name
        best, best_epoch, checkpoint, epochs = _best_of(result.metrics_dataframe, metric, mode)
        run = children.get(trial_id)
        tag = run.data.tags.get(TAG_STATUS) if run is not None else None
        rows.append(TrialRow(
            trial_id=trial_id, status=_status(tag, statuses.get(trial_id), result.error is not None), epochs=epochs,
            best=best, best_epoch=best_epoch, checkpoint=checkpoint,
            values={k: (result.config or {}).get(k) for k in space.parameters},
            run_id=run.info.run_id if run is not None else None,
            run_dir=run.data.tags.get(TAG_RUN_DIR) if run is not None else None,
            baseline=run is not None and run.data.tags.get(TAG_BASELINE) == "true",
        ))  # fmt: skip
    return rows


def _log_held_back_epochs(client, run_id: str, frame, metric: str) -> None:
    """Log to a trial's MLflow run the epochs it reported to Tune that the run lacks (by ``metric``)."""
    from mlflow.entities import Metric

    if frame is None or "epoch" not in frame or metric not in frame:
        return
    logged = {m.step for m in client.get_metric_history(run_id, metric)}
    missing = []
    for _, reported in frame.iterrows():
        epoch = int(reported["epoch"])
        if epoch in logged:
            continue
        timestamp = int(1000 * float(reported.get("timestamp", time.time())))  # when the trial reported it
        missing += [Metric(key, float(value), timestamp, epoch) for key, value in reported.items()
                    if "/" in key and not key.startswith("config/") and isinstance(value, numbers.Real)]  # fmt: skip
    for start in range(0, len(missing), 900):  # MLflow's batch limit is 1,000
        client.log_batch(run_id, metrics=missing[start:start + 900])


def plot_metric_vs_knobs(result: SweepResult, space: SearchSpace, path: str | os.PathLike) -> Path | None:
    """One panel per searched knob: each trial's best metric against its value, over the knob's whole range
    (log axis for loguniform knobs, categories in the order of the space); completed trials as dots, the
    others (stopped early, ...) as crosses. None when no trial has a value to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import NullFormatter

    rows = [r for r in result.rows if r.best is not None]
    if not rows:
        return None
    keys = list(space.parameters)
    columns = min(3, len(keys))
    lines = math.ceil(len(keys) / columns)
    figure, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.2 * lines), squeeze=False, sharey=True)
    for ax, key in zip(axes.flat, keys):
        param = space.parameters[key]
        labels = [str(v) for v in param.args]
        for done, marker, label in ((True, "o", "completed"), (False, "x", "stopped early / other")):
            chosen = [r for r in rows if (r.status == "completed") == done]
            if chosen:
                xs = [labels.index(str(r.values[key])) if param.categorical else r.values[key] for r in chosen]
                ax.scatter(xs, [r.best for r in chosen], marker=marker, label=label)
        if param.categorical:
            ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=7)
            ax.set_xlim(-0.5, len(labels) - 0.5)
        else:
            low, high = param.args[0], param.args[1]
            if param.log_scale:
                ax.set_xscale("log")
                ticks = np.geomspace(low, high, 4)
            else:
                ticks = np.linspace(low, high, 4)
            ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks], fontsize=7)
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlim(*((low / 1.15, high * 1.15) if param.log_scale else (low - 0.05 * (high - low), high + 0.05 * (high - low))))
        ax.set_xlabel(key, fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    for line in axes:
        line[0].set_ylabel(f"best {result.metric}")
    axes.flat[0].legend(fontsize=7)
    figure.suptitle(f"sweep {result.name}: best {result.metric} ({result.mode}) of {len(rows)} trials", fontsize=9)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# --------------------------------------------------------------------------------------------------
# The sweep (runs on the driver).


def _open_parent(config: TrainConfig, space: SearchSpace, name: str, path: str, metric: str, mode: str,
                 samples: int, concurrency: int, resuming: bool) -> tuple[str, bool]:  # fmt: skip
    """The sweep's parent run: the newest one for this sweep directory when resuming, else a new one."""
    from mlflow.tracking import MlflowClient

    from pipeline import tracking

    uri = config.mlflow.tracking_uri
    client = MlflowClient(uri)
    previous = None
    if resuming:
        experiment = client.get_experiment_by_name(config.mlflow.experiment)
        if experiment is not None:
            runs = client.search_runs([experiment.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                                      filter_string=f"tags.`{TAG_ROLE}` = 'sweep' and tags.`{TAG_SWEEP_DIR}` = '{path}'")  # fmt: skip
            previous = runs[0].info.run_id if runs else None
    params = {
        **{f"space.{k}": p.describe() for k, p in space.parameters.items()},
        "sweep.metric": metric, "sweep.mode": mode, "sweep.search": space.search,
        "sweep.scheduler": space.scheduler.name, "sweep.grace_period": space.scheduler.grace_period,
        "sweep.reduction_factor": space.scheduler.reduction_factor, "sweep.num_samples": samples,
        "sweep.max_concurrent": concurrency, "sweep.seed": space.seed, "sweep.baseline": space.baseline,
        **flatten(config.to_dict()),
    }  # fmt: skip
    run_id, resumed = tracking.open_run(
        uri, config.mlflow.experiment, name, params=params,
        tags={**tracking.run_tags(), TAG_ROLE: "sweep", TAG_SWEEP_DIR: path, "vitpipe.metric": metric,
              "vitpipe.mode": mode, "vitpipe.space": space.source, "vitpipe.model": config.model.name},
        artifacts={"space.yaml": space.text or yaml.safe_dump({"parameters": list(space.parameters)}),
                   "config.yaml": yaml.safe_dump(config.to_dict(), sort_keys=False)},
        resume_run_id=previous,
    )  # fmt: skip
    if resumed:
        client.update_run(run_id, status="RUNNING")
    return run_id, resumed


def _write_text(uri: str, text: str) -> None:
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    with fs.open_output_stream(path) as stream:
        stream.write(text.encode())


def run_sweep(
    space: SearchSpace,
    config: TrainConfig,
    *,
    name: str | None = None,
    max_concurrent: int | None = None,
    new: bool = False,
    register: bool = True,
    model_name: str | None = None,
    address: str | None = None,
    trial_retries: int = 0,
    retry_errored: bool = False,
    callbacks: list | None = None,
    quiet: bool = False,
) -> SweepResult:
    """Run (or resume) a sweep to the end; see the module docstring.

    ``config``: a resolved training config (:func:`pipeline.train.launcher.prepare`). ``name``: the
    sweep's directory under ``config.storage_path`` (default ``<run_name>-<space file stem>``).
    ``trial_retries``: Tune restarts a trial whose actor died this many times (it resumes from its last
    checkpoint); ``retry_errored``: on resume, run errored trials again. ``callbacks``: extra Tune callbacks.
    ``quiet``: no Tune status tables (each trial's own progress lines still show).
    """
    from mlflow.tracking import MlflowClient

    from pipeline import tracking
    from pipeline.train.checkpoint import check_writable, delete_run_dir
    from pipeline.train.launcher import check_model_and_optimisation, ensure_ray

    metric, mode = check_space(space, config)
    base = TrainConfig.from_dict(apply_overrides(config.to_dict(), {"checkpoint.metric": metric, "checkpoint.mode": mode}))
    facts = check_model_and_optimisation(base)
    if base.model.init_from is not None:  # fails here rather than in every trial; an alias read once
        from pipeline.train.finetune import initial_weights

        initial = initial_weights(base)
        print(f"[vitpipe] trials start from {initial.source}" + "".join(f"; {n}" for n in initial.notes))
        if initial.source.startswith("models:/"):
            base.model.init_from = initial.source
    if base.method.distill.teacher is not None:
        from pipeline.train.distill import resolve_teacher

        teacher = resolve_teacher(base)
        print(f"[vitpipe] trials distil from {teacher.source}")
        if teacher.source.startswith("models:/"):
            base.method.distill.teacher = teacher.source
    name = name or f"{config.run_name}-{Path(space.source).stem}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ConfigError(f"sweep name must be letters, digits, '_', '-', '.', got {name!r}")
    if max_concurrent is not None and max_concurrent < 1:
        raise ConfigError(f"max_concurrent must be >= 1, got {max_concurrent}")
    path = f"{config.storage_path.rstrip('/')}/{name}"
    check_writable(config.storage_path)  # before Ray: Tune finds it out at its first experiment save
    if new and delete_run_dir(path):
        print(f"[vitpipe] --new: removed the previous sweep in {path}")

    ensure_ray(base, address, cpus_needed=trial_resources(base)["CPU"])  # one trial at least
    import ray
    from ray import tune

    need = trial_resources(base)
    fits = default_concurrency(ray.cluster_resources(), need)
    concurrency = max_concurrent or fits
    samples = space.samples()
    resuming = tune.Tuner.can_restore(path)
    parent_run_id, _ = _open_parent(base, space, name, path, metric, mode, samples, concurrency, resuming)
    uri = base.mlflow.tracking_uri
    print(f"[vitpipe] sweep {name!r}: {'resuming' if resuming else 'starting'} in {path}; {samples} sample(s), "
          f"{space.search} search, {space.scheduler.name} scheduler, up to {concurrency} trial(s) at once "
          f"(each holds {need}); MLflow parent run {parent_run_id} in {uri}")  # fmt: skip

    baseline = space.baseline_values(base) if space.baseline else None
    setup = TrialSetup(base=base.to_dict(), parent_run_id=parent_run_id, sweep_name=name, train_storage=f"{path}/trials",
                       facts=facts, baseline=baseline)  # fmt: skip
    if quiet and space.search == "optuna":
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created in memory" each sweep
    trainable = tune.with_parameters(run_trial, setup=setup)
    if resuming:
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=retry_errored)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space.param_space(),
            tune_config=tune.TuneConfig(
                metric=metric, mode=mode, search_alg=space.searcher(metric, mode, [baseline] if baseline else None),
                scheduler=space.scheduler.build(base.optim.epochs, path), num_samples=samples,
                max_concurrent_trials=concurrency, trial_name_creator=_trial_dirname,
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(name=name, storage_path=base.storage_path, callbacks=callbacks,
                                      failure_config=tune.FailureConfig(max_failures=trial_retries),
                                      verbose=0 if quiet else None),  # 0: no status tables, the trials' lines only
        )  # fmt: skip
    try:
        results = tuner.fit()
    except BaseException as err:
        tracking.close_run(uri, parent_run_id, "FAILED", f"failed: {type(err).__name__}: {str(err)[:2000]}")
        raise
    statuses = _saved_statuses(path)
    interrupted = any(status not in ("TERMINATED", "ERROR") for status in statuses.values())

    client = MlflowClient(uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    rows = _collect(results, statuses, space, metric, mode, client, experiment_id, parent_run_id)
    # Children that the scheduler stopped are still marked running, or failed when the stop tore their worker
    # down mid-way through the run's end (the controller gone under a Ray call): Tune says stopped, so close them
    # so, with the epochs their rank 0 held back (until a checkpoint commits) when the stop came.
    frames = {row.trial_id: result.metrics_dataframe for row, result in zip(rows, results)}
    for row in rows:
        if row.status == "stopped early" and row.run_id:
            _log_held_back_epochs(client, row.run_id, frames[row.trial_id], metric)
            if client.get_run(row.run_id).info.status in ("RUNNING", "FAILED"):
                tracking.close_run(uri, row.run_id, "KILLED",
                                   f"{STOPPED_EARLY}: {space.scheduler.name} after epoch {row.epochs}")  # fmt: skip
    scored = [r for r in rows if r.best is not None]
    best = (max if mode == "max" else min)(scored, key=lambda r: r.best) if scored else None
    result = SweepResult(name=name, path=path, parent_run_id=parent_run_id, metric=metric, mode=mode,
                         keys=list(space.parameters), rows=rows, best=best, interrupted=interrupted)  # fmt: skip
    _report(result, space, client, path)

    if interrupted:
        tracking.close_run(uri, parent_run_id, "KILLED", "interrupted: run the same command again to resume")
        print(f"[vitpipe] sweep {name!r} interrupted; run the same command again to resume it")
        return result
    if best is None:
        tracking.close_run(uri, parent_run_id, "FAILED", "failed: no trial reported the metric")
        raise SweepError(f"sweep {name!r}: no trial reported {metric}; see the trials' errors above")
    if register:
        result.promotion = _register_best(result, base, client, model_name)
    client.set_tag(parent_run_id, tracking.TAG_STATUS, "finished")
    client.set_terminated(parent_run_id, "FINISHED")
    return result


def _report(result: SweepResult, space: SearchSpace, client, path: str) -> None:
    """Print the table; save it (CSV) and the plot beside the sweep and on the parent run."""
    print(f"[vitpipe] sweep {result.name!r}: {len(result.rows)} trial(s), by {result.metric} ({result.mode})")
    print(result.table())
    csv_text = result.csv()
    _write_text(f"{path}/trials.csv", csv_text)
    result.artifacts["trials.csv"] = f"{path}/trials.csv"
    client.log_text(result.parent_run_id, csv_text, "sweep/trials.csv")
    client.log_text(result.parent_run_id, result.table() + "\n", "sweep/trials.txt")
    with tempfile.TemporaryDirectory() as scratch:
        plot = plot_metric_vs_knobs(result, space, Path(scratch, "metric_vs_knobs.png"))
        if plot is not None:
            client.log_artifact(result.parent_run_id, str(plot), "sweep")
    counts: dict[str, int] = {}
    for row in result.rows:
        counts[row.status] = counts.get(row.status, 0) + 1
    metrics = {f"trials_{status.replace(' ', '_').replace('-', '_')}": n for status, n in counts.items()}
    if result.best is not None:
        metrics[f"best_{result.metric}"] = result.best.best
        client.set_tag(result.parent_run_id, "vitpipe.best_trial", result.best.trial_id)
        if result.best.run_id:
            client.set_tag(result.parent_run_id, "vitpipe.best_run_id", result.best.run_id)
    for key, value in metrics.items():
        client.log_metric(result.parent_run_id, key, float(value))


def _register_best(result: SweepResult, config: TrainConfig, client, model_name: str | None):
    from pipeline import registry

    best = result.best
    # The trial's run directory, searched by the sweep's metric (every trial keeps its checkpoints by it);
    # Tune's reported path is the fallback: on URI storage (s3://) Ray reports it without the scheme.
    found = registry.best_checkpoint(best.run_dir, result.metric, result.mode) if best.run_dir else None
    checkpoint = found[0] if found is not None else best.checkpoint
    if checkpoint is None:
        raise SweepError(f"sweep {result.name!r}: the best trial {best.trial_id} left no checkpoint; nothing to register")
    tags = {
        "vitpipe.trial_id": best.trial_id,
        "vitpipe.sweep": result.name,
        "vitpipe.sweep_run_id": result.parent_run_id,
        **{f"config.{k}": v for k, v in best.values.items()},
    }
    promotion = registry.promote_checkpoint(
        checkpoint, tracking_uri=config.mlflow.tracking_uri, name=model_name, run_id=best.run_id,
        metric=result.metric, tags=tags,
    )  # fmt: skip
    client.set_tag(result.parent_run_id, "vitpipe.registered", f"{promotion.name}/{promotion.version}")
    print(f"[vitpipe] registered {checkpoint} as {promotion.name} version {promotion.version} "
          f"(alias {promotion.alias!r}{'' if promotion.created else ', already registered'}): {promotion.uri}")  # fmt: skip
    return promotion
