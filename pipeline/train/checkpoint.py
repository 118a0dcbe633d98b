"""Training checkpoints that load without Ray.

A checkpoint is a directory ``checkpoint_epochNNNN`` under the run directory
(``<storage_path>/<run_name>``, kept by Ray Train) holding:

- ``state.pt``: model, optimiser, scheduler, grad scaler and EMA state, epoch, step, config and
  metrics; tensors and plain Python types only, so ``torch.load(..., weights_only=True)`` reads it;
- ``meta.json``: the small plain part (epoch, metrics, MLflow run id), readable without torch.

Paths may be local or any URI pyarrow understands (``s3://...``), as for Ray's ``storage_path``.
"""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "STATE_FILE",
    "META_FILE",
    "checkpoint_dir_name",
    "delete_run_dir",
    "latest_checkpoint",
    "load_checkpoint",
    "load_model",
    "save_checkpoint",
    "strip_wrapper_prefixes",
]

STATE_FILE = "state.pt"
META_FILE = "meta.json"
FORMAT_VERSION = 1
_DIR_PATTERN = re.compile(r"^checkpoint_epoch(\d{4,})$")
_META_KEYS = ("format_version", "epochs_done", "global_step", "metrics", "mlflow_run_id", "run_name", "config")
_COMPILED = re.compile(r"(^|\.)_orig_mod\.")  # torch.compile's wrapper, at the top or around a submodule


def checkpoint_dir_name(epochs_done: int) -> str:
    return f"checkpoint_epoch{epochs_done:04d}"


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
    state = torch.load(path, map_location=map_location, weights_only=True)
    version = state.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {version}, this code reads {FORMAT_VERSION}")
    for key in ("model", "ema"):
        if state.get(key) is not None:
            state[key] = strip_wrapper_prefixes(state[key])
    return state


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
        raise ValueError(f"{path}: holds no EMA weights (the run trained without optim.ema)")
    model.load_state_dict(weights)
    if inference:
        to_inference_form(model)
    return model.eval()


def _filesystem(uri: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(uri)


def latest_checkpoint(run_dir: str) -> tuple[str, dict[str, Any]] | None:
    """The newest complete checkpoint of a run directory and its ``meta.json``, or None.

    Used by the driver to decide between resuming and starting, and to find the MLflow run to continue.
    A directory without a readable ``meta.json`` (an interrupted upload) is skipped.
    """
    import pyarrow.fs

    fs, root = _filesystem(run_dir)
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    except (FileNotFoundError, NotADirectoryError):
        return None
    candidates = []
    for info in infos:
        match = _DIR_PATTERN.match(info.base_name)
        if info.type == pyarrow.fs.FileType.Directory and match:
            candidates.append((int(match.group(1)), info.path))
    for _, path in sorted(candidates, reverse=True):
        try:
            with fs.open_input_stream(f"{path}/{META_FILE}") as stream:
                meta = json.loads(stream.read().decode("utf-8"))
        except (FileNotFoundError, OSError, ValueError):
            continue
        uri = path if "://" not in run_dir else f"{run_dir.split('://', 1)[0]}://{path}"
        return uri, meta
    return None


def delete_run_dir(run_dir: str) -> bool:
    """Remove a run directory and everything in it (``--new``); True if there was one."""
    import pyarrow.fs

    fs, root = _filesystem(run_dir)
    if fs.get_file_info(root).type == pyarrow.fs.FileType.NotFound:
        return False
    fs.delete_dir(root)
    return True


def write_marker(uri: str) -> bool:
    """Create an empty file at ``uri`` unless it exists; True if this call created it."""
    import pyarrow.fs

    fs, path = _filesystem(uri)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
        return False
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as stream:
        stream.write(b"")
    return True
