"""The per-worker training loop that Ray Train runs on every rank (``train_loop_per_worker``).

One epoch: every rank reads its equal share of the train shards, steps DDP (gloo on CPU, nccl on GPU),
then validates its share of the val split; sums are all-reduced so every rank holds the exact metrics.
Rank 0 saves the checkpoint, every rank calls ``ray.train.report`` (a barrier), and rank 0 logs to MLflow.
After the last epoch rank 0 alone finishes the run: best checkpoint and curves as artifacts, DVT's
budget report, and the final model in inference form.

The loop also runs without Ray workers: with ``ScalingConfig(num_workers=0)`` in this process, and under
``torchrun`` (Ray's local mode joins torchrun's process group), which the benchmark compares against.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from pipeline.train.build import build_model, classification_loss, eval_crop_pct, has_castling, to_inference_form
from pipeline.train.checkpoint import (
    StepCheckpointer,
    checkpoint_dir_name,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    strip_wrapper_prefixes,
)
from pipeline.train.config import TrainConfig

__all__ = ["train_loop_per_worker", "NonFiniteLoss"]

IGNORE_LABEL = -1  # the reader's label for eval padding and skipped corrupt samples


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite: the run stops (it is not retried)."""


# --------------------------------------------------------------------------------------------------
# Small distributed helpers.


