"""Datasets (cifar10, cifar100, stl10, imagefolder, synthetic), their statistics and the recipe
family of the data; image folders are read by common/folders.py.

Splits: "pretrain" (STL-10: train+unlabeled; a flat image folder is accepted, unlabeled),
"train" (labelled, the kNN bank and finetune set) and "test".
"""
from pathlib import Path

import torch
import torchvision
from torch.utils.data import Subset

from common import dist
from common.errors import UserError
from common.folders import (SkipUnreadable, class_root, first_image_size, imagefolder,
                            is_image, shuffled_classes)
from common.synthetic import SyntheticShapes

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


def data_family(dataset: str, data_dir, image_size: int | None) -> str:
    """The recipe family of the data: cifar (CIFAR, synthetic), stl10, or for an image folder
    by the image size (--image-size, else the first image's shorter side): up to 48 px cifar,
    up to 128 px stl10, else imagenet."""
    if dataset != "imagefolder":
        return "stl10" if dataset == "stl10" else "cifar"
    size = image_size or first_image_size(Path(data_dir))
    return "cifar" if size <= 48 else "stl10" if size <= 128 else "imagenet"


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
        n = sum(is_image(p.name) for p in root.rglob("*"))
        n -= round(args.holdout * n) if class_root(root) else 0  # about held_out's share
    else:
        n = {"synthetic": SYNTHETIC_IMAGES[0], "cifar10": 50_000, "cifar100": 50_000,
             "stl10": 105_000}[args.dataset]
    return min(n, args.dev) if args.dev else n


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


def load_split(args, data_dir, split: str, transform, seed: int = 0, dev: int = 0):
    """The dataset of `split` with `transform`, or None if the data has no such labelled split;
    `args`: a pretraining run's resolved flags (dataset, image_size, holdout). `dev` > 0 keeps
    a fixed sample of `dev` images (a quarter of that for the test split)."""
    root, name = Path(data_dir), args.dataset
    train = split != "test"
    if name == "synthetic":  # train and test draw from disjoint seeds
        n = SYNTHETIC_IMAGES[0] if train else SYNTHETIC_IMAGES[1]
        ds = SyntheticShapes(n, args.image_size, seed * 2 + (not train), transform)
    elif name in ("cifar10", "cifar100"):
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
        ds = _torchvision(cls, root, folder, train=train, transform=transform)
    elif name == "stl10":
        stl_split = {"pretrain": "train+unlabeled", "train": "train", "test": "test"}[split]
        ds = _torchvision(torchvision.datasets.STL10, root, "stl10_binary", split=stl_split,
                          transform=transform)
    else:
        ds = imagefolder(root, split, transform, args.holdout)
    if ds is not None and dev:
        ds = dev_sample(ds, dev if train else max(1, dev // 4))
    return ds


def num_classes(ds) -> int:
    """Class count from the dataset itself (0 when unlabeled)."""
    base = ds.dataset if isinstance(ds, Subset) else ds
    return len(getattr(base, "classes", [])) or 0
