"""Training configuration: YAML -> validated dataclasses, dotted-key overrides, resolution of defaults.

Everything here is checked on the driver before any Ray resource is requested: unknown keys, wrong
types, out-of-range values and missing shards raise :class:`ConfigError` naming the dotted field.
The same dotted keys address a field for ``vitpipe train --set key=value`` and for Tune search spaces
(:func:`apply_overrides`).

This module imports no torch, ray or mlflow, so the CLI can validate a config in a blink.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

__all__ = [
    "ConfigError",
    "TrainConfig",
    "apply_overrides",
    "check_data_sources",
    "flatten",
    "load_config",
    "parse_overrides",
    "read_yaml",
    "resolve_config",
]


class ConfigError(ValueError):
    """A problem with a training config; the message starts with the dotted field it concerns."""


# --------------------------------------------------------------------------------------------------
# The schema. Sections are dataclasses; a field without a default is required.


@dataclass
class ModelConfig:
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)  # family knobs, e.g. LSLA's ds_init
    drop_path_rate: float = 0.0
    # Start from trained weights (pipeline.train.finetune): a checkpoint path, models:/NAME@ALIAS or
    # models:/NAME/VERSION, or timm:NAME (timm's pretrained weights, from pretrained_file when given).
    init_from: str | None = None
    pretrained_file: str | None = None  # a local copy of timm's weights for init_from: timm:NAME (offline)

    def __post_init__(self) -> None:
        _check_range("model.drop_path_rate", self.drop_path_rate, 0.0, 1.0, high_open=True)
        if self.pretrained_file is not None and not (self.init_from or "").startswith("timm:"):
            raise ConfigError("model.pretrained_file: only read with model.init_from: timm:NAME")
        if self.init_from is not None and not self.init_from.strip():
            raise ConfigError("model.init_from: empty; leave it out to train from scratch")


@dataclass
class DataConfig:
    # A split location: a shard directory holding manifest.json, a URL prefix, or a {name} template
    # (see pipeline.data.manifest).
    train: str
    val: str
    test: str | None = None  # optional held-out split: DVT's budget curve is measured on it
    num_classes: int | None = None  # None: from the shard manifest
    img_size: int | None = None  # None: from the shard manifest
    in_chans: int | None = None  # None: from the shard manifest
    batch_size: int = 64  # per worker
    loader_workers: int = 2
    shuffle_buffer: int = 1000
    skip_corrupt: bool = False
    # Train-time augmentation, timm's create_transform knobs (eval: resize and centre crop).
    auto_augment: str | None = None  # RandAugment/AutoAugment spec, e.g. "rand-m9-mstd0.5"
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # random-resized-crop area range
    hflip: float = 0.5  # 0 for data where mirror images differ (digits, text)
    color_jitter: float = 0.4
    random_erasing: float = 0.0
    mixup: float = 0.0  # timm Mixup alpha; 0 disables
    cutmix: float = 0.0  # timm CutMix alpha; 0 disables
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    # Evaluation's centre crop, as a share of the resized image: None takes the model's own (its timm
    # pretrained_cfg: 1.0 for the 32x32 nano models, whose objects fill the frame; 0.875-0.9 at 224).
    crop_pct: float | None = None

    def __post_init__(self) -> None:
        for name in ("num_classes", "img_size", "in_chans"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {value}")
        _check_positive("data.batch_size", self.batch_size)
        _check_range("data.loader_workers", self.loader_workers, 0, None)
        _check_range("data.shuffle_buffer", self.shuffle_buffer, 0, None)
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(f"data.crop_scale must be [low, high] with 0 < low <= high <= 1, got {self.crop_scale}")
        _check_range("data.hflip", self.hflip, 0.0, 1.0)
        _check_range("data.color_jitter", self.color_jitter, 0.0, None)
        _check_range("data.random_erasing", self.random_erasing, 0.0, 1.0)
        _check_range("data.mixup", self.mixup, 0.0, None)
        _check_range("data.cutmix", self.cutmix, 0.0, None)
        _check_range("data.mixup_prob", self.mixup_prob, 0.0, 1.0)
        _check_range("data.mixup_switch_prob", self.mixup_switch_prob, 0.0, 1.0)
        if self.crop_pct is not None:
            _check_range("data.crop_pct", self.crop_pct, 0.1, 1.0)
        if (self.mixup > 0 or self.cutmix > 0) and self.batch_size % 2:
            raise ConfigError(f"data.batch_size must be even with mixup/cutmix (timm mixes pairs), got {self.batch_size}")


@dataclass
class OptimConfig:
    epochs: int = 10
    optimizer: str = "adamw"  # any name timm's create_optimizer_v2 knows
    lr: float = 1.0e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    opt_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {betas: [0.9, 0.95]}
    scheduler: str = "cosine"  # any name timm's create_scheduler_v2 knows
    warmup_epochs: int = 0
    warmup_lr: float = 1.0e-6
    min_lr: float = 1.0e-6
    clip_grad: float | None = None
    clip_mode: Literal["norm", "value", "agc"] = "norm"
    accum_steps: int = 1
    label_smoothing: float = 0.0
    # Layer-wise learning-rate decay (timm's, BEiT-style): layer l of L trains at lr * layer_decay**(L - l),
    # the head at lr. For fine-tuning; None: one learning rate.
    layer_decay: float | None = None
    ema: bool = False  # timm ModelEmaV3 of the weights, validated every epoch as val_ema/*
    ema_decay: float = 0.9998
    seed: int = 0

    def __post_init__(self) -> None:
        _check_positive("optim.epochs", self.epochs)
        _check_positive("optim.lr", self.lr)
        _check_range("optim.weight_decay", self.weight_decay, 0.0, None)
        _check_range("optim.warmup_epochs", self.warmup_epochs, 0, None)
        if self.warmup_epochs >= self.epochs:
            raise ConfigError(f"optim.warmup_epochs ({self.warmup_epochs}) must be < optim.epochs ({self.epochs})")
        _check_range("optim.warmup_lr", self.warmup_lr, 0.0, None)
        _check_range("optim.min_lr", self.min_lr, 0.0, None)
        if self.clip_grad is not None:
            _check_positive("optim.clip_grad", self.clip_grad)
        _check_positive("optim.accum_steps", self.accum_steps)
        _check_range("optim.label_smoothing", self.label_smoothing, 0.0, 1.0, high_open=True)
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"optim.layer_decay must be in (0, 1] or null, got {self.layer_decay}")
        _check_range("optim.ema_decay", self.ema_decay, 0.0, 1.0, high_open=True)


@dataclass
class CastlingConfig:
    # [ours] the branch's gate (pipeline.models.layers.castling): loss += weight(progress) * the gate penalty
    mask_reg_strength: float = 0.1
    mask_reg_schedule: str = "constant"  # interpreted by pipeline.models.layers.castling.mask_reg_weight
    # the gate schedule falls from 1 to 0 by this share of training, after which the branch adds nothing;
    # null: the learned gate alone (masks may stay open: the run is then tagged and warned)
    branch_off_at: float | None = 0.75

    def __post_init__(self) -> None:
        _check_range("method.castling.mask_reg_strength", self.mask_reg_strength, 0.0, None)
        if self.branch_off_at is not None and not 0.0 < self.branch_off_at <= 1.0:
            raise ConfigError(f"method.castling.branch_off_at must be in (0, 1] or null, got {self.branch_off_at}")


@dataclass
class DVTConfig:
    exit_weights: list[float] | None = None  # None: equal weights (the paper)

    def __post_init__(self) -> None:
        if self.exit_weights is not None:
            if not self.exit_weights or any(w < 0 for w in self.exit_weights) or sum(self.exit_weights) <= 0:
                raise ConfigError(f"method.dvt.exit_weights must be non-negative with a positive sum, got {self.exit_weights}")


@dataclass
class DistillConfig:
    # Knowledge distillation (pipeline.train.distill): a checkpoint path, models:/NAME@ALIAS, or timm:NAME
    teacher: str | None = None
    teacher_file: str | None = None  # timm:NAME: a weights file whose classifier has this run's classes
    kind: Literal["soft", "hard"] = "soft"  # soft: KL at `temperature`; hard: the teacher's argmax (DeiT)
    weight: float = 0.5  # loss = (1 - weight) * classification + weight * distillation
    temperature: float = 1.0

    def __post_init__(self) -> None:
        _check_range("method.distill.weight", self.weight, 0.0, 1.0)
        _check_positive("method.distill.temperature", self.temperature)
        if self.teacher_file is not None and not (self.teacher or "").startswith("timm:"):
            raise ConfigError("method.distill.teacher_file: only read with method.distill.teacher: timm:NAME")


@dataclass
class MethodConfig:
    castling: CastlingConfig = field(default_factory=CastlingConfig)
    dvt: DVTConfig = field(default_factory=DVTConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


@dataclass
class ScalingConfig:
    num_workers: int = 2  # one DDP worker per GPU (use_gpu) or CPU workers with gloo
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    resources_per_worker: dict[str, float] = field(default_factory=dict)  # extra Ray resources, e.g. {memory: 8.0e9}
    timeout_s: int = 1800  # process-group timeout: a stuck collective fails after this long
    # How long a start or restart of the worker group waits for its resources (a lost node replaced by the
    # autoscaler, a busy cluster) before it counts as a failed start; after 3 failed starts the run fails.
    resource_wait_s: float = 900.0
    find_unused_parameters: bool = False  # DDP option, for models with branches unused in training

    def __post_init__(self) -> None:
        _check_range("scaling.num_workers", self.num_workers, 0, None)
        _check_positive("scaling.cpus_per_worker", self.cpus_per_worker)
        _check_positive("scaling.timeout_s", self.timeout_s)
        _check_positive("scaling.resource_wait_s", self.resource_wait_s)
        for key in ("CPU", "GPU"):
            if key in self.resources_per_worker:
                raise ConfigError(
                    f"scaling.resources_per_worker.{key}: use scaling.cpus_per_worker / scaling.use_gpu instead"
                )


@dataclass
class CheckpointConfig:
    keep: int = 2  # best k by `metric`; the latest is always kept as well, for resuming
    metric: str = "val/top1"
    mode: Literal["max", "min"] = "max"
    # Also checkpoint every this many optimizer steps inside an epoch (uploaded in the background; only the
    # newest kept): a failure redoes at most this many steps instead of the whole epoch. None: epoch ends only.
    every_steps: int | None = None

    def __post_init__(self) -> None:
        _check_positive("checkpoint.keep", self.keep)
        if self.every_steps is not None:
            _check_positive("checkpoint.every_steps", self.every_steps)
        if not re.fullmatch(r"(val|val_ema|train)/[A-Za-z0-9_]+", self.metric):
            raise ConfigError(f"checkpoint.metric must look like 'val/top1' or 'val_ema/loss', got {self.metric!r}")


@dataclass
class ProfileConfig:
    # [start, end]: a torch.profiler trace of optimizer steps start..end (1-based, inclusive) on every rank,
    # logged to the MLflow run under profile/ (pipeline.train.telemetry). None: no profiling.
    steps: list[int] | None = None

    def __post_init__(self) -> None:
        if self.steps is not None:
            if len(self.steps) != 2 or not 1 <= self.steps[0] <= self.steps[1]:
                raise ConfigError(f"profile.steps must be [start, end] with 1 <= start <= end, got {self.steps}")
            self.steps = [int(v) for v in self.steps]


@dataclass
class MlflowConfig:
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<absolute cwd>/mlflow.db
    experiment: str = "vitpipe"
    system_metrics: bool = True
    system_metrics_interval_s: float = 10.0
    log_model: bool = True
    # pt2 (torch.export, MLflow 3's default) is safe to load; "auto" falls back to pickle when a model
    # cannot be exported and tags the run with the format used.
    model_format: Literal["auto", "pt2", "pickle"] = "auto"
    # How long the driver and rank 0 wait for an unreachable MLflow (connection errors, 5xx) where they must
    # (opening the run, logging its end) before the run fails; metrics logged meanwhile are kept and sent.
    outage_wait_s: float = 600.0

    def __post_init__(self) -> None:
        _check_positive("mlflow.system_metrics_interval_s", self.system_metrics_interval_s)
        _check_positive("mlflow.outage_wait_s", self.outage_wait_s)


@dataclass
class TrainConfig:
    model: ModelConfig
    data: DataConfig
    run_name: str = "vitpipe"
    storage_path: str = "runs"  # a local directory (made absolute) or a URI such as s3://bucket/runs
    ray_address: str | None = None  # None: RAY_ADDRESS if set, else a local Ray with CPU workers
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # torch.compile of the training and evaluation forward; checkpoints and exports keep the plain model.
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None = None
    compile_backend: Literal["inductor", "aot_eager", "eager", "cudagraphs"] = "inductor"  # aot_eager: quick, for tests
    # NHWC images and conv weights on GPU (ignored on CPU): for conv-heavy models run eagerly; inductor
    # picks conv layouts itself, and a ViT has a single conv.
    channels_last: bool = False
    method: MethodConfig = field(default_factory=MethodConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    max_failures: int = 2  # worker-group restarts from the last checkpoint before the run fails
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    log_every: int = 20  # steps between progress lines (and the cross-rank non-finite loss check)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.run_name):
            raise ConfigError(f"run_name must be letters, digits, '_', '-', '.', got {self.run_name!r}")
        _check_range("max_failures", self.max_failures, -1, None)
        _check_positive("log_every", self.log_every)
        if self.precision == "fp16" and not self.scaling.use_gpu:
            raise ConfigError("precision: fp16 needs scaling.use_gpu (on CPU use fp32 or bf16)")
        if self.compile_mode not in (None, "default") and self.compile_backend != "inductor":
            raise ConfigError(f"compile_mode: {self.compile_mode!r} is an inductor mode; compile_backend is "
                              f"{self.compile_backend!r}")  # fmt: skip
        if self.checkpoint.metric.startswith("val_ema/") and not self.optim.ema:
            raise ConfigError(f"checkpoint.metric {self.checkpoint.metric!r} needs optim.ema: true")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Validate a plain dict (as read from YAML) into a config; errors name the dotted field."""
        return _build(cls, data, "")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of plain types: YAML-, JSON- and ``torch.load(weights_only=True)``-safe."""
        return dataclasses.asdict(self)

    @property
    def run_dir(self) -> str:
        """Where Ray Train keeps this run's checkpoints: ``<storage_path>/<run_name>``."""
        return f"{self.storage_path.rstrip('/')}/{self.run_name}"

    @property
    def effective_precision(self) -> str:
        """The precision actually used: ``fp32``, ``bf16`` or ``fp16`` (``auto`` resolved)."""
        if self.precision == "auto":
            return "bf16" if self.scaling.use_gpu else "fp32"
        return self.precision


