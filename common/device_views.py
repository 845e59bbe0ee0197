"""The executor of common/augment.py's Views in pretraining: the loader only decodes, and BatchViews makes every view of a whole batch on the training device with
tensor ops, drawing each image's parameters from the same distributions as the PIL executor.
The parameters are drawn with the CPU generator and sent to the device (pinned, non-blocking),
so making views never waits for the GPU, and a CPU and a GPU run with one seed draw the same
views.
"""
import math
from dataclasses import replace

import torch
import torch.nn.functional as F

from common.augment import BLUR_SIGMA, View

GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
HUE_OFFSETS = (5.0, 3.0, 1.0)  # R, G, B: see shift_hue
RADIUS = {"bilinear": 1.0, "bicubic": 2.0}  # support of PIL's filters, in source pixels


def to(t: torch.Tensor, device) -> torch.Tensor:
    """A small CPU tensor on `device` without blocking the host (pinned, non-blocking)."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


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


def pil_filter(t, mode: str):
    """PIL's resampling filters: triangle (bilinear) or Keys cubic with a = -0.5 (bicubic)."""
    t = t.abs()
    if mode == "bilinear":
        return (1 - t).clamp(min=0)
    near = (1.5 * t - 2.5) * t * t + 1
    far = ((-0.5 * t + 2.5) * t - 4) * t + 2
    return torch.where(t < 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


def resize_weights(start, length, size: int, full: int, mode: str, taps: int):
    """(N, size, full): row i of view n holds the weights of source pixels 0..full-1 for output
    pixel i, resampling pixels [start, start + length) to `size` as PIL does: the filter centred
    at (i + 0.5) * scale, widened by the scale when shrinking (antialias), cut at the crop edges
    and normalised. start, length (N,) float; `taps` covers the widest filter."""
    scale = length / size
    stretch = scale.clamp(min=1)[:, None, None]
    centre = ((torch.arange(size, device=start.device) + 0.5) * scale[:, None])[..., None]
    first = (centre - RADIUS[mode] * stretch + 0.5).floor()  # (N, S, 1), crop coordinates
    j = first + torch.arange(taps, device=start.device)  # (N, S, taps)
    w = pil_filter((j + 0.5 - centre) / stretch, mode) * ((j >= 0) & (j < length[:, None, None]))
    index = (j + start[:, None, None]).clamp(0, full - 1).long()
    weights = torch.zeros(len(start), size, full, device=start.device)
    return weights.scatter_add_(2, index, w / w.sum(-1, keepdim=True))


def resized_crop(x, top, left, h, w, flip, size: int, mode: str = "bilinear"):
    """Crop boxes (top, left, h, w) on the CPU, each (k*B,) view-major, of the B images x,
    resized to size x size as PIL's resize (antialiased) and mirrored where `flip`: each view is
    two matrix products, rows @ image @ columns^T, for all k crops of every image at once.
    x (B, C, H, W) float in [0, 1] -> (k*B, C, size, size) in [0, 1]."""
    b, c, img_h, img_w = x.shape
    k = top.shape[0] // b
    widest = max(1.0, float(torch.maximum(h, w).max()) / size)  # the largest shrink factor
    taps = math.ceil(2 * RADIUS[mode] * widest) + 1
    top, left, h, w, flip = (to(t, x.device) for t in (top, left, h, w, flip))
    rows = resize_weights(top, h, size, img_h, mode, taps).view(k, b, size, img_h)
    cols = resize_weights(left, w, size, img_w, mode, taps)
    cols = torch.where(flip[:, None, None], cols.flip(1), cols).view(k, b, size, img_w)
    rows = rows.transpose(0, 1).reshape(b, k * size, img_h)
    cols = cols.transpose(0, 1).reshape(b * k, size, img_w).transpose(1, 2)
    out = torch.bmm(rows, x.transpose(1, 2).reshape(b, img_h, c * img_w))  # (B, k*S, C*W)
    out = torch.bmm(out.view(b * k, size * c, img_w), cols)  # (B*k, S*C, S)
    out = out.view(b, k, size, c, size).permute(1, 0, 3, 2, 4)
    # one pass to the (k*B, C, S, S) layout, clipping bicubic's overshoot as PIL does
    return torch.clamp(out, 0, 1, out=x.new_empty(k * b, c, size, size).view(out.shape)) \
        .view(k * b, c, size, size)


def gray(x):
    """Luma (N, 1, H, W) of RGB x (N, 3, H, W) with torchvision's weights."""
    return (x * x.new_tensor(GRAY)[:, None, None]).sum(1, keepdim=True)


def shift_hue(x, shift):
    """torchvision's adjust_hue (RGB -> HSV after Pillow, hue + shift mod 1, HSV -> RGB) in
    closed form: with V = max, C = max - min and the hue h in [0, 6), channel n of the result
    is V - C clamp(min(k, 4 - k), 0, 1), k = (n + h + 6 shift) mod 6, n = 5, 3, 1 for R, G, B.
    Arithmetic only (torch.where and % are about 20x slower on CPU).
    x (N, 3, H, W) in [0, 1], shift (N, 1, 1, 1)."""
    r, g, b = x.unbind(1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    chroma = maxc - torch.minimum(torch.minimum(r, g), b)
    at_r = (maxc == r).float()  # the first channel holding the max picks the sector
    at_g = (maxc == g).float() * (1 - at_r)
    sector = torch.lerp(torch.lerp(r - g + 4 * chroma, b - r + 2 * chroma, at_g), g - b, at_r)
    k = (sector / chroma.clamp(min=1e-8))[:, None] + 6 * shift \
        + x.new_tensor(HUE_OFFSETS)[:, None, None]
    k = k - 6 * torch.floor(k * (1 / 6))  # (N, 3, H, W) in [0, 6)
    return maxc[:, None] - chroma[:, None] * torch.minimum(k, 4 - k).clamp_(0, 1)


def jitter_params(n: int, strength, p: float):
    """torchvision's RandomApply([ColorJitter(b, c, s, h)], p) drawn for n images: applied
    (N,) bool, factors (N, 4): b, c, s ~ U(max(0, 1 - v), 1 + v), h ~ U(-v, v), and order
    (N, 4): the op (0 brightness, 1 contrast, 2 saturation, 3 hue) at each position, a random
    permutation per image."""
    applied = torch.rand(n) < p
    low = torch.tensor([max(0.0, 1 - v) for v in strength[:3]] + [-strength[3]])
    high = torch.tensor([1 + v for v in strength[:3]] + [strength[3]])
    return applied, low + (high - low) * torch.rand(n, 4), torch.rand(n, 4).argsort(1)


def blend(x, keep, gray_weight, mean_weight, valid=None):
    """Brightness, contrast and saturation in one product: clamp(keep x + gray_weight luma(x) +
    mean_weight mean luma(x)) per image, the mean over the `valid` pixels. Brightness f is
    (f, 0, 0), contrast (f, 0, 1 - f), saturation (f, 1 - f, 0), no op (1, 0, 0).
    x (N, 3, H, W), the weights (N,)."""
    n = x.shape[0]
    flat, w = x.view(n, 3, -1), x.new_tensor(GRAY)
    mix = keep[:, None, None] * torch.eye(3, device=x.device) + gray_weight[:, None, None] * w
    mean = flat.mean(-1) if valid is None else \
        (flat * valid.view(n, 1, -1)).sum(-1) / valid.view(n, -1).sum(-1, keepdim=True)
    return torch.baddbmm((mean_weight * (mean @ w))[:, None, None], mix, flat).clamp_(0, 1) \
        .view_as(x)


def colour_jitter(x, params, valid=None):
    """Applies jitter_params' draws to x (N, 3, H, W) in [0, 1]: at each of the 4 positions,
    one blend for the images whose op there is brightness, contrast or saturation (the others
    pass unchanged), then the hue shift of the images whose op there is hue."""
    applied, factors, order = params
    op = torch.where(applied[:, None], order, -1)  # (N, 4): the op at each position, -1 none
    f = factors.gather(1, order)  # (N, 4): its factor
    weights = to(torch.stack([torch.where((op >= 0) & (op < 3), f, 1.0),  # blend's keep,
                              torch.where(op == 2, 1 - f, 0.0),  # gray_weight,
                              torch.where(op == 1, 1 - f, 0.0)]), x.device)  # mean_weight
    for position in range(4):
        x = blend(x, *weights[:, :, position], valid)
        hue = op[:, position] == 3
        shift = to(f[hue, position, None, None, None], x.device)
        x = on_rows(x, hue, lambda y: shift_hue(y, shift))
    return x


def on_rows(x, rows, op):
    """x with op applied to the images where rows (N,) is True, in place; rows on the CPU, so
    choosing them never waits for the device."""
    sel = rows.nonzero()[:, 0]
    if len(sel):
        sel = to(sel, x.device)
        x.index_copy_(0, sel, op(x.index_select(0, sel)))
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


def solarize(x):
    """PIL's solarize(128) on [0, 1] pixels: 1 - x where x >= 128 / 255."""
    return torch.lerp(x, 1 - x, (x >= 128 / 255).float())


def colour(x, view, valid=None, chances=None):
    """The colour ops of a View on a batch: jitter, grayscale, blur, solarisation; each image
    takes an op with its probability: the view's, or per image from chances (N, 3) (grayscale,
    blur, solarisation) on the CPU."""
    n = x.shape[0]
    if chances is None:
        chances = torch.tensor([view.gray_p, view.blur_p, view.solarize_p]).expand(n, 3)
    gray_p, blur_p, solarize_p = chances.unbind(1)
    if view.jitter_p > 0:
        x = colour_jitter(x, jitter_params(n, view.jitter, view.jitter_p), valid)
    x = on_rows(x, torch.rand(n) < gray_p, lambda y: gray(y).expand_as(y))
    if view.blur_kernel > 1 and bool((blur_p > 0).any()):
        rows = torch.rand(n) < blur_p
        sigma = to(torch.empty(int(rows.sum())).uniform_(*BLUR_SIGMA), x.device)
        x = on_rows(x, rows, lambda y: gaussian_blur(y, sigma, view.blur_kernel))
    if bool((solarize_p > 0).any()):
        x = on_rows(x, torch.rand(n) < solarize_p, solarize)
    return x


def shared(view: View) -> View:
    """What views made together share: all their settings but the chances of grayscale, blur
    and solarisation, which may differ per image (NNCLR's and BYOL's two views)."""
    return replace(view, gray_p=0.0, blur_p=0.0, solarize_p=0.0)


class BatchViews:
    """The device executor: makes the views of `views` (common.augment.View) of a loader batch
    on `device`: (uint8 images (B, 3, H, W), sizes (B, 2), labels (B,)) on the CPU -> (views,
    boxes, labels) on the device, views a list of V float (B, 3, s_v, s_v), boxes (B, V, 5) =
    (top, left, height, width, flipped) as fractions of each image. The k views with the same
    shared() settings are made together, as one batch of k*B."""

    def __init__(self, views, device=torch.device("cpu")):
        self.views, self.device = list(views), device
        self.groups = {}  # shared settings -> the positions they fill, in order
        for i, view in enumerate(self.views):
            self.groups.setdefault(shared(view), []).append(i)

    def __call__(self, batch):
        images, sizes, labels = batch
        images = images.to(self.device, non_blocking=True)
        x, b = images.float().div_(255), images.shape[0]
        out, boxes = [None] * len(self.views), [None] * len(self.views)
        for positions in self.groups.values():
            group = [self.views[i] for i in positions]
            views, box = self.make(group, x, sizes)  # (k*B, 3, s, s), (k*B, 5)
            for j, i in enumerate(positions):
                out[i], boxes[i] = views[j * b:(j + 1) * b], box[j * b:(j + 1) * b]
        return out, torch.stack(boxes, 1), labels.to(self.device, non_blocking=True)

    @staticmethod
    def make(group, x, sizes):
        """The views of `group` (k Views of the same shared() settings) of every image of x
        (B, 3, H, W) in [0, 1], view-major."""
        view, k, b = group[0], len(group), x.shape[0]
        chances = torch.tensor([[v.gray_p, v.blur_p, v.solarize_p] for v in group])
        chances = chances.repeat_interleave(b, 0)  # (k*B, 3)
        sizes = sizes.repeat(k, 1)  # (k*B, 2)
        top, left, h, w = crop_params(sizes, view.scale)
        flip = torch.rand(sizes.shape[0]) < 0.5
        if view.colour_first:  # colour on the whole (unpadded part of the) image of each
            x = x.repeat(k, 1, 1, 1)  # view, then crop: one crop per image of (k*B, ...)
            rows = torch.arange(x.shape[2])[None, :, None] < sizes[:, :1, None]
            cols = torch.arange(x.shape[3])[None, None, :] < sizes[:, 1:, None]
            x = colour(x, view, to((rows & cols)[:, None].float(), x.device), chances)
        v = resized_crop(x, top, left, h, w, flip, view.size, view.interpolation)
        if not view.colour_first:
            v = colour(v, view, chances=chances)
        mean, std = (v.new_tensor(s)[:, None, None] for s in (view.mean, view.std))
        img_h, img_w = sizes.float().unbind(1)
        box = torch.stack([top / img_h, left / img_w, h / img_h, w / img_w, flip.float()], 1)
        return (v - mean) / std, to(box, x.device)
