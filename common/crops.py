"""The random resized crop of a whole batch on the device: torchvision's crop parameters drawn
for every image at once (on the host), and PIL's antialiased resize of each crop as two matrix
products, so that a batch of crops of images of any size is a few tensor ops."""
import math

import torch

RADIUS = {"bilinear": 1.0, "bicubic": 2.0}  # support of PIL's filters, in source pixels


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
    pixel i, resampling [start, start + length) to `size` as PIL does: the filter centred at
    (i + 0.5) * scale, widened by the scale when shrinking (antialias), cut at the crop edges
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
    """The crops (top, left, h, w), each (k*B,) view-major on x's device, of the B images x,
    resized to size x size as PIL's antialiased resize and mirrored where `flip` is 1: two
    matrix products per view, rows @ image @ columns^T, for all k crops of each image at once.
    x (B, C, H, W) float in [0, 1] -> (k*B, C, size, size) in [0, 1]."""
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
