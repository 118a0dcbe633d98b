"""The four input formats, each read into one shape: splits of (index, encoded image, label) examples.

A source knows its own splits (``train`` always; ``val`` / ``test`` when the format has them), its class
names, and yields its examples in an order shuffled by a given generator as far as the format allows
(fully for file lists and arrays; by row group and record batch for Parquet, which is streamed). The
builder decides everything else: the validation carve-out, shard boundaries, the manifest.

Images are kept as they came: files and Parquet bytes are stored untouched (their encoding detected by
PIL, not trusted from a file name); raw arrays (idx, CIFAR) become PNG.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

FORMATS = ("imagefolder", "idx", "parquet", "cifar")

# PIL format name -> the extension a stored image gets (webdataset decodes by extension).
IMAGE_EXTENSIONS = {
    "PNG": "png",
    "JPEG": "jpg",
    "WEBP": "webp",
    "BMP": "bmp",
    "GIF": "gif",
    "TIFF": "tiff",
    "PPM": "ppm",
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


class SourceError(ValueError):
    """The input dataset is missing, malformed, or not what --format says."""


@dataclass(frozen=True)
class Example:
    index: int  # position within its source split: the stored sample key is derived from it
    data: bytes  # the encoded image
    ext: str  # png, jpg, ...
    label: int
    mode: str | None = None  # PIL mode and (width, height) when the source knows them (raw arrays);
    size: tuple[int, int] | None = None  # otherwise the builder reads them from the image header


def encoded_extension(data: bytes, origin: str) -> str:
    """The stored extension for encoded image bytes, from what PIL finds in them."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
    except Exception as exc:
        raise SourceError(f"{origin}: not an image PIL can read ({exc})") from exc
    return IMAGE_EXTENSIONS.get(fmt, fmt.lower())


def encode_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


class Source:
    """Base of the formats: ``name``/``format`` for the manifest, ``classes``, ``split_sizes``, ``examples``."""

    format: str
    name: str
    classes: tuple[str, ...]

    def split_sizes(self) -> dict[str, int]:
        raise NotImplementedError

    def examples(self, split: str, rng: np.random.Generator) -> Iterator[Example]:
        raise NotImplementedError


class ArraySource(Source):
    """Raw uint8 image arrays (N, H, W) or (N, H, W, 3) per split, stored as PNG."""

    def __init__(
        self,
        splits: dict[str, tuple[np.ndarray, np.ndarray]],
        classes: Sequence[str],
        *,
        name: str,
        format: str = "array",
    ):
        for split, (images, labels) in splits.items():
            if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] != 3):
                raise SourceError(f"{name} [{split}]: images must be uint8 (N,H,W) or (N,H,W,3), got "
                                  f"{images.dtype} {images.shape}")  # fmt: skip
            if len(images) != len(labels):
                raise SourceError(f"{name} [{split}]: {len(images)} images but {len(labels)} labels")
        self.splits = splits
        self.classes = tuple(classes)
        self.name = name
        self.format = format

    def split_sizes(self) -> dict[str, int]:
        return {split: len(labels) for split, (_, labels) in self.splits.items()}

    def examples(self, split: str, rng: np.random.Generator) -> Iterator[Example]:
        images, labels = self.splits[split]
        mode, size = ("L" if images.ndim == 3 else "RGB"), (images.shape[2], images.shape[1])
        for i in rng.permutation(len(labels)):
            yield Example(int(i), encode_png(images[i]), "png", int(labels[i]), mode, size)


class ImageFolderSource(Source):
    """A tree of class folders, or of split folders (train/val/test) each holding class folders.

    Class index = position of the folder name in sorted order (torchvision's ImageFolder rule). Files
    whose extension PIL does not register are ignored, as are hidden files.
    """

    format = "imagefolder"

    def __init__(self, root: str | os.PathLike):
        root = Path(root)
        if not root.is_dir():
            raise SourceError(f"{root}: not a directory (imagefolder needs a tree of class folders)")
        self.name = str(root.resolve())
        children = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
        if "train" in children and children <= {"train", *_SPLIT_ALIASES}:
            split_dirs = {_SPLIT_ALIASES.get(c, c): root / c for c in sorted(children)}
            if len(split_dirs) < len(children):
                raise SourceError(f"{root}: several folders name the same split: {sorted(children)}")
        else:
            split_dirs = {"train": root}
        self.classes = tuple(sorted(_class_dirs(split_dirs["train"])))
        if not self.classes:
            raise SourceError(f"{split_dirs['train']}: no class folders")
        class_index = {c: i for i, c in enumerate(self.classes)}
        extensions = {ext.lower() for ext in Image.registered_extensions()}
        self.files: dict[str, list[tuple[Path, int]]] = {}
        for split, split_dir in split_dirs.items():
            unknown = set(_class_dirs(split_dir)) - set(self.classes)
            if unknown:
                raise SourceError(f"{split_dir}: class folders {sorted(unknown)} are not in train's classes")
            files = []
            for cls in sorted(_class_dirs(split_dir)):
                for path in sorted((split_dir / cls).rglob("*")):
                    if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in extensions:
                        files.append((path, class_index[cls]))
            if not files:
                raise SourceError(f"{split_dir}: no image files in its class folders")
            self.files[split] = files

    def split_sizes(self) -> dict[str, int]:
        return {split: len(files) for split, files in self.files.items()}

    def examples(self, split: str, rng: np.random.Generator) -> Iterator[Example]:
        files = self.files[split]
        for i in rng.permutation(len(files)):
            path, label = files[i]
            data = path.read_bytes()
            yield Example(int(i), data, encoded_extension(data, str(path)), label)


