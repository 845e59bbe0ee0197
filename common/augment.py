"""View pipelines: one random view, a multi-view wrapper and the evaluation transforms.

Every random draw goes through torch's RNG, which DataLoader seeds differently in each worker
and each epoch, so the views of one image differ from each other, across workers and epochs.
"""
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F

INTERPOLATION = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}


class View:
    """One random view of a PIL image: crop and flip (geometry reported as a box), colour jitter,
    grayscale, optional blur and solarisation, then ToTensor and Normalize.

    Returns (tensor (C, size, size), box) where box = (top, left, height, width, flipped) with the
    crop given as fractions of the source image, so a method can map view cells to image cells.
    `colour_first` applies the colour ops before the crop (MMCR's STL-10 recipe). The settings
    stay readable as attributes: common.device_views.BatchViews makes the same view on a batch."""

    def __init__(self, size, mean, std, scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.4, 0.1),
                 jitter_p=0.8, gray_p=0.2, blur_p=0.0, solarize_p=0.0, colour_first=False,
                 interpolation="bilinear"):
        self.size, self.mean, self.std, self.scale = size, mean, std, scale
        self.jitter, self.jitter_p, self.gray_p = jitter, jitter_p, gray_p
        self.blur_p, self.solarize_p, self.colour_first = blur_p, solarize_p, colour_first
        # blur kernel about 10% of the image, sigma ~ U(0.1, 2.0) as in BYOL/MoCo v2
        self.blur_kernel, self.blur_sigma = size // 20 * 2 + 1, (0.1, 2.0)
        self.interpolation_mode = interpolation
        self.interpolation = INTERPOLATION[interpolation]
        colour = [T.RandomApply([T.ColorJitter(*jitter)], p=jitter_p), T.RandomGrayscale(gray_p)]
        if blur_p > 0:
            colour.append(T.RandomApply([T.GaussianBlur(self.blur_kernel, self.blur_sigma)],
                                        blur_p))
        if solarize_p > 0:  # PIL uint8 image: threshold 128 is the usual "> half" solarisation
            colour.append(T.RandomSolarize(128, p=solarize_p))
        self.colour = T.Compose(colour)
        self.finish = T.Compose([T.ToTensor(), T.Normalize(mean, std)])

    def __call__(self, img):
        if self.colour_first:
            img = self.colour(img)
        top, left, h, w = T.RandomResizedCrop.get_params(img, self.scale, (3 / 4, 4 / 3))
        img = F.resized_crop(img, top, left, h, w, [self.size, self.size], self.interpolation)
        flipped = bool(torch.rand(1) < 0.5)
        if flipped:
            img = F.hflip(img)
        if not self.colour_first:
            img = self.colour(img)
        return self.finish(img), (top, left, h, w, flipped)


class MultiView:
    """Applies each View in `views` to the same image: returns a list of V tensors, or
    (list, boxes (V, 5)) with `with_boxes`, boxes as fractions of the source image."""

    def __init__(self, views, with_boxes=False):
        self.views, self.with_boxes = list(views), with_boxes

    def __call__(self, img):
        width, height = img.size
        out = [view(img) for view in self.views]
        tensors = [t for t, _ in out]
        if not self.with_boxes:
            return tensors
        scale = torch.tensor([height, width, height, width, 1.0])
        boxes = torch.tensor([box for _, box in out], dtype=torch.float32) / scale
        return tensors, boxes


def eval_transform(size, mean, std, resize=None):
    """Deterministic transform for the kNN bank, the test split and finetune evaluation."""
    # resize: shorter side before the centre crop (STL-10 70 -> 64, ImageNet 256 -> 224);
    # without it Resize + CenterCrop to `size` is a no-op on images that already have that size.
    ops = [T.Resize(resize or size, INTERPOLATION["bicubic"]), T.CenterCrop(size)]
    return T.Compose(ops + [T.ToTensor(), T.Normalize(mean, std)])


def supervised_transform(size, mean, std):
    """Training transform of the supervised finetune: random resized crop and flip only."""
    return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(),
                      T.ToTensor(), T.Normalize(mean, std)])
