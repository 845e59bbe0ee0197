"""The views of a pretraining batch, made on the training device from common/augment.py's Views.
The loader only decodes. BatchViews draws every image's random parameters on the host, from the
distributions of torchvision's PIL ops (tests/pil_views.py, the reference the tests compare
against), sends them to the device in one non-blocking copy, and applies them with batched
tensor ops: nothing is read back from the device, and the number of ops does not grow with the
batch. A CPU and a GPU run with one seed draw the same views.
"""
import functools
import math
from dataclasses import replace

import torch
import torch.nn.functional as F

from common.augment import BLUR_SIGMA, BLUR_TAPS, View

GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
HUE_OFFSETS = (5.0, 3.0, 1.0)  # R, G, B: see shift_hue
RADIUS = {"bilinear": 1.0, "bicubic": 2.0}  # support of PIL's filters, in source pixels


@functools.cache
def on_device(values: tuple, device) -> torch.Tensor:
    """A constant vector (gray weights, normalisation) on `device`, copied there once."""
    return torch.tensor(values, device=device)


def crop_params(sizes: torch.Tensor, scale, ratio=(3 / 4, 4 / 3), attempts: int = 10):
    """torchvision's RandomResizedCrop.get_params for every image at once: up to 10 draws of
    area ~ U(scale) x image area and log aspect ~ U(log ratio), the first that fits wins, else
    the central crop of the clamped ratio. sizes (N, 2) on the host -> top, left, h, w, (N,)."""
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


def jitter_params(n: int, strength, p: float):
    """torchvision's RandomApply([ColorJitter(b, c, s, h)], p) drawn for n images: applied
    (N,) bool, factors (N, 4): b, c, s ~ U(max(0, 1 - v), 1 + v), h ~ U(-v, v), and order
    (N, 4): the op (0 brightness, 1 contrast, 2 saturation, 3 hue) at each position, a random
    permutation per image."""
    applied = torch.rand(n) < p
    low = torch.tensor([max(0.0, 1 - v) for v in strength[:3]] + [-strength[3]])
    high = torch.tensor([1 + v for v in strength[:3]] + [strength[3]])
    return applied, low + (high - low) * torch.rand(n, 4), torch.rand(n, 4).argsort(1)


def colour_plan(group: list, b: int) -> dict:
    """The colour draws of k = len(group) Views of one shared() setting for b images (N = k*b,
    view-major), on the host, as per-image columns: at each jitter position p the blend weights
    (keep, gray, mean: see blend) and the hue shift; whether grayscale, blur (with its sigma) and
    solarisation apply. `order` sorts the images by the position of their hue op (4: none),
    then by whether they solarise, then by whether they turn gray, and `runs` (20 ints) counts
    them by that key, so that each position's hue shift is one slice, solarisation five and
    grayscale ten."""
    view, n = group[0], len(group) * b
    chances = torch.tensor([[v.gray_p, v.blur_p, v.solarize_p] for v in group])
    chances = chances.repeat_interleave(b, 0)  # (N, 3)
    keep, gray_w, mean_w, shift = torch.ones(n, 4), torch.zeros(n, 4), torch.zeros(n, 4), \
        torch.zeros(n)
    hue_at = torch.full((n,), 4)
    if view.jitter_p > 0:
        applied, factors, order = jitter_params(n, view.jitter, view.jitter_p)
        op = torch.where(applied[:, None], order, -1)  # (N, 4): the op at each position, -1 none
        f = factors.gather(1, order)  # (N, 4): its factor
        keep = torch.where((op >= 0) & (op < 3), f, 1.0)
        gray_w, mean_w = torch.where(op == 2, 1 - f, 0.0), torch.where(op == 1, 1 - f, 0.0)
        hue = op == 3
        hue_at, shift = torch.where(hue.any(1), hue.int().argmax(1), 4), factors[:, 3]
    plan = {"keep": keep, "gray_w": gray_w, "mean_w": mean_w, "shift": shift}
    for i, name in enumerate(("gray", "blur", "solarize")):
        if any(getattr(v, f"{name}_p") > 0 for v in group):  # a fixed number of draws
            plan[name] = torch.rand(n) < chances[:, i]
    if "blur" in plan:
        plan["sigma"] = torch.empty(n).uniform_(*BLUR_SIGMA)
    no = torch.zeros(n, dtype=torch.long)
    key = 4 * hue_at + 2 * plan.pop("solarize", no) + plan.pop("gray", no)  # (N,) in 0..19
    order = torch.argsort(key, stable=True)
    plan = {k: v[order] for k, v in plan.items()}
    return {**plan, "order": order, "unorder": order.argsort(),
            "runs": torch.bincount(key, minlength=20).tolist()}