@dataclass
class Dist:
    rank: int
    world_size: int
    device: torch.device

    @property
    def active(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def sum(self, values: Tensor) -> Tensor:
        """Element-wise sum over ranks (float64 on the wire: counts and sums stay exact)."""
        values = values.to(self.device, torch.float64)
        if self.active:
            dist.all_reduce(values)
        return values.cpu()


def _progress(message: str) -> None:
    # Ray forwards the workers' stdout to the driver: this is the driver's progress display. Ray Train
    # patches print() into a logger that echoes once more when a library has wrapped sys.stdout (MLflow
    # does); writing to the process's own stdout prints each line once, with or without Ray.
    print(f"[vitpipe] {message}", file=sys.__stdout__, flush=True)


def _quiet_libraries() -> None:
    """Keep the workers' terminal to the loop's progress lines, unless ``VITPIPE_VERBOSE`` is set.

    Ray Train logs every report (the whole metrics dict, once per rank) at INFO through a logger named after
    its file, which its ``LoggingConfig`` does not reach; MLflow logs its system-metrics monitor's start and
    stop at INFO. Warnings and errors still show.
    """
    if os.environ.get("VITPIPE_VERBOSE"):
        return
    import mlflow  # noqa: F401  (MLflow sets its loggers' levels when first imported: after that, ours hold)

    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# --------------------------------------------------------------------------------------------------
# The run state.


@dataclass
class State:
    # The plain module: checkpoints, EMA, clipping and Castling's hooks read it, so no `module.` or
    # `_orig_mod.` prefix reaches a state dict. The wrappers below share its parameters.
    model: nn.Module
    ddp: nn.Module  # the training forward: DDP-wrapped when distributed, then compiled with `compile`
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    ema: Any | None
    updates_per_epoch: int = 0
    epochs_done: int = 0
    global_step: int = 0
    batches_done: int = 0  # of epoch `epochs_done` (0-based), when resumed from a mid-epoch checkpoint
    epoch_sums: Any = None  # that epoch's running [loss sum, micro-steps] when it was saved
    rng: Any = None  # every rank's RNG states when it was saved
    eval_model: nn.Module | None = None  # the evaluation forward (compiled with `compile`); None: model
    eval_ema: nn.Module | None = None  # the same for the EMA weights; None: ema.module
    teacher: nn.Module | None = None  # method.distill's, frozen, in eval mode
    teacher_img_size: int = 0
    profiler: StepProfiler | None = None  # profile.steps
    train_macs: int | None = None  # per image, the training form's forward (for achieved TFLOP/s and MFU)
    peak_tflops: float | None = None  # the device's dense bf16 peak, when known (MFU)

    def evaluated(self, ema: bool = False) -> nn.Module:
        """The module that evaluation calls for the model or its EMA."""
        if ema:
            return self.ema.module if self.eval_ema is None else self.eval_ema
        return self.model if self.eval_model is None else self.eval_model

    def to_dict(self, config: TrainConfig, metrics: dict[str, float], run_id: str | None, *,
                within_epoch: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
        """The checkpoint's contents; ``within_epoch`` (mid-epoch checkpoints): ``batches_done``, ``epoch_sums``
        and ``rng`` of the epoch in progress."""
        return {
            "epochs_done": self.epochs_done,
            "global_step": self.global_step,
            "updates_per_epoch": self.updates_per_epoch,
            "batches_done": 0,
            **(within_epoch or {}),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": None if self.ema is None else self.ema.module.state_dict(),
            "config": config.to_dict(),
            "metrics": metrics,
            "mlflow_run_id": run_id,
            "run_name": config.run_name,
        }

    def load(self, saved: dict[str, Any], *, model_name: str, replan: bool = False) -> None:
        """Continue from a checkpoint; set ``updates_per_epoch`` (and the scheduler) for this run first.

        ``replan``: the run's length changed since the checkpoint (a finished run extended): keep this run's
        new scheduler instead of the saved one, whose state holds the old total, at the saved step.
        """
        load_weights(self.model, strip_wrapper_prefixes(saved["model"]), model_name=model_name,
                     source=f"the checkpoint being resumed (trained as {saved['config']['model']['name']})")  # fmt: skip
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scaler.load_state_dict(saved["scaler"])
        if self.ema is not None:
            if saved["ema"] is None:
                raise ValueError("optim.ema is on but the checkpoint being resumed has no EMA weights")
            self.ema.module.load_state_dict(strip_wrapper_prefixes(saved["ema"]))
        self.epochs_done = saved["epochs_done"]
        self.batches_done = saved.get("batches_done", 0)
        self.epoch_sums, self.rng = saved.get("epoch_sums"), saved.get("rng")
        if saved.get("updates_per_epoch") == self.updates_per_epoch:
            if not replan:
                self.scheduler.load_state_dict(saved["scheduler"])
            self.global_step = saved["global_step"]
        else:  # another world size or batch size: same place in the schedule, counted in this run's steps
            self.global_step = self.epochs_done * self.updates_per_epoch
        self.scheduler.step_update(self.global_step)


def _memory_format(config: TrainConfig, device: torch.device) -> torch.memory_format:
    """channels_last (NHWC) for images and conv weights on GPU when configured; the tensors' own layout otherwise."""
    return torch.channels_last if config.channels_last and device.type == "cuda" else torch.preserve_format


def _autocast(config: TrainConfig, device: torch.device):
    precision = config.effective_precision
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# Data.


def _loader(config: TrainConfig, d: Dist, split: str, *, train: bool, world: bool = True, on_device: bool = True):
    """The split's loader for this rank. Training batches leave it as uint8 pixels (``on_device``): normalisation
    and random erasing run on the device (train_one_epoch), so the loader's CPUs decode and crop only, and move
    a quarter of the bytes. ``on_device=False``: normalised and erased in the loader's workers (bench_train's
    comparison)."""
    from pipeline.data.reader import build_loader
    from pipeline.data.transforms import build_transform

    data = config.data
    augment = dict(auto_augment=data.auto_augment, scale=tuple(data.crop_scale), hflip=data.hflip,
                   color_jitter=data.color_jitter, normalize=not on_device,
                   re_prob=0.0 if on_device else data.random_erasing)  # fmt: skip
    transform = build_transform(data.img_size, train=train, in_chans=data.in_chans,
                                **(augment if train else {"crop_pct": eval_crop_pct(config)}))  # fmt: skip
    return build_loader(
        getattr(config.data, split),
        batch_size=config.data.batch_size,
        rank=d.rank if world else 0,
        world_size=d.world_size if world else 1,
        seed=config.optim.seed,
        train=train,
        transform=transform,
        num_workers=config.data.loader_workers,
        shuffle_buffer=config.data.shuffle_buffer,
        skip_corrupt=config.data.skip_corrupt,
        pin_memory=d.device.type == "cuda",
    )


def _real_rows(batches) -> Iterator[tuple[Tensor, Tensor]]:
    """Drop the reader's padding / skipped rows (label -1)."""
    for images, labels in batches:
        keep = labels != IGNORE_LABEL
        if keep.any():
            yield images[keep], labels[keep]


# --------------------------------------------------------------------------------------------------
# Train and evaluate.


@torch.no_grad()
def evaluate(model: nn.Module, loader, d: Dist, config: TrainConfig) -> dict[str, float]:
    """Loss, top-1 and top-5 (%) of the last exit, and per-exit top-1 for cascades, over all ranks."""
    model.eval()
    sums = None  # [loss, samples, top1, top5, exit top-1 ...]
    k = min(5, config.data.num_classes)
    memory_format = _memory_format(config, d.device)
    for images, labels in loader:
        images = images.to(d.device, non_blocking=True, memory_format=memory_format)
        labels = labels.to(d.device, non_blocking=True)
        with _autocast(config, d.device):
            outputs = model(images)
        exits = [o.float() for o in (outputs if isinstance(outputs, (list, tuple)) else [outputs])]
        valid = labels != IGNORE_LABEL
        logits, target = exits[-1][valid], labels[valid]
        if sums is None:
            sums = torch.zeros(4 + (len(exits) if len(exits) > 1 else 0), dtype=torch.float64, device=d.device)
        top = logits.topk(k, dim=-1).indices
        sums[0] += nn.functional.cross_entropy(logits, target, reduction="sum")
        sums[1] += target.numel()
        sums[2] += (top[:, 0] == target).sum()
        sums[3] += (top == target[:, None]).any(dim=-1).sum()
        if len(exits) > 1:
            for i, out in enumerate(exits):
                sums[4 + i] += (out[valid].argmax(dim=-1) == target).sum()
    if sums is None:
        raise RuntimeError("the validation loader yielded no batches")
    sums = d.sum(sums)
    n = max(sums[1].item(), 1.0)
    metrics = {"loss": sums[0].item() / n, "top1": 100 * sums[2].item() / n, "top5": 100 * sums[3].item() / n}
    for i in range(4, len(sums)):
        metrics[f"exit{i - 3}_top1"] = 100 * sums[i].item() / n
    return metrics


@dataclass
class EpochResult:
    loss: float
    images: int
    seconds: float
    step_times: list[float]  # seconds per optimizer step, averaged over each logging window
    cpu_seconds: float  # CPU time of this process (not of DataLoader workers) over the epoch
    skipped: float
    non_finite: bool = False
    mask_density: dict[str, float] | None = None  # Castling: per layer, averaged over the epoch's steps
    data_wait_s: float = 0.0  # of `seconds`, the time this rank waited for the loader's next batch


def _timed(batches, waited: list[float]):
    """The batches of ``batches``; the time each took to arrive is added to ``waited[0]``."""
    iterator = iter(batches)
    while True:
        start = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        waited[0] += time.perf_counter() - start
        yield batch


def _mixup(config: TrainConfig):
    if config.data.mixup <= 0 and config.data.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=config.data.mixup, cutmix_alpha=config.data.cutmix, prob=config.data.mixup_prob,
        switch_prob=config.data.mixup_switch_prob, label_smoothing=config.optim.label_smoothing,
        num_classes=config.data.num_classes,
    )  # fmt: skip


def _train_loss(outputs: Tensor | list[Tensor], target: Tensor, valid: Tensor | None, config: TrainConfig,
                teacher: Tensor | None = None) -> Tensor:  # fmt: skip
    """The classification loss (DVT: over every exit), mixed with distillation from ``teacher``'s logits
    when given; rows with ``valid`` False add nothing.

    The batch keeps its shape (every rank runs the same forward), so dropped rows are masked out of
    the loss rather than out of the batch.
    """
    def loss_of(out, tgt, teacher):
        loss = classification_loss(out, tgt, label_smoothing=config.optim.label_smoothing,
                                   exit_weights=config.method.dvt.exit_weights)  # fmt: skip
        if teacher is None:
            return loss
        from pipeline.train.distill import distillation_loss

        d = config.method.distill
        return (1 - d.weight) * loss + d.weight * distillation_loss(out, teacher, d.kind, d.temperature)

    if valid is None or bool(valid.all()):
        return loss_of(outputs, target, teacher)
    exits = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    if not valid.any():  # keep the graph (DDP waits for every parameter's gradient), add nothing
        return sum(o.sum() for o in exits) * 0.0
    kept = [o[valid] for o in exits]
    return loss_of(kept if isinstance(outputs, (list, tuple)) else kept[0], target[valid],
                   None if teacher is None else teacher[valid])  # fmt: skip


def train_one_epoch(
    state: State, loader, d: Dist, config: TrainConfig, epoch: int, *, castling: bool, logger=None,
    step_checkpoints: StepCheckpointer | None = None, epoch_metrics: _EpochMetrics | None = None,
) -> EpochResult:
    """One pass over this rank's train share; gradient accumulation, clipping, EMA, Castling's regulariser.

    Every ``log_every`` optimizer steps (and at the end) all ranks sum their losses: the progress line
    shows the mean, and a NaN/inf anywhere stops every rank at the same step (no rank is left waiting in
    an allreduce). Every ``checkpoint.every_steps`` steps the ranks sum them too and rank 0 saves a
    mid-epoch checkpoint (``step_checkpoints``). A loader resumed at batch k (``loader.start_batch``)
    continues the epoch there, from the running sums of ``state.epoch_sums``.
    """
    from timm.utils import dispatch_clip_grad

    from pipeline.data.transforms import NormalizeOnDevice
    from pipeline.train.distill import teacher_logits

    opt = config.optim
    state.ddp.train()
    normalize = NormalizeOnDevice(config.data.in_chans, re_prob=config.data.random_erasing, device=d.device)
    mixup = _mixup(config)
    regularise = castling and config.method.castling.mask_reg_strength > 0
    steps = len(loader)
    updates = math.ceil(steps / opt.accum_steps)
    total_updates = updates * opt.epochs
    gates = _CastlingGates(state, config, d, total_updates) if castling else None
    skipped_before = loader.skipped  # the reader counts over its lifetime
    window_loss = torch.zeros(2, dtype=torch.float64, device=d.device)  # [sum of losses, micro-steps]
    epoch_loss = torch.zeros(2, dtype=torch.float64)
    step_times: list[float] = []
    images_seen = 0
    first = getattr(loader, "start_batch", 0)
    if first and state.epoch_sums is not None:  # the epoch's loss counts its batches before the resume too
        epoch_loss += state.epoch_sums
    every = config.checkpoint.every_steps
    start = window_start = time.perf_counter()
    cpu_start = time.process_time()
    window_updates = window_images = 0
    memory_format = _memory_format(config, d.device)

    waited = [0.0]
    window_waited = 0.0
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(d.device)
    state.optimizer.zero_grad(set_to_none=True)
    for i, (images, labels) in enumerate(_timed(loader, waited), start=first):
        group_start = i - i % opt.accum_steps
        group_size = min(opt.accum_steps, steps - group_start)
        last_of_group = i == group_start + group_size - 1
        if state.profiler is not None and i == group_start:
            state.profiler.before_step(state.global_step + 1)
        images = images.to(d.device, non_blocking=True)
        if images.dtype == torch.uint8:  # the train loader's pixels (_loader); a float batch is normalised already
            images = normalize(images)
        images = images.to(memory_format=memory_format)
        labels = labels.to(d.device, non_blocking=True)
        # Train batches hold label -1 only for corrupt samples skipped by the reader (skip_corrupt).
        valid = (labels != IGNORE_LABEL) if config.data.skip_corrupt else None
        target = labels.clamp(min=0) if valid is not None else labels
        if mixup is not None:
            images, target = mixup(images, target)
        sync = last_of_group or not hasattr(state.ddp, "no_sync")
        if gates is not None:
            gates.before_step()
        with contextlib.nullcontext() if sync else state.ddp.no_sync():
            with _autocast(config, d.device):
                taught = None if state.teacher is None else teacher_logits(state.teacher, images, state.teacher_img_size)
                loss = _train_loss(state.ddp(images), target, valid, config, taught)
                if regularise:
                    loss = loss + gates.penalty()
            state.scaler.scale(loss / group_size).backward()
        if gates is not None:
            gates.after_step()
        window_loss[0] += loss.detach().float()
        window_loss[1] += 1
        images_seen += images.shape[0]

        if not last_of_group:
            continue
        if opt.clip_grad is not None:
            state.scaler.unscale_(state.optimizer)
            dispatch_clip_grad(state.model.parameters(), opt.clip_grad, mode=opt.clip_mode)
        state.scaler.step(state.optimizer)
        state.scaler.update()
        state.optimizer.zero_grad(set_to_none=True)
        state.global_step += 1
        window_updates += 1
        state.scheduler.step_update(state.global_step)
        if state.ema is not None:
            state.ema.update(state.model, step=state.global_step)
        if state.profiler is not None and state.profiler.after_step(state.global_step) is not None and d.rank == 0:
            _progress(f"profiled optimizer steps {state.profiler.first_step}-{state.global_step}: the trace of each "
                      "rank is in the MLflow run's artifacts, profile/")  # fmt: skip

        if every and state.global_step % every == 0 and i != steps - 1:  # on every rank: sums and RNG are collectives
            so_far = epoch_loss + d.sum(window_loss)  # the window itself goes on to its progress line
            if not math.isfinite(so_far[0].item()):
                return EpochResult(so_far[0].item(), images_seen * d.world_size, time.perf_counter() - start,
                                   step_times, time.process_time() - cpu_start, 0.0, non_finite=True)  # fmt: skip
            within = {"batches_done": i + 1, "rng": _rng_states(d), "epoch_sums": so_far}
            if step_checkpoints is not None:
                step_checkpoints.save(state.to_dict(config, {}, logger.run_id if logger else None, within_epoch=within))

        if state.global_step % config.log_every == 0 or i == steps - 1:
            summed = d.sum(window_loss)  # the only per-window collective
            now = time.perf_counter()
            mean_loss = summed[0].item() / max(summed[1].item(), 1)
            if not math.isfinite(mean_loss):
                return EpochResult(mean_loss, images_seen * d.world_size, now - start, step_times,
                                   time.process_time() - cpu_start, 0.0, non_finite=True)  # fmt: skip
            window_s = now - window_start
            data_wait = (waited[0] - window_waited) / window_updates
            step_times.append(window_s / window_updates)
            timings = _step_timings(state, d, window_s / window_updates, data_wait,
                                    (images_seen - window_images) / window_s)  # fmt: skip
            epoch_loss += summed
            window_loss.zero_()
            window_start, window_updates, window_waited, window_images = now, 0, waited[0], images_seen
            if d.rank == 0 and i != steps - 1:  # the epoch's own line follows its last step
                left = total_updates - state.global_step
                rate = images_seen * d.world_size / (now - start)
                lr = _lr(state.optimizer)
                _progress(
                    f"epoch {epoch + 1}/{opt.epochs} step {i // opt.accum_steps + 1}/{updates} "
                    f"loss {mean_loss:.4f} lr {lr:.2e} {rate:.0f} img/s eta {_format_eta(left * float(np.mean(step_times)))}"
                )
                if logger is not None:
                    logger.metrics({"train/loss_step": mean_loss, "train/lr_step": lr, **timings}, step=state.global_step)
                if epoch_metrics is not None:
                    epoch_metrics.log_committed(wait_s=0.001)  # a poll: a longer wait would stall the step
    seconds = time.perf_counter() - start
    skipped = d.sum(torch.tensor([float(loader.skipped - skipped_before)]))[0].item()
    loss = epoch_loss[0].item() / max(epoch_loss[1].item(), 1)
    return EpochResult(loss, images_seen * d.world_size, seconds, step_times, time.process_time() - cpu_start, skipped,
                       mask_density=None if gates is None else gates.epoch_densities(), data_wait_s=waited[0])  # fmt: skip


def _step_timings(state: State, d: Dist, step_s: float, data_wait_s: float, images_per_s: float) -> dict[str, float]:
    """A logging window's per-step figures on this rank (rank 0's go to MLflow, at the window's last step)."""
    timings = {"train/step_time_s_step": step_s, "train/data_wait_s_step": data_wait_s,
               "train/compute_s_step": step_s - data_wait_s, **_throughput(state, images_per_s, "_step")}  # fmt: skip
    if d.device.type == "cuda":
        timings["train/peak_memory_gib_step"] = torch.cuda.max_memory_allocated(d.device) / 2**30
    return timings


def _throughput(state: State, images_per_s: float, suffix: str = "") -> dict[str, float]:
    """This worker's achieved TFLOP/s (training-form MACs per image x 2 x 3 x its images/s) and, where the
    device's bf16 peak is known, MFU."""
    from pipeline.train.telemetry import TRAINING_FLOPS_PER_MAC

    if not state.train_macs:
        return {}
    tflops = state.train_macs * TRAINING_FLOPS_PER_MAC * images_per_s / 1e12
    figures = {f"train/tflops_per_worker{suffix}": tflops}
    if state.peak_tflops:
        figures[f"train/mfu{suffix}"] = tflops / state.peak_tflops
    return figures


class _CastlingGates:
    """Castling's branch during one epoch: the gate schedule, the gate penalty and the per-layer mask density.

    Before each step the schedule ``s`` is set on every gate. Once it is 0 the branch adds exactly nothing:
    the rest of training trains the deployed model's function. The branch stays in the graph (its gates
    get zero gradients), as DDP wants a gradient for every parameter at every step. Densities are summed
    on the device each step (no sync) and averaged over the epoch and the ranks at its end.
    """

    def __init__(self, state: State, config: TrainConfig, d: Dist, total_updates: int):
        from pipeline.models.layers.castling import castling_modules

        self.state, self.config, self.d, self.total_updates = state, config, d, total_updates
        self.layers = castling_modules(state.model)
        self.density_sum = torch.zeros(len(self.layers), device=d.device)
        self.no_density = torch.zeros((), device=d.device)  # a layer that recorded none (inference form)
        self.steps = 0

    def progress(self) -> float:
        return self.state.global_step / max(self.total_updates, 1)

    def before_step(self) -> None:
        from pipeline.models.layers.castling import branch_scale_at, set_branch_scale

        set_branch_scale(self.state.model, branch_scale_at(self.progress(), self.config.method.castling.branch_off_at))

    def penalty(self) -> Tensor:
        from pipeline.models.layers.castling import mask_reg_weight, mask_regularization

        castling = self.config.method.castling
        weight = mask_reg_weight(castling.mask_reg_strength, castling.mask_reg_schedule, self.progress())
        return weight * mask_regularization(self.state.model)

    def after_step(self) -> None:
        recorded = [m.last_mask_density for _, m in self.layers]
        self.density_sum += torch.stack([self.no_density if r is None else r for r in recorded])
        self.steps += 1

    def epoch_densities(self) -> dict[str, float]:
        summed = self.d.sum(torch.cat([self.density_sum, torch.tensor([float(self.steps)], device=self.d.device)]))
        means = (summed[:-1] / summed[-1].clamp(min=1)).tolist()
        return {name: value for (name, _), value in zip(self.layers, means)}


# --------------------------------------------------------------------------------------------------
# The loop Ray Train runs.


def _compiled(module: nn.Module, config: TrainConfig) -> nn.Module:
    """``module`` under ``torch.compile`` when the config asks for it (parameters shared), else ``module``."""
    if not config.compile:
        return module
    return torch.compile(module, backend=config.compile_backend, mode=config.compile_mode)


# torch.optim classes with a fused (single multi-tensor kernel) CUDA step that timm hands kwargs to.
_FUSED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW)


