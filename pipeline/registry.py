"""The MLflow Model Registry: promote a checkpoint to a registered model version, load one back without Ray.

A registered version is a regular MLflow PyTorch model (``mlflow.pytorch.load_model`` works on it; pt2,
or pickle for models ``torch.export`` rejects) built from the checkpoint in inference form, that also
carries the checkpoint itself, slimmed to weights, config and metrics (``extra_files/state.pt`` and
``meta.json``): :func:`load` rebuilds the exact model class from it, which DVT's budget curve needs.

Promotion is idempotent: a version is identified by the SHA-256 of the checkpoint's weights (tag
``vitpipe.weights_sha256``); promoting the same checkpoint again only moves the alias to it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "CHAMPION",
    "LoadedModel",
    "Promotion",
    "RegistryError",
    "best_checkpoint",
    "default_tracking_uri",
    "load",
    "promote_checkpoint",
    "promote_run",
]

CHAMPION = "champion"
TAG_DIGEST = "vitpipe.weights_sha256"
_CHECKPOINT_FILES = ("state.pt", "meta.json")
_TAG_LIMIT = 5000  # MLflow's limit on a tag value


class RegistryError(RuntimeError):
    """Nothing to promote or load where the caller pointed (the message says what is missing)."""


@dataclass
class Promotion:
    name: str
    version: str
    alias: str
    created: bool  # False: the checkpoint was registered before; only the alias moved
    checkpoint: str
    run_id: str | None
    metric: str
    value: float | None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{self.alias}"


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the training default: ``sqlite:///<cwd>/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


# --------------------------------------------------------------------------------------------------
# Finding checkpoints.


def _metric_value(meta: dict, metric: str) -> float | None:
    value = (meta.get("metrics") or {}).get(metric)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _filesystem(location: str):
    """``(pyarrow filesystem, path)`` of a local path or a URI (``s3://``, ``gs://``, ``file://``)."""
    import pyarrow.fs

    if "://" in location:
        return pyarrow.fs.FileSystem.from_uri(location)
    return pyarrow.fs.LocalFileSystem(), str(Path(location).resolve())


def best_checkpoint(run_dir: str | os.PathLike, metric: str, mode: str) -> tuple[str, dict] | None:
    """The checkpoint of a run directory (local or a URI such as ``s3://...``, as Ray's ``storage_path``)
    that is best by ``metric``, and its ``meta.json``; ties go to the later epoch. None when the directory
    holds no complete checkpoint that reported the metric."""
    import pyarrow.fs

    run_dir = os.fspath(run_dir)
    fs, root = _filesystem(run_dir)
    try:
        entries = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    except (FileNotFoundError, NotADirectoryError):
        return None
    candidates = []
    for entry in entries:
        if entry.type != pyarrow.fs.FileType.Directory or not entry.base_name.startswith("checkpoint_epoch"):
            continue
        try:
            with fs.open_input_stream(f"{entry.path}/meta.json") as stream:
                meta = json.loads(stream.read().decode())
        except (OSError, ValueError):
            continue  # an interrupted write
        value = _metric_value(meta, metric)
        if value is not None and fs.get_file_info(f"{entry.path}/state.pt").type == pyarrow.fs.FileType.File:
            score = value if mode == "max" else -value
            candidates.append((score, meta.get("epochs_done", 0), f"{run_dir.rstrip('/')}/{entry.base_name}", meta))
    if not candidates:
        return None
    _, _, path, meta = max(candidates, key=lambda c: (c[0], c[1]))
    return path, meta


def _fetch_checkpoint(location: str, scratch: Path) -> Path:
    """A local checkpoint directory for ``location`` (a directory or its state.pt; local or a URI, which is
    copied into ``scratch``)."""
    import pyarrow.fs

    if "://" not in location:
        path = Path(location)
        return path.parent if path.name == "state.pt" else path
    fs, root = pyarrow.fs.FileSystem.from_uri(location)
    root = root[: -len("/state.pt")] if root.endswith("/state.pt") else root.rstrip("/")
    for name in _CHECKPOINT_FILES:
        try:
            with fs.open_input_stream(f"{root}/{name}") as source, open(scratch / name, "wb") as target:
                target.write(source.read())
        except FileNotFoundError:
            raise RegistryError(f"no checkpoint at {location} ({name} is missing)") from None
    return scratch


def _digest(state_file: Path) -> str:
    sha = hashlib.sha256()
    with open(state_file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


# --------------------------------------------------------------------------------------------------
# Promotion.


def _slim_checkpoint(state: dict, directory: Path) -> None:
    """The checkpoint without optimiser, scheduler and scaler state: what inference and evaluation need."""
    from pipeline.train.checkpoint import save_checkpoint

    keep = ("epochs_done", "global_step", "model", "ema", "config", "metrics", "mlflow_run_id", "run_name")
    save_checkpoint(directory, {k: state.get(k) for k in keep})


def _log_model(model, example, *, experiment_id: str, run_id: str | None, extra_files: list[str],
               tags: dict) -> tuple[Any, str]:  # fmt: skip
    """``mlflow.pytorch.log_model`` as a LoggedModel of ``experiment_id`` linked to ``run_id`` (MLflow would
    otherwise file it under the default experiment), in the formats ``tracking.model_logging`` gives."""
    import mlflow
    import mlflow.pytorch

    from pipeline import tracking

    formats, logging_kwargs = tracking.model_logging(model, example)
    for fmt in formats:
        logged = mlflow.initialize_logged_model(name="registered_model", source_run_id=run_id, tags=tags,
                                                experiment_id=experiment_id)  # fmt: skip
        try:
            info = mlflow.pytorch.log_model(
                model, model_id=logged.model_id, serialization_format=fmt, extra_files=extra_files, **logging_kwargs
            )
        except Exception as err:  # noqa: BLE001 - torch.export rejects some models (e.g. data-dependent exits)
            if fmt == "pickle":
                raise
            print(f"[vitpipe] registry: pt2 export failed ({type(err).__name__}: {str(err)[:300]}); using pickle")
            continue
        return info, fmt
    raise AssertionError("unreachable")


class _TrackingUri:
    """Point MLflow's fluent API (``log_model`` uses it) at ``uri`` for a block, then back."""

    def __init__(self, uri: str):
        self.uri = uri

    def __enter__(self):
        import mlflow

        self.previous = mlflow.get_tracking_uri()
        self.previous_registry = mlflow.get_registry_uri()
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)

    def __exit__(self, *exc):
        import mlflow

        mlflow.set_tracking_uri(self.previous)
        mlflow.set_registry_uri(self.previous_registry)


def promote_checkpoint(
    checkpoint: str | os.PathLike,
    *,
    tracking_uri: str,
    name: str | None = None,
    run_id: str | None = None,
    metric: str | None = None,
    tags: dict[str, Any] | None = None,
    alias: str = CHAMPION,
) -> Promotion:
    """Register a checkpoint directory as a version of ``name`` (default: the config's ``model.name``) and
    point ``alias`` at it; tagged with the metric, its value, the epoch, the source run and ``tags``.

    ``run_id``: the MLflow run that trained it (the version links to it; default: the one the checkpoint
    names). Promoting a checkpoint whose weights are already a version of ``name`` creates nothing.
    ``checkpoint`` may be a URI (``s3://...``, as Ray's ``storage_path``): it is copied locally first.
    """
    location = os.fspath(checkpoint)
    with tempfile.TemporaryDirectory() as fetched:
        checkpoint = _fetch_checkpoint(location, Path(fetched))
        state_file = checkpoint / "state.pt"
        if not state_file.is_file():
            raise RegistryError(f"no checkpoint at {location} (expected a checkpoint directory holding state.pt)")
        return _promote(checkpoint, location, tracking_uri=tracking_uri, name=name, run_id=run_id, metric=metric,
                        tags=tags, alias=alias)  # fmt: skip


def _promote(checkpoint: Path, location: str, *, tracking_uri: str, name: str | None, run_id: str | None,
             metric: str | None, tags: dict[str, Any] | None, alias: str) -> Promotion:  # fmt: skip
    import torch
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline import tracking
    from pipeline.train.checkpoint import load_checkpoint
    from pipeline.train.config import TrainConfig

    state_file = checkpoint / "state.pt"
    state = load_checkpoint(checkpoint)
    config = TrainConfig.from_dict(state["config"])
    name = name or config.model.name
    metric = metric or config.checkpoint.metric
    value = _metric_value(state, metric)
    run_id = run_id or state.get("mlflow_run_id")
    digest = _digest(state_file)
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)  # the registry lives in the same store

    existing = [v for v in client.search_model_versions(f"name = '{name}'") if v.tags.get(TAG_DIGEST) == digest]
    if existing:
        version, created = existing[0].version, False
    else:
        all_tags = {
            TAG_DIGEST: digest,
            "vitpipe.metric": metric,
            "vitpipe.metric_value": "" if value is None else repr(value),
            "vitpipe.epoch": str(state.get("epochs_done")),
            "vitpipe.checkpoint": location,
            "vitpipe.source_run_id": run_id or "",
            "vitpipe.model": config.model.name,
            "vitpipe.config": json.dumps(config.to_dict(), sort_keys=True),
            **{k: str(v) for k, v in (tags or {}).items()},
        }
        all_tags = {k: v[:_TAG_LIMIT] for k, v in all_tags.items()}
        model, _ = _model_from_state(state, inference=True)
        # Two images: torch.export specialises a batch dimension of size 1 (hint 1), the model would then take
        # nothing but single images; with 2 it stays dynamic.
        example = torch.zeros(2, config.data.in_chans, config.data.img_size, config.data.img_size).numpy()
        experiment_id = (client.get_run(run_id).info.experiment_id if run_id
                         else tracking.experiment_id(client, tracking_uri, config.mlflow.experiment))  # fmt: skip
        # The registry's store resolves the version's source through MLflow's global URI: set it throughout.
        with tempfile.TemporaryDirectory() as scratch, _TrackingUri(tracking_uri):
            _slim_checkpoint(state, Path(scratch))
            Path(scratch, "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
            extra = [str(Path(scratch, f)) for f in (*_CHECKPOINT_FILES, "config.yaml")]
            info, fmt = _log_model(model, example, experiment_id=experiment_id, run_id=run_id, extra_files=extra,
                                   tags={TAG_DIGEST: digest})  # fmt: skip
            all_tags["vitpipe.format"] = fmt
            try:
                client.create_registered_model(name)
            except MlflowException as err:
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            created_version = client.create_model_version(name, source=info.model_uri, run_id=run_id, tags=all_tags,
                                                           model_id=info.model_id)  # fmt: skip
        version, created = created_version.version, True
    client.set_registered_model_alias(name, alias, version)
    return Promotion(name=name, version=str(version), alias=alias, created=created, checkpoint=location,
                     run_id=run_id, metric=metric, value=value)  # fmt: skip


def _newest_run_named(client, name: str):
    """The newest MLflow run whose name is ``name`` (a training run's is its ``run_name``), in any experiment."""
    if "'" in name:
        return None
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"attributes.run_name = '{name}'",
                              order_by=["attributes.start_time DESC"], max_results=1) if experiments else []  # fmt: skip
    return runs[0] if runs else None


