"""The papers' speed claims on one GPU: bf16 autocast, torch.compile on and off, batches that fill the device.

    python -m benchmarks.bench_gpu                  # every group below, on the first CUDA device
    python -m benchmarks.bench_gpu --quick          # 3 rounds of 3 steps; Castling-T at 196 and 3136 tokens only
    python -m benchmarks.bench_gpu --only castling  # some groups: 224, castling, dvt
    python -m benchmarks.bench_gpu --no-compile     # eager only (no inductor compile in the warm-up)
    python -m benchmarks.bench_gpu --json out.json  # also every row, the settings and the verdicts as JSON
    python -m benchmarks.bench_gpu --smoke          # the same code path on any device (CPU): tiny models, 2 rounds

Groups:
    224       vit_lsla_tiny, vit_lsla_swin_t, hier_msa_swin_t against timm's swin_tiny_patch4_window7_224 at
              224x224 (102 classes): training and inference images/s, peak memory, ratio against Swin-T next to
              the MAC ratio
    castling  castling_deit_tiny / castling_deit_small in inference form (``switch_to_inference()``) against
              timm's deit_tiny_patch16_224 / deit_small_patch16_224 at 224, 448 and 896 (196, 784 and 3136
              tokens; every model built at that size): inference images/s and speed-up against the MAC ratio;
              training (Castling in its training form, with the masked softmax branch and the mask
              regulariser) at 224, where training happens
    dvt       dvt_t2t_vit_12 early-exit inference (``forward_dynamic``) at a stated budget against the 14x14
              exit alone (``t2t_vit_12``): images/s. Weights are random, so confidences mean nothing: the
              thresholds are calibrated on the timed batch itself (``pipeline.eval.dvt_budget``'s rule: knob
              ``q`` gives the shares ``q^k / sum q^j``, 57% / 29% / 14% at the default q = 0.5), and the split
              they actually gave is printed with the row

Every entry is one model and one compile setting (eager, or ``torch.compile`` with the default inductor
backend), sharing weights between the two. A step is one batch: training is forward and loss under bf16
autocast, backward, a fused AdamW step; inference is a forward under ``torch.inference_mode`` and bf16
autocast, the model in eval mode. Inputs are random tensors already on the device: data loading is
``bench_train``'s business. TF32 is on for what autocast leaves in float32.

Timing: each entry first runs warm-up steps (compilation happens there; their wall time is reported as
``warm-up s``), then the group is timed in interleaved rounds: one round runs ``--steps`` steps of every
entry in turn, each step between two CUDA events, so that a drift of the clock or of the GPU's temperature
hits all entries alike. An entry's images/s is the median over rounds. Ratios (``x``) are the median over
rounds of the reference's time per image over the entry's in the same round, with the interquartile range
of those per-round ratios (``IQR``), as ``bench_lsla`` computes them; each entry is compared with the
reference of the same compile setting. ``compile x`` is the compiled entry's speed-up over its eager twin,
paired the same way.

Achieved TFLOP/s: MACs per image from the project's counter (``count_macs``, inference form; the DVT row
uses the mean over its batch of the exits each image ran) x 2 FLOPs x 3 for training (forward + twice the
forward for backward) or 1 for inference x images/s. MFU is that over the device's dense bf16 peak, looked
up from ``torch.cuda.get_device_name()`` in ``PEAK_BF16_TFLOPS`` (printed with every run); an unknown device
gets ``n/a``.

Peak memory: ``torch.cuda.max_memory_allocated`` over the entry's steps, reset before them, less what was
allocated before them, plus the entry's own resident tensors (weights and buffers; for training the
optimizer state): what the entry would peak at alone on the device.

The targets of the issue are checked at the end on the compiled rows (eager ones with ``--no-compile``):
``met`` / ``MISS`` / ``n/a`` (row not run, or MFU of an unknown device). Without a CUDA device the script
says so and exits 0, unless ``--smoke`` asks for the CPU run the test suite makes so that this file cannot
rot (its figures mean nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import itertools
import json
import math
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

import pipeline.models  # noqa: F401  (registers the factories)
from benchmarks.bench_lsla import paired_ratio
from pipeline.eval.dvt_budget import collect_exit_outputs, exit_shares, find_thresholds
from pipeline.models.counting import count_macs
from pipeline.models.layers.castling import mask_regularization
from pipeline.train.telemetry import PEAK_BF16_TFLOPS, peak_bf16_tflops

KINDS = ("train", "infer")
TRAINING_FLOPS_PER_FORWARD = 3  # forward + backward (about twice the forward's FLOPs)
MASK_REG_WEIGHT = 1e-2  # as bench_castling: the regulariser's cost is in the training form's step

SWIN_T = "swin_tiny_patch4_window7_224"
CASTLING_PAIRS = {"castling_deit_tiny": "deit_tiny_patch16_224", "castling_deit_small": "deit_small_patch16_224"}
CASTLING_SIZES = (224, 448, 896)  # 196, 784 and 3136 tokens of 16x16 patches
TRAIN_SIZE = 224

# Images per step at 224x224 (196 tokens for the DeiTs), per group and kind; Castling's shrink with the
# token count (``scaled_batch``) so that a step does about the same work at every size.
DEFAULT_BATCH = {
    "224": {"train": 128, "infer": 256},
    "castling": {"train": 256, "infer": 1024},
    "dvt": {"infer": 512},
}
MIN_BATCH = 8

# --smoke: the same factories, shrunk so that a CPU runs every group in seconds.
SMOKE_KWARGS = {
    "hierarchical": dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8)),
    "deit": dict(depth=1),
    "t2t": dict(depth=1, embed_dim=64, num_heads=2, t2t_token_dim=16),
}

TARGETS = (  # (what, group, row, kind, measured field, threshold)
    ("vit_lsla_tiny training images/s >= 1.2x Swin-T (MAC ratio 1.29x)", "224", "vit_lsla_tiny", "train", "ratio", 1.2),
    ("vit_lsla_swin_t training images/s >= 1.1x Swin-T (MAC ratio 1.14x)", "224", "vit_lsla_swin_t", "train", "ratio",
     1.1),
    ("castling_deit_tiny inference >= DeiT-T at 196 tokens", "castling", "castling_deit_tiny/224", "infer", "ratio",
     1.0),
    ("castling_deit_tiny inference >= 3x DeiT-T at 3136 tokens", "castling", "castling_deit_tiny/896", "infer",
     "ratio", 3.0),
    *((f"{name} training MFU >= 35%", "224", name, "train", "mfu", 0.35)
      for name in ("vit_lsla_tiny", "vit_lsla_swin_t", "hier_msa_swin_t")),
)  # fmt: skip


def print_peak_table(device_name: str) -> None:
    match = peak_bf16_tflops(device_name)
    print(f"dense bf16 peaks (vendor datasheets), matched against {device_name!r}:")
    for _, part, peak, note in PEAK_BF16_TFLOPS:
        mark = "->" if match is not None and match[0] == part else "  "
        print(f"  {mark} {part:<24s} {peak:7.0f} TFLOP/s  {note}")
    if match is None:
        print("  (no row matches this device: MFU is n/a)")


@dataclass
class Entry:
    """One row: a model under one compile setting, its steps (``train`` and/or ``infer``) and what they measured.

    ``seconds[kind]`` is the time per image of each round; ``reference`` names the row this one is compared
    with (same compile setting); ``resident[kind]`` gives the bytes the step keeps between steps.
    """

    name: str
    compiled: bool
    macs: float
    batch: dict[str, int]
    steps: dict[str, Callable[[], None]]
    resident: dict[str, Callable[[], int]]
    reference: str | None = None
    about: dict = field(default_factory=dict)
    seconds: dict[str, list[float]] = field(default_factory=lambda: {kind: [] for kind in KINDS})
    peak_bytes: dict[str, int] = field(default_factory=dict)
    warmup_s: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    @property
    def mode(self) -> str:
        return "compile" if self.compiled else "eager"


class Bench:
    """What every group shares: the device, autocast, compile setting, timing and memory accounting."""

    def __init__(self, device: torch.device, compile_modes: tuple[bool, ...], backend: str, warmup: int, steps: int,
                 strict: bool) -> None:  # fmt: skip
        self.device, self.compile_modes, self.backend = device, compile_modes, backend
        self.warmup, self.steps, self.strict = warmup, steps, strict
        self.cuda = device.type == "cuda"

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def compiled(self, fn):
        return torch.compile(fn, backend=self.backend)

    def images(self, batch: int, img_size: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(batch, 3, img_size, img_size, device=self.device)
        return x, torch.randint(0, num_classes, (batch,), device=self.device)

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        # the training loop's choice on CUDA; a small lr keeps random-data training finite over the rounds
        return torch.optim.AdamW(model.parameters(), lr=1e-5, fused=self.cuda)

    def train_step(self, forward, model: nn.Module, optimizer, x, y, regulariser=None) -> Callable[[], None]:
        def step() -> None:
            model.train()
            with self.autocast():
                loss = F.cross_entropy(forward(x), y)
                if regulariser is not None:
                    loss = loss + MASK_REG_WEIGHT * regulariser()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    def infer_step(self, forward, model: nn.Module, x) -> Callable[[], None]:
        def step() -> None:
            model.eval()
            with torch.inference_mode(), self.autocast():
                forward(x)

        return step

    # ---- running ----

    def _fail(self, entry: Entry, err: Exception) -> None:
        if self.strict:
            raise err
        entry.error = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:160] if str(err).strip() else ''}"
        print(f"  {entry.name} ({entry.mode}) failed, left out: {entry.error}", flush=True)
        if self.cuda:
            torch.cuda.empty_cache()

    def warm_up(self, entries: Iterable[Entry]) -> None:
        """``warmup`` steps of every entry and kind, entry by entry; compilation happens here."""
        for entry in entries:
            for kind, step in entry.steps.items():
                start = time.perf_counter()
                try:
                    for _ in range(self.warmup):
                        step()
                    self.synchronize()
                except Exception as err:  # an OOM or a compile failure costs one row, not the run
                    self._fail(entry, err)
                    break
                entry.warmup_s[kind] = time.perf_counter() - start

    def measure(self, entry: Entry, kind: str) -> None:
        """One round of ``kind`` for ``entry``: ``steps`` steps, each between two CUDA events (wall clock on CPU)."""
        step = entry.steps[kind]
        if not self.cuda:
            start = time.perf_counter()
            for _ in range(self.steps):
                step()
            seconds = time.perf_counter() - start
        else:
            self.synchronize()
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(self.steps)]  # fmt: skip
            for start, end in events:
                start.record()
                step()
                end.record()
            self.synchronize()
            seconds = sum(start.elapsed_time(end) for start, end in events) / 1e3
            peak = torch.cuda.max_memory_allocated(self.device) - before + entry.resident[kind]()
            entry.peak_bytes[kind] = max(entry.peak_bytes.get(kind, 0), peak)
        entry.seconds[kind].append(seconds / self.steps / entry.batch[kind])

    def run_rounds(self, entries: list[Entry], rounds: int) -> None:
        for _ in range(rounds):
            for entry in entries:
                if entry.error is not None:
                    continue
                for kind in entry.steps:
                    try:
                        self.measure(entry, kind)
                    except Exception as err:
                        self._fail(entry, err)
                        break


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def model_bytes(model: nn.Module) -> int:
    return tensor_bytes(itertools.chain(model.parameters(), model.buffers()))


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    return tensor_bytes(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))


def build(name: str, device: torch.device | str, inference_form: bool = False, **kwargs) -> nn.Module:
    model = timm.create_model(name, pretrained=False, **kwargs)
    if inference_form and hasattr(model, "switch_to_inference"):  # Castling drops its training-only softmax branch
        model.switch_to_inference()
    return model.to(device)


def macs_per_image(name: str, img_size: int, kwargs: dict, training_form: bool = False) -> int:
    """MACs of one image through the inference form (or the training form's training forward), counted on the
    meta device (shapes only, no compute)."""
    with torch.device("meta"):
        model = build(name, "meta", inference_form=not training_form, **kwargs).train(training_form)
        return count_macs(model, torch.empty(1, 3, img_size, img_size))


def model_entries(bench: Bench, name: str, *, label: str | None = None, img_size: int, batch: dict[str, int],
                  num_classes: int, reference: str | None, kwargs: dict, train_form: bool = False,
                  about: dict | None = None) -> list[Entry]:  # fmt: skip
    """One entry per compile setting for the registered model ``name``, weights shared between them.

    ``batch`` holds the kinds to measure. ``train_form``: the model has a separate training form (Castling):
    training runs a second instance with the same weights, built before the switch, with the mask regulariser.
    """
    kwargs = dict(kwargs, num_classes=num_classes, img_size=img_size)
    model = build(name, bench.device, inference_form=train_form, **kwargs)
    trainer, regulariser = model, None
    if train_form and "train" in batch:
        trainer = build(name, bench.device, **kwargs)
        trainer.load_state_dict(model.state_dict())
        regulariser = lambda: mask_regularization(trainer)  # noqa: E731
    optimizer = bench.optimizer(trainer) if "train" in batch else None
    inputs = {kind: bench.images(b, img_size, num_classes) for kind, b in batch.items()}
    macs = macs_per_image(name, img_size, kwargs)
    about = dict(about or {}, model=name, img_size=img_size)
    if trainer is not model:
        about["train_form_gmacs"] = macs_per_image(name, img_size, kwargs, training_form=True) / 1e9
    entries = []
    for compiled in bench.compile_modes:
        infer_forward = bench.compiled(model) if compiled else model
        train_forward = infer_forward if trainer is model else bench.compiled(trainer) if compiled else trainer
        steps, resident = {}, {}
        if "train" in batch:
            x, y = inputs["train"]
            steps["train"] = bench.train_step(train_forward, trainer, optimizer, x, y, regulariser)
            resident["train"] = lambda: model_bytes(trainer) + optimizer_bytes(optimizer)
        if "infer" in batch:
            steps["infer"] = bench.infer_step(infer_forward, model, inputs["infer"][0])
            resident["infer"] = lambda: model_bytes(model)
        entries.append(Entry(label or name, compiled, macs, dict(batch), steps, resident, reference, dict(about)))
    return entries


def scaled_batch(base: int, tokens: int) -> int:
    return max(MIN_BATCH if base >= MIN_BATCH else 1, base * 196 // tokens)


def group_224(bench: Bench, batch: dict[str, int], smoke: bool) -> tuple[str, list[Entry]]:
    kwargs = SMOKE_KWARGS["hierarchical"] if smoke else {}
    entries = []
    for name in (SWIN_T, "hier_msa_swin_t", "vit_lsla_swin_t", "vit_lsla_tiny"):
        entries += model_entries(bench, name, img_size=224, batch=batch, num_classes=102, reference=SWIN_T,
                                 kwargs=kwargs)  # fmt: skip
    title = f"224x224, 102 classes, batch train {batch['train']} / inference {batch['infer']}"
    return title, entries


def group_castling(bench: Bench, batch: dict[str, int], sizes: tuple[int, ...], models: tuple[str, ...],
                   smoke: bool) -> tuple[str, list[Entry]]:  # fmt: skip
    kwargs = SMOKE_KWARGS["deit"] if smoke else {}
    entries = []
    for size in sizes:
        tokens = (size // 16) ** 2
        sized = {kind: scaled_batch(b, tokens) for kind, b in batch.items() if kind == "infer" or size == TRAIN_SIZE}
        for castling in models:
            deit = CASTLING_PAIRS[castling]
            about = dict(tokens=tokens)
            entries += model_entries(bench, castling, label=f"{castling}/{size}", img_size=size, batch=sized,
                                     num_classes=1000, reference=f"{deit}/{size}", kwargs=kwargs, train_form=True,
                                     about=about)  # fmt: skip
            entries += model_entries(bench, deit, label=f"{deit}/{size}", img_size=size, batch=sized,
                                     num_classes=1000, reference=f"{deit}/{size}", kwargs=kwargs, about=about)
    title = (f"Castling (inference form) against timm's DeiT, 1000 classes, batch at 196 tokens: inference "
             f"{batch['infer']}, training {batch['train']} (training at {TRAIN_SIZE} only), x 196 / tokens beyond")
    return title, entries


def exit_split(samples_per_exit: list[int]) -> list[int]:
    """Images answered at each exit, from how many each exit ran on."""
    return [n - (samples_per_exit[k + 1] if k + 1 < len(samples_per_exit) else 0)
            for k, n in enumerate(samples_per_exit)]  # fmt: skip


def group_dvt(bench: Bench, batch: dict[str, int], q: float, smoke: bool) -> tuple[str, list[Entry]]:
    kwargs = SMOKE_KWARGS["t2t"] if smoke else {}
    size, num_classes, n = 224, 1000, batch["infer"]
    cascade = build("dvt_t2t_vit_12", bench.device, num_classes=num_classes, **kwargs).eval()
    cumulative = cascade.exit_macs()  # counted once, outside the timing (forward_dynamic reads the cache)
    x, _ = bench.images(n, size, num_classes)
    with torch.inference_mode(), bench.autocast():  # confidences as the timed steps see them
        outputs = collect_exit_outputs(cascade, [(x, torch.zeros(n, dtype=torch.long))])
    shares = exit_shares(q, cascade.num_exits)
    thresholds = find_thresholds(outputs.confidence, shares)[:-1].tolist()  # the last exit takes the rest
    about = dict(q=q, intended_shares=shares.tolist(), thresholds=thresholds,
                 cumulative_gmacs=[m / 1e9 for m in cumulative])  # fmt: skip

    entries = []
    for compiled in bench.compile_modes:
        forward = bench.compiled(cascade.forward_dynamic) if compiled else cascade.forward_dynamic
        seen: dict[str, list[int]] = {}

        def step(forward=forward, seen=seen) -> None:
            cascade.eval()
            with torch.inference_mode(), bench.autocast():
                seen["samples_per_exit"] = forward(x, thresholds).samples_per_exit

        entries.append(Entry("dvt_t2t_vit_12", compiled, 0.0, dict(batch), {"infer": step},
                             {"infer": lambda: model_bytes(cascade)}, "t2t_vit_12",
                             dict(about, model="dvt_t2t_vit_12", img_size=size, seen=seen)))  # fmt: skip
    entries += model_entries(bench, "t2t_vit_12", img_size=size, batch=batch, num_classes=num_classes,
                             reference="t2t_vit_12", kwargs=kwargs)  # fmt: skip
    title = (f"DVT(T2T-ViT-12) early exit at q = {q} (intended shares "
             f"{' / '.join(f'{s:.0%}' for s in shares.tolist())}) against T2T-ViT-12 alone, 224x224, batch {n}")
    return title, entries


def settle_dvt_macs(entries: list[Entry]) -> None:
    """The DVT rows' MACs per image: the mean over the batch of the cumulative cost of the exit each image took."""
    for e in entries:
        if "seen" not in e.about:
            continue
        seen = e.about.pop("seen")
        if "samples_per_exit" not in seen:
            continue
        split = exit_split(seen["samples_per_exit"])
        cumulative = [g * 1e9 for g in e.about["cumulative_gmacs"]]
        e.macs = sum(a * m for a, m in zip(split, cumulative)) / sum(split)
        e.about["exit_split"] = split


def summarize(entries: list[Entry], peak_tflops: float | None) -> list[dict]:
    """One record per entry: images/s (median round), ratio against its reference and compile speed-up (median
    of per-round paired ratios, IQR), TFLOP/s and MFU, peak memory."""
    by_key = {(e.name, e.compiled): e for e in entries}

    def paired(against: Entry | None, e: Entry, kind: str) -> tuple[float, float, float] | None:
        if against is None or against is e or against.error or not against.seconds[kind]:
            return None
        if len(against.seconds[kind]) != len(e.seconds[kind]):
            return None
        return paired_ratio(against.seconds[kind], e.seconds[kind])

    records = []
    for e in entries:
        ref = by_key.get((e.reference, e.compiled))
        record = dict(name=e.name, compiled=e.compiled, reference=e.reference, is_reference=ref is e,
                      gmacs=e.macs / 1e9, mac_ratio=ref.macs / e.macs if ref is not None and e.macs else None,
                      batch=e.batch, warmup_s=e.warmup_s, error=e.error, **e.about)  # fmt: skip
        for kind in KINDS:
            if kind not in e.steps or e.error or not e.seconds[kind]:
                record[kind] = None
                continue
            images_per_s = 1 / statistics.median(e.seconds[kind])
            tflops = e.macs * 2 * (TRAINING_FLOPS_PER_FORWARD if kind == "train" else 1) * images_per_s / 1e12
            ratio = paired(ref, e, kind)
            speedup = paired(by_key.get((e.name, False)), e, kind) if e.compiled else None
            record[kind] = dict(
                images_per_s=images_per_s, tflops=tflops, mfu=tflops / peak_tflops if peak_tflops else None,
                ratio=ratio[0] if ratio else None, ratio_iqr=list(ratio[1:]) if ratio else None,
                compile_speedup=speedup[0] if speedup else None,
                compile_speedup_iqr=list(speedup[1:]) if speedup else None,
                peak_gib=e.peak_bytes[kind] / 2**30 if kind in e.peak_bytes else None,
                seconds_per_image=e.seconds[kind],
            )  # fmt: skip
        records.append(record)
    return records


def _fmt(value, spec: str, width: int) -> str:
    return f"{value:{width}{spec}}" if value is not None else f"{'-':>{width}s}"


def print_table(title: str, records: list[dict]) -> None:
    print(f"\n{title}; ratios (x) against the reference of the same mode, median of the rounds' ratios (IQR)")
    head = (f"{'':35s} {'mode':7s} {'GMACs':>6s} {'MAC x':>6s} |"
            + "".join(f" {kind + ' img/s':>11s} {'x':>6s} {'IQR':>11s} {'TFLOP/s':>7s} {'MFU':>5s} {'GiB':>5s} "
                      f"{'compile x':>9s} |" for kind in KINDS)
            + f" {'warm-up s':>9s}")  # fmt: skip
    print(head + "\n" + "-" * len(head))
    for r in records:
        cells = []
        for kind in KINDS:
            k = r[kind]
            if k is None:
                cells.append(f" {'-':>11s} {'':6s} {'':11s} {'':7s} {'':5s} {'':5s} {'':9s} |")
                continue
            iqr = f"{k['ratio_iqr'][0]:5.2f}-{k['ratio_iqr'][1]:5.2f}" if k["ratio_iqr"] else f"{'-':>11s}"
            mfu = f"{k['mfu']:5.0%}" if k["mfu"] is not None else f"{'n/a':>5s}"
            cells.append(f" {k['images_per_s']:11.1f} {_fmt(k['ratio'], '.3f', 6)} {iqr} {k['tflops']:7.1f} {mfu} "
                         f"{_fmt(k['peak_gib'], '.1f', 5)} {_fmt(k['compile_speedup'], '.3f', 9)} |")  # fmt: skip
        warm = "+".join(f"{s:.0f}" for s in r["warmup_s"].values()) or "-"
        name = r["name"] + (" (ref)" if r["is_reference"] else "")
        mode = "compile" if r["compiled"] else "eager"
        print(f"{name:35s} {mode:7s} {r['gmacs']:6.2f} {_fmt(r['mac_ratio'], '.3f', 6)} |{''.join(cells)} {warm:>9s}")
        if r.get("exit_split"):
            print(f"{'':35s} exit split {' / '.join(map(str, r['exit_split']))} of {r['batch']['infer']} images "
                  f"(thresholds {', '.join(f'{t:.6g}' for t in r['thresholds'])})")
        if r.get("train_form_gmacs") and r["train"] is not None:
            print(f"{'':35s} trained in its training form: {r['train_form_gmacs']:.2f} GMACs per image (masked softmax "
                  "branch); TFLOP/s and MFU count the inference form's")
        if r["error"]:
            print(f"{'':35s} failed: {r['error']}")


def judge(groups: list[dict], compiled: bool) -> list[dict]:
    """The issue's targets on the rows of one compile setting: met / MISS, or n/a when the figure is missing."""
    verdicts = []
    for what, group, row, kind, figure, threshold in TARGETS:
        records = next((g["entries"] for g in groups if g["group"] == group), [])
        record = next((r for r in records if r["name"] == row and r["compiled"] == compiled), None)
        value = (record[kind] or {}).get(figure) if record is not None else None
        verdict = "n/a" if value is None else "met" if value >= threshold else "MISS"
        verdicts.append(dict(target=what, mode="compile" if compiled else "eager", value=value, threshold=threshold,
                             verdict=verdict))  # fmt: skip
    return verdicts


def print_verdicts(verdicts: list[dict]) -> None:
    print(f"\ntargets (issue 17), {verdicts[0]['mode']} rows:")
    for v in verdicts:
        value = "-" if v["value"] is None else f"{v['value']:.0%}" if "MFU" in v["target"] else f"{v['value']:.3f}x"
        print(f"  {v['verdict']:4s} {v['target']:<66s} measured {value}")


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=["224", "castling", "dvt"], help="run these groups only")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 3 steps; Castling-T at 224 and 896 only")
    parser.add_argument("--smoke", action="store_true", help="any device (CPU): tiny models, batch 2, 2 rounds")
    parser.add_argument("--no-compile", action="store_true", help="eager entries only")
    parser.add_argument("--batch", type=int, help="images per step at 224, every group and kind (default: per group)")
    parser.add_argument("--rounds", type=int, help="timed rounds (default 5; --quick 3; --smoke 2)")
    parser.add_argument("--steps", type=int, help="timed steps per entry and round (default 5; --quick 3; --smoke 1)")
    parser.add_argument("--warmup", type=int, help="untimed steps per entry first (default 3; --smoke 1)")
    parser.add_argument("--dvt-q", type=float, default=0.5, help="DVT budget knob: exit k takes q^k / sum q^j")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write settings, rows and verdicts here")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available() and not args.smoke:
        print("bench_gpu: no CUDA device is available; nothing measured (--smoke runs the code path on this machine)")
        return None
    with gpu_settings():
        return run(args)


