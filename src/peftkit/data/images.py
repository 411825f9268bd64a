"""Image-classification data: scikit-learn's handwritten digits, ``.npz`` files, preprocessing and batching.

A data set is an :class:`ImageData`: images as a float tensor (N, C, H, W) in [0, 1] at their own resolution
(C = 1 grey or 3 RGB), integer labels and the label names. Resizing and normalisation happen per batch
(:func:`preprocess`), so the stored set stays small and the input size is a batching choice:

- bilinear resize to ``size × size`` (no antialiasing: the digits are upscaled, 8×8 → e.g. 64×64);
- grey images repeated to three channels;
- per-channel normalisation ``(x − mean) / std`` (default: the EfficientNet-Lite input range [-1, 1]).

``digits``: the 1,797 8×8 images of scikit-learn's ``load_digits`` (values 0..16, scaled to [0, 1]; white digit on
black), labels ``"0"``..``"9"``. An ``.npz`` file holds ``images`` (N, H, W) or (N, H, W, C) with C = 1 or 3 —
``uint8`` 0..255, or floats in [0, 1] — and ``labels`` (N,): integers 0..K−1 or strings; an optional
``label_names`` (K,) names integer labels. It is read with ``allow_pickle=False`` (no object arrays).
"""

from __future__ import annotations

import random
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import PeftkitError
from ..models.efficientnet import INPUT_MEAN, INPUT_STD
from .text import infer_label_names

DIGITS = "digits"
#: the per-channel mean/std the pretrained EfficientNet-Lite weights expect: RGB [0, 1] → [-1, 1] (TF's 127 / 128)
LITE_MEAN, LITE_STD = INPUT_MEAN, INPUT_STD


@dataclass
class ImageData:
    """``images[i]`` (C, H, W), float32 in [0, 1], has label ``labels[i]`` (an index into ``label_names``)."""

    images: torch.Tensor
    labels: list[int]
    label_names: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int]) -> ImageData:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return ImageData(self.images[idx], [self.labels[i] for i in indices], list(self.label_names), self.source)


# -- sources --------------------------------------------------------------------------------------------------
def load_digits() -> ImageData:
    """scikit-learn's 1,797 handwritten digits (8×8, 0..16 → [0, 1]), labels "0".."9"."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise PeftkitError("the digits data comes with scikit-learn: pip install scikit-learn "
                           "(or pass --data FILE.npz with images and labels arrays)") from None
    d = sk_load_digits()
    images = torch.from_numpy(np.asarray(d.images, dtype=np.float32) / 16.0).unsqueeze(1)
    return ImageData(images, [int(t) for t in d.target], [str(i) for i in range(10)], DIGITS)


def _label_names_from(path: Path, arr: np.ndarray) -> list[str]:
    if arr.ndim != 1 or arr.dtype.kind not in "UiuS":
        raise PeftkitError(f"{path}: label_names must be a 1-D array of strings, got {arr.dtype} {arr.shape}")
    names = [str(n.decode() if isinstance(n, bytes) else n) for n in arr.tolist()]
    if len(set(names)) != len(names) or any(not n.strip() for n in names):
        raise PeftkitError(f"{path}: label_names must be distinct non-empty names, got {names}")
    return names


def _label_keys(path: Path, labels: np.ndarray, file_names: list[str] | None) -> list[str]:
    """Each label as its name: an integer label is the index into the file's ``label_names`` (else its value)."""
    if labels.dtype.kind in "iu":
        values = labels.astype(np.int64).tolist()
        if min(values) < 0:
            raise PeftkitError(f"{path}: integer labels must be >= 0, got {min(values)}")
        if file_names is not None:
            if max(values) >= len(file_names):
                raise PeftkitError(f"{path}: label {max(values)} has no name: label_names holds {len(file_names)}")
            return [file_names[v] for v in values]
        return [str(v) for v in values]
    if labels.dtype.kind in "US":
        if file_names is not None:
            raise PeftkitError(f"{path}: label_names names integer labels; these labels are already strings")
        keys = [str(v.decode() if isinstance(v, bytes) else v).strip() for v in labels.tolist()]
        if any(not k for k in keys):
            raise PeftkitError(f"{path}: empty label")
        return keys
    raise PeftkitError(f"{path}: labels must be integers or strings, got dtype {labels.dtype}")


