"""Data throughput: the WebDataset reader against torchvision's ImageFolder and against an in-memory ceiling.

    python -m benchmarks.bench_data             # 10,000 Fashion-MNIST images, a few minutes on 2 cores
    python -m benchmarks.bench_data --long      # all 60,000 training images, more rounds
    python -m benchmarks.bench_data --workers 4 --img-size 64 --eval-transform
    python -m benchmarks.bench_data --json runs/bench_data.json   # the results as JSON too (benchmarks/run_all.py)

All three readers see the same encoded PNG bytes (the images are written once as an ImageFolder tree,
and the shards are built from that tree), the same transform (``build_transform``; train mode by
default), the same batch size and the same number of DataLoader worker processes:

* ``in-memory``: a map-style dataset over the encoded bytes held in RAM, decoded and transformed in the
  workers: what any reader must do at least, so its rate is the ceiling.
* ``shards``: ``build_loader`` over the built shards (one rank).
* ``imagefolder``: ``torchvision.datasets.ImageFolder`` over the PNG files (its default loader).

Each timed epoch starts the workers afresh (as a training epoch does) and runs round-robin across the
readers, so load from other processes hits all alike; the table gives each reader's best epoch, and its
CPU time per image (main process + workers), which a busy shared machine distorts far less. Also
printed: the shard build rate (``vitpipe shards build`` from the ImageFolder tree). Targets: shards >= 90%
of in-memory, and faster than ImageFolder. Without Fashion-MNIST installed, scikit-learn's digits (upscaled
to 32x32) stand in.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipeline.data import build_loader, build_shards, build_transform
from pipeline.data.sources import idx_source

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def load_images(count: int) -> tuple[np.ndarray, np.ndarray, str]:
    if (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        images, labels = idx_source(FASHION_MNIST).splits["train"]
        name = "Fashion-MNIST"
    else:
        from tests.datasets import digits_arrays

        images, labels = digits_arrays(32)
        name = "sklearn digits 32x32"
    reps = -(-count // len(images))
    return np.concatenate([images] * reps)[:count], np.concatenate([labels] * reps)[:count], name


def write_image_folder(root: Path, images: np.ndarray, labels: np.ndarray) -> list[tuple[bytes, int]]:
    """PNG files in class folders; returns the encoded bytes too, for the in-memory reader."""
    encoded = []
    for i, (image, label) in enumerate(zip(images, labels)):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:06d}.png").write_bytes(buf.getvalue())
        encoded.append((buf.getvalue(), int(label)))
    return encoded


class InMemory(Dataset):
    def __init__(self, encoded: list[tuple[bytes, int]], transform):
        self.encoded, self.transform = encoded, transform

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int):
        data, label = self.encoded[i]
        image = Image.open(io.BytesIO(data))
        image.load()
        return self.transform(image), label


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the DataLoader workers, once joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_epoch(loader) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, images) of one epoch, workers started and joined inside it."""
    wall, cpu, count = time.perf_counter(), cpu_seconds(), 0
    iterator = iter(loader)
    for images, _ in iterator:
        count += len(images)
    del iterator  # joins the workers, so their CPU time is counted
    gc.collect()
    return time.perf_counter() - wall, cpu_seconds() - cpu, count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--long", action="store_true", help="all 60,000 images and 5 rounds")
    parser.add_argument("--images", type=int, help="images per epoch (default 10,000; --long: 60,000)")
    parser.add_argument("--rounds", type=int, help="timed epochs per reader (default 3; --long: 5)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--eval-transform", action="store_true", help="resize + centre crop instead of train aug")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    count = args.images or (60_000 if args.long else 10_000)
    rounds = args.rounds or (5 if args.long else 3)
    torch.set_num_threads(1)  # the workers do the work; keep the main process from competing for cores

    images, labels, name = load_images(count)
    transform = build_transform(args.img_size, train=not args.eval_transform, in_chans=3)
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        tmp = Path(tmp)
        encoded = write_image_folder(tmp / "folder", images, labels)
        start = time.perf_counter()
        build_shards(tmp / "folder", tmp / "shards", format="imagefolder", val_fraction=0.0, progress=False)
        build_rate = count / (time.perf_counter() - start)

        from torchvision.datasets import ImageFolder

        readers = {
            "in-memory": lambda: DataLoader(InMemory(encoded, transform), batch_size=args.batch_size, shuffle=True,
                                            num_workers=args.workers, drop_last=True),  # fmt: skip
            "shards": lambda: build_loader(tmp / "shards" / "train", batch_size=args.batch_size, transform=transform,
                                           num_workers=args.workers, epoch=len(times["shards"])),  # fmt: skip
            "imagefolder": lambda: DataLoader(ImageFolder(str(tmp / "folder"), transform=transform),
                                              batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                                              drop_last=True),  # fmt: skip
        }
        times: dict[str, list[tuple[float, float, int]]] = {k: [] for k in readers}
        for reader in readers:  # warm-up: page cache, imports in fresh workers
            run_epoch(readers[reader]())
        for _ in range(rounds):
            for reader, make in readers.items():
                times[reader].append(run_epoch(make()))

    rates = {k: max(n / wall for wall, _, n in v) for k, v in times.items()}
    cpu_us = {k: 1e6 * min(cpu / n for _, cpu, n in v) for k, v in times.items()}
    print(f"\n{name}: {count} images/epoch, batch {args.batch_size}, {args.workers} workers, "
          f"{'eval' if args.eval_transform else 'train'} transform to {args.img_size}x{args.img_size} RGB, "
          f"best of {rounds} epochs, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"{'reader':<12} {'images/s':>10} {'vs in-memory':>13} {'CPU us/image':>13} {'CPU vs in-memory':>17}")
    for reader in readers:
        print(f"{reader:<12} {rates[reader]:>10.0f} {rates[reader] / rates['in-memory']:>12.1%} "
              f"{cpu_us[reader]:>13.0f} {cpu_us['in-memory'] / cpu_us[reader]:>16.1%}")  # fmt: skip
    print(f"shards vs imagefolder: {rates['shards'] / rates['imagefolder']:.2f}x images/s, "
          f"{cpu_us['imagefolder'] / cpu_us['shards']:.2f}x CPU per image")
    print(f"shard build (imagefolder -> shards, incl. sha256 and stats): {build_rate:.0f} images/s")
    if args.json:
        results = {
            "benchmark": "data",
            "dataset": name,
            "images": count,
            "img_size": args.img_size,
            "transform": "eval" if args.eval_transform else "train",
            "batch_size": args.batch_size,
            "workers": args.workers,
            "rounds": rounds,
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg()[0],
            "readers": {
                reader: {
                    "images_per_s": rates[reader],
                    "cpu_ms_per_image": cpu_us[reader] / 1000,
                    "vs_in_memory": rates[reader] / rates["in-memory"],
                    "cpu_vs_in_memory": cpu_us["in-memory"] / cpu_us[reader],
                }
                for reader in readers
            },
            "shards_vs_imagefolder": rates["shards"] / rates["imagefolder"],
            "shards_vs_imagefolder_cpu": cpu_us["imagefolder"] / cpu_us["shards"],
            "shard_build_images_per_s": build_rate,
            # The targets the table is read against (see the module docstring).
            "targets_met": {
                "shards_ge_90pct_in_memory": rates["shards"] >= 0.9 * rates["in-memory"],
                "shards_faster_than_imagefolder": rates["shards"] > rates["imagefolder"],
            },
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