def draw(group: list, sizes: torch.Tensor, device) -> tuple:
    """Every random parameter of the views of `group` for the images of `sizes` (B, 2), drawn
    on the host and sent to `device` in one copy: (params {name: (N,) or (N, w) on the
    device}, runs: colour_plan's twenty counts). Crop columns (and boxes, as fractions of each
    image) are in view-major order, colour columns in the order of `order`."""
    view, k = group[0], len(group)
    sizes = sizes.repeat(k, 1)  # (N, 2)
    top, left, h, w = crop_params(sizes, view.scale)
    flip = (torch.rand(len(sizes)) < 0.5).float()
    img_h, img_w = sizes.float().unbind(1)
    columns = {"top": top, "left": left, "h": h, "w": w, "flip": flip, "img_h": img_h,
               "img_w": img_w, "box": torch.stack([top / img_h, left / img_w, h / img_h,
                                                    w / img_w, flip], 1)}
    plan = colour_plan(group, len(sizes) // k)
    runs = plan.pop("runs")
    columns.update(plan)
    spans, start = {}, 0
    for name, column in columns.items():
        width = column.shape[1] if column.dim() == 2 else 0
        spans[name], start = (start, start + max(width, 1), width), start + max(width, 1)
    packed = torch.cat([c.float().reshape(len(c), -1) for c in columns.values()], 1)  # (N, P)
    if device.type == "cuda":
        packed = packed.pin_memory()
    packed = packed.to(device, non_blocking=True)
    params = {name: packed[:, a:b] if width else packed[:, a] for name, (a, b, width)
              in spans.items()}
    return params, runs


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
    """Crop boxes (top, left, h, w), each (k*B,) view-major on x's device, of the B images x,
    resized to size x size as PIL's resize (antialiased) and mirrored where `flip` (1.0): each
    view is two matrix products, rows @ image @ columns^T, for all k crops of every image at
    once. x (B, C, H, W) float in [0, 1] -> (k*B, C, size, size) in [0, 1]."""
    b, c, img_h, img_w = x.shape
    k = top.shape[0] // b
    widest = max(1.0, max(img_h, img_w) / size)  # the largest shrink any crop can need
    taps = math.ceil(2 * RADIUS[mode] * widest) + 1
    rows = resize_weights(top, h, size, img_h, mode, taps).view(k, b, size, img_h)
    cols = resize_weights(left, w, size, img_w, mode, taps)
    cols = torch.lerp(cols, cols.flip(1), flip[:, None, None]).view(k, b, size, img_w)
    rows = rows.transpose(0, 1).reshape(b, k * size, img_h)
    cols = cols.transpose(0, 1).reshape(b * k, size, img_w).transpose(1, 2)
    out = torch.bmm(rows, x.transpose(1, 2).reshape(b, img_h, c * img_w))  # (B, k*S, C*W)
    out = torch.bmm(out.view(b * k, size * c, img_w), cols)  # (B*k, S*C, S)
    out = out.view(b, k, size, c, size).permute(1, 0, 3, 2, 4)
    # one pass to the (k*B, C, S, S) layout, clipping bicubic's overshoot as PIL does
    return torch.clamp(out, 0, 1, out=x.new_empty(k * b, c, size, size).view(out.shape)) \
        .view(k * b, c, size, size)


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
    offsets = on_device(HUE_OFFSETS, x.device)[:, None, None]
    k = (sector / chroma.clamp(min=1e-8))[:, None] + 6 * shift + offsets
    k = k - 6 * torch.floor(k * (1 / 6))  # (N, 3, H, W) in [0, 6)
    return maxc[:, None] - chroma[:, None] * torch.minimum(k, 4 - k).clamp_(0, 1)


def gray(x):
    """Luma (N, 1, H, W) of RGB x (N, 3, H, W) with torchvision's weights."""
    return (x * on_device(GRAY, x.device)[:, None, None]).sum(1, keepdim=True)


def blend(x, keep, gray_weight, mean_weight, valid=None):
    """Brightness, contrast and saturation in one product: clamp(keep x + gray_weight luma(x) +
    mean_weight mean luma(x)) per image, the mean over the `valid` pixels. Brightness f is
    (f, 0, 0), contrast (f, 0, 1 - f), saturation (f, 1 - f, 0), no op (1, 0, 0).
    x (N, 3, H, W), the weights (N,)."""
    n = x.shape[0]
    flat, w = x.view(n, 3, -1), on_device(GRAY, x.device)
    mix = keep[:, None, None] * torch.eye(3, device=x.device) + gray_weight[:, None, None] * w
    mean = flat.mean(-1) if valid is None else \
        (flat * valid.view(n, 1, -1)).sum(-1) / valid.view(n, -1).sum(-1, keepdim=True)
    return torch.baddbmm((mean_weight * (mean @ w))[:, None, None], mix, flat).clamp_(0, 1) \
        .view_as(x)


def gaussian_blur(x, sigma, taps: int = BLUR_TAPS):
    """Per-image Gaussian blur as one grouped conv per axis, the edge pixels extended as PIL's
    blur (the official views') extends them; sigma (N,), 0 for no blur (the kernel is then the
    identity). x (N, C, H, W)."""
    n, c, h, w = x.shape
    half = (taps - 1) / 2
    t = torch.linspace(-half, half, taps, device=x.device)
    k = torch.exp(-0.5 * (t / sigma[:, None].clamp(min=1e-6)) ** 2)  # (N, taps); 0 -> delta
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (N*C, taps)
    pad = taps // 2
    y = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="replicate")
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    return y.reshape(n, c, h, w)