# --------------------------------------------------------------------------------------------------
# Range checks.


def _check_positive(where: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{where} must be > 0, got {value}")


def _check_range(where: str, value: float, low: float | None, high: float | None, high_open: bool = False) -> None:
    if low is not None and value < low:
        raise ConfigError(f"{where} must be >= {low}, got {value}")
    if high is not None and (value >= high if high_open else value > high):
        raise ConfigError(f"{where} must be {'<' if high_open else '<='} {high}, got {value}")


# --------------------------------------------------------------------------------------------------
# Generic dict -> dataclass validation.


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got null")
        options = [o for o in options if o is not type(None)]
        if len(options) == 1:  # `X | None`: X's own error is the precise one
            return _coerce(value, options[0], where)
        for option in options:
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        (item,) = get_args(tp)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, item = get_args(tp)
        return {str(k): _coerce(v, item, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a schema bug, not a user error
        raise TypeError(f"unsupported schema type {tp!r} at {where}")
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), fields, n=1)
        hint = f" (did you mean {_join(prefix, close[0])!r}?)" if close else f"; known keys: {', '.join(fields)}"
        raise ConfigError(f"{_join(prefix, str(key))}: unknown key{hint}")
    kwargs = {}
    for name, f in fields.items():
        path = _join(prefix, name)
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{path}: missing required key")
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------------
# YAML, overrides, flattening.


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-5`` as a float (PyYAML's YAML 1.1 rules read it as a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["optim.lr=1e-4", "model.kwargs.bias_sharing=tied"]`` -> ``{"optim.lr": 1e-4, ...}``; values are YAML."""
    overrides = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value with a dotted key, e.g. optim.lr=1.0e-4")
        try:
            overrides[key.strip()] = read_yaml(text) if text.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({err})") from None
    return overrides


def _free_form(tp: Any) -> bool:
    """Dict-typed fields (model.kwargs, ...) accept any key below them."""
    return get_origin(tp) is dict or tp is Any


def _section_type(tp: Any) -> Any:
    """The dataclass inside ``X | None``, or ``tp`` itself."""
    if get_origin(tp) in (Union, types.UnionType):
        inner = [a for a in get_args(tp) if a is not type(None) and dataclasses.is_dataclass(a)]
        if inner:
            return inner[0]
    return tp


def apply_overrides(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` with dotted keys set: ``{"model.kwargs.ds_init": 2.0, "optim.lr": 1.0e-4}``.

    Keys are checked against the schema (a typo is an error naming it, with a suggestion); sections
    missing from ``config`` are created; below a free-form mapping (``model.kwargs``,
    ``optim.opt_kwargs``, ``scaling.resources_per_worker``) any key may be set. Values are validated
    later, by :meth:`TrainConfig.from_dict`.
    """
    result = copy.deepcopy(config)
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        if not all(parts):
            raise ConfigError(f"{dotted!r}: empty part in dotted key")
        node, schema = result, TrainConfig
        for depth, part in enumerate(parts):
            path = ".".join(parts[: depth + 1])
            last = depth == len(parts) - 1
            if schema is not None:
                names = {f.name for f in dataclasses.fields(schema)}
                if part not in names:
                    close = difflib.get_close_matches(part, names, n=1)
                    hint = f" (did you mean {'.'.join(parts[:depth] + [close[0]])!r}?)" if close else ""
                    raise ConfigError(f"{path}: unknown key{hint}")
                field_type = _section_type(get_type_hints(schema)[part])
                schema = field_type if dataclasses.is_dataclass(field_type) else None
                free = _free_form(field_type)
                if not last and schema is None and not free:
                    raise ConfigError(f"{path}: is a value, not a section; cannot set {dotted!r}")
            if last:
                node[part] = value
                break
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{path}: is {child!r}, not a mapping; cannot set {dotted!r}")
            node = child
    return result


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1e-3}}`` -> ``{"optim.lr": 1e-3}`` (lists stay values)."""
    flat = {}
    for key, value in data.items():
        path = _join(prefix, str(key))
        if isinstance(value, dict) and value:
            flat.update(flatten(value, path))
        else:
            flat[path] = value
    return flat


# --------------------------------------------------------------------------------------------------
# Loading and resolving.


def load_config(path: str | os.PathLike, overrides: dict[str, Any] | list[str] | None = None) -> TrainConfig:
    """Read a YAML config, apply ``--set`` style overrides and validate. Does not touch the data."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = read_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    return TrainConfig.from_dict(apply_overrides(data, overrides or {}))


_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def _is_uri(text: str) -> bool:
    """``s3://``, ``https://``, ``pipe:``, ... (not a Windows drive letter: we run on POSIX)."""
    return bool(_URI.match(text))


def _absolute(path: str, base: Path) -> str:
    if _is_uri(path):
        return path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def check_data_sources(config: TrainConfig) -> None:
    """Both splits have a readable manifest and, when local, every shard it lists; fills data facts.

    ``num_classes``, ``img_size`` and ``in_chans`` left empty are taken from the train manifest.
    """
    from pipeline.data.manifest import ManifestError, is_local, local_path, read_manifest

    manifests = {}
    for name in ("train", "val", "test"):
        location = getattr(config.data, name)
        if location is None:
            continue
        try:
            manifest = read_manifest(location)
        except ManifestError as err:
            raise ConfigError(f"data.{name}: {err}") from None
        if not hasattr(manifest, "shard_urls"):
            raise ConfigError(f"data.{name}: {location} is a dataset root; point it at one split, e.g. {location}/{name}")
        for url in manifest.shard_urls():
            if is_local(url) and not local_path(url).is_file():
                raise ConfigError(f"data.{name}: shard {local_path(url)} listed in the manifest is missing")
        manifests[name] = manifest
    train = manifests["train"]
    for name, manifest in manifests.items():
        if manifest.classes != train.classes:
            raise ConfigError(f"data.{name}: its class names differ from data.train's")
    if config.data.num_classes is None:
        config.data.num_classes = train.num_classes
    if config.data.in_chans is None:
        config.data.in_chans = train.channels
    if config.data.img_size is None:
        size = train.image_size
        if size is None or size[0] != size[1]:
            raise ConfigError(f"data.img_size: must be given, the train images are not all one square size ({size})")
        config.data.img_size = int(size[0])


def resolve_config(config: TrainConfig, *, base_dir: str | os.PathLike | None = None, check_data: bool = True) -> TrainConfig:
    """The config as the workers will see it: absolute paths, explicit tracking URI, data facts filled in.

    Relative paths are taken from ``base_dir`` (default: the current directory); the tracking URI, when
    the config leaves it out, is ``$MLFLOW_TRACKING_URI`` or ``mlflow.db`` there. With ``check_data``
    the shard manifests are read (errors name the field) and ``num_classes``, ``img_size``,
    ``in_chans`` left empty come from them; without it they must be given. ``data.crop_pct`` left empty
    becomes the model's own.
    """
    base = Path(base_dir or os.getcwd()).resolve()
    data = config.to_dict()
    data["storage_path"] = _absolute(config.storage_path, base)
    if config.mlflow.tracking_uri is None:
        data["mlflow"]["tracking_uri"] = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{base / 'mlflow.db'}"
    for name in ("train", "val", "test"):
        if getattr(config.data, name) is not None:
            data["data"][name] = _absolute(getattr(config.data, name), base)
    for name in ("init_from", "pretrained_file"):  # timm:NAME and models:/... are URIs: left as they are
        if getattr(config.model, name) is not None:
            data["model"][name] = _absolute(getattr(config.model, name), base)
    for name in ("teacher", "teacher_file"):
        if getattr(config.method.distill, name) is not None:
            data["method"]["distill"][name] = _absolute(getattr(config.method.distill, name), base)
    resolved = TrainConfig.from_dict(data)
    if check_data:
        check_data_sources(resolved)
    else:
        missing = [k for k in ("num_classes", "img_size", "in_chans") if getattr(resolved.data, k) is None]
        if missing:
            raise ConfigError(f"data.{missing[0]}: must be given when the shards are not checked")
    if resolved.data.crop_pct is None:  # explicit, so that the run's logged config says which crop it evaluated
        from pipeline.train.build import eval_crop_pct

        resolved.data.crop_pct = eval_crop_pct(resolved)
    return resolved
