"""Image decoding policy and the resize / centre-crop spec shared by data and models.

Mode policy (one place, used by loaders and by validation):

- ``RGB`` is used as is; ``L`` and ``1`` (grayscale, bilevel) become RGB by repeating the
  channel; ``P`` (palette) is expanded through its palette; ``CMYK`` / ``YCbCr`` are converted
  by PIL.
- Images with alpha (``RGBA``, ``LA``, ``PA``, ``P`` with a transparency entry) are composited
  on black, i.e. every channel is multiplied by alpha.
- 16-bit and float modes (``I;16*``, ``I``, ``F``) are **rejected** with an error naming the
  file: scaling them to 8 bit needs a dataset-specific range, which the caller should choose.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
CONVERTED_MODES = ("1", "L", "P", "RGB", "RGBA", "LA", "PA", "CMYK", "YCbCr")
REJECTED_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
ALPHA_MODES = ("RGBA", "LA", "PA")


@dataclass(frozen=True)
class PreprocessSpec:
    """Resize the shorter side to ``resize`` with ``interpolation``, centre-crop ``crop``;
    ``mean``/``std`` normalise the [0,1] result for the model."""

    resize: int
    crop: int
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation {self.interpolation!r} not allowed; use one of {INTERPOLATIONS}"
            )
        if not (0 < self.crop <= self.resize):
            raise ValueError(f"need 0 < crop <= resize, got crop={self.crop} resize={self.resize}")


class ImageModeError(ValueError):
    """An image whose mode the policy rejects (16-bit, float)."""


def to_rgb(img: Image.Image, where: str | Path = "<image>") -> Image.Image:
    """Convert ``img`` to 8-bit RGB per the module's mode policy."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in REJECTED_MODES or mode.startswith("I;16"):
        raise ImageModeError(
            f"{where}: image mode {mode!r} (16-bit/float) is rejected; convert it to 8-bit "
            f"(allowed modes: {', '.join(CONVERTED_MODES)})"
        )
    if mode not in CONVERTED_MODES:
        raise ImageModeError(
            f"{where}: unsupported image mode {mode!r}; allowed: {', '.join(CONVERTED_MODES)}"
        )
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ALPHA_MODES:
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return img.convert("RGB")


class ImageReadError(ValueError):
    """An image file that cannot be read or decoded (missing, truncated, not an image)."""


def open_rgb(path: str | Path) -> Image.Image:
    """Open an image file and return it as RGB per the mode policy; ImageReadError naming the
    file when it is missing, truncated or not an image."""
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im, path)
    except ImageModeError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"{path}: cannot read the image ({exc}); re-fetch the dataset "
                             "(`cose data fetch NAME --force`) or `dvc pull` it") from None


def _interp(name: str):
    from torchvision.transforms import InterpolationMode

    return {
        "nearest": InterpolationMode.NEAREST,
        "bilinear": InterpolationMode.BILINEAR,
        "bicubic": InterpolationMode.BICUBIC,
    }[name]


def preprocess_pil(img: Image.Image, spec: PreprocessSpec) -> torch.Tensor:
    """RGB PIL image -> float tensor [3, crop, crop] in [0, 1] (resize shorter side, centre crop),
    the same operations as torchvision's ``Resize(resize) + CenterCrop(crop) + ToTensor()``."""
    import torchvision.transforms.functional as F

    img = F.resize(img, spec.resize, interpolation=_interp(spec.interpolation))
    img = F.center_crop(img, [spec.crop, spec.crop])
    return F.pil_to_tensor(img).float().div_(255.0)


def load_image(path: str | Path, spec: PreprocessSpec) -> torch.Tensor:
    """Read ``path``, apply the mode policy and ``spec``: float [3, crop, crop] in [0, 1]."""
    return preprocess_pil(open_rgb(path), spec)
