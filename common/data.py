"""Datasets (cifar10, cifar100, stl10, imagefolder, synthetic), their statistics and the recipe
family of the data.

Splits: "pretrain" (STL-10: train+unlabeled; a flat image folder is accepted, unlabeled),
"train" (labelled, the kNN bank and finetune set) and "test".
"""
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torch.utils.data import Dataset, Subset

from common import dist
from common.synthetic import SyntheticShapes
from common.errors import UserError

DATASETS = ["cifar10", "cifar100", "stl10", "imagefolder", "synthetic"]
FAMILIES = ["cifar", "stl10", "imagenet"]  # the kinds of data a recipe is written for

# image size, mean, std of each dataset, and of the data each recipe family is written for
# (CIFAR-10 and STL-10 constants of the official MMCR code, mmcr/cifar_stl/data.py)
CIFAR10 = (32, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
STL10 = (64, (0.43, 0.42, 0.39), (0.27, 0.26, 0.27))
IMAGENET = (224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DATASET_STATS = {"cifar10": CIFAR10, "cifar100": (32, (0.5071, 0.4865, 0.4409),
                                             (0.2673, 0.2564, 0.2762)),
            "stl10": STL10, "synthetic": (32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))}
FAMILY_STATS = {"cifar": CIFAR10, "stl10": STL10, "imagenet": IMAGENET}
SYNTHETIC_IMAGES = (10_000, 2_000)  # train, test
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass
class DataInfo:
    name: str
    image_size: int
    mean: tuple
    std: tuple
    test_resize: int | None  # shorter side before the centre crop of the eval transform
    test_interpolation: str  # of that resize
    holdout: float = 0.2  # share of each class held out as the test split of a class-folder root


def data_family(dataset: str, data_dir, image_size: int | None) -> str:
    """The recipe family of the data: cifar (CIFAR, synthetic), stl10, or for an image folder
    by the image size (--image-size, else the first image's shorter side): up to 48 px cifar,
    up to 128 px stl10, else imagenet."""
    if dataset != "imagefolder":
        return "stl10" if dataset == "stl10" else "cifar"
    size = image_size or first_image_size(Path(data_dir))
    return "cifar" if size <= 48 else "stl10" if size <= 128 else "imagenet"


def first_image_size(root: Path) -> int:
    """Shorter side of the first readable image below `root` (sorted walk, train/ before val/);
    files with an image extension that do not open as images are passed over with a warning
    each, and a folder without any readable image is one error line."""
    if not root.is_dir():
        raise UserError(f"--data-dir {root} does not exist (imagefolder needs a folder of images"
                        " or a root with train/ and val/ class folders)")
    unreadable = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(f for f in subfolders if f != "runs")
        for name in sorted(f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)):
            try:
                with Image.open(Path(folder, name)) as img:
                    size = min(img.size)
            except (OSError, SyntaxError, ValueError):  # PIL's errors, as SkipUnreadable's
                unreadable.append(Path(folder, name))
                continue
            for i, path in enumerate(unreadable, 1):
                print(f"warning: skipping unreadable image {path}; {i} unreadable so far",
                      file=sys.stderr, flush=True)
            return size
    example = f" ({len(unreadable)} files that are not images, e.g. {unreadable[0]})" \
        if unreadable else ""
    raise UserError(f"no readable images ({', '.join(IMAGE_EXTENSIONS)}) found under "
                    f"{root}{example}")


def resolve_data(args) -> None:
    """Fill unset --image-size, --mean, --std: a named dataset's own values, an image folder's
    from its recipe family (args.recipe must be resolved)."""
    size, mean, std = DATASET_STATS.get(args.dataset) or FAMILY_STATS[args.recipe]
    args.image_size = args.image_size or size
    args.mean, args.std = list(args.mean or mean), list(args.std or std)


