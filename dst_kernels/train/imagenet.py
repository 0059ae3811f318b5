"""ImageNet (or any ImageFolder) through torchvision's datasets and transforms.

``--data-dir`` holds ``train/<class>/*.JPEG`` and ``val/<class>/*.JPEG`` (the layout of
torchvision's ``ImageFolder``; the validation set sorted into class folders). Training
images get ``RandomResizedCrop(224)`` and a horizontal flip, validation images
``Resize(256)`` and ``CenterCrop(224)``; both are normalised with the ImageNet channel
statistics. Images are decoded with Pillow (torchvision's default loader).

torchvision is an optional extra (``pip install dst_kernels[imagenet]``); without it an
ImageNet run stops with :class:`~dst_kernels.train.data.MissingExtra`.
"""

from __future__ import annotations

import copy
import os

import torch

from dst_kernels.train.data import BatchKey, DataError, DataSource, MissingExtra

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "FolderDataset", "load_imagenet", "torchvision_or_error"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def torchvision_or_error():
    """``torchvision`` when it imports, else :class:`MissingExtra` naming the extra."""
    try:
        import torchvision
        from torchvision import datasets, transforms  # noqa: F401
    except Exception as e:  # ImportError, or a RuntimeError from a wheel built for another torch
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MissingExtra(
            "--dataset imagenet needs torchvision, which does not import here "
            f"({reason}): pip install 'dst_kernels[imagenet]' (a torchvision built for torch "
            f"{torch.__version__})"
        ) from None
    return torchvision


class FolderDataset(torch.utils.data.Dataset):
    """An ImageFolder served a batch at a time: ``__getitems__`` decodes and transforms the
    key's images with torch's global generator seeded by the key (inside ``fork_rng``), so
    the random crops are the same whatever the number of workers."""

    def __init__(self, folder, transform) -> None:
        self.folder, self.transform = folder, transform
        self.indices: list[int] | None = None

    def __len__(self) -> int:
        return len(self.folder.samples) if self.indices is None else len(self.indices)

    def subset(self, n: int, seed: int = 0) -> FolderDataset:
        """A fixed random subset of ``n`` images (the folder itself is sorted by class)."""
        out = copy.copy(self)
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        out.indices = [self._index(i) for i in order.tolist()]
        return out

    def _index(self, i: int) -> int:
        return i if self.indices is None else self.indices[i]

    def _load(self, i: int):
        path, label = self.folder.samples[self._index(i)]
        try:
            image = self.folder.loader(path)
        except Exception as e:
            raise DataError(f"{path} cannot be decoded as an image ({type(e).__name__}: {e})") from None
        return self.transform(image), label

    def __getitems__(self, key: BatchKey):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(key.seed)
            samples = [self._load(i) for i in key.indices]
        return torch.stack([s[0] for s in samples]), torch.tensor([s[1] for s in samples])

    def __getitem__(self, i: int):
        return self._load(i)


def _image_folder(datasets, root: str, split: str):
    try:
        return datasets.ImageFolder(os.path.join(root, split))
    except (FileNotFoundError, RuntimeError) as e:  # no class folders, or no images in them
        raise DataError(f"{os.path.join(root, split)}: not an ImageFolder ({e})") from None


def load_imagenet(data_dir: str | None) -> DataSource:
    if not data_dir:
        raise FileNotFoundError("--dataset imagenet is read from disk: pass --data-dir DIR")
    missing = [s for s in ("train", "val") if not os.path.isdir(os.path.join(data_dir, s))]
    if missing:
        raise FileNotFoundError(
            f"imagenet not found: looked for the folders train/ and val/ (one subfolder of images "
            f"per class) in {os.path.abspath(data_dir)}; missing: {', '.join(s + '/' for s in missing)}"
        )
    torchvision = torchvision_or_error()
    datasets, T = torchvision.datasets, torchvision.transforms
    train, val = _image_folder(datasets, data_dir, "train"), _image_folder(datasets, data_dir, "val")
    if train.classes != val.classes:
        raise DataError(
            f"{data_dir}: train/ has {len(train.classes)} class folders and val/ {len(val.classes)}; "
            "they must hold the same classes"
        )
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    val_tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), normalize])
    return DataSource(
        "imagenet",
        FolderDataset(train, train_tf),
        FolderDataset(val, val_tf),
        len(train.classes),
        (3, 224, 224),
        in_memory=False,
        eval_batch_size=100,
    )