def _images_from(path: Path, arr: np.ndarray) -> torch.Tensor:
    if arr.ndim == 4 and arr.shape[-1] in (1, 3):
        x = arr
    elif arr.ndim == 3:
        x = arr[..., None]
    else:
        raise PeftkitError(f"{path}: images must be (N, H, W) or (N, H, W, C) with C = 1 or 3, got shape "
                           f"{arr.shape}")
    if min(x.shape[1:3]) < 1:
        raise PeftkitError(f"{path}: images have an empty side: shape {arr.shape}")
    if x.dtype == np.uint8:
        out = x.astype(np.float32) / 255.0
    elif x.dtype.kind == "f":
        out = x.astype(np.float32)
        if not np.isfinite(out).all():
            raise PeftkitError(f"{path}: images hold NaN or infinite values")
        lo, hi = float(out.min()), float(out.max())
        if lo < 0.0 or hi > 1.0:
            raise PeftkitError(f"{path}: float images must lie in [0, 1], found values in [{lo:g}, {hi:g}] "
                               "(store uint8 0..255 or scale them)")
    else:
        raise PeftkitError(f"{path}: images must be uint8 (0..255) or float in [0, 1], got dtype {x.dtype}")
    return torch.from_numpy(np.ascontiguousarray(out)).permute(0, 3, 1, 2).contiguous()


