"""Model construction for training, and the duck-typed hooks of the methods that train differently.

- Castling-ViT: a model with Castling attention layers adds ``mask_reg_weight * mask_regularization`` (the
  branch gates' penalty) to its loss, follows the gate schedule, logs per-layer mask densities, is
  validated in its inference form, and is switched to it before export.
- DVT: a model whose forward returns a list of per-exit logits is trained on the weighted sum of the
  exits' cross-entropies and validated per exit.

Model code knows nothing of this module; this module knows the models only through those names.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.train.config import ConfigError, TrainConfig

__all__ = ["build_model", "classification_loss", "has_castling", "model_facts", "to_inference_form"]

_SET_BY_CONFIG = {"num_classes": "data.num_classes", "in_chans": "data.in_chans", "img_size": "data.img_size",
                  "drop_path_rate": "model.drop_path_rate"}


def build_model(config: TrainConfig) -> nn.Module:
    """``timm.create_model`` for the config's model (project models registered by ``import pipeline.models``).

    Errors name the config field: an unknown model is ``model.name``, a rejected argument ``model.kwargs``.
    """
    import timm

    import pipeline.models  # noqa: F401  (registers the project's models with timm)

    for key, field in _SET_BY_CONFIG.items():
        if key in config.model.kwargs:
            raise ConfigError(f"model.kwargs.{key}: set {field} instead")
    if not timm.is_model(config.model.name):
        close = difflib.get_close_matches(config.model.name, timm.list_models(), n=5)
        raise ConfigError(f"model.name: unknown model {config.model.name!r}" + (f"; similar: {close}" if close else ""))
    kwargs = dict(
        num_classes=config.data.num_classes,
        in_chans=config.data.in_chans,
        img_size=config.data.img_size,
        drop_path_rate=config.model.drop_path_rate,
        **config.model.kwargs,
    )
    try:
        return timm.create_model(config.model.name, pretrained=False, **kwargs)
    except TypeError as err:
        if "img_size" not in str(err):
            raise ConfigError(f"model.kwargs: {config.model.name} rejects them ({err})") from None
    # timm's CNNs take any input size and have no img_size argument.
    kwargs.pop("img_size")
    try:
        return timm.create_model(config.model.name, pretrained=False, **kwargs)
    except TypeError as err:
        raise ConfigError(f"model.kwargs: {config.model.name} rejects them ({err})") from None


def eval_crop_pct(config: TrainConfig) -> float:
    """Evaluation's centre-crop share: ``data.crop_pct``, else the model's (timm ``pretrained_cfg``), else timm's.

    Read from the config, not from a model at hand: a model loaded from the registry may be an exported
    program without a ``pretrained_cfg``.
    """
    from timm.data import DEFAULT_CROP_PCT

    if config.data.crop_pct is not None:
        return config.data.crop_pct
    with torch.device("meta"):  # the architecture alone: no weights are allocated
        cfg = getattr(build_model(config), "pretrained_cfg", None) or {}
    return float(cfg.get("crop_pct") or DEFAULT_CROP_PCT)


def has_castling(model: nn.Module) -> bool:
    try:
        from pipeline.models.layers.castling import castling_modules
    except ImportError:
        return False
    return bool(castling_modules(model))


def to_inference_form(model: nn.Module) -> nn.Module:
    """Drop training-only branches (Castling's masked softmax) where the model has them."""
    switch = getattr(model, "switch_to_inference", None)
    if callable(switch):
        switch()
    elif has_castling(model):  # Castling layers inside a model without its own switch (e.g. timm's)
        from pipeline.models.layers.castling import switch_to_inference

        switch_to_inference(model)
    return model


def classification_loss(
    outputs: Tensor | Sequence[Tensor], target: Tensor, *, label_smoothing: float = 0.0,
    exit_weights: Sequence[float] | None = None,
) -> Tensor:
    """Cross-entropy of one logits tensor, or DVT's weighted sum over a list of per-exit logits.

    ``target``: class indices, or soft targets from mixup/cutmix (then smoothing is already in them).
    """
    if target.is_floating_point():
        label_smoothing = 0.0
    if isinstance(outputs, (list, tuple)):
        from pipeline.models.dvt import cascade_loss

        return cascade_loss(outputs, target, exit_weights, label_smoothing=label_smoothing)
    if exit_weights is not None:
        raise ConfigError("method.dvt.exit_weights: set, but the model has a single exit")
    return F.cross_entropy(outputs, target, label_smoothing=label_smoothing)


def model_facts(config: TrainConfig, quiet: bool = False) -> dict[str, int | float]:
    """Parameter count and MACs per image (fvcore convention): ``macs`` of the inference form (DVT: the whole
    cascade, and ``macs_exitK`` to each exit), ``macs_train`` of the training form's forward (Castling's
    softmax branch included, every DVT exit), on the meta device if it can.

    Building here also validates ``model.name`` and ``model.kwargs`` on the driver, before Ray starts.
    """
    from pipeline.models.counting import count_macs, count_params

    def build() -> tuple[nn.Module, torch.device]:
        try:
            with torch.device("meta"):
                return build_model(config), torch.device("meta")
        except NotImplementedError:  # an init that reads tensor data: build for real (seconds)
            return build_model(config), torch.device("cpu")

    model, device = build()
    facts: dict[str, int | float] = {"params": count_params(model)}
    example = torch.zeros(1, config.data.in_chans, config.data.img_size, config.data.img_size, device=device)
    try:
        to_inference_form(model).eval()
        exit_macs = getattr(model, "exit_macs", None)
        if callable(exit_macs):  # DVT: cumulative cost of stopping at each exit; the last is the whole cascade
            for k, macs in enumerate(exit_macs(config.data.img_size)):
                facts[f"macs_exit{k + 1}"] = facts["macs"] = macs
        else:
            facts["macs"] = count_macs(model, example)
        # a fresh model (the inference form is one-way); 2 images, as batch norm trains on no fewer
        facts["macs_train"] = count_macs(build()[0].train(), example.expand(2, -1, -1, -1)) // 2
    except Exception as err:  # noqa: BLE001 - a model that cannot be counted still trains; say so
        if not quiet:
            print(f"[vitpipe] note: MACs not counted ({type(err).__name__}: {err})")
    return facts
