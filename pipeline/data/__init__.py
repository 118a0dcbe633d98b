"""The data plane: WebDataset shards from four input formats, and the balanced reader training uses.

    from pipeline.data import build_loader, build_transform, read_manifest

    info = read_manifest("shards/fmnist")            # classes, num_classes, num_samples, image_size, channels
    loader = build_loader("shards/fmnist/train", batch_size=128, rank=rank, world_size=world_size,
                          epoch=epoch, transform=build_transform(32, train=True, in_chans=3))
    for images, labels in loader:                     # len(loader) batches, the same on every rank
        ...
"""

from .manifest import DatasetManifest, ManifestError, SplitManifest, read_manifest
from .reader import IGNORE_LABEL, ShardLoader, build_loader, plan_epoch
from .samples import CorruptSampleError, ManifestMismatchError, ShardError
from .shards import VerifyReport, build_shards, inspect_shards, verify_shards, write_dataset
from .sources import FORMATS, SourceError
from .transforms import NormalizeOnDevice, build_transform

__all__ = [
    "FORMATS",
    "IGNORE_LABEL",
    "CorruptSampleError",
    "DatasetManifest",
    "ManifestError",
    "ManifestMismatchError",
    "NormalizeOnDevice",
    "ShardError",
    "ShardLoader",
    "SourceError",
    "SplitManifest",
    "VerifyReport",
    "build_loader",
    "build_shards",
    "build_transform",
    "inspect_shards",
    "plan_epoch",
    "read_manifest",
    "verify_shards",
    "write_dataset",
]
