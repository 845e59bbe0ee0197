"""Views, defined once: a View holds the settings of one random view. common/device_views.py
makes the views of a pretraining batch on the training device; view_transform (here) is the same
View as a torchvision pipeline of one PIL image, for finetune's training images, and
tests/pil_views.py makes pretraining views with it as the reference the device views are tested
against. Also the deterministic evaluation transform."""
import math
from dataclasses import dataclass

import torchvision.transforms as T

INTERPOLATION = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}
BLUR_SIGMA = (0.1, 2.0)  # Gaussian blur sigma ~ U(0.1, 2.0), as BYOL and MoCo v2
# taps of the blur kernel: +-3 sigma of the widest blur, whatever the view's size (the official
# views blur with PIL, whose Gaussian has no size limit): 13
BLUR_TAPS = 2 * math.ceil(3 * BLUR_SIGMA[1]) + 1


@dataclass(frozen=True)
class View:
    """One random view: random resized crop (`scale`, aspect 3/4-4/3) and flip, colour jitter
    (brightness, contrast, saturation, hue strengths) with chance `jitter_p` in a random order,
    grayscale, Gaussian blur and solarisation with their chances, then normalisation.
    `colour_first` applies the colour ops before the crop (MMCR's STL-10 recipe)."""
    size: int
    mean: tuple
    std: tuple
    scale: tuple = (0.08, 1.0)
    jitter: tuple = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.0
    solarize_p: float = 0.0
    colour_first: bool = False
    interpolation: str = "bilinear"

    def __post_init__(self):  # tuples, so that views can be compared and grouped
        for name in ("mean", "std", "scale", "jitter"):
            object.__setattr__(self, name, tuple(getattr(self, name)))


def colour_transforms(view: View) -> list:
    """The colour ops of `view` as torchvision transforms of a PIL image (those with a chance)."""
    ops = []
    if view.jitter_p > 0:
        ops.append(T.RandomApply([T.ColorJitter(*view.jitter)], p=view.jitter_p))
    if view.gray_p > 0:
        ops.append(T.RandomGrayscale(view.gray_p))
    if view.blur_p > 0:
        ops.append(T.RandomApply([T.GaussianBlur(BLUR_TAPS, BLUR_SIGMA)], view.blur_p))
    if view.solarize_p > 0:  # PIL uint8 image: threshold 128 is the usual "> half"
        ops.append(T.RandomSolarize(128, p=view.solarize_p))
    return ops


def view_transform(view: View) -> T.Compose:
    """`view` as a torchvision pipeline of one PIL image -> tensor (C, size, size): finetune's
    training images, one view each (the pretraining runs make theirs on the device)."""
    crop = [T.RandomResizedCrop(view.size, view.scale, interpolation=INTERPOLATION[
        view.interpolation]), T.RandomHorizontalFlip()]
    colour = colour_transforms(view)
    ops = colour + crop if view.colour_first else crop + colour
    return T.Compose(ops + [T.ToTensor(), T.Normalize(view.mean, view.std)])


def eval_resize(args) -> tuple:
    """(shorter side, interpolation) of the resize before the evaluation's centre crop, from a
    pretraining run's resolved flags (recipe, image_size): the stl10 family 70 -> 64 bicubic
    (official MMCR mmcr/cifar_stl/data.py), the imagenet family 256 -> 224 bilinear (the
    official MMCR, DenseCL, MSN and solo-learn evaluations), else the image size itself."""
    size = args.image_size
    return {"stl10": (size * 70 // 64, "bicubic"),
            "imagenet": (size * 256 // 224, "bilinear")}.get(args.recipe, (size, "bicubic"))


def eval_transform(args):
    """Deterministic transform for the kNN bank, the test split and finetune evaluation: resize
    (eval_resize) and centre crop to the image size, a no-op on images of that size."""
    resize, mode = eval_resize(args)
    ops = [T.Resize(resize, INTERPOLATION[mode]), T.CenterCrop(args.image_size)]
    return T.Compose(ops + [T.ToTensor(), T.Normalize(args.mean, args.std)])
