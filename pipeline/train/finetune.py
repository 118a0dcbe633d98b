"""Starting a run from trained weights: ``model.init_from``.

``init_from`` names where the weights come from:

- a checkpoint of this project (a directory or its ``state.pt``);
- a registered version, ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (an alias is resolved to its
  version once, on the driver, so every worker and the run's tags name the same weights);
- ``timm:NAME``: timm's pretrained weights of ``NAME``, from ``model.pretrained_file`` when given (offline),
  else from timm's hub (network).

The weights are fitted to the model the config builds, on the driver, before Ray starts: a classifier
whose class count differs is left at its fresh initialisation, absolute position embeddings and
relative-position tables are resampled to the new grid or window (timm's helpers). Anything else that
does not fit is an error naming the keys. The training loop loads the result on every rank; a resumed
run ignores it (its checkpoint holds the fine-tuned weights).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from pipeline.train.config import ConfigError, TrainConfig

__all__ = ["InitialWeights", "TrainedWeights", "fit_weights", "initial_weights", "read_weights", "timm_model"]


@dataclass
class InitialWeights:
    state_dict: dict[str, Tensor]  # fitted to the configured model: loads with strict=True
    source: str  # what was read: a path, models:/NAME/VERSION, or timm:NAME (file)
    notes: list[str] = field(default_factory=list)  # what was re-initialised or resampled

    def tags(self) -> dict[str, str]:
        return {"vitpipe.init_from": self.source, "vitpipe.init_notes": "; ".join(self.notes)[:5000] or "exact fit"}


# --------------------------------------------------------------------------------------------------
# Reading the source (also the distillation teacher's, pipeline.train.distill).


@dataclass
class TrainedWeights:
    source: str  # a path, models:/NAME/VERSION (an alias resolved), or timm:NAME (file)
    state_dict: dict[str, Tensor]  # the training form's weights (EMA's where the run was scored on them)
    config: dict | None  # the TrainConfig it was trained with (None for timm's weights)


def _registered(uri: str, tracking_uri: str, where: str) -> TrainedWeights:
    """``models:/NAME@ALIAS`` (resolved to ``models:/NAME/VERSION``), ``models:/NAME/VERSION`` or ``runs:/``."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline.registry import RegistryError, load

    name, sep, alias = uri[len("models:/"):].partition("@")
    if uri.startswith("models:/") and sep:
        try:
            version = MlflowClient(tracking_uri, registry_uri=tracking_uri).get_model_version_by_alias(name, alias)
        except MlflowException as err:
            raise ConfigError(f"{where}: {uri} is not in {tracking_uri} ({err.message})") from None
        uri = f"models:/{name}/{version.version}"
    try:
        loaded = load(uri, tracking_uri=tracking_uri, inference=False)
    except RegistryError as err:
        raise ConfigError(f"{where}: {err}") from None
    return TrainedWeights(uri, loaded.model.state_dict(), loaded.config.to_dict())


def _checkpoint(path: str, where: str) -> TrainedWeights:
    from pipeline.train.checkpoint import CheckpointError, load_checkpoint

    try:
        state = load_checkpoint(path)
    except (FileNotFoundError, CheckpointError) as err:
        raise ConfigError(f"{where}: {err}") from None
    use_ema = state["config"].get("checkpoint", {}).get("metric", "").startswith("val_ema/")
    weights = state["ema"] if use_ema and state.get("ema") is not None else state["model"]
    return TrainedWeights(os.path.abspath(path), weights, state["config"])


def timm_model(name: str, pretrained_file: str | None, where: str, **kwargs) -> nn.Module:
    """``timm.create_model(name, pretrained=True, **kwargs)``, from ``pretrained_file`` when given; timm's
    loader adapts the first conv to ``in_chans`` (``adapt_input_conv``: summed for greyscale)."""
    import timm

    import pipeline.models  # noqa: F401  (the project's models are timm models too)

    if not timm.is_model(name):
        raise ConfigError(f"{where}: timm has no model {name!r}")
    overlay = {}
    if pretrained_file is not None:
        if not Path(pretrained_file).is_file():
            raise ConfigError(f"{where}: no weights file at {pretrained_file}")
        overlay = {"file": str(Path(pretrained_file).resolve())}
        if "num_classes" in kwargs:  # the file's own head: timm would otherwise drop a head of another count
            overlay["num_classes"] = kwargs["num_classes"]
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except Exception as err:  # noqa: BLE001 - no network, no hub entry, a file of another model: say which
        hint = "" if pretrained_file else " (offline? download the weights once and point to the file)"
        raise ConfigError(f"{where}: timm:{name}: pretrained weights not loaded{hint}: "
                          f"{type(err).__name__}: {str(err).splitlines()[0][:300]}") from None  # fmt: skip


def read_weights(spec: str, *, where: str, tracking_uri: str, in_chans: int,
                 pretrained_file: str | None = None) -> TrainedWeights:  # fmt: skip
    """The weights ``spec`` names (a checkpoint path, ``models:/...``, ``runs:/...`` or ``timm:NAME``)."""
    if spec.startswith("timm:"):
        model = timm_model(spec[5:], pretrained_file, where, in_chans=in_chans)
        return TrainedWeights(f"{spec}" + (f" ({pretrained_file})" if pretrained_file else ""), model.state_dict(), None)
    if spec.startswith(("models:/", "runs:/")):
        return _registered(spec, tracking_uri, where)
    return _checkpoint(spec, where)