def promote_run(run_id: str, *, tracking_uri: str, name: str | None = None, alias: str = CHAMPION) -> Promotion:
    """``vitpipe registry promote RUN``: register the best checkpoint of an MLflow run (``run_id``: its ID, or
    its name, which picks the newest run of that name).

    A sweep's parent run: its best trial (by the sweep's metric, over each child's logged history).
    A training or trial run: the best checkpoint in its run directory (tag ``vitpipe.run_dir``) by its
    ``checkpoint.metric``, else the ``checkpoints/best`` artifacts the run logged when it finished.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)  # the registry lives in the same store
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        run = _newest_run_named(client, run_id)
        if run is None:
            raise RegistryError(f"run {run_id} is not in {tracking_uri}, as a run ID or a run name "
                                f"({err.message})") from None  # fmt: skip
    tags: dict[str, str] = {}
    if run.data.tags.get("vitpipe.role") == "sweep":
        metric, mode = run.data.tags["vitpipe.metric"], run.data.tags["vitpipe.mode"]
        child = _best_child(client, run, metric, mode)
        tags = {"vitpipe.sweep_run_id": run.info.run_id, "vitpipe.trial_id": child.data.tags.get("vitpipe.trial_id", "")}
        run = child
    params = run.data.params
    metric = params.get("checkpoint.metric", "val/top1")
    mode = params.get("checkpoint.mode", "max")
    run_dir = run.data.tags.get("vitpipe.run_dir")
    found = best_checkpoint(run_dir, metric, mode) if run_dir else None
    if found is not None:
        return promote_checkpoint(found[0], tracking_uri=tracking_uri, name=name, run_id=run.info.run_id,
                                  metric=metric, tags=tags, alias=alias)  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        try:
            local = client.download_artifacts(run.info.run_id, "checkpoints/best", scratch)
        except (MlflowException, OSError):
            local = None
        if local is None or not Path(local, "state.pt").is_file():
            raise RegistryError(f"run {run.info.run_id} has no checkpoint: none in its run directory ({run_dir}) "
                                "and no checkpoints/best artifacts")  # fmt: skip
        return promote_checkpoint(local, tracking_uri=tracking_uri, name=name, run_id=run.info.run_id,
                                  metric=metric, tags={**tags, "vitpipe.checkpoint_source": "artifacts"}, alias=alias)  # fmt: skip


def _best_child(client, parent, metric: str, mode: str):
    children = client.search_runs([parent.info.experiment_id], max_results=10_000,
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")  # fmt: skip
    scored = []
    for child in children:
        values = [m.value for m in client.get_metric_history(child.info.run_id, metric) if math.isfinite(m.value)]
        if values:
            scored.append(((max(values) if mode == "max" else -min(values)), child))
    if not scored:
        raise RegistryError(f"sweep run {parent.info.run_id}: no trial logged {metric}")
    return max(scored, key=lambda s: s[0])[1]


# --------------------------------------------------------------------------------------------------
# Loading, without Ray.


@dataclass
class LoadedModel:
    model: Any  # torch.nn.Module in eval mode (and inference form)
    config: Any  # the TrainConfig it was trained with
    meta: dict  # epochs_done, metrics, mlflow_run_id, run_name of the checkpoint
    source: str  # the checkpoint path it was read from


def load(model_uri: str | os.PathLike, *, tracking_uri: str | None = None, inference: bool = True,
         map_location: str = "cpu") -> LoadedModel:  # fmt: skip
    """A model from a checkpoint path (directory or state.pt) or an MLflow URI of a version this module
    registered (``models:/name@champion``, ``models:/name/3``, ``runs:/...``). No Ray involved."""
    text = os.fspath(model_uri)
    if Path(text).exists():
        return _load_checkpoint(Path(text), text, inference, map_location)
    if ":" not in text:
        raise RegistryError(f"{text}: neither a checkpoint path nor a model URI (models:/name@champion)")
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    uri = tracking_uri or default_tracking_uri()
    # models:/ URIs are resolved through MLflow's global registry URI whatever is passed: set it for the call.
    with tempfile.TemporaryDirectory() as scratch, _TrackingUri(uri):
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=text, dst_path=scratch, tracking_uri=uri,
                                                             registry_uri=uri))  # fmt: skip
        except MlflowException as err:
            raise RegistryError(f"{text}: cannot be fetched from {uri} ({err.message})") from None
        state_file = local / "extra_files" / "state.pt"
        if not state_file.is_file():
            raise RegistryError(f"{text}: holds no vitpipe checkpoint (extra_files/state.pt); evaluate needs it to "
                                "rebuild the model and its input size")  # fmt: skip
        return _load_checkpoint(state_file, text, inference, map_location)


def _model_from_state(state: dict, inference: bool):
    """The model of a checkpoint's state (the weights its metric was measured on, as the training loop's
    final model), and its config."""
    from pipeline.train.build import build_model, to_inference_form
    from pipeline.train.checkpoint import load_weights
    from pipeline.train.config import TrainConfig

    config = TrainConfig.from_dict(state["config"])
    model = build_model(config)
    use_ema = config.checkpoint.metric.startswith("val_ema/")
    load_weights(model, state["ema"] if use_ema else state["model"], source=f"the checkpoint of run "
                 f"{state.get('run_name')!r}", model_name=config.model.name)  # fmt: skip
    if inference:
        to_inference_form(model)
    return model.eval(), config


def _load_checkpoint(path: Path, source: str, inference: bool, map_location: str) -> LoadedModel:
    from pipeline.train.checkpoint import load_checkpoint

    state = load_checkpoint(path, map_location=map_location)
    model, config = _model_from_state(state, inference)
    meta = {k: state.get(k) for k in ("epochs_done", "metrics", "mlflow_run_id", "run_name")}
    return LoadedModel(model=model, config=config, meta=meta, source=source)
