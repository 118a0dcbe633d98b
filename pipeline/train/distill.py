"""Knowledge distillation from a trained teacher: ``method.distill``, as DeiT and LeViT train their students.

The teacher is a checkpoint, a registered version (``models:/NAME@ALIAS``, resolved once on the driver) or
``timm:NAME`` with a weights file for the run's classes. The driver reads it once; its weights reach every
rank through Ray's object store, where it runs in eval mode (inference form) under ``no_grad`` and the
run's autocast, on the student's batch (after mixup), resized to the teacher's image size if it differs.
Its forward is part of each training step, so the step time shows its cost.

    loss = (1 - weight) * classification + weight * distillation
    soft: KL(teacher || student) of the temperature-softened distributions, times temperature**2 (Hinton)
    hard: cross-entropy against the teacher's argmax (DeiT's hard distillation)

A cascade's (DVT's) every exit is distilled; the distillation term is their mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.train.config import ConfigError, TrainConfig

__all__ = ["Teacher", "build_teacher", "distillation_loss", "resolve_teacher"]


@dataclass
class Teacher:
    """What the workers need to rebuild the teacher (it travels through the object store)."""

    source: str  # a path, models:/NAME/VERSION, or timm:NAME (file)
    state_dict: dict[str, Tensor]
    config: dict | None  # a project teacher's TrainConfig; None for timm's
    timm_name: str | None
    num_classes: int
    in_chans: int
    img_size: int

    def tags(self) -> dict[str, str]:
        tags = {"vitpipe.distill_teacher": self.source}
        if self.source.startswith("models:/"):
            tags["vitpipe.distill_teacher_version"] = self.source.rsplit("/", 1)[-1]
        return tags


def resolve_teacher(config: TrainConfig) -> Teacher | None:
    """Read ``method.distill.teacher`` on the driver; its classes and channels must be the student's."""
    from pipeline.train.finetune import read_weights, timm_model

    distill = config.method.distill
    if distill.teacher is None:
        return None
    where, data = "method.distill.teacher", config.data
    if distill.teacher.startswith("timm:"):
        name = distill.teacher[5:]
        model = timm_model(name, distill.teacher_file, where, num_classes=data.num_classes, in_chans=data.in_chans)
        size = model.pretrained_cfg.get("input_size", (data.in_chans, data.img_size, data.img_size))[-1]
        source = f"{distill.teacher} ({distill.teacher_file})" if distill.teacher_file else distill.teacher
        return Teacher(source, model.state_dict(), None, name, data.num_classes, data.in_chans, int(size))
    trained = read_weights(distill.teacher, where=where, tracking_uri=config.mlflow.tracking_uri, in_chans=data.in_chans)
    teacher_data = trained.config["data"]
    for key in ("num_classes", "in_chans"):
        if teacher_data[key] != getattr(data, key):
            raise ConfigError(f"{where}: {trained.source} was trained with data.{key} = {teacher_data[key]}, "
                              f"this run has {getattr(data, key)}")  # fmt: skip
    return Teacher(trained.source, trained.state_dict, trained.config, None, data.num_classes, data.in_chans,
                   int(teacher_data["img_size"]))  # fmt: skip


def build_teacher(teacher: Teacher, device: torch.device) -> nn.Module:
    """The teacher on ``device``, in inference form and eval mode, its parameters frozen."""
    import timm

    from pipeline.train.build import build_model, to_inference_form

    if teacher.config is not None:
        model = build_model(TrainConfig.from_dict(teacher.config))
    else:
        model = timm.create_model(teacher.timm_name, num_classes=teacher.num_classes, in_chans=teacher.in_chans)
    model.load_state_dict(teacher.state_dict)
    to_inference_form(model).eval().requires_grad_(False)
    return model.to(device)


@torch.no_grad()
def teacher_logits(teacher: nn.Module, images: Tensor, img_size: int) -> Tensor:
    """The teacher's logits for the student's batch (resized to the teacher's input size); a cascade's last exit."""
    if images.shape[-1] != img_size or images.shape[-2] != img_size:
        images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False, antialias=True)
    out = teacher(images)
    return out[-1] if isinstance(out, (list, tuple)) else out


def distillation_loss(outputs: Tensor | Sequence[Tensor], teacher: Tensor, kind: str, temperature: float) -> Tensor:
    """The distillation term of the student's logits (a cascade: the mean over its exits) against the teacher's."""
    exits = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    teacher = teacher.float()
    terms = []
    for logits in exits:
        logits = logits.float()
        if kind == "hard":
            terms.append(F.cross_entropy(logits, teacher.argmax(dim=-1)))
        else:
            t = temperature
            terms.append(F.kl_div(F.log_softmax(logits / t, dim=-1), F.log_softmax(teacher / t, dim=-1),
                                  reduction="batchmean", log_target=True) * t * t)  # fmt: skip
    return sum(terms) / len(terms)
