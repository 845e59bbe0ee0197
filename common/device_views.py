"""Views made on the training device for a whole batch at once (--augment device, the default).

The loader only decodes: each image arrives once, as uint8 (3, H, W). BatchViews then draws every
view's random parameters per image, from the same distributions as the PIL views of
common/augment.py (the reference, --augment pil), and applies each op to the whole batch with
tensor ops: one grid_sample for all crops and flips, colour jitter in a random order per image,
grayscale, Gaussian blur (one grouped convolution), solarisation, normalisation. The parameters
are drawn with the CPU generator and sent to the device (pinned, non-blocking), so making views
never waits for the GPU, and a CPU and a GPU run with one seed draw the same views.
"""
import math

import torch
import torch.nn.functional as F
from torchvision.transforms.functional import pil_to_tensor

GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def to(t: torch.Tensor, device) -> torch.Tensor:
    """A small CPU tensor on `device` without blocking the host (pinned, non-blocking)."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def decode(img) -> torch.Tensor:
    """The loader's only transform: a PIL image as uint8 (3, H, W)."""
    return pil_to_tensor(img)


def collate_images(batch):
    """[(uint8 (3, H_i, W_i), label)] -> uint8 (B, 3, H, W) zero-padded to the largest image,
    sizes (B, 2) as (H_i, W_i), labels (B,)."""
    images, labels = zip(*batch)
    sizes = torch.tensor([img.shape[1:] for img in images])
    h, w = sizes.max(0).values.tolist()
    out = torch.zeros(len(images), 3, h, w, dtype=torch.uint8)
    for i, img in enumerate(images):
        out[i, :, :img.shape[1], :img.shape[2]] = img
    return out, sizes, torch.as_tensor(labels)


def crop_params(sizes: torch.Tensor, scale, ratio=(3 / 4, 4 / 3), attempts: int = 10):
    """torchvision's RandomResizedCrop.get_params for every image at once: up to 10 draws of
    area ~ U(scale) x image area and log aspect ~ U(log ratio), the first that fits wins, else
    the central crop of the clamped ratio. sizes (N, 2) on the CPU -> top, left, h, w, (N,)."""
    n = sizes.shape[0]
    img_h, img_w = sizes.float().unbind(1)  # (N,)
    area = (img_h * img_w)[:, None] * torch.empty(n, attempts).uniform_(*scale)
    log_r = torch.empty(n, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    w = torch.sqrt(area * log_r.exp()).round()
    h = torch.sqrt(area / log_r.exp()).round()
    fits = (w > 0) & (h > 0) & (w <= img_w[:, None]) & (h <= img_h[:, None])  # (N, attempts)
    first = fits.int().argmax(1, keepdim=True)
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    found = fits.any(1)
    in_ratio = img_w / img_h  # fallback: central crop with the ratio clamped into range
    fw = torch.where(in_ratio > ratio[1], (img_h * ratio[1]).round(), img_w)
    fh = torch.where(in_ratio < ratio[0], (img_w / ratio[0]).round(), img_h)
    w, h = torch.where(found, w, fw), torch.where(found, h, fh)
    top = torch.where(found, (torch.rand(n) * (img_h - h + 1)).floor(), ((img_h - h) / 2).floor())
    left = torch.where(found, (torch.rand(n) * (img_w - w + 1)).floor(), ((img_w - w) / 2).floor())
    return top, left, h, w


def resized_crop(x, top, left, h, w, flip, size: int, mode: str = "bilinear"):
    """Crop boxes (top, left, h, w) on the CPU, each (k*B,) view-major, of the B images x,
    resized to size x size and mirrored where `flip`: k crops of every image from one
    grid_sample. The sampling points are F.interpolate's (align_corners=False), clamped to the
    crop, as torchvision's resized_crop. When a crop shrinks by 1.5x or more, each output pixel
    averages m x m sub-samples (a box prefilter against aliasing).
    x (B, C, H, W) float -> (k*B, C, size, size)."""
    b, c, img_h, img_w = x.shape
    k = top.shape[0] // b
    m = max(1, round(float(torch.maximum(h, w).max()) / size))
    top, left, h, w, flip = (to(t, x.device) for t in (top, left, h, w, flip))
    steps = (torch.arange(size * m, device=x.device) + 0.5) / m  # output pixel centres

    def axis(start, length, full):  # (k*B, size*m) normalised source coordinates
        src = start[:, None] + steps[None] * (length / size)[:, None] - 0.5
        src = torch.minimum(torch.maximum(src, start[:, None]), (start + length - 1)[:, None])
        return (2 * src + 1) / full - 1

    xs, ys = axis(left, w, img_w), axis(top, h, img_h)
    xs = torch.where(flip[:, None], xs.flip(1), xs)
    grid = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), dim=-1)
    grid = grid.unflatten(0, (k, b)).permute(1, 2, 0, 3, 4).flatten(2, 3)  # (B, S, k*S, 2)
    out = F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)
    out = out.unflatten(3, (k, size * m)).permute(3, 0, 1, 2, 4).flatten(0, 1)  # (k*B, C, S, S)
    return F.avg_pool2d(out, m) if m > 1 else out


