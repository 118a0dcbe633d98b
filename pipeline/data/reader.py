"""The training reader: balanced, reshuffled, multi-process batches from WebDataset shards.

Every rank must yield the same number of batches per epoch, or DDP hangs in allreduce; shards are
rarely all the same size. The partition (``plan_epoch``):

* train: order the shards by a permutation drawn from (seed, epoch) and lay their samples end to end;
  rank r takes the r-th of ``world_size`` contiguous, equally long ranges, each a whole number of batches
  (at most ``world_size * batch_size - 1`` samples at the tail are dropped, different ones each epoch).
* eval: manifest order, no shuffling; ranks split the samples as evenly as possible and every sample is
  read exactly once; ranks that come out a batch short are padded with label ``-1`` rows (zeros images),
  which the training loop ignores, so metrics over all ranks are exact.

A rank's range is split across its DataLoader workers the same way, a whole number of batches each, so
workers batch and collate themselves. A worker reads only the shards its range overlaps; in a local
shard it seeks close to its range with the byte offsets the manifest keeps, over https it asks for that
byte range (a ``pipe:`` stream is read from its start and the samples before the range passed over
undecoded). A remote read that breaks (a reset connection, a failed ``aws s3 cp``) is re-opened at the
next sample, up to ``REMOTE_RETRIES`` times, before its ShardError stands. Tar parsing is
``pipeline.data.tar``'s, ~10x cheaper per sample than tarfile's. It shuffles (train) through a
buffer of raw samples, decodes with PIL and applies the transform. Corrupt samples raise an error
naming shard and key; with ``skip_corrupt=True`` they become label ``-1`` rows instead (batch counts
stay equal) and are counted in ``ShardLoader.skipped``.
"""

from __future__ import annotations

import gc
import itertools
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from torchvision.transforms.functional import pil_to_tensor

from .manifest import (
    OFFSET_STRIDE,
    DatasetManifest,
    ManifestError,
    SplitManifest,
    is_http,
    is_local,
    local_path,
    location_template,
    read_manifest,
    with_location,
)
from .samples import CorruptSampleError, ManifestMismatchError, ShardError, decode_sample
from .tar import read_shard

__all__ = ["ShardLoader", "Segment", "WorkerPlan", "build_loader", "plan_epoch", "read_manifest"]

IGNORE_LABEL = -1
REMOTE_RETRIES = 3  # re-opens of a remote shard whose read breaks, before its ShardError stands


@dataclass(frozen=True)
class Segment:
    """Samples ``[start, stop)`` (positions within the shard) of shard ``shard`` (its manifest index)."""

    shard: int
    start: int
    stop: int


@dataclass(frozen=True)
class WorkerPlan:
    segments: tuple[Segment, ...]
    num_batches: int  # batches this worker yields; num_batches * batch_size - num_real rows are padding

    @property
    def num_real(self) -> int:
        return sum(s.stop - s.start for s in self.segments)


