"""The reference the device views (common/device_views.py) are tested against: the views of one
PIL image made with torchvision's PIL ops in a DataLoader worker, as --augment pil made them
before the device executor became the only one. Every random draw goes through torch's RNG,
which DataLoader seeds differently in each worker and epoch."""
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F

from common.augment import INTERPOLATION, View, colour_transforms


def pil_view(view: View, colour: T.Compose, img):
    """One view of the PIL image `img`: (tensor (C, size, size), box), box = (top, left,
    height, width, flipped) in pixels of `img`; `colour` is T.Compose(colour_transforms(view))."""
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
    """Each View of `views` applied to the same PIL image: a list of V tensors, or with
    `with_boxes` (that list, boxes (V, 5) as fractions of the image)."""

    def __init__(self, views: list, with_boxes: bool = False):
        self.views, self.with_boxes = list(views), with_boxes
        self.colours = [T.Compose(colour_transforms(view)) for view in self.views]

    def __call__(self, img):
        width, height = img.size
        out = [pil_view(view, colour, img) for view, colour in zip(self.views, self.colours)]
        tensors = [t for t, _ in out]
        if not self.with_boxes:
            return tensors
        scale = torch.tensor([height, width, height, width, 1.0])
        return tensors, torch.tensor([box for _, box in out], dtype=torch.float32) / scale
