"""The per-split manifest: what a split's shards hold. Written by the builder, trusted by the reader.

A built dataset is a directory of split directories, each holding its tar shards and a ``manifest.json``::

    OUT_DIR/train/train-000000.tar ... OUT_DIR/train/manifest.json
    OUT_DIR/val/...   OUT_DIR/test/...

Shards live next to their manifest, so a split is addressed by one *location*: a local directory, a URL
prefix (``https://host/fmnist/train``, ``gs://bucket/fmnist/train``, ``file:///data/train``), or a template
with a ``{name}`` placeholder for schemes that are commands rather than prefixes
(``pipe:aws s3 cp s3://bucket/fmnist/train/{name} -``).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from urllib.parse import urlparse

MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1
OFFSET_STRIDE = 64
NAME_PLACEHOLDER = "{name}"


class ManifestError(ValueError):
    """A manifest is missing, unreadable, or disagrees with itself or with its shards."""


@dataclass(frozen=True)
class ShardEntry:
    name: str
    num_samples: int
    sha256: str
    num_bytes: int
    # Byte offset in the tar of samples 0, OFFSET_STRIDE, 2 * OFFSET_STRIDE, ...: a reader whose range
    # starts mid-shard seeks there in a local file instead of parsing every sample before its range.
    offsets: tuple[int, ...] = ()


@dataclass(frozen=True)
class SizeStats:
    min: int
    max: int
    mean: float


@dataclass(frozen=True)
class ImageStats:
    modes: dict[str, int]  # PIL mode -> number of images
    formats: dict[str, int]  # stored encoding (png, jpg, ...) -> number of images
    width: SizeStats
    height: SizeStats


@dataclass(frozen=True)
class SplitManifest:
    """One split: its shards (in build order), classes, image statistics, and where it came from."""

    split: str
    classes: tuple[str, ...]
    shards: tuple[ShardEntry, ...]
    class_counts: tuple[int, ...]
    image: ImageStats
    source: str
    source_format: str
    seed: int
    # Where the manifest was read from, as a template with {name}; not stored in the file.
    location: str | None = field(default=None, compare=False)

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_mode(self) -> str:
        """The most common PIL mode ('L', 'RGB', ...); ``image.modes`` has them all."""
        return max(self.image.modes.items(), key=lambda kv: kv[1])[0]

    @property
    def channels(self) -> int:
        """1 when every image is single-channel greyscale, else 3 (the in_chans that loses nothing)."""
        return 1 if set(self.image.modes) <= _GREY_MODES else 3

    @property
    def image_size(self) -> tuple[int, int] | None:
        """(height, width) when all images share one size, else None (see ``image`` for the ranges)."""
        w, h = self.image.width, self.image.height
        return (h.min, w.min) if (w.min == w.max and h.min == h.max) else None

    def shard_urls(self) -> list[str]:
        if self.location is None:
            raise ManifestError(f"manifest of split {self.split!r} has no location to resolve its shard names")
        return [shard_url(self.location, s.name) for s in self.shards]

    def to_json(self) -> str:
        record = asdict(self)
        del record["location"]
        return json.dumps({"format_version": FORMAT_VERSION, **record}, indent=1)

    @classmethod
    def from_json(cls, text: str, *, location: str | None = None, origin: str = "manifest") -> "SplitManifest":
        try:
            record = json.loads(text)
            version = record.pop("format_version")
            if version != FORMAT_VERSION:
                raise ManifestError(f"{origin}: format_version {version}, this reader knows {FORMAT_VERSION}")
            image = record.pop("image")
            manifest = cls(
                classes=tuple(record.pop("classes")),
                shards=tuple(ShardEntry(**{**s, "offsets": tuple(s.get("offsets", ()))}) for s in record.pop("shards")),
                class_counts=tuple(record.pop("class_counts")),
                image=ImageStats(
                    modes=image["modes"],
                    formats=image["formats"],
                    width=SizeStats(**image["width"]),
                    height=SizeStats(**image["height"]),
                ),
                location=location,
                **record,
            )
        except ManifestError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise ManifestError(f"{origin}: not a valid shard manifest ({type(exc).__name__}: {exc})") from exc
        manifest._check(origin)
        return manifest

    def _check(self, origin: str) -> None:
        if len(self.class_counts) != self.num_classes:
            raise ManifestError(f"{origin}: {len(self.class_counts)} class counts for {self.num_classes} classes")
        if sum(self.class_counts) != self.num_samples:
            raise ManifestError(
                f"{origin}: class counts sum to {sum(self.class_counts)} but the shards hold {self.num_samples}"
            )
        names = [s.name for s in self.shards]
        if len(set(names)) != len(names):
            raise ManifestError(f"{origin}: duplicate shard names")


@dataclass(frozen=True)
class DatasetManifest:
    """All splits of a built dataset (a directory holding ``train/``, ``val/``, ``test/``)."""

    splits: dict[str, SplitManifest]

    def __getitem__(self, split: str) -> SplitManifest:
        if split not in self.splits:
            raise KeyError(f"no split {split!r}; this dataset has {sorted(self.splits)}")
        return self.splits[split]

    def __contains__(self, split: str) -> bool:
        return split in self.splits

    @property
    def _first(self) -> SplitManifest:
        return self.splits["train"] if "train" in self.splits else next(iter(self.splits.values()))

    @property
    def classes(self) -> tuple[str, ...]:
        return self._first.classes

    @property
    def num_classes(self) -> int:
        return self._first.num_classes

    @property
    def num_samples(self) -> dict[str, int]:
        """Samples per split (a dict here; ``SplitManifest.num_samples`` is an int)."""
        return {name: m.num_samples for name, m in self.splits.items()}

    @property
    def image_mode(self) -> str:
        return self._first.image_mode

    @property
    def channels(self) -> int:
        return max(m.channels for m in self.splits.values())

    @property
    def image_size(self) -> tuple[int, int] | None:
        sizes = {m.image_size for m in self.splits.values()}
        return sizes.pop() if len(sizes) == 1 else None


_GREY_MODES = {"1", "L", "I", "I;16", "F"}


def is_local(location: str) -> bool:
    scheme = urlparse(location).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt")


def is_http(location: str) -> bool:
    """An http(s) URL: a transport that can start at a byte offset (Range requests)."""
    return urlparse(location).scheme in ("http", "https")


def local_path(url: str) -> Path:
    """The filesystem path of a local path or ``file:`` URL."""
    parsed = urlparse(url)
    return Path(parsed.path if parsed.scheme == "file" else url)


def location_template(location: str | os.PathLike) -> str:
    """A split location as a template with ``{name}``: a directory or URL prefix gets ``/{name}`` appended."""
    location = os.fspath(location)
    if NAME_PLACEHOLDER in location:
        return location
    if is_local(location) and not location.startswith("file:"):
        return os.path.join(os.path.abspath(location), NAME_PLACEHOLDER)
    return location.rstrip("/") + "/" + NAME_PLACEHOLDER


def shard_url(template: str, name: str) -> str:
    # str.replace, not str.format: directory names may contain braces.
    return template.replace(NAME_PLACEHOLDER, name)


def read_manifest(location: str | os.PathLike) -> SplitManifest | DatasetManifest:
    """Read a split's manifest, or every split's when given a dataset root (local directories only).

    ``location``: a split directory, its ``manifest.json``, a dataset root holding split directories, or a
    split URL / ``{name}`` template (see the module docstring). Returns a ``SplitManifest`` for a split and
    a ``DatasetManifest`` for a root; both have ``classes``, ``num_classes``, ``num_samples``,
    ``image_mode``, ``image_size`` and ``channels``.
    """
    location = os.fspath(location)
    if is_local(location) and NAME_PLACEHOLDER not in location:
        path = local_path(location)
        if path.is_file():
            return _read_split(location_template(path.parent), origin=str(path))
        if (path / MANIFEST_NAME).is_file():
            return _read_split(location_template(path), origin=str(path / MANIFEST_NAME))
        splits = {s: path / s for s in SPLITS if (path / s / MANIFEST_NAME).is_file()}
        if not splits:
            what = "directory" if path.is_dir() else "path"
            raise ManifestError(
                f"{path}: no {MANIFEST_NAME} here or in {'/'.join(SPLITS)}/ below this {what}"
                f"{'' if path.exists() else ' (it does not exist)'}; build shards with `vitpipe shards build`"
            )
        manifests = {s: _read_split(location_template(p), origin=str(p / MANIFEST_NAME)) for s, p in splits.items()}
        classes = {m.classes for m in manifests.values()}
        if len(classes) > 1:
            raise ManifestError(f"{path}: the splits disagree on the class names")
        return DatasetManifest(manifests)
    template = location_template(location)
    return _read_split(template, origin=shard_url(template, MANIFEST_NAME))


def _read_split(template: str, *, origin: str) -> SplitManifest:
    from webdataset.gopen import gopen

    url = shard_url(template, MANIFEST_NAME)
    try:
        with gopen(url, "rb") as stream:
            text = stream.read().decode("utf-8")
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{origin}: cannot read the manifest ({type(exc).__name__}: {exc})") from exc
    return SplitManifest.from_json(text, location=template, origin=origin)


def write_manifest(manifest: SplitManifest, split_dir: Path) -> Path:
    """Write atomically: a manifest on disk means the split's shards are complete."""
    path = split_dir / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(manifest.to_json() + "\n")
    os.replace(tmp, path)
    return path


def image_stats(modes: Counter, formats: Counter, widths: list[int], heights: list[int]) -> ImageStats:
    def stats(values: list[int]) -> SizeStats:
        return SizeStats(min=min(values), max=max(values), mean=round(sum(values) / len(values), 3))

    return ImageStats(modes=dict(modes), formats=dict(formats), width=stats(widths), height=stats(heights))


def with_location(manifest: SplitManifest, location: str | os.PathLike) -> SplitManifest:
    return replace(manifest, location=location_template(location))