def load_npz(path: str | Path, label_names: Sequence[str] | None = None) -> ImageData:
    """Read an ``.npz`` with ``images``, ``labels`` and optional ``label_names`` (see the module docstring).

    ``label_names`` (from a trained adapter) fixes the numbering; a label outside it is an error. Without it the
    numbering is the file's ``label_names``, else inferred (integers 0..max keep their value, strings sorted)."""
    path = Path(path)
    if not path.is_file():
        raise PeftkitError(f"data file not found: {path}" if not path.exists() else
                           f"data path is not a file: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise PeftkitError(f"{path}: not a readable .npz of plain arrays ({str(e).splitlines()[0] or e})") from None
    missing = [k for k in ("images", "labels") if k not in arrays]
    if missing:
        raise PeftkitError(f"{path}: missing array(s) {missing}; found {sorted(arrays)}; the file needs 'images' "
                           "and 'labels'")
    unknown = sorted(set(arrays) - {"images", "labels", "label_names"})
    if unknown:
        raise PeftkitError(f"{path}: unknown array(s) {unknown}; expected images, labels and optional label_names")
    labels = arrays["labels"]
    if labels.ndim != 1:
        raise PeftkitError(f"{path}: labels must be 1-D (N,), got shape {labels.shape}")
    if len(labels) == 0:
        raise PeftkitError(f"{path}: no examples")
    images = _images_from(path, arrays["images"])
    if images.shape[0] != len(labels):
        raise PeftkitError(f"{path}: {images.shape[0]} images but {len(labels)} labels")
    file_names = _label_names_from(path, arrays["label_names"]) if "label_names" in arrays else None
    keys = _label_keys(path, labels, file_names)
    if label_names is not None:
        names = list(label_names)
    elif file_names is not None:
        names = file_names
    else:
        names = infer_label_names(keys)
    index = {n: i for i, n in enumerate(names)}
    bad = sorted({k for k in keys if k not in index})
    if bad:
        raise PeftkitError(f"{path}: unknown label(s) {bad[:5]}; the known labels are {names}")
    return ImageData(images, [index[k] for k in keys], names, str(path.resolve()))


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
FOLDER_SIDE = 96  # images of a folder are resized to FOLDER_SIDE × FOLDER_SIDE when read (training resizes again)


def load_image_folder(path: str | Path, label_names: Sequence[str] | None = None) -> ImageData:
    """A folder with one subfolder per class (``root/<label>/<image>``, the torchvision ``ImageFolder`` layout).

    Images may have any size and mode: each is decoded with Pillow, converted to RGB and resized (bilinear) to
    ``FOLDER_SIDE`` × ``FOLDER_SIDE`` on reading, so a folder of mixed sizes stacks into one tensor; training then
    resizes to ``--image-size``. Classes are the subfolder names, sorted (or the adapter's ``label_names``); files
    that are not images by suffix are ignored; a file that cannot be decoded is an error naming it."""
    from PIL import Image, UnidentifiedImageError

    root = Path(path)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise PeftkitError(f"{root}: no class subfolders (expected {root}/<label>/<image files>)")
    names = list(label_names) if label_names is not None else classes
    unknown = [c for c in classes if c not in names]
    if unknown:
        raise PeftkitError(f"{root}: class folder(s) {unknown} are not among the adapter's labels {names}")
    images: list[torch.Tensor] = []
    labels: list[int] = []
    for c in classes:
        for f in sorted((root / c).iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES or not f.is_file():
                continue
            try:
                with Image.open(f) as im:
                    rgb = im.convert("RGB").resize((FOLDER_SIDE, FOLDER_SIDE), Image.Resampling.BILINEAR)
            except (UnidentifiedImageError, OSError) as e:
                raise PeftkitError(f"{f}: not a readable image ({e})") from None
            images.append(torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1))
            labels.append(names.index(c))
    if not images:
        raise PeftkitError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
    return ImageData(torch.stack(images), labels, names, str(root.resolve()))


def load_image_data(source: str | None, label_names: Sequence[str] | None = None) -> ImageData:
    """``None`` or ``"digits"``: scikit-learn's digits; a folder: :func:`load_image_folder`; else an ``.npz`` file
    for :func:`load_npz`."""
    if source is None or source == DIGITS:
        data = load_digits()
        if label_names is not None and list(label_names) != data.label_names:
            raise PeftkitError(f"the adapter's labels {list(label_names)} are not the digits' {data.label_names}")
        return data
    if Path(source).is_dir():
        return load_image_folder(source, label_names)
    if Path(source).suffix.lower() != ".npz":
        raise PeftkitError(f"{source}: image data must be an .npz file (images, labels), a folder of class "
                           f"subfolders, or 'digits'")
    return load_npz(source, label_names)


# -- preprocessing and batching -------------------------------------------------------------------------------
def preprocess(images: torch.Tensor, size: int, mean: Sequence[float] = LITE_MEAN,
               std: Sequence[float] = LITE_STD) -> torch.Tensor:
    """(N, C, H, W) images in [0, 1] → (N, 3, size, size) network inputs: bilinear resize (``align_corners=False``),
    grey repeated to RGB, ``(x − mean) / std`` per channel."""
    if size < 1:
        raise PeftkitError(f"image size must be >= 1, got {size}")
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise PeftkitError(f"expected images of shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    x = images.float()
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


class ImageBatches:
    """``(inputs, labels)`` batches of :func:`preprocess`-ed images, the pairs ``peftkit.train.trainer.train`` and
    ``accuracy`` take. ``shuffle=True``: every ``iter()`` is one epoch in a new order (epoch ``e`` uses seed
    ``seed + e``, Python's ``random``); ``shuffle=False``: the stored order, the same batches every time."""

    def __init__(self, data: ImageData, batch_size: int, size: int, *, shuffle: bool, seed: int = 0,
                 mean: Sequence[float] = LITE_MEAN, std: Sequence[float] = LITE_STD) -> None:
        if batch_size < 1:
            raise PeftkitError(f"batch size must be >= 1, got {batch_size}")
        if len(data) == 0:
            raise PeftkitError("no examples to batch")
        if size < 1:
            raise PeftkitError(f"image size must be >= 1, got {size}")
        self.data, self.batch_size, self.size, self.shuffle, self.seed = data, batch_size, size, shuffle, seed
        self.mean, self.std = tuple(mean), tuple(std)
        self.labels = torch.tensor(data.labels, dtype=torch.long)
        self.epoch = 0

    def __len__(self) -> int:
        return -(-len(self.data) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = list(range(len(self.data)))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
            self.epoch += 1
        for s in range(0, len(order), self.batch_size):
            idx = torch.tensor(order[s: s + self.batch_size], dtype=torch.long)
            yield preprocess(self.data.images[idx], self.size, self.mean, self.std), self.labels[idx]
