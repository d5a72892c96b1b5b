"""Image transforms (torchvision v1), as in DESIGN section 2.

- training: colour jitter (brightness 0.7, contrast 0.7, saturation 0.7, hue 0.5), resize to
  ``height x width``, tensor, NetVLAD normalisation;
- test: resize to ``height x width``, tensor, normalisation;
- Tokyo 24/7 queries: aspect-preserving resize instead, by one of two rules
  (``data.aspect_resize``):

  * ``short_side`` (default, the reference's ``Resize(max(height, width))``): the image's
    *shorter* side becomes ``max(height, width)`` and the longer one follows
    (torchvision's rounding down); at the default 480x640 a 4:3 query becomes 640x853, a
    16:9 one 640x1137, a 3:4 portrait one 853x640: larger than the 480x640 database images,
    as the published Tokyo numbers were computed;
  * ``fit_box``: the configured box is turned like the image and the image scaled into it,
    by ``min(long_box / long_img, short_box / short_img)``; a 4:3 query becomes 480x640, a
    16:9 one 360x640, a 3:4 one 640x480 (not comparable with published numbers).

  Images in a batch can then differ in size (evaluate Tokyo queries with batch size 1).

With ``data.jitter_on_device`` the training loader stops after the resize (``uint8`` tensors,
``train_resize``) and ``DeviceColorJitter`` jitters and normalises the batch on the training
device: torchvision v2 ``ColorJitter``, the same ranges, one draw per image (after the resize,
where the reference jitters before it).

Normalisation follows the NetVLAD convention: ``ToTensor`` (values in [0, 1]) then
``Normalize(mean=[0.485, 0.458, 0.408], std=[1/255] * 3)``, i.e. pixel values in 0-255
minus ``mean * 255``.
"""

from __future__ import annotations

from typing import Callable, Sequence, Tuple

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import v2

MEAN = (0.485, 0.458, 0.408)
STD = (1.0 / 255.0,) * 3
JITTER = (0.7, 0.7, 0.7, 0.5)
KINDS = ("train", "test", "tokyo")
ASPECT_RULES = ("short_side", "fit_box")


def normalize() -> T.Normalize:
    return T.Normalize(mean=list(MEAN), std=list(STD))


def aspect_fit_size(img_h: int, img_w: int, height: int, width: int) -> Tuple[int, int]:
    """(h, w) of an image scaled into the box ``height x width`` turned like the image."""
    long_box, short_box = max(height, width), min(height, width)
    long_img, short_img = max(img_h, img_w), min(img_h, img_w)
    scale = min(long_box / long_img, short_box / short_img)
    return max(1, round(img_h * scale)), max(1, round(img_w * scale))


class AspectFitResize:
    """Resize a PIL image with ``aspect_fit_size`` (bilinear)."""

    def __init__(self, height: int, width: int):
        self.height, self.width = int(height), int(width)

    def __call__(self, img: Image.Image) -> Image.Image:
        h, w = aspect_fit_size(img.height, img.width, self.height, self.width)
        if (h, w) == (img.height, img.width):
            return img
        return img.resize((w, h), Image.BILINEAR)

    def __repr__(self) -> str:
        return f"AspectFitResize(height={self.height}, width={self.width})"


def train_transform(height: int, width: int, jitter: Sequence[float] = JITTER) -> T.Compose:
    """Colour jitter, resize to ``height x width``, tensor, normalise."""
    b, c, s, h = jitter
    return T.Compose([
        T.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h),
        T.Resize((height, width)),
        T.ToTensor(),
        normalize(),
    ])


def train_resize(height: int, width: int) -> T.Compose:
    """The training transform up to the resize: a ``uint8`` (3, H, W) tensor, not jittered."""
    return T.Compose([T.Resize((height, width)), T.PILToTensor()])


class DeviceColorJitter:
    """Colour jitter and normalisation of a ``uint8`` (N, 3, H, W) batch where it lies.

    Each image gets its own jitter parameters (drawn from the CPU generator, as torchvision
    does), from the ranges of ``jitter`` (brightness, contrast, saturation, hue); the result is
    the float batch ``train_transform`` would give after its ``ToTensor``, normalised.
    """

    def __init__(self, jitter: Sequence[float] = JITTER):
        b, c, s, h = (float(v) for v in jitter)
        self.jitter = v2.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h) if any((b, c, s, h)) else None
        self._norm: dict = {}  # device -> (mean, std), copied there once

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255.0)
        if self.jitter is not None:
            x = torch.stack([self.jitter(img) for img in x])
        if x.device not in self._norm:
            self._norm[x.device] = (torch.tensor(MEAN).view(1, 3, 1, 1).to(x.device),
                                    torch.tensor(STD).view(1, 3, 1, 1).to(x.device))
        mean, std = self._norm[x.device]
        return (x - mean) / std


def eval_transform(height: int, width: int) -> T.Compose:
    """Resize to ``height x width``, tensor, normalise."""
    return T.Compose([T.Resize((height, width)), T.ToTensor(), normalize()])


def tokyo_transform(height: int, width: int, rule: str = "short_side") -> T.Compose:
    """Aspect-preserving resize by ``rule`` (see module docstring), tensor, normalise."""
    if rule == "short_side":
        resize = T.Resize(max(int(height), int(width)))  # an int: the shorter side gets it
    elif rule == "fit_box":
        resize = AspectFitResize(height, width)
    else:
        raise ValueError(f"aspect-preserving resize rule must be one of {ASPECT_RULES}, got {rule!r}")
    return T.Compose([resize, T.ToTensor(), normalize()])


def make_transform(kind: str, height: int, width: int,
                   aspect_rule: str = "short_side") -> Callable[[Image.Image], torch.Tensor]:
    """``train``, ``test`` or ``tokyo`` (aspect-preserving, by ``aspect_rule``) transform."""
    if kind == "train":
        return train_transform(height, width)
    if kind == "test":
        return eval_transform(height, width)
    if kind == "tokyo":
        return tokyo_transform(height, width, aspect_rule)
    raise ValueError(f"transform kind must be one of {KINDS}, got {kind!r}")


def denormalize(t: torch.Tensor) -> torch.Tensor:
    """Inverse of ``normalize`` on a (3, H, W) or (B, 3, H, W) tensor, back to [0, 1]."""
    mean = torch.tensor(MEAN, dtype=t.dtype).view(3, 1, 1)
    std = torch.tensor(STD, dtype=t.dtype).view(3, 1, 1)
    return t * std + mean