def gray(x):
    """Luma (N, 1, H, W) of RGB x (N, 3, H, W) with torchvision's weights."""
    return (x * x.new_tensor(GRAY)[:, None, None]).sum(1, keepdim=True)


def shift_hue(x, shift):
    """torchvision's adjust_hue (RGB -> HSV after Pillow, hue + shift mod 1, HSV -> RGB) in
    closed form: with V = max, C = max - min and the hue h in [0, 6), channel n of the result
    is V - C clamp(min(k, 4 - k), 0, 1), k = (n + h') mod 6, n = 5, 3, 1 for R, G, B.
    x (N, 3, H, W) in [0, 1], shift (N, 1, 1, 1)."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    chroma = maxc - minc
    c = torch.where(chroma == 0, torch.ones_like(chroma), chroma)
    h = torch.where(maxc == r, (g - b) / c, torch.where(maxc == g, 2 + (b - r) / c,
                                                        4 + (r - g) / c))
    h = (h[:, None] + 6 * shift) % 6  # (N, 1, H, W)
    k = (x.new_tensor([5.0, 3.0, 1.0])[None, :, None, None] + h) % 6  # (N, 3, H, W)
    return maxc[:, None] - chroma[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)


def _blend(x, other, factor):
    return (factor * x + (1 - factor) * other).clamp(0, 1)


def jitter_op(x, op: int, f, valid=None):
    """One ColorJitter op with per-image factors f (N, 1, 1, 1): 0 brightness, 1 contrast
    (blend with the mean luma over `valid` pixels), 2 saturation, 3 hue (shift f)."""
    if op == 0:
        return (x * f).clamp(0, 1)
    if op == 1:
        luma = gray(x)
        mean = luma.mean((1, 2, 3), keepdim=True) if valid is None else \
            (luma * valid).sum((1, 2, 3), keepdim=True) / valid.sum((1, 2, 3), keepdim=True)
        return _blend(x, mean, f)
    if op == 2:
        return _blend(x, gray(x), f)
    return shift_hue(x, f)


def colour_jitter(x, strength, p: float, valid=None):
    """torchvision's RandomApply([ColorJitter(b, c, s, h)], p) per image: factors b, c, s ~
    U(max(0, 1 - v), 1 + v), h ~ U(-v, v), the four ops in a random order per image."""
    n = x.shape[0]
    active = torch.rand(n) < p
    low = torch.tensor([max(0.0, 1 - v) for v in strength[:3]] + [-strength[3]])
    high = torch.tensor([1 + v for v in strength[:3]] + [strength[3]])
    factors = low + (high - low) * torch.rand(n, 4)  # (N, 4)
    order = torch.rand(n, 4).argsort(1)  # a random permutation per image
    for position in range(4):
        for op in range(4):
            sel = (active & (order[:, position] == op)).nonzero()[:, 0]  # on the CPU: no sync
            if len(sel):
                f = to(factors[sel, op][:, None, None, None], x.device)
                sel = to(sel, x.device)
                x[sel] = jitter_op(x[sel], op, f, None if valid is None else valid[sel])
    return x


def gaussian_blur(x, sigma, kernel: int):
    """Per-image Gaussian blur (torchvision's kernel, reflect padding) as one grouped conv.
    x (N, C, H, W), sigma (N,)."""
    n, c, h, w = x.shape
    half = (kernel - 1) / 2
    t = torch.linspace(-half, half, kernel, device=x.device)
    k = torch.exp(-0.5 * (t[None] / sigma[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (N*C, kernel)
    pad = kernel // 2
    y = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    return y.reshape(n, c, h, w)


def colour(x, view, valid=None):
    """The colour ops of a View on a batch: jitter, grayscale, blur, solarisation."""
    n = x.shape[0]

    def chosen(p):  # (N, 1, 1, 1) on the device: apply to this image?
        return to(torch.rand(n) < p, x.device)[:, None, None, None]

    if view.jitter_p > 0:
        x = colour_jitter(x, view.jitter, view.jitter_p, valid)
    x = torch.where(chosen(view.gray_p), gray(x).expand_as(x), x)
    if view.blur_p > 0:
        sel, sigma = chosen(view.blur_p), to(torch.empty(n).uniform_(*view.blur_sigma), x.device)
        if view.blur_kernel > 1:
            x = torch.where(sel, gaussian_blur(x, sigma, view.blur_kernel), x)
    if view.solarize_p > 0:
        x = torch.where(chosen(view.solarize_p) & (x >= 128 / 255), 1 - x, x)
    return x


class BatchViews:
    """Makes the views of `views` (common.augment.View) for a batch on its device:
    (uint8 images (B, 3, H, W), sizes (B, 2)) -> list of V float (B, 3, s_v, s_v), and with
    `with_boxes` also boxes (B, V, 5) = (top, left, height, width, flipped), as fractions of
    each image, the same as MultiView's. The k views that share one View are made together."""

    def __init__(self, views, with_boxes: bool = False):
        self.views, self.with_boxes = list(views), with_boxes
        self.groups = {}  # View -> the positions it fills, in order
        for i, view in enumerate(self.views):
            self.groups.setdefault(view, []).append(i)

    def __call__(self, images: torch.Tensor, sizes: torch.Tensor):
        """images on the device, sizes on the CPU."""
        x, b = images.float() / 255, images.shape[0]
        out, boxes = [None] * len(self.views), [None] * len(self.views)
        for view, positions in self.groups.items():
            views, box = self.make(view, x, sizes, len(positions))  # (k*B, 3, s, s), (k*B, 5)
            for j, i in enumerate(positions):
                out[i], boxes[i] = views[j * b:(j + 1) * b], box[j * b:(j + 1) * b]
        return (out, torch.stack(boxes, 1)) if self.with_boxes else out

    @staticmethod
    def make(view, x, sizes, k: int):
        """k views of every image of x (B, 3, H, W) in [0, 1], view-major."""
        sizes = sizes.repeat(k, 1)  # (k*B, 2)
        top, left, h, w = crop_params(sizes, view.scale)
        flip = torch.rand(sizes.shape[0]) < 0.5
        if view.colour_first:  # colour on the whole (unpadded part of the) image, then crop
            x = x.repeat(k, 1, 1, 1)
            rows = torch.arange(x.shape[2])[None, :, None] < sizes[:, :1, None]
            cols = torch.arange(x.shape[3])[None, None, :] < sizes[:, 1:, None]
            x = colour(x, view, to((rows & cols)[:, None].float(), x.device))
            b = x.shape[0] // k
            v = torch.cat([resized_crop(x[j * b:(j + 1) * b], *(t[j * b:(j + 1) * b] for t in
                                        (top, left, h, w, flip)), view.size,
                                        view.interpolation_mode) for j in range(k)])
        else:
            v = colour(resized_crop(x, top, left, h, w, flip, view.size,
                                    view.interpolation_mode), view)
        mean, std = (v.new_tensor(s)[:, None, None] for s in (view.mean, view.std))
        img_h, img_w = sizes.float().unbind(1)
        box = torch.stack([top / img_h, left / img_w, h / img_h, w / img_w, flip.float()], 1)
        return (v - mean) / std, to(box, x.device)
