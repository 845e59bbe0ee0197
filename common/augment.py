"""Views, defined once: a View holds the settings of one random view, and two executors read
it. MultiView (here) makes views of one PIL image in the DataLoader workers, the reference
(--augment pil); common/device_views.py makes them for a whole batch on the training device
(--augment device, the default). A new view option is one field here plus its op in each.

Every random draw goes through torch's RNG, which DataLoader seeds differently in each worker
and each epoch, so the views of one image differ from each other, across workers and epochs.
"""
from dataclasses import dataclass

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F

INTERPOLATION = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}
BLUR_SIGMA = (0.1, 2.0)  # Gaussian blur sigma ~ U(0.1, 2.0), as BYOL and MoCo v2


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

    @property
    def blur_kernel(self) -> int:
        """About 10% of the image, odd."""
        return self.size // 20 * 2 + 1


def pil_colour(view: View) -> T.Compose:
    """The colour ops of `view` as torchvision transforms of a PIL image."""
    ops = [T.RandomApply([T.ColorJitter(*view.jitter)], p=view.jitter_p),
           T.RandomGrayscale(view.gray_p)]
    if view.blur_p > 0:
        ops.append(T.RandomApply([T.GaussianBlur(view.blur_kernel, BLUR_SIGMA)], view.blur_p))
    if view.solarize_p > 0:  # PIL uint8 image: threshold 128 is the usual "> half"
        ops.append(T.RandomSolarize(128, p=view.solarize_p))
    return T.Compose(ops)


def pil_view(view: View, colour: T.Compose, img):
    """One view of the PIL image `img`: (tensor (C, size, size), box), box = (top, left,
    height, width, flipped) in pixels of `img`; `colour` is pil_colour(view)."""
    if view.colour_first:
        img = colour(img)
    top, left, h, w = T.RandomResizedCrop.get_params(img, view.scale, (3 / 4, 4 / 3))
    img = F.resized_crop(img, top, left, h, w, [view.size, view.size],
                         INTERPOLATION[view.interpolation])
    flipped = bool(torch.rand(1) < 0.5)
    if flipped:
        img = F.hflip(img)
    if not view.colour_first:
        img = colour(img)
    return F.normalize(F.to_tensor(img), view.mean, view.std), (top, left, h, w, flipped)


class MultiView:
    """The PIL executor: each View of `views` applied to the same image. Returns a list of V
    tensors, or (list, boxes (V, 5)) with `with_boxes`, boxes as fractions of the image."""

    def __init__(self, views: list, with_boxes: bool = False):
        self.views, self.with_boxes = list(views), with_boxes
        self.colours = [pil_colour(view) for view in self.views]

    def __call__(self, img):
        width, height = img.size
        out = [pil_view(view, colour, img) for view, colour in zip(self.views, self.colours)]
        tensors = [t for t, _ in out]
        if not self.with_boxes:
            return tensors
        scale = torch.tensor([height, width, height, width, 1.0])
        return tensors, torch.tensor([box for _, box in out], dtype=torch.float32) / scale


class OneView(MultiView):
    """One View as a dataset transform, PIL image -> tensor: finetune's training views."""

    def __init__(self, view: View):
        super().__init__([view])

    def __call__(self, img):
        return super().__call__(img)[0]


def eval_resize(cfg) -> tuple:
    """(shorter side, interpolation) of the resize before the evaluation's centre crop, from a
    run's resolved flags (recipe, image_size): the stl10 family 70 -> 64 bicubic (official MMCR
    mmcr/cifar_stl/data.py), the imagenet family 256 -> 224 bilinear (the official MMCR,
    DenseCL, MSN and solo-learn evaluations), else the image size itself."""
    size = cfg.image_size
    return {"stl10": (size * 70 // 64, "bicubic"),
            "imagenet": (size * 256 // 224, "bilinear")}.get(cfg.recipe, (size, "bicubic"))


def eval_transform(cfg):
    """Deterministic transform for the kNN bank, the test split and finetune evaluation: resize
    (eval_resize) and centre crop to the image size, a no-op on images of that size."""
    resize, mode = eval_resize(cfg)
    ops = [T.Resize(resize, INTERPOLATION[mode]), T.CenterCrop(cfg.image_size)]
    return T.Compose(ops + [T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])
