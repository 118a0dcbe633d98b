"""Build, verify and inspect WebDataset shard sets (``vitpipe shards build|verify|inspect``)."""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import tarfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .manifest import (
    MANIFEST_NAME,
    OFFSET_STRIDE,
    SPLITS,
    DatasetManifest,
    ManifestError,
    ShardEntry,
    SizeStats,
    ImageStats,
    SplitManifest,
    location_template,
    read_manifest,
    write_manifest,
)
from .samples import CorruptSampleError, ShardError, decode_sample, iter_shard, sample_key, sample_members
from .sources import Source, SourceError, open_source

# [ours] Small enough that a reader worker whose range starts mid-shard skips little, and that the per-epoch
# shard permutation has many shards to mix; at ImageNet-sized JPEGs still ~200 MB, a good object-store read.
DEFAULT_SAMPLES_PER_SHARD = 2_000
# Fixed member mtime: the same source and seed give byte-identical shards (and checksums).
_TAR_MTIME = 0


def build_shards(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    format: str,
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
    val_fraction: float = 0.1,
    seed: int = 0,
    image_column: str = "image",
    label_column: str = "label",
    class_names: Sequence[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> DatasetManifest:
    """Read ``source`` in ``format`` (imagefolder, idx, parquet, cifar) and write its shards to ``out_dir``."""
    src = open_source(source, format, image_column=image_column, label_column=label_column, class_names=class_names)
    return write_dataset(
        src, out_dir, samples_per_shard=samples_per_shard, val_fraction=val_fraction, seed=seed,
        overwrite=overwrite, progress=progress,
    )  # fmt: skip


def write_dataset(
    source: Source,
    out_dir: str | os.PathLike,
    *,
    samples_per_shard: int | Sequence[int] = DEFAULT_SAMPLES_PER_SHARD,
    val_fraction: float = 0.1,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> DatasetManifest:
    """Write a source's splits as shards plus one manifest per split.

    ``val`` is carved from ``train`` (a seeded random ``val_fraction`` of it) when the source has no
    validation split. ``samples_per_shard`` may be a sequence of sizes, used in turn (cycled), to build
    deliberately uneven shards. Samples are written in a seeded shuffled order, so shards mix classes.
    """
    if isinstance(samples_per_shard, int):
        samples_per_shard = [samples_per_shard]
    if not samples_per_shard or min(samples_per_shard) < 1:
        raise ValueError(f"samples per shard must be positive, got {list(samples_per_shard)}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val fraction must be in [0, 1), got {val_fraction}")
    out_dir = Path(out_dir)
    sizes = source.split_sizes()
    is_val = None
    if "val" not in sizes and val_fraction > 0:
        n_train = sizes["train"]
        n_val = round(val_fraction * n_train)
        if not 0 < n_val < n_train:
            raise ValueError(f"val fraction {val_fraction} of {n_train} train samples leaves an empty split")
        is_val = np.zeros(n_train, dtype=bool)
        is_val[np.random.default_rng([seed, 0]).choice(n_train, n_val, replace=False)] = True
    targets = sorted(set(sizes) | ({"val"} if is_val is not None else set()), key=SPLITS.index)
    _prepare(out_dir, overwrite)

    writers = {}
    for split in targets:
        writers[split] = _SplitWriter(split, out_dir / split, itertools.cycle(samples_per_shard), source.classes)
    for number, split in enumerate(s for s in SPLITS if s in sizes):
        order_rng = np.random.default_rng([seed, 1, number])
        bar = tqdm(total=sizes[split], desc=f"build {split}", unit="img", disable=not progress, leave=False)
        with bar:
            for example in source.examples(split, order_rng):
                carve = split == "train" and is_val is not None and is_val[example.index]
                writers["val" if carve else split].write(sample_key(split, example.index), example)
                bar.update()
    manifests = {}
    for split, writer in writers.items():
        manifests[split] = writer.close(source=source.name, source_format=source.format, seed=seed)
    return DatasetManifest(manifests)


def _prepare(out_dir: Path, overwrite: bool) -> None:
    for split in SPLITS:
        split_dir = out_dir / split
        if not split_dir.is_dir():
            continue
        ours = [*split_dir.glob(f"{split}-*.tar"), *split_dir.glob(MANIFEST_NAME + "*")]
        if ours and not overwrite:
            raise FileExistsError(f"{split_dir} already holds shards; pass overwrite (--overwrite) to replace them")
        for path in ours:
            path.unlink()


class _HashingFile:
    """A write-only file that hashes what passes through (the shard's sha256 costs no second read)."""

    def __init__(self, path: Path):
        self.file = open(path, "wb")
        self.sha256 = hashlib.sha256()
        self.num_bytes = 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.num_bytes += len(data)
        return self.file.write(data)

    def close(self) -> None:
        self.file.close()


class _SplitWriter:
    def __init__(self, split: str, split_dir: Path, shard_sizes: Iterable[int], classes: Sequence[str]):
        split_dir.mkdir(parents=True, exist_ok=True)
        self.split, self.split_dir, self.shard_sizes, self.classes = split, split_dir, iter(shard_sizes), classes
        self.shards: list[ShardEntry] = []
        self.class_counts = [0] * len(classes)
        self.modes, self.formats = Counter(), Counter()
        self.width, self.height = _Range(), _Range()
        self._tar = self._file = None
        self._room = 0

    def write(self, key: str, example) -> None:
        from webdataset import TarWriter

        if not 0 <= example.label < len(self.classes):
            raise SourceError(f"{key}: label {example.label} outside 0..{len(self.classes) - 1}")
        if self._room == 0:
            self._finish_shard()
            self._name = f"{self.split}-{len(self.shards):06d}.tar"
            self._file = _HashingFile(self.split_dir / self._name)
            self._tar = TarWriter(self._file, encoder=False, mtime=_TAR_MTIME)
            self._room, self._count, self._offsets = next(self.shard_sizes), 0, []
        mode, size = example.mode, example.size
        if mode is None or size is None:
            with Image.open(io.BytesIO(example.data)) as img:  # header only: mode and size for the statistics
                mode, size = img.mode, img.size
        self.modes[mode] += 1
        self.width.add(size[0])
        self.height.add(size[1])
        self.formats[example.ext] += 1
        self.class_counts[example.label] += 1
        if self._count % OFFSET_STRIDE == 0:
            self._offsets.append(self._tar.tarstream.offset)  # where this sample's first member header starts
        self._tar.write(sample_members(key, example.ext, example.data, example.label))
        self._room -= 1
        self._count += 1

    def _finish_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._file.close()
        digest = self._file.sha256.hexdigest()
        self.shards.append(ShardEntry(self._name, self._count, digest, self._file.num_bytes, tuple(self._offsets)))
        self._tar = None

    def close(self, *, source: str, source_format: str, seed: int) -> SplitManifest:
        self._finish_shard()
        if not self.shards:
            raise SourceError(f"split {self.split!r} received no samples")
        manifest = SplitManifest(
            split=self.split,
            classes=tuple(self.classes),
            shards=tuple(self.shards),
            class_counts=tuple(self.class_counts),
            image=ImageStats(dict(self.modes), dict(self.formats), self.width.stats(), self.height.stats()),
            source=source,
            source_format=source_format,
            seed=seed,
            location=location_template(self.split_dir),
        )
        write_manifest(manifest, self.split_dir)
        return manifest


@dataclass
class _Range:
    low: int | None = None
    high: int | None = None
    total: int = 0
    count: int = 0

    def add(self, value: int) -> None:
        self.low = value if self.low is None else min(self.low, value)
        self.high = value if self.high is None else max(self.high, value)
        self.total += value
        self.count += 1

    def stats(self) -> SizeStats:
        return SizeStats(self.low, self.high, round(self.total / self.count, 3))


# ---------------------------------------------------------------------------------------------- verify


@dataclass(frozen=True)
class Problem:
    where: str  # split/shard
    message: str
    key: str | None = None

    def __str__(self) -> str:
        return f"{self.where}: " + (f"sample {self.key!r}: " if self.key else "") + self.message


@dataclass
class VerifyReport:
    root: Path
    shards: int = 0
    samples: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        lines = [str(p) for p in self.problems]
        verdict = "OK" if self.ok else f"{len(self.problems)} problem(s)"
        lines.append(f"{self.root}: {self.shards} shards, {self.samples} samples checked: {verdict}")
        return "\n".join(lines)


def verify_shards(out_dir: str | os.PathLike, *, progress: bool = True) -> VerifyReport:
    """Re-read every shard: checksum, size and sample count against the manifest, every sample decoded.

    Reports every problem found (naming split, shard and sample key) rather than stopping at the first.
    """
    root = Path(out_dir)
    report = VerifyReport(root)
    split_dirs = [root / s for s in SPLITS if (root / s).is_dir()]
    if not split_dirs:
        report.problems.append(Problem(str(root), f"no split directories ({', '.join(SPLITS)})"))
    for split_dir in split_dirs:
        try:
            manifest = read_manifest(split_dir)
        except ManifestError as exc:
            report.problems.append(Problem(split_dir.name, str(exc)))
            continue
        listed = {s.name for s in manifest.shards}
        for stray in sorted(p.name for p in split_dir.glob("*.tar") if p.name not in listed):
            report.problems.append(Problem(f"{split_dir.name}/{stray}", "shard not listed in the manifest"))
        keys: set[str] = set()
        bar = tqdm(total=manifest.num_samples, desc=f"verify {manifest.split}", unit="img", disable=not progress,
                   leave=False)  # fmt: skip
        with bar:
            for entry in manifest.shards:
                _verify_shard(split_dir, entry, manifest.num_classes, keys, report, bar)
                report.shards += 1
    return report


def _verify_shard(split_dir: Path, entry: ShardEntry, num_classes: int, keys: set, report: VerifyReport, bar) -> None:
    where = f"{split_dir.name}/{entry.name}"
    path = split_dir / entry.name
    if not path.is_file():
        report.problems.append(Problem(where, "shard file is missing"))
        return
    sha256, num_bytes = _file_digest(path)
    if (sha256, num_bytes) != (entry.sha256, entry.num_bytes):
        report.problems.append(
            Problem(where, f"contents differ from the manifest: {num_bytes} bytes, sha256 {sha256[:12]}…; "
                           f"manifest: {entry.num_bytes} bytes, sha256 {entry.sha256[:12]}…")  # fmt: skip
        )
    count = 0
    try:
        for sample in iter_shard(str(path)):
            count += 1
            report.samples += 1
            bar.update()
            key = sample["__key__"]
            if key in keys:
                report.problems.append(Problem(where, "key appears twice in the split", key))
            keys.add(key)
            try:
                decode_sample(sample, num_classes)
            except CorruptSampleError as exc:
                report.problems.append(Problem(where, str(exc.__cause__ or exc), key))
    except ShardError as exc:
        report.problems.append(Problem(where, str(exc)))
    if count != entry.num_samples:
        report.problems.append(Problem(where, f"holds {count} samples, the manifest says {entry.num_samples}"))
    elif entry.offsets and entry.offsets != _sample_offsets(path):
        report.problems.append(Problem(where, "sample byte offsets differ from the manifest's"))


def _sample_offsets(path: Path) -> tuple[int, ...]:
    """Where every OFFSET_STRIDE-th sample's first member starts, found by tarfile itself."""
    starts, last_key = [], None
    with tarfile.open(path) as tar:
        for member in tar:
            key = member.name.split(".", 1)[0]
            if key != last_key:
                starts.append(member.offset)
                last_key = key
    return tuple(starts[::OFFSET_STRIDE])


def _file_digest(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest(), path.stat().st_size


# --------------------------------------------------------------------------------------------- inspect


def inspect_shards(out_dir: str | os.PathLike) -> str:
    """A summary table of a built dataset: per split its shards, samples, classes, image mode and size."""
    manifest = read_manifest(out_dir)
    splits = manifest.splits if isinstance(manifest, DatasetManifest) else {manifest.split: manifest}
    header = ("split", "shards", "samples", "classes", "mode", "size (HxW)", "MiB")
    rows = [header]
    for name, m in splits.items():
        h, w = m.image.height, m.image.width
        size = f"{h.min}x{w.min}" if m.image_size else f"{h.min}-{h.max}x{w.min}-{w.max}"
        modes = "/".join(sorted(m.image.modes))
        mib = sum(s.num_bytes for s in m.shards) / 2**20
        rows.append((name, str(len(m.shards)), str(m.num_samples), str(m.num_classes), modes, size, f"{mib:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]  # fmt: skip
    first = next(iter(splits.values()))
    lines.append(f"classes ({first.num_classes}): {', '.join(first.classes)}")
    lines.append(f"source: {first.source} ({first.source_format}), seed {first.seed}")
    return "\n".join(lines)
