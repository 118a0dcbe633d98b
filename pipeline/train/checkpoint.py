"""Training checkpoints that load without Ray.

A checkpoint is a directory ``checkpoint_epochNNNN`` under the run directory
(``<storage_path>/<run_name>``, kept by Ray Train) holding:

- ``state.pt``: model, optimiser, scheduler, grad scaler and EMA state, epoch, step, config and
  metrics; tensors and plain Python types only, so ``torch.load(..., weights_only=True)`` reads it;
- ``meta.json``: the small plain part (epoch, metrics, MLflow run id), readable without torch.

With ``checkpoint.every_steps`` the loop also writes mid-epoch checkpoints ``step_checkpointNNNNNNNN``
(by global step; only the newest is kept) holding the same plus the position in the epoch in progress
(``batches_done``), every rank's RNG states and the epoch's running loss, so a resumed run continues that
epoch's plan at the next batch.

Paths may be local or any URI pyarrow understands (``s3://...``), as for Ray's ``storage_path``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CheckpointError",
    "STATE_FILE",
    "META_FILE",
    "check_writable",
    "checkpoint_dir_name",
    "delete_run_dir",
    "StepCheckpointer",
    "latest_checkpoint",
    "latest_step_checkpoint",
    "local_copy",
    "load_checkpoint",
    "load_model",
    "load_weights",
    "save_checkpoint",
    "step_checkpoint_dir_name",
    "strip_wrapper_prefixes",
]

STATE_FILE = "state.pt"
META_FILE = "meta.json"
FORMAT_VERSION = 1
_DIR_PATTERN = re.compile(r"^checkpoint_epoch(\d{4,})$")
_STEP_PATTERN = re.compile(r"^step_checkpoint(\d{8,})$")
_META_KEYS = ("format_version", "epochs_done", "batches_done", "global_step", "updates_per_epoch", "metrics",
              "mlflow_run_id", "run_name", "config")
_COMPILED = re.compile(r"(^|\.)_orig_mod\.")  # torch.compile's wrapper, at the top or around a submodule


def checkpoint_dir_name(epochs_done: int) -> str:
    return f"checkpoint_epoch{epochs_done:04d}"


def step_checkpoint_dir_name(global_step: int) -> str:
    """A mid-epoch checkpoint (``checkpoint.every_steps``): the loop's own, beside Ray's epoch checkpoints."""
    return f"step_checkpoint{global_step:08d}"


def save_checkpoint(directory: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` (see the module docstring) into ``directory``; returns the state file's path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {"format_version": FORMAT_VERSION, **state}
    path = directory / STATE_FILE
    torch.save(state, path)
    meta = {key: state.get(key) for key in _META_KEYS}
    (directory / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return path


def strip_wrapper_prefixes(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` under the plain model's names: without torch.compile's ``_orig_mod.`` and DDP's ``module.``.

    The loop saves the plain model, so its checkpoints have neither; a state dict taken from a compiled or
    DDP-wrapped model still loads. ``_orig_mod`` is torch.compile's own attribute and goes wherever it
    is; ``module.`` only when every key starts with it (a model may have a submodule of that name).
    """
    ddp = bool(state_dict) and all(_COMPILED.sub(r"\1", key).startswith("module.") for key in state_dict)

    def plain(name: str) -> str:
        name = _COMPILED.sub(r"\1", name)
        return name[len("module.") :] if ddp and name.startswith("module.") else name

    names = {key: plain(key) for key in state_dict}
    if all(key == name for key, name in names.items()):
        return state_dict
    if len(set(names.values())) != len(names):
        raise ValueError("state dict keys collide once the torch.compile / DDP prefixes are removed")
    cleaned = OrderedDict((names[key], value) for key, value in state_dict.items())
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:  # per-module format versions, keyed by module path ("" for the root)
        cleaned._metadata = OrderedDict((plain(f"{path}.")[:-1], v) for path, v in metadata.items())
    return cleaned


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint directory (or its ``state.pt``) with ``weights_only=True``.

    The model and EMA weights come back under the plain model's names (see :func:`strip_wrapper_prefixes`).
    """
    path = Path(path)
    if path.is_dir():
        path = path / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - a foreign file fails in many ways (UnpicklingError, EOFError, KeyError...)
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        first = f"{type(err).__name__}: {first}" if isinstance(err, (KeyError, IndexError)) else first
        raise CheckpointError(f"{path} is not a vitpipe checkpoint (torch.load with weights_only: {first}); a "
                              f"checkpoint is a {_DIR_PATTERN.pattern[1:-1]} directory holding {STATE_FILE}") from None
    if not isinstance(state, dict) or not {"model", "config"} <= set(state):
        raise CheckpointError(f"{path} is a torch file but not a vitpipe checkpoint (no model and config entries)")
    version = state.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {version}, this code reads {FORMAT_VERSION}")
    for key in ("model", "ema"):
        if state.get(key) is not None:
            state[key] = strip_wrapper_prefixes(state[key])
    return state


class CheckpointError(ValueError):
    """A file that is not a checkpoint, or one whose weights do not fit the model they are loaded into."""


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], *, source: Any, model_name: str) -> None:
    """``model.load_state_dict(weights)``, failing with a :class:`CheckpointError` that says which checkpoint
    does not fit which model, and how (missing, unexpected and mis-shaped entries, a few of each)."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = [f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in weights and tuple(weights[k].shape) != tuple(v.shape)]  # fmt: skip
    if missing or unexpected or shapes:
        problems = [f"{len(items)} {what} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})"
                    for what, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes))
                    if items]  # fmt: skip
        raise CheckpointError(f"{source}: its weights are not those of {model_name} as configured here: "
                              f"{'; '.join(problems)}. Was it saved by another model or model.kwargs?")  # fmt: skip
    model.load_state_dict(weights)