def initial_weights(config: TrainConfig, model: nn.Module | None = None) -> InitialWeights | None:
    """The weights ``model.init_from`` names, fitted to the configured model (built here unless given)."""
    spec = config.model.init_from
    if spec is None:
        return None
    trained = read_weights(spec, where="model.init_from", tracking_uri=config.mlflow.tracking_uri,
                           in_chans=config.data.in_chans, pretrained_file=config.model.pretrained_file)  # fmt: skip
    source, weights = trained.source, trained.state_dict
    if model is None:
        from pipeline.train.build import build_model

        model = build_model(config)
    from pipeline.train.checkpoint import CheckpointError

    try:
        fitted, notes = fit_weights(model, weights)
    except CheckpointError as err:
        raise ConfigError(f"model.init_from: {source}: {err}") from None
    return InitialWeights(fitted, source, notes)


# --------------------------------------------------------------------------------------------------
# Fitting weights to another head, grid or window.


def _classifier_keys(model: nn.Module) -> set[str]:
    """The parameters of every classifier: Linear layers with ``num_classes`` outputs (a cascade has one per exit)."""
    num_classes = getattr(model, "num_classes", None)
    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == num_classes:
            keys |= {f"{name}.{p}" for p, _ in module.named_parameters(recurse=False)}
    return keys


def _square(n: int) -> int | None:
    side = math.isqrt(n)
    return side if side * side == n else None


def _resample_pos_embed(source: Tensor, target: Tensor) -> Tensor | None:
    """An absolute position embedding (1, prefix + H*W, D) resampled to the target's grid (timm's helper)."""
    from timm.layers import resample_abs_pos_embed

    if source.ndim != 3 or source.shape[-1] != target.shape[-1]:
        return None
    for prefix in (0, 1, 2):  # class (and distillation) tokens come first and are kept as they are
        old, new = _square(source.shape[1] - prefix), _square(target.shape[1] - prefix)
        if old and new:
            return resample_abs_pos_embed(source.float(), [new, new], [old, old], num_prefix_tokens=prefix).to(target.dtype)
    return None


def _resize_relative_table(source: Tensor, target: Tensor) -> Tensor | None:
    """A relative-position table over a (2w-1)^2 grid of offsets, (heads, L) or (L, heads), resized to the
    target's window (timm's ``resize_rel_pos_bias_table``, on the (heads, 2w-1, 2w-1) layout)."""
    from timm.layers import resize_rel_pos_bias_table

    if source.ndim != 2:
        return None
    heads_first = source.shape[0] == target.shape[0] and _square(source.shape[1]) and _square(target.shape[1])
    heads_last = source.shape[1] == target.shape[1] and _square(source.shape[0]) and _square(target.shape[0])
    if not (heads_first or heads_last):
        return None
    table = source if heads_first else source.t()
    old, new = _square(table.shape[1]), _square((target if heads_first else target.t()).shape[1])
    if old % 2 == 0 or new % 2 == 0:  # not an offset grid (2w-1 is odd)
        return None
    grid = table.float().reshape(table.shape[0], old, old)
    resized = resize_rel_pos_bias_table(grid, ((new + 1) // 2,) * 2, (table.shape[0], new, new))
    resized = resized.reshape(table.shape[0], new * new)
    return (resized if heads_first else resized.t()).to(target.dtype).contiguous()


def fit_weights(model: nn.Module, weights: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """``weights`` made to fit ``model``: (a state dict that loads strictly, notes on what was changed).

    Raises :class:`~pipeline.train.checkpoint.CheckpointError` for keys missing, unexpected or mis-shaped
    beyond a classifier, a position embedding or a relative-position table.
    """
    from pipeline.train.checkpoint import CheckpointError, strip_wrapper_prefixes

    weights = strip_wrapper_prefixes(weights)
    own = model.state_dict()
    classifier = _classifier_keys(model)
    fitted, notes, head, resized, problems = {}, [], [], [], []
    for key, target in own.items():
        if key not in weights:
            problems.append(f"missing {key}")
            continue
        source = weights[key]
        if source.shape == target.shape:
            fitted[key] = source.to(target.dtype)
            continue
        if key in classifier:
            fitted[key] = target  # the fresh initialisation: another class count
            head.append(f"{key} {tuple(source.shape)} -> {tuple(target.shape)}")
            continue
        change = _resample_pos_embed(source, target) if key.endswith("pos_embed") else _resize_relative_table(source, target)
        if change is None or change.shape != target.shape:
            problems.append(f"mis-shaped {key} {tuple(source.shape)} vs {tuple(target.shape)}")
            continue
        fitted[key] = change
        resized.append(f"{key} {tuple(source.shape)} -> {tuple(target.shape)}")
    problems += [f"unexpected {key}" for key in weights if key not in own]
    if problems:
        raise CheckpointError(f"its weights do not fit {type(model).__name__} as configured: {len(problems)} "
                              f"problem(s): {', '.join(problems[:4])}{', ...' if len(problems) > 4 else ''}")  # fmt: skip
    if head:
        notes.append(f"classifier re-initialised for {getattr(model, 'num_classes', '?')} classes ({', '.join(head)})")
    if resized:
        notes.append(f"resampled to the new grid/window: {', '.join(resized)}")
    return fitted, notes
