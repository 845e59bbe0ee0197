"""Image folders: the layouts read (train/ and val/ class folders, one folder per class with a
fixed held-out share, or a folder of unlabelled images), the image size of the first image,
and unreadable files skipped with a warning instead of ending the run."""
import os
import sys
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torch.utils.data import Dataset, Subset

from common.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def is_image(path: str) -> bool:
    """A file name with an image extension."""
    return path.lower().endswith(IMAGE_EXTENSIONS)


def open_rgb(path) -> Image.Image:
    """An image file as 8-bit RGB, whatever its mode (gray, palette, alpha, CMYK). 16-bit
    gray (PNG/TIFF) is scaled to 8 bits first: PIL's own conversion clips it at 255, which
    turns most of such an image white."""
    with Image.open(path) as img:
        if img.mode.startswith("I"):
            img = img.convert("I").point(lambda v: v * (1 / 256)).convert("L")
        return img.convert("RGB")


def must_exist(root: Path) -> None:
    """One error line when the --data-dir of an image folder is missing."""
    if not root.is_dir():
        raise UserError(f"--data-dir {root} does not exist (imagefolder needs a folder of images"
                        " or a root with train/ and val/ class folders)")


def first_image_size(root: Path) -> int:
    """Shorter side of the first readable image below `root` (sorted walk, train/ before val/);
    files that do not open as images are passed over here (the loader warns of each when it
    meets it), and a folder without any readable image is one error line."""
    must_exist(root)
    unreadable = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(f for f in subfolders if f != "runs")
        for name in sorted(f for f in files if is_image(f)):
            try:
                with Image.open(Path(folder, name)) as img:
                    return min(img.size)
            except (OSError, SyntaxError, ValueError):  # PIL's errors, as SkipUnreadable's
                unreadable.append(Path(folder, name))
    example = f" ({len(unreadable)} files that are not images, e.g. {unreadable[0]})" \
        if unreadable else ""
    raise UserError(f"no readable images ({', '.join(IMAGE_EXTENSIONS)}) found under "
                    f"{root}{example}")


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
        self.files = sorted(p for p in root.rglob("*") if is_image(p.name)
                            and "runs" not in p.relative_to(root).parts)
        if not self.files:
            raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
        self.transform, self.targets = transform, [-1] * len(self.files)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return self.transform(open_rgb(self.files[i])), -1


def imagefolder(root: Path, split: str, transform, holdout: float):
    """root/train/ and root/val/ class folders; else root/<class>/ folders, of which a fixed
    share of each class is held out as the test split (held_out); else, for pretraining, every
    image below root, unlabelled (None for the labelled splits)."""
    must_exist(root)
    sub = root / ("val" if split == "test" else "train")
    if sub.is_dir():
        ds = class_folders(sub, transform)
        if ds is None:
            raise UserError(f"{sub} holds no class folders with images: put each class's "
                            "images in its own subfolder (train/<class>/*.jpg)")
        return SkipUnreadable(ds, [path for path, _ in ds.samples])
    ds = class_folders(root, transform) if class_root(root) else None
    if ds is not None:  # one folder per class: labelled
        test = set(held_out(ds.targets, holdout))
        keep = [i for i in range(len(ds)) if (i in test) == (split == "test")]
        part = SkipUnreadable(Subset(ds, keep), [ds.samples[i][0] for i in keep])
        part.classes = ds.classes
        return part
    if split == "pretrain":
        ds = ImageFiles(root, transform)
        return SkipUnreadable(ds, ds.files)
    return None  # no labelled split: the kNN monitor / finetune cannot run


def class_folders(root: Path, transform):
    """torchvision's ImageFolder of root/<class>/ images, or None when root holds no class
    folders with images."""
    try:
        return torchvision.datasets.ImageFolder(root, transform, loader=open_rgb,
                                                is_valid_file=is_image)
    except FileNotFoundError:
        return None


def class_root(root: Path) -> bool:
    """A folder without images of its own: its subfolders are read as classes."""
    return root.is_dir() and not any(is_image(p.name) for p in root.iterdir() if p.is_file())


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