def solarize(x):
    """PIL's solarize(128) on [0, 1] pixels: 1 - x where x >= 128 / 255."""
    return torch.lerp(x, 1 - x, (x >= 128 / 255).float())


def colour(x, p: dict, runs: list, valid=None):
    """The colour ops of a View on x (N, 3, H, W) in [0, 1], view-major, with the draws `p` and
    `runs` of draw(): the jitter's four positions (at each a blend of every image, then the hue
    shift of the slice of images whose hue op is there), grayscale, blur, solarisation. The
    images are taken in the order of p["order"] and put back; every slice bound is known on the
    host, so nothing is read from the device."""
    x = x[p["order"].long()]
    valid = None if valid is None else valid[p["order"].long()]
    at = [sum(runs[:i]) for i in range(21)]  # run i: the images [at[i], at[i + 1]) of key i
    for position in range(4):
        x = blend(x, p["keep"][:, position], p["gray_w"][:, position], p["mean_w"][:, position],
                  valid)
        start, end = at[4 * position], at[4 * position + 4]
        if end > start:
            x[start:end] = shift_hue(x[start:end], p["shift"][start:end, None, None, None])
    for start, end in zip(at[1::2], at[2::2]):  # odd keys turn gray
        if end > start:
            x[start:end] = gray(x[start:end])
    if "blur" in p:
        x = gaussian_blur(x, p["sigma"] * p["blur"])
    for start, end in zip(at[2::4], at[4::4]):  # keys 4h + 2, 4h + 3 solarise
        if end > start:
            x[start:end] = solarize(x[start:end])
    return x[p["unorder"].long()]


def shared(view: View) -> View:
    """What views made together share: all their settings but the chances of grayscale, blur
    and solarisation, which may differ per image (NNCLR's and BYOL's two views)."""
    return replace(view, gray_p=0.0, blur_p=0.0, solarize_p=0.0)


class BatchViews:
    """Makes the views of `views` (common.augment.View) of a loader batch on `device`: (uint8
    images (B, 3, H, W), sizes (B, 2), labels (B,)) on the host -> (views, boxes, labels) on
    the device, views a list of V float (B, 3, s_v, s_v), boxes (B, V, 5) = (top, left, height,
    width, flipped) as fractions of each image. The k views with the same shared() settings are
    made together, as one batch of k*B."""

    def __init__(self, views, device=torch.device("cpu")):
        self.views, self.device = list(views), device
        self.groups = {}  # shared settings -> the positions they fill, in order
        for i, view in enumerate(self.views):
            self.groups.setdefault(shared(view), []).append(i)

    def __call__(self, batch):
        images, sizes, labels = batch
        x = images.to(self.device, non_blocking=True).float().div_(255)
        b = x.shape[0]
        out, boxes = [None] * len(self.views), [None] * len(self.views)
        for positions in self.groups.values():
            group = [self.views[i] for i in positions]
            p, runs = draw(group, sizes, self.device)
            views = self.make(group[0], x, p, runs)  # (k*B, 3, s, s)
            for j, i in enumerate(positions):
                out[i], boxes[i] = views[j * b:(j + 1) * b], p["box"][j * b:(j + 1) * b]
        return out, torch.stack(boxes, 1), labels.to(self.device, non_blocking=True)

    @staticmethod
    def make(view, x, p, runs):
        """The views of one group (draws `p` and `runs`, `view` its shared settings) of every
        image of x (B, 3, H, W) in [0, 1], view-major, normalised."""
        k = p["top"].shape[0] // x.shape[0]
        crop = (p["top"], p["left"], p["h"], p["w"], p["flip"], view.size, view.interpolation)
        if view.colour_first:  # colour on the whole (unpadded part of the) image of each view,
            x = x.repeat(k, 1, 1, 1)  # then crop: one crop per image of (k*B, ...)
            rows = torch.arange(x.shape[2], device=x.device) < p["img_h"][:, None]  # (N, H)
            cols = torch.arange(x.shape[3], device=x.device) < p["img_w"][:, None]
            x = colour(x, p, runs, (rows[:, :, None] & cols[:, None, :])[:, None].float())
            v = resized_crop(x, *crop)
        else:
            v = colour(resized_crop(x, *crop), p, runs)
        mean, std = (on_device(s, x.device)[:, None, None] for s in (view.mean, view.std))
        return (v - mean) / std
