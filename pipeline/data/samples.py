"""One sample in a shard: how it is keyed, stored, read back and decoded.

A sample is two tar members sharing a key: ``<key>.<ext>`` (the encoded image; ext = png, jpg, ...) and
``<key>.cls`` (the class index as decimal text), the WebDataset convention. Keys are
``<source split>-<index in that split>`` (``train-00012345``), so a bad sample can be traced to its source.
Shards are opened with webdataset's gopen (every URL scheme). ``iter_shard`` reads them with webdataset's tar
iterators, ``tar.read_shard`` (training) with the project's faster reader; both go through ``checked_samples``,
which adds the errors that name the shard and the sample key.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator
from typing import IO

from PIL import Image

from .manifest import ManifestError, is_http, local_path

IMAGE_EXTS = frozenset({"png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm"})
LABEL_EXT = "cls"


class ShardError(OSError):
    """A shard cannot be opened or read to the end (missing, truncated, not a tar)."""


class CorruptSampleError(ValueError):
    """A sample's image does not decode, or its label is missing or out of range."""


class ManifestMismatchError(ManifestError):
    """A shard holds a different number of samples than its manifest says."""


def sample_key(split: str, index: int) -> str:
    # No dots: webdataset splits a member name into key and extension at the first dot.
    return f"{split}-{index:08d}"


def sample_members(key: str, ext: str, data: bytes, label: int) -> dict:
    """The dict webdataset's TarWriter stores as one sample (encoder=False: values are bytes)."""
    return {"__key__": key, ext: data, LABEL_EXT: str(label).encode()}


def iter_shard(url: str, offset: int = 0) -> Iterator[dict]:
    """The samples of one shard as webdataset's tar iterators read them: dicts of raw bytes with ``__key__``
    and ``__url__`` (the independent reader ``verify_shards`` checks with; training reads ``tar.read_shard``).

    ``offset``: start at this byte offset, a sample boundary from the manifest (local files and http(s)).
    Raises ShardError naming the shard (and the last good key) when it cannot be opened or read.
    """
    from webdataset import tariterators

    def webdataset_samples(stream: IO[bytes]) -> Iterable[dict]:
        # tarfile ends quietly when a member header is cut off: the sample before it comes out partial,
        # which checked_samples reports as incomplete
        files = tariterators.tar_file_expander([{"url": url, "stream": stream}], eof_value={})
        return tariterators.group_by_keys(files)

    return checked_samples(url, offset, webdataset_samples)


def checked_samples(url: str, offset: int, read: Callable[[IO[bytes]], Iterable[dict]]) -> Iterator[dict]:
    """Open shard ``url`` (at byte ``offset``: local files, or an https range) and yield the samples ``read(stream)`` gives.

    Every failure becomes a ShardError naming the shard and the last good key: the shard cannot be opened,
    ``read`` raises, or a sample lacks its label or image (a truncated or damaged shard).
    """
    from webdataset.gopen import gopen

    try:
        if offset and is_http(url):
            stream = _http_range(url, offset)
        elif offset:
            stream = open(local_path(url), "rb")
            stream.seek(offset)
        else:
            stream = gopen(url, "rb")
    except Exception as exc:
        raise ShardError(f"shard {url}: cannot open ({type(exc).__name__}: {exc})") from exc
    last_key = None
    try:
        for sample in read(stream):
            if LABEL_EXT not in sample or not IMAGE_EXTS.intersection(sample):
                members = sorted(k for k in sample if not k.startswith("__"))
                raise ShardError(
                    f"shard {url}: sample {sample['__key__']!r} is incomplete (members {members}): "
                    f"the shard is truncated or damaged"
                )
            last_key = sample["__key__"]
            yield sample
    except ShardError:
        raise
    except Exception as exc:
        where = f"after sample {last_key!r}" if last_key else "before its first sample"
        cause = f"{type(exc).__name__}: {exc.args[0] if exc.args else ''}"
        status = _exit_status(stream)
        if status:
            cause += f"; the command exited with status {status}"
        raise ShardError(f"shard {url}: unreadable {where} ({cause})") from exc
    finally:
        try:
            stream.close()
        except Exception:
            pass  # a pipe we stopped reading early exits with SIGPIPE; nothing to report


def _http_range(url: str, offset: int):
    """A response streaming ``url`` from byte ``offset`` (an HTTP Range request; the server must honour it)."""
    import urllib.request

    response = urllib.request.urlopen(urllib.request.Request(url, headers={"Range": f"bytes={offset}-"}), timeout=60)
    if response.status != 206:  # the server sent the whole file: pass over the bytes before the offset
        left = offset
        while left > 0:
            chunk = response.read(min(left, 1 << 20))
            if not chunk:
                raise OSError(f"the shard ended before byte {offset}")
            left -= len(chunk)
    return response


def _exit_status(stream) -> int | None:
    """The exit status of a ``pipe:``/``gs:``/``http:`` stream's command (webdataset runs them as processes)."""
    process = getattr(stream, "proc", None)
    if process is None:
        return None
    try:
        return process.wait(timeout=10)
    except Exception:
        return None


def decode_sample(sample: dict, num_classes: int) -> tuple[Image.Image, int]:
    """The PIL image (fully loaded) and label of a raw sample; CorruptSampleError names shard and key."""
    key, url = sample.get("__key__"), sample.get("__url__")
    try:
        exts = [k for k in sample if k in IMAGE_EXTS]
        if len(exts) != 1:
            raise ValueError(f"expected one image member, found {exts or 'none'}")
        if LABEL_EXT not in sample:
            raise ValueError("no .cls label member")
        label = int(sample[LABEL_EXT])
        if not 0 <= label < num_classes:
            raise ValueError(f"label {label} outside 0..{num_classes - 1}")
        image = Image.open(io.BytesIO(sample[exts[0]]))
        image.load()
    except Exception as exc:
        raise CorruptSampleError(f"shard {url}: sample {key!r} is corrupt ({type(exc).__name__}: {exc})") from exc
    return image, label