def plan_epoch(
    shard_sizes: Sequence[int],
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 1,
    epoch: int = 0,
    seed: int = 0,
    train: bool = True,
) -> list[WorkerPlan]:
    """What each of a rank's DataLoader workers reads this epoch (see the module docstring)."""
    total = sum(shard_sizes)
    if total == 0:
        raise ValueError("the split holds no samples")
    if train:
        order = np.random.default_rng([seed, epoch]).permutation(len(shard_sizes))
        batches = total // (world_size * batch_size)
        if batches == 0:
            raise ValueError(
                f"{total} samples make no full batch per rank: world_size {world_size} x batch_size "
                f"{batch_size} = {world_size * batch_size}; use a smaller batch size"
            )
        rank_start, rank_real = rank * batches * batch_size, batches * batch_size
    else:
        order = np.arange(len(shard_sizes))
        base, extra = divmod(total, world_size)
        rank_start, rank_real = rank * base + min(rank, extra), base + (rank < extra)
        batches = -(-(base + (extra > 0)) // batch_size)  # the longest rank's batches, for every rank
    offsets = np.concatenate([[0], np.cumsum([shard_sizes[i] for i in order])])
    plans, first_batch = [], 0
    for worker in range(num_workers):
        worker_batches = batches // num_workers + (worker < batches % num_workers)
        lo = min(first_batch * batch_size, rank_real)
        hi = min((first_batch + worker_batches) * batch_size, rank_real)
        plans.append(WorkerPlan(_segments(order, offsets, rank_start + lo, rank_start + hi), worker_batches))
        first_batch += worker_batches
    return plans


def _segments(order: np.ndarray, offsets: np.ndarray, lo: int, hi: int) -> tuple[Segment, ...]:
    """The pieces of shards that cover positions [lo, hi) of the end-to-end sample order."""
    segments = []
    first = int(np.searchsorted(offsets, lo, side="right")) - 1
    for position in range(max(first, 0), len(order)):
        begin, end = int(offsets[position]), int(offsets[position + 1])
        if begin >= hi:
            break
        start, stop = max(lo, begin), min(hi, end)
        if start < stop:
            segments.append(Segment(int(order[position]), start - begin, stop - begin))
    return tuple(segments)


def default_transform(image: Image.Image) -> torch.Tensor:
    """Pixels as they are stored, as floats in [0, 1], (C, H, W): no resizing or normalisation."""
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    return pil_to_tensor(image).float().div_(255)


class _EpochStream(IterableDataset):
    """The samples of one rank for one epoch; each DataLoader worker yields its own whole batches."""

    def __init__(self, manifest: SplitManifest, urls: list[str], *, batch_size, rank, world_size, epoch, seed,
                 train, transform, shuffle_buffer, skip_corrupt, num_workers):  # fmt: skip
        super().__init__()
        self.manifest, self.urls = manifest, urls
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.epoch, self.seed, self.train = epoch, seed, train
        self.transform = transform or default_transform
        self.shuffle_buffer, self.skip_corrupt, self.num_workers = shuffle_buffer, skip_corrupt, num_workers
        self.start_batch = 0  # a resumed epoch: the batches before it pass undecoded

    def plans(self) -> list[WorkerPlan]:
        return plan_epoch(
            [s.num_samples for s in self.manifest.shards], batch_size=self.batch_size, rank=self.rank,
            world_size=self.world_size, num_workers=max(self.num_workers, 1), epoch=self.epoch, seed=self.seed,
            train=self.train,
        )  # fmt: skip

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        info = get_worker_info()
        # The DataLoader takes whole batches from its workers in turn, so batch b of the plan is worker
        # b % n's. Resumed at batch k, the loader's first worker plays the plan's worker k % n, and each skips
        # its share of the first k batches by reading past their samples: same plan, same shuffle, same order.
        n, k = max(self.num_workers, 1), self.start_batch
        worker = ((info.id if info is not None else 0) + k) % n
        plan = self.plans()[worker]
        samples = self._read(plan.segments)
        if self.train and self.shuffle_buffer > 1:
            state = np.random.SeedSequence([self.seed, self.epoch, self.rank, worker]).generate_state(1)
            rng = random.Random(int(state[0]))
            samples = _shuffled(samples, self.shuffle_buffer, rng)
        skip = k // n + (worker < k % n)
        if skip:
            samples = itertools.islice(samples, skip * self.batch_size, None)
            plan = WorkerPlan(plan.segments, plan.num_batches - skip)
        yield from self._batches(samples, plan)

    def _read(self, segments: Sequence[Segment]) -> Iterator[dict]:
        for segment in segments:
            yield from self._read_segment(segment)

    def _read_segment(self, segment: Segment) -> Iterator[dict]:
        """The segment's samples; a remote shard whose read breaks is re-opened at the next sample (a byte
        range over https, else read past what was yielded), up to ``REMOTE_RETRIES`` times with backoff."""
        entry, url = self.manifest.shards[segment.shard], self.urls[segment.shard]
        position = segment.start  # the next sample to yield
        for attempt in range(REMOTE_RETRIES + 1):
            try:
                for sample in self._samples(entry, url, position, segment.stop):
                    yield sample
                    position += 1
                return
            except ShardError as err:
                if is_local(url) or isinstance(err, ManifestMismatchError) or attempt == REMOTE_RETRIES:
                    raise
                delay = 2.0**attempt
                print(f"[vitpipe] {err}; re-opening at sample {position} in {delay:.0f} s (retry {attempt + 1} of "
                      f"{REMOTE_RETRIES})", flush=True)  # fmt: skip
                time.sleep(delay)

    def _samples(self, entry, url: str, start: int, stop: int) -> Iterator[dict]:
        """Samples ``[start, stop)`` of one shard, opened at the manifest's byte offset nearest below ``start``
        where the transport can seek (local files, https ranges)."""
        position, offset = 0, 0
        jump = min(start // OFFSET_STRIDE, len(entry.offsets) - 1)
        if jump > 0 and (is_local(url) or is_http(url)):
            position, offset = jump * OFFSET_STRIDE, entry.offsets[jump]
        samples = read_shard(url, offset)
        for sample in samples:
            if position >= start:
                yield sample
            position += 1
            if position == stop:
                break
        if position < stop:
            raise ManifestMismatchError(f"shard {url}: ended after {position} samples, the manifest says {entry.num_samples}")
        if stop == entry.num_samples and next(samples, None) is not None:
            raise ManifestMismatchError(f"shard {url}: holds more than the {entry.num_samples} samples its manifest lists")
        samples.close()

    def _batches(self, samples: Iterator[dict], plan: WorkerPlan) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        images, labels, skipped = [], [], 0
        remaining = plan.num_batches
        for sample in samples:
            try:
                image, label = decode_sample(sample, self.manifest.num_classes)
            except CorruptSampleError:
                if not self.skip_corrupt:
                    raise
                image, label = None, IGNORE_LABEL
                skipped += 1
            images.append(None if image is None else self.transform(image))  # transform errors: never skipped
            labels.append(label)
            if len(labels) == self.batch_size:
                yield self._collate(images), torch.tensor(labels), skipped
                images, labels, skipped = [], [], 0
                remaining -= 1
        # Eval padding: fill the last batch, and any batch this worker has no samples for, with label -1.
        while remaining > 0:
            pad = self.batch_size - len(labels)
            images += [None] * pad
            labels += [IGNORE_LABEL] * pad
            yield self._collate(images), torch.tensor(labels), skipped
            images, labels, skipped = [], [], 0
            remaining -= 1

    def _collate(self, images: list) -> torch.Tensor:
        like = next((x for x in images if x is not None), None)
        if like is None:
            like = self._blank_image()
        padded = [x if x is not None else torch.zeros_like(like) for x in images]
        try:
            return default_collate(padded)  # in a worker it stacks straight into shared memory: no extra copy
        except RuntimeError as exc:
            shapes = sorted({tuple(x.shape) for x in padded})
            raise ValueError(
                f"images of different shapes {shapes} in one batch: give a transform that resizes "
                f"(pipeline.data.build_transform)"
            ) from exc

    def _blank_image(self) -> torch.Tensor:
        """A padding image shaped like the transform's output, for batches without a single real sample."""
        mode = self.manifest.image_mode
        h, w = self.manifest.image.height.max, self.manifest.image.width.max
        return torch.zeros_like(self.transform(Image.new(mode, (w, h))))


def _shuffled(samples: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """A shuffle buffer: fill to ``size``, then yield a random resident for each sample that arrives."""
    buffer = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = rng.randrange(size)
        buffer[i], sample = sample, buffer[i]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


def _freeze_inherited_objects(_worker_id: int) -> None:
    """Exempt what a forked worker inherits from its garbage collector.

    Tar reading allocates many small containers, so collections run often; each full one would walk the
    parent's whole heap (torch, timm, the trainer: ~400k objects) and, by touching it, copy its pages
    out of the memory shared with the parent. Measured: ~25% of a worker's CPU on 28x28 images.
    """
    gc.freeze()


class ShardLoader:
    """Batches ``(images FloatTensor[B, C, H, W], labels LongTensor[B])`` of one rank for one epoch.

    ``len(loader)`` is the number of batches, the same on every rank (computed from the manifest).
    ``skipped`` counts corrupt samples skipped so far (``skip_corrupt=True``). ``set_epoch`` moves to
    another epoch's partition and shuffle; iterating twice without it repeats the same epoch.
    """

    def __init__(self, stream: _EpochStream, *, num_workers: int, pin_memory: bool):
        self._stream, self.num_workers, self.pin_memory = stream, num_workers, pin_memory
        self.skipped = 0

    @property
    def manifest(self) -> SplitManifest:
        return self._stream.manifest

    @property
    def epoch(self) -> int:
        return self._stream.epoch

    @property
    def batch_size(self) -> int:
        return self._stream.batch_size

    def set_epoch(self, epoch: int) -> None:
        self._stream.epoch = epoch
        self._stream.start_batch = 0

    def set_start(self, batch: int) -> None:
        """Resume this epoch at ``batch``: the next iteration yields batches ``batch, batch + 1, ...`` of the plan."""
        if not 0 <= batch <= len(self):
            raise ValueError(f"start batch {batch} is outside this epoch's {len(self)} batches")
        self._stream.start_batch = batch

    @property
    def start_batch(self) -> int:
        return self._stream.start_batch

    def __len__(self) -> int:
        return sum(plan.num_batches for plan in self._stream.plans())

    @property
    def num_samples(self) -> int:
        """Real (not padding) samples this rank reads this epoch."""
        return sum(plan.num_real for plan in self._stream.plans())

    @property
    def dropped(self) -> int:
        """Samples of the split no rank reads this epoch (train only; always < world_size * batch_size)."""
        s = self._stream
        return 0 if not s.train else self.manifest.num_samples - s.world_size * len(self) * s.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = DataLoader(self._stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            worker_init_fn=_freeze_inherited_objects)  # fmt: skip
        expected, produced = len(self) - self.start_batch, 0
        for images, labels, skipped in loader:
            self.skipped += skipped
            produced += 1
            yield images, labels
        if produced != expected:  # would desynchronise DDP ranks: never let it pass silently
            raise RuntimeError(f"reader yielded {produced} batches, planned {expected}")


def build_loader(
    source: str | os.PathLike | SplitManifest | Sequence[str],
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    seed: int = 0,
    train: bool = True,
    transform: Callable[[Image.Image], torch.Tensor] | None = None,
    num_workers: int = 2,
    shuffle_buffer: int = 1000,
    skip_corrupt: bool = False,
    manifest: SplitManifest | str | os.PathLike | None = None,
    pin_memory: bool = False,
) -> ShardLoader:
    """A ``ShardLoader`` over one split for one rank (see the module docstring for the guarantees).

    ``source``: a split directory (holding its ``manifest.json``), a split URL prefix
    (``https://host/data/train``, ``gs://bucket/data/train``), a template with ``{name}``
    (``pipe:aws s3 cp s3://bucket/data/train/{name} -``), a ``SplitManifest``, or an explicit list of shard
    URLs together with ``manifest=`` (its manifest, or where to read it); each URL is matched to the
    manifest's shard whose name it contains. ``transform`` maps a PIL image to a tensor (default: the
    stored pixels in [0, 1]; use ``build_transform``). ``shuffle_buffer`` counts raw samples per worker.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1} (world_size {world_size})")
    split_manifest, urls = resolve_shards(source, manifest)
    stream = _EpochStream(
        split_manifest, urls, batch_size=batch_size, rank=rank, world_size=world_size, epoch=epoch, seed=seed,
        train=train, transform=transform, shuffle_buffer=shuffle_buffer, skip_corrupt=skip_corrupt,
        num_workers=num_workers,
    )  # fmt: skip
    stream.plans()  # fail here, not in a worker, when the split is too small for the batch size
    return ShardLoader(stream, num_workers=num_workers, pin_memory=pin_memory)


def resolve_shards(source, manifest=None) -> tuple[SplitManifest, list[str]]:
    """The split's manifest and one URL per manifest shard; local shards are checked to exist."""
    if isinstance(source, SplitManifest):
        split_manifest, urls = source, source.shard_urls()
    elif isinstance(source, (str, os.PathLike)):
        split_manifest = _split_manifest(read_manifest(source), source)
        urls = split_manifest.shard_urls()
    else:
        urls = [os.fspath(u) for u in source]
        if manifest is None:
            raise ManifestError("a list of shard URLs needs its manifest: pass manifest= (a SplitManifest or path)")
        if not isinstance(manifest, SplitManifest):
            manifest = _split_manifest(read_manifest(manifest), manifest)
        split_manifest = manifest
        urls = _match_urls(urls, split_manifest)
    missing = [u for u in urls if is_local(u) and not local_path(u).is_file()]
    if missing:
        raise ShardError(f"split {split_manifest.split!r}: {len(missing)} shard(s) missing: {', '.join(missing)}")
    return split_manifest, urls


def _split_manifest(found: SplitManifest | DatasetManifest, where) -> SplitManifest:
    if isinstance(found, DatasetManifest):
        raise ManifestError(
            f"{where} is a dataset root with splits {sorted(found.splits)}; point the reader at one split, "
            f"e.g. {os.path.join(os.fspath(where), 'train')}"
        )
    return found


def _match_urls(urls: list[str], manifest: SplitManifest) -> list[str]:
    by_shard = {}
    for url in urls:
        names = [s.name for s in manifest.shards if s.name in url]
        if len(names) != 1:
            raise ManifestError(f"shard URL {url!r} matches {names or 'no'} shard names of the manifest")
        if names[0] in by_shard:
            raise ManifestError(f"shard {names[0]} given twice: {by_shard[names[0]]!r} and {url!r}")
        by_shard[names[0]] = url
    absent = [s.name for s in manifest.shards if s.name not in by_shard]
    if absent:
        raise ManifestError(f"the manifest lists shards with no URL given: {', '.join(absent)}")
    return [by_shard[s.name] for s in manifest.shards]


# Re-exported so a training loop needs one import; with_location/location_template help remote setups.
__all__ += ["with_location", "location_template", "default_transform", "resolve_shards", "IGNORE_LABEL"]
