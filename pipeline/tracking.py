"""The MLflow side of a training run: one MLflow run per training run, continued across restarts.

Two halves, so that exactly one process writes at a time:

- the driver, before Ray starts workers: :func:`open_run` creates the run (flattened config as params,
  model size, tags: git commit, versions) or reopens the one a checkpoint names; :func:`close_run`
  marks it when the whole run failed;
- rank 0 of the workers, while training: :class:`RunLogger` logs metrics, artifacts, figures and the
  final model into that run (each node's system metrics: :class:`pipeline.train.telemetry.NodeSystemMetrics`).

The tracking URI is always explicit (an absolute ``sqlite:///`` path or a server URL): Ray workers run in
another working directory, where MLflow's relative default would open a different store.

MLflow outages (a server restarting, a network blip): a call that fails with a connection error or a 5xx
is retried with backoff, for up to ``mlflow.outage_wait_s``, and never taken for "run not found" (so a
resumed run never forks its MLflow run). While training, rank 0 hands metrics and tags to a sender thread:
training goes on through an outage and the points, with their original timestamps, are logged when the
server is back. Where MLflow stays down past the wait (at the start, or when the run's end must be
recorded) the run fails with :class:`TrackingUnavailableError`, naming the server; checkpoints are safe.
"""

from __future__ import annotations

import math
import os
import platform
import queue
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

__all__ = ["RunLogger", "TrackingUnavailableError", "close_run", "experiment_id", "model_logging", "open_run",
           "retrying", "run_status", "run_tags", "short_http_retries"]

TAG_STATUS = "vitpipe.status"  # running | finished | non_finite_loss | failed
TAG_RUN_DIR = "vitpipe.run_dir"
TAG_FINAL_MODEL = "vitpipe.final_model"  # the serialization format, once the final model is logged
GIT_COMMIT_ENV = "VITPIPE_GIT_COMMIT"  # the commit tag when the code runs without .git
_BATCH = 100  # MLflow's limit of params or tags per log_batch
OUTAGE_WAIT_S = 600.0  # default of mlflow.outage_wait_s
T = TypeVar("T")


class TrackingUnavailableError(RuntimeError):
    """MLflow stayed unreachable (connection errors or 5xx) for longer than the run waits for it."""


def is_transient(err: BaseException) -> bool:
    """An error that may pass (server down, restarting, overloaded), not MLflow refusing the request."""
    import requests

    if isinstance(err, MlflowException):
        return err.get_http_status_code() >= 500  # MLflow reports a refused connection as INTERNAL_ERROR
    return isinstance(err, (ConnectionError, TimeoutError, requests.exceptions.RequestException))