def _optimizer(config: TrainConfig, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """timm's optimizer for the config; AdamW/Adam take their fused step on CUDA unless opt_kwargs choose."""
    from timm.optim import create_optimizer_v2, get_optimizer_class

    opt = config.optim
    kwargs = dict(opt.opt_kwargs)
    if device.type == "cuda" and "fused" not in kwargs and not kwargs.get("foreach"):
        name = opt.optimizer.lower().split("_")[-1]  # as timm reads it: "lookahead_adamw" is AdamW inside
        try:
            fusable = get_optimizer_class(name, bind_defaults=False) in _FUSED_OPTIMIZERS
        except ValueError:  # an unknown name: create_optimizer_v2 says so below
            fusable = False
        if fusable:
            kwargs["fused"] = True
    return create_optimizer_v2(model, opt=opt.optimizer, lr=opt.lr, weight_decay=opt.weight_decay,
                               momentum=opt.momentum, layer_decay=opt.layer_decay, **kwargs)  # fmt: skip


def _lr(optimizer: torch.optim.Optimizer) -> float:
    """The base learning rate: the largest group's (with layer decay, the head's)."""
    return max(group["lr"] for group in optimizer.param_groups)


def _setup(config: TrainConfig, d: Dist, initial_weights: dict[str, Tensor] | None = None) -> State:
    """Model (from ``initial_weights`` when given: ``model.init_from``, fitted on the driver), DDP, compile,
    optimiser, EMA; the scheduler comes once the loader's length is known."""
    from timm.utils import ModelEmaV3

    torch.manual_seed(config.optim.seed)  # identical initial weights on every rank
    model = build_model(config)
    if initial_weights is not None:  # before the EMA copies the weights; a resumed run loads its own after
        model.load_state_dict(initial_weights)
    model = model.to(d.device)
    if _memory_format(config, d.device) == torch.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ddp = model
    if d.active:
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
            find_unused_parameters=config.scaling.find_unused_parameters,
            gradient_as_bucket_view=True,  # gradients live in the all-reduce buckets: no copy, less memory
        )  # fmt: skip
    # Compiled after DDP wraps it, as PyTorch advises: DDPOptimizer then splits the graph at DDP's bucket
    # boundaries, so each bucket's all-reduce overlaps the rest of the backward.
    ddp = _compiled(ddp, config)
    opt = config.optim
    ema = ModelEmaV3(model, decay=opt.ema_decay) if opt.ema else None
    return State(model=model, ddp=ddp, optimizer=_optimizer(config, model, d.device), scheduler=None,
                 scaler=torch.amp.GradScaler(d.device.type, enabled=config.effective_precision == "fp16"),
                 ema=ema, eval_model=_compiled(model, config),
                 eval_ema=None if ema is None else _compiled(ema.module, config))  # fmt: skip


