"""Image transforms: timm's ``create_transform`` behind one colour-mode conversion.

Train: random-resized crop, flip, colour jitter, optional RandAugment / AutoAugment / AugMix (timm's
``auto_augment`` strings, e.g. ``rand-m9-mstd0.5-inc1``), optional random erasing. Eval: resize and
centre crop. Images are first converted to the mode the model takes: greyscale data becomes RGB when
``in_chans=3`` and stays single-channel when ``in_chans=1``.

With ``normalize=False`` the transform stops at uint8 pixels and :class:`NormalizeOnDevice` does the rest on
the batch, where it is (the GPU): the training loader's form (timm's prefetcher recipe). The loader workers
then write, pin and copy a quarter of the bytes per image, and do no float arithmetic.
"""

from __future__ import annotations

import torch
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, auto_augment, create_transform
from timm.data.random_erasing import RandomErasing
from torchvision import transforms


class ConvertMode:
    """PIL image -> the given mode (a picklable callable, so DataLoader workers can use it under spawn)."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, image):
        return image if image.mode == self.mode else image.convert(self.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.mode!r})"


def default_normalisation(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std images are normalised with: ImageNet's (timm's default)."""
    if in_chans == 1:  # [ours] one channel: the average of ImageNet's per-channel statistics
        return (sum(IMAGENET_DEFAULT_MEAN) / 3,), (sum(IMAGENET_DEFAULT_STD) / 3,)
    return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)


def build_transform(
    img_size: int | tuple[int, int],
    *,
    train: bool,
    in_chans: int = 3,
    auto_augment: str | None = None,
    scale: tuple[float, float] | None = None,
    ratio: tuple[float, float] | None = None,
    hflip: float = 0.5,
    color_jitter: float = 0.4,
    re_prob: float = 0.0,
    interpolation: str = "bilinear",
    crop_pct: float | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    normalize: bool = True,
) -> transforms.Compose:
    """PIL image -> normalised FloatTensor[in_chans, H, W]; the knobs are timm's ``create_transform``'s.

    ``normalize=False``: uint8 Tensor[in_chans, H, W] instead, neither normalised nor erased (``re_prob`` is
    :class:`NormalizeOnDevice`'s then).
    """
    mean, std = _checked_normalisation(in_chans, mean, std)
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    timm_transform = create_transform(
        (in_chans, h, w),
        is_training=train,
        auto_augment=auto_augment,
        scale=scale,
        ratio=ratio,
        hflip=hflip,
        color_jitter=color_jitter or None,  # timm adds a ColorJitter for 0.0, which does nothing and costs time
        re_prob=re_prob,
        interpolation=interpolation,
        crop_pct=crop_pct,
        mean=tuple(mean),
        std=tuple(std),
        use_prefetcher=not normalize,
    )
    _allow_zero_bit_posterize(timm_transform)
    return transforms.Compose([ConvertMode("L" if in_chans == 1 else "RGB"), timm_transform])


class NormalizeOnDevice:
    """A batch of uint8 images -> normalised float images on the batch's device, then random erasing.

    The end of ``build_transform(..., train=True)`` for what ``build_transform(..., normalize=False)`` left
    off: the same mean and std, and timm's ``RandomErasing`` (``re_prob``) on the normalised pixels.
    """

    def __init__(self, in_chans: int = 3, *, re_prob: float = 0.0, mean=None, std=None, device="cpu"):
        mean, std = _checked_normalisation(in_chans, mean, std)
        self.mean = 255 * torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = 255 * torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.erase = RandomErasing(re_prob, mode="const", device=device) if re_prob > 0 else None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"NormalizeOnDevice takes uint8 images (build_transform(normalize=False)), got {images.dtype}")
        images = (images.float() - self.mean) / self.std
        return images if self.erase is None else self.erase(images)


def _checked_normalisation(in_chans: int, mean, std) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 (greyscale) or 3 (RGB), got {in_chans}")
    if mean is None or std is None:
        mean, std = default_normalisation(in_chans)
    if len(mean) != in_chans or len(std) != in_chans:
        raise ValueError(f"mean/std need {in_chans} value(s) for in_chans={in_chans}, got {mean} / {std}")
    return tuple(mean), tuple(std)


def posterize(image: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize, with 0 bits kept meaning black (what Pillow < 12 and the TF original did).

    timm's RandAugment/AutoAugment map the top magnitude to 0 bits (``rand-m9-mstd0.5-inc1`` reaches it
    now and then, ``m10`` every time); Pillow 12+ raises on 0, which would stop a training run mid-epoch.
    """
    if bits_to_keep >= 8:
        return image
    if bits_to_keep < 1:
        return Image.new(image.mode, image.size)
    return ImageOps.posterize(image, bits_to_keep)


def _allow_zero_bit_posterize(node) -> None:
    """Swap ``posterize`` into the augmentation ops of one built transform (no global patching)."""
    if isinstance(node, auto_augment.AugmentOp):
        if node.aug_fn is auto_augment.posterize:
            node.aug_fn = posterize
    elif isinstance(node, (list, tuple)):
        for child in node:
            _allow_zero_bit_posterize(child)
    else:
        for attr in ("transforms", "ops", "policy"):
            _allow_zero_bit_posterize(getattr(node, attr, ()))