def retrying(call: Callable[[], T], what: str, *, uri: str, wait_s: float = OUTAGE_WAIT_S) -> T:
    """``call()``, retried with backoff on transient errors for up to ``wait_s`` (``math.inf``: until MLflow is
    back); other errors raise at once. An outage is said once when it starts and once when it ends."""
    start = time.monotonic()
    delay, warned = 1.0, False
    while True:
        try:
            result = call()
        except Exception as err:
            if not is_transient(err):
                raise
            if time.monotonic() + delay > start + wait_s:
                raise TrackingUnavailableError(f"MLflow at {uri} was unreachable for {wait_s:g} s (mlflow.outage_wait_s) "
                                               f"while {what}: {_first_line(err)}") from err  # fmt: skip
            if not warned:
                until = "until it is back" if math.isinf(wait_s) else f"for up to {wait_s:g} s"
                print(f"[vitpipe] MLflow at {uri} is unreachable while {what} ({_first_line(err)}); retrying {until}",
                      flush=True)  # fmt: skip
                warned = True
            time.sleep(delay)
            delay = min(2 * delay, 10.0)
            continue
        if warned:
            print(f"[vitpipe] MLflow at {uri} is back after {time.monotonic() - start:.0f} s", flush=True)
        return result


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def short_http_retries() -> None:
    """MLflow's own HTTP retries (7, with backoff up to minutes) would hide an outage inside one call; ours
    (:func:`retrying`, the sender thread) wait it out instead. A user's own setting is kept."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")


class _PatientClient:
    """An ``MlflowClient`` whose every call waits out an outage (:func:`retrying`)."""

    def __init__(self, uri: str, wait_s: float):
        short_http_retries()
        self._client, self._uri, self._wait_s = MlflowClient(uri), uri, wait_s

    def __getattr__(self, name: str):
        method = getattr(self._client, name)
        return lambda *args, **kwargs: retrying(lambda: method(*args, **kwargs), f"calling {name}", uri=self._uri,
                                                wait_s=self._wait_s)  # fmt: skip


def _git(*args: str) -> str | None:
    repo = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def run_tags() -> dict[str, str]:
    """Code and environment of this process: git commit (and whether the tree was dirty), versions."""
    import ray
    import timm
    import torch

    import pipeline

    tags = {
        "vitpipe.version": pipeline.__version__,
        "versions.python": platform.python_version(),
        "versions.torch": torch.__version__,
        "versions.timm": timm.__version__,
        "versions.ray": ray.__version__,
        "versions.mlflow": mlflow.__version__,
    }
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["vitpipe.git_dirty"] = str(bool(_git("status", "--porcelain", "--untracked-files=no")))
    elif os.environ.get(GIT_COMMIT_ENV):  # code shipped without .git (`ray job submit --working-dir .`)
        tags["mlflow.source.git.commit"] = os.environ[GIT_COMMIT_ENV]
    return tags


def experiment_id(client: MlflowClient, tracking_uri: str, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):  # artifacts next to the database, not in a cwd-relative ./mlruns
        location = Path(tracking_uri.removeprefix("sqlite:///")).parent.joinpath("mlruns").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created meanwhile by another driver
        return client.get_experiment_by_name(name).experiment_id


def _chunks(items: list, size: int = _BATCH) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _param_value(value: Any) -> str:
    return ("null" if value is None else str(value))[:6000]


def open_run(
    tracking_uri: str,
    experiment: str,
    run_name: str,
    *,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
    artifacts: Mapping[str, str] | None = None,
    resume_run_id: str | None = None,
    outage_wait_s: float = OUTAGE_WAIT_S,
) -> tuple[str, bool]:
    """The MLflow run for a training run: ``(run_id, resumed)``.

    With ``resume_run_id`` (from the checkpoint being resumed) and that run in the store, the run is
    continued: nothing is re-logged, so params stay those of the first start. Otherwise a new run is
    created with ``params`` (values stringified), ``tags`` and text ``artifacts`` (file name -> text).
    Only MLflow's "does not exist" starts a new run in place of ``resume_run_id``: an unreachable server is
    waited for (``outage_wait_s``), then :class:`TrackingUnavailableError`.
    """
    client = _PatientClient(tracking_uri, outage_wait_s)
    if resume_run_id is not None:
        try:
            run = client.get_run(resume_run_id)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            print(f"[vitpipe] MLflow run {resume_run_id} of the checkpoint is not in {tracking_uri}: starting a new one")
        else:
            client.set_tag(run.info.run_id, TAG_STATUS, "running")
            return run.info.run_id, True
    run = client.create_run(experiment_id(client, tracking_uri, experiment), run_name=run_name,
                            tags={**tags, TAG_STATUS: "running"})  # fmt: skip
    run_id = run.info.run_id
    for chunk in _chunks([Param(k, _param_value(v)) for k, v in params.items()]):
        client.log_batch(run_id, params=chunk)
    for name, text in (artifacts or {}).items():
        client.log_text(run_id, text, name)
    return run_id, False


def run_status(tracking_uri: str, run_id: str, outage_wait_s: float = OUTAGE_WAIT_S) -> dict[str, str] | None:
    """``{"status": <MLflow status>, **vitpipe tags}`` of a run, or None if the store lacks it."""
    try:
        run = _PatientClient(tracking_uri, outage_wait_s).get_run(run_id)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return None
    return {"status": run.info.status, **{k: v for k, v in run.data.tags.items() if k.startswith("vitpipe.")}}


def close_run(tracking_uri: str, run_id: str, status: str, reason: str, outage_wait_s: float = OUTAGE_WAIT_S) -> None:
    """Mark a run that ended without rank 0 closing it (worker failures beyond max_failures, ...)."""
    client = _PatientClient(tracking_uri, outage_wait_s)
    client.log_batch(run_id, tags=[RunTag(TAG_STATUS, reason[:5000])])
    client.set_terminated(run_id, status)


def model_logging(model, example) -> tuple[tuple[str, ...], dict[str, Any]]:
    """For ``mlflow.pytorch.log_model``: the serialization formats to try, in order, and the keyword arguments
    (``pip_requirements`` and the input example or signature).

    ``example``: a float32 numpy batch. MLflow's pyfunc serves a model that returns one tensor; a model that
    returns several (a DVT cascade: one logits tensor per exit) gets an input-only signature and no example,
    since MLflow would fail to infer its output signature and to validate the example as a serving request.
    Without an example there is no ``pt2`` (torch.export traces the example): such a model is logged as
    ``pickle`` only, which also keeps its methods (a DVT's exits and costs) when it is loaded. Otherwise
    ``pt2`` (torch.export, safe to load), and ``pickle`` for a model that cannot be exported.
    """
    import timm
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"timm=={timm.__version__}"]
    kwargs: dict[str, Any] = {"pip_requirements": requirements}
    with torch.no_grad():
        output = model(torch.as_tensor(example))
    if isinstance(output, torch.Tensor):
        return ("pt2", "pickle"), {**kwargs, "input_example": example}
    signature = ModelSignature(inputs=Schema([TensorSpec(example.dtype, (-1, *example.shape[1:]))]))
    return ("pickle",), {**kwargs, "signature": signature}


class RunLogger:
    """Rank 0's handle on the run the driver opened. Use as a context manager around training.

    Metrics and tags go to a sender thread, so an MLflow outage does not stall training (module docstring);
    artifacts, figures and the model are logged at once, after everything queued before them. On an
    exception the run is marked FAILED; a restarted worker group reopens it (status RUNNING).
    """

    def __init__(self, tracking_uri: str, run_id: str, *, outage_wait_s: float = OUTAGE_WAIT_S):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.outage_wait_s = outage_wait_s
        self.client = _PatientClient(tracking_uri, outage_wait_s)  # (sets MLflow's own retries short)
        self._queue: queue.Queue = queue.Queue()  # (metrics, tags) batches; None stops the sender
        self._sender = threading.Thread(target=self._send_batches, name="vitpipe-mlflow-sender", daemon=True)

    def _call(self, call: Callable[[], T], what: str) -> T:
        return retrying(call, what, uri=self.tracking_uri, wait_s=self.outage_wait_s)

    def __enter__(self) -> RunLogger:
        mlflow.set_tracking_uri(self.tracking_uri)
        # RUNNING again on a restart; system metrics are each node's (pipeline.train.telemetry), not rank 0's
        self._call(lambda: mlflow.start_run(run_id=self.run_id, log_system_metrics=False), "reopening the run")
        self._sender.start()
        self.tags({TAG_STATUS: "running"})
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if mlflow.active_run() is not None:
                if exc_type is not None:
                    self.tags({TAG_STATUS: f"failed: {exc_type.__name__}: {exc}"[:5000]})
                self._end("FAILED" if exc_type is not None else "FINISHED")
        except TrackingUnavailableError as err:
            if exc_type is None:
                raise
            print(f"[vitpipe] {err}", flush=True)  # the run's own error is the one to raise
        finally:
            self._queue.put(None)

    def _end(self, status: str) -> None:
        self.flush()
        self._call(lambda: mlflow.end_run(status), "ending the run")

    def finish(self, status: str, reason: str) -> None:
        """End the run now: ``status`` is MLflow's (FINISHED, FAILED), ``reason`` goes to the status tag."""
        self.tags({TAG_STATUS: reason})
        self._end(status)

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        """Queued with the time of this call; sent by the sender thread."""
        timestamp = int(time.time() * 1000)
        self._queue.put(([Metric(k, float(v), timestamp, step) for k, v in values.items()], []))

    def tags(self, values: Mapping[str, str]) -> None:
        self._queue.put(([], [RunTag(k, str(v)) for k, v in values.items()]))

    def sent(self, within_s: float) -> bool:
        """Whether everything queued is logged, waiting up to ``within_s``: an epoch's metrics are in MLflow
        before the next epoch starts (a process killed later loses none), unless MLflow is down."""
        done = self._queue.all_tasks_done
        with done:
            return done.wait_for(lambda: self._queue.unfinished_tasks == 0, timeout=within_s)

    def flush(self) -> None:
        """Wait until every queued metric and tag is logged; TrackingUnavailableError after ``outage_wait_s``."""
        if not self.sent(self.outage_wait_s):
            raise TrackingUnavailableError(
                f"MLflow at {self.tracking_uri} was unreachable for {self.outage_wait_s:g} s (mlflow.outage_wait_s);"
                f" {self._queue.unfinished_tasks} batch(es) of metrics and tags of run {self.run_id} are not logged"
            )  # fmt: skip

    def _send_batches(self) -> None:
        client = MlflowClient(self.tracking_uri)
        while (batch := self._queue.get()) is not None:
            metrics, tags = batch
            try:  # through an outage for as long as it lasts: training goes on meanwhile
                retrying(lambda: client.log_batch(self.run_id, metrics=metrics, tags=tags),
                         "logging metrics (training goes on; they are kept)", uri=self.tracking_uri, wait_s=math.inf)
            except Exception as err:  # noqa: BLE001 - the sender must outlive any error
                print(f"[vitpipe] MLflow refused {len(metrics)} metric(s) and {len(tags)} tag(s): {_first_line(err)}",
                      flush=True)  # fmt: skip
            self._queue.task_done()
        self._queue.task_done()

    def artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.flush()
        self._call(lambda: mlflow.log_artifact(os.fspath(local_path), artifact_path), f"logging {local_path}")

    def text(self, text: str, artifact_file: str) -> None:
        self.flush()
        self._call(lambda: mlflow.log_text(text, artifact_file), f"logging {artifact_file}")

    def figure(self, figure, artifact_file: str) -> None:
        import matplotlib.pyplot as plt

        self.flush()
        self._call(lambda: mlflow.log_figure(figure, artifact_file), f"logging {artifact_file}")
        plt.close(figure)

    def history(self, key: str) -> list[tuple[int, float]]:
        """``(step, value)`` of a metric, one per step (the last value logged at a step wins)."""
        self.flush()
        by_step = {}
        for m in sorted(self.client.get_metric_history(self.run_id, key), key=lambda m: m.timestamp):
            by_step[m.step] = m.value
        return sorted(by_step.items())

    def curves(self, panels: Mapping[str, list[str]], artifact_file: str) -> bool:
        """One subplot per panel title, one line per metric key, x = step; False if nothing to plot."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        series = {title: {k: self.history(k) for k in keys} for title, keys in panels.items()}
        series = {t: {k: h for k, h in s.items() if h} for t, s in series.items()}
        series = {t: s for t, s in series.items() if s}
        if not series:
            return False
        figure, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.5), squeeze=False)
        for ax, (title, lines) in zip(axes[0], series.items()):
            epochs = sorted({step for points in lines.values() for step, _ in points})
            for key, points in lines.items():
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, label=key)
            ax.set_title(title)
            ax.set_xlabel("epoch")
            if len(epochs) <= 12:
                ax.set_xticks(epochs)
            else:
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        figure.tight_layout()
        self.figure(figure, artifact_file)
        return True

    def model(self, model, input_example, *, name: str = "model", serialization: str = "auto") -> str:
        """``mlflow.pytorch.log_model`` with an input example; returns the serialization format used.

        ``auto`` tries ``pt2`` (torch.export, safe to load) and falls back to ``pickle`` for a model
        that cannot be exported; a model with several outputs goes to ``pickle`` at once (see
        :func:`model_logging`). The format is recorded in the run's tags either way.
        """
        import mlflow.pytorch

        formats, logging_kwargs = model_logging(model, input_example)
        if serialization != "auto":
            formats = (serialization,)
        self.flush()
        for index, fmt in enumerate(formats):
            try:
                self._call(lambda: mlflow.pytorch.log_model(model, name=name, serialization_format=fmt, **logging_kwargs),
                           f"logging the model as {fmt}")  # fmt: skip
            except TrackingUnavailableError:
                raise
            except Exception as err:  # noqa: BLE001 - torch.export rejects some models; try the next format
                if index == len(formats) - 1:
                    raise
                print(f"[vitpipe] log_model as {fmt} failed ({type(err).__name__}: {str(err)[:300]}); trying {formats[index + 1]}")
                continue
            self.tags({TAG_FINAL_MODEL: fmt})
            return fmt
        raise AssertionError("unreachable")