def pretrain_images(args) -> int:
    """How many images the pretraining split holds (after --dev), counted without loading it:
    the training-set size that queue lengths are checked against at start."""
    if args.dataset == "imagefolder":
        root = Path(args.data_dir) / "train" if (Path(args.data_dir) / "train").is_dir() \
            else Path(args.data_dir)
        n = sum(p.suffix.lower() in IMAGE_EXTENSIONS for p in root.rglob("*"))
        n -= round(args.holdout * n) if class_root(root) else 0  # about held_out's share
    else:
        n = {"synthetic": SYNTHETIC_IMAGES[0], "cifar10": 50_000, "cifar100": 50_000,
             "stl10": 105_000}[args.dataset]
    return min(n, args.dev) if args.dev else n


def dataset_info(cfg) -> DataInfo:
    """Image size, normalisation and eval resize of a resolved configuration (pretraining args:
    dataset, recipe, image_size, mean, std). The eval transform resizes the shorter side first
    for the stl10 family (70 -> 64, bicubic: official MMCR mmcr/cifar_stl/data.py) and the
    imagenet family (256 -> 224, bilinear: the official MMCR, DenseCL, MSN and solo-learn
    evaluations)."""
    size = cfg.image_size
    resize, mode = {"stl10": (size * 70 // 64, "bicubic"),
                    "imagenet": (size * 256 // 224, "bilinear")}.get(cfg.recipe, (None, "bicubic"))
    return DataInfo(cfg.dataset, size, tuple(cfg.mean), tuple(cfg.std), resize, mode,
                    getattr(cfg, "holdout", 0.2))


class SkipUnreadable(Dataset):
    """An image-file dataset in which an image that fails to decode (truncated, corrupt) is
    replaced by the next readable one, with one warning line naming the file and the count of
    such files this process has met: a bad file costs one image, not the run."""

    def __init__(self, ds, paths: list):
        self.ds, self.paths, self.skipped = ds, paths, set()
        self.classes = getattr(ds, "classes", [])

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        for j in range(i, i + len(self.ds)):
            try:
                return self.ds[j % len(self.ds)]
            except (OSError, SyntaxError, ValueError) as e:  # PIL's decode errors
                self.skipped.add(j % len(self.ds))
                print(f"warning: skipping unreadable image {self.paths[j % len(self.ds)]} "
                      f"({type(e).__name__}: {e}); {len(self.skipped)} unreadable so far in this"
                      " process", file=sys.stderr, flush=True)
        raise UserError("no image of the dataset could be read")


class ImageFiles(Dataset):
    """Every image below `root` (recursive, RGB); label -1 = unlabeled. Skips runs/ folders."""

    def __init__(self, root: Path, transform):
        self.files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                            and "runs" not in p.relative_to(root).parts)
        if not self.files:
            raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
        self.transform, self.targets = transform, [-1] * len(self.files)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with Image.open(self.files[i]) as img:
            return self.transform(img.convert("RGB")), -1


def _torchvision(cls, root: Path, expected: str, **kwargs):
    """Open a torchvision dataset, downloading it on rank 0 first; one clear line offline."""
    if not (root / expected).exists() and dist.rank() == 0:
        try:
            cls(root, download=True, **kwargs)
        except Exception as e:
            raise UserError(f"{cls.__name__} not found: expected {root / expected} and the "
                            f"download failed ({type(e).__name__}). Put the files there, or run "
                            "offline with --dataset synthetic") from None
    dist.barrier()
    return cls(root, download=False, **kwargs)


def _imagefolder(root: Path, split: str, transform, holdout: float):
    """root/train/ and root/val/ class folders; else root/<class>/ folders, of which a fixed
    share of each class is held out as the test split (held_out); else, for pretraining, every
    image below root, unlabelled (None for the labelled splits)."""
    if not root.is_dir():
        raise UserError(f"--data-dir {root} does not exist (imagefolder needs a folder of images"
                        " or a root with train/ and val/ class folders)")
    sub = root / ("val" if split == "test" else "train")
    if sub.is_dir():
        try:
            ds = torchvision.datasets.ImageFolder(sub, transform, is_valid_file=_is_image)
        except FileNotFoundError:  # no class folders, or class folders without images
            raise UserError(f"{sub} holds no class folders with images: put each class's "
                            "images in its own subfolder (train/<class>/*.jpg)") from None
        return SkipUnreadable(ds, [path for path, _ in ds.samples])
    if class_root(root):
        try:  # one folder per class: labelled
            ds = torchvision.datasets.ImageFolder(root, transform, is_valid_file=_is_image)
        except FileNotFoundError:
            ds = None
        if ds is not None:
            test = set(held_out(ds.targets, holdout))
            keep = [i for i in range(len(ds)) if (i in test) == (split == "test")]
            part = SkipUnreadable(Subset(ds, keep), [ds.samples[i][0] for i in keep])
            part.classes = ds.classes
            return part
    if split == "pretrain":
        ds = ImageFiles(root, transform)
        return SkipUnreadable(ds, ds.files)
    return None  # no labelled split: the kNN monitor / finetune cannot run


def class_root(root: Path) -> bool:
    """A folder without images of its own: its subfolders are read as classes."""
    return root.is_dir() and not any(_is_image(p.name) for p in root.iterdir() if p.is_file())


def shuffled_classes(labels: list) -> list:
    """Each class's indices in a random order drawn with seed 0, classes in sorted order: the
    fixed draws behind the held-out split and the --dev sample."""
    members, g = {}, torch.Generator().manual_seed(0)
    for i, c in enumerate(labels):
        members.setdefault(c, []).append(i)
    return [[members[c][j] for j in torch.randperm(len(members[c]), generator=g).tolist()]
            for c in sorted(members)]


def held_out(targets: list, share: float) -> list:
    """The test split of a class-folder root: round(share x n_c) images of each class c, drawn
    with a fixed seed, so every run and finetune on the folder holds out the same ones."""
    return sorted(i for order in shuffled_classes(targets)
                  for i in order[:round(share * len(order))])


def dev_sample(ds, n: int):
    """--dev: a fixed sample of n images (seed 0: the same for pretrain and finetune), drawn
    class by class in turn where the labels are known, so it holds every class rather than
    the first n images in class order."""
    if n >= len(ds):
        return ds
    labels = targets(ds)
    if labels is None:
        pick = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n].tolist()
    else:  # the k-th image of every class, in a random order per class, before any (k+1)-th
        ranked = sorted((k, c, i) for c, order in enumerate(shuffled_classes(labels))
                        for k, i in enumerate(order))
        pick = [i for _, _, i in ranked[:n]]
    held = f", {len({labels[i] for i in pick})} classes" if labels is not None else ""
    dist.print0(f"--dev: a fixed sample of {n} of {len(ds)} images{held}")
    return Subset(ds, sorted(pick))


def targets(ds) -> list | None:
    """The labels of a dataset (through Subset and SkipUnreadable), or None."""
    if isinstance(ds, Subset):
        labels = targets(ds.dataset)
        return None if labels is None else [labels[i] for i in ds.indices]
    if isinstance(ds, SkipUnreadable):
        return targets(ds.ds)
    labels = getattr(ds, "targets", getattr(ds, "labels", None))
    return None if labels is None else list(labels)


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def load_split(info: DataInfo, data_dir, split: str, transform, seed: int = 0, dev: int = 0):
    """The dataset of `split` with `transform`, or None if the data has no such labelled split.
    `dev` > 0 keeps a fixed sample of `dev` images (a quarter of that for the test split)."""
    root, name = Path(data_dir), info.name
    train = split != "test"
    if name == "synthetic":  # train and test draw from disjoint seeds
        n = SYNTHETIC_IMAGES[0] if train else SYNTHETIC_IMAGES[1]
        ds = SyntheticShapes(n, info.image_size, seed * 2 + (not train), transform)
    elif name in ("cifar10", "cifar100"):
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
        ds = _torchvision(cls, root, folder, train=train, transform=transform)
    elif name == "stl10":
        stl_split = {"pretrain": "train+unlabeled", "train": "train", "test": "test"}[split]
        ds = _torchvision(torchvision.datasets.STL10, root, "stl10_binary", split=stl_split,
                          transform=transform)
    else:
        ds = _imagefolder(root, split, transform, info.holdout)
    if ds is not None and dev:
        ds = dev_sample(ds, dev if train else max(1, dev // 4))
    return ds


def num_classes(ds) -> int:
    """Class count from the dataset itself (0 when unlabeled)."""
    base = ds.dataset if isinstance(ds, Subset) else ds
    return len(getattr(base, "classes", [])) or 0
