"""Loading a data owner's inputs: image folders (or ImageFolder trees) and .npy files.

Preprocessing follows the seed's torchvision pipeline for ImageNet-style
classifiers: resize the shorter side to size * 256 / 224, center-crop to
size x size, scale to [0, 1], normalise with the ImageNet mean and std. The
manifest records these parameters so the data owner applies exactly what the
model owner compiled for.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import numpy as np

from fssc.errors import FsscError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


@dataclass
class Preprocess:
    size: int = 224
    resize: int | None = None  # shorter side before the crop; default size * 256 / 224
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["resize"] = self.resize_to
        return d

    @property
    def resize_to(self) -> int:
        return self.resize or round(self.size * 256 / 224)


def list_images(root: str) -> list[str]:
    """Image files under root (sorted; an ImageFolder tree's class folders included)."""
    if not os.path.isdir(root):
        raise FsscError(f"{root}: not a directory")
    out = []
    for d, _, files in sorted(os.walk(root)):
        out += [os.path.join(d, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTS)]
    return out


def load_image(path: str, pre: Preprocess) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as src:
            rgb = src.convert("RGB")
        w, h = rgb.size
        s = pre.resize_to / min(w, h)
        resized = rgb.resize((max(pre.size, round(w * s)), max(pre.size, round(h * s))), Image.Resampling.BILINEAR)
        w, h = resized.size
        left, top = (w - pre.size) // 2, (h - pre.size) // 2
        arr = np.asarray(resized.crop((left, top, left + pre.size, top + pre.size)), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as e:
        raise FsscError(f"{path}: cannot read image ({e})") from None
    normed = (arr - np.asarray(pre.mean, dtype=np.float32)) / np.asarray(pre.std, dtype=np.float32)
    return normed.transpose(2, 0, 1)  # CHW


def load_inputs(path: str, pre: Preprocess, chw: tuple[int, int, int]) -> np.ndarray:
    """A directory of images or an .npy file -> float32 array [N, C, H, W]."""
    if os.path.isfile(path) and path.endswith(".npy"):
        try:
            x = np.load(path, allow_pickle=False)
        except Exception as e:
            raise FsscError(f"{path}: cannot read .npy ({e})") from None
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(chw):
            raise FsscError(f"{path}: array shape {x.shape}, expected [N,{chw[0]},{chw[1]},{chw[2]}]")
        return x.astype(np.float32)
    files = list_images(path)
    if not files:
        raise FsscError(f"{path}: no images found (extensions {', '.join(IMAGE_EXTS)})")
    x = np.stack([load_image(f, pre) for f in files])
    if tuple(x.shape[1:]) != tuple(chw):
        raise FsscError(f"{path}: images give {x.shape[1:]}, the model expects {tuple(chw)}")
    return x


def batches(x: np.ndarray, batch: int) -> list[np.ndarray]:
    """Split [N,...] into batches of exactly ``batch``; the last one is padded by repeating."""
    out = []
    for i in range(0, len(x), batch):
        b = x[i : i + batch]
        if len(b) < batch:
            b = np.concatenate([b, np.repeat(b[-1:], batch - len(b), axis=0)])
        out.append(b)
    return out


def synthetic_inputs(shape: tuple[int, ...], count: int, seed: int = 0) -> list[np.ndarray]:
    """Deterministic smooth-plus-noise image batches (calibration data, not key material)."""
    rng = np.random.default_rng(seed)
    out = []
    n, c, h, w = shape
    for _ in range(count):
        low = rng.standard_normal((n, c, max(h // 8, 1), max(w // 8, 1)))
        img = np.repeat(np.repeat(low, -(-h // low.shape[2]), axis=2), -(-w // low.shape[3]), axis=3)[:, :, :h, :w]
        out.append((img + 0.3 * rng.standard_normal(shape)).astype(np.float32))
    return out