_SPLIT_ALIASES = {"val": "val", "valid": "val", "validation": "val", "test": "test"}


def _class_dirs(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")]


def read_idx(path: Path) -> np.ndarray:
    """An idx file (the MNIST format), gzipped or plain, as a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise SourceError(f"{path}: not an idx file (bad magic number)")
    if data[2] != 0x08:
        raise SourceError(f"{path}: idx element type 0x{data[2]:02x}; only unsigned bytes (0x08) are supported")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * d : 8 + 4 * d], "big") for d in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(shape)):
        raise SourceError(f"{path}: header says {shape} but holds {len(data) - offset} bytes (truncated?)")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def idx_source(directory: str | os.PathLike, class_names: Sequence[str] | None = None) -> ArraySource:
    """MNIST-style idx files: ``train-images-idx3-ubyte[.gz]`` + labels, and ``t10k-*`` as the test split."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SourceError(f"{directory}: not a directory (idx needs the folder holding the *-idx3-ubyte files)")
    splits = {}
    for prefix, split in (("train", "train"), ("t10k", "test")):
        images, labels = _find_idx(directory, prefix, "images", 3), _find_idx(directory, prefix, "labels", 1)
        if images is None and labels is None:
            continue
        if images is None or labels is None:
            raise SourceError(f"{directory}: {prefix} images and labels must both be present")
        splits[split] = (read_idx(images), read_idx(labels).astype(np.int64))
    if "train" not in splits:
        raise SourceError(f"{directory}: no train-images-idx3-ubyte[.gz] / train-labels-idx1-ubyte[.gz]")
    num_classes = int(max(labels.max() for _, labels in splits.values())) + 1
    if class_names is None:
        # [ours] idx files carry no class names: Fashion-MNIST's by folder name, else the digits.
        fashion = "fashion" in directory.resolve().name.lower() and num_classes == len(FASHION_MNIST_CLASSES)
        class_names = FASHION_MNIST_CLASSES if fashion else tuple(str(i) for i in range(num_classes))
    _check_class_names(class_names, num_classes, str(directory))
    return ArraySource(splits, class_names, name=str(directory.resolve()), format="idx")


def _find_idx(directory: Path, prefix: str, kind: str, ndim: int) -> Path | None:
    pattern = re.compile(rf"^{prefix}-{kind}[-.]idx{ndim}-ubyte(\.gz)?$")
    matches = sorted(p for p in directory.iterdir() if pattern.match(p.name))
    if len(matches) > 1:
        raise SourceError(f"{directory}: several {prefix} {kind} files: {[p.name for p in matches]}")
    return matches[0] if matches else None


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR batches hold dicts of numpy arrays, lists and strings: refuse any other global."""

    _allowed = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes under pickle protocol 2 (re-saved batches)
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._allowed:
            raise pickle.UnpicklingError(f"CIFAR batch refers to {module}.{name}, which a CIFAR batch never does")
        return super().find_class(module, name)


def _unpickle(data: bytes, origin: str) -> dict:
    try:
        record = _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:
        raise SourceError(f"{origin}: not a CIFAR python batch ({exc})") from exc
    if not isinstance(record, dict):
        raise SourceError(f"{origin}: not a CIFAR python batch (holds a {type(record).__name__})")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in record.items()}


def cifar_source(path: str | os.PathLike) -> ArraySource:
    """CIFAR-10 / CIFAR-100 python batches: the extracted folder or the downloaded ``.tar.gz``.

    CIFAR-10: ``data_batch_1..5`` + ``test_batch`` + ``batches.meta``; CIFAR-100: ``train`` + ``test`` + ``meta``
    (fine labels).
    """
    path = Path(path)
    files = _cifar_files(path)
    if "batches.meta" in files:
        meta, label_key, names_key = "batches.meta", "labels", "label_names"
        train_names = sorted(n for n in files if re.fullmatch(r"data_batch_\d+", n))
        test_names = ["test_batch"] if "test_batch" in files else []
    elif "meta" in files:
        meta, label_key, names_key = "meta", "fine_labels", "fine_label_names"
        train_names = ["train"] if "train" in files else []
        test_names = ["test"] if "test" in files else []
    else:
        raise SourceError(f"{path}: no CIFAR batches.meta (CIFAR-10) or meta (CIFAR-100) file")
    if not train_names:
        raise SourceError(f"{path}: no CIFAR training batches")
    classes = tuple(_text(n) for n in _unpickle(files[meta](), f"{path}/{meta}")[names_key])
    splits = {}
    for split, names in (("train", train_names), ("test", test_names)):
        if not names:
            continue
        images, labels = [], []
        for name in names:
            batch = _unpickle(files[name](), f"{path}/{name}")
            if "data" not in batch or label_key not in batch:
                raise SourceError(f"{path}/{name}: CIFAR batch without 'data' and '{label_key}'")
            data = np.asarray(batch["data"], dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise SourceError(f"{path}/{name}: data of shape {data.shape}, expected (N, 3072)")
            # Rows are the red, green and blue 32x32 planes one after another.
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(batch[label_key], dtype=np.int64))
        splits[split] = (np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels))
        _check_class_names(classes, int(splits[split][1].max()) + 1, str(path))
    return ArraySource(splits, classes, name=str(path.resolve()), format="cifar")


def _cifar_files(path: Path) -> dict:
    """Batch file name -> a function returning its bytes, from a folder or a .tar.gz archive."""
    if path.is_dir():
        inner = [p for p in path.iterdir() if p.is_dir()]
        if not (path / "batches.meta").exists() and not (path / "meta").exists() and len(inner) == 1:
            path = inner[0]  # the folder that holds the extracted archive
        return {p.name: p.read_bytes for p in path.iterdir() if p.is_file()}
    if path.is_file() and tarfile.is_tarfile(path):
        with tarfile.open(path) as archive:
            members = {Path(m.name).name: archive.extractfile(m).read() for m in archive if m.isfile()}
        return {name: (lambda data=data: data) for name, data in members.items()}
    raise SourceError(f"{path}: neither a folder of CIFAR batches nor a CIFAR .tar.gz")


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class ParquetSource(Source):
    """Parquet files with an image-bytes column and a label column, streamed in record batches.

    ``path``: one file (train only), or a folder whose ``*.parquet`` files are grouped into splits by a
    ``train`` / ``val`` / ``validation`` / ``test`` word in their relative path (files with none: train).
    The image column is binary, or a struct with a ``bytes`` field (the Hugging Face ``Image`` feature).
    Labels: integers (class names from ``class_names``, else Hugging Face ``ClassLabel`` metadata, else
    the numbers), or strings (classes = sorted distinct values).

    [ours] Order: streaming rules out a global shuffle, so row groups are visited in a random order and
    the rows of each record batch shuffled; a table sorted by label needs several row groups to mix well.
    """

    format = "parquet"

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        image_column: str = "image",
        label_column: str = "label",
        class_names: Sequence[str] | None = None,
        batch_rows: int = 1024,
    ):
        import pyarrow.parquet as pq

        path = Path(path)
        self.name = str(path.resolve())
        self.image_column, self.label_column, self.batch_rows = image_column, label_column, batch_rows
        if path.is_file():
            grouped = {"train": [path]}
        elif path.is_dir():
            grouped = {}
            for file in sorted(path.rglob("*.parquet")):
                grouped.setdefault(_split_of(file.relative_to(path)), []).append(file)
        else:
            raise SourceError(f"{path}: no such Parquet file or folder")
        if "train" not in grouped:
            raise SourceError(f"{path}: no Parquet files for the train split")
        self.files = {split: [pq.ParquetFile(f) for f in files] for split, files in grouped.items()}
        for split, files in grouped.items():
            for file, pf in zip(files, self.files[split]):
                names = pf.schema_arrow.names
                for column in (image_column, label_column):
                    if column not in names:
                        raise SourceError(f"{file}: no column {column!r} (columns: {names})")
        self.paths = grouped
        self.classes, self._label_index = self._scan_labels(class_names)

    def _scan_labels(self, class_names):
        """One pass over the label column alone: the class names and a check that every label fits them."""
        import pyarrow as pa
        import pyarrow.compute as pc

        label_type = self.files["train"][0].schema_arrow.field(self.label_column).type
        values = set()
        for files in self.files.values():
            for pf in files:
                column = pf.read(columns=[self.label_column]).column(0)
                if column.null_count:
                    raise SourceError(f"{self._path(pf)}: {column.null_count} rows without a label")
                values.update(pc.unique(column).to_pylist())
        if pa.types.is_string(label_type) or pa.types.is_large_string(label_type):
            classes = tuple(sorted(values))
            if class_names is not None and tuple(class_names) != classes:
                raise SourceError(f"{self.name}: string labels are their own class names; drop --class-names")
            return classes, {name: i for i, name in enumerate(classes)}
        if not pa.types.is_integer(label_type):
            raise SourceError(f"{self.name}: label column {self.label_column!r} is {label_type}, not int or string")
        if min(values) < 0:
            raise SourceError(f"{self.name}: negative label {min(values)} in {self.label_column!r}")
        num_classes = max(values) + 1
        if class_names is None:
            class_names = _hf_class_names(self.files["train"][0], self.label_column)
        if class_names is None:
            class_names = tuple(str(i) for i in range(num_classes))
        _check_class_names(class_names, num_classes, self.name)
        return tuple(class_names), None

    def _path(self, pf) -> str:
        for split, files in self.files.items():
            if pf in files:
                return str(self.paths[split][files.index(pf)])
        return self.name

    def split_sizes(self) -> dict[str, int]:
        return {split: sum(pf.metadata.num_rows for pf in files) for split, files in self.files.items()}

    def examples(self, split: str, rng: np.random.Generator) -> Iterator[Example]:
        row_groups = []  # (file, group, index of its first row within the split)
        offset = 0
        for pf in self.files[split]:
            for g in range(pf.num_row_groups):
                row_groups.append((pf, g, offset))
                offset += pf.metadata.row_group(g).num_rows
        for j in rng.permutation(len(row_groups)):
            pf, group, first = row_groups[j]
            columns = [self.image_column, self.label_column]
            for batch in pf.iter_batches(batch_size=self.batch_rows, row_groups=[group], columns=columns):
                images = _image_bytes(batch.column(0), self._path(pf))
                labels = batch.column(1).to_pylist()
                for i in rng.permutation(len(labels)):
                    index = first + int(i)
                    data = images[i]
                    if data is None:
                        raise SourceError(f"{self._path(pf)}: row {index} has no image bytes")
                    label = labels[i] if self._label_index is None else self._label_index[labels[i]]
                    yield Example(index, data, encoded_extension(data, f"{self._path(pf)} row {index}"), label)
                first += len(labels)


def _split_of(relative: Path) -> str:
    for word in re.split(r"[^a-z]+", str(relative).lower()):
        if word == "train" or word in _SPLIT_ALIASES:
            return _SPLIT_ALIASES.get(word, word)
    return "train"


def _image_bytes(column, origin: str) -> list:
    import pyarrow as pa

    if pa.types.is_struct(column.type):
        if column.type.get_field_index("bytes") < 0:
            raise SourceError(f"{origin}: image column is a struct without a 'bytes' field")
        column = column.field("bytes")
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        raise SourceError(f"{origin}: image column holds {column.type}, not encoded image bytes")
    return column.to_pylist()


def _hf_class_names(pf, label_column: str) -> tuple[str, ...] | None:
    """Class names from the Hugging Face ``datasets`` schema metadata, when the table was written by it."""
    metadata = pf.schema_arrow.metadata or {}
    try:
        features = json.loads(metadata[b"huggingface"])["info"]["features"]
        return tuple(features[label_column]["names"])
    except (KeyError, TypeError, ValueError):
        return None


def _check_class_names(class_names: Sequence[str], num_classes: int, origin: str) -> None:
    if len(class_names) < num_classes:
        raise SourceError(f"{origin}: labels go up to {num_classes - 1} but only {len(class_names)} class names")
    if len(set(class_names)) != len(class_names):
        raise SourceError(f"{origin}: duplicate class names")


def open_source(
    path: str | os.PathLike,
    format: str,
    *,
    image_column: str = "image",
    label_column: str = "label",
    class_names: Sequence[str] | None = None,
) -> Source:
    """The source reader for ``format`` (one of FORMATS) at ``path``."""
    if format not in FORMATS:
        raise SourceError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if class_names is not None and format not in ("idx", "parquet"):
        raise SourceError(f"--class-names applies to idx and parquet; {format} names its classes itself")
    if format == "imagefolder":
        return ImageFolderSource(path)
    if format == "idx":
        return idx_source(path, class_names)
    if format == "parquet":
        return ParquetSource(path, image_column=image_column, label_column=label_column, class_names=class_names)
    return cifar_source(path)
