"""Tiny real shard sets for tests, built in about a second through the real builder.

    from tests.datasets import make_digits_shards
    root = make_digits_shards(tmp_path / "digits", image_size=16)   # root/train, root/val, root/test
    loader = build_loader(root / "train", batch_size=32, ...)

* ``make_digits_shards``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes,
  greyscale), optionally upscaled, split 1,497 train (of which ``val_fraction`` carved into val) / 300 test.
* ``make_indexed_shards``: synthetic images whose pixels spell their own index, so a test can tell from
  a batch exactly which samples it holds (duplicates, coverage, order).
* ``corrupt_sample`` / ``truncate_shard``: damage a built shard the way disks and networks do.

Pass ``samples_per_shard`` a list of sizes (used in turn) for deliberately uneven shards, e.g.
``UNEVEN_SHARDS``.
"""

from __future__ import annotations

import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.data.sources import ArraySource
from pipeline.data.shards import write_dataset

UNEVEN_SHARDS = (97, 250, 13, 180, 61, 1)
DIGITS_TEST = 300


def digits_arrays(image_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 images (N, image_size, image_size) in 0..255, and int64 labels.

    Pixel values 0..16 are scaled to 0..255; sizes other than 8 are nearest-neighbour upscales (so the
    pixels stay exact and a round trip can compare them).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    if image_size != 8:
        if image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8, got {image_size}")
        factor = image_size // 8
        images = images.repeat(factor, axis=1).repeat(factor, axis=2)
    return images, digits.target.astype(np.int64)


def make_digits_shards(
    out_dir: str | Path,
    *,
    samples_per_shard: int | Sequence[int] = 256,
    image_size: int = 8,
    val_fraction: float = 0.1,
    rgb: bool = False,
    seed: int = 0,
    classes: Sequence[int] | dict[int, int] | None = None,
) -> Path:
    """Build train/val/test shards of the digits under ``out_dir`` and return ``out_dir``.

    ``rgb=True`` stores three-channel images (the grey value repeated) for tests of RGB paths.
    ``classes``: only these digits, labelled 0, 1, ... in that order; or a mapping digit -> label (another
    label set over the same images, e.g. ``{d: d // 5 for d in range(10)}``), for fine-tuning tests.
    """
    images, labels = digits_arrays(image_size)
    if rgb:
        images = np.repeat(images[..., None], 3, axis=3)
    n_train = len(labels) - DIGITS_TEST
    splits = {"train": (images[:n_train], labels[:n_train]), "test": (images[n_train:], labels[n_train:])}
    names = [str(i) for i in range(10)]
    if classes is not None:
        relabel = dict(classes) if isinstance(classes, dict) else {digit: new for new, digit in enumerate(classes)}
        kept = list(relabel)
        splits = {split: (x[np.isin(y, kept)], np.array([relabel[v] for v in y[np.isin(y, kept)]], np.int64))
                  for split, (x, y) in splits.items()}  # fmt: skip
        names = [str(digit) for digit in classes] if not isinstance(classes, dict) else \
            ["+".join(str(d) for d in kept if relabel[d] == label) for label in sorted(set(relabel.values()))]
    source = ArraySource(splits, names, name="sklearn digits", format="array")
    write_dataset(source, out_dir, samples_per_shard=samples_per_shard, val_fraction=val_fraction, seed=seed,
                  progress=False)  # fmt: skip
    return Path(out_dir)


def indexed_image(index: int, size: int = 8) -> np.ndarray:
    """A size x size grey image whose first three pixels are the big-endian bytes of ``index``."""
    image = np.full((size, size), 128, dtype=np.uint8)
    image.flat[:3] = [(index >> 16) & 255, (index >> 8) & 255, index & 255]
    return image


def index_of(image) -> int:
    """The index an ``indexed_image`` spells, from a (1, H, W) tensor in [0, 1] (the default transform)."""
    pixels = (image.flatten()[:3] * 255).round().long().tolist()
    return (pixels[0] << 16) | (pixels[1] << 8) | pixels[2]


def make_indexed_shards(
    out_dir: str | Path,
    num_samples: int,
    *,
    samples_per_shard: int | Sequence[int] = UNEVEN_SHARDS,
    num_classes: int = 5,
    seed: int = 0,
) -> Path:
    """A train-only split of ``num_samples`` indexed images (label = index % num_classes); returns the split dir."""
    images = np.stack([indexed_image(i) for i in range(num_samples)])
    labels = np.arange(num_samples) % num_classes
    source = ArraySource({"train": (images, labels)}, [f"c{i}" for i in range(num_classes)], name="indexed")
    write_dataset(source, out_dir, samples_per_shard=samples_per_shard, val_fraction=0.0, seed=seed, progress=False)
    return Path(out_dir) / "train"


def corrupt_sample(shard: str | Path, key: str | None = None) -> str:
    """Overwrite one sample's image bytes in place with zeros (the first sample's unless ``key``); return its key."""
    shard = Path(shard)
    with tarfile.open(shard) as tar:
        members = [m for m in tar.getmembers() if not m.name.endswith(".cls")]
    member = next(m for m in members if key is None or m.name.split(".")[0] == key)
    with open(shard, "r+b") as f:
        f.seek(member.offset_data)
        f.write(bytes(member.size))
    return member.name.split(".")[0]


def truncate_shard(shard: str | Path, keep_fraction: float = 0.5) -> None:
    """Cut a shard short, mid-member, as an interrupted copy would."""
    shard = Path(shard)
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(int(size * keep_fraction) // 512 * 512 + 100)
