"""The views of a pretraining batch, made on the training device (common/augment.py's Views).
BatchViews draws every image's random parameters on the host, from the distributions of
torchvision's PIL ops (the tests compare with tests/pil_views.py), sends them to the device in
one copy and applies them with batched tensor ops: nothing is read back, the number of ops does
not grow with the batch, and a CPU and a GPU run with one seed draw the same views.
"""
import functools
from dataclasses import replace

import torch
import torch.nn.functional as F

from common.augment import BLUR_SIGMA, BLUR_TAPS, View
from common.crops import crop_params, resized_crop

GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
HUE_OFFSETS = (5.0, 3.0, 1.0)  # R, G, B: see shift_hue


@functools.cache
def on_device(values: tuple, device) -> torch.Tensor:
    """A constant vector (gray weights, normalisation) on `device`, copied there once."""
    return torch.tensor(values, device=device)


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
    """The colour draws of the k Views of `group` (one shared() setting) for b images, N = k*b
    view-major, as host columns: the blend weights (keep, gray_w, mean_w: see blend) at each of
    the jitter's 4 positions, the hue shift, and blur's sigma where drawn. `order` sorts the
    images by a key (4 x the hue op's position (4: none) + 2 x solarise + grayscale) and `runs`
    counts each key, so that each op is applied to host-known slices."""
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
    on the host and sent to `device` in one copy: ({name: (N,) or (N, w) on the device}, the
    runs of colour_plan). Crop columns and boxes (fractions of each image) are view-major,
    colour columns in `order`."""
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
    names, columns = zip(*{**columns, **plan}.items())
    packed = torch.cat([c.float().reshape(len(c), -1) for c in columns], 1)  # (N, P)
    packed = (packed.pin_memory() if device.type == "cuda" else packed).to(device,
                                                                          non_blocking=True)
    parts = packed.split([c[0].numel() for c in columns], 1)
    return {n: p if c.dim() == 2 else p[:, 0] for n, p, c in zip(names, parts, columns)}, runs


def shift_hue(x, shift):
    """torchvision's adjust_hue (RGB -> HSV after Pillow, hue + shift mod 1, HSV -> RGB) in
    closed form: with V = max, C = max - min and the hue h in [0, 6), channel n of the result
    is V - C clamp(min(k, 4 - k), 0, 1), k = (n + h + 6 shift) mod 6, n = 5, 3, 1 for R, G, B;
    arithmetic only (torch.where and % are about 20x slower on CPU). x (N, 3, H, W) in [0, 1],
    shift (N, 1, 1, 1)."""
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
    `runs` of draw(): at each of the jitter's 4 positions a blend of every image, then the hue
    shift of the slice whose hue op is there; grayscale, blur, solarisation. The images are
    taken in p["order"] and put back; the slices' bounds are host numbers."""
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
    """The views `views` (common.augment.View) of a loader batch, on `device`: (uint8 images
    (B, 3, H, W), sizes (B, 2), labels (B,)) on the host -> (views, boxes, labels) on the
    device: V float (B, 3, s_v, s_v), boxes (B, V, 5) = (top, left, height, width, flipped) as
    fractions of each image. The k views of the same shared() settings are made as one batch."""

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
        """One group's views (`view` its shared settings, draws `p` and `runs`) of the images x
        (B, 3, H, W) in [0, 1], view-major, normalised."""
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