def _scheduler(config: TrainConfig, optimizer, updates_per_epoch: int):
    from timm.scheduler import create_scheduler_v2

    opt = config.optim
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=opt.scheduler, num_epochs=opt.epochs, warmup_epochs=opt.warmup_epochs,
        warmup_lr=opt.warmup_lr, min_lr=opt.min_lr, step_on_epochs=False, updates_per_epoch=updates_per_epoch,
    )  # fmt: skip
    return scheduler


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's entry point. ``loop_config``: ``{"config": TrainConfig.to_dict(), "mlflow_run_id": str | None}``.

    Returns (rank 0's value reaches the driver as ``Result.return_value``) ``{"status": "finished" |
    "non_finite_loss", ...}``.
    """
    import ray.train
    import ray.train.torch

    _quiet_libraries()
    config = TrainConfig.from_dict(loop_config["config"])
    run_id = loop_config.get("mlflow_run_id")
    context = ray.train.get_context()
    device = ray.train.torch.get_device() if config.scaling.use_gpu else torch.device("cpu")
    d = Dist(context.get_world_rank(), context.get_world_size(), device)
    if device.type == "cuda":  # TF32 tensor cores for what autocast leaves in fp32 (and for precision: fp32)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:  # as many threads as CPUs reserved: oversubscribed OpenMP threads spin and stall everyone
        torch.set_num_threads(max(1, int(config.scaling.cpus_per_worker)))

    nodes = _worker_nodes(d)
    state = _setup(config, d, _from_driver(loop_config.get("initial_weights")))
    teacher = _from_driver(loop_config.get("teacher"))
    if teacher is not None:
        from pipeline.train.distill import build_teacher

        state.teacher, state.teacher_img_size = build_teacher(teacher, device), teacher.img_size
    if d.rank == 0:
        state.train_macs, state.peak_tflops = _compute_budget(config, device)
    if config.profile.steps is not None:
        from pipeline.train.telemetry import StepProfiler

        state.profiler = StepProfiler(tuple(config.profile.steps), d.rank, device, config.mlflow.tracking_uri, run_id)
    train_loader = _loader(config, d, "train", train=True)
    val_loader = _loader(config, d, "val", train=False)
    state.updates_per_epoch = math.ceil(len(train_loader) / config.optim.accum_steps)
    state.scheduler = _scheduler(config, state.optimizer, state.updates_per_epoch)
    checkpoint = ray.train.get_checkpoint()
    saved = None
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            saved = load_checkpoint(directory, map_location=device)
    saved = _newer_step_checkpoint(config, state, saved, d) or saved
    if saved is not None:
        planned = saved["config"]["optim"]["epochs"]
        state.load(saved, model_name=config.model.name, replan=planned != config.optim.epochs)
        if planned != config.optim.epochs and d.rank == 0:
            _progress(f"optim.epochs is {config.optim.epochs}, the checkpoint's run planned {planned}: the learning-"
                      f"rate schedule is re-planned over {config.optim.epochs} epochs from step {state.global_step} "
                      "(warm-up not repeated)")  # fmt: skip
    # Dropout and mixup differ by rank. Python's random too: timm's random crops draw from it, in this process
    # when there are no loader workers (DataLoader seeds its workers' own).
    run_seed = config.optim.seed + 7919 * d.rank + state.epochs_done
    torch.manual_seed(run_seed)
    np.random.seed(run_seed % 2**32)
    random.seed(run_seed)
    if state.rng is not None and len(state.rng) == d.world_size:  # mid-epoch: each rank where it was
        _set_rng_state(state.rng[d.rank])
    castling = has_castling(state.model)
    step_checkpoints = StepCheckpointer(config.run_dir) if config.checkpoint.every_steps and d.rank == 0 else None

    logger = None
    if d.rank == 0 and run_id is not None:
        from pipeline.tracking import RunLogger

        logger = RunLogger(config.mlflow.tracking_uri, run_id, outage_wait_s=config.mlflow.outage_wait_s)
    system = contextlib.nullcontext()
    if config.mlflow.system_metrics and run_id is not None:  # each node's, named by node, from its first rank
        from pipeline.train.telemetry import NodeSystemMetrics

        system = NodeSystemMetrics(config.mlflow.tracking_uri, run_id, nodes[d.rank].split("/")[0],
                                   first_on_node=context.get_local_rank() == 0,
                                   interval_s=config.mlflow.system_metrics_interval_s)  # fmt: skip
    with logger if logger is not None else contextlib.nullcontext(), system:
        placement = ", ".join(f"rank {rank} {node}" for rank, node in enumerate(nodes))
        if logger is not None:
            logger.tags({"vitpipe.worker_nodes": placement})
            if saved is not None:
                logger.tags({"vitpipe.resumed_from_epoch": str(state.epochs_done),
                             "vitpipe.resumed_from_step": str(state.global_step)})  # fmt: skip
        if d.rank == 0:
            where = "starting"
            if saved is not None:
                where = f"resuming after epoch {state.epochs_done}" + (
                    f", in epoch {state.epochs_done + 1} at batch {state.batches_done} (step {state.global_step})"
                    if state.batches_done else "")  # fmt: skip
            compiled = f", torch.compile ({config.compile_backend}): the first steps compile" if config.compile else ""
            _progress(f"{where}: {config.model.name}, {d.world_size} worker(s) on {device.type} "
                      f"({len(set(nodes))} node(s): {placement}), "
                      f"{len(train_loader)} steps/epoch of {config.data.batch_size} per worker{compiled}")  # fmt: skip
        epoch_metrics = _EpochMetrics(logger)
        result = _train_epochs(state, config, d, train_loader, val_loader, logger, castling, step_checkpoints,
                               epoch_metrics)  # fmt: skip
        if state.profiler is not None and state.profiler.close() is not None and d.rank == 0:
            _progress(f"the run ended inside profile.steps: profiled optimizer steps {state.profiler.first_step}-"
                      f"{state.global_step} (the MLflow run's artifacts, profile/)")  # fmt: skip
        if d.rank == 0:
            epoch_metrics.log_committed(wait_s=None)
        result["worker_nodes"] = nodes
        if castling and result["status"] == "finished":
            _check_branches_closed(state.model, logger)
        if result["status"] != "finished":
            if logger is not None:
                logger.finish("FAILED", result["status"])
            return result
        if d.rank == 0:
            result.update(_finish(state, config, d, logger, castling))
        if logger is not None:
            logger.finish("FINISHED", "finished")
    return result


def _compute_budget(config: TrainConfig, device: torch.device) -> tuple[int | None, float | None]:
    """(training-form MACs per image, the device's dense bf16 peak TFLOP/s or None) for TFLOP/s and MFU.

    The peak is only used under bf16/fp16 autocast on a GPU whose name is in the table; fp32 has no MFU.
    """
    from pipeline.train.build import model_facts
    from pipeline.train.telemetry import peak_bf16_tflops

    macs = model_facts(config, quiet=True).get("macs_train")
    peak = None
    if device.type == "cuda" and config.effective_precision != "fp32":
        match = peak_bf16_tflops(torch.cuda.get_device_name(device))
        peak = match[1] if match else None
    return macs, peak


def _from_driver(value: Any) -> Any:
    """A value the driver sent through Ray's object store (a ref), or as it is (local mode, no Ray)."""
    import ray

    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def _worker_nodes(d: Dist) -> list[str]:
    """Every rank's Ray node as ``IP/node-id-prefix``, in rank order (a collective: every rank calls it)."""
    import ray

    if ray.is_initialized():
        here = f"{ray.util.get_node_ip_address()}/{ray.get_runtime_context().get_node_id()[:8]}"
    else:  # Ray Train's local mode (scaling.num_workers: 0) runs the loop in the driver, without Ray
        import socket

        here = socket.gethostname()
    if not d.active:
        return [here]
    nodes: list[str] = [""] * d.world_size
    dist.all_gather_object(nodes, here)
    return nodes


def _newer_step_checkpoint(config: TrainConfig, state: State, saved: dict | None, d: Dist) -> dict | None:
    """The run directory's newest mid-epoch checkpoint when it is further on than ``saved`` (Ray's epoch-end
    one), and its position counts in this run's steps (same steps per epoch); else None."""
    if not config.checkpoint.every_steps:
        return None
    from pipeline.train.checkpoint import latest_step_checkpoint, local_copy

    found = latest_step_checkpoint(config.run_dir)
    if found is None or found[1]["global_step"] <= (saved["global_step"] if saved is not None else 0):
        return None
    if found[1].get("updates_per_epoch") != state.updates_per_epoch:
        if d.rank == 0:
            _progress(f"not resuming from {found[0]}: it counts {found[1].get('updates_per_epoch')} steps per epoch, "
                      f"this run {state.updates_per_epoch} (another world or batch size)")  # fmt: skip
        return None
    with local_copy(found[0]) as directory:
        return load_checkpoint(directory, map_location=d.device)


def _rng_states(d: Dist) -> list[dict[str, Any]]:
    """Every rank's RNG states (torch, CUDA, numpy, Python), gathered in rank order (a collective)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    version, python_state, python_gauss = random.getstate()
    mine = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position,
            has_gauss, gauss], "python": [version, list(python_state), python_gauss]}  # fmt: skip
    if d.device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(d.device)
    if not d.active:
        return [mine]
    states: list[Any] = [None] * d.world_size
    dist.all_gather_object(states, mine)
    return states


def _set_rng_state(saved: dict[str, Any]) -> None:
    torch.set_rng_state(saved["torch"])
    kind, keys, position, has_gauss, gauss = saved["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    version, python_state, python_gauss = saved["python"]
    random.setstate((version, tuple(python_state), python_gauss))
    if "cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["cuda"], torch.cuda.current_device())


def _check_branches_closed(model: nn.Module, logger) -> None:
    """Warn (and tag the MLflow run) when a Castling branch is still open after training: the deployed
    inference form then differs from the trained model."""
    import warnings

    from pipeline.models.layers.castling import describe_open_branches

    listed = describe_open_branches(model)
    if not listed:
        return
    warnings.warn(f"Castling: masks not empty after training in {listed}; set method.castling.branch_off_at "
                  "(or a larger mask_reg_strength)", stacklevel=2)  # fmt: skip
    if logger is not None:
        logger.tags({"vitpipe.castling_open_masks": listed[:5000]})


def _train_epochs(state: State, config: TrainConfig, d: Dist, train_loader, val_loader, logger, castling,
                  step_checkpoints: StepCheckpointer | None, epoch_metrics: _EpochMetrics) -> dict:  # fmt: skip
    for epoch in range(state.epochs_done, config.optim.epochs):
        train_loader.set_epoch(epoch)
        if state.batches_done:  # resumed from a mid-epoch checkpoint: the rest of this epoch's plan
            train_loader.set_start(state.batches_done)
        epoch_result = train_one_epoch(state, train_loader, d, config, epoch, castling=castling, logger=logger,
                                       step_checkpoints=step_checkpoints, epoch_metrics=epoch_metrics)  # fmt: skip
        state.batches_done, state.epoch_sums = 0, None
        if epoch_result.non_finite:
            message = (f"non_finite_loss: the training loss became {epoch_result.loss} in epoch {epoch + 1} "
                       f"by step {state.global_step}")  # fmt: skip
            if d.rank == 0:
                _progress(f"stopping: {message}")
            return {"status": "non_finite_loss", "message": message, "epoch": epoch + 1, "step": state.global_step}
        metrics = {
            "train/loss": epoch_result.loss,
            "train/lr": _lr(state.optimizer),
            "train/images_per_s": epoch_result.images / epoch_result.seconds,
            "train/epoch_time_s": epoch_result.seconds,
            "train/step_time_s": float(np.median(epoch_result.step_times)) if epoch_result.step_times else math.nan,
            "train/step_cpu_s": epoch_result.cpu_seconds / max(state.updates_per_epoch, 1),
            # Rank 0's wait for its loader: the share of the epoch the data plane cost (0: it kept up).
            "train/data_wait_s": epoch_result.data_wait_s / max(state.updates_per_epoch, 1),
            "train/data_wait_share": epoch_result.data_wait_s / epoch_result.seconds,
            **_throughput(state, epoch_result.images / d.world_size / epoch_result.seconds),
        }
        metrics["train/compute_s"] = epoch_result.seconds / max(state.updates_per_epoch, 1) - metrics["train/data_wait_s"]
        if d.device.type == "cuda":
            metrics["train/peak_memory_gib"] = torch.cuda.max_memory_allocated(d.device) / 2**30
        if config.data.skip_corrupt:
            metrics["data/skipped_corrupt"] = epoch_result.skipped
        val_start = time.perf_counter()
        metrics.update(_validate(state, val_loader, d, config, castling))
        metrics["val/time_s"] = time.perf_counter() - val_start
        if castling:
            from pipeline.models.layers.castling import branch_scale_at, mask_reg_weight

            densities = epoch_result.mask_density
            metrics.update({f"castling/mask_density/{name}": v for name, v in densities.items()})
            if densities:  # none when the model trains without the branch
                metrics["castling/mask_density_mean"] = float(np.mean(list(densities.values())))
            progress = (epoch + 1) / config.optim.epochs
            castling_config = config.method.castling
            metrics["castling/mask_reg_weight"] = mask_reg_weight(
                castling_config.mask_reg_strength, castling_config.mask_reg_schedule, progress
            )  # fmt: skip
            metrics["castling/branch_scale"] = branch_scale_at(progress, castling_config.branch_off_at)
        state.epochs_done = epoch + 1
        _report(state, config, d, metrics, epoch_metrics, logger)
        if step_checkpoints is not None:  # the epoch-end checkpoint supersedes them
            step_checkpoints.prune(before_step=state.global_step)
        if d.rank == 0:
            _progress(f"epoch {epoch + 1}/{config.optim.epochs} done in {epoch_result.seconds:.1f}s "
                      f"({100 * metrics['train/data_wait_share']:.0f}% waiting for data): train loss "
                      f"{metrics['train/loss']:.4f}, val loss {metrics['val/loss']:.4f}, "
                      f"top-1 {metrics['val/top1']:.2f}%, top-5 {metrics['val/top5']:.2f}%")  # fmt: skip
    return {"status": "finished", "epochs_done": state.epochs_done, "global_step": state.global_step}


def _validate(state: State, loader, d: Dist, config: TrainConfig, castling: bool) -> dict[str, float]:
    """``val/*`` (and ``val_ema/*``) of the deployed model: Castling's inference form, its branch dropped.

    While a Castling model's branch is still open (schedule above 0), the training form is reported too
    (``val_train_form/*``).
    """
    from pipeline.models.layers.castling import castling_modules, inference_form

    metrics = {}
    with inference_form(state.model) if castling else contextlib.nullcontext():
        metrics.update({f"val/{k}": v for k, v in evaluate(state.evaluated(), loader, d, config).items()})
    if state.ema is not None:
        with inference_form(state.ema.module) if castling else contextlib.nullcontext():
            metrics.update({f"val_ema/{k}": v for k, v in evaluate(state.evaluated(ema=True), loader, d,
                                                                   config).items()})  # fmt: skip
    if castling and any(m.sparse_branch and float(m.branch_scale) > 0 for _, m in castling_modules(state.model)):
        training_form = evaluate(state.evaluated(), loader, d, config)
        metrics.update({f"val_train_form/{k}": training_form[k] for k in ("loss", "top1")})
    return metrics


class _EpochMetrics:
    """Rank 0's epoch metrics, held back until Ray has committed that epoch's checkpoint.

    Checkpoints upload in the background, so an epoch's report returns before its checkpoint counts: a
    failure in between restarts the group from the epoch before, which redoes (and would log again) this
    one. Held metrics are logged when every report so far is committed: waited for before the next report
    and at the end; at the loop's log windows, a poll (which with Ray 2.60 logs them at once: see
    ``log_committed``).
    """

    def __init__(self, logger):
        self.logger, self.held = logger, []

    def hold(self, metrics: dict[str, float], step: int) -> None:
        if self.logger is not None:
            self.held.append((metrics, step))

    def log_committed(self, wait_s: float | None) -> None:
        """Log the held metrics if every report so far is committed within ``wait_s`` (None: wait for it)."""
        if not self.held:
            return
        import ray.train
        from ray.train import CheckpointConsistencyMode

        # Ray 2.60 answers a wait that times out with the checkpoints committed so far, without an error, so
        # a poll logs what it holds at once. Waiting here for the commit instead loses the epoch's metrics when
        # the process is killed before it comes: the restarted group resumes past that epoch and never logs
        # it (tests/test_multinode.py). Logging only committed epochs needs a restarted group to log the
        # committed epochs its run lacks first.
        try:
            ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED,
                                                   timeout_s=wait_s)  # fmt: skip
        except Exception:  # noqa: BLE001 - not committed within wait_s (older Rays raise their timeout as a task error)
            if wait_s is None:
                raise
            return
        for metrics, step in self.held:
            self.logger.metrics(metrics, step=step)
        self.held.clear()
        self.logger.sent(within_s=10.0)  # in MLflow before training goes on, unless it is down


def _report(state: State, config: TrainConfig, d: Dist, metrics: dict[str, float], epoch_metrics: _EpochMetrics,
            logger) -> None:  # fmt: skip
    """Checkpoint from rank 0, ``ray.train.report`` on every rank (a barrier), MLflow from rank 0.

    The checkpoint is written locally and uploaded to ``storage_path`` by Ray in the background (ASYNC: the
    next epoch does not wait for S3; Ray deletes the local copy after the upload); the epoch's metrics go
    to MLflow once it is committed (:class:`_EpochMetrics`). ``_best_checkpoint`` waits for uploads in
    flight, so the best checkpoint logged to MLflow is always a complete one.
    """
    import ray.train
    from ray.train import CheckpointUploadMode

    reported = {"epoch": state.epochs_done, **metrics}
    checkpoint = None
    if d.rank == 0:
        directory = tempfile.mkdtemp(prefix="vitpipe-epoch-")
        save_checkpoint(directory, state.to_dict(config, reported, logger.run_id if logger else None))
        checkpoint = ray.train.Checkpoint.from_directory(directory)
        epoch_metrics.log_committed(wait_s=None)  # the previous epoch's, committed by now
    ray.train.report(reported, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir_name(state.epochs_done),
                     checkpoint_upload_mode=CheckpointUploadMode.ASYNC)  # fmt: skip
    if checkpoint is not None and config.scaling.num_workers == 0:  # local mode keeps no checkpoint
        shutil.rmtree(checkpoint.path, ignore_errors=True)
    epoch_metrics.hold(metrics, step=state.epochs_done)


# --------------------------------------------------------------------------------------------------
# The end of a run, on rank 0 alone (no collectives: the other ranks have returned).


def _best_checkpoint(config: TrainConfig):
    """The best reported checkpoint by ``checkpoint.metric`` (None in local mode, where none is kept)."""
    import ray.train

    reported = [r for r in ray.train.get_all_reported_checkpoints() if config.checkpoint.metric in r.metrics]
    if not reported:
        return None
    sign = 1 if config.checkpoint.mode == "max" else -1

    def score(r) -> float:
        value = r.metrics[config.checkpoint.metric]
        return sign * value if math.isfinite(value) else -math.inf

    best = max(reported, key=lambda r: (score(r), r.metrics.get("epoch", 0)))
    return best.checkpoint, best.metrics


def _finish(state: State, config: TrainConfig, d: Dist, logger, castling: bool) -> dict[str, Any]:
    use_ema = config.checkpoint.metric.startswith("val_ema/")
    best = _best_checkpoint(config)
    result: dict[str, Any] = {"mlflow_run_id": logger.run_id if logger else None}
    final = build_model(config)
    with tempfile.TemporaryDirectory() as scratch:
        if best is not None:
            checkpoint, metrics = best
            with checkpoint.as_directory() as directory:
                saved = load_checkpoint(directory)
                final.load_state_dict(saved["ema"] if use_ema else saved["model"])
                if logger is not None:
                    logger.artifact(Path(directory, "state.pt"), "checkpoints/best")
                    logger.artifact(Path(directory, "meta.json"), "checkpoints/best")
            result.update(best_checkpoint=checkpoint.path, best_metric=metrics[config.checkpoint.metric],
                          best_epoch=metrics.get("epoch"))  # fmt: skip
        else:  # local mode keeps no checkpoints: the final weights are the result
            final.load_state_dict((state.ema.module if use_ema else state.model).state_dict())
        if logger is None:
            return result

        logger.curves(
            {"loss": ["train/loss", "val/loss"] + (["val_ema/loss"] if state.ema else []),
             "top-1 (%)": ["val/top1"] + (["val_ema/top1"] if state.ema else []),
             "learning rate": ["train/lr"]},
            "curves.png",
        )  # fmt: skip
        if castling:
            from pipeline.models.layers.castling import castling_modules

            names = [f"castling/mask_density/{name}" for name, _ in castling_modules(final)]
            logger.curves({"Castling mask density (share of the gated mask on, epoch mean)": names},
                          "castling_mask_density.png")

        alone = Dist(0, 1, d.device)
        # Two images: with one, torch.export would fix the batch dimension of the exported model to 1.
        example_images = next(_real_rows(_loader(config, Dist(0, 1, torch.device("cpu")), "val", train=False,
                                                  world=False)))[0][:2]  # fmt: skip
        to_inference_form(final).eval()  # the deployed form is what DVT calibrates, costs and evaluates
        final.to(d.device)
        if config.data.test is not None:  # the result's own score, on images that chose nothing
            test_metrics = evaluate(final, _loader(config, alone, "test", train=False, world=False), alone, config)
            logger.metrics({f"test/{k}": v for k, v in test_metrics.items()}, step=state.epochs_done)
            result["test_top1"] = test_metrics["top1"]
        if hasattr(final, "exit_macs"):  # a DVT cascade: calibrate exit thresholds on val, sweep the budget
            from pipeline.eval.dvt_budget import calibrate_and_sweep

            val = _real_rows(_loader(config, alone, "val", train=False, world=False))
            test = None
            if config.data.test is not None:
                test = _real_rows(_loader(config, alone, "test", train=False, world=False))
            report = calibrate_and_sweep(final, val, test, device=d.device)
            report.to_json(Path(scratch, "dvt_budget.json"))
            report.plot(Path(scratch, "dvt_budget.png"))
            logger.artifact(Path(scratch, "dvt_budget.json"), "dvt")
            logger.artifact(Path(scratch, "dvt_budget.png"), "dvt")
        final.cpu()
        if config.mlflow.log_model:
            result["model_format"] = logger.model(final, example_images.numpy(), serialization=config.mlflow.model_format)
    return result