@contextlib.contextmanager
def gpu_settings():
    """TF32 on; dynamo's per-code cache big enough for a group, failing loudly when full. Restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        # all the project's ViTs share one forward's code object, so dynamo's per-code cache (8 graphs) fills
        # up; full, it would quietly run eager in a "compile" row
        with torch._dynamo.config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
        torch._dynamo.reset()


def run(args: argparse.Namespace) -> dict:
    """Every group asked for, one after another: build, warm up (compile), time in rounds, print; then the targets."""
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    rounds = args.rounds or (2 if args.smoke else 3 if args.quick else 5)
    steps = args.steps or (1 if args.smoke else 3 if args.quick else 5)
    warmup = args.warmup or (1 if args.smoke else 3)
    # a smoke run checks that everything traces (aot_eager: forward and backward graphs, no code generation),
    # in seconds on any device; inductor's kernels are what a real run measures
    backend = "aot_eager" if args.smoke else "inductor"
    compile_modes = (False,) if args.no_compile else (False, True)
    torch.manual_seed(0)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_bf16_tflops(device_name) if device.type == "cuda" else None
    print(f"bench_gpu on {device_name}: torch {torch.__version__}, CUDA {torch.version.cuda}, bf16 autocast, "
          f"compile: {'off' if args.no_compile else backend}; {rounds} rounds x {steps} steps, {warmup} warm-up steps"
          + (" -- SMOKE RUN: shrunk models, figures mean nothing" if args.smoke else ""))  # fmt: skip
    print_peak_table(device_name)
    bench = Bench(device, compile_modes, backend, warmup, steps, strict=args.smoke)

    def batch_of(group: str) -> dict[str, int]:
        if args.smoke or args.batch:
            return {kind: args.batch or 2 for kind in DEFAULT_BATCH[group]}
        return dict(DEFAULT_BATCH[group])

    builders: dict[str, Callable[[], tuple[str, list[Entry]]]] = {
        "224": lambda: group_224(bench, batch_of("224"), args.smoke),
        "castling": lambda: group_castling(
            bench, batch_of("castling"), (224,) if args.smoke else (224, 896) if args.quick else CASTLING_SIZES,
            ("castling_deit_tiny",) if args.quick else tuple(CASTLING_PAIRS), args.smoke),
        "dvt": lambda: group_dvt(bench, batch_of("dvt"), args.dvt_q, args.smoke),
    }  # fmt: skip
    groups, started = [], time.perf_counter()
    for name in [g for g in builders if g in args.only] if args.only else list(builders):
        group_start = time.perf_counter()
        title, entries = builders[name]()
        bench.warm_up(entries)
        warm = time.perf_counter() - group_start
        bench.run_rounds(entries, rounds)
        settle_dvt_macs(entries)
        records = summarize(entries, peak[1] if peak else None)
        print_table(title, records)
        seconds = time.perf_counter() - group_start
        print(f"group {name}: {seconds:.0f} s (building and warm-up {warm:.0f} s)", flush=True)
        groups.append(dict(group=name, title=title, seconds=seconds, warmup_seconds=warm, entries=records))
        del entries  # the group's models, optimizers and compiled graphs: free the device for the next group
        torch._dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    verdicts = judge(groups, compiled=not args.no_compile)
    print_verdicts(verdicts)
    total = time.perf_counter() - started
    print(f"\nwhole run: {total:.0f} s, of which building and warm-up (compilation) "
          f"{sum(g['warmup_seconds'] for g in groups):.0f} s")
    result = dict(
        benchmark="bench_gpu",
        settings=dict(device=device_name, peak_part=peak[0] if peak else None, peak_bf16_tflops=peak[1] if peak else None,
                      torch=torch.__version__, cuda=torch.version.cuda, date=datetime.date.today().isoformat(),
                      smoke=args.smoke, compile_backend=None if args.no_compile else backend, rounds=rounds,
                      steps=steps, warmup=warmup, dvt_q=args.dvt_q, seconds=total),
        groups=groups, targets=verdicts,
    )  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(strict_json(result), indent=1, allow_nan=False))
        print(f"wrote {args.json}")
    return result


def strict_json(value):
    """``value`` with every non-finite float as a string ("inf": a threshold no image reaches), for strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


if __name__ == "__main__":
    main()