def load_model(
    path: str | os.PathLike, *, ema: bool = False, inference: bool = True, map_location: str = "cpu"
) -> torch.nn.Module:
    """The model of a checkpoint, rebuilt from the config stored in it, in eval mode.

    ``ema``: load the EMA weights (the run must have trained with ``optim.ema``). ``inference``: switch
    models that have a separate inference form (Castling-ViT) to it.
    """
    from pipeline.train.build import build_model, to_inference_form
    from pipeline.train.config import TrainConfig

    state = load_checkpoint(path, map_location=map_location)
    config = TrainConfig.from_dict(state["config"])
    model = build_model(config)
    weights = state["ema"] if ema else state["model"]
    if weights is None:
        raise CheckpointError(f"{path}: holds no EMA weights (the run trained without optim.ema)")
    load_weights(model, weights, source=path, model_name=config.model.name)
    if inference:
        to_inference_form(model)
    return model.eval()


def _filesystem(uri: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(uri)


def _numbered_dirs(run_dir: str, pattern: re.Pattern) -> list[tuple[int, str]]:
    """``(number, path)`` of the run directory's folders whose names match ``pattern``, highest number first."""
    import pyarrow.fs

    fs, root = _filesystem(run_dir)
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = [(int(match.group(1)), info.path) for info in infos
             if info.type == pyarrow.fs.FileType.Directory and (match := pattern.match(info.base_name))]  # fmt: skip
    return sorted(found, reverse=True)


def _newest_complete(run_dir: str, pattern: re.Pattern) -> tuple[str, dict[str, Any]] | None:
    """``(uri, meta)`` of the highest-numbered matching checkpoint with a readable ``meta.json``, or None.

    A directory without one (an upload cut short: meta.json is written last) is skipped.
    """
    fs, _ = _filesystem(run_dir)
    for _, path in _numbered_dirs(run_dir, pattern):
        try:
            with fs.open_input_stream(f"{path}/{META_FILE}") as stream:
                meta = json.loads(stream.read().decode("utf-8"))
        except (FileNotFoundError, OSError, ValueError):
            continue
        return (path if "://" not in run_dir else f"{run_dir.split('://', 1)[0]}://{path}"), meta
    return None


def latest_checkpoint(run_dir: str) -> tuple[str, dict[str, Any]] | None:
    """The newest complete checkpoint of a run directory, epoch-end or mid-epoch, and its ``meta.json``; or None.

    Used by the driver to decide between resuming and starting, and to find the MLflow run to continue.
    Newest means furthest in training (global step); at a tie the epoch-end checkpoint wins.
    """
    epoch, step = _newest_complete(run_dir, _DIR_PATTERN), latest_step_checkpoint(run_dir)
    if epoch is None or step is None:
        return epoch or step
    return step if step[1].get("global_step", 0) > epoch[1].get("global_step", 0) else epoch


def latest_step_checkpoint(run_dir: str) -> tuple[str, dict[str, Any]] | None:
    """The newest complete mid-epoch checkpoint of a run directory and its ``meta.json``, or None."""
    return _newest_complete(run_dir, _STEP_PATTERN)


@contextlib.contextmanager
def local_copy(uri: str) -> Iterator[str]:
    """A checkpoint directory on this machine: ``uri`` itself when local, else a temporary download."""
    import pyarrow.fs

    if "://" not in uri or uri.startswith("file://"):
        yield uri.removeprefix("file://")
        return
    with tempfile.TemporaryDirectory(prefix="vitpipe-ckpt-") as scratch:
        fs, path = _filesystem(uri)
        pyarrow.fs.copy_files(path, scratch, source_filesystem=fs, destination_filesystem=pyarrow.fs.LocalFileSystem())
        yield scratch


class StepCheckpointer:
    """Rank 0's mid-epoch checkpoints: saved locally at once, uploaded to the run directory in a thread.

    Training goes on while a checkpoint uploads; the next save waits for the previous upload (one in flight).
    ``meta.json`` is uploaded last, so a cut-short upload is never taken for a checkpoint. Only the newest
    step checkpoint is kept: older ones are deleted once a newer one (or an epoch-end one) is complete.
    """

    def __init__(self, run_dir: str):
        self.run_dir = run_dir.rstrip("/")
        self._upload: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, state: dict[str, Any]) -> None:
        self.wait()
        scratch = tempfile.mkdtemp(prefix="vitpipe-step-")
        save_checkpoint(scratch, state)
        target = f"{self.run_dir}/{step_checkpoint_dir_name(state['global_step'])}"
        self._upload = threading.Thread(target=self._upload_then_prune, args=(scratch, target, state["global_step"]),
                                        name="vitpipe-step-checkpoint", daemon=True)  # fmt: skip
        self._upload.start()

    def wait(self) -> None:
        """Block until the upload in flight (if any) is done; raise its error."""
        if self._upload is not None:
            self._upload.join()
            self._upload = None
        if self._error is not None:
            error, self._error = self._error, None
            raise OSError(f"uploading a step checkpoint to {self.run_dir} failed: {error}") from error

    def prune(self, before_step: int) -> None:
        """Delete the step checkpoints older than ``before_step`` (an epoch-end checkpoint there supersedes them)."""
        self.wait()
        self._delete_older(before_step)

    def _delete_older(self, step: int) -> None:
        """Step checkpoints before ``step``, complete or cut short (the global step is in their name)."""
        fs, _ = _filesystem(self.run_dir)
        for number, path in _numbered_dirs(self.run_dir, _STEP_PATTERN):
            if number < step:
                fs.delete_dir(path)

    def _upload_then_prune(self, scratch: str, target: str, global_step: int) -> None:
        import pyarrow.fs

        try:
            fs, path = _filesystem(target)
            fs.create_dir(path, recursive=True)
            local = pyarrow.fs.LocalFileSystem()
            for name in (STATE_FILE, META_FILE):  # meta.json last: it marks the checkpoint complete
                pyarrow.fs.copy_files(f"{scratch}/{name}", f"{path}/{name}", source_filesystem=local,
                                      destination_filesystem=fs)  # fmt: skip
            self._delete_older(global_step)
        except BaseException as err:  # noqa: BLE001 - handed to the training thread by wait()
            self._error = err
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def delete_run_dir(run_dir: str) -> bool:
    """Remove a run directory and everything in it (``--new``); True if there was one."""
    import pyarrow.fs

    fs, root = _filesystem(run_dir)
    if fs.get_file_info(root).type == pyarrow.fs.FileType.NotFound:
        return False
    fs.delete_dir(root)
    return True


def check_writable(storage_path: str) -> None:
    """Write and delete a probe file under ``storage_path`` (local or a pyarrow URI such as ``s3://``), so an
    unwritable or unreachable location fails before Ray starts; raises ConfigError naming the path."""
    import uuid

    from pipeline.train.config import ConfigError

    probe = f"{storage_path.rstrip('/')}/.vitpipe-write-probe-{uuid.uuid4().hex[:8]}"
    try:
        fs, path = _filesystem(probe)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as stream:
            stream.write(b"probe")
        fs.delete_file(path)
    except (OSError, ValueError) as err:  # pyarrow: PermissionError, FileNotFoundError, ArrowIOError (an OSError)
        raise ConfigError(f"storage_path {storage_path}: cannot write there ({type(err).__name__}: {err})") from None

