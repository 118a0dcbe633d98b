"""ViT-LSLA against Swin-T: parameters, GMACs and CPU throughput, measured side by side in one run.

    python -m benchmarks.bench_lsla                    # all three groups below, a few minutes of CPU time
    python -m benchmarks.bench_lsla --quick            # 3 rounds instead of 10
    python -m benchmarks.bench_lsla --only attention   # one group: 224, nano or attention
    python -m benchmarks.bench_lsla --json out.json    # also every entry's figures and verdicts as JSON

Groups:
    224        timm's Swin-T, hier_msa_swin_t, vit_lsla_swin_t, vit_lsla_tiny at 224x224 (102 classes)
    nano       hier_msa_nano and vit_lsla_nano at 32x32
    attention  the window attention modules alone at Swin-T's four stage shapes (batch 4): MSA, LSLA,
               and LSA (LSLA without DS and B_o: keys and values X, fixed scale), to show where time goes

Each group is timed round-robin (one step of every entry, then the next round), so load from other
processes hits all alike. Training is forward + backward (+ SGD step for models); inference is forward
under ``torch.inference_mode`` (models in eval mode). On a CPU this is a regression check (GPUs are the
target: ``bench_gpu``): LSLA keeps most of its MAC advantage in time, throughput ratio >= ``TARGET_SHARE``
(0.9) x MAC advantage (reference MACs / model MACs). ``GMAC/s`` is the inference
MAC rate: how well a model's MACs run.

Ratios: the median over rounds of the reference's time over the entry's time in the same round, with the
interquartile range of those per-round ratios (``IQR``). The two steps of a round run seconds apart, so a
drift of the machine's speed cancels; a ratio of each side's best round does not: one Swin-T round 5%
faster than its other nine moved vit_lsla_tiny's training ratio from 1.22x to 1.17x. LSLA models whose
msa twin is in the group (``vit_lsla_X`` and ``hier_msa_X``) are also compared with the twin, alike.

Clock: by default one intra-op thread and this process's CPU time, best round of each entry. On a
shared machine wall-clock time mostly measures the other processes (waiting for a core counts, and
multi-threaded kernels wait for their slowest thread); the CPU time of a single thread is the time the
model's own work takes, so an idle core runs at the throughput shown. ``--clock wall --threads N``
measures wall-clock time instead (median round), the right choice on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch

import pipeline.models  # noqa: F401  (registers the factories)
from pipeline.models.counting import count_macs, count_params
from pipeline.models.hierarchical import window_region_ids
from pipeline.models.layers.lsla import WindowLSLA
from pipeline.models.layers.window_msa import WindowMSA

TARGET_SHARE = 0.9  # of the MAC advantage, kept in CPU throughput

MODEL_GROUPS = {
    "224": dict(
        img_size=224,
        batch=4,
        reference="swin_tiny_patch4_window7_224",
        models=["swin_tiny_patch4_window7_224", "hier_msa_swin_t", "vit_lsla_swin_t", "vit_lsla_tiny"],
    ),
    "nano": dict(img_size=32, batch=256, reference="hier_msa_nano", models=["hier_msa_nano", "vit_lsla_nano"]),
}
SWIN_T_STAGES = [(96, 3, 56), (192, 6, 28), (384, 12, 14), (768, 24, 7)]  # channels, heads, map side
ATTENTION_KINDS = {
    "msa": lambda dim, heads: WindowMSA(dim, heads, window_size=7),
    "lsla": lambda dim, heads: WindowLSLA(dim, heads, window_size=7),
    "lsa": lambda dim, heads: WindowLSLA(dim, heads, window_size=7, scale="fixed", outer_bias=False),
}


@dataclass
class Entry:
    """One timed thing: its two steps and the measured seconds per step."""

    name: str
    train: Callable[[], None]
    infer: Callable[[], None]
    params: int = 0
    macs: int = 0
    train_s: list[float] = field(default_factory=list)
    infer_s: list[float] = field(default_factory=list)


def time_round_robin(entries: list[Entry], reps: int, warmup: int, clock: Callable[[], float]) -> None:
    for rep in range(warmup + reps):
        for entry in entries:
            for step, record in ((entry.train, entry.train_s), (entry.infer, entry.infer_s)):
                start = clock()
                step()
                if rep >= warmup:
                    record.append(clock() - start)


def model_entry(name: str, img_size: int, batch: int, num_classes: int) -> Entry:
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=img_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, img_size, img_size)
    y = torch.randint(0, num_classes, (batch,))

    def train() -> None:
        model.train()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def infer() -> None:
        model.eval()
        with torch.inference_mode():
            model(x)

    with torch.device("meta"):  # counted from shapes alone: no compute, same figures
        shadow = timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=img_size).eval()
        macs = count_macs(shadow, torch.empty(1, 3, img_size, img_size))
    return Entry(name, train, infer, count_params(model), macs)


def attention_entry(kind: str, dim: int, heads: int, side: int, batch: int) -> Entry:
    attn = ATTENTION_KINDS[kind](dim, heads)
    shift = (3, 3) if side > 7 else (0, 0)  # the last stage is one window: no shift
    region_ids = window_region_ids((side, side), (7, 7), shift)
    if region_ids is not None:  # as the backbone's blocks do: masks made once, kept by the attention
        attn.bind_region_ids(region_ids)
    x = torch.randn(batch * (side // 7) ** 2, 49, dim, requires_grad=True)

    def train() -> None:
        attn(x, region_ids).sum().backward()

    def infer() -> None:
        with torch.inference_mode():
            attn(x, region_ids)

    macs = count_macs(attn, (x[: (side // 7) ** 2].detach(), region_ids))  # one image's windows
    return Entry(f"{kind} C={dim} h={heads} {side}x{side}", train, infer, count_params(attn), macs)


def paired_ratio(reference_s: list[float], entry_s: list[float]) -> tuple[float, float, float]:
    """Median, first and third quartile over rounds of ``reference_s[i] / entry_s[i]`` (a speed-up)."""
    ratios = [r / e for r, e in zip(reference_s, entry_s, strict=True)]
    if len(ratios) == 1:
        return ratios[0], ratios[0], ratios[0]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return statistics.median(ratios), q1, q3


def summarize(entries: list[Entry], reference: Entry, batch: int, pick) -> list[dict]:
    """One record per entry: MACs are per image, rates in images/s (``pick`` of the rounds), ratios against
    ``reference`` as ``paired_ratio`` gives them.

    ``train_ok`` / ``infer_ok``: ratio >= TARGET_SHARE x MAC advantage (``None`` for the reference). An LSLA entry whose
    msa twin is in the group gets ``twin``: the same comparison against the twin.
    """
    by_name = {e.name: e for e in entries}

    def compare(e: Entry, against: Entry) -> dict:
        advantage = against.macs / e.macs
        record = dict(mac_advantage=advantage, target_ratio=TARGET_SHARE * advantage)
        for kind in ("train", "infer"):
            ratio, q1, q3 = paired_ratio(getattr(against, f"{kind}_s"), getattr(e, f"{kind}_s"))
            record.update({f"{kind}_ratio": ratio, f"{kind}_ratio_iqr": [q1, q3],
                           f"{kind}_ok": None if e is against else ratio >= TARGET_SHARE * advantage})  # fmt: skip
        return record

    records = []
    for e in entries:
        twin = by_name.get(e.name.replace("vit_lsla_", "hier_msa_")) if e.name.startswith("vit_lsla_") else None
        records.append(dict(
            name=e.name, reference=e is reference, params=e.params, macs=e.macs,
            train_images_per_s=batch / pick(e.train_s), infer_images_per_s=batch / pick(e.infer_s),
            infer_gmac_per_s=e.macs * batch / pick(e.infer_s) / 1e9,
            **compare(e, reference),
            twin=None if twin is None or twin is reference else dict(name=twin.name, **compare(e, twin)),
            train_s=e.train_s, infer_s=e.infer_s,
        ))  # fmt: skip
    return records


def print_table(title: str, records: list[dict]) -> None:
    reference = next(r["name"] for r in records if r["reference"])
    print(f"\n{title}; ratios against {reference} (median of the rounds' ratios, IQR)")
    header = (f"{'':32s} {'params':>8s} {'GMACs':>7s} {'train/s':>8s} {'infer/s':>8s} {'GMAC/s':>7s} "
              f"{'MAC adv':>8s} {'train x':>8s} {'IQR':>11s} {'infer x':>8s} {'IQR':>11s}  target (x >= {TARGET_SHARE} MAC adv)")  # fmt: skip
    print(header + "\n" + "-" * len(header))

    def ratios(r: dict) -> str:
        return "  ".join(
            f"{r[f'{kind}_ratio']:8.3f} {r[f'{kind}_ratio_iqr'][0]:5.3f}-{r[f'{kind}_ratio_iqr'][1]:5.3f}"
            for kind in ("train", "infer")
        )

    def verdict(r: dict) -> str:
        return "  ".join(f"{kind} {'ok' if r[f'{kind}_ok'] else 'MISS'}" for kind in ("train", "infer"))

    for r in records:
        print(f"{r['name']:32s} {r['params'] / 1e6:7.2f}M {r['macs'] / 1e9:7.3f} {r['train_images_per_s']:8.2f} "
              f"{r['infer_images_per_s']:8.2f} {r['infer_gmac_per_s']:7.1f} {r['mac_advantage']:8.3f} {ratios(r)}"
              f"  {'' if r['reference'] else verdict(r)}")  # fmt: skip
        if r["twin"]:
            twin = r["twin"]
            print(f"{'  over ' + twin['name']:32s} {'':8s} {'':7s} {'':8s} {'':8s} {'':7s} {twin['mac_advantage']:8.3f} "
                  f"{ratios(twin)}  {verdict(twin)}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=[*MODEL_GROUPS, "attention"], help="run one group only")
    parser.add_argument("--reps", type=int, default=10, help="timed rounds per group")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="3 timed rounds")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu", help="process CPU time or wall clock")
    parser.add_argument("--threads", type=int, help="intra-op threads (default: 1 for cpu, torch's for wall)")
    parser.add_argument("--num-classes", type=int, default=102, help="head size (IP102 has 102 classes)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every group's records here as JSON")
    args = parser.parse_args()
    threads = args.threads or (1 if args.clock == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    pick = min if args.clock == "cpu" else statistics.median
    reps = 3 if args.quick else args.reps
    how = (f"{torch.get_num_threads()} thread(s), {args.clock} clock, "
           f"{'best' if pick is min else 'median'} of {reps} rounds")  # fmt: skip
    torch.manual_seed(0)
    groups = []

    def report(name: str, title: str, entries: list[Entry], reference: Entry, batch: int, **about) -> None:
        records = summarize(entries, reference, batch, pick)
        print_table(title, records)
        groups.append(dict(group=name, title=title, batch=batch, reference=reference.name, **about, entries=records))

    for name in [args.only] if args.only in MODEL_GROUPS else [] if args.only else list(MODEL_GROUPS):
        group = MODEL_GROUPS[name]
        size, batch = group["img_size"], group["batch"]
        entries = [model_entry(model, size, batch, args.num_classes) for model in group["models"]]
        time_round_robin(entries, reps, args.warmup, clock)
        reference = next(e for e in entries if e.name == group["reference"])
        report(name, f"{size}x{size}, batch {batch}, {how}", entries, reference, batch, img_size=size)

    if args.only in (None, "attention"):
        batch = 4
        for dim, heads, side in SWIN_T_STAGES:
            entries = [attention_entry(kind, dim, heads, side, batch) for kind in ATTENTION_KINDS]
            time_round_robin(entries, reps, args.warmup, clock)
            report("attention", f"window attention alone, Swin-T stage {side}x{side}, batch {batch}, {how} (images/s)",
                   entries, entries[0], batch, dim=dim, heads=heads, side=side)  # fmt: skip

    if args.json:
        settings = dict(threads=torch.get_num_threads(), clock=args.clock, pick=pick.__name__, reps=reps,
                        warmup=args.warmup, num_classes=args.num_classes, torch=torch.__version__)  # fmt: skip
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(benchmark="bench_lsla", settings=settings, groups=groups), indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
